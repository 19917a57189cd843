// RMSNorm (docs/model.md): out = x / sqrt(mean_i(x_i^2) + eps) * weight, per row.
#ifndef MOE_MODEL_RMS_NORM_H_
#define MOE_MODEL_RMS_NORM_H_

#include <string>

#include "absl/status/statusor.h"
#include "model/common.h"

namespace moe::model {

class RMSNorm {
 public:
  // Creates the gain `name` [dim], initialised to 1 (replicated on every rank).
  absl::Status Init(Stream& stream, std::string name, int64_t dim, float eps, uint64_t seed);

  // x [R, dim] -> out [R, dim]. Keeps x (which must stay unchanged until
  // Backward) and the per-row 1/rms.
  absl::StatusOr<Tensor> Forward(Stream& stream, const Tensor& x);
  // The residual add before the norm, fused (ops::AddRmsNorm): residual += x in
  // place, then Forward(residual) without a second pass over memory.
  absl::StatusOr<Tensor> AddForward(Stream& stream, const Tensor& x, const Tensor& residual);
  // dx = d out / d x applied to dy, written to `dx` (or added to it when
  // accumulate_dx: the residual stream's gradient); weight.grad += d/dweight.
  absl::Status Backward(Stream& stream, const Tensor& dy, const Tensor& dx, bool accumulate_dx);

  parallel::Parameter& weight() { return weight_; }

 private:
  parallel::Parameter weight_;
  float eps_ = 1e-5f;
  Tensor x_, rstd_;
};

}  // namespace moe::model

#endif  // MOE_MODEL_RMS_NORM_H_
