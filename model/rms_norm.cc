#include "model/rms_norm.h"

#include "runtime/core/ops.h"
#include "runtime/core/status.h"

namespace moe::model {

absl::Status RMSNorm::Init(Stream& stream, std::string name, int64_t dim, float eps, uint64_t seed) {
  eps_ = eps;
  return CreateParameter(stream, std::move(name), Shape{dim}, parallel::ParamKind::kDense,
                         parallel::ShardSpec{}, InitSpec::Ones(), seed, &weight_);
}

absl::StatusOr<Tensor> RMSNorm::Forward(Stream& stream, const Tensor& x) {
  const Tensor x2 = x.Flatten2D();
  ASSIGN_OR_RETURN(Tensor out, NewActivation(stream, x.shape(), x.dtype()));
  ASSIGN_OR_RETURN(rstd_, NewActivation(stream, Shape{x2.size(0)}));
  RETURN_IF_ERROR(ops::RmsNorm(stream, x, weight_.compute_value(), eps_, out, rstd_));
  x_ = x;
  return out;
}

absl::StatusOr<Tensor> RMSNorm::AddForward(Stream& stream, const Tensor& x, const Tensor& residual) {
  const Tensor r2 = residual.Flatten2D();
  ASSIGN_OR_RETURN(Tensor out, NewActivation(stream, residual.shape(), residual.dtype()));
  ASSIGN_OR_RETURN(rstd_, NewActivation(stream, Shape{r2.size(0)}));
  RETURN_IF_ERROR(ops::AddRmsNorm(stream, x, residual, weight_.compute_value(), eps_, residual, out, rstd_));
  x_ = residual;
  return out;
}

absl::Status RMSNorm::Backward(Stream& stream, const Tensor& dy, const Tensor& dx, bool accumulate_dx) {
  RETURN_IF_ERROR(
      ops::RmsNormBackward(stream, x_, weight_.compute_value(), rstd_, dy, dx, weight_.grad, accumulate_dx));
  x_ = Tensor();
  rstd_ = Tensor();
  return absl::OkStatus();
}

}  // namespace moe::model
