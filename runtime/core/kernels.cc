#include "runtime/core/kernels.h"

#include "runtime/core/status.h"

namespace moe {

absl::Status Kernels::FillMany(S& s, absl::Span<const Tensor> ts, double value) {
  for (const Tensor& t : ts) RETURN_IF_ERROR(Fill(s, t, value));
  return absl::OkStatus();
}

absl::Status Kernels::ReduceSumSquaresMany(S& s, absl::Span<const Tensor> xs, T out) {
  for (size_t i = 0; i < xs.size(); ++i) {
    const int64_t j = static_cast<int64_t>(i);
    RETURN_IF_ERROR(ReduceSumSquares(s, xs[i], out.Slice(j, j + 1), 1.0f, 0.0f));
  }
  return absl::OkStatus();
}

absl::Status Kernels::AdamWMany(S& s, absl::Span<const AdamWTarget> targets, float grad_scale, float lr,
                                float beta1, float beta2, float eps, int64_t step) {
  for (const AdamWTarget& t : targets) {
    RETURN_IF_ERROR(AdamW(s, t.param, t.grad, t.exp_avg, t.exp_avg_sq, t.param_bf16, grad_scale, lr, beta1,
                          beta2, eps, t.weight_decay, step));
  }
  return absl::OkStatus();
}

}  // namespace moe
