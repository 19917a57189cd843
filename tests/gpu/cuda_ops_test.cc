// Every CUDA op against the CPU backend (label gpu), as ggml's test-backend-ops
// does: the same inputs on both backends, outputs compared by normalised mean
// squared error and max-abs thresholds; odd shapes, zero-token experts, skewed
// expert loads, repeated scatter indices, bad indices. Without a usable GPU
// (no device, driver too old, or a build without CUDA) it prints one line and
// exits 77, which ctest reports as skipped.
#define CATCH_CONFIG_RUNNER
#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "runtime/core/attention_gemm.h"
#include "runtime/core/backend.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"
#include "runtime/core/tensor.h"
#if MOE_WITH_CUDA
#include "runtime/core/cuda/cuda_backend.h"
#endif

namespace moe {
namespace {

Backend* g_gpu = nullptr;
Backend& Cpu() { return **GetBackend(Device::Cpu()); }
Stream& G() { return g_gpu->default_stream(); }

Tensor Copy(Backend& to, const Tensor& t) {
  auto out = Tensor::Empty(to, t.shape(), t.dtype(), MemoryCategory::kActivations);
  REQUIRE(out.ok());
  Stream& s = t.device().is_cpu() && to.device().is_cpu() ? Cpu().default_stream() : G();
  REQUIRE(ops::Copy(s, t, *out).ok());
  REQUIRE(s.Synchronize().ok());
  return *out;
}

Tensor Rand(Shape shape, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(shape.numel());
  for (float& x : v) x = dist(gen);
  auto t = Tensor::FromHost(Cpu(), shape, DType::kF32, v.data(), v.size() * 4, MemoryCategory::kActivations);
  REQUIRE(t.ok());
  return *t;
}

// A buffer no op should read: every element NaN.
Tensor Nans(Shape shape) {
  Tensor t = Rand(shape, 0);
  std::fill_n(t.data<float>(), t.numel(), std::numeric_limits<float>::quiet_NaN());
  return t;
}

Tensor Ints(Shape shape, const std::vector<int32_t>& v) {
  auto t = Tensor::FromHost(Cpu(), shape, DType::kI32, v.data(), v.size() * 4, MemoryCategory::kActivations);
  REQUIRE(t.ok());
  return *t;
}

// The bytes of a tensor (copied to the host), for bit-for-bit comparisons.
std::vector<uint8_t> Bits(const Tensor& t) {
  const Tensor h = Copy(Cpu(), t);
  return std::vector<uint8_t>(static_cast<const uint8_t*>(h.raw_data()),
                              static_cast<const uint8_t*>(h.raw_data()) + h.nbytes());
}

// Puts the process-wide attention settings back as they were when it goes.
struct AttentionSettingsRestore {
  attn::AttentionSettings saved = attn::AttentionSettingsRef();
  ~AttentionSettingsRestore() { attn::AttentionSettingsRef() = saved; }
};

struct Tol {
  double nmse = 1e-9;     // sum (got - want)^2 / sum want^2
  double max_abs = 1e-4;  // times max(1, max |want|)
};

// An f32 copy of a CPU tensor (bf16 widened exactly).
Tensor ToF32(const Tensor& t) {
  if (t.dtype() != DType::kBF16) return t;
  auto out = Tensor::Empty(Cpu(), t.shape(), DType::kF32, MemoryCategory::kActivations);
  REQUIRE(out.ok());
  REQUIRE(ops::Cast(Cpu().default_stream(), t, *out).ok());
  REQUIRE(Cpu().default_stream().Synchronize().ok());
  return *out;
}

// A bf16 copy of a CPU f32 tensor (rounded to nearest even).
Tensor Bf16(const Tensor& t) {
  auto out = Tensor::Empty(Cpu(), t.shape(), DType::kBF16, MemoryCategory::kActivations);
  REQUIRE(out.ok());
  REQUIRE(ops::Cast(Cpu().default_stream(), t, *out).ok());
  REQUIRE(Cpu().default_stream().Synchronize().ok());
  return *out;
}

void Expect(const std::string& what, const Tensor& want_any, const Tensor& got_dev, Tol tol) {
  // bf16 outputs are compared as their exact f32 values.
  const Tensor want = ToF32(want_any);
  Tensor got = ToF32(Copy(Cpu(), got_dev));
  INFO(what << " " << want_any.ToString());
  REQUIRE(got.numel() == want.numel());
  if (want.dtype() == DType::kI32) {
    CHECK(std::memcmp(got.raw_data(), want.raw_data(), want.nbytes()) == 0);
    return;
  }
  REQUIRE(want.dtype() == DType::kF32);
  const float *w = want.data<float>(), *g = got.data<float>();
  double err2 = 0, ref2 = 0, max_abs = 0, scale = 1;
  bool finite = true;
  for (int64_t i = 0; i < want.numel(); ++i) {
    finite = finite && std::isfinite(g[i]) == std::isfinite(w[i]) && (std::isfinite(g[i]) || g[i] == w[i]);
    if (!std::isfinite(w[i])) continue;
    const double d = static_cast<double>(g[i]) - w[i];
    err2 += d * d;
    ref2 += static_cast<double>(w[i]) * w[i];
    max_abs = std::max(max_abs, std::fabs(d));
    scale = std::max(scale, std::fabs(static_cast<double>(w[i])));
  }
  const double nmse = ref2 > 0 ? err2 / ref2 : err2;
  INFO("nmse " << nmse << " max_abs " << max_abs << " scale " << scale);
  CHECK(finite);
  CHECK((std::isfinite(nmse) && nmse <= tol.nmse));
  CHECK((std::isfinite(max_abs) && max_abs <= tol.max_abs * scale));
}

// Runs `enqueue` on another thread while `gate` holds a stream, then opens
// the gate and joins the thread. True when `enqueue` returned within 2 s, so
// it did not wait for the held stream (it would have waited for good).
bool ReturnsBehindGate(HostGate& gate, const std::function<void()>& enqueue) {
  std::atomic<bool> returned{false};
  std::thread t([&] {
    enqueue();
    returned = true;
  });
  for (int i = 0; i < 200 && !returned; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  const bool in_time = returned;
  gate.Open(absl::OkStatus());
  t.join();
  return in_time;
}

using Op = std::function<absl::Status(Stream&, const std::vector<Tensor>&)>;

// Runs `op` on the CPU backend over copies of `args` and on the GPU over device
// copies (outputs start with the same contents: beta and accumulate paths are
// tested too), then compares the arguments listed in `outputs`.
void Run(const std::string& name, const std::vector<Tensor>& args, const std::vector<int>& outputs,
         const Op& op, Tol tol = {}) {
  std::vector<Tensor> cpu, dev;
  for (const Tensor& a : args) {
    cpu.push_back(a.defined() ? Copy(Cpu(), a) : Tensor());
    dev.push_back(a.defined() ? Copy(*g_gpu, a) : Tensor());
  }
  absl::Status cs = op(Cpu().default_stream(), cpu);
  INFO(name << ": " << cs.message());
  REQUIRE(cs.ok());
  absl::Status gs = op(G(), dev);
  INFO(name << " (cuda): " << gs.message());
  REQUIRE(gs.ok());
  absl::Status sync = G().Synchronize();
  INFO(name << " (cuda sync): " << sync.message());
  REQUIRE(sync.ok());
  for (int o : outputs) Expect(absl::StrCat(name, " arg ", o), cpu[o], dev[o], tol);
}

TEST_CASE("element-wise and reductions match the CPU backend") {
  for (int64_t n : {1, 31, 1000, 65537}) {
    Tensor a = Rand({n}, 1, -4, 4), b = Rand({n}, 2), c = Rand({n}, 3), d = Rand({n}, 4);
    Run("Add", {a, b, c}, {2}, [](Stream& s, auto& t) { return ops::Add(s, t[0], t[1], t[2]); });
    Run("Mul", {a, b, c}, {2}, [](Stream& s, auto& t) { return ops::Mul(s, t[0], t[1], t[2]); });
    Run("Axpby", {a, b}, {1}, [](Stream& s, auto& t) { return ops::Axpby(s, 0.5f, t[0], -2.0f, t[1]); });
    Run("Scale", {a, c}, {1}, [](Stream& s, auto& t) { return ops::Scale(s, t[0], 3.0f, t[1]); });
    Run("Silu", {a, c}, {1}, [](Stream& s, auto& t) { return ops::Silu(s, t[0], t[1]); });
    Run("SiluBackward", {a, b, c}, {2},
        [](Stream& s, auto& t) { return ops::SiluBackward(s, t[0], t[1], t[2], 0.5f, 1.0f); });
    Run("SwiGLU", {a, b, c}, {2}, [](Stream& s, auto& t) { return ops::SwiGLU(s, t[0], t[1], t[2]); });
    Run("SwiGLUBackward", {a, b, c, d, Rand({n}, 5)}, {3, 4},
        [](Stream& s, auto& t) { return ops::SwiGLUBackward(s, t[0], t[1], t[2], t[3], t[4]); });
    Tensor out = Rand({1}, 6);
    Run("ReduceSum", {a, out}, {1},
        [](Stream& s, auto& t) { return ops::ReduceSum(s, t[0], t[1], 2.0f, 1.0f); });
    Run("ReduceSumSquares", {a, out}, {1},
        [](Stream& s, auto& t) { return ops::ReduceSumSquares(s, t[0], t[1]); });
    Run("ReduceMax", {a, out}, {1}, [](Stream& s, auto& t) { return ops::ReduceMax(s, t[0], t[1]); });
    Run("Fill", {c}, {0}, [](Stream& s, auto& t) { return ops::Fill(s, t[0], -1.25); });
    Run("Copy", {a, c}, {1}, [](Stream& s, auto& t) { return ops::Copy(s, t[0], t[1]); });
    auto bf = Tensor::Zeros(Cpu(), {n}, DType::kBF16, MemoryCategory::kOther);
    REQUIRE(bf.ok());
    Run("Cast f32->bf16->f32", {a, *bf, c}, {2}, [](Stream& s, auto& t) {
      RETURN_IF_ERROR(ops::Cast(s, t[0], t[1]));
      return ops::Cast(s, t[1], t[2]);
    });
  }
  // The reductions over many blocks: slices of a million elements, combined in a second pass.
  {
    Tensor big = Rand({1000003}, 9, -2, 2), out = Rand({1}, 10);
    Run("ReduceSum, 62 blocks", {big, out}, {1},
        [](Stream& s, auto& t) { return ops::ReduceSum(s, t[0], t[1], 0.5f, -1.0f); });
    Run("ReduceSumSquares, 62 blocks", {big, out}, {1},
        [](Stream& s, auto& t) { return ops::ReduceSumSquares(s, t[0], t[1]); });
    Run("ReduceMax, 62 blocks", {big, out}, {1},
        [](Stream& s, auto& t) { return ops::ReduceMax(s, t[0], t[1]); });
  }
  // Column sums in one row chunk (37 rows) and in eight (1000 rows, a second pass).
  for (int64_t rows : {37, 1000}) {
    Tensor x = Rand({rows, 129}, 7), cols = Rand({129}, 8);
    Run(absl::StrCat("SumRows, ", rows, " rows"), {x, cols}, {1},
        [](Stream& s, auto& t) { return ops::SumRows(s, t[0], t[1], 1.0f, 0.5f); });
  }
}

TEST_CASE("GEMMs match the CPU backend on odd shapes") {
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      const int64_t m = 33, n = 17, k = 65;
      Tensor a = ta ? Rand({k, m}, 1) : Rand({m, k}, 1), b = tb ? Rand({n, k}, 2) : Rand({k, n}, 2);
      Run(absl::StrCat("Gemm ", ta, tb), {a, b, Rand({m, n}, 3)}, {2},
          [=](Stream& s, auto& t) { return ops::Gemm(s, t[0], ta, t[1], tb, t[2], 0.75f, 0.5f); });
    }
  // GQA broadcast: 6 query heads over 3 kv heads.
  Run("BatchedGemm", {Rand({2, 6, 9, 16}, 4), Rand({2, 3, 11, 16}, 5), Rand({2, 6, 9, 11}, 6)}, {2},
      [](Stream& s, auto& t) { return ops::BatchedGemm(s, t[0], false, t[1], true, t[2]); });
  // Grouped expert GEMM: zero-token experts (0, 3), heavy skew (expert 2).
  const std::vector<int64_t> offsets = {0, 0, 3, 60, 60, 67};
  const int64_t rows = 67, p = 24, q = 40, e = 5;
  Tensor w = Rand({e, p, q}, 7);
  Run("GroupedGemm x W^T", {Rand({rows, q}, 8), w, Rand({rows, p}, 9)}, {2},
      [&](Stream& s, auto& t) { return ops::GroupedGemm(s, t[0], t[1], true, t[2], offsets); });
  Run("GroupedGemm dX", {Rand({rows, p}, 10), w, Rand({rows, q}, 11)}, {2},
      [&](Stream& s, auto& t) { return ops::GroupedGemm(s, t[0], t[1], false, t[2], offsets, 1.0f, 1.0f); });
  for (float beta : {0.0f, 1.0f, 0.5f})
    Run(absl::StrCat("GroupedGemmWeightGrad beta ", beta), {Rand({rows, p}, 12), Rand({rows, q}, 13), w}, {2},
        [&](Stream& s, auto& t) {
          return ops::GroupedGemmWeightGrad(s, t[0], t[1], t[2], offsets, 1.0f, beta);
        });
  // More experts with rows than the streams path has lanes (several products
  // per lane), uneven sizes, a zero-token expert in the middle.
  const std::vector<int64_t> many = {0, 40, 41, 141, 141, 150, 230, 231, 260, 390, 400, 513};
  const int64_t mrows = many.back(), me = static_cast<int64_t>(many.size()) - 1;
  Tensor mw = Rand({me, p, q}, 14);
  Run("GroupedGemm x W^T, 11 experts", {Rand({mrows, q}, 15), mw, Rand({mrows, p}, 16)}, {2},
      [&](Stream& s, auto& t) { return ops::GroupedGemm(s, t[0], t[1], true, t[2], many); });
  Run("GroupedGemmWeightGrad, 11 experts", {Rand({mrows, p}, 17), Rand({mrows, q}, 18), mw}, {2},
      [&](Stream& s, auto& t) { return ops::GroupedGemmWeightGrad(s, t[0], t[1], t[2], many, 1.0f, 1.0f); });
}

TEST_CASE("normalisation, RoPE and attention match the CPU backend") {
  const int64_t rows = 45, d = 200;
  Tensor x = Rand({rows, d}, 1), w = Rand({d}, 2, 0.5f, 1.5f), out = Rand({rows, d}, 3),
         rstd = Rand({rows}, 4);
  Run("RmsNorm", {x, w, out, rstd}, {2, 3},
      [](Stream& s, auto& t) { return ops::RmsNorm(s, t[0], t[1], 1e-5f, t[2], t[3]); });
  Run("AddRmsNorm", {x, Rand({rows, d}, 5), w, Rand({rows, d}, 6), out, rstd}, {3, 4, 5},
      [](Stream& s, auto& t) { return ops::AddRmsNorm(s, t[0], t[1], t[2], 1e-5f, t[3], t[4], t[5]); });
  Run("RmsNormBackward", {x, w, Rand({rows}, 7, 0.5f, 2.0f), Rand({rows, d}, 8), out, Rand({d}, 9)}, {4, 5},
      [](Stream& s, auto& t) { return ops::RmsNormBackward(s, t[0], t[1], t[2], t[3], t[4], t[5], true); });
  {  // the weight gradient's column sums in six row chunks, added in a second pass
    const int64_t many = 700;
    Run("RmsNormBackward, 700 rows",
        {Rand({many, d}, 20), w, Rand({many}, 21, 0.5f, 2.0f), Rand({many, d}, 22), Rand({many, d}, 23),
         Rand({d}, 24)},
        {4, 5}, [](Stream& s, auto& t) {
          return ops::RmsNormBackward(s, t[0], t[1], t[2], t[3], t[4], t[5], false);
        });
  }
  Tensor r = Rand({2, 13, 3, 10}, 10);
  Run("Rope", {r, Rand({2, 13, 3, 10}, 11)}, {1},
      [](Stream& s, auto& t) { return ops::Rope(s, t[0], t[1], 10000.0, 5); });
  Run("RopeBackward", {r, Rand({2, 13, 3, 10}, 12)}, {1},
      [](Stream& s, auto& t) { return ops::RopeBackward(s, t[0], t[1], 500.0, 0); });
}

// Both attention paths (attention_gemm.h), each on both backends: the fused
// kernels, and the chunked GEMM driver on cuBLAS with chunks that do not divide
// S (the CPU tests hold the CPU's gemm path to its fused kernel and to finite
// differences). B 2, S 37 (not a tile multiple), H 4 over Hkv 2, hd 24; then
// S 300, hd 64, H 8 over Hkv 2 in 64-row chunks.
TEST_CASE("attention, both paths, matches the CPU backend") {
  struct Case {
    int64_t B, S, H, Hkv, hd, chunk;
  };
  for (Case c : {Case{2, 37, 4, 2, 24, 10}, Case{2, 300, 8, 2, 64, 64}}) {
    for (attn::AttentionPath path : {attn::AttentionPath::kFused, attn::AttentionPath::kGemm}) {
      const int64_t B = c.B, S = c.S, H = c.H, Hkv = c.Hkv, hd = c.hd;
      const std::string tag = absl::StrCat(" (", attn::AttentionPathName(path), ", S ", S, ")");
      const AttentionSettingsRestore restore;
      attn::AttentionSettingsRef().path = path;
      attn::AttentionSettingsRef().workspace_bytes =
          c.chunk * 2 * B * H * S * static_cast<int64_t>(sizeof(float));
      Tensor q = Rand({B, S, H, hd}, 13), k = Rand({B, S, Hkv, hd}, 14), v = Rand({B, S, Hkv, hd}, 15);
      Tensor o = Rand({B, S, H, hd}, 16), lse = Rand({B, H, S}, 17);
      const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
      Run("CausalAttention" + tag, {q, k, v, o, lse}, {3, 4},
          [=](Stream& s, auto& t) { return ops::CausalAttention(s, t[0], t[1], t[2], scale, t[3], t[4]); });
      Tensor fo = Copy(Cpu(), o), fl = Copy(Cpu(), lse);
      REQUIRE(ops::CausalAttention(Cpu().default_stream(), q, k, v, scale, fo, fl).ok());
      Run("CausalAttentionBackward" + tag,
          {q, k, v, fo, fl, Rand({B, S, H, hd}, 18), Rand({B, S, H, hd}, 19), Rand({B, S, Hkv, hd}, 20),
           Rand({B, S, Hkv, hd}, 21)},
          {6, 7, 8}, [=](Stream& s, auto& t) {
            return ops::CausalAttentionBackward(s, t[0], t[1], t[2], t[3], t[4], scale, t[5], t[6], t[7],
                                                t[8]);
          });
    }
  }
}

// train.precision bf16 on cuda: the GEMMs take the bf16 operands (cuBLAS, f32
// accumulation); every other op runs its f32 kernel on f32 copies of them
// (bf16_staging.h), as the CPU backend does for every op. Both round each bf16
// output once, so results agree to a bf16 rounding step (2^-8 relative) where
// the f32 summation orders differ.
TEST_CASE("bf16 operands: staged ops and bf16 GEMMs match the CPU backend") {
  const Tol bf{1e-4, 1e-2};
  const int64_t rows = 45, d = 200;
  Tensor x = Bf16(Rand({rows, d}, 1)), w = Bf16(Rand({d}, 2, 0.5f, 1.5f)), out = Bf16(Rand({rows, d}, 3));
  Run(
      "RmsNorm bf16", {x, w, out, Rand({rows}, 4)}, {2, 3},
      [](Stream& s, auto& t) { return ops::RmsNorm(s, t[0], t[1], 1e-5f, t[2], t[3]); }, bf);
  Run(
      "RmsNormBackward bf16 (f32 dweight)",
      {x, w, Rand({rows}, 5, 0.5f, 2.0f), Bf16(Rand({rows, d}, 6)), out, Rand({d}, 7)}, {4, 5},
      [](Stream& s, auto& t) { return ops::RmsNormBackward(s, t[0], t[1], t[2], t[3], t[4], t[5], true); },
      bf);
  // The norms, RoPE and the cross-entropy read and write bf16 themselves
  // (stage_rows = false): in place as the model calls them, and mixed with f32.
  Run(
      "AddRmsNorm bf16, sum in place on residual", {x, Bf16(Rand({rows, d}, 40)), w, out, Rand({rows}, 41)},
      {1, 3, 4},
      [](Stream& s, auto& t) { return ops::AddRmsNorm(s, t[0], t[1], t[2], 1e-5f, t[1], t[3], t[4]); }, bf);
  Run(
      "AddRmsNorm bf16 x, f32 residual and sum",
      {x, Rand({rows, d}, 42), w, out, Rand({rows}, 43), Rand({rows, d}, 44)}, {3, 4, 5},
      [](Stream& s, auto& t) { return ops::AddRmsNorm(s, t[0], t[1], t[2], 1e-5f, t[5], t[3], t[4]); }, bf);
  Run(
      "RmsNormBackward bf16, 700 rows (six row chunks)",
      {Bf16(Rand({700, d}, 50)), w, Rand({700}, 51, 0.5f, 2.0f), Bf16(Rand({700, d}, 52)),
       Bf16(Rand({700, d}, 53)), Rand({d}, 54)},
      {4, 5},
      [](Stream& s, auto& t) { return ops::RmsNormBackward(s, t[0], t[1], t[2], t[3], t[4], t[5], true); },
      bf);
  Run(
      "RmsNormBackward bf16 (bf16 dweight, dx overwritten)",
      {x, w, Rand({rows}, 45, 0.5f, 2.0f), Bf16(Rand({rows, d}, 46)), out, Bf16(Rand({d}, 47))}, {4, 5},
      [](Stream& s, auto& t) { return ops::RmsNormBackward(s, t[0], t[1], t[2], t[3], t[4], t[5], false); },
      bf);
  {
    const int64_t B = 2, S = 13, H = 3, hd = 16;
    Run(
        "Rope bf16, in place, offset 5", {Bf16(Rand({B, S, H, hd}, 48))}, {0},
        [](Stream& s, auto& t) { return ops::Rope(s, t[0], t[0], 10000.0, 5); }, bf);
    Run(
        "RopeBackward bf16, in place (as model/attention.cc calls it)", {Bf16(Rand({B, S, H, hd}, 49))}, {0},
        [](Stream& s, auto& t) { return ops::RopeBackward(s, t[0], t[0], 500000.0, 0); }, bf);
  }
  {
    const int64_t n = 21, vocab = 517;
    Tensor blogits = Bf16(Rand({n, vocab}, 51, -8, 8)), blse = Rand({n}, 52);
    REQUIRE(ops::LogSumExp(Cpu().default_stream(), ToF32(blogits), blse).ok());
    std::vector<int32_t> targets(n);
    for (int64_t i = 0; i < n; ++i) targets[i] = i == 4 ? -1 : static_cast<int32_t>((i * 53) % vocab);
    Run(
        "CrossEntropy bf16 logits", {blogits, Ints({n}, targets), Rand({n}, 53), Rand({n}, 54)}, {2, 3},
        [](Stream& s, auto& t) { return ops::CrossEntropy(s, t[0], t[1], t[2], t[3]); }, bf);
    Run(
        "CrossEntropyBackward bf16, dlogits in place", {blogits, Ints({n}, targets), blse, Rand({n}, 55)},
        {0},
        [](Stream& s, auto& t) { return ops::CrossEntropyBackward(s, t[0], t[1], t[2], t[3], 0.5f, t[0]); },
        bf);
  }
  Run(
      "SwiGLU bf16", {x, Bf16(Rand({rows, d}, 8)), out}, {2},
      [](Stream& s, auto& t) { return ops::SwiGLU(s, t[0], t[1], t[2]); }, bf);
  // The arithmetic element-wise kernels read and write bf16 themselves
  // (stage_elementwise = false), all-bf16 and mixed with f32.
  Tensor y = Bf16(Rand({rows, d}, 30)), yf = Rand({rows, d}, 31);
  Run(
      "Add bf16", {x, y, out}, {2}, [](Stream& s, auto& t) { return ops::Add(s, t[0], t[1], t[2]); }, bf);
  Run(
      "Mul bf16, in place", {x, y}, {0}, [](Stream& s, auto& t) { return ops::Mul(s, t[0], t[1], t[0]); },
      bf);
  Run(
      "Axpby bf16 x into f32 y", {x, yf}, {1},
      [](Stream& s, auto& t) { return ops::Axpby(s, 0.5f, t[0], -2.0f, t[1]); }, bf);
  Run(
      "Axpby bf16, beta 0", {x, y}, {1},
      [](Stream& s, auto& t) { return ops::Axpby(s, 3.0f, t[0], 0.0f, t[1]); }, bf);
  Run(
      "Scale bf16", {x, out}, {1}, [](Stream& s, auto& t) { return ops::Scale(s, t[0], -1.5f, t[1]); }, bf);
  Run(
      "Silu bf16", {x, out}, {1}, [](Stream& s, auto& t) { return ops::Silu(s, t[0], t[1]); }, bf);
  Run(
      "SiluBackward bf16, beta 1", {x, y, Bf16(Rand({rows, d}, 32))}, {2},
      [](Stream& s, auto& t) { return ops::SiluBackward(s, t[0], t[1], t[2], 0.5f, 1.0f); }, bf);
  Run(
      "SwiGLUBackward bf16, dgate in place", {x, Bf16(Rand({rows, d}, 9)), Bf16(Rand({rows, d}, 10)), out},
      {0, 3}, [](Stream& s, auto& t) { return ops::SwiGLUBackward(s, t[0], t[1], t[2], t[0], t[3]); }, bf);
  // Attention in bf16 on both paths, forward and backward: the gemm path's
  // cuBLAS products run at TF32 here (attn::Tf32ProductsScope), the CPU's at
  // f32; the probabilities' TF32 rounding (2^-11) stays below the outputs'.
  for (attn::AttentionPath path : {attn::AttentionPath::kFused, attn::AttentionPath::kGemm}) {
    const AttentionSettingsRestore restore;
    attn::AttentionSettingsRef().path = path;
    for (int64_t S : {37, 300}) {
      const int64_t B = 2, H = 4, Hkv = 2, hd = S < 100 ? 24 : 64;
      const std::string tag = absl::StrCat(" bf16 (", attn::AttentionPathName(path), ", S ", S, ")");
      attn::AttentionSettingsRef().workspace_bytes = 48 * 2 * B * H * S * static_cast<int64_t>(sizeof(float));
      Tensor q = Bf16(Rand({B, S, H, hd}, 11)), k = Bf16(Rand({B, S, Hkv, hd}, 12)),
             v = Bf16(Rand({B, S, Hkv, hd}, 13));
      const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
      Run(
          "CausalAttention" + tag, {q, k, v, Bf16(Rand({B, S, H, hd}, 14)), Rand({B, H, S}, 15)}, {3, 4},
          [=](Stream& s, auto& t) { return ops::CausalAttention(s, t[0], t[1], t[2], scale, t[3], t[4]); },
          bf);
      Tensor fo = Bf16(Rand({B, S, H, hd}, 16)), fl = Rand({B, H, S}, 17);
      REQUIRE(ops::CausalAttention(Cpu().default_stream(), q, k, v, scale, fo, fl).ok());
      Run(
          "CausalAttentionBackward" + tag,
          {q, k, v, fo, fl, Bf16(Rand({B, S, H, hd}, 18)), Bf16(Rand({B, S, H, hd}, 19)),
           Bf16(Rand({B, S, Hkv, hd}, 20)), Bf16(Rand({B, S, Hkv, hd}, 21))},
          {6, 7, 8},
          [=](Stream& s, auto& t) {
            return ops::CausalAttentionBackward(s, t[0], t[1], t[2], t[3], t[4], scale, t[5], t[6], t[7],
                                                t[8]);
          },
          bf);
    }
  }
  // Weight-gradient GEMM: bf16 operands into an f32 gradient (beta 1); an
  // activation GEMM: bf16 out.
  Tensor a = Bf16(Rand({33, 65}, 16)), b = Bf16(Rand({65, 17}, 17));
  Run(
      "Gemm bf16 -> f32, beta 1", {a, b, Rand({33, 17}, 18)}, {2},
      [](Stream& s, auto& t) { return ops::Gemm(s, t[0], false, t[1], false, t[2], 1.0f, 1.0f); }, bf);
  Run(
      "Gemm bf16 -> bf16", {a, b, Bf16(Rand({33, 17}, 19))}, {2},
      [](Stream& s, auto& t) { return ops::Gemm(s, t[0], false, t[1], false, t[2]); }, bf);
  const std::vector<int64_t> offsets = {0, 0, 3, 60, 60, 67};
  Run(
      "GroupedGemm bf16", {Bf16(Rand({67, 40}, 20)), Bf16(Rand({5, 24, 40}, 21)), Bf16(Rand({67, 24}, 22))},
      {2}, [&](Stream& s, auto& t) { return ops::GroupedGemm(s, t[0], t[1], true, t[2], offsets); }, bf);
  // The cross-entropy gradient of f32 logits into bf16 dlogits (the LM head).
  const int64_t n = 29, vocab = 301;
  Tensor logits = Rand({n, vocab}, 23, -8, 8), lse = Rand({n}, 24);
  REQUIRE(ops::LogSumExp(Cpu().default_stream(), logits, lse).ok());
  std::vector<int32_t> targets(n);
  for (int64_t i = 0; i < n; ++i) targets[i] = static_cast<int32_t>((i * 37) % vocab);
  Run(
      "CrossEntropyBackward f32 -> bf16 dlogits",
      {logits, Ints({n}, targets), lse, Rand({n}, 25), Bf16(Rand({n, vocab}, 26))}, {4},
      [](Stream& s, auto& t) { return ops::CrossEntropyBackward(s, t[0], t[1], t[2], t[3], 0.25f, t[4]); },
      bf);
}

// The fused kernels read and write bf16 themselves (no staging casts, no f32
// copies), with the f32 kernels' arithmetic on the widened operands: a bf16
// call's outputs are the f32 call's rounded once, bit for bit, and lse is the
// same. The gemm path still stages (its row passes are f32).
TEST_CASE("bf16 attention on the fused kernels is the f32 kernels' result rounded once, bit for bit") {
  const AttentionSettingsRestore restore;
  attn::AttentionSettingsRef().path = attn::AttentionPath::kFused;
  // A device bf16 copy of a device f32 tensor (the device Cast: one rounding).
  auto rounded = [](const Tensor& t) {
    auto out = Tensor::Empty(*g_gpu, t.shape(), DType::kBF16, MemoryCategory::kActivations);
    REQUIRE(out.ok());
    REQUIRE(ops::Cast(G(), t, *out).ok());
    return *out;
  };
  auto empty = [](Shape shape, DType dtype) {
    auto out = Tensor::Empty(*g_gpu, shape, dtype, MemoryCategory::kActivations);
    REQUIRE(out.ok());
    REQUIRE(ops::Fill(G(), *out, NAN).ok());  // every element written
    return *out;
  };
  struct Case {
    int64_t B, S, H, Hkv, hd;
  };
  for (const Case c : {Case{2, 37, 4, 2, 24}, Case{1, 130, 2, 1, 64}, Case{1, 1, 2, 2, 8}}) {
    INFO("B " << c.B << ", S " << c.S << ", H " << c.H << "/" << c.Hkv << ", hd " << c.hd);
    Tensor q = Copy(*g_gpu, Bf16(Rand({c.B, c.S, c.H, c.hd}, 91, -3, 3)));
    Tensor k = Copy(*g_gpu, Bf16(Rand({c.B, c.S, c.Hkv, c.hd}, 92, -3, 3)));
    Tensor v = Copy(*g_gpu, Bf16(Rand({c.B, c.S, c.Hkv, c.hd}, 93)));
    Tensor dout = Copy(*g_gpu, Bf16(Rand({c.B, c.S, c.H, c.hd}, 94)));
#if MOE_WITH_CUDA
    CHECK(cuda::NativeAttentionTakes({&q, &k, &v, &dout}));
    attn::AttentionSettingsRef().path = attn::AttentionPath::kGemm;
    CHECK_FALSE(cuda::NativeAttentionTakes({&q, &k, &v, &dout}));
    attn::AttentionSettingsRef().path = attn::AttentionPath::kFused;
#endif
    Tensor q32 = Copy(*g_gpu, ToF32(Copy(Cpu(), q))), k32 = Copy(*g_gpu, ToF32(Copy(Cpu(), k))),
           v32 = Copy(*g_gpu, ToF32(Copy(Cpu(), v))), dout32 = Copy(*g_gpu, ToF32(Copy(Cpu(), dout)));
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.hd));
    const Shape rows{c.B, c.H, c.S};
    Tensor out = empty(q.shape(), DType::kBF16), lse = empty(rows, DType::kF32);
    Tensor out32 = empty(q.shape(), DType::kF32), lse32 = empty(rows, DType::kF32);
    REQUIRE(ops::CausalAttention(G(), q, k, v, scale, out, lse).ok());
    REQUIRE(ops::CausalAttention(G(), q32, k32, v32, scale, out32, lse32).ok());
    CHECK(Bits(out) == Bits(rounded(out32)));
    CHECK(Bits(lse) == Bits(lse32));
    // Backward from the bf16 forward's out and lse, against the f32 kernels
    // on the same values widened.
    Tensor o32 = Copy(*g_gpu, ToF32(Copy(Cpu(), out)));
    Tensor dq = empty(q.shape(), DType::kBF16), dk = empty(k.shape(), DType::kBF16),
           dv = empty(v.shape(), DType::kBF16);
    Tensor dq32 = empty(q.shape(), DType::kF32), dk32 = empty(k.shape(), DType::kF32),
           dv32 = empty(v.shape(), DType::kF32);
    REQUIRE(ops::CausalAttentionBackward(G(), q, k, v, out, lse, scale, dout, dq, dk, dv).ok());
    REQUIRE(ops::CausalAttentionBackward(G(), q32, k32, v32, o32, lse, scale, dout32, dq32, dk32, dv32).ok());
    REQUIRE(G().Synchronize().ok());
    CHECK(Bits(dq) == Bits(rounded(dq32)));
    CHECK(Bits(dk) == Bits(rounded(dk32)));
    CHECK(Bits(dv) == Bits(rounded(dv32)));
  }
}

