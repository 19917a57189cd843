// The CUDA element-wise, norm, RoPE and cross-entropy kernels (their real
// source, runtime/core/cuda/*.cu) run on the CPU under
// tests/core/cuda_emulation.h. What is checked is the bf16 contract of their
// f32-or-bf16 operands (cuda_kernels.h ElemIn / ElemOut): on bf16 values, the
// all-bf16 and the mixed runs give, bit for bit, the all-f32 run rounded once
// to bf16 (the numbers the bf16 staging layer gives around an f32 kernel),
// in place as the model calls them; and the f32 runs match a float64
// evaluation of each op.
//
// The kernels are compiled into this test and into nothing else here: the
// test links no runtime library, so moe::cuda's names are this file's.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#define MOE_CUDA_EMULATION 1
// clang-format off
#include "tests/core/cuda_emulation.h"
#include "runtime/core/cuda/cuda_elementwise.cu"
#include "runtime/core/cuda/cuda_norm.cu"
#include "runtime/core/cuda/cuda_reduce.cu"
#include "runtime/core/cuda/cuda_rope.cu"
#include "runtime/core/cuda/cuda_softmax.cu"
// clang-format on

namespace moe {
namespace {

using cuda::ElemIn;
using cuda::ElemOut;
using cuda::ElemType;
using Bf16s = std::vector<uint16_t>;
using F32s = std::vector<float>;

Bf16s RandomBf16(size_t n, uint32_t seed, float lo = -2.0f, float hi = 2.0f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  Bf16s v(n);
  for (uint16_t& x : v) x = kmath::F32ToBF16(dist(gen));
  return v;
}
F32s Widen(const Bf16s& v) {
  F32s w(v.size());
  for (size_t i = 0; i < v.size(); ++i) w[i] = kmath::BF16ToF32(v[i]);
  return w;
}
Bf16s Round(const F32s& v) {
  Bf16s r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = kmath::F32ToBF16(v[i]);
  return r;
}
ElemIn In(const Bf16s& v) { return {v.data(), ElemType::kBF16}; }
ElemIn In(const F32s& v) { return {v.data(), ElemType::kF32}; }
ElemOut Out(Bf16s& v) { return {v.data(), ElemType::kBF16}; }
ElemOut Out(F32s& v) { return {v.data(), ElemType::kF32}; }

double MaxRel(const std::vector<double>& want, const F32s& got) {
  double worst = 0, scale = 1e-30;
  for (size_t i = 0; i < want.size(); ++i) {
    worst = std::max(worst, std::isfinite(got[i]) ? std::fabs(got[i] - want[i]) : INFINITY);
    scale = std::max(scale, std::fabs(want[i]));
  }
  return worst / scale;
}

TEST_CASE("emulated RMSNorm kernels: bf16 and mixed operands give the f32 kernel's numbers rounded once") {
  for (int64_t d : {200, 1030}) {  // 128 and 512 threads a row
    INFO("d " << d);
    const int64_t rows = 5;
    std::vector<double> scratch(cuda::ColumnSumScratchBytes(rows, d) /
                                sizeof(double));  // none: one row chunk
    const float eps = 1e-5f;
    const Bf16s x = RandomBf16(rows * d, 1), w = RandomBf16(d, 2, 0.5f, 1.5f), res0 = RandomBf16(rows * d, 3);
    // AddRmsNorm in place on the residual (model/rms_norm.cc): f32 on the widened values ...
    F32s res_f = Widen(res0), out_f(rows * d), rstd_f(rows);
    REQUIRE(cuda::LaunchRmsNorm(In(Widen(x)), In(res_f), Out(res_f), In(Widen(w)), eps, Out(out_f),
                                rstd_f.data(), rows, d, nullptr) == cudaSuccess);
    // ... all-bf16 ...
    Bf16s res_b = res0, out_b(rows * d);
    F32s rstd_b(rows);
    REQUIRE(cuda::LaunchRmsNorm(In(x), In(res_b), Out(res_b), In(w), eps, Out(out_b), rstd_b.data(), rows, d,
                                nullptr) == cudaSuccess);
    CHECK(res_b == Round(res_f));
    CHECK(out_b == Round(out_f));
    CHECK(rstd_b == rstd_f);
    // ... and mixed (bf16 x and weight, f32 residual into a separate f32 sum, bf16 out).
    F32s sum_m(rows * d);
    Bf16s out_m(rows * d);
    F32s rstd_m(rows);
    REQUIRE(cuda::LaunchRmsNorm(In(x), In(Widen(res0)), Out(sum_m), In(w), eps, Out(out_m), rstd_m.data(),
                                rows, d, nullptr) == cudaSuccess);
    CHECK(sum_m == res_f);
    CHECK(out_m == out_b);
    // The f32 kernel against float64: v = x + r, out = v / rms(v) * w.
    std::vector<double> want(rows * d);
    const F32s xf = Widen(x), rf = Widen(res0), wf = Widen(w);
    for (int64_t r = 0; r < rows; ++r) {
      double ss = 0;
      for (int64_t c = 0; c < d; ++c) ss += std::pow(double{xf[r * d + c]} + rf[r * d + c], 2);
      const double rs = 1.0 / std::sqrt(ss / d + eps);
      for (int64_t c = 0; c < d; ++c) want[r * d + c] = (double{xf[r * d + c]} + rf[r * d + c]) * rs * wf[c];
    }
    CHECK(MaxRel(want, out_f) < 1e-6);

    // Backward: dx accumulated (bf16) and dweight (f32, then bf16), against the f32 run.
    const Bf16s dout = RandomBf16(rows * d, 4), dx0 = RandomBf16(rows * d, 5), dw0 = RandomBf16(d, 6);
    F32s dx_f = Widen(dx0), dw_f = Widen(dw0);
    REQUIRE(cuda::LaunchRmsNormBackward(In(Widen(x)), In(Widen(w)), rstd_f.data(), In(Widen(dout)), Out(dx_f),
                                        Out(dw_f), true, rows, d, scratch.data(), nullptr) == cudaSuccess);
    {  // dweight against float64: dw0[c] + sum_r dout[r, c] x[r, c] rstd[r]
      std::vector<double> want_dw(d);
      const F32s df = Widen(dout), dw0f = Widen(dw0);
      for (int64_t c = 0; c < d; ++c) {
        double acc = 0;
        for (int64_t r = 0; r < rows; ++r) acc += double{df[r * d + c]} * xf[r * d + c] * rstd_f[r];
        want_dw[c] = dw0f[c] + acc;
      }
      CHECK(MaxRel(want_dw, dw_f) < 1e-6);
    }
    Bf16s dx_b = dx0, dw_b = dw0;
    F32s dw_m = Widen(dw0);
    REQUIRE(cuda::LaunchRmsNormBackward(In(x), In(w), rstd_f.data(), In(dout), Out(dx_b), Out(dw_b), true,
                                        rows, d, scratch.data(), nullptr) == cudaSuccess);
    CHECK(dx_b == Round(dx_f));
    CHECK(dw_b == Round(dw_f));
    dx_b = dx0;
    REQUIRE(cuda::LaunchRmsNormBackward(In(x), In(w), rstd_f.data(), In(dout), Out(dx_b), Out(dw_m), true,
                                        rows, d, scratch.data(), nullptr) == cudaSuccess);
    CHECK(dw_m == dw_f);  // an f32 gradient beside bf16 activations: the f32 run's exactly
    CHECK(dx_b == Round(dx_f));
  }
}

TEST_CASE(
    "emulated reductions and column sums: one block or chunk, or several and a second pass, against "
    "float64") {
  for (int64_t n : {int64_t{1000}, int64_t{3 * 16384 + 7}}) {  // 1 block; 4 blocks of one slice each
    INFO("n " << n);
    const F32s x = Widen(RandomBf16(n, 11));
    std::vector<double> scratch(cuda::ReduceScratchBytes(n) / sizeof(double));
    CHECK(scratch.size() == (n > 16384 ? 4u : 0u));
    double sum = 0, squares = 0, max = -INFINITY;
    for (float v : x) {
      sum += v;
      squares += double{v} * v;
      max = std::max(max, double{v});
    }
    F32s out = {3.0f};
    REQUIRE(cuda::LaunchReduce(x.data(), n, cuda::ReduceKind::kSum, out.data(), 2.0f, 0.5f, scratch.data(),
                               nullptr) == cudaSuccess);
    CHECK(MaxRel({2 * sum + 1.5}, out) < 1e-6);
    REQUIRE(cuda::LaunchReduce(x.data(), n, cuda::ReduceKind::kSumSquares, out.data(), 1.0f, 0.0f,
                               scratch.data(), nullptr) == cudaSuccess);
    CHECK(MaxRel({squares}, out) < 1e-6);
    REQUIRE(cuda::LaunchReduce(x.data(), n, cuda::ReduceKind::kMax, out.data(), 1.0f, 0.0f, scratch.data(),
                               nullptr) == cudaSuccess);
    CHECK(out[0] == static_cast<float>(max));
  }
  for (int64_t rows : {int64_t{100}, int64_t{300}}) {  // 1 row chunk; 3 chunks and a second pass
    INFO("rows " << rows);
    const int64_t cols = 70;
    const F32s x = Widen(RandomBf16(rows * cols, 12));
    std::vector<double> scratch(cuda::ColumnSumScratchBytes(rows, cols) / sizeof(double));
    F32s out(cols, 1.0f);
    REQUIRE(cuda::LaunchSumRows(x.data(), rows, cols, out.data(), 1.0f, -0.5f, scratch.data(), nullptr) ==
            cudaSuccess);
    std::vector<double> want(cols, -0.5);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) want[c] += x[r * cols + c];
    CHECK(MaxRel(want, out) < 1e-6);
  }
  {  // RMSNorm's weight gradient in two row chunks (130 rows) and a second pass
    const int64_t rows = 130, d = 48;
    const F32s x = Widen(RandomBf16(rows * d, 13)), w = Widen(RandomBf16(d, 14)),
               dout = Widen(RandomBf16(rows * d, 15));
    F32s rstd = Widen(RandomBf16(rows, 16, 0.5f, 2.0f)), dx(rows * d), dw = Widen(RandomBf16(d, 17));
    std::vector<double> scratch(cuda::ColumnSumScratchBytes(rows, d) / sizeof(double));
    CHECK(scratch.size() == static_cast<size_t>(2 * d));
    std::vector<double> want(dw.begin(), dw.end());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < d; ++c) want[c] += double{dout[r * d + c]} * x[r * d + c] * rstd[r];
    REQUIRE(cuda::LaunchRmsNormBackward(In(x), In(w), rstd.data(), In(dout), Out(dx), Out(dw), false, rows, d,
                                        scratch.data(), nullptr) == cudaSuccess);
    CHECK(MaxRel(want, dw) < 1e-6);
  }
}

