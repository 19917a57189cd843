// Every op the model calls, in bf16 against f32 (ops.h "Precision").
//
// The contract: bf16 inputs are widened exactly, the op computes in f32 and
// each bf16 output is the f32 result rounded once. So with inputs that are
// bf16 values already, the bf16 run must give exactly RoundToBF16(f32 run) for
// bf16 outputs and exactly the f32 run for f32 outputs (rstd, lse, f32
// gradients accumulated from bf16 operands). The CPU backend meets this
// exactly; a GPU backend would be held to the tolerance checks below, which
// also bound the error of bf16 storage against f32 on unrounded inputs.
#include <functional>
#include <string>
#include <vector>

#include "runtime/core/bf16_staging.h"
#include "runtime/core/cpu/cpu_kernels.h"
#include "runtime/core/kernel_math.h"
#include "runtime/core/status.h"
#include "tests/core/test_util.h"

namespace moe {
namespace {
using namespace moe::testing;

Tensor ToBf16(const Tensor& t) {
  auto b = Tensor::Empty(Cpu(), t.shape(), DType::kBF16, MemoryCategory::kActivations);
  REQUIRE(b.ok());
  REQUIRE(ops::Cast(S(), t, *b).ok());
  return *b;
}

std::vector<float> Widen(const Tensor& t) {
  if (t.dtype() == DType::kF32) return Vec(t);
  std::vector<float> v(t.numel());
  const uint16_t* p = t.data<uint16_t>();
  for (size_t i = 0; i < v.size(); ++i) v[i] = kmath::BF16ToF32(p[i]);
  return v;
}

// A random f32 tensor whose values are bf16 values.
Tensor RandomBf16Values(Shape shape, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  Tensor t = Random(shape, seed, lo, hi);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = kmath::RoundToBF16(p[i]);
  return t;
}

// One op call on a list of tensors. `bf16[i]`: argument i becomes bf16 in the
// bf16 run (inputs and outputs alike; undefined tensors stay undefined).
struct Bf16Case {
  std::string name;
  std::vector<Tensor> args;  // f32, bf16-representable initial values
  std::vector<bool> bf16;
  std::function<absl::Status(const std::vector<Tensor>&)> run;
};

// Runs `c` in f32 and with its bf16 arguments in bf16; checks the contract exactly.
void CheckExact(const Bf16Case& c) {
  INFO(c.name);
  REQUIRE(c.args.size() == c.bf16.size());
  std::vector<Tensor> f32, mixed;
  for (size_t i = 0; i < c.args.size(); ++i) {
    const Tensor& a = c.args[i];
    const bool floating = a.defined() && a.dtype() == DType::kF32;  // index tensors are shared, never written
    f32.push_back(floating ? Clone(a) : a);
    mixed.push_back(!floating ? a : c.bf16[i] ? ToBf16(a) : Clone(a));
  }
  REQUIRE(c.run(f32).ok());
  absl::Status st = c.run(mixed);
  INFO(st.ToString());
  REQUIRE(st.ok());
  for (size_t i = 0; i < c.args.size(); ++i) {
    if (!c.args[i].defined() || c.args[i].dtype() != DType::kF32) continue;
    std::vector<float> want = Vec(f32[i]);
    if (c.bf16[i])
      for (float& x : want) x = kmath::RoundToBF16(x);
    const Closeness r =
        Compare(Widen(mixed[i]), want, Tolerance{}, c.name + " argument " + std::to_string(i));
    INFO(r.message);
    CHECK(r.ok);
  }
}

using Args = const std::vector<Tensor>&;

TEST_CASE("bf16 GEMMs: bf16 operands, bf16 or f32 output, accumulate") {
  for (bool f32_out : {false, true}) {
    for (int t = 0; t < 4; ++t) {
      const bool ta = t & 1, tb = t & 2;
      const int64_t m = 13, n = 7, k = 19;
      Tensor a = RandomBf16Values(ta ? Shape{k, m} : Shape{m, k}, 1 + t);
      Tensor b = RandomBf16Values(tb ? Shape{n, k} : Shape{k, n}, 5 + t);
      Tensor c = RandomBf16Values({m, n}, 9 + t);
      CheckExact({"Gemm", {a, b, c}, {true, true, !f32_out}, [=](Args x) {
                    return ops::Gemm(S(), x[0], ta, x[1], tb, x[2], 0.5f, 1.0f);
                  }});
      CheckExact({"Gemm beta 0", {a, b, c}, {true, true, !f32_out}, [=](Args x) {
                    return ops::Gemm(S(), x[0], ta, x[1], tb, x[2]);
                  }});
    }
    Tensor a = RandomBf16Values({6, 5, 8}, 2), b = RandomBf16Values({2, 4, 8}, 3),
           c = RandomBf16Values({6, 5, 4}, 4);
    CheckExact({"BatchedGemm GQA", {a, b, c}, {true, true, !f32_out}, [](Args x) {
                  return ops::BatchedGemm(S(), x[0], false, x[1], true, x[2], 1.0f, 1.0f);
                }});
    // Grouped: 4 experts, one with no rows.
    const std::vector<int64_t> off = {0, 3, 3, 10, 12};
    Tensor xg = RandomBf16Values({12, 6}, 5), w = RandomBf16Values({4, 5, 6}, 6),
           y = RandomBf16Values({12, 5}, 7);
    CheckExact({"GroupedGemm", {xg, w, y}, {true, true, !f32_out}, [=](Args x) {
                  return ops::GroupedGemm(S(), x[0], x[1], true, x[2], off, 1.0f, 1.0f);
                }});
    Tensor dy = RandomBf16Values({12, 5}, 8), dw = RandomBf16Values({4, 5, 6}, 9);
    CheckExact({"GroupedGemmWeightGrad", {dy, xg, dw}, {true, true, !f32_out}, [=](Args x) {
                  return ops::GroupedGemmWeightGrad(S(), x[0], x[1], x[2], off, 1.0f, 1.0f);
                }});
  }
}

TEST_CASE("bf16 element-wise ops and reductions") {
  const Shape sh{5, 37};
  Tensor a = RandomBf16Values(sh, 1), b = RandomBf16Values(sh, 2), o = RandomBf16Values(sh, 3);
  CheckExact({"Add", {a, b, o}, {true, true, true}, [](Args x) { return ops::Add(S(), x[0], x[1], x[2]); }});
  CheckExact(
      {"Add mixed", {a, b, o}, {true, false, true}, [](Args x) { return ops::Add(S(), x[0], x[1], x[2]); }});
  CheckExact({"Add in place", {a, b}, {true, true}, [](Args x) { return ops::Add(S(), x[0], x[1], x[0]); }});
  CheckExact({"Mul", {a, b, o}, {true, true, true}, [](Args x) { return ops::Mul(S(), x[0], x[1], x[2]); }});
  CheckExact({"Axpby", {a, b}, {true, true}, [](Args x) { return ops::Axpby(S(), 0.5f, x[0], 2.0f, x[1]); }});
  CheckExact({"Axpby into f32", {a, b}, {true, false}, [](Args x) {
                return ops::Axpby(S(), 0.5f, x[0], 1.0f, x[1]);
              }});
  CheckExact({"Scale", {a, o}, {true, true}, [](Args x) { return ops::Scale(S(), x[0], 0.3f, x[1]); }});
  CheckExact({"Silu", {a, o}, {true, true}, [](Args x) { return ops::Silu(S(), x[0], x[1]); }});
  CheckExact({"SiluBackward", {a, b, o}, {true, true, true}, [](Args x) {
                return ops::SiluBackward(S(), x[0], x[1], x[2], 1.0f, 1.0f);
              }});
  CheckExact(
      {"SwiGLU", {a, b, o}, {true, true, true}, [](Args x) { return ops::SwiGLU(S(), x[0], x[1], x[2]); }});
  CheckExact({"SwiGLUBackward in place", {a, b, o}, {true, true, true}, [](Args x) {
                return ops::SwiGLUBackward(S(), x[0], x[1], x[2], x[0], x[1]);
              }});
  Tensor r = NewF32({1}), cols = RandomBf16Values({37}, 4);
  CheckExact({"ReduceSum", {a, r}, {true, false}, [](Args x) {
                return ops::ReduceSum(S(), x[0], x[1], 1.0f, 0.0f);
              }});
  CheckExact({"ReduceSumSquares", {a, r}, {true, false}, [](Args x) {
                return ops::ReduceSumSquares(S(), x[0], x[1], 1.0f, 0.0f);
              }});
  CheckExact({"ReduceMax", {a, r}, {true, false}, [](Args x) { return ops::ReduceMax(S(), x[0], x[1]); }});
  CheckExact({"SumRows", {a, cols}, {true, false}, [](Args x) {
                return ops::SumRows(S(), x[0], x[1], 1.0f, 1.0f);
              }});
}

TEST_CASE("bf16 normalisation, RoPE and attention") {
  const int64_t rows = 6, d = 16;
  Tensor x = RandomBf16Values({rows, d}, 1, -2, 2), w = RandomBf16Values({d}, 2, 0.5f, 1.5f);
  Tensor out = RandomBf16Values({rows, d}, 3), rstd = NewF32({rows}), dout = RandomBf16Values({rows, d}, 4);
  Tensor dx = RandomBf16Values({rows, d}, 5), dw = RandomBf16Values({d}, 6),
         res = RandomBf16Values({rows, d}, 7);
  CheckExact({"RmsNorm", {x, w, out, rstd}, {true, true, true, false}, [](Args t) {
                return ops::RmsNorm(S(), t[0], t[1], 1e-5f, t[2], t[3]);
              }});
  // dweight stays f32 (a gradient), dx accumulates in bf16.
  CheckExact(
      {"RmsNormBackward", {x, w, rstd, dout, dx, dw}, {true, true, false, true, true, false}, [](Args t) {
         return ops::RmsNormBackward(S(), t[0], t[1], t[2], t[3], t[4], t[5], true);
       }});
  // The residual stream updated in place (sum = residual).
  CheckExact({"AddRmsNorm", {x, res, w, out, rstd}, {true, true, true, true, false}, [](Args t) {
                return ops::AddRmsNorm(S(), t[0], t[1], t[2], 1e-5f, t[1], t[3], t[4]);
              }});

  const int64_t b = 2, s = 9, h = 4, hkv = 2, hd = 8;
  Tensor q = RandomBf16Values({b, s, h, hd}, 11), k = RandomBf16Values({b, s, hkv, hd}, 12);
  Tensor v = RandomBf16Values({b, s, hkv, hd}, 13), o = NewF32({b, s, h, hd}), lse = NewF32({b, h, s});
  CheckExact({"Rope in place", {q}, {true}, [](Args t) { return ops::Rope(S(), t[0], t[0], 10000.0, 3); }});
  CheckExact({"RopeBackward", {q, o}, {true, true}, [](Args t) {
                return ops::RopeBackward(S(), t[0], t[1], 500.0);
              }});
  CheckExact({"CausalAttention", {q, k, v, o, lse}, {true, true, true, true, false}, [](Args t) {
                return ops::CausalAttention(S(), t[0], t[1], t[2], 0.35f, t[3], t[4]);
              }});
  // Backward from a consistent forward (out and lse of the bf16 inputs).
  REQUIRE(ops::CausalAttention(S(), q, k, v, 0.35f, o, lse).ok());
  float* po = o.data<float>();
  for (int64_t i = 0; i < o.numel(); ++i) po[i] = kmath::RoundToBF16(po[i]);
  Tensor dout4 = RandomBf16Values({b, s, h, hd}, 14), dq = NewF32(q.shape()), dk = NewF32(k.shape()),
         dv = NewF32(v.shape());
  CheckExact({"CausalAttentionBackward",
              {q, k, v, o, lse, dout4, dq, dk, dv},
              {true, true, true, true, false, true, true, true, true},
              [](Args t) {
                return ops::CausalAttentionBackward(S(), t[0], t[1], t[2], t[3], t[4], 0.35f, t[5], t[6],
                                                    t[7], t[8]);
              }});
}

TEST_CASE("bf16 rows: gather, combine, combine-weight gradient, cross-entropy") {
  const int64_t n = 7, m = 10, d = 12;
  Tensor src = RandomBf16Values({n, d}, 1), dst = RandomBf16Values({m, d}, 2);
  Tensor idx = FromVecI32({m}, {0, 3, 3, 6, 1, 0, 2, 5, 4, 3});
  CheckExact({"GatherRows", {src, idx, dst}, {true, false, true}, [](Args t) {
                return ops::GatherRows(S(), t[0], t[1], t[2]);
              }});
  // Weighted (the combine's gradient to expert rows): bf16 or f32 destination.
  Tensor gw = Random({m}, 6, 0, 1);
  for (bool f32_dst : {false, true})
    CheckExact({"GatherRows weighted", {src, idx, dst, gw}, {true, false, !f32_dst, false}, [](Args t) {
                  return ops::GatherRows(S(), t[0], t[1], t[2], t[3]);
                }});
  // Un-permute and combine: repeated destinations, f32 weights, bf16 or f32 destination.
  Tensor rows = RandomBf16Values({m, d}, 3), acc = RandomBf16Values({n, d}, 4), wts = Random({m}, 5, 0, 1);
  auto order = ops::ScatterRowOrder({0, 3, 3, 6, 1, 0, 2, 5, 4, 3}, n);
  REQUIRE(order.ok());
  const Tensor by_row = FromVecI32({n + 1 + m}, *order);
  for (bool f32_dst : {false, true})
    for (ScatterMode mode : {ScatterMode::kAccumulate, ScatterMode::kOverwrite})
      for (const Tensor& sorted : {Tensor(), by_row})
        CheckExact({"ScatterAddRows",
                    {rows, idx, acc, wts, sorted},
                    {true, false, !f32_dst, false, false},
                    [mode](Args t) { return ops::ScatterAddRows(S(), t[0], t[1], t[2], t[3], mode, t[4]); }});
  Tensor dots = NewF32({m});
  CheckExact({"GatherRowDot", {src, idx, rows, dots}, {true, false, true, false}, [](Args t) {
                return ops::GatherRowDot(S(), t[0], t[1], t[2], t[3], 1.0f, 0.0f);
              }});
  const int64_t tok = 5, vocab = 33;
  Tensor logits = RandomBf16Values({tok, vocab}, 6, -4, 4), targets = FromVecI32({tok}, {0, 32, -1, 7, 7});
  Tensor losses = NewF32({tok}), lse = NewF32({tok});
  CheckExact(
      {"CrossEntropy bf16 logits", {logits, targets, losses, lse}, {true, false, false, false}, [](Args t) {
         return ops::CrossEntropy(S(), t[0], t[1], t[2], t[3]);
       }});
  REQUIRE(ops::CrossEntropy(S(), logits, targets, losses, lse).ok());
  Tensor dlogits = NewF32({tok, vocab});
  CheckExact(
      {"CrossEntropyBackward f32 logits, bf16 dlogits",
       {logits, targets, lse, dlogits},
       {false, false, false, true},
       [](Args t) { return ops::CrossEntropyBackward(S(), t[0], t[1], t[2], Tensor(), 0.25f, t[3]); }});
}

TEST_CASE("bf16 results stay within bf16 rounding of f32 on unrounded inputs") {
  // A 64-deep dot product: each input carries a relative error of at most 2^-9,
  // the output one more rounding; the scale-relative error stays below 2e-2.
  const int64_t m = 31, n = 17, k = 64;
  Tensor a = Random({m, k}, 1), b = Random({n, k}, 2), c = NewF32({m, n}), cb = NewF32({m, n});
  REQUIRE(ops::Gemm(S(), a, false, b, true, c).ok());
  Tensor c16 = ToBf16(cb);
  REQUIRE(ops::Gemm(S(), ToBf16(a), false, ToBf16(b), true, c16).ok());
  std::vector<float> want = Vec(c);
  const Closeness r = Compare(Widen(c16), want, Tolerance{.rtol = 1e-2, .scale_rtol = 2e-2}, "bf16 gemm");
  INFO(r.message);
  CHECK(r.ok);
  // RMSNorm: per element relative error of two bf16 roundings and one of the weight.
  Tensor x = Random({4, 64}, 3, -3, 3), w = Random({64}, 4, 0.5f, 1.5f), o = NewF32({4, 64}),
         rs = NewF32({4});
  REQUIRE(ops::RmsNorm(S(), x, w, 1e-5f, o, rs).ok());
  Tensor o16 = ToBf16(o), rs16 = NewF32({4});
  REQUIRE(ops::RmsNorm(S(), ToBf16(x), ToBf16(w), 1e-5f, o16, rs16).ok());
  const Closeness rn = Compare(Widen(o16), Vec(o), Tolerance{.rtol = 1.6e-2, .atol = 1e-6}, "bf16 rmsnorm");
  INFO(rn.message);
  CHECK(rn.ok);
}

TEST_CASE("bf16 where the contract says f32 or one dtype: refused, naming the argument") {
  Tensor a = Random({4, 4}, 1), a16 = ToBf16(a), o = NewF32({4, 4});
  absl::Status st = ops::Gemm(S(), a16, false, a, false, o);
  CHECK(st.code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(st.message()).find("must have the dtype of a") != std::string::npos);
  st = ops::Softmax(S(), a16, o);
  CHECK(st.code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(st.message()).find("must be f32") != std::string::npos);
  Tensor vals = NewF32({4, 2}), ids = FromVecI32({4, 2}, {0, 0, 0, 0, 0, 0, 0, 0});
  CHECK(!ops::TopK(S(), a16, 2, vals, ids).ok());
  CHECK(!ops::AdamW(S(), a16, a, o, o, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.0f, 1).ok());
  CHECK(!ops::InitNormal(S(), a16, 1, "w", 0.02f).ok());
  Tensor rstd16 = ToBf16(NewF32({4}));
  CHECK(!ops::RmsNorm(S(), a16, ToBf16(NewF32({4})), 1e-5f, a16, rstd16).ok());
  // In place across dtypes is not in place: a bf16 view of a's bytes as out is refused.
  auto alias = Tensor::FromBuffer(a.buffer(), a.byte_offset(), Shape{4, 4}, DType::kBF16);
  REQUIRE(alias.ok());
  st = ops::Add(S(), a, a, *alias);
  CHECK(st.code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(st.message()).find("without being the same tensor") != std::string::npos);
  Tensor i32 = FromVecI32({4, 4}, std::vector<int32_t>(16, 1));
  CHECK(!ops::Add(S(), a, i32, o).ok());
}

// The bf16 staging decorator lets an attention call's products run at TF32
// (attn::Tf32ProductsScope; CUDA's gemm path takes it) exactly when q, k and v
// are bf16, and only for that call. Observed from inside the wrapped CPU
// kernels, which still compute the result.
class Tf32Observer : public cpu::CpuKernels {
 public:
  std::vector<bool> seen;
  absl::Status CausalAttention(S& s, T q, T k, T v, float scale, T out, T lse) override {
    seen.push_back(attn::Tf32ProductsAllowed());
    return cpu::CpuKernels::CausalAttention(s, q, k, v, scale, out, lse);
  }
  absl::Status CausalAttentionBackward(S& s, T q, T k, T v, T out, T lse, float scale, T dout, T dq, T dk,
                                       T dv) override {
    seen.push_back(attn::Tf32ProductsAllowed());
    return cpu::CpuKernels::CausalAttentionBackward(s, q, k, v, out, lse, scale, dout, dq, dk, dv);
  }
};

TEST_CASE("bf16 attention allows TF32 products for its call only; f32 attention never") {
  auto observer = std::make_unique<Tf32Observer>();
  Tf32Observer* seen = observer.get();
  std::unique_ptr<Kernels> staged = MakeBf16StagingKernels(std::move(observer), {.stage_gemms = true});
  const int64_t b = 1, s = 5, h = 2, hkv = 1, hd = 4;
  Tensor q = RandomBf16Values({b, s, h, hd}, 21), k = RandomBf16Values({b, s, hkv, hd}, 22),
         v = RandomBf16Values({b, s, hkv, hd}, 23), dout = RandomBf16Values({b, s, h, hd}, 24);
  Tensor lse = NewF32({b, h, s});
  auto run = [&](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout) {
    Tensor out = NewF32(q.shape()), dq = NewF32(q.shape()), dk = NewF32(k.shape()), dv = NewF32(v.shape());
    REQUIRE(staged->CausalAttention(S(), q, k, v, 0.5f, out, lse).ok());
    REQUIRE(staged->CausalAttentionBackward(S(), q, k, v, out, lse, 0.5f, dout, dq, dk, dv).ok());
    REQUIRE(S().Synchronize().ok());
  };
  run(q, k, v, dout);
  REQUIRE(seen->seen == std::vector<bool>{false, false});
  run(ToBf16(q), ToBf16(k), ToBf16(v), ToBf16(dout));
  REQUIRE(seen->seen == std::vector<bool>{false, false, true, true});
  CHECK_FALSE(attn::Tf32ProductsAllowed());  // restored after each call
  // Mixed: a bf16 q with f32 k and v keeps full f32 products.
  run(ToBf16(q), k, v, dout);
  CHECK(seen->seen == std::vector<bool>{false, false, true, true, false, false});
  {
    attn::Tf32ProductsScope outer(true);
    run(q, k, v, dout);  // an f32 call inside an allowing scope still gets f32
    CHECK(attn::Tf32ProductsAllowed());
  }
  CHECK(seen->seen.back() == false);
  CHECK_FALSE(attn::Tf32ProductsAllowed());
}

// stage_elementwise = false (CUDA, whose element-wise kernels read and write
// bf16): the eight arithmetic element-wise ops reach the wrapped kernels with
// their bf16 tensors; with the default, as f32 copies. Every other op is
// staged either way. Observed from inside the wrapped CPU kernels.
class DtypeObserver : public cpu::CpuKernels {
 public:
  std::vector<std::string> seen;
  absl::Status SwiGLU(S& s, T gate, T up, T out) override {
    return Note("SwiGLU", gate, [&] { return cpu::CpuKernels::SwiGLU(s, gate, up, out); });
  }
  absl::Status Axpby(S& s, float alpha, T x, float beta, T y) override {
    return Note("Axpby", x, [&] { return cpu::CpuKernels::Axpby(s, alpha, x, beta, y); });
  }
  absl::Status RmsNorm(S& s, T x, T weight, float eps, T out, T rstd) override {
    return Note("RmsNorm", x, [&] { return cpu::CpuKernels::RmsNorm(s, x, weight, eps, out, rstd); });
  }
  absl::Status AddRmsNorm(S& s, T x, T residual, T weight, float eps, T sum, T out, T rstd) override {
    return Note("AddRmsNorm", x,
                [&] { return cpu::CpuKernels::AddRmsNorm(s, x, residual, weight, eps, sum, out, rstd); });
  }
  absl::Status RmsNormBackward(S& s, T x, T weight, T rstd, T dout, T dx, T dweight,
                               bool accumulate_dx) override {
    return Note("RmsNormBackward", dout, [&] {
      return cpu::CpuKernels::RmsNormBackward(s, x, weight, rstd, dout, dx, dweight, accumulate_dx);
    });
  }
  absl::Status Rope(S& s, T x, T out, double theta, int64_t position_offset) override {
    return Note("Rope", x, [&] { return cpu::CpuKernels::Rope(s, x, out, theta, position_offset); });
  }
  absl::Status RopeBackward(S& s, T dout, T dx, double theta, int64_t position_offset) override {
    return Note("RopeBackward", dx,
                [&] { return cpu::CpuKernels::RopeBackward(s, dout, dx, theta, position_offset); });
  }
  absl::Status CrossEntropyBackward(S& s, T logits, T targets, T lse, T dloss, float scale,
                                    T dlogits) override {
    return Note("CrossEntropyBackward", dlogits, [&] {
      return cpu::CpuKernels::CrossEntropyBackward(s, logits, targets, lse, dloss, scale, dlogits);
    });
  }
  absl::Status ScatterAddRows(S& s, T src, T index, T dst, T weight, ScatterMode mode, T by_row) override {
    return Note("ScatterAddRows", dst,
                [&] { return cpu::CpuKernels::ScatterAddRows(s, src, index, dst, weight, mode, by_row); });
  }
  absl::Status GatherRowDot(S& s, T a, T index, T b, T out, float alpha, float beta) override {
    return Note("GatherRowDot", b,
                [&] { return cpu::CpuKernels::GatherRowDot(s, a, index, b, out, alpha, beta); });
  }
  absl::Status SumRows(S& s, T x, T out, float alpha, float beta) override {
    return Note("SumRows", x, [&] { return cpu::CpuKernels::SumRows(s, x, out, alpha, beta); });
  }

