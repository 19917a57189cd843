// Every forward op against a naive double-precision reference loop.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "runtime/core/status.h"
#include "tests/core/test_util.h"

namespace moe {
namespace {
using namespace moe::testing;

std::vector<double> RefGemm(const std::vector<float>& a, bool ta, const std::vector<float>& b, bool tb,
                            int64_t m, int64_t n, int64_t k, float alpha, float beta,
                            const std::vector<float>& c) {
  std::vector<double> out(m * n);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0;
      for (int64_t p = 0; p < k; ++p)
        acc += static_cast<double>(ta ? a[p * m + i] : a[i * k + p]) * (tb ? b[j * k + p] : b[p * n + j]);
      out[i * n + j] = alpha * acc + (beta == 0 ? 0.0 : beta * c[i * n + j]);
    }
  return out;
}

bool AllFinite(const Tensor& t) {
  for (float x : Vec(t))
    if (!std::isfinite(x)) return false;
  return true;
}

// Runs `run` at 1 and at 3 threads: its outputs must be the same bit for bit.
void CheckSameAtOneAndThreeThreads(const std::function<std::vector<float>()>& run) {
  const int before = Cpu().num_threads();
  Cpu().SetNumThreads(1);
  std::vector<float> one = run();
  Cpu().SetNumThreads(3);
  std::vector<float> three = run();
  Cpu().SetNumThreads(before);
  REQUIRE(one.size() == three.size());
  size_t differ = 0;
  for (size_t i = 0; i < one.size(); ++i) differ += std::memcmp(&one[i], &three[i], 4) != 0 ? 1 : 0;
  CHECK(differ == 0);
}

TEST_CASE("Gemm: every transpose, odd shapes, accumulate, matrix views") {
  struct Case {
    int64_t m, n, k;
  };
  for (Case cs :
       {Case{7, 5, 3}, Case{1, 1, 1}, Case{13, 17, 11}, Case{0, 4, 3}, Case{4, 3, 0}, Case{33, 65, 129}}) {
    for (int t = 0; t < 4; ++t) {
      bool ta = t & 1, tb = t & 2;
      Tensor a = Random(ta ? Shape{cs.k, cs.m} : Shape{cs.m, cs.k}, 1 + t);
      Tensor b = Random(tb ? Shape{cs.n, cs.k} : Shape{cs.k, cs.n}, 11 + t);
      Tensor c = Random({cs.m, cs.n}, 21 + t);
      std::vector<float> c0 = Vec(c);
      REQUIRE(ops::Gemm(S(), a, ta, b, tb, c, 0.5f, 1.0f).ok());
      ExpectClose(c, RefGemm(Vec(a), ta, Vec(b), tb, cs.m, cs.n, cs.k, 0.5f, 1.0f, c0), 1e-5, 1e-5,
                  "gemm accumulate");
      // beta = 0 ignores NaNs in c.
      REQUIRE(ops::Fill(S(), c, std::nan("")).ok());
      REQUIRE(ops::Gemm(S(), a, ta, b, tb, c).ok());
      ExpectClose(c, RefGemm(Vec(a), ta, Vec(b), tb, cs.m, cs.n, cs.k, 1.0f, 0.0f, c0), 1e-5, 1e-5, "gemm");
    }
  }
  // [B, S, d] x W^T: leading dimensions merged.
  Tensor x = Random({2, 3, 5}, 3), w = Random({4, 5}, 4), y = NewF32({2, 3, 4});
  REQUIRE(ops::Gemm(S(), x, false, w, true, y).ok());
  ExpectClose(y, RefGemm(Vec(x), false, Vec(w), true, 6, 4, 5, 1, 0, {}), 1e-5, 1e-6, "3-D");
  // Shape errors name the arguments.
  absl::Status bad = ops::Gemm(S(), x, false, w, false, y);
  CHECK(bad.code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(bad.message()).find("does not fit c") != std::string::npos);
  Tensor xi = FromVecI32({2, 2}, {1, 2, 3, 4});
  CHECK(!ops::Gemm(S(), xi, false, xi, false, xi).ok());
  CHECK(!ops::Gemm(S(), x, false, w, true, x.Slice(0, 1).Reshape({3, 5})).ok());
}

TEST_CASE("BatchedGemm with GQA broadcast") {
  int64_t batch = 6, r = 3, m = 5, n = 4, k = 7;
  Tensor a = Random({batch, m, k}, 1), b = Random({batch / r, n, k}, 2), c = NewF32({batch, m, n});
  REQUIRE(ops::BatchedGemm(S(), a, false, b, true, c).ok());
  std::vector<float> va = Vec(a), vb = Vec(b);
  std::vector<double> want;
  for (int64_t i = 0; i < batch; ++i) {
    std::vector<float> ai(va.begin() + i * m * k, va.begin() + (i + 1) * m * k);
    std::vector<float> bi(vb.begin() + (i / r) * n * k, vb.begin() + (i / r + 1) * n * k);
    auto ci = RefGemm(ai, false, bi, true, m, n, k, 1, 0, {});
    want.insert(want.end(), ci.begin(), ci.end());
  }
  ExpectClose(c, want, 1e-5, 1e-6, "batched");
  CHECK(!ops::BatchedGemm(S(), a, false, Random({4, n, k}, 3), true, c).ok());
}

// Offsets with a zero-token expert and uneven counts.
std::vector<int64_t> Offsets(const std::vector<int64_t>& counts) {
  std::vector<int64_t> off(1, 0);
  for (int64_t c : counts) off.push_back(off.back() + c);
  return off;
}

// Shapes large enough that cpu_gemm.cc splits C into a grid of tiles (rows and
// columns) run by the pool: every transpose, accumulate, a grouped GEMM whose
// experts are tiled too, against the double reference, and bitwise the same at
// 1 and 3 threads.
TEST_CASE("Tiled GEMMs: every transpose against the reference, independent of the thread count") {
  const int64_t m = 600, n = 1100, k = 40;
  auto run = [&]() {
    std::vector<float> all;
    for (int t = 0; t < 4; ++t) {
      bool ta = t & 1, tb = t & 2;
      Tensor a = Random(ta ? Shape{k, m} : Shape{m, k}, 31 + t);
      Tensor b = Random(tb ? Shape{n, k} : Shape{k, n}, 41 + t);
      Tensor c = Random({m, n}, 51 + t);
      std::vector<float> c0 = Vec(c);
      REQUIRE(ops::Gemm(S(), a, ta, b, tb, c, 0.5f, 1.0f).ok());
      ExpectClose(c, RefGemm(Vec(a), ta, Vec(b), tb, m, n, k, 0.5f, 1.0f, c0), 1e-5, 1e-5, "tiled gemm");
      std::vector<float> x = Vec(c);
      all.insert(all.end(), x.begin(), x.end());
    }
    // A weight gradient's shape (small C, long K): its one tile is split for the pool.
    {
      const int64_t wm = 128, wn = 96, wk = 700;
      Tensor a = Random({wk, wm}, 71), b = Random({wk, wn}, 72), c = Random({wm, wn}, 73);
      std::vector<float> c0 = Vec(c);
      REQUIRE(ops::Gemm(S(), a, true, b, false, c, 1.0f, 1.0f).ok());
      ExpectClose(c, RefGemm(Vec(a), true, Vec(b), false, wm, wn, wk, 1.0f, 1.0f, c0), 1e-5, 1e-5,
                  "split weight-gradient gemm");
      std::vector<float> x = Vec(c);
      all.insert(all.end(), x.begin(), x.end());
    }
    // Grouped: expert 1 spans several row tiles, expert 2 is empty.
    std::vector<int64_t> off = Offsets({300, 700, 0, 45});
    const int64_t rows = off.back(), in = 96, out = 640;
    Tensor x = Random({rows, in}, 61), w = Random({4, out, in}, 62), y = NewF32({rows, out});
    REQUIRE(ops::GroupedGemm(S(), x, w, true, y, off).ok());
    std::vector<float> vx = Vec(x), vw = Vec(w);
    auto want = RefGemm(std::vector<float>(vx.begin() + 300 * in, vx.begin() + 1000 * in), false,
                        std::vector<float>(vw.begin() + out * in, vw.begin() + 2 * out * in), true, 700, out,
                        in, 1, 0, {});
    ExpectClose(Vec(y.Slice(300, 1000)), want, 1e-5, 1e-5, "tiled grouped");
    Tensor dw = NewF32({4, out, in});
    REQUIRE(ops::GroupedGemmWeightGrad(S(), y, x, dw, off, 1.0f, 0.0f).ok());
    for (const Tensor* t : {&y, &dw}) {
      std::vector<float> v = Vec(*t);
      all.insert(all.end(), v.begin(), v.end());
    }
    return all;
  };
  CheckSameAtOneAndThreeThreads(run);
}

TEST_CASE("GroupedGemm forward, dX and dW equal per-expert loops") {
  for (auto counts : {std::vector<int64_t>{5, 0, 13, 1, 7}, std::vector<int64_t>{0, 0, 0, 0, 0},
                      std::vector<int64_t>{31, 0, 0, 0, 2}}) {
    int64_t E = counts.size(), in = 9, out = 6;
    std::vector<int64_t> off = Offsets(counts);
    int64_t rows = off.back();
    Tensor x = Random({rows, in}, 1), w = Random({E, out, in}, 2), y = Random({rows, out}, 3);
    Tensor y_ref = Clone(y);
    REQUIRE(ops::GroupedGemm(S(), x, w, true, y, off, 0.75f, 0.5f).ok());
    for (int64_t e = 0; e < E; ++e)
      REQUIRE(ops::Gemm(S(), x.Slice(off[e], off[e + 1]), false, w.Select(e), true,
                        y_ref.Slice(off[e], off[e + 1]), 0.75f, 0.5f)
                  .ok());
    ExpectClose(Vec(y), Vd(y_ref), 1e-6, 1e-6, "grouped fwd");
    // Naive reference for expert 0 too.
    if (counts[0] > 0) {
      Tensor y2 = NewF32({rows, out});
      REQUIRE(ops::GroupedGemm(S(), x, w, true, y2, off).ok());
      std::vector<float> vx = Vec(x), vw = Vec(w);
      auto want =
          RefGemm(std::vector<float>(vx.begin(), vx.begin() + counts[0] * in), false,
                  std::vector<float>(vw.begin(), vw.begin() + out * in), true, counts[0], out, in, 1, 0, {});
      std::vector<float> got = Vec(y2.Slice(0, counts[0]));
      ExpectClose(got, want, 1e-5, 1e-6, "grouped vs naive");
    }
    // dX = dy W (trans_w = false).
    Tensor dy = Random({rows, out}, 4), dx = NewF32({rows, in}), dx_ref = NewF32({rows, in});
    REQUIRE(ops::GroupedGemm(S(), dy, w, false, dx, off).ok());
    for (int64_t e = 0; e < E; ++e)
      REQUIRE(ops::Gemm(S(), dy.Slice(off[e], off[e + 1]), false, w.Select(e), false,
                        dx_ref.Slice(off[e], off[e + 1]))
                  .ok());
    ExpectClose(Vec(dx), Vd(dx_ref), 1e-6, 1e-6, "grouped dX");
    // dW += dy^T x; zero-token experts keep beta * dw.
    Tensor dw = Random({E, out, in}, 5), dw_ref = Clone(dw);
    REQUIRE(ops::GroupedGemmWeightGrad(S(), dy, x, dw, off, 1.0f, 1.0f).ok());
    for (int64_t e = 0; e < E; ++e)
      REQUIRE(ops::Gemm(S(), dy.Slice(off[e], off[e + 1]), true, x.Slice(off[e], off[e + 1]), false,
                        dw_ref.Select(e), 1.0f, 1.0f)
                  .ok());
    ExpectClose(Vec(dw), Vd(dw_ref), 1e-6, 1e-6, "grouped dW");
  }
  Tensor x = Random({4, 3}, 1), w = Random({2, 5, 3}, 2), y = NewF32({4, 5});
  CHECK(!ops::GroupedGemm(S(), x, w, true, y, std::vector<int64_t>{0, 3, 5}).ok());
  CHECK(!ops::GroupedGemm(S(), x, w, true, y, std::vector<int64_t>{0, 3}).ok());
  CHECK(!ops::GroupedGemm(S(), x, w, true, y, std::vector<int64_t>{0, 3, 2}).ok());
}

TEST_CASE("Element-wise ops") {
  Tensor a = Random({7, 13}, 1, -4, 4), b = Random({7, 13}, 2, -4, 4), out = NewF32({7, 13});
  std::vector<float> va = Vec(a), vb = Vec(b);
  auto ref = [&](auto f) {
    std::vector<double> r(va.size());
    for (size_t i = 0; i < va.size(); ++i) r[i] = f(static_cast<double>(va[i]), static_cast<double>(vb[i]));
    return r;
  };
  auto silu = [](double z) { return z / (1 + std::exp(-z)); };
  REQUIRE(ops::Add(S(), a, b, out).ok());
  ExpectClose(out, ref([](double x, double y) { return x + y; }), 1e-6, 1e-6, "add");
  REQUIRE(ops::Mul(S(), a, b, out).ok());
  ExpectClose(out, ref([](double x, double y) { return x * y; }), 1e-6, 1e-6, "mul");
  REQUIRE(ops::Scale(S(), a, -0.5f, out).ok());
  ExpectClose(out, ref([](double x, double) { return -0.5 * x; }), 1e-6, 1e-6, "scale");
  REQUIRE(ops::Silu(S(), a, out).ok());
  ExpectClose(out, ref([&](double x, double) { return silu(x); }), 1e-5, 1e-6, "silu");
  REQUIRE(ops::SwiGLU(S(), a, b, out).ok());
  ExpectClose(out, ref([&](double x, double y) { return silu(x) * y; }), 1e-5, 1e-6, "swiglu");
  Tensor y = Clone(b);
  REQUIRE(ops::Axpby(S(), 2.0f, a, 0.5f, y).ok());
  ExpectClose(y, ref([](double x, double yy) { return 2 * x + 0.5 * yy; }), 1e-6, 1e-6, "axpby");
  // In place.
  Tensor c = Clone(a);
  REQUIRE(ops::Add(S(), c, b, c).ok());
  ExpectClose(c, ref([](double x, double yy) { return x + yy; }), 1e-6, 1e-6, "add in place");
  CHECK(!ops::Add(S(), a, Random({13, 7}, 3), out).ok());
}

TEST_CASE("Reductions") {
  Tensor x = Random({37, 29}, 7, -2, 3);
  std::vector<float> v = Vec(x);
  double sum = 0, sq = 0, mx = -1e30;
  std::vector<double> cols(29, 0.0);
  for (size_t i = 0; i < v.size(); ++i) {
    sum += v[i];
    sq += double(v[i]) * v[i];
    mx = std::max<double>(mx, v[i]);
    cols[i % 29] += v[i];
  }
  Tensor out = NewF32({1});
  REQUIRE(ops::ReduceSum(S(), x, out).ok());
  ExpectClose(out, {sum}, 1e-6, 1e-5, "sum");
  REQUIRE(ops::ReduceSum(S(), x, out, 2.0f, 1.0f).ok());
  ExpectClose(out, {3 * sum}, 1e-6, 1e-5, "sum accumulate");
  REQUIRE(ops::ReduceSumSquares(S(), x, out).ok());
  ExpectClose(out, {sq}, 1e-6, 1e-5, "sumsq");
  REQUIRE(ops::ReduceMax(S(), x, out).ok());
  ExpectClose(out, {mx}, 0, 0, "max");
  Tensor cs = NewF32({29});
  REQUIRE(ops::SumRows(S(), x, cs).ok());
  ExpectClose(cs, cols, 1e-6, 1e-5, "sum rows");
  // Large: chunked double sums.
  Tensor big = Random({100003}, 9);
  std::vector<float> vb = Vec(big);
  double bs = 0;
  for (float f : vb) bs += f;
  REQUIRE(ops::ReduceSum(S(), big, out).ok());
  ExpectClose(out, {bs}, 1e-6, 1e-4, "big sum");
}

TEST_CASE("RmsNorm forward") {
  int64_t rows = 11, d = 19;
  float eps = 1e-5f;
  Tensor x = Random({rows, d}, 1, -3, 3), w = Random({d}, 2, 0.5, 1.5);
  Tensor out = NewF32({rows, d}), rstd = NewF32({rows});
  REQUIRE(ops::RmsNorm(S(), x, w, eps, out, rstd).ok());
  std::vector<float> vx = Vec(x), vw = Vec(w);
  std::vector<double> want(rows * d), want_r(rows);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < d; ++i) ss += double(vx[r * d + i]) * vx[r * d + i];
    want_r[r] = 1 / std::sqrt(ss / d + eps);
    for (int64_t i = 0; i < d; ++i) want[r * d + i] = vx[r * d + i] * want_r[r] * vw[i];
  }
  ExpectClose(out, want, 1e-5, 1e-6, "rmsnorm");
  ExpectClose(rstd, want_r, 1e-5, 1e-6, "rstd");
}

