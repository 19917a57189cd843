// moe-bench attention: causal attention forward + backward on its paths
// (runtime/core/attention_gemm.h), the backend's fused kernel and the chunked
// GEMM driver, and on cuda with precision=bf16 the tensor-core flash kernel,
// interleaved in one process.
//
//   build/bin/moe-bench attention [device=cpu|cuda] [batch=] [seq=] [heads=] [kv_heads=]
//       [head_dim=] [precision=fp32|bf16] [workspace_mb=256] [iters=3] [--json]
//
// precision=bf16: q, k, v, out, dout and the gradients are bf16 (lse f32),
// run as train.precision bf16 runs them (bf16_staging.h: f32 copies around
// the f32 kernels; on CUDA the gemm path's products at TF32, and the flash
// path on the bf16 tensors themselves).
// Defaults: on cuda docs/design.md's benchmark shape (batch 4, seq 2048, 16
// heads over 4 KV heads, head_dim 64); on cpu batch 2, seq 512, 8 over 2, 64.
// Each iteration times forward, then backward, each from enqueue to the
// stream's Synchronize (launches included). Figures: the median ms of each
// path and phase, TFLOP/s of the causal FLOPs (forward 2 B H S^2 hd: QK^T and
// PV over the causal half; backward 2.5 times that), each other path's largest
// difference from the fused one (relative to max |fused|, out and dq), and
// ratio gemm_speedup = fused ms / gemm ms, forward + backward (flash_speedup
// likewise, as a figure).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "launch/bench/bench.h"
#include "runtime/core/attention_gemm.h"
#include "runtime/core/backend.h"
#include "runtime/core/device_select.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"
#include "runtime/core/tensor.h"