// MOE_ATTENTION=flash: bf16 attention on tensor cores (cuda_flash_attention.cu)
// against the CPU backend's f32-staged fused kernel. P and dS are rounded to
// bf16 before their products there, so the bound is a bf16 step's, as for the
// other bf16 ops. Every head size the kernels take, sequences that end inside
// a tile and at a tile's end, GQA and plain multi-head.
TEST_CASE("flash attention (bf16 on tensor cores) matches the CPU backend") {
  const AttentionSettingsRestore restore;
  attn::AttentionSettingsRef().path = attn::AttentionPath::kFlash;
  const Tol bf{1e-4, 1e-2};
  struct Case {
    int64_t B, S, H, Hkv, hd;
  };
  for (const Case c : {Case{2, 37, 4, 2, 32}, Case{1, 64, 2, 2, 64}, Case{2, 300, 4, 1, 64},
                       Case{1, 129, 2, 1, 128}, Case{1, 1, 2, 2, 64}}) {
    const std::string tag =
        absl::StrCat(" flash (B ", c.B, ", S ", c.S, ", H ", c.H, "/", c.Hkv, ", hd ", c.hd, ")");
    Tensor q = Bf16(Rand({c.B, c.S, c.H, c.hd}, 71)), k = Bf16(Rand({c.B, c.S, c.Hkv, c.hd}, 72)),
           v = Bf16(Rand({c.B, c.S, c.Hkv, c.hd}, 73));
    Tensor out0 = Bf16(Rand({c.B, c.S, c.H, c.hd}, 74)), lse0 = Rand({c.B, c.H, c.S}, 75);
#if MOE_WITH_CUDA
    {  // the shapes and dtypes reach the flash kernels (not the staged fallback)
      Tensor dq = Copy(*g_gpu, q), dk = Copy(*g_gpu, k), dv = Copy(*g_gpu, v), dout = Copy(*g_gpu, out0);
      CHECK(cuda::FlashAttentionTakes({&dq, &dk, &dv, &dout}));
      Tensor f32 = Copy(*g_gpu, ToF32(q));
      CHECK_FALSE(cuda::FlashAttentionTakes({&f32, &dk, &dv, &dout}));
    }
#endif
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.hd));
    Run(
        "CausalAttention" + tag, {q, k, v, out0, lse0}, {3, 4},
        [=](Stream& s, auto& t) { return ops::CausalAttention(s, t[0], t[1], t[2], scale, t[3], t[4]); }, bf);
    Tensor fo = Bf16(Rand({c.B, c.S, c.H, c.hd}, 76)), fl = Rand({c.B, c.H, c.S}, 77);
    REQUIRE(ops::CausalAttention(Cpu().default_stream(), q, k, v, scale, fo, fl).ok());
    Run(
        "CausalAttentionBackward" + tag,
        {q, k, v, fo, fl, Bf16(Rand({c.B, c.S, c.H, c.hd}, 78)), Bf16(Rand({c.B, c.S, c.H, c.hd}, 79)),
         Bf16(Rand({c.B, c.S, c.Hkv, c.hd}, 80)), Bf16(Rand({c.B, c.S, c.Hkv, c.hd}, 81))},
        {6, 7, 8},
        [=](Stream& s, auto& t) {
          return ops::CausalAttentionBackward(s, t[0], t[1], t[2], t[3], t[4], scale, t[5], t[6], t[7], t[8]);
        },
        bf);
  }
}