TEST_CASE("AddRmsNorm equals Add then RmsNorm, in place on the residual") {
  int64_t rows = 13, d = 37;
  float eps = 1e-5f;
  Tensor x = Random({rows, d}, 1, -3, 3), res = Random({rows, d}, 5, -3, 3), w = Random({d}, 2, 0.5, 1.5);
  Tensor sum = NewF32({rows, d}), out = NewF32({rows, d}), rstd = NewF32({rows});
  REQUIRE(ops::Add(S(), x, res, sum).ok());
  REQUIRE(ops::RmsNorm(S(), sum, w, eps, out, rstd).ok());
  Tensor res2 = Clone(res), out2 = NewF32({rows, d}), rstd2 = NewF32({rows});
  REQUIRE(ops::AddRmsNorm(S(), x, res2, w, eps, res2, out2, rstd2).ok());  // residual += x in place
  CHECK(Vec(res2) == Vec(sum));
  CHECK(Vec(out2) == Vec(out));
  CHECK(Vec(rstd2) == Vec(rstd));
  CHECK(AllFinite(out2));
  // out may not alias the sum; shapes must match.
  CHECK(!ops::AddRmsNorm(S(), x, res2, w, eps, res2, res2, rstd2).ok());
  CHECK(!ops::AddRmsNorm(S(), x, NewF32({rows, d + 1}), w, eps, res2, out2, rstd2).ok());
}