TEST_CASE("emulated RoPE: bf16 in place is the f32 rotation rounded; the inverse undoes it") {
  const int64_t batch = 2, seq = 5, heads = 3, hd = 16, n = batch * seq * heads * hd;
  const Bf16s x = RandomBf16(n, 7);
  F32s f = Widen(x);
  REQUIRE(cuda::LaunchRope(In(f), Out(f), batch, seq, heads, hd, 10000.0, 3, false, nullptr) == cudaSuccess);
  Bf16s b = x;
  REQUIRE(cuda::LaunchRope(In(b), Out(b), batch, seq, heads, hd, 10000.0, 3, false, nullptr) == cudaSuccess);
  CHECK(b == Round(f));
  F32s back(n);
  REQUIRE(cuda::LaunchRope(In(f), Out(back), batch, seq, heads, hd, 10000.0, 3, true, nullptr) ==
          cudaSuccess);
  std::vector<double> want(n);
  const F32s xf = Widen(x);
  for (int64_t i = 0; i < n; ++i) want[i] = xf[i];
  CHECK(MaxRel(want, back) < 1e-6);
}

TEST_CASE("emulated cross-entropy: bf16 logits and in-place bf16 dlogits give the f32 kernel's numbers") {
  const int64_t rows = 7, vocab = 301;
  const Bf16s logits = RandomBf16(rows * vocab, 8, -8.0f, 8.0f);
  std::vector<int32_t> targets(rows);
  for (int64_t r = 0; r < rows; ++r) targets[r] = r == 3 ? -1 : static_cast<int32_t>((r * 97) % vocab);
  F32s loss_f(rows), lse_f(rows), loss_b(rows), lse_b(rows);
  const F32s lf = Widen(logits);
  REQUIRE(cuda::LaunchCrossEntropy(In(lf), targets.data(), loss_f.data(), lse_f.data(), rows, vocab, nullptr,
                                   0, nullptr) == cudaSuccess);
  REQUIRE(cuda::LaunchCrossEntropy(In(logits), targets.data(), loss_b.data(), lse_b.data(), rows, vocab,
                                   nullptr, 0, nullptr) == cudaSuccess);
  CHECK(loss_b == loss_f);
  CHECK(lse_b == lse_f);
  std::vector<double> want_lse(rows), want_loss(rows);
  for (int64_t r = 0; r < rows; ++r) {
    double mx = -INFINITY, sum = 0;
    for (int64_t c = 0; c < vocab; ++c) mx = std::max(mx, double{lf[r * vocab + c]});
    for (int64_t c = 0; c < vocab; ++c) sum += std::exp(lf[r * vocab + c] - mx);
    want_lse[r] = mx + std::log(sum);
    want_loss[r] = targets[r] < 0 ? 0.0 : want_lse[r] - lf[r * vocab + targets[r]];
  }
  CHECK(MaxRel(want_lse, lse_f) < 1e-6);
  CHECK(MaxRel(want_loss, loss_f) < 1e-5);
  // Backward into dlogits over the logits (bf16 in place) against the f32 run.
  F32s grad_f(rows * vocab);
  REQUIRE(cuda::LaunchCrossEntropyBackward(In(lf), targets.data(), lse_f.data(), nullptr, 0.25f, Out(grad_f),
                                           rows, vocab, nullptr, 0, nullptr) == cudaSuccess);
  Bf16s grad_b = logits;
  REQUIRE(cuda::LaunchCrossEntropyBackward(In(grad_b), targets.data(), lse_f.data(), nullptr, 0.25f,
                                           Out(grad_b), rows, vocab, nullptr, 0, nullptr) == cudaSuccess);
  CHECK(grad_b == Round(grad_f));
  for (int64_t c = 0; c < vocab; ++c) CHECK(grad_f[3 * vocab + c] == 0.0f);  // the ignored row
}