TEST_CASE("softmax, losses and routing match the CPU backend") {
  const int64_t rows = 29, cols = 301;
  Tensor x = Rand({rows, cols}, 1, -8, 8), y = Rand({rows, cols}, 2), o = Rand({rows, cols}, 3);
  Run("Softmax", {x, o}, {1}, [](Stream& s, auto& t) { return ops::Softmax(s, t[0], t[1]); });
  Run("SoftmaxBackward", {y, Rand({rows, cols}, 4), o}, {2},
      [](Stream& s, auto& t) { return ops::SoftmaxBackward(s, t[0], t[1], t[2], 2.0f, 1.0f); });
  Run("LogSumExp", {x, Rand({rows}, 5)}, {1},
      [](Stream& s, auto& t) { return ops::LogSumExp(s, t[0], t[1]); });
  std::vector<int32_t> targets(rows);
  for (int64_t i = 0; i < rows; ++i) targets[i] = i % 7 == 3 ? -1 : static_cast<int32_t>((i * 37) % cols);
  Tensor tg = Ints({rows}, targets);
  Run("CrossEntropy", {x, tg, Rand({rows}, 6), Rand({rows}, 7)}, {2, 3},
      [](Stream& s, auto& t) { return ops::CrossEntropy(s, t[0], t[1], t[2], t[3]); });
  Tensor lse = Rand({rows}, 8);
  REQUIRE(ops::LogSumExp(Cpu().default_stream(), x, lse).ok());
  Run("CrossEntropyBackward", {x, tg, lse, Rand({rows}, 9), o}, {4},
      [](Stream& s, auto& t) { return ops::CrossEntropyBackward(s, t[0], t[1], t[2], t[3], 0.25f, t[4]); });
  // Router top-k with ties (ties go to the lower index).
  std::vector<float> logits(rows * 8);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = static_cast<float>((i * 7) % 5) * 0.5f;
  auto lt = Tensor::FromHost(Cpu(), {rows, 8}, DType::kF32, logits.data(), logits.size() * 4,
                             MemoryCategory::kActivations);
  REQUIRE(lt.ok());
  for (int k : {1, 2, 8})
    Run(absl::StrCat("TopK k ", k),
        {*lt, Rand({rows, k}, 10), Ints({rows, k}, std::vector<int32_t>(rows * k))}, {1, 2},
        [k](Stream& s, auto& t) { return ops::TopK(s, t[0], k, t[1], t[2]); });
  // The router: softmax and sigmoid scores, the choice with ties, the expert
  // bias and groups, forced selection; its backward with per-sequence aux rows.
  const int64_t T = 37, E = 16;
  std::vector<float> z(T * E);
  for (size_t i = 0; i < z.size(); ++i) z[i] = static_cast<float>((i * 7919) % 61) * 0.1f - 3.0f;
  for (int64_t e = 0; e < E; ++e) z[e] = 0.5f;  // a row of ties
  auto zt =
      Tensor::FromHost(Cpu(), {T, E}, DType::kF32, z.data(), z.size() * 4, MemoryCategory::kActivations);
  REQUIRE(zt.ok());
  const Tensor bias = Rand({E}, 11, -0.3f, 0.3f);
  std::vector<int32_t> forced(T * 4);
  for (size_t i = 0; i < forced.size(); ++i) forced[i] = static_cast<int32_t>((i * 5) % E);
  for (bool sigmoid : {false, true}) {
    for (int variant = 0; variant < 3; ++variant) {  // plain; bias and 4 groups of which 2; forced
      RouterChoice choice;
      choice.sigmoid = sigmoid;
      choice.top_k = 4;
      choice.num_groups = variant == 1 ? 4 : 1;
      choice.group_topk = variant == 1 ? 2 : 0;
      const Tensor b = variant == 1 ? bias : Tensor(), sel = variant == 2 ? Ints({T, 4}, forced) : Tensor();
      Run(absl::StrCat("RouterScores sigmoid ", sigmoid, " variant ", variant),
          {*zt, b, sel, Rand({T, E}, 12), sigmoid ? Rand({T, E}, 13) : Tensor(), Rand({T}, 14),
           Ints({T, 4}, std::vector<int32_t>(T * 4)), Rand({T, 4}, 15)},
          {3, 5, 6, 7}, [choice, sigmoid](Stream& s, auto& t) {
            return ops::RouterScores(s, t[0], t[1], t[2], choice, t[3], sigmoid ? t[4] : Tensor(), t[5], t[6],
                                     t[7]);
          });
    }
    Tensor scores = Rand({T, E}, 16, 0.01f, 1.0f), lse_r = Rand({T}, 17);
    Run(absl::StrCat("RouterScoresBackward sigmoid ", sigmoid),
        {scores, sigmoid ? *zt : Tensor(), lse_r, Rand({T, E}, 18), Rand({T, E}, 19), Rand({T, E}, 20)}, {5},
        [sigmoid](Stream& s, auto& t) {
          return ops::RouterScoresBackward(s, t[0], t[1], t[2], t[3], t[4], sigmoid, 0.3f, t[5]);
        });
  }
}