TEST_CASE("RoPE forward (rotate-half) and in place") {
  int64_t B = 2, L = 5, nh = 3, hd = 6;
  double theta = 10000;
  Tensor x = Random({B, L, nh, hd}, 3), out = NewF32({B, L, nh, hd});
  REQUIRE(ops::Rope(S(), x, out, theta, 2).ok());
  std::vector<float> vx = Vec(x);
  std::vector<double> want(vx.size());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < L; ++s)
      for (int64_t h = 0; h < nh; ++h)
        for (int64_t i = 0; i < hd; ++i) {
          int64_t j = i % (hd / 2);
          double ang = (s + 2) * std::pow(theta, -2.0 * j / hd);
          const float* row = vx.data() + ((b * L + s) * nh + h) * hd;
          double rot = i < hd / 2 ? -row[i + hd / 2] : row[i - hd / 2];
          want[((b * L + s) * nh + h) * hd + i] = row[i] * std::cos(ang) + rot * std::sin(ang);
        }
  ExpectClose(out, want, 1e-5, 1e-6, "rope");
  Tensor y = Clone(x);
  REQUIRE(ops::Rope(S(), y, y, theta, 2).ok());
  ExpectEqual(y, out, "rope in place");
  // RopeBackward is the inverse rotation.
  REQUIRE(ops::RopeBackward(S(), y, y, theta, 2).ok());
  ExpectClose(y, std::vector<double>(vx.begin(), vx.end()), 1e-5, 1e-6, "rope inverse");
  CHECK(!ops::Rope(S(), Random({1, 2, 3, 5}, 1), NewF32({1, 2, 3, 5}), theta).ok());
}

// Naive causal attention with GQA, in double: out and the row log-sum-exp.
void RefAttention(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                  int64_t B, int64_t L, int64_t H, int64_t Hkv, int64_t hd, double scale,
                  std::vector<double>* out, std::vector<double>* lse) {
  out->assign(B * L * H * hd, 0.0);
  lse->assign(B * H * L, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      int64_t g = h / (H / Hkv);
      for (int64_t i = 0; i < L; ++i) {
        std::vector<double> sc(i + 1);
        double mx = -1e300;
        for (int64_t j = 0; j <= i; ++j) {
          double dot = 0;
          for (int64_t c = 0; c < hd; ++c)
            dot += double(q[((b * L + i) * H + h) * hd + c]) * k[((b * L + j) * Hkv + g) * hd + c];
          sc[j] = dot * scale;
          mx = std::max(mx, sc[j]);
        }
        double sum = 0;
        for (auto& s : sc) sum += (s = std::exp(s - mx));
        (*lse)[(b * H + h) * L + i] = mx + std::log(sum);
        for (int64_t j = 0; j <= i; ++j) {
          double p = sc[j] / sum;
          for (int64_t c = 0; c < hd; ++c)
            (*out)[((b * L + i) * H + h) * hd + c] += p * v[((b * L + j) * Hkv + g) * hd + c];
        }
      }
    }
}

TEST_CASE("CausalAttention forward with GQA") {
  // Small shapes, one tile; then shapes that cross the 64 x 64 tiles (partial last
  // tiles, odd head_dim, a single position).
  struct Case {
    int64_t B, L, H, Hkv, hd;
  };
  for (Case c : {Case{2, 7, 4, 2, 5}, Case{2, 7, 3, 3, 5}, Case{2, 7, 4, 1, 5}, Case{2, 150, 4, 2, 12},
                 Case{1, 64, 2, 1, 32}, Case{1, 129, 1, 1, 3}, Case{3, 1, 2, 2, 4}}) {
    const int64_t B = c.B, L = c.L, H = c.H, Hkv = c.Hkv, hd = c.hd;
    INFO("B " << B << " S " << L << " H " << H << " Hkv " << Hkv << " hd " << hd);
    Tensor q = Random({B, L, H, hd}, 1, -2, 2), k = Random({B, L, Hkv, hd}, 2, -2, 2),
           v = Random({B, L, Hkv, hd}, 3);
    Tensor out = NewF32({B, L, H, hd}), lse = NewF32({B, H, L});
    float scale = 1.0f / std::sqrt(float(hd));
    REQUIRE(ops::CausalAttention(S(), q, k, v, scale, out, lse).ok());
    std::vector<double> want_out, want_lse;
    RefAttention(Vec(q), Vec(k), Vec(v), B, L, H, Hkv, hd, scale, &want_out, &want_lse);
    CHECK(AllFinite(out));
    CHECK(AllFinite(lse));
    ExpectClose(out, want_out, 1e-5, 2e-6, "attention out");
    ExpectClose(lse, want_lse, 1e-5, 2e-6, "attention lse");
  }
  CHECK(!ops::CausalAttention(S(), Random({1, 2, 3, 4}, 1), Random({1, 2, 2, 4}, 1), Random({1, 2, 2, 4}, 1),
                              1.0f, NewF32({1, 2, 3, 4}), NewF32({1, 3, 2}))
             .ok());
  // lse must be [B, H, S] (the old [B, H, S, S] probabilities are refused).
  CHECK(!ops::CausalAttention(S(), Random({1, 2, 2, 4}, 1), Random({1, 2, 2, 4}, 1), Random({1, 2, 2, 4}, 1),
                              1.0f, NewF32({1, 2, 2, 4}), NewF32({1, 2, 2, 2}))
             .ok());
}

// Attention forward + backward (B 2, S 130, H 4 over Hkv 2, hd 16) at 1 and at 3
// threads: every output the same bit for bit, on whichever path is set.
void CheckAttentionThreadIndependence() {
  const int64_t B = 2, L = 130, H = 4, Hkv = 2, hd = 16;
  Tensor q = Random({B, L, H, hd}, 1), k = Random({B, L, Hkv, hd}, 2), v = Random({B, L, Hkv, hd}, 3),
         dy = Random({B, L, H, hd}, 4);
  auto run = [&]() {
    Tensor out = NewF32({B, L, H, hd}), lse = NewF32({B, H, L});
    Tensor dq = NewF32({B, L, H, hd}), dk = NewF32({B, L, Hkv, hd}), dv = NewF32({B, L, Hkv, hd});
    REQUIRE(ops::CausalAttention(S(), q, k, v, 0.25f, out, lse).ok());
    REQUIRE(ops::CausalAttentionBackward(S(), q, k, v, out, lse, 0.25f, dy, dq, dk, dv).ok());
    std::vector<float> all;
    for (const Tensor* t : {&out, &lse, &dq, &dk, &dv}) {
      std::vector<float> x = Vec(*t);
      all.insert(all.end(), x.begin(), x.end());
    }
    return all;
  };
  CheckSameAtOneAndThreeThreads(run);
}

TEST_CASE("CausalAttention and its backward do not depend on the thread count") {
  CheckAttentionThreadIndependence();
}

// The gemm path (attention_gemm.h): the chunked GEMM driver the CUDA backend runs
// on cuBLAS, here on the CPU's sgemm. Chunks of 1 row, of sizes that do not
// divide S, of 64 rows and of the whole sequence.
struct GemmAttentionCase {
  int64_t B, L, H, Hkv, hd, chunk;
};
const GemmAttentionCase kGemmAttentionCases[] = {
    {2, 7, 4, 2, 5, 1},    {2, 7, 4, 2, 5, 3},     {2, 7, 3, 3, 5, 7},
    {2, 7, 4, 1, 5, 2},    {2, 150, 4, 2, 12, 64}, {2, 150, 4, 2, 12, 37},
    {1, 129, 1, 1, 3, 50}, {3, 1, 2, 2, 4, 1},     {1, 100, 4, 2, 32, 64}};

