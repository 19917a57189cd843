// moe-bench gpu-gemm: the grouped expert GEMM, forward + backward, against one
// cuBLAS GEMM of the same FLOPs, on a CUDA device, timed with CUDA events.
//
//   build/bin/moe-bench gpu-gemm [device=cuda:0] [dtype=bf16] [experts=8] [hidden=1024]
//       [expert_ffn=2816] [tokens=16384] [skew=0] [iters=20] [path=auto|per_expert|streams|grouped] [--json]
//
// Rows are already in expert order (R = tokens rows); expert 0 gets skew * R
// rows more than the others (the rest shared evenly). One iteration is the three grouped GEMMs of
// one linear layer: forward y = x W_e^T, dX = dy W_e, dW_e = dy^T x (dW in f32),
// 3 * 2 * R * hidden * expert_ffn FLOPs. The reference is ops::Gemm with
// M = 3 * hidden, N = R, K = expert_ffn (same FLOPs), same dtype.
// Ratio vs_gemm = GEMM time / grouped time (target >= 0.8); tflops of each.
// path= sets MOE_CUDA_GROUPED_GEMM's choice for this process (cuda_gemm.h).
// Needs a CUDA build and a GPU; elsewhere it fails naming why.
#include <algorithm>
#include <cstdlib>
#include <vector>

#include "absl/strings/str_cat.h"
#include "launch/bench/bench.h"
#include "runtime/core/backend.h"
#include "runtime/core/device_select.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"
#include "runtime/core/tensor.h"

namespace moe::bench {
namespace {

absl::StatusOr<Tensor> Filled(Backend& b, Shape shape, DType dtype, double value) {
  ASSIGN_OR_RETURN(Tensor t, Tensor::Empty(b, shape, dtype, MemoryCategory::kActivations));
  RETURN_IF_ERROR(ops::Fill(b.default_stream(), t, value));
  return t;
}

// Milliseconds of `fn` on `s`, measured between two events.
template <typename Fn>
absl::StatusOr<double> TimeMs(Backend& b, Stream& s, Fn fn) {
  ASSIGN_OR_RETURN(auto start, b.CreateEvent());
  ASSIGN_OR_RETURN(auto end, b.CreateEvent());
  RETURN_IF_ERROR(s.Record(*start));
  RETURN_IF_ERROR(fn());
  RETURN_IF_ERROR(s.Record(*end));
  RETURN_IF_ERROR(end->Synchronize());
  return end->ElapsedMsSince(*start);
}

absl::Status RunGpuGemm(const Args& args, Reporter& rep) {
  const std::string path = args.Str("path", "auto");
  if (path != "auto" && path != "per_expert" && path != "streams" && path != "grouped")
    return absl::InvalidArgumentError(
        absl::StrCat("gpu-gemm: path=", path, " is not one of auto, per_expert, streams, grouped"));
  if (path != "auto") setenv("MOE_CUDA_GROUPED_GEMM", path.c_str(), 1);  // read at the first grouped GEMM
  std::string how;
  ASSIGN_OR_RETURN(Device device, ResolveDevice(args.Str("device", "cuda"), &how));
  if (device.is_cpu()) return absl::InvalidArgumentError("gpu-gemm: device must be cuda");
  ASSIGN_OR_RETURN(Backend * gpu, GetBackend(device));
  Stream& s = gpu->default_stream();
  const std::string dtype_name = args.Str("dtype", "bf16");
  const DType dt = dtype_name == "f32" ? DType::kF32 : DType::kBF16;
  const int64_t E = args.Int("experts", 8), d = args.Int("hidden", 1024), f = args.Int("expert_ffn", 2816),
                R = args.Int("tokens", 16384), iters = args.Int("iters", 20);
  const double skew = args.Double("skew", 0.0);
  std::vector<int64_t> offsets(E + 1, 0);
  const int64_t hot = static_cast<int64_t>(skew * static_cast<double>(R)), rest = R - hot;
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + rest / E + (e == 0 ? hot : 0);
  offsets[E] = R;  // the remainder of rest / E goes to the last expert
  ASSIGN_OR_RETURN(Tensor x, Filled(*gpu, {R, d}, dt, 0.01));
  ASSIGN_OR_RETURN(Tensor w, Filled(*gpu, {E, f, d}, dt, 0.01));
  ASSIGN_OR_RETURN(Tensor y, Filled(*gpu, {R, f}, dt, 0));
  ASSIGN_OR_RETURN(Tensor dy, Filled(*gpu, {R, f}, dt, 0.01));
  ASSIGN_OR_RETURN(Tensor dx, Filled(*gpu, {R, d}, dt, 0));
  ASSIGN_OR_RETURN(Tensor dw, Filled(*gpu, {E, f, d}, DType::kF32, 0));
  ASSIGN_OR_RETURN(Tensor a, Filled(*gpu, {3 * d, f}, dt, 0.01));
  ASSIGN_OR_RETURN(Tensor b, Filled(*gpu, {f, R}, dt, 0.01));
  ASSIGN_OR_RETURN(Tensor c, Filled(*gpu, {3 * d, R}, dt, 0));
  auto grouped = [&]() -> absl::Status {
    RETURN_IF_ERROR(ops::GroupedGemm(s, x, w, true, y, offsets));
    RETURN_IF_ERROR(ops::GroupedGemm(s, dy, w, false, dx, offsets));
    return ops::GroupedGemmWeightGrad(s, dy, x, dw, offsets, 1.0f, 1.0f);
  };
  auto gemm = [&]() { return ops::Gemm(s, a, false, b, false, c); };
  RETURN_IF_ERROR(grouped());  // warm-up (cuBLAS heuristics, allocator)
  RETURN_IF_ERROR(gemm());
  RETURN_IF_ERROR(s.Synchronize());
  std::vector<double> tg, tr;
  for (int64_t i = 0; i < iters; ++i) {  // interleaved
    ASSIGN_OR_RETURN(double g, TimeMs(*gpu, s, grouped));
    ASSIGN_OR_RETURN(double r, TimeMs(*gpu, s, gemm));
    tg.push_back(g);
    tr.push_back(r);
  }
  std::sort(tg.begin(), tg.end());
  std::sort(tr.begin(), tr.end());
  const double mg = tg[tg.size() / 2], mr = tr[tr.size() / 2];
  const double flops = 3.0 * 2.0 * static_cast<double>(R) * d * f;
  Measurement m;
  m.params = {{"device", how},
              {"dtype", dtype_name},
              {"experts", absl::StrCat(E)},
              {"hidden", absl::StrCat(d)},
              {"expert_ffn", absl::StrCat(f)},
              {"tokens", absl::StrCat(R)},
              {"skew", absl::StrCat(skew)},
              {"path", path}};
  m.figures = {{"grouped_ms", mg, "ms"},
               {"gemm_ms", mr, "ms"},
               {"grouped_tflops", flops / mg / 1e9, "TFLOP/s"},
               {"gemm_tflops", flops / mr / 1e9, "TFLOP/s"}};
  m.ratio_name = "vs_gemm";
  m.ratio = mr / mg;
  rep.Add(m);
  rep.Note(
      "vs_gemm = one GEMM of equal FLOPs / grouped fwd+bwd (target >= 0.8); medians of interleaved runs");
  return absl::OkStatus();
}

Registrar reg("gpu-gemm", "grouped expert GEMM fwd+bwd vs one cuBLAS GEMM of equal FLOPs (CUDA)", RunGpuGemm);

}  // namespace
}  // namespace moe::bench
