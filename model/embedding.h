// Token embedding: out[t] = weight[ids[t]], weight model.embed_tokens.weight [V, d].
// With tied word embeddings the LM head reads the same Parameter (Model).
#ifndef MOE_MODEL_EMBEDDING_H_
#define MOE_MODEL_EMBEDDING_H_

#include "absl/status/statusor.h"
#include "model/common.h"

namespace moe::model {

class Embedding {
 public:
  // Creates model.embed_tokens.weight [vocab_size, hidden_size] ~ Normal(0, init_std).
  absl::Status Init(Stream& stream, int64_t vocab_size, int64_t hidden_size, float init_std, uint64_t seed);
  // ids i32 [T] (values in [0, V), checked by the caller) -> [T, d]. Keeps ids.
  absl::StatusOr<Tensor> Forward(Stream& stream, const Tensor& ids);
  // weight.grad[ids[t]] += dy[t].
  absl::Status Backward(Stream& stream, const Tensor& dy);

  parallel::Parameter& weight() { return weight_; }

 private:
  parallel::Parameter weight_;
  Tensor ids_;
};

}  // namespace moe::model

#endif  // MOE_MODEL_EMBEDDING_H_