TEST_CASE("gemm attention path: forward matches the reference, chunk by chunk") {
  for (const GemmAttentionCase& c : kGemmAttentionCases) {
    const int64_t B = c.B, L = c.L, H = c.H, Hkv = c.Hkv, hd = c.hd;
    INFO("B " << B << " S " << L << " H " << H << " Hkv " << Hkv << " hd " << hd << " chunk " << c.chunk);
    GemmAttentionScope gemm(c.chunk, B, H, L);
    REQUIRE(attn::ChunkRows(attn::Shape{B, L, H, Hkv, hd}, attn::AttentionSettingsRef().workspace_bytes) ==
            std::min(c.chunk, L));
    Tensor q = Random({B, L, H, hd}, 1, -2, 2), k = Random({B, L, Hkv, hd}, 2, -2, 2),
           v = Random({B, L, Hkv, hd}, 3);
    Tensor out = Random({B, L, H, hd}, 9), lse = Random({B, H, L}, 10);  // garbage: every element is written
    const float scale = 1.0f / std::sqrt(float(hd));
    REQUIRE(ops::CausalAttention(S(), q, k, v, scale, out, lse).ok());
    std::vector<double> want_out, want_lse;
    RefAttention(Vec(q), Vec(k), Vec(v), B, L, H, Hkv, hd, scale, &want_out, &want_lse);
    ExpectClose(out, want_out, 1e-5, 2e-6, "gemm attention out");
    ExpectClose(lse, want_lse, 1e-5, 2e-6, "gemm attention lse");
  }
}

std::vector<double> AsDouble(const Tensor& t) {
  std::vector<float> f = Vec(t);
  return std::vector<double>(f.begin(), f.end());
}

TEST_CASE("gemm attention path: backward matches the fused kernel, from either path's forward") {
  for (const GemmAttentionCase& c : kGemmAttentionCases) {
    const int64_t B = c.B, L = c.L, H = c.H, Hkv = c.Hkv, hd = c.hd;
    INFO("B " << B << " S " << L << " H " << H << " Hkv " << Hkv << " hd " << hd << " chunk " << c.chunk);
    Tensor q = Random({B, L, H, hd}, 1), k = Random({B, L, Hkv, hd}, 2), v = Random({B, L, Hkv, hd}, 3),
           dy = Random({B, L, H, hd}, 4);
    const float scale = 0.5f;
    struct Result {
      Tensor out, lse, dq, dk, dv;
    };
    auto forward = [&](Result& r) {
      r.out = Random({B, L, H, hd}, 11);
      r.lse = Random({B, H, L}, 12);
      REQUIRE(ops::CausalAttention(S(), q, k, v, scale, r.out, r.lse).ok());
    };
    auto backward = [&](const Result& from, Result& r) {
      r.dq = Random({B, L, H, hd}, 13);  // garbage: dq, dk, dv are overwritten
      r.dk = Random({B, L, Hkv, hd}, 14);
      r.dv = Random({B, L, Hkv, hd}, 15);
      REQUIRE(
          ops::CausalAttentionBackward(S(), q, k, v, from.out, from.lse, scale, dy, r.dq, r.dk, r.dv).ok());
    };
    Result fused, gemm, mixed;
    forward(fused);
    backward(fused, fused);
    {
      GemmAttentionScope scope(c.chunk, B, H, L);
      forward(gemm);
      backward(gemm, gemm);
      backward(fused, mixed);  // the fused forward's out and lse feed the gemm backward
    }
    ExpectClose(gemm.out, AsDouble(fused.out), 1e-5, 1e-6, "out");
    ExpectClose(gemm.lse, AsDouble(fused.lse), 1e-5, 1e-6, "lse");
    for (const Result* r : {&gemm, &mixed}) {
      ExpectClose(r->dq, AsDouble(fused.dq), 1e-4, 2e-6, "dq");
      ExpectClose(r->dk, AsDouble(fused.dk), 1e-4, 2e-6, "dk");
      ExpectClose(r->dv, AsDouble(fused.dv), 1e-4, 2e-6, "dv");
    }
    // And the fused backward from the gemm forward's out and lse.
    Result back;
    backward(gemm, back);
    ExpectClose(back.dq, AsDouble(fused.dq), 1e-4, 2e-6, "dq (fused from gemm)");
  }
}

TEST_CASE("gemm attention path does not depend on the thread count") {
  GemmAttentionScope gemm(48, 2, 4, 130);
  CheckAttentionThreadIndependence();
}

TEST_CASE("gemm attention: OneStride finds the operands a strided-batched GEMM can take") {
  // Every (stride, head_stride, head_div) at batch 1..3, heads 1..4: when OneStride
  // says yes, matrix t is at base + t * stride for every t; it says yes for the
  // score blocks (contiguous per head) and no for grouped keys.
  static const float base[256] = {};  // every offset below stays inside
  for (int64_t batch = 1; batch <= 3; ++batch)
    for (int64_t heads = 1; heads <= 4; ++heads)
      for (int64_t stride : {0, 4, 16, 64})
        for (int64_t head_stride : {0, 4, 16})
          for (int64_t div : {1, 2}) {
            const attn::Operand x{base, 8, stride, head_stride, div};
            int64_t one = -1;
            if (!attn::OneStride(x, batch, heads, &one)) continue;
            for (int64_t t = 0; t < batch * heads; ++t) REQUIRE(x.At(t, heads) == base + t * one);
          }
  int64_t one = 0;
  CHECK(attn::OneStride(attn::Operand{base, 64, 4 * 64, 64, 1}, 3, 4, &one));  // [B, H, n, L] scores
  CHECK(one == 64);
  CHECK(!attn::OneStride(attn::Operand{base, 64, 1000, 16, 2}, 3, 4, &one));  // grouped KV heads
  CHECK(!attn::OneStride(attn::Operand{base, 64, 1000, 16, 1}, 3, 4, &one));  // [B, S, H, hd] rows
  CHECK(attn::OneStride(attn::Operand{base, 64, 1000, 16, 1}, 1, 4, &one));   // ... of one sequence
}

TEST_CASE("attention path settings: names, environment values and chunk sizes") {
  CHECK(*attn::ParseAttentionPath("gemm") == attn::AttentionPath::kGemm);
  CHECK(*attn::ParseAttentionPath("fused") == attn::AttentionPath::kFused);
  CHECK(*attn::ParseAttentionPath("flash") == attn::AttentionPath::kFlash);
  for (auto path : {attn::AttentionPath::kFused, attn::AttentionPath::kGemm, attn::AttentionPath::kFlash})
    CHECK(*attn::ParseAttentionPath(attn::AttentionPathName(path)) == path);
  absl::StatusOr<attn::AttentionPath> bad = attn::ParseAttentionPath("flash2");
  REQUIRE(!bad.ok());
  CHECK(bad.status().message().find("MOE_ATTENTION") != std::string::npos);
  CHECK(bad.status().message().find("\"flash\"") != std::string::npos);
  // 256 MiB (the default) at B 4, S 2048, H 16: two [4, 16, n, 2048] f32 blocks fit
  // n = 256 rows, which is also S / 8 (the causal waste bound); 64 MiB fits 64.
  CHECK(attn::ChunkRows(attn::Shape{4, 2048, 16, 4, 64}, int64_t{256} << 20) == 256);
  CHECK(attn::ChunkRows(attn::Shape{4, 2048, 16, 4, 64}, int64_t{64} << 20) == 64);
  CHECK(attn::ChunkRows(attn::Shape{1, 4000, 1, 1, 64}, int64_t{1} << 30) == 512);  // S/8 up to 64s
  CHECK(attn::ChunkRows(attn::Shape{2, 512, 16, 4, 64}, int64_t{1} << 30) == 64);
  // Rounded down to whole 64-row tiles; never 0, never past S.
  CHECK(attn::ChunkRows(attn::Shape{4, 2048, 16, 4, 64}, 100 * 2 * 4 * 16 * 2048 * 4) == 64);
  CHECK(attn::ChunkRows(attn::Shape{4, 2048, 16, 4, 64}, 1) == 1);
  CHECK(attn::ChunkRows(attn::Shape{1, 10, 1, 1, 8}, int64_t{1} << 30) == 10);
  CHECK(attn::WorkspaceFloats(attn::Shape{4, 2048, 16, 4, 64}, 256, true) == 2 * 4 * 16 * 256 * 2048);
  CHECK(attn::WorkspaceFloats(attn::Shape{4, 100, 16, 4, 64}, 1024, false) == 4 * 16 * 100 * 100);
}

TEST_CASE("Softmax, LogSumExp, CrossEntropy forward") {
  int64_t T = 9, V = 23;
  Tensor x = Random({T, V}, 4, -5, 5);
  std::vector<float> vx = Vec(x);
  std::vector<double> sm(T * V), lse(T);
  for (int64_t t = 0; t < T; ++t) {
    double mx = -1e300, sum = 0;
    for (int64_t c = 0; c < V; ++c) mx = std::max<double>(mx, vx[t * V + c]);
    for (int64_t c = 0; c < V; ++c) sum += std::exp(vx[t * V + c] - mx);
    lse[t] = mx + std::log(sum);
    for (int64_t c = 0; c < V; ++c) sm[t * V + c] = std::exp(vx[t * V + c] - lse[t]);
  }
  Tensor y = NewF32({T, V}), l = NewF32({T});
  REQUIRE(ops::Softmax(S(), x, y).ok());
  ExpectClose(y, sm, 1e-5, 1e-7, "softmax");
  REQUIRE(ops::LogSumExp(S(), x, l).ok());
  ExpectClose(l, lse, 1e-6, 1e-6, "lse");
  std::vector<int32_t> tg = {0, 22, 5, -1, 7, 7, 3, 1, 11};
  Tensor targets = FromVecI32({T}, tg), losses = NewF32({T}), lse2 = NewF32({T});
  REQUIRE(ops::CrossEntropy(S(), x, targets, losses, lse2).ok());
  std::vector<double> want(T);
  for (int64_t t = 0; t < T; ++t) want[t] = tg[t] < 0 ? 0.0 : lse[t] - vx[t * V + tg[t]];
  ExpectClose(losses, want, 1e-5, 1e-6, "cross-entropy");
  Tensor bad_t = FromVecI32({T}, {0, 23, 5, -1, 7, 7, 3, 1, 11});
  absl::Status st = ops::CrossEntropy(S(), x, bad_t, losses, lse2);
  CHECK(st.code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(st.message()).find("targets[1] = 23") != std::string::npos);
}