// The list forms run many tensors a launch (kMaxListTensors, cuda_kernels.h);
// each element must come out as its one-tensor op's, bit for bit: sizes
// from empty to several reduction blocks, more tensors than one launch
// takes, some with a bf16 copy and each with its own weight decay.
TEST_CASE("the list forms of Fill, ReduceSumSquares and AdamW equal their one-tensor ops, bit for bit") {
  const int64_t sizes[] = {0, 1, 31, 257, 4097, 20000, 70001};
  const int count = 75;
  std::vector<Tensor> xs;
  std::vector<AdamWTarget> list, one;
  for (int i = 0; i < count; ++i) {
    const int64_t n = sizes[i % 7];
    const uint32_t seed = 1000 + 10 * i;
    xs.push_back(Copy(*g_gpu, Rand({n}, seed, -3, 3)));
    AdamWTarget a;
    a.param = Copy(*g_gpu, Rand({n}, seed + 1));
    a.grad = Copy(*g_gpu, Rand({n}, seed + 2));
    a.exp_avg = Copy(*g_gpu, Rand({n}, seed + 3));
    a.exp_avg_sq = Copy(*g_gpu, Rand({n}, seed + 4, 0.0f, 1.0f));
    if (i % 3 == 0) a.param_bf16 = Copy(*g_gpu, Bf16(Rand({n}, seed + 5)));
    a.weight_decay = i % 2 == 0 ? 0.1f : 0.0f;
    AdamWTarget b = a;
    b.param = Copy(*g_gpu, a.param);
    b.exp_avg = Copy(*g_gpu, a.exp_avg);
    b.exp_avg_sq = Copy(*g_gpu, a.exp_avg_sq);
    if (a.param_bf16.defined()) b.param_bf16 = Copy(*g_gpu, a.param_bf16);
    list.push_back(a);
    one.push_back(b);
  }
  SECTION("ReduceSumSquares") {
    auto listed = Tensor::Empty(*g_gpu, {count}, DType::kF32, MemoryCategory::kOther);
    auto single = Tensor::Empty(*g_gpu, {count}, DType::kF32, MemoryCategory::kOther);
    REQUIRE((listed.ok() && single.ok()));
    REQUIRE(ops::Fill(G(), *listed, NAN).ok());  // every element written
    REQUIRE(ops::ReduceSumSquares(G(), xs, *listed).ok());
    for (int i = 0; i < count; ++i) REQUIRE(ops::ReduceSumSquares(G(), xs[i], single->Slice(i, i + 1)).ok());
    REQUIRE(G().Synchronize().ok());
    CHECK(Bits(*listed) == Bits(*single));
    CHECK(Copy(Cpu(), *listed).data<float>()[0] == 0.0f);  // the empty tensor's sum
  }
  SECTION("AdamW") {
    for (int64_t step : {1, 2}) {
      REQUIRE(ops::AdamW(G(), list, 1e-3f, 0.9f, 0.95f, 1e-8f, step, 0.625f).ok());
      for (const AdamWTarget& b : one) {
        REQUIRE(ops::AdamW(G(), b.param, b.grad, b.exp_avg, b.exp_avg_sq, 1e-3f, 0.9f, 0.95f, 1e-8f,
                           b.weight_decay, step, b.param_bf16, 0.625f)
                    .ok());
      }
    }
    REQUIRE(G().Synchronize().ok());
    for (int i = 0; i < count; ++i) {
      INFO("target " << i << " of " << list[i].param.numel() << " elements");
      CHECK(Bits(list[i].param) == Bits(one[i].param));
      CHECK(Bits(list[i].exp_avg) == Bits(one[i].exp_avg));
      CHECK(Bits(list[i].exp_avg_sq) == Bits(one[i].exp_avg_sq));
      if (list[i].param_bf16.defined()) CHECK(Bits(list[i].param_bf16) == Bits(one[i].param_bf16));
    }
    // And against the CPU backend's one-tensor op.
    const AdamWTarget& a = list[6];  // 70001 elements, a bf16 copy
    Tensor p = Rand({70001}, 1061), g = Rand({70001}, 1062), m = Rand({70001}, 1063);
    Tensor v = Rand({70001}, 1064, 0.0f, 1.0f);
    for (int64_t step : {1, 2})
      REQUIRE(ops::AdamW(Cpu().default_stream(), p, g, m, v, 1e-3f, 0.9f, 0.95f, 1e-8f, a.weight_decay, step,
                         Tensor(), 0.625f)
                  .ok());
    Expect("AdamW list vs cpu", p, a.param, Tol{});
  }
  SECTION("Fill") {
    std::vector<Tensor> ts;
    for (int i = 0; i < count; ++i)
      ts.push_back(i % 5 == 0 ? Copy(*g_gpu, Bf16(Rand({sizes[i % 7]}, 7 * i))) : Copy(*g_gpu, xs[i]));
    REQUIRE(ops::Fill(G(), ts, 0.5).ok());
    REQUIRE(G().Synchronize().ok());
    for (int i = 0; i < count; ++i) {
      const Tensor h = ToF32(Copy(Cpu(), ts[i]));
      int64_t wrong = 0;
      for (int64_t j = 0; j < h.numel(); ++j) wrong += h.data<float>()[j] == 0.5f ? 0 : 1;
      CHECK(wrong == 0);
    }
  }
}

