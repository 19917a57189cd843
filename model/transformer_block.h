// TransformerBlock: one decoder layer of docs/model.md,
//   h = h + Attention(RMSNorm(h, input_layernorm))
//   h = h + (MoE or SwiGLU)(RMSNorm(h, post_attention_layernorm)).
// Layer l is MoE when l % moe_layer_freq == moe_layer_freq - 1.
#ifndef MOE_MODEL_TRANSFORMER_BLOCK_H_
#define MOE_MODEL_TRANSFORMER_BLOCK_H_

#include <memory>

#include "absl/status/statusor.h"
#include "model/attention.h"
#include "model/common.h"
#include "model/dense_mlp.h"
#include "model/moe_layer.h"
#include "model/rms_norm.h"

namespace moe::model {

// The residual stream between blocks with the last branch not yet added: its
// value is h + branch (h alone when branch is undefined). The next RMSNorm
// adds the branch in its own pass (ops::AddRmsNorm, writing the sum into
// branch), so the add at a block boundary costs no pass over memory of its own.
struct Residual {
  Tensor h;
  Tensor branch;
};

class TransformerBlock {
 public:
  // `dispatcher` is used when the layer is MoE (null: LocalTokenDispatcher).
  absl::Status Init(Stream& stream, const config::ModelConfig& cfg, int layer, const ShardPlan& plan,
                    uint64_t seed, std::unique_ptr<TokenDispatcher> dispatcher = nullptr);
  // in = h [B * S, d] (+ branch, added here into branch) -> the block's output
  // h1 + (MoE or MLP output), unsummed. in.h and the sum are kept until
  // Backward; in.branch is overwritten with the sum.
  absl::StatusOr<Residual> Forward(Stream& stream, const Residual& in, int64_t num_seqs, int64_t seq_len);
  // dh [B * S, d]: on entry d loss / d output, on return d loss / d h (in place).
  // aux_scale, z_scale, erc_scale: d loss / d (aux, z, erc) of this layer
  // (unused when dense).
  absl::Status Backward(Stream& stream, const Tensor& dh, float aux_scale, float z_scale, float erc_scale);

  // Appends the parameters in docs/model.md's order.
  absl::Status CollectParameters(parallel::ParameterList* list);

  bool is_moe() const { return moe_ != nullptr; }
  MoELayer* moe() { return moe_.get(); }  // null for a dense layer
  double aux_loss() const { return moe_ ? moe_->aux_loss() : 0.0; }
  double z_loss() const { return moe_ ? moe_->z_loss() : 0.0; }
  double erc_loss() const { return moe_ ? moe_->erc_loss() : 0.0; }

 private:
  RMSNorm input_norm_, post_norm_;
  Attention attn_;
  std::unique_ptr<DenseMLP> mlp_;
  std::unique_ptr<MoELayer> moe_;
};

}  // namespace moe::model

#endif  // MOE_MODEL_TRANSFORMER_BLOCK_H_