bool SameBits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

// The router's scores in double: s (softmax or sigmoid), the aux scores q
// (s / sum s for sigmoid, s for softmax) and lse(z).
void RefRouterRow(const float* z, int64_t E, bool sigmoid, double* s, double* q, double* lse) {
  double mx = -1e300, sum = 0;
  for (int64_t e = 0; e < E; ++e) mx = std::max<double>(mx, z[e]);
  for (int64_t e = 0; e < E; ++e) sum += std::exp(z[e] - mx);
  *lse = mx + std::log(sum);
  double ssum = 0;
  for (int64_t e = 0; e < E; ++e) {
    s[e] = sigmoid ? 1.0 / (1.0 + std::exp(-static_cast<double>(z[e]))) : std::exp(z[e] - *lse);
    ssum += s[e];
  }
  for (int64_t e = 0; e < E; ++e) q[e] = sigmoid ? s[e] / ssum : s[e];
}

// The choice by sorting (not kmath's selection passes), on the op's own f32
// scores: u = s + b, descending, ties to the lower expert; with groups, only
// the experts of the gk best groups by the sum of their best k / gk u.
std::vector<int32_t> RefChoice(const float* s, const float* bias, int64_t E, int k, int64_t G, int gk) {
  std::vector<float> u(E);
  for (int64_t e = 0; e < E; ++e) u[e] = bias != nullptr ? s[e] + bias[e] : s[e];
  std::vector<int32_t> order(E);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return u[a] > u[b]; });
  if (gk > 0 && gk < G) {
    const int64_t per = E / G, best = std::clamp<int64_t>(k / gk, 1, per);
    std::vector<double> score(G, 0.0);
    for (int64_t g = 0; g < G; ++g) {
      std::vector<float> in(u.begin() + g * per, u.begin() + (g + 1) * per);
      std::sort(in.begin(), in.end(), std::greater<>());
      for (int64_t j = 0; j < best; ++j) score[g] += in[j];
    }
    std::vector<int32_t> groups(G);
    std::iota(groups.begin(), groups.end(), 0);
    std::stable_sort(groups.begin(), groups.end(), [&](int32_t a, int32_t b) { return score[a] > score[b]; });
    std::vector<bool> eligible(G, false);
    for (int g = 0; g < gk; ++g) eligible[groups[g]] = true;
    std::vector<int32_t> kept;
    for (int32_t e : order)
      if (eligible[e / per]) kept.push_back(e);
    order = kept;
  }
  order.resize(k);
  return order;
}

TEST_CASE(
    "RouterScores: scores, lse, aux scores and the choice (bias, groups, ties, forced) against a reference") {
  const int64_t T = 37, E = 12;
  const int k = 3;
  std::vector<float> z = Vec(Random({T, E}, 31, -3.0f, 3.0f));
  for (int64_t e = 0; e < E; ++e) z[e] = 0.25f;            // row 0: all tied
  z[E + 4] = z[E + 9] = 5.0f;                              // row 1: two tied maxima
  z[2 * E + 5] = std::numeric_limits<float>::quiet_NaN();  // row 2: a NaN logit ranks last
  const Tensor logits = FromVec({T, E}, z);
  const std::vector<float> bias = {0.3f, -0.2f, 0.0f,  0.1f,  0.5f, -0.4f,
                                   0.0f, 0.2f,  -0.1f, 0.05f, 0.0f, 0.6f};
  struct Case {
    bool sigmoid, biased;
    int64_t groups;
    int group_topk;
  };
  for (const Case c : {Case{false, false, 1, 0}, Case{false, true, 1, 0}, Case{true, false, 4, 2},
                       Case{true, true, 4, 2}, Case{false, true, 6, 3}, Case{true, false, 1, 0}}) {
    INFO("sigmoid " << c.sigmoid << " bias " << c.biased << " groups " << c.groups << "/" << c.group_topk);
    RouterChoice choice;
    choice.sigmoid = c.sigmoid;
    choice.top_k = k;
    choice.num_groups = c.groups;
    choice.group_topk = c.group_topk;
    Tensor scores = NewF32({T, E}), aux = NewF32({T, E}), lse = NewF32({T}), selected = NewF32({T, k});
    Tensor experts = FromVecI32({T, k}, std::vector<int32_t>(T * k, -7));
    const Tensor b = c.biased ? FromVec({E}, bias) : Tensor();
    REQUIRE(ops::RouterScores(S(), logits, b, Tensor(), choice, scores, c.sigmoid ? aux : Tensor(), lse,
                              experts, selected)
                .ok());
    const std::vector<float> s = Vec(scores), q = Vec(aux), l = Vec(lse), sel = Vec(selected);
    const int32_t* ex = experts.data<int32_t>();
    std::vector<double> rs(E), rq(E);
    double rl = 0;
    for (int64_t t = 0; t < T; ++t) {
      INFO("token " << t);
      const std::vector<int32_t> want =
          RefChoice(&s[t * E], c.biased ? bias.data() : nullptr, E, k, c.groups, c.group_topk);
      CHECK(std::vector<int32_t>(ex + t * k, ex + (t + 1) * k) == want);
      for (int j = 0; j < k; ++j) CHECK(SameBits(sel[t * k + j], s[t * E + ex[t * k + j]]));
      if (t == 2) continue;  // the NaN row: checked below
      RefRouterRow(&z[t * E], E, c.sigmoid, rs.data(), rq.data(), &rl);
      CHECK(std::abs(l[t] - rl) <= 1e-6 * std::max(1.0, std::abs(rl)));
      for (int64_t e = 0; e < E; ++e) {
        CHECK(std::abs(s[t * E + e] - rs[e]) <= 1e-6 * rs[e] + 1e-8);
        if (c.sigmoid) CHECK(std::abs(q[t * E + e] - rq[e]) <= 1e-6 * rq[e] + 1e-8);
      }
    }
    // Row 0 is all ties (the lowest experts of the eligible groups), row 1 takes its two maxima first.
    if (!c.biased && c.group_topk == 0) {
      CHECK(std::vector<int32_t>(ex, ex + k) == std::vector<int32_t>{0, 1, 2});
      CHECK(std::vector<int32_t>(ex + k, ex + k + 2) == std::vector<int32_t>{4, 9});
    }
    // The NaN row still names k distinct experts (and its weights are NaN for the loss to catch).
    std::vector<int32_t> row2(ex + 2 * k, ex + 3 * k);
    std::sort(row2.begin(), row2.end());
    CHECK(std::adjacent_find(row2.begin(), row2.end()) == row2.end());
    CHECK(row2.front() >= 0);
    CheckSameAtOneAndThreeThreads([&] {
      Tensor s2 = NewF32({T, E}), l2 = NewF32({T}), v2 = NewF32({T, k});
      Tensor e2 = FromVecI32({T, k}, std::vector<int32_t>(T * k, 0));
      REQUIRE(ops::RouterScores(S(), logits, b, Tensor(), choice, s2, Tensor(), l2, e2, v2).ok());
      std::vector<float> all = Vec(s2), lv = Vec(l2), vv = Vec(v2);
      all.insert(all.end(), lv.begin(), lv.end());
      all.insert(all.end(), vv.begin(), vv.end());
      for (int64_t i = 0; i < T * k; ++i) all.push_back(static_cast<float>(e2.data<int32_t>()[i]));
      return all;
    });
  }
  // Forced routing: the selection replaces the choice (repeats allowed); its scores are read from s.
  RouterChoice choice;
  choice.top_k = k;
  std::vector<int32_t> forced(T * k);
  for (int64_t i = 0; i < T * k; ++i) forced[i] = static_cast<int32_t>((i * 5) % E);
  forced[3] = forced[4] = 7;
  Tensor scores = NewF32({T, E}), lse = NewF32({T}), selected = NewF32({T, k});
  Tensor experts = FromVecI32({T, k}, std::vector<int32_t>(T * k, 0));
  REQUIRE(ops::RouterScores(S(), logits, Tensor(), FromVecI32({T, k}, forced), choice, scores, Tensor(), lse,
                            experts, selected)
              .ok());
  CHECK(std::vector<int32_t>(experts.data<int32_t>(), experts.data<int32_t>() + T * k) == forced);
  const std::vector<float> s = Vec(scores), sel = Vec(selected);
  for (int64_t i = 0; i < T * k; ++i) CHECK(SameBits(sel[i], s[(i / k) * E + forced[i]]));
  // A selection outside [0, E) and a group count that cannot hold top_k are refused by name.
  forced[10] = static_cast<int32_t>(E);
  absl::Status bad = ops::RouterScores(S(), logits, Tensor(), FromVecI32({T, k}, forced), choice, scores,
                                       Tensor(), lse, experts, selected);
  CHECK(bad.code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(bad.message()).find("selection[10] = 12") != std::string::npos);
  choice.num_groups = 6;
  choice.group_topk = 1;  // 1 group of 2 experts < top_k 3
  bad = ops::RouterScores(S(), logits, Tensor(), Tensor(), choice, scores, Tensor(), lse, experts, selected);
  CHECK(bad.code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(bad.message()).find("group_topk = 1") != std::string::npos);
}

