// moe-bench optim: the bf16 training step's clipped parameter update as one
// pass, AdamW reading the gradients times the clipping coefficient and
// writing the bf16 compute copy (what optim::Optimizer::Step does), against
// the three passes it replaces: the gradients scaled in place (Scale), AdamW,
// and a Cast of the updated masters; in one run, with f32 AdamW alone (no
// clipping, no copy) for reference.
//
//   build/bin/moe-bench optim [device=cpu|cuda] [mparams=16] [iters=10] [tensors=163] [--json]
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
//
// Three more figures split the same buffers into `tensors` parameters (default
// 163: a 16-layer model's count) and runs the fused update as one AdamW call
// per parameter (loop) and as the list form, one call for all (what the
// optimizer does; ops.h, list forms), interleaved: list_vs_loop = loop time /
// list time. On a GPU the list form makes ceil(tensors / 32) launches
// instead of `tensors`; on the CPU both run the same loop (about 1).
#include <algorithm>
#include <chrono>
#include <vector>

#include "absl/strings/str_cat.h"
#include "launch/bench/bench.h"
#include "runtime/core/backend.h"
#include "runtime/core/device_select.h"
#include "runtime/core/kernels.h"
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
  const int64_t tensors = args.Int("tensors", 163);
  if (mparams <= 0 || iters <= 0 || tensors <= 0)
    return absl::InvalidArgumentError("optim: mparams, iters and tensors must be > 0");
  const int64_t n = mparams * 1000 * 1000;
  if (tensors > n) return absl::InvalidArgumentError("optim: tensors must be at most mparams * 1e6");
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
  // The split: `tensors` consecutive ranges of about equal size.
  std::vector<AdamWTarget> split;
  for (int64_t i = 0; i < tensors; ++i) {
    const int64_t b = n * i / tensors, e = n * (i + 1) / tensors;
    split.push_back(
        AdamWTarget{p.Slice(b, e), g.Slice(b, e), m.Slice(b, e), v.Slice(b, e), copy.Slice(b, e), 0.1f});
  }
  // kind 0: AdamW alone; 1: Scale, AdamW, Cast; 2: AdamW scaling and writing
  // the copy; 3: that per split tensor; 4: that as one list call.
  auto run = [&](int kind) -> absl::StatusOr<double> {
    const auto start = std::chrono::steady_clock::now();
    ++step;
    if (kind == 1) RETURN_IF_ERROR(ops::Scale(s, g, coefficient, g));
    if (kind == 3) {
      for (const AdamWTarget& t : split)
        RETURN_IF_ERROR(ops::AdamW(s, t.param, t.grad, t.exp_avg, t.exp_avg_sq, 1e-4f, 0.9f, 0.95f, 1e-8f,
                                   t.weight_decay, step, t.param_bf16, coefficient));
    } else if (kind == 4) {
      RETURN_IF_ERROR(ops::AdamW(s, split, 1e-4f, 0.9f, 0.95f, 1e-8f, step, coefficient));
    } else {
      RETURN_IF_ERROR(ops::AdamW(s, p, g, m, v, 1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, step,
                                 kind == 2 ? copy : Tensor(), kind == 2 ? coefficient : 1.0f));
    }
    if (kind == 1) RETURN_IF_ERROR(ops::Cast(s, p, copy));
    RETURN_IF_ERROR(s.Synchronize());
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  };
  ASSIGN_OR_RETURN(const std::vector<double> median, InterleavedMedians(5, iters, run));
  const double gb = static_cast<double>(n) / 1e9;
  Measurement row;
  row.params = {{"device", how},
                {"mparams", absl::StrCat(mparams)},
                {"iters", absl::StrCat(iters)},
                {"tensors", absl::StrCat(tensors)}};
  row.figures = {{"adamw_ms", median[0], "ms"},
                 {"separate_ms", median[1], "ms"},
                 {"fused_ms", median[2], "ms"},
                 {"adamw_gbps", 28 * gb / (median[0] * 1e-3), "GB/s"},
                 {"separate_gbps", 42 * gb / (median[1] * 1e-3), "GB/s"},
                 {"fused_gbps", 30 * gb / (median[2] * 1e-3), "GB/s"},
                 {"loop_ms", median[3], "ms"},
                 {"list_ms", median[4], "ms"},
                 {"list_vs_loop", median[3] / median[4], ""}};
  row.ratio_name = "fused_vs_separate";
  row.ratio = median[1] / median[2];
  rep.Add(row);
  rep.Note(
      "the clipped bf16 update: Scale of the gradients, AdamW, Cast of the masters (separate) vs one AdamW "
      "pass applying the coefficient and writing the bf16 copy (fused); fused_vs_separate = separate / "
      "fused");
  rep.Note(
      "the fused update split into `tensors` parameters: one AdamW call each (loop) vs one list call "
      "(list, what the optimizer does); list_vs_loop = loop / list");
  return absl::OkStatus();
}

Registrar reg("optim", "the clipped bf16 update in one AdamW pass vs Scale, AdamW and Cast", RunOptim);

}  // namespace
}  // namespace moe::bench