TEST_CASE("permute, un-permute, combine gradient, init and AdamW match the CPU backend") {
  const int64_t n = 23, m = 41, d = 67;
  std::vector<int32_t> idx(m);
  for (int64_t i = 0; i < m; ++i) idx[i] = static_cast<int32_t>((i * 5) % 7);  // repeated rows: skew
  Tensor index = Ints({m}, idx), src = Rand({n, d}, 1);
  Run("GatherRows", {src, index, Rand({m, d}, 2)}, {2},
      [](Stream& s, auto& t) { return ops::GatherRows(s, t[0], t[1], t[2]); });
  Run(  // one f32 product per element on both backends: exact
      "GatherRows weighted", {src, index, Rand({m, d}, 2), Rand({m}, 8)}, {2},
      [](Stream& s, auto& t) { return ops::GatherRows(s, t[0], t[1], t[2], t[3]); }, Tol{0, 0});
  Run("ScatterAddRows", {Rand({m, d}, 3), index, Rand({n, d}, 4), Rand({m}, 5)}, {2},
      [](Stream& s, auto& t) { return ops::ScatterAddRows(s, t[0], t[1], t[2], t[3]); });
  Run("ScatterAddRows unweighted", {Rand({m, d}, 3), index, Rand({n, d}, 4)}, {2},
      [](Stream& s, auto& t) { return ops::ScatterAddRows(s, t[0], t[1], t[2]); });
  Run("GatherRowDot", {src, index, Rand({m, d}, 6), Rand({m}, 7)}, {3},
      [](Stream& s, auto& t) { return ops::GatherRowDot(s, t[0], t[1], t[2], t[3], 0.5f, 1.0f); });
  // The scatter-add sorts its sources by destination (stable) and gives each
  // destination row a block: many rows without a source, skewed ones with
  // hundreds, d = 1 (the combine weights' gradient) and a column count that
  // is not a multiple of the block; the CPU's i order and unfused arithmetic
  // make it exact (bit for bit).
  {
    const int64_t rows = 1000, srcs = 3000;
    std::vector<int32_t> skew(srcs);
    for (int64_t i = 0; i < srcs; ++i) skew[i] = static_cast<int32_t>(i % 3 == 0 ? 7 : (i * 131) % 600);
    Tensor sk = Ints({srcs}, skew);
    for (int64_t cols : {1, 33, 257})
      Run(
          absl::StrCat("ScatterAddRows skewed, d ", cols),
          {Rand({srcs, cols}, 60), sk, Rand({rows, cols}, 61), Rand({srcs}, 62)}, {2},
          [](Stream& s, auto& t) { return ops::ScatterAddRows(s, t[0], t[1], t[2], t[3]); }, Tol{0, 0});
    // Overwriting a fresh buffer: dst starts as NaN, which neither backend
    // reads; the 393 rows without a source come out 0 on both (exact).
    const auto overwrite = [](Stream& s, auto& t) {
      return ops::ScatterAddRows(s, t[0], t[1], t[2], t[3], ScatterMode::kOverwrite);
    };
    for (int64_t cols : {1, 33})
      Run(absl::StrCat("ScatterAddRows overwrite, d ", cols),
          {Rand({srcs, cols}, 80), sk, Nans({rows, cols}), Rand({srcs}, 81)}, {2}, overwrite, Tol{0, 0});
    Run("ScatterAddRows overwrite bf16",
        {Bf16(Rand({srcs, 33}, 82)), sk, Bf16(Nans({rows, 33})), Rand({srcs}, 83)}, {2}, overwrite,
        Tol{0, 0});
    Run("ScatterAddRows overwrite, no sources",
        {Rand({0, 33}, 84), Ints({0}, {}), Nans({rows, 33}), Tensor()}, {2}, overwrite, Tol{0, 0});
    // With the order made on the host: one launch, no sort; the same bits.
    auto order = ops::ScatterRowOrder(skew, rows);
    REQUIRE(order.ok());
    const Tensor by_row = Ints({rows + 1 + srcs}, *order);
    for (ScatterMode mode : {ScatterMode::kAccumulate, ScatterMode::kOverwrite})
      for (int64_t cols : {1, 33, 257})
        Run(
            absl::StrCat("ScatterAddRows by_row, d ", cols,
                         mode == ScatterMode::kOverwrite ? ", overwrite" : ""),
            {Rand({srcs, cols}, 85), sk, Rand({rows, cols}, 86), Rand({srcs}, 87), by_row}, {2},
            [mode](Stream& s, auto& t) { return ops::ScatterAddRows(s, t[0], t[1], t[2], t[3], mode, t[4]); },
            Tol{0, 0});
    Run(
        "ScatterAddRows by_row bf16", {Bf16(Rand({srcs, 33}, 88)), sk, Bf16(Rand({rows, 33}, 89)), by_row},
        {2},
        [](Stream& s, auto& t) {
          return ops::ScatterAddRows(s, t[0], t[1], t[2], Tensor(), ScatterMode::kAccumulate, t[3]);
        },
        Tol{0, 0});
  }
  // bf16 rows, read and written natively (stage_rows = false): the f32 sum
  // of each destination's sources is rounded once.
  const Tol bf{1e-4, 1e-2};
  Run(
      "ScatterAddRows bf16 into bf16", {Bf16(Rand({m, d}, 63)), index, Bf16(Rand({n, d}, 64)), Rand({m}, 65)},
      {2}, [](Stream& s, auto& t) { return ops::ScatterAddRows(s, t[0], t[1], t[2], t[3]); }, bf);
  Run(
      "ScatterAddRows bf16 into f32", {Bf16(Rand({m, d}, 66)), index, Rand({n, d}, 67)}, {2},
      [](Stream& s, auto& t) { return ops::ScatterAddRows(s, t[0], t[1], t[2]); }, bf);
  Run(  // the product rounded once on both backends: exact
      "GatherRows weighted bf16", {Bf16(src), index, Bf16(Rand({m, d}, 70)), Rand({m}, 71)}, {2},
      [](Stream& s, auto& t) { return ops::GatherRows(s, t[0], t[1], t[2], t[3]); }, Tol{0, 0});
  Run(
      "GatherRows weighted bf16 into f32", {Bf16(src), index, Rand({m, d}, 72), Rand({m}, 73)}, {2},
      [](Stream& s, auto& t) { return ops::GatherRows(s, t[0], t[1], t[2], t[3]); }, Tol{0, 0});
  Run(
      "GatherRowDot bf16", {Bf16(src), index, Bf16(Rand({m, d}, 68)), Rand({m}, 69)}, {3},
      [](Stream& s, auto& t) { return ops::GatherRowDot(s, t[0], t[1], t[2], t[3], 2.0f, 0.0f); }, bf);
  const Shape global{10, 12, 7};
  const std::vector<int64_t> offsets = {3, 5, 0};
  Run("InitNormal box", {Rand({4, 6, 7}, 8)}, {0}, [&](Stream& s, auto& t) {
    return ops::InitNormal(s, t[0], 1234, "layers.0.mlp.w1", global, offsets, 0.02f);
  });
  for (int64_t step : {1, 7})
    Run(absl::StrCat("AdamW step ", step),
        {Rand({1001}, 9), Rand({1001}, 10), Rand({1001}, 11), Rand({1001}, 12, 0.0f, 1.0f)}, {0, 2, 3},
        [step](Stream& s, auto& t) {
          return ops::AdamW(s, t[0], t[1], t[2], t[3], 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, step);
        });
  // With the bf16 compute copy written in the same pass (train.precision bf16).
  Run(
      "AdamW with the bf16 copy",
      {Rand({1001}, 9), Rand({1001}, 10), Rand({1001}, 11), Rand({1001}, 12, 0.0f, 1.0f),
       Bf16(Rand({1001}, 13))},
      {0, 2, 3, 4},
      [](Stream& s, auto& t) {
        return ops::AdamW(s, t[0], t[1], t[2], t[3], 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 2, t[4]);
      },
      Tol{1e-9, 1.0 / 128});
  Run(
      "AdamW with grad_scale",
      {Rand({1001}, 9), Rand({1001}, 10), Rand({1001}, 11), Rand({1001}, 12, 0.0f, 1.0f),
       Bf16(Rand({1001}, 13))},
      {0, 1, 2, 3, 4},
      [](Stream& s, auto& t) {
        return ops::AdamW(s, t[0], t[1], t[2], t[3], 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 3, t[4], 0.25f);
      },
      Tol{1e-9, 1.0 / 128});
  {
    // On the device the copy is the updated master rounded, bit for bit: what
    // a Cast after the update (the refresh it replaces) gives.
    const int64_t n = 70001;
    Tensor p = Copy(*g_gpu, Rand({n}, 14)), g = Copy(*g_gpu, Rand({n}, 15));
    Tensor m = Copy(*g_gpu, Rand({n}, 16)), v = Copy(*g_gpu, Rand({n}, 17, 0.0f, 1.0f));
    Tensor fused = Copy(*g_gpu, Bf16(Rand({n}, 18))), cast = Copy(*g_gpu, Bf16(Rand({n}, 19)));
    REQUIRE(ops::AdamW(G(), p, g, m, v, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 5, fused).ok());
    REQUIRE(ops::Cast(G(), p, cast).ok());
    REQUIRE(G().Synchronize().ok());
    const Tensor a = Copy(Cpu(), fused), b = Copy(Cpu(), cast);
    CHECK(std::memcmp(a.raw_data(), b.raw_data(), a.nbytes()) == 0);
  }
}