TEST_CASE(
    "RouterScoresBackward: finite differences through softmax and sigmoid scores, per-sequence aux rows") {
  const int64_t T = 8, E = 6, B = 2, per = T / B;
  const std::vector<float> z = Vec(Random({T, E}, 41, -2.0f, 2.0f));
  const std::vector<float> daux = Vec(Random({B, E}, 42)), ds = Vec(Random({T, E}, 43));
  const float z_coef = 0.3f;
  for (bool sigmoid : {false, true}) {
    for (bool with_ds : {true, false}) {
      INFO("sigmoid " << sigmoid << " dscores " << with_ds);
      // L(z) = sum_t sum_e daux[t / per, e] q_t,e + ds_t,e s_t,e + z_coef / 2 sum_t lse_t^2, in double.
      const auto loss = [&](const std::vector<float>& zz) {
        std::vector<double> s(E), q(E);
        double l = 0, total = 0;
        for (int64_t t = 0; t < T; ++t) {
          RefRouterRow(&zz[t * E], E, sigmoid, s.data(), q.data(), &l);
          for (int64_t e = 0; e < E; ++e)
            total += daux[(t / per) * E + e] * q[e] + (with_ds ? ds[t * E + e] * s[e] : 0.0);
          total += 0.5 * z_coef * l * l;
        }
        return total;
      };
      RouterChoice choice;
      choice.sigmoid = sigmoid;
      choice.top_k = 2;
      const Tensor logits = FromVec({T, E}, z);
      Tensor scores = NewF32({T, E}), lse = NewF32({T}), selected = NewF32({T, 2});
      Tensor experts = FromVecI32({T, 2}, std::vector<int32_t>(T * 2, 0));
      REQUIRE(
          ops::RouterScores(S(), logits, Tensor(), Tensor(), choice, scores, Tensor(), lse, experts, selected)
              .ok());
      Tensor dz = NewF32({T, E});
      REQUIRE(ops::RouterScoresBackward(S(), scores, sigmoid ? logits : Tensor(), lse, FromVec({B, E}, daux),
                                        with_ds ? FromVec({T, E}, ds) : Tensor(), sigmoid, z_coef, dz)
                  .ok());
      const std::vector<float> got = Vec(dz);
      for (int64_t i = 0; i < T * E; ++i) {
        std::vector<float> zp = z, zm = z;
        const float h = 1e-2f;
        zp[i] += h;
        zm[i] -= h;
        const double want = (loss(zp) - loss(zm)) / (static_cast<double>(zp[i]) - zm[i]);
        INFO("dz[" << i << "] = " << got[i] << ", finite difference " << want);
        CHECK(std::abs(got[i] - want) <= 2e-4 + 2e-3 * std::abs(want));
      }
      if (with_ds) {  // in place over dscores: the same values
        Tensor inplace = FromVec({T, E}, ds);
        REQUIRE(ops::RouterScoresBackward(S(), scores, sigmoid ? logits : Tensor(), lse,
                                          FromVec({B, E}, daux), inplace, sigmoid, z_coef, inplace)
                    .ok());
        CHECK(Vec(inplace) == got);
      }
    }
  }
  // The sigmoid backward needs the logits; daux rows must divide the tokens.
  Tensor scores = NewF32({T, E}), lse = NewF32({T}), dz = NewF32({T, E});
  absl::Status bad =
      ops::RouterScoresBackward(S(), scores, Tensor(), lse, NewF32({B, E}), Tensor(), true, 0, dz);
  CHECK(bad.code() == absl::StatusCode::kInvalidArgument);
  bad = ops::RouterScoresBackward(S(), scores, Tensor(), lse, NewF32({3, E}), Tensor(), false, 0, dz);
  CHECK(bad.code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(bad.message()).find("B dividing T = 8") != std::string::npos);
}

TEST_CASE("TopK: order, ties to the lower index, k = E") {
  std::vector<float> v = {0.1f,  0.5f,  0.5f,  0.2f,  0.5f,   // ties
                          3.0f,  2.0f,  1.0f,  0.0f,  -1.0f,  // descending
                          -1.0f, -1.0f, -1.0f, -1.0f, -1.0f};
  Tensor x = FromVec({3, 5}, v);
  Tensor vals = NewF32({3, 2});
  auto idx_t = Tensor::Zeros(Cpu(), {3, 2}, DType::kI32, MemoryCategory::kActivations);
  REQUIRE(ops::TopK(S(), x, 2, vals, *idx_t).ok());
  const int32_t* idx = idx_t->data<int32_t>();
  CHECK(std::vector<int32_t>(idx, idx + 6) == std::vector<int32_t>{1, 2, 0, 1, 0, 1});
  CHECK(Vec(vals) == std::vector<float>{0.5f, 0.5f, 3.0f, 2.0f, -1.0f, -1.0f});
  // k = E: a full stable descending sort.
  Tensor all_v = NewF32({3, 5});
  auto all_i = Tensor::Zeros(Cpu(), {3, 5}, DType::kI32, MemoryCategory::kActivations);
  REQUIRE(ops::TopK(S(), x, 5, all_v, *all_i).ok());
  const int32_t* ai = all_i->data<int32_t>();
  CHECK(std::vector<int32_t>(ai, ai + 5) == std::vector<int32_t>{1, 2, 4, 3, 0});
  CHECK(std::vector<int32_t>(ai + 10, ai + 15) == std::vector<int32_t>{0, 1, 2, 3, 4});
  // Random rows against a reference sort.
  Tensor r = Random({101, 8}, 12);
  Tensor rv = NewF32({101, 3});
  auto ri = Tensor::Zeros(Cpu(), {101, 3}, DType::kI32, MemoryCategory::kActivations);
  REQUIRE(ops::TopK(S(), r, 3, rv, *ri).ok());
  std::vector<float> vr = Vec(r);
  for (int t = 0; t < 101; ++t) {
    std::vector<int> order(8);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return vr[t * 8 + a] > vr[t * 8 + b]; });
    for (int j = 0; j < 3; ++j) CHECK(ri->data<int32_t>()[t * 3 + j] == order[j]);
  }
  CHECK(!ops::TopK(S(), x, 6, all_v, *all_i).ok());
  CHECK(!ops::TopK(S(), x, 0, all_v, *all_i).ok());
}

