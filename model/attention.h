// Attention: grouped-query causal self-attention with rotate-half RoPE (docs/model.md).
//   q = a Wq^T [T, H*hd], k = a Wk^T, v = a Wv^T [T, Hkv*hd]; RoPE on q and k;
//   o = softmax(q k^T / sqrt(hd) + causal) v (query head j reads kv head j / (H/Hkv));
//   out = o Wo^T [T, d].
// Parameters model.layers.{l}.self_attn.{q,k,v,o}_proj.weight. Tensor
// parallel: q/k/v column-parallel by heads, o row-parallel; with tp_size > 1
// Forward all-reduces the output and Backward the input grad over
// plan.tp_group (collective over the TP group).
#ifndef MOE_MODEL_ATTENTION_H_
#define MOE_MODEL_ATTENTION_H_

#include <string>

#include "absl/status/statusor.h"
#include "model/common.h"

namespace moe::model {

class Attention {
 public:
  // `prefix` is "model.layers.{l}.self_attn."; o_std is init_std / sqrt(2 L).
  absl::Status Init(Stream& stream, const std::string& prefix, const config::ModelConfig& cfg, float init_std,
                    float o_std, const ShardPlan& plan, uint64_t seed);
  // a [B * S, d] (rows of sequence b at [b * S, (b + 1) * S)) -> out [B * S, d].
  // Keeps a, the rotated q and k, v, o and the attention row log-sum-exp
  // [B, H, S] (not the probabilities: backward recomputes them).
  absl::StatusOr<Tensor> Forward(Stream& stream, const Tensor& a, int64_t num_seqs, int64_t seq_len);
  // Accumulates the four weight grads; returns da [B * S, d].
  absl::StatusOr<Tensor> Backward(Stream& stream, const Tensor& dout);

  parallel::Parameter& q_proj() { return wq_; }
  parallel::Parameter& k_proj() { return wk_; }
  parallel::Parameter& v_proj() { return wv_; }
  parallel::Parameter& o_proj() { return wo_; }

 private:
  parallel::Parameter wq_, wk_, wv_, wo_;
  int64_t heads_ = 0, kv_heads_ = 0, head_dim_ = 0;  // local heads
  comm::Communicator* tp_ = nullptr;                 // TP group when tp_size > 1
  double theta_ = 10000.0;
  int64_t num_seqs_ = 0, seq_len_ = 0;
  Tensor a_, q_, k_, v_, lse_, o_;
};

}  // namespace moe::model

#endif  // MOE_MODEL_ATTENTION_H_