TEST_CASE("emulated element-wise kernels: all-bf16 and mixed give the f32 kernel's numbers rounded once") {
  const int64_t n = 1000;
  const Bf16s a = RandomBf16(n, 9), b = RandomBf16(n, 10), y0 = RandomBf16(n, 11);
  F32s f(n);
  REQUIRE(cuda::LaunchSwiGLU(In(Widen(a)), In(Widen(b)), Out(f), n, nullptr) == cudaSuccess);
  Bf16s o(n);
  REQUIRE(cuda::LaunchSwiGLU(In(a), In(b), Out(o), n, nullptr) == cudaSuccess);
  CHECK(o == Round(f));
  // Axpby, beta != 0, a bf16 x into an f32 y (mixed) and into a bf16 y.
  F32s yf = Widen(y0);
  REQUIRE(cuda::LaunchAxpby(0.5f, In(Widen(a)), -2.0f, Out(yf), n, nullptr) == cudaSuccess);
  F32s ym = Widen(y0);
  REQUIRE(cuda::LaunchAxpby(0.5f, In(a), -2.0f, Out(ym), n, nullptr) == cudaSuccess);
  CHECK(ym == yf);
  Bf16s yb = y0;
  REQUIRE(cuda::LaunchAxpby(0.5f, In(a), -2.0f, Out(yb), n, nullptr) == cudaSuccess);
  CHECK(yb == Round(yf));
  // SwiGLU backward with dgate written over gate (in place).
  F32s gf = Widen(a), uf(n);
  REQUIRE(cuda::LaunchSwiGLUBackward(In(gf), In(Widen(b)), In(Widen(y0)), Out(gf), Out(uf), n, nullptr) ==
          cudaSuccess);
  Bf16s gb = a, ub(n);
  REQUIRE(cuda::LaunchSwiGLUBackward(In(gb), In(b), In(y0), Out(gb), Out(ub), n, nullptr) == cudaSuccess);
  CHECK(gb == Round(gf));
  CHECK(ub == Round(uf));
}

}  // namespace
}  // namespace moe
