#include "model/embedding.h"

#include "runtime/core/ops.h"
#include "runtime/core/status.h"

namespace moe::model {

absl::Status Embedding::Init(Stream& stream, int64_t vocab_size, int64_t hidden_size, float init_std,
                             uint64_t seed) {
  return CreateParameter(stream, "model.embed_tokens.weight", Shape{vocab_size, hidden_size},
                         parallel::ParamKind::kDense, parallel::ShardSpec{}, InitSpec::Normal(init_std), seed,
                         &weight_);
}

absl::StatusOr<Tensor> Embedding::Forward(Stream& stream, const Tensor& ids) {
  ASSIGN_OR_RETURN(Tensor out, NewActivation(stream, Shape{ids.numel(), weight_.value.size(1)},
                                             weight_.compute_value().dtype()));
  RETURN_IF_ERROR(ops::GatherRows(stream, weight_.compute_value(), ids, out));
  ids_ = ids;
  return out;
}

absl::Status Embedding::Backward(Stream& stream, const Tensor& dy) {
  RETURN_IF_ERROR(ops::ScatterAddRows(stream, dy, ids_, weight_.grad));
  ids_ = Tensor();
  return absl::OkStatus();
}

}  // namespace moe::model