TEST_CASE("GatherRows, ScatterAddRows, GatherRowDot") {
  int64_t N = 6, M = 9, d = 7;
  Tensor src = Random({N, d}, 1);
  std::vector<int32_t> index = {5, 0, 0, 3, 2, 5, 1, 4, 0};  // repeats
  Tensor idx = FromVecI32({M}, index), dst = NewF32({M, d});
  REQUIRE(ops::GatherRows(S(), src, idx, dst).ok());
  std::vector<float> vs = Vec(src);
  std::vector<double> want(M * d);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t c = 0; c < d; ++c) want[i * d + c] = vs[index[i] * d + c];
  ExpectClose(dst, want, 0, 0, "gather");
  // Weighted: dst[i] = w[i] src[index[i]], each element one f32 product.
  Tensor gw = Random({M}, 5), wdst = Random({M, d}, 6);
  REQUIRE(ops::GatherRows(S(), src, idx, wdst, gw).ok());
  std::vector<float> vgw = Vec(gw), vwd = Vec(wdst);
  int64_t wrong = 0;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t c = 0; c < d; ++c) wrong += vwd[i * d + c] == vgw[i] * vs[index[i] * d + c] ? 0 : 1;
  CHECK(wrong == 0);
  CHECK(!ops::GatherRows(S(), src, idx, wdst, NewF32({M + 1})).ok());  // a weight per row
  CHECK(!ops::GatherRows(S(), FromVecI32({2, 1}, {1, 2}), FromVecI32({1}, {0}), FromVecI32({1, 1}, {0}),
                         NewF32({1}))
             .ok());  // integer rows have no product

  Tensor rows = Random({M, d}, 2), w = Random({M}, 3), acc = Random({N, d}, 4);
  std::vector<float> vr = Vec(rows), vw = Vec(w), va = Vec(acc);
  std::vector<double> want_acc(va.begin(), va.end());
  for (int64_t i = 0; i < M; ++i)
    for (int64_t c = 0; c < d; ++c) want_acc[index[i] * d + c] += double(vw[i]) * vr[i * d + c];
  REQUIRE(ops::ScatterAddRows(S(), rows, idx, acc, w).ok());
  ExpectClose(acc, want_acc, 1e-5, 1e-6, "scatter-add weighted");
  Tensor acc2 = NewF32({N, d});
  REQUIRE(ops::ScatterAddRows(S(), rows, idx, acc2).ok());
  std::vector<double> want2(N * d, 0.0);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t c = 0; c < d; ++c) want2[index[i] * d + c] += vr[i * d + c];
  ExpectClose(acc2, want2, 1e-5, 1e-6, "scatter-add");
  // Overwriting: a fill with 0 and the scatter-add, bit for bit, without
  // reading dst (NaN here); the two rows no index names come out +0.
  Tensor fresh = NewF32({N + 2, d}), filled = NewF32({N + 2, d});
  std::fill_n(fresh.data<float>(), fresh.numel(), std::numeric_limits<float>::quiet_NaN());
  REQUIRE(ops::Fill(S(), filled, 0.0).ok());
  REQUIRE(ops::ScatterAddRows(S(), rows, idx, filled, w).ok());
  REQUIRE(ops::ScatterAddRows(S(), rows, idx, fresh, w, ScatterMode::kOverwrite).ok());
  CHECK(std::memcmp(fresh.raw_data(), filled.raw_data(), fresh.nbytes()) == 0);
  for (int64_t c = 0; c < 2 * d; ++c) CHECK(std::signbit(fresh.data<float>()[N * d + c]) == false);
  // No source rows at all: all zero.
  std::fill_n(fresh.data<float>(), fresh.numel(), std::numeric_limits<float>::quiet_NaN());
  REQUIRE(
      ops::ScatterAddRows(S(), NewF32({0, d}), FromVecI32({0}, {}), fresh, Tensor(), ScatterMode::kOverwrite)
          .ok());
  int64_t nonzero = 0;
  for (int64_t i = 0; i < fresh.numel(); ++i) nonzero += fresh.data<float>()[i] == 0.0f ? 0 : 1;
  CHECK(nonzero == 0);
  // The order made on the host (no sort): the same bits, adding or overwriting.
  auto order = ops::ScatterRowOrder(index, N + 2);
  REQUIRE(order.ok());
  CHECK(std::vector<int32_t>(order->begin(), order->begin() + N + 3) ==
        std::vector<int32_t>{0, 3, 4, 5, 6, 7, 9, 9, 9});  // offsets: row 0 has 3 sources, rows 6, 7 none
  CHECK(std::vector<int32_t>(order->begin() + N + 3, order->end()) ==
        std::vector<int32_t>{1, 2, 8, 6, 4, 3, 7, 0, 5});  // ascending within each row
  const Tensor by_row = FromVecI32({N + 3 + M}, *order);
  for (ScatterMode mode : {ScatterMode::kAccumulate, ScatterMode::kOverwrite}) {
    Tensor a = Random({N + 2, d}, 7), b = Clone(a);
    REQUIRE(ops::ScatterAddRows(S(), rows, idx, a, w, mode).ok());
    REQUIRE(ops::ScatterAddRows(S(), rows, idx, b, w, mode, by_row).ok());
    CHECK(std::memcmp(a.raw_data(), b.raw_data(), a.nbytes()) == 0);
  }
  // An order that does not match the index is refused, naming the entry.
  const auto refused = [&](int64_t entry, int32_t value) {
    std::vector<int32_t> v = *order;
    v[entry] = value;
    absl::Status st = ops::ScatterAddRows(S(), rows, idx, NewF32({N + 2, d}), w, ScatterMode::kAccumulate,
                                          FromVecI32({N + 3 + M}, v));
    INFO(st.message());
    return st.code() == absl::StatusCode::kInvalidArgument &&
           std::string(st.message()).find(absl::StrCat("by_row[", entry, "] = ", value)) != std::string::npos;
  };
  CHECK(refused(0, 1));          // offsets do not start at 0
  CHECK(refused(N + 2, M - 1));  // nor end at M
  CHECK(refused(2, 2));          // go back
  CHECK(refused(N + 3 + 1, 1));  // a source twice in a row (not ascending)
  CHECK(refused(N + 3 + 3, 7));  // a source of another row
  CHECK(refused(N + 3 + 3, M));  // outside [0, M)
  CHECK(!ops::ScatterAddRows(S(), rows, idx, NewF32({N + 2, d}), w, ScatterMode::kAccumulate,
                             FromVecI32({3}, {0, 0, 0}))
             .ok());  // the wrong length
  auto bad_order = ops::ScatterRowOrder({0, 6}, 6);
  CHECK(bad_order.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(bad_order.status().message()).find("index[1] = 6 is outside [0, 6)") !=
        std::string::npos);

  Tensor dots = NewF32({M});
  REQUIRE(ops::GatherRowDot(S(), src, idx, rows, dots).ok());
  std::vector<double> want_dot(M, 0.0);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t c = 0; c < d; ++c) want_dot[i] += double(vs[index[i] * d + c]) * vr[i * d + c];
  ExpectClose(dots, want_dot, 1e-5, 1e-6, "gather row dot");

  // Embedding-style gather of i32 rows and out-of-range indices.
  Tensor bad = FromVecI32({2}, {0, 6});
  CHECK(ops::GatherRows(S(), src, bad, NewF32({2, d})).code() == absl::StatusCode::kInvalidArgument);
  CHECK(ops::GatherRows(S(), src, bad, NewF32({2, d}), NewF32({2})).code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(!ops::ScatterAddRows(S(), NewF32({2, d}), bad, acc2).ok());
  CHECK(!ops::ScatterAddRows(S(), NewF32({2, d}), FromVecI32({2}, {-1, 0}), acc2).ok());
  CHECK(!ops::ScatterAddRows(S(), NewF32({2, d}), bad, acc2, Tensor(), ScatterMode::kOverwrite).ok());
}

TEST_CASE("Copy, Cast, Fill") {
  Tensor a = Random({5, 3}, 1), b = NewF32({15});
  REQUIRE(ops::Copy(S(), a, b).ok());
  ExpectEqual(a.Reshape({15}), b, "copy");
  auto h = Tensor::Empty(Cpu(), {15}, DType::kBF16, MemoryCategory::kParameters);
  REQUIRE(h.ok());
  REQUIRE(ops::Cast(S(), a, *h).ok());
  Tensor back = NewF32({5, 3});
  REQUIRE(ops::Cast(S(), *h, back).ok());
  std::vector<double> va = Vd(a);
  ExpectClose(back, va, 1.0 / 256, 0, "bf16 round trip");
  // Round to nearest even: 1 + 2^-8 is a tie between 1 and 1 + 2^-7 -> 1.
  Tensor tie = FromVec({2}, {1.0f + 1.0f / 256, 1.0f + 3.0f / 256});
  auto th = Tensor::Empty(Cpu(), {2}, DType::kBF16, MemoryCategory::kOther);
  REQUIRE(ops::Cast(S(), tie, *th).ok());
  CHECK(th->data<uint16_t>()[0] == 0x3f80);
  CHECK(th->data<uint16_t>()[1] == 0x3f82);
  auto i64 = Tensor::Empty(Cpu(), {4}, DType::kI64, MemoryCategory::kOther);
  REQUIRE(ops::Fill(S(), *i64, 7).ok());
  CHECK(i64->data<int64_t>()[3] == 7);
  CHECK(!ops::Cast(S(), *i64, b.Slice(0, 4)).ok());
  CHECK(!ops::Copy(S(), a, NewF32({14})).ok());
}

TEST_CASE("AdamW step") {
  Tensor p = Random({13}, 1), g = Random({13}, 2), m = Random({13}, 3, 0, 0.1f), v = Random({13}, 4, 0, 0.1f);
  std::vector<float> vp = Vec(p), vg = Vec(g), vm = Vec(m), vv = Vec(v);
  float lr = 1e-2f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f;
  REQUIRE(ops::AdamW(S(), p, g, m, v, lr, b1, b2, eps, wd, 3).ok());
  std::vector<double> want(13), want_m(13), want_v(13);
  for (int i = 0; i < 13; ++i) {
    want_m[i] = b1 * double(vm[i]) + (1 - b1) * vg[i];
    want_v[i] = b2 * double(vv[i]) + (1 - b2) * double(vg[i]) * vg[i];
    double mh = want_m[i] / (1 - std::pow(double(b1), 3)), vh = want_v[i] / (1 - std::pow(double(b2), 3));
    want[i] = vp[i] - lr * (mh / (std::sqrt(vh) + eps) + wd * vp[i]);
  }
  ExpectClose(m, want_m, 1e-5, 1e-7, "exp_avg");
  ExpectClose(v, want_v, 1e-5, 1e-7, "exp_avg_sq");
  ExpectClose(p, want, 1e-5, 1e-6, "param");
  CHECK(!ops::AdamW(S(), p, g, m, v, lr, b1, b2, eps, wd, 0).ok());
}