TEST_CASE("a bad index is reported by the stream's Synchronize") {
  Tensor src = Copy(*g_gpu, Rand({5, 3}, 1)), dst = Copy(*g_gpu, Rand({2, 3}, 2));
  Tensor index = Copy(*g_gpu, Ints({2}, {1, 9}));
  REQUIRE(ops::GatherRows(G(), src, index, dst).ok());  // enqueued
  absl::Status st = G().Synchronize();
  INFO(st.message());
  CHECK(st.code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(st.message()).find("index[1] = 9") != std::string::npos);
  CHECK(G().Synchronize().ok());  // reported once
  Tensor weight = Copy(*g_gpu, Rand({2}, 6));
  REQUIRE(ops::GatherRows(G(), src, index, dst, weight).ok());  // the weighted gather too
  st = G().Synchronize();
  INFO(st.message());
  CHECK(std::string(st.message()).find("index[1] = 9") != std::string::npos);
  // The scatter-add checks its indices in parallel and reports the first bad one.
  Tensor rows = Copy(*g_gpu, Rand({6, 3}, 3));
  Tensor bad = Copy(*g_gpu, Ints({6}, {1, 0, 8, 1, -2, 11}));
  REQUIRE(ops::ScatterAddRows(G(), rows, bad, dst).ok());
  st = G().Synchronize();
  INFO(st.message());
  CHECK(st.code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(st.message()).find("index[2] = 8") != std::string::npos);
  CHECK(G().Synchronize().ok());
  // Rows of no columns (as matrices, no rows either) are not sorted nor added,
  // and every index is still checked, on the launcher's other path.
  Tensor empty_rows = Copy(*g_gpu, Rand({6, 0}, 4)), empty_dst = Copy(*g_gpu, Rand({2, 0}, 5));
  REQUIRE(ops::ScatterAddRows(G(), empty_rows, bad, empty_dst).ok());
  st = G().Synchronize();
  INFO(st.message());
  CHECK(std::string(st.message()).find("index[0] = 1 is outside [0, 0)") != std::string::npos);
  // An order made on the host that does not match the index: its rows are
  // checked on the device and the entry named (a source of another row here).
  const std::vector<int32_t> good = {1, 0, 1, 1, 0, 1};
  auto order = ops::ScatterRowOrder(good, 2);  // offsets 0 2 6, then 1 4 | 0 2 3 5
  REQUIRE(order.ok());
  std::vector<int32_t> wrong = *order;
  wrong[6] = 1;  // row 1's second source (still ascending), but index[1] = 0
  REQUIRE(ops::ScatterAddRows(G(), rows, Copy(*g_gpu, Ints({6}, good)), dst, Tensor(),
                              ScatterMode::kAccumulate, Copy(*g_gpu, Ints({9}, wrong)))
              .ok());
  st = G().Synchronize();
  INFO(st.message());
  CHECK(st.code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(st.message()).find("by_row[6] = 1 does not match index") != std::string::npos);
  CHECK(G().Synchronize().ok());
  CHECK(G().Synchronize().ok());
}