 private:
  // Records op:dtype; runs the f32 CPU kernel only on f32 operands (it has no
  // bf16 arithmetic: the passed-through case is CUDA's to compute).
  absl::Status Note(const char* op, const Tensor& t, const std::function<absl::Status()>& run) {
    seen.push_back(std::string(op) + ":" + std::string(DTypeName(t.dtype())));
    return t.dtype() == DType::kF32 ? run() : absl::OkStatus();
  }
};

TEST_CASE("stage_elementwise = false passes the element-wise ops' bf16 operands through") {
  const int64_t rows = 3, d = 8;
  Tensor x = ToBf16(RandomBf16Values({rows, d}, 31)), y = ToBf16(RandomBf16Values({rows, d}, 32));
  Tensor out = ToBf16(RandomBf16Values({rows, d}, 33)), w = ToBf16(RandomBf16Values({d}, 34, 0.5f, 1.5f));
  Tensor rstd = NewF32({rows});
  for (bool stage : {true, false}) {
    auto observer = std::make_unique<DtypeObserver>();
    DtypeObserver* seen = observer.get();
    std::unique_ptr<Kernels> k =
        MakeBf16StagingKernels(std::move(observer), {.stage_gemms = true, .stage_elementwise = stage});
    REQUIRE(k->SwiGLU(S(), x, y, out).ok());
    REQUIRE(k->Axpby(S(), 0.5f, x, 1.0f, y).ok());
    REQUIRE(k->RmsNorm(S(), x, w, 1e-5f, out, rstd).ok());
    REQUIRE(S().Synchronize().ok());
    const std::string el = stage ? "f32" : "bf16";
    CHECK(seen->seen == std::vector<std::string>{"SwiGLU:" + el, "Axpby:" + el, "RmsNorm:f32"});
  }
}

// stage_rows = false (CUDA, whose norm, RoPE, cross-entropy and row
// scatter/dot kernels read and write bf16): those nine ops reach the wrapped
// kernels with their bf16 tensors; with the default, as f32 copies. The
// reductions (SumRows here) and attention stay staged either way.
TEST_CASE("stage_rows = false passes the norm, RoPE, cross-entropy and row ops' bf16 operands through") {
  const int64_t b = 1, seq = 3, h = 2, hd = 4, d = h * hd, rows = b * seq, vocab = 7;
  Tensor x = ToBf16(RandomBf16Values({rows, d}, 41)), r = ToBf16(RandomBf16Values({rows, d}, 42));
  Tensor out = ToBf16(RandomBf16Values({rows, d}, 43)), w = ToBf16(RandomBf16Values({d}, 44, 0.5f, 1.5f));
  Tensor dw = NewF32({d}), rstd = NewF32({rows}), colsum = NewF32({d});
  Tensor q = ToBf16(RandomBf16Values({b, seq, h, hd}, 45)), logits = RandomBf16Values({rows, vocab}, 46);
  Tensor lse = NewF32({rows}), dlogits = ToBf16(RandomBf16Values({rows, vocab}, 47));
  auto targets = Tensor::Empty(Cpu(), Shape{rows}, DType::kI32, MemoryCategory::kActivations);
  REQUIRE(targets.ok());
  for (int64_t i = 0; i < rows; ++i) targets->data<int32_t>()[i] = static_cast<int32_t>(i % vocab);
  REQUIRE(ops::LogSumExp(S(), logits, lse).ok());
  for (bool stage : {true, false}) {
    auto observer = std::make_unique<DtypeObserver>();
    DtypeObserver* seen = observer.get();
    std::unique_ptr<Kernels> k = MakeBf16StagingKernels(std::move(observer), {.stage_rows = stage});
    REQUIRE(k->RmsNorm(S(), x, w, 1e-5f, out, rstd).ok());
    REQUIRE(k->AddRmsNorm(S(), x, r, w, 1e-5f, r, out, rstd).ok());
    REQUIRE(k->RmsNormBackward(S(), x, w, rstd, out, r, dw, false).ok());
    REQUIRE(k->Rope(S(), q, q, 10000.0, 0).ok());
    REQUIRE(k->RopeBackward(S(), q, q, 10000.0, 0).ok());
    REQUIRE(k->CrossEntropyBackward(S(), logits, *targets, lse, Tensor(), 0.5f, dlogits).ok());
    REQUIRE(k->ScatterAddRows(S(), x, *targets, out, Tensor(), ScatterMode::kAccumulate, Tensor()).ok());
    REQUIRE(k->GatherRowDot(S(), out, *targets, x, lse, 1.0f, 0.0f).ok());
    REQUIRE(k->SumRows(S(), x, colsum, 1.0f, 0.0f).ok());
    REQUIRE(S().Synchronize().ok());
    const std::string el = stage ? "f32" : "bf16";
    CHECK(seen->seen == std::vector<std::string>{"RmsNorm:" + el, "AddRmsNorm:" + el, "RmsNormBackward:" + el,
                                                 "Rope:" + el, "RopeBackward:" + el,
                                                 "CrossEntropyBackward:" + el, "ScatterAddRows:" + el,
                                                 "GatherRowDot:" + el, "SumRows:f32"});
  }
}

}  // namespace
}  // namespace moe