TEST_CASE("AdamW's grad_scale equals scaling the gradient first, bit for bit") {
  const int64_t n = 3001;
  const float scale = 0.3712f;  // a clipping coefficient
  Tensor p1 = Random({n}, 5), g = Random({n}, 6), m1 = Random({n}, 7, 0, 0.1f), v1 = Random({n}, 8, 0, 0.1f);
  Tensor p2 = Clone(p1), m2 = Clone(m1), v2 = Clone(v1), g2 = Clone(g);
  const std::vector<float> g_before = Vec(g);
  REQUIRE(ops::AdamW(S(), p1, g, m1, v1, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 4, Tensor(), scale).ok());
  REQUIRE(ops::Scale(S(), g2, scale, g2).ok());
  REQUIRE(ops::AdamW(S(), p2, g2, m2, v2, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 4).ok());
  CHECK(Vec(p1) == Vec(p2));
  CHECK(Vec(m1) == Vec(m2));
  CHECK(Vec(v1) == Vec(v2));
  CHECK(Vec(g) == g_before);  // read, not rewritten
  absl::Status st = ops::AdamW(S(), p1, g, m1, v1, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 5, Tensor(), NAN);
  CHECK(std::string(st.message()).find("grad_scale = nan must be finite") != std::string::npos);
}

TEST_CASE("AdamW writes the bf16 compute copy in its pass") {
  // Two identical states; one step with the copy, one without.
  const int64_t n = 5003;  // several worker ranges
  Tensor p1 = Random({n}, 1), g = Random({n}, 2), m1 = Random({n}, 3, 0, 0.1f), v1 = Random({n}, 4, 0, 0.1f);
  Tensor p2 = FromVec({n}, Vec(p1)), m2 = FromVec({n}, Vec(m1)), v2 = FromVec({n}, Vec(v1));
  auto copy = Tensor::Empty(Cpu(), {n}, DType::kBF16, MemoryCategory::kOther);
  REQUIRE(copy.ok());
  REQUIRE(ops::Fill(S(), *copy, 0.0).ok());
  REQUIRE(ops::AdamW(S(), p1, g, m1, v1, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 2, *copy).ok());
  REQUIRE(ops::AdamW(S(), p2, g, m2, v2, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 2).ok());
  // The update itself is unchanged, bit for bit.
  CHECK(Vec(p1) == Vec(p2));
  CHECK(Vec(m1) == Vec(m2));
  CHECK(Vec(v1) == Vec(v2));
  // The copy is the new value rounded to nearest even (computed here on the bits).
  const float* pv = p1.data<float>();
  const uint16_t* c = copy->data<uint16_t>();
  int64_t wrong = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &pv[i], sizeof(bits));
    bits += 0x7fffu + ((bits >> 16) & 1u);
    wrong += c[i] != static_cast<uint16_t>(bits >> 16);
  }
  CHECK(wrong == 0);
  // Refused: an f32 copy, a wrong length, a copy over the state's bytes.
  absl::Status st = ops::AdamW(S(), p1, g, m1, v1, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 3, NewF32({n}));
  CHECK(std::string(st.message()).find("param_bf16") != std::string::npos);
  st = ops::AdamW(S(), p1, g, m1, v1, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 3, copy->Slice(0, n - 1));
  CHECK(std::string(st.message()).find("must have 5003 elements") != std::string::npos);
  auto alias = Tensor::FromBuffer(m1.buffer(), m1.byte_offset(), Shape{n}, DType::kBF16);
  REQUIRE(alias.ok());
  st = ops::AdamW(S(), p1, g, m1, v1, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 3, *alias);
  CHECK(std::string(st.message()).find("overlaps exp_avg") != std::string::npos);
}

TEST_CASE("the list forms do each element's one-tensor op and refuse overlapping elements") {
  // Two AdamW targets (one with a bf16 copy, their own weight decays) against
  // the one-tensor op on clones.
  const int64_t n0 = 777, n1 = 4099;
  std::vector<AdamWTarget> list(2);
  for (int i = 0; i < 2; ++i) {
    const int64_t n = i == 0 ? n0 : n1;
    list[i].param = Random({n}, 10 * i + 1);
    list[i].grad = Random({n}, 10 * i + 2);
    list[i].exp_avg = Random({n}, 10 * i + 3, 0, 0.1f);
    list[i].exp_avg_sq = Random({n}, 10 * i + 4, 0, 0.1f);
    list[i].weight_decay = i == 0 ? 0.1f : 0.0f;
  }
  auto copy = Tensor::Empty(Cpu(), {n1}, DType::kBF16, MemoryCategory::kOther);
  REQUIRE(copy.ok());
  list[1].param_bf16 = *copy;
  std::vector<Tensor> p, m, v;
  for (const AdamWTarget& t : list) {
    p.push_back(Clone(t.param));
    m.push_back(Clone(t.exp_avg));
    v.push_back(Clone(t.exp_avg_sq));
  }
  REQUIRE(ops::AdamW(S(), list, 1e-2f, 0.9f, 0.95f, 1e-8f, 3, 0.5f).ok());
  for (int i = 0; i < 2; ++i) {
    REQUIRE(ops::AdamW(S(), p[i], list[i].grad, m[i], v[i], 1e-2f, 0.9f, 0.95f, 1e-8f, list[i].weight_decay,
                       3, Tensor(), 0.5f)
                .ok());
    CHECK(Vec(p[i]) == Vec(list[i].param));
    CHECK(Vec(m[i]) == Vec(list[i].exp_avg));
    CHECK(Vec(v[i]) == Vec(list[i].exp_avg_sq));
  }
  auto cast = Tensor::Empty(Cpu(), {n1}, DType::kBF16, MemoryCategory::kOther);
  REQUIRE(ops::Cast(S(), list[1].param, *cast).ok());
  CHECK(std::memcmp(cast->raw_data(), copy->raw_data(), copy->nbytes()) == 0);

  // The sums of squares, into one vector.
  Tensor out = NewF32({3}), one = NewF32({1});
  const std::vector<Tensor> xs = {
      list[0].grad, Tensor::Zeros(Cpu(), {0}, DType::kF32, MemoryCategory::kOther).value(), list[1].grad};
  REQUIRE(ops::ReduceSumSquares(S(), xs, out).ok());
  REQUIRE(ops::ReduceSumSquares(S(), xs[2], one).ok());
  CHECK(Vec(out)[2] == Vec(one)[0]);
  CHECK(Vec(out)[1] == 0.0f);
  absl::Status st = ops::ReduceSumSquares(S(), xs, NewF32({2}));
  CHECK(std::string(st.message()).find("out") != std::string::npos);
  st = ops::ReduceSumSquares(S(), {list[0].grad, out}, out.Slice(0, 2));
  CHECK(std::string(st.message()).find("xs[1]") != std::string::npos);

  // Fill.
  REQUIRE(ops::Fill(S(), {list[0].grad, list[1].grad}, 2.0).ok());
  CHECK(Vec(list[0].grad) == std::vector<float>(n0, 2.0f));
  CHECK(Vec(list[1].grad) == std::vector<float>(n1, 2.0f));

  // Elements that share memory could race where a backend runs them at once:
  // refused, naming both.
  std::vector<AdamWTarget> shared = {list[0], list[0]};
  shared[1].exp_avg = Clone(list[0].exp_avg);
  shared[1].exp_avg_sq = Clone(list[0].exp_avg_sq);
  shared[1].grad = Clone(list[0].grad);
  st = ops::AdamW(S(), shared, 1e-2f, 0.9f, 0.95f, 1e-8f, 4);
  INFO(st.message());
  CHECK(std::string(st.message()).find("targets[1].param") != std::string::npos);
  CHECK(std::string(st.message()).find("overlaps targets[0].param") != std::string::npos);
  Tensor big = NewF32({100});
  st = ops::Fill(S(), {big.Slice(0, 60), big.Slice(50, 100)}, 1.0);
  CHECK(std::string(st.message()).find("ts[1]") != std::string::npos);
  CHECK(ops::Fill(S(), {big.Slice(0, 50), big.Slice(50, 100)}, 1.0).ok());  // adjacent, not overlapping
  // A bad element is named by its index.
  std::vector<AdamWTarget> short_grad = {list[0], list[1]};
  short_grad[1].grad = list[1].grad.Slice(0, n1 - 1);
  st = ops::AdamW(S(), short_grad, 1e-2f, 0.9f, 0.95f, 1e-8f, 4);
  CHECK(std::string(st.message()).find("targets[1].grad") != std::string::npos);
}

}  // namespace
}  // namespace moe