TEST_CASE("streams, events, host functions and memory accounting on the GPU") {
  auto side = g_gpu->CreateStream(StreamMode::kWorker);
  REQUIRE(side.ok());
  auto e0 = g_gpu->CreateEvent(), e1 = g_gpu->CreateEvent();
  REQUIRE((e0.ok() && e1.ok()));
  Tensor big = Copy(*g_gpu, Rand({1 << 20}, 1)), sum = Copy(*g_gpu, Rand({1}, 2));
  REQUIRE((*side)->Record(**e0).ok());
  REQUIRE(ops::ReduceSumSquares(**side, big, sum).ok());
  REQUIRE((*side)->Record(**e1).ok());
  bool ran = false;
  REQUIRE((*side)
              ->LaunchHostFunc([&ran] {
                ran = true;
                return absl::OkStatus();
              })
              .ok());
  REQUIRE(G().Wait(**e1).ok());
  Tensor copy = Copy(Cpu(), sum);  // on G: ordered after the side stream's reduction
  REQUIRE((*side)->Synchronize().ok());
  CHECK(ran);
  auto ms = (*e1)->ElapsedMsSince(**e0);
  REQUIRE(ms.ok());
  CHECK(*ms >= 0.0);
  REQUIRE((*side)->LaunchHostFunc([] { return absl::InternalError("host function failed"); }).ok());
  CHECK((*side)->Synchronize().code() == absl::StatusCode::kInternal);
  const int64_t live = g_gpu->memory().Stats(MemoryCategory::kOptimizer).live_bytes;
  {
    auto t = Tensor::Zeros(*g_gpu, {1000}, DType::kF32, MemoryCategory::kOptimizer);
    REQUIRE(t.ok());
    CHECK(g_gpu->memory().Stats(MemoryCategory::kOptimizer).live_bytes == live + 4000);
    Tensor h = Copy(Cpu(), *t);
    CHECK(h.data<float>()[999] == 0.0f);
  }
  CHECK(g_gpu->memory().Stats(MemoryCategory::kOptimizer).live_bytes == live);
}