namespace moe::bench {
namespace {

absl::StatusOr<Tensor> Uniform(Backend& b, Shape shape, uint64_t seed, DType dtype) {
  ASSIGN_OR_RETURN(Tensor t, Tensor::Empty(b, shape, DType::kF32, MemoryCategory::kActivations));
  RETURN_IF_ERROR(ops::InitNormal(b.default_stream(), t, seed, "bench", 1.0f));
  if (dtype == DType::kF32) return t;
  ASSIGN_OR_RETURN(Tensor c, Tensor::Empty(b, shape, dtype, MemoryCategory::kActivations));
  RETURN_IF_ERROR(ops::Cast(b.default_stream(), t, c));
  return c;
}

// A host copy of t's values as f32 (through the stream of t's backend).
absl::StatusOr<std::vector<float>> Host(Stream& s, const Tensor& t) {
  ASSIGN_OR_RETURN(Backend * cpu, GetBackend(Device::Cpu()));
  ASSIGN_OR_RETURN(Tensor h, Tensor::Empty(*cpu, t.shape(), t.dtype(), MemoryCategory::kActivations));
  RETURN_IF_ERROR(ops::Copy(s, t, h));
  RETURN_IF_ERROR(s.Synchronize());
  ASSIGN_OR_RETURN(Tensor f, Tensor::Empty(*cpu, t.shape(), DType::kF32, MemoryCategory::kActivations));
  RETURN_IF_ERROR(ops::Cast(cpu->default_stream(), h, f));
  RETURN_IF_ERROR(cpu->default_stream().Synchronize());
  const float* p = f.data<float>();
  return std::vector<float>(p, p + t.numel());
}

// max |a - b| / max |b|.
double RelDiff(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = 0, scale = 1e-30;
  for (size_t i = 0; i < a.size(); ++i) {
    worst = std::max(worst, std::fabs(static_cast<double>(a[i]) - b[i]));
    scale = std::max(scale, std::fabs(static_cast<double>(b[i])));
  }
  return worst / scale;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

absl::Status RunAttention(const Args& args, Reporter& rep) {
  std::string how;
  ASSIGN_OR_RETURN(Device device, ResolveDevice(args.Str("device", "cpu"), &how));
  ASSIGN_OR_RETURN(Backend * be, GetBackend(device));
  Stream& s = be->default_stream();
  const bool gpu = !device.is_cpu();
  const int64_t B = args.Int("batch", gpu ? 4 : 2), S = args.Int("seq", gpu ? 2048 : 512),
                H = args.Int("heads", gpu ? 16 : 8), Hkv = args.Int("kv_heads", gpu ? 4 : 2),
                hd = args.Int("head_dim", 64), iters = std::max<long>(args.Int("iters", 3), 1);
  if (B < 1 || S < 1 || H < 1 || Hkv < 1 || hd < 1 || H % Hkv != 0)
    return absl::InvalidArgumentError(
        "attention: batch, seq, heads, kv_heads, head_dim must be >= 1 and "
        "heads a multiple of kv_heads");
  const std::string precision = args.Str("precision", "fp32");
  if (precision != "fp32" && precision != "bf16")
    return absl::InvalidArgumentError(
        absl::StrCat("attention: precision=", precision, " is not one of fp32, bf16"));
  const DType dt = precision == "bf16" ? DType::kBF16 : DType::kF32;
  attn::AttentionSettings& settings = attn::AttentionSettingsRef();
  const attn::AttentionSettings saved = settings;
  settings.workspace_bytes = static_cast<int64_t>(args.Int("workspace_mb", 256)) << 20;
  ASSIGN_OR_RETURN(Tensor q, Uniform(*be, {B, S, H, hd}, 1, dt));
  ASSIGN_OR_RETURN(Tensor k, Uniform(*be, {B, S, Hkv, hd}, 2, dt));
  ASSIGN_OR_RETURN(Tensor v, Uniform(*be, {B, S, Hkv, hd}, 3, dt));
  ASSIGN_OR_RETURN(Tensor dout, Uniform(*be, {B, S, H, hd}, 4, dt));
  struct Run {
    Tensor out, lse, dq, dk, dv;
    std::vector<double> fwd_ms, bwd_ms;
  };
  std::vector<attn::AttentionPath> paths = {attn::AttentionPath::kFused, attn::AttentionPath::kGemm};
  if (gpu && dt == DType::kBF16) paths.push_back(attn::AttentionPath::kFlash);
  std::vector<Run> runs(paths.size());
  for (Run& r : runs) {
    ASSIGN_OR_RETURN(r.out, Tensor::Empty(*be, {B, S, H, hd}, dt, MemoryCategory::kActivations));
    ASSIGN_OR_RETURN(r.lse, Tensor::Empty(*be, {B, H, S}, DType::kF32, MemoryCategory::kActivations));
    ASSIGN_OR_RETURN(r.dq, Tensor::Empty(*be, {B, S, H, hd}, dt, MemoryCategory::kActivations));
    ASSIGN_OR_RETURN(r.dk, Tensor::Empty(*be, {B, S, Hkv, hd}, dt, MemoryCategory::kActivations));
    ASSIGN_OR_RETURN(r.dv, Tensor::Empty(*be, {B, S, Hkv, hd}, dt, MemoryCategory::kActivations));
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  auto timed = [&](auto fn) -> absl::StatusOr<double> {
    const auto t0 = std::chrono::steady_clock::now();
    RETURN_IF_ERROR(fn());
    RETURN_IF_ERROR(s.Synchronize());
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  };
  absl::Status status;
  for (int64_t it = 0; it <= iters && status.ok(); ++it) {  // iteration 0 warms up
    for (size_t p = 0; p < paths.size() && status.ok(); ++p) {
      settings.path = paths[p];
      Run& r = runs[p];
      absl::StatusOr<double> f = timed([&] { return ops::CausalAttention(s, q, k, v, scale, r.out, r.lse); });
      absl::StatusOr<double> b = f.ok() ? timed([&] {
        return ops::CausalAttentionBackward(s, q, k, v, r.out, r.lse, scale, dout, r.dq, r.dk, r.dv);
      })
                                        : f;
      if (!b.ok()) {
        status = b.status();
        break;
      }
      if (it > 0) {
        r.fwd_ms.push_back(*f);
        r.bwd_ms.push_back(*b);
      }
    }
  }
  settings = saved;
  RETURN_IF_ERROR(status);
  const double fwd_flops = 2.0 * B * H * static_cast<double>(S) * S * hd, bwd_flops = 2.5 * fwd_flops;
  ASSIGN_OR_RETURN(std::vector<float> out_f, Host(s, runs[0].out));
  ASSIGN_OR_RETURN(std::vector<float> dq_f, Host(s, runs[0].dq));
  Measurement m;
  m.params = {
      {"device", how},
      {"batch", absl::StrCat(B)},
      {"seq", absl::StrCat(S)},
      {"heads", absl::StrCat(H, "/", Hkv)},
      {"head_dim", absl::StrCat(hd)},
      {"precision", precision},
      {"chunk", absl::StrCat(attn::ChunkRows(attn::Shape{B, S, H, Hkv, hd},
                                             static_cast<int64_t>(args.Int("workspace_mb", 256)) << 20))}};
  const double fused_ms = Median(runs[0].fwd_ms) + Median(runs[0].bwd_ms);
  for (size_t p = 0; p < paths.size(); ++p) {
    const std::string name(attn::AttentionPathName(paths[p]));
    const double f = Median(runs[p].fwd_ms), b = Median(runs[p].bwd_ms);
    m.figures.push_back({name + "_fwd", f, "ms"});
    m.figures.push_back({name + "_bwd", b, "ms"});
    m.figures.push_back({name + "_tflops", (fwd_flops + bwd_flops) / (f + b) / 1e9, "TFLOP/s"});
    if (p == 0) continue;
    ASSIGN_OR_RETURN(std::vector<float> out_p, Host(s, runs[p].out));
    ASSIGN_OR_RETURN(std::vector<float> dq_p, Host(s, runs[p].dq));
    // "diff_out" / "diff_dq" for the gemm path (the names gpu_check.sh reads), prefixed for the others.
    const std::string prefix = paths[p] == attn::AttentionPath::kGemm ? "" : name + "_";
    m.figures.push_back({prefix + "diff_out", RelDiff(out_p, out_f), ""});
    m.figures.push_back({prefix + "diff_dq", RelDiff(dq_p, dq_f), ""});
    if (paths[p] == attn::AttentionPath::kFlash)
      m.figures.push_back({"flash_speedup", fused_ms / (f + b), ""});
  }
  m.ratio_name = "gemm_speedup";
  m.ratio = fused_ms / (Median(runs[1].fwd_ms) + Median(runs[1].bwd_ms));
  rep.Add(m);
  rep.Note(absl::StrFormat(
      "medians of %d interleaved iterations after one warm-up; gemm_speedup = fused / "
      "gemm, forward + backward (flash_speedup = fused / flash); diff_* = max |path - fused| / "
      "max |fused|",
      iters));
  return absl::OkStatus();
}

Registrar reg("attention",
              "causal attention fwd+bwd: fused kernel vs the chunked GEMM path (and flash on cuda bf16)",
              RunAttention);

}  // namespace
}  // namespace moe::bench
