// moe-bench optim: the bf16 training step's clipped parameter update as one
// pass, AdamW reading the gradients times the clipping coefficient and
// writing the bf16 compute copy (what optim::Optimizer::Step does), against
// the three passes it replaces: the gradients scaled in place (Scale), AdamW,
// and a Cast of the updated masters; in one run, with f32 AdamW alone (no
// clipping, no copy) for reference.
//
//   build/bin/moe-bench optim [device=cpu|cuda] [mparams=16] [iters=10] [--json]
//
// mparams million parameters as one tensor each of master, gradient and the
// two moments (f32) and the bf16 copy. Wall-clock medians of interleaved runs,
// each ending with a stream sync. The update is memory-bound: the fused pass
// moves 30 bytes a parameter (read p, g, m, v; write p, m, v and the 2-byte
// copy), the separate ones 42 (the Scale reads and writes g, the Cast reads p
// again); AdamW alone 28. GB/s counts those bytes. Ratio fused_vs_separate =
// separate time / fused time (42/30 = 1.4 where bandwidth is all that
// counts). The coefficient is 0.999, so the gradients stay normal numbers
// over the repeated in-place scaling.
#include <algorithm>
#include <chrono>
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

absl::Status RunOptim(const Args& args, Reporter& rep) {
  std::string how;
  ASSIGN_OR_RETURN(Device device, ResolveDevice(args.Str("device", "cpu"), &how));
  ASSIGN_OR_RETURN(Backend * dev, GetBackend(device));
  const int64_t mparams = args.Int("mparams", 16), iters = args.Int("iters", 10);
  if (mparams <= 0 || iters <= 0) return absl::InvalidArgumentError("optim: mparams and iters must be > 0");
  const int64_t n = mparams * 1000 * 1000;
  Stream& s = dev->default_stream();
  auto make = [&](DType dtype, MemoryCategory category, double value) -> absl::StatusOr<Tensor> {
    ASSIGN_OR_RETURN(Tensor t, Tensor::Empty(*dev, Shape{n}, dtype, category));
    RETURN_IF_ERROR(ops::Fill(s, t, value));
    return t;
  };
  ASSIGN_OR_RETURN(Tensor p, make(DType::kF32, MemoryCategory::kParameters, 0.02));
  ASSIGN_OR_RETURN(Tensor g, make(DType::kF32, MemoryCategory::kGradients, 1e-3));
  ASSIGN_OR_RETURN(Tensor m, make(DType::kF32, MemoryCategory::kOptimizer, 0.0));
  ASSIGN_OR_RETURN(Tensor v, make(DType::kF32, MemoryCategory::kOptimizer, 0.0));
  ASSIGN_OR_RETURN(Tensor copy, make(DType::kBF16, MemoryCategory::kParameters, 0.0));
  int64_t step = 0;
  const float coefficient = 0.999f;
  // kind 0: AdamW alone; 1: Scale, AdamW, Cast; 2: AdamW scaling and writing the copy.
  auto run = [&](int kind) -> absl::StatusOr<double> {
    const auto start = std::chrono::steady_clock::now();
    ++step;
    if (kind == 1) RETURN_IF_ERROR(ops::Scale(s, g, coefficient, g));
    RETURN_IF_ERROR(ops::AdamW(s, p, g, m, v, 1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, step,
                               kind == 2 ? copy : Tensor(), kind == 2 ? coefficient : 1.0f));
    if (kind == 1) RETURN_IF_ERROR(ops::Cast(s, p, copy));
    RETURN_IF_ERROR(s.Synchronize());
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  };
  for (int kind = 0; kind < 3; ++kind) RETURN_IF_ERROR(run(kind).status());  // warm-up: pages, launch
  std::vector<double> times[3];
  for (int64_t i = 0; i < iters; ++i) {  // interleaved
    for (int kind = 0; kind < 3; ++kind) {
      ASSIGN_OR_RETURN(double t, run(kind));
      times[kind].push_back(t);
    }
  }
  double median[3];
  for (int kind = 0; kind < 3; ++kind) {
    std::sort(times[kind].begin(), times[kind].end());
    median[kind] = times[kind][times[kind].size() / 2];
  }
  const double gb = static_cast<double>(n) / 1e9;
  Measurement row;
  row.params = {{"device", how}, {"mparams", absl::StrCat(mparams)}, {"iters", absl::StrCat(iters)}};
  row.figures = {{"adamw_ms", median[0], "ms"},
                 {"separate_ms", median[1], "ms"},
                 {"fused_ms", median[2], "ms"},
                 {"adamw_gbps", 28 * gb / (median[0] * 1e-3), "GB/s"},
                 {"separate_gbps", 42 * gb / (median[1] * 1e-3), "GB/s"},
                 {"fused_gbps", 30 * gb / (median[2] * 1e-3), "GB/s"}};
  row.ratio_name = "fused_vs_separate";
  row.ratio = median[1] / median[2];
  rep.Add(row);
  rep.Note(
      "the clipped bf16 update: Scale of the gradients, AdamW, Cast of the masters (separate) vs one AdamW "
      "pass applying the coefficient and writing the bf16 copy (fused); fused_vs_separate = separate / "
      "fused");
  return absl::OkStatus();
}

Registrar reg("optim", "the clipped bf16 update in one AdamW pass vs Scale, AdamW and Cast", RunOptim);

}  // namespace
}  // namespace moe::bench
