#include "model/attention.h"

#include <cmath>

#include "parallel/tensor_parallel.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"

namespace moe::model {

absl::Status Attention::Init(Stream& stream, const std::string& prefix, const config::ModelConfig& cfg,
                             float init_std, float o_std, const ShardPlan& plan, uint64_t seed) {
  using parallel::ParamKind;
  const int64_t d = cfg.hidden_size(), h = cfg.num_heads(), hkv = cfg.num_kv_heads();
  head_dim_ = d / h;
  heads_ = h / plan.tp_size;
  tp_ = plan.tp_size > 1 ? plan.tp_group : nullptr;
  kv_heads_ = hkv / plan.tp_size;
  theta_ = cfg.rope_theta();
  const int64_t qdim = h * head_dim_, kvdim = hkv * head_dim_;
  RETURN_IF_ERROR(CreateParameter(stream, prefix + "q_proj.weight", Shape{qdim, d}, ParamKind::kDense,
                                  ColumnParallelShard(qdim, plan), InitSpec::Normal(init_std), seed, &wq_));
  RETURN_IF_ERROR(CreateParameter(stream, prefix + "k_proj.weight", Shape{kvdim, d}, ParamKind::kDense,
                                  ColumnParallelShard(kvdim, plan), InitSpec::Normal(init_std), seed, &wk_));
  RETURN_IF_ERROR(CreateParameter(stream, prefix + "v_proj.weight", Shape{kvdim, d}, ParamKind::kDense,
                                  ColumnParallelShard(kvdim, plan), InitSpec::Normal(init_std), seed, &wv_));
  return CreateParameter(stream, prefix + "o_proj.weight", Shape{d, qdim}, ParamKind::kDense,
                         RowParallelShard(qdim, plan), InitSpec::Normal(o_std), seed, &wo_);
}

absl::StatusOr<Tensor> Attention::Forward(Stream& stream, const Tensor& a, int64_t num_seqs,
                                          int64_t seq_len) {
  num_seqs_ = num_seqs;
  seq_len_ = seq_len;
  const int64_t b = num_seqs, s = seq_len, hd = head_dim_;
  const DType dt = a.dtype();
  ASSIGN_OR_RETURN(q_, NewActivation(stream, Shape{b, s, heads_, hd}, dt));
  ASSIGN_OR_RETURN(k_, NewActivation(stream, Shape{b, s, kv_heads_, hd}, dt));
  ASSIGN_OR_RETURN(v_, NewActivation(stream, Shape{b, s, kv_heads_, hd}, dt));
  ASSIGN_OR_RETURN(lse_, NewActivation(stream, Shape{b, heads_, s}));  // f32 in every precision
  ASSIGN_OR_RETURN(o_, NewActivation(stream, Shape{b, s, heads_, hd}, dt));
  ASSIGN_OR_RETURN(Tensor out, NewActivation(stream, Shape{b * s, wo_.value.size(0)}, dt));
  // The matrix view of [B, S, heads, hd] is [B * S * heads, hd]: GEMMs need [T, heads * hd].
  const Tensor q2 = q_.Reshape(Shape{b * s, heads_ * hd});
  const Tensor k2 = k_.Reshape(Shape{b * s, kv_heads_ * hd});
  const Tensor v2 = v_.Reshape(Shape{b * s, kv_heads_ * hd});
  RETURN_IF_ERROR(ops::Gemm(stream, a, false, wq_.compute_value(), true, q2));
  RETURN_IF_ERROR(ops::Gemm(stream, a, false, wk_.compute_value(), true, k2));
  RETURN_IF_ERROR(ops::Gemm(stream, a, false, wv_.compute_value(), true, v2));
  RETURN_IF_ERROR(ops::Rope(stream, q_, q_, theta_));
  RETURN_IF_ERROR(ops::Rope(stream, k_, k_, theta_));
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  RETURN_IF_ERROR(ops::CausalAttention(stream, q_, k_, v_, scale, o_, lse_));
  RETURN_IF_ERROR(
      ops::Gemm(stream, o_.Reshape(Shape{b * s, heads_ * hd}), false, wo_.compute_value(), true, out));
  if (tp_ != nullptr) RETURN_IF_ERROR(parallel::AllReduceSum(*tp_, stream, out));  // row-parallel o_proj
  a_ = a;
  return out;
}

absl::StatusOr<Tensor> Attention::Backward(Stream& stream, const Tensor& dout) {
  const int64_t b = num_seqs_, s = seq_len_, hd = head_dim_;
  const Tensor o2 = o_.Reshape(Shape{b * s, heads_ * hd});
  RETURN_IF_ERROR(ops::Gemm(stream, dout, true, o2, false, wo_.grad, 1.0f, 1.0f));
  const DType dt = a_.dtype();
  ASSIGN_OR_RETURN(Tensor d_o, NewActivation(stream, o_.shape(), dt));
  RETURN_IF_ERROR(
      ops::Gemm(stream, dout, false, wo_.compute_value(), false, d_o.Reshape(Shape{b * s, heads_ * hd})));
  ASSIGN_OR_RETURN(Tensor dq, NewActivation(stream, q_.shape(), dt));
  ASSIGN_OR_RETURN(Tensor dk, NewActivation(stream, k_.shape(), dt));
  ASSIGN_OR_RETURN(Tensor dv, NewActivation(stream, v_.shape(), dt));
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  RETURN_IF_ERROR(ops::CausalAttentionBackward(stream, q_, k_, v_, o_, lse_, scale, d_o, dq, dk, dv));
  RETURN_IF_ERROR(ops::RopeBackward(stream, dq, dq, theta_));
  RETURN_IF_ERROR(ops::RopeBackward(stream, dk, dk, theta_));
  const Tensor dq2 = dq.Reshape(Shape{b * s, heads_ * hd});
  const Tensor dk2 = dk.Reshape(Shape{b * s, kv_heads_ * hd});
  const Tensor dv2 = dv.Reshape(Shape{b * s, kv_heads_ * hd});
  RETURN_IF_ERROR(ops::Gemm(stream, dq2, true, a_, false, wq_.grad, 1.0f, 1.0f));
  RETURN_IF_ERROR(ops::Gemm(stream, dk2, true, a_, false, wk_.grad, 1.0f, 1.0f));
  RETURN_IF_ERROR(ops::Gemm(stream, dv2, true, a_, false, wv_.grad, 1.0f, 1.0f));
  ASSIGN_OR_RETURN(Tensor da, NewActivation(stream, a_.shape(), dt));
  RETURN_IF_ERROR(ops::Gemm(stream, dq2, false, wq_.compute_value(), false, da));
  RETURN_IF_ERROR(ops::Gemm(stream, dk2, false, wk_.compute_value(), false, da, 1.0f, 1.0f));
  RETURN_IF_ERROR(ops::Gemm(stream, dv2, false, wv_.compute_value(), false, da, 1.0f, 1.0f));
  a_ = q_ = k_ = v_ = lse_ = o_ = Tensor();
  if (tp_ != nullptr) RETURN_IF_ERROR(parallel::AllReduceSum(*tp_, stream, da));  // column-parallel q/k/v
  return da;
}

}  // namespace moe::model
