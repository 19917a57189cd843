#include "model/transformer_block.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "runtime/core/config.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"

namespace moe::model {

absl::Status TransformerBlock::Init(Stream& stream, const config::ModelConfig& cfg, int layer,
                                    const ShardPlan& plan, uint64_t seed,
                                    std::unique_ptr<TokenDispatcher> dispatcher) {
  const std::string prefix = absl::StrCat("model.layers.", layer, ".");
  const float eps = static_cast<float>(cfg.norm_eps());
  const float std = static_cast<float>(cfg.init_std());
  const float out_std = static_cast<float>(cfg.init_std() / std::sqrt(2.0 * cfg.num_layers()));
  RETURN_IF_ERROR(input_norm_.Init(stream, prefix + "input_layernorm.weight", cfg.hidden_size(), eps, seed));
  RETURN_IF_ERROR(attn_.Init(stream, prefix + "self_attn.", cfg, std, out_std, plan, seed));
  RETURN_IF_ERROR(
      post_norm_.Init(stream, prefix + "post_attention_layernorm.weight", cfg.hidden_size(), eps, seed));
  if (IsMoeLayer(cfg, layer)) {
    moe_ = std::make_unique<MoELayer>();
    return moe_->Init(stream, prefix + "mlp.", cfg, std, out_std, plan, seed, std::move(dispatcher));
  }
  mlp_ = std::make_unique<DenseMLP>();
  return mlp_->Init(stream, prefix + "mlp.", cfg.hidden_size(), cfg.ffn_hidden_size(), std, out_std, plan,
                    seed);
}

absl::StatusOr<Residual> TransformerBlock::Forward(Stream& stream, const Residual& in, int64_t num_seqs,
                                                   int64_t seq_len) {
  Tensor h = in.h, a;
  if (in.branch.defined()) {
    ASSIGN_OR_RETURN(a, input_norm_.AddForward(stream, in.h, in.branch));  // h = in.h + branch, normed
    h = in.branch;
  } else {
    ASSIGN_OR_RETURN(a, input_norm_.Forward(stream, in.h));
  }
  ASSIGN_OR_RETURN(Tensor h1, attn_.Forward(stream, a, num_seqs, seq_len));
  ASSIGN_OR_RETURN(Tensor m, post_norm_.AddForward(stream, h, h1));  // h1 = h + attention, normed
  Tensor y;
  if (moe_) {
    ASSIGN_OR_RETURN(y, moe_->Forward(stream, m, seq_len));
  } else {
    ASSIGN_OR_RETURN(y, mlp_->Forward(stream, m));
  }
  return Residual{h1, y};  // h2 = h1 + y, added by the next norm
}

absl::Status TransformerBlock::Backward(Stream& stream, const Tensor& dh, float aux_scale, float z_scale,
                                        float erc_scale) {
  Tensor dm;
  if (moe_) {
    ASSIGN_OR_RETURN(dm, moe_->Backward(stream, dh, aux_scale, z_scale, erc_scale));
  } else {
    ASSIGN_OR_RETURN(dm, mlp_->Backward(stream, dh));
  }
  RETURN_IF_ERROR(post_norm_.Backward(stream, dm, dh, /*accumulate_dx=*/true));
  ASSIGN_OR_RETURN(Tensor da, attn_.Backward(stream, dh));
  return input_norm_.Backward(stream, da, dh, /*accumulate_dx=*/true);
}

absl::Status TransformerBlock::CollectParameters(parallel::ParameterList* list) {
  RETURN_IF_ERROR(list->Add(&input_norm_.weight()));
  RETURN_IF_ERROR(list->Add(&attn_.q_proj()));
  RETURN_IF_ERROR(list->Add(&attn_.k_proj()));
  RETURN_IF_ERROR(list->Add(&attn_.v_proj()));
  RETURN_IF_ERROR(list->Add(&attn_.o_proj()));
  RETURN_IF_ERROR(list->Add(&post_norm_.weight()));
  if (moe_) return moe_->CollectParameters(list);
  RETURN_IF_ERROR(list->Add(&mlp_->gate_proj()));
  RETURN_IF_ERROR(list->Add(&mlp_->up_proj()));
  return list->Add(&mlp_->down_proj());
}

}  // namespace moe::model
