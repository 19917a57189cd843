// DenseMLP: the SwiGLU feed-forward of a dense layer (docs/model.md),
//   model.layers.{l}.mlp.{gate,up}_proj.weight [F, d], down_proj.weight [d, F].
// Tensor-parallel: gate/up are column-parallel, down row-parallel; with
// tp_size > 1 Forward all-reduces the output and Backward the input grad over
// plan.tp_group (collective over the TP group).
#ifndef MOE_MODEL_DENSE_MLP_H_
#define MOE_MODEL_DENSE_MLP_H_

#include <string>

#include "absl/status/statusor.h"
#include "model/common.h"

namespace moe::model {

class DenseMLP {
 public:
  // `prefix` is "model.layers.{l}.mlp."; down_std is init_std / sqrt(2 L).
  absl::Status Init(Stream& stream, const std::string& prefix, int64_t hidden_size, int64_t ffn_hidden_size,
                    float init_std, float down_std, const ShardPlan& plan, uint64_t seed);
  // x [T, d] -> y [T, d]. Keeps x, gate, up, act [T, F_local].
  absl::StatusOr<Tensor> Forward(Stream& stream, const Tensor& x);
  // Accumulates the three weight grads; returns dx [T, d].
  absl::StatusOr<Tensor> Backward(Stream& stream, const Tensor& dy);

  parallel::Parameter& gate_proj() { return gate_; }
  parallel::Parameter& up_proj() { return up_; }
  parallel::Parameter& down_proj() { return down_; }

 private:
  parallel::Parameter gate_, up_, down_;
  Tensor x_, g_, u_, act_;
  comm::Communicator* tp_ = nullptr;  // TP group when tp_size > 1
};

}  // namespace moe::model

#endif  // MOE_MODEL_DENSE_MLP_H_
