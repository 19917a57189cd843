#include "model/dense_mlp.h"

#include "model/swiglu.h"
#include "parallel/tensor_parallel.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"

namespace moe::model {

absl::Status DenseMLP::Init(Stream& stream, const std::string& prefix, int64_t hidden_size,
                            int64_t ffn_hidden_size, float init_std, float down_std, const ShardPlan& plan,
                            uint64_t seed) {
  using parallel::ParamKind;
  tp_ = plan.tp_size > 1 ? plan.tp_group : nullptr;
  const Shape w_in{ffn_hidden_size, hidden_size}, w_out{hidden_size, ffn_hidden_size};
  RETURN_IF_ERROR(CreateParameter(stream, prefix + "gate_proj.weight", w_in, ParamKind::kDense,
                                  ColumnParallelShard(ffn_hidden_size, plan), InitSpec::Normal(init_std),
                                  seed, &gate_));
  RETURN_IF_ERROR(CreateParameter(stream, prefix + "up_proj.weight", w_in, ParamKind::kDense,
                                  ColumnParallelShard(ffn_hidden_size, plan), InitSpec::Normal(init_std),
                                  seed, &up_));
  return CreateParameter(stream, prefix + "down_proj.weight", w_out, ParamKind::kDense,
                         RowParallelShard(ffn_hidden_size, plan), InitSpec::Normal(down_std), seed, &down_);
}

absl::StatusOr<Tensor> DenseMLP::Forward(Stream& stream, const Tensor& x) {
  const int64_t n = x.size(0), f = gate_.value.size(0);
  ASSIGN_OR_RETURN(g_, NewActivation(stream, Shape{n, f}, x.dtype()));
  ASSIGN_OR_RETURN(u_, NewActivation(stream, Shape{n, f}, x.dtype()));
  ASSIGN_OR_RETURN(act_, NewActivation(stream, Shape{n, f}, x.dtype()));
  ASSIGN_OR_RETURN(Tensor y, NewActivation(stream, x.shape(), x.dtype()));
  RETURN_IF_ERROR(SwiGLUForward(stream, x, gate_.compute_value(), up_.compute_value(), down_.compute_value(),
                                g_, u_, act_, y));
  if (tp_ != nullptr) RETURN_IF_ERROR(parallel::AllReduceSum(*tp_, stream, y));  // row-parallel down_proj
  x_ = x;
  return y;
}

absl::StatusOr<Tensor> DenseMLP::Backward(Stream& stream, const Tensor& dy) {
  ASSIGN_OR_RETURN(Tensor dact, NewActivation(stream, act_.shape(), x_.dtype()));
  ASSIGN_OR_RETURN(Tensor dx, NewActivation(stream, x_.shape(), x_.dtype()));
  RETURN_IF_ERROR(SwiGLUBackward(stream, x_, gate_.compute_value(), up_.compute_value(),
                                 down_.compute_value(), g_, u_, act_, dact, dy, gate_.grad, up_.grad,
                                 down_.grad, dx));
  x_ = g_ = u_ = act_ = Tensor();
  if (tp_ != nullptr) RETURN_IF_ERROR(parallel::AllReduceSum(*tp_, stream, dx));  // column-parallel gate/up
  return dx;
}

}  // namespace moe::model