TEST_CASE("host gates hold a stream with no host thread waiting, in order, and carry errors") {
  auto side = g_gpu->CreateStream(StreamMode::kWorker);
  REQUIRE(side.ok());
  auto done = g_gpu->CreateEvent();
  REQUIRE(done.ok());
  Tensor big = Copy(*g_gpu, Rand({1 << 16}, 4)), sum = Copy(*g_gpu, Rand({1}, 5));
  auto first = std::make_shared<HostGate>(), second = std::make_shared<HostGate>();
  REQUIRE((*side)->WaitHostGate(first).ok());
  REQUIRE((*side)->WaitHostGate(second).ok());
  REQUIRE(ops::ReduceSumSquares(**side, big, sum).ok());
  REQUIRE((*side)->Record(**done).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK_FALSE((*done)->Query());
  second->Open(absl::OkStatus());  // the later gate alone does not release the stream
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK_FALSE((*done)->Query());
  first->Open(absl::OkStatus());
  REQUIRE((*side)->Synchronize().ok());
  CHECK((*done)->Query());
  Tensor host_big = Copy(Cpu(), big), host_sum = Copy(Cpu(), sum);
  double expect = 0;
  for (int64_t i = 0; i < host_big.numel(); ++i)
    expect += double(host_big.data<float>()[i]) * host_big.data<float>()[i];
  CHECK(std::abs(host_sum.data<float>()[0] - expect) <= 1e-5 * expect);
  // An already open gate does not hold the stream; a gate opened with an
  // error releases it and the stream reports the error.
  auto open = std::make_shared<HostGate>();
  open->Open(absl::OkStatus());
  REQUIRE((*side)->WaitHostGate(open).ok());
  auto failed = std::make_shared<HostGate>();
  REQUIRE((*side)->WaitHostGate(failed).ok());
  failed->Open(absl::UnavailableError("peer rank 3 failed"));
  absl::Status st = (*side)->Synchronize();
  CHECK(st.code() == absl::StatusCode::kUnavailable);
  CHECK((*side)->Synchronize().ok());  // reported once
  // A host function must not wait: the waits refuse there, and say what to use.
  REQUIRE((*side)->LaunchHostFunc([&] { return G().Synchronize(); }).ok());
  st = (*side)->Synchronize();
  INFO(st.message());
  CHECK(st.code() == absl::StatusCode::kFailedPrecondition);
  CHECK(std::string(st.message()).find("WaitHostGate") != std::string::npos);
}

TEST_CASE(
    "page-locked host memory: counted on the CPU, copies into it do not wait, freed off device threads") {
  const MemoryStats before = Cpu().memory().Stats(MemoryCategory::kCommunication);
  auto side = g_gpu->CreateStream(StreamMode::kWorker);
  REQUIRE(side.ok());
  Tensor src = Copy(*g_gpu, Rand({4096}, 6));
  const int64_t gpu_live = g_gpu->memory().Total().live_bytes;
  {
    auto buffer = g_gpu->AllocatePinnedHost(4096 * 4, MemoryCategory::kCommunication);
    REQUIRE(buffer.ok());
    CHECK((*buffer)->device().is_cpu());
    CHECK((*buffer)->host_visible());
    CHECK(Cpu().memory().Stats(MemoryCategory::kCommunication).live_bytes == before.live_bytes + 4096 * 4);
    CHECK(g_gpu->memory().Total().live_bytes == gpu_live);
    auto host = Tensor::FromBuffer(*buffer, 0, Shape{4096}, DType::kF32);
    REQUIRE(host.ok());
    std::fill(host->data<float>(), host->data<float>() + 4096, -1.0f);
    // The copy is enqueued behind a closed gate and returns at once; into
    // pageable memory CUDA copies synchronously, so the call would return
    // only once the gate opened.
    auto gate = std::make_shared<HostGate>();
    REQUIRE((*side)->WaitHostGate(gate).ok());
    absl::Status copied;
    float before_gate = 0;
    CHECK(ReturnsBehindGate(*gate, [&] {
      copied = ops::Copy(**side, src, *host);
      before_gate = host->data<float>()[0];  // the gate is still closed
    }));
    CHECK(before_gate == -1.0f);
    REQUIRE(copied.ok());
    REQUIRE((*side)->Synchronize().ok());
    Tensor want = Copy(Cpu(), src);
    int mismatches = 0;
    for (int i = 0; i < 4096; ++i) mismatches += host->data<float>()[i] != want.data<float>()[i];
    CHECK(mismatches == 0);
  }
  CHECK(Cpu().memory().Stats(MemoryCategory::kCommunication).live_bytes == before.live_bytes);
  // Refused in a host function (allocating may wait for the device, which
  // waits for the host function); a buffer whose last reference dies there is
  // freed later, not in it (the emulation aborts on cudaFreeHost there).
  auto kept = g_gpu->AllocatePinnedHost(64, MemoryCategory::kOther);
  REQUIRE(kept.ok());
  std::shared_ptr<Buffer> held = std::move(*kept);
  absl::Status in_host_function;
  REQUIRE((*side)
              ->LaunchHostFunc([&] {
                in_host_function = g_gpu->AllocatePinnedHost(64, MemoryCategory::kOther).status();
                held.reset();
                return absl::OkStatus();
              })
              .ok());
  REQUIRE((*side)->Synchronize().ok());
  INFO(in_host_function.message());
  CHECK(in_host_function.code() == absl::StatusCode::kFailedPrecondition);
  CHECK(held == nullptr);
  CHECK(g_gpu->AllocatePinnedHost(8, MemoryCategory::kOther).ok());  // frees the deferred one first
}

TEST_CASE(
    "uploads through the stream's page-locked ring do not wait for the stream and never overwrite a pending "
    "copy") {
  cuda::SetUploadRingBytesForTesting(4096);  // 4 slots of 1 KiB: the uploads below wrap it 4 times
  auto side = g_gpu->CreateStream(StreamMode::kWorker);
  REQUIRE(side.ok());
  constexpr int kUploads = 16, kFloats = 256;  // 1 KiB each
  auto dev = Tensor::Zeros(*g_gpu, {kUploads, kFloats}, DType::kF32, MemoryCategory::kOther);
  REQUIRE(dev.ok());
  std::vector<float> host(kFloats);
  auto upload = [&](int i) {
    for (int k = 0; k < kFloats; ++k) host[k] = static_cast<float>(1000 * i + k);  // reused at once
    return (*side)->CopyFromHost(dev->Slice(i, i + 1).raw_data(), host.data(), kFloats * sizeof(float));
  };
  // The first upload makes the ring (page-locking may wait for the device).
  REQUIRE(upload(0).ok());
  REQUIRE((*side)->Synchronize().ok());
  // Behind a closed gate the next four (the whole ring) return at once; from
  // pageable memory CUDA may wait for the stream, and these would hang.
  auto gate = std::make_shared<HostGate>();
  REQUIRE((*side)->WaitHostGate(gate).ok());
  absl::Status first;
  CHECK(ReturnsBehindGate(*gate, [&] {
    for (int i = 0; i < 4 && first.ok(); ++i) first = upload(i);
  }));
  REQUIRE(first.ok());
  // The next twelve reuse the slots, each only once the copy that read it
  // ran: behind another closed gate the ring is full, so they wait for it.
  auto gate2 = std::make_shared<HostGate>();
  REQUIRE((*side)->WaitHostGate(gate2).ok());
  std::atomic<bool> returned2{false};
  absl::Status rest;
  std::thread enqueue2([&] {
    for (int i = 4; i < kUploads && rest.ok(); ++i) rest = upload(i);
    returned2 = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  const bool waited_for_ring = !returned2;
  gate2->Open(absl::OkStatus());
  enqueue2.join();
  CHECK(waited_for_ring);
  REQUIRE(rest.ok());
  REQUIRE((*side)->Synchronize().ok());
  Tensor got = Copy(Cpu(), *dev);
  int wrong = 0;
  for (int i = 0; i < kUploads; ++i)
    for (int k = 0; k < kFloats; ++k)
      wrong += got.data<float>()[i * kFloats + k] != static_cast<float>(1000 * i + k);
  CHECK(wrong == 0);
  cuda::SetUploadRingBytesForTesting(0);
}

TEST_CASE("FromHostOn and ZerosOn fill device memory in stream order without a host wait") {
  auto side = g_gpu->CreateStream(StreamMode::kWorker);
  REQUIRE(side.ok());
  std::vector<int32_t> values(1000);
  for (int i = 0; i < 1000; ++i) values[i] = 7 * i - 3;
  {
    // The stream's upload ring, and cached blocks of both sizes (a fresh
    // cudaMalloc may wait for the device).
    REQUIRE(Tensor::FromHostOn(**side, Shape{1000}, DType::kI32, values.data(), 4000, MemoryCategory::kOther)
                .ok());
    REQUIRE(Tensor::ZerosOn(**side, Shape{5, 7}, DType::kF32, MemoryCategory::kOther).ok());
    REQUIRE((*side)->Synchronize().ok());
  }
  REQUIRE(
      Tensor::Empty(*g_gpu, Shape{1}, DType::kF32, MemoryCategory::kOther).ok());  // fences the freed blocks
  REQUIRE((*side)->Synchronize().ok());
  REQUIRE(G().Synchronize().ok());
  auto gate = std::make_shared<HostGate>();
  REQUIRE((*side)->WaitHostGate(gate).ok());
  const uint64_t syncs = HostSyncCount();
  absl::StatusOr<Tensor> ints = absl::UnknownError("not run"), zeros = absl::UnknownError("not run");
  CHECK(ReturnsBehindGate(*gate, [&] {
    ints = Tensor::FromHostOn(**side, Shape{1000}, DType::kI32, values.data(), 4000, MemoryCategory::kOther);
    values.assign(1000, -1);  // reused at once
    zeros = Tensor::ZerosOn(**side, Shape{5, 7}, DType::kF32, MemoryCategory::kOther);
  }));
  CHECK(HostSyncCount() == syncs);
  REQUIRE(ints.ok());
  REQUIRE(zeros.ok());
  REQUIRE((*side)->Synchronize().ok());
  Tensor got = Copy(Cpu(), *ints), got_zeros = Copy(Cpu(), *zeros);
  int wrong = 0;
  for (int i = 0; i < 1000; ++i) wrong += got.data<int32_t>()[i] != 7 * i - 3;
  for (int i = 0; i < 35; ++i) wrong += got_zeros.data<float>()[i] != 0.0f;
  CHECK(wrong == 0);
}

}  // namespace
}  // namespace moe

int main(int argc, char** argv) {
  auto gpu = moe::GetBackend(moe::Device::Cuda(0));
  if (!gpu.ok()) {
    std::printf("skipped: %s\n", std::string(gpu.status().message()).c_str());
    return 77;
  }
  moe::g_gpu = *gpu;
  return Catch::Session().run(argc, argv);
}
