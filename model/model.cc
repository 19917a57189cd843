#include "model/model.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "runtime/core/config.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"
#include "runtime/core/trace.h"

namespace moe::model {

absl::StatusOr<std::unique_ptr<Model>> Model::Create(const config::ModelConfig& cfg, Stream& stream,
                                                     uint64_t seed, const ShardPlan& plan,
                                                     DispatcherFactory dispatchers, DType compute_dtype) {
  RETURN_IF_ERROR(ValidateModelConfig(cfg, plan));
  if (plan.tp_size > 1 && (plan.tp_group == nullptr || plan.tp_group->size() != plan.tp_size ||
                           plan.tp_group->rank() != plan.tp_rank)) {
    return absl::InvalidArgumentError(
        absl::StrCat("parallel.tensor = ", plan.tp_size, " needs the TP group in ShardPlan::tp_group (of ",
                     plan.tp_size, " ranks, this one at tp_rank ", plan.tp_rank, ")"));
  }
  if (plan.ep_size > 1 && !dispatchers) {
    return absl::InvalidArgumentError(
        absl::StrCat("parallel.expert = ", plan.ep_size,
                     " needs an all-to-all token dispatcher (DispatcherFactory); none was given"));
  }
  std::unique_ptr<Model> model(new Model());
  model->cfg_ = cfg;
  RETURN_IF_ERROR(model->Init(stream, seed, plan, dispatchers));
  RETURN_IF_ERROR(SetComputeCopies(stream, model->params_, compute_dtype));
  RETURN_IF_ERROR(stream.Synchronize());
  return model;
}

absl::Status Model::Init(Stream& stream, uint64_t seed, const ShardPlan& plan,
                         const DispatcherFactory& dispatchers) {
  const int64_t V = cfg_.vocab_size(), d = cfg_.hidden_size();
  const float std = static_cast<float>(cfg_.init_std());
  RETURN_IF_ERROR(embed_.Init(stream, V, d, std, seed));
  RETURN_IF_ERROR(params_.Add(&embed_.weight()));
  for (int l = 0; l < cfg_.num_layers(); ++l) {
    auto block = std::make_unique<TransformerBlock>();
    std::unique_ptr<TokenDispatcher> dispatcher;
    if (dispatchers && IsMoeLayer(cfg_, l)) dispatcher = dispatchers(l);
    RETURN_IF_ERROR(block->Init(stream, cfg_, l, plan, seed, std::move(dispatcher)));
    RETURN_IF_ERROR(block->CollectParameters(&params_));
    if (block->is_moe() && block->moe()->router().has_expert_bias()) {
      RETURN_IF_ERROR(buffers_.Add(&block->moe()->router().expert_bias()));
    }
    blocks_.push_back(std::move(block));
  }
  RETURN_IF_ERROR(
      final_norm_.Init(stream, "model.norm.weight", d, static_cast<float>(cfg_.norm_eps()), seed));
  RETURN_IF_ERROR(params_.Add(&final_norm_.weight()));
  if (!cfg_.tie_word_embeddings()) {
    RETURN_IF_ERROR(CreateParameter(stream, "lm_head.weight", Shape{V, d}, parallel::ParamKind::kDense,
                                    parallel::ShardSpec{}, InitSpec::Normal(std), seed, &lm_head_));
    RETURN_IF_ERROR(params_.Add(&lm_head_));
  }
  return stream.Synchronize();
}

absl::StatusOr<LossParts> Model::Forward(Stream& stream, absl::Span<const int32_t> tokens, int64_t num_seqs,
                                         HostReadback* ce_read) {
  if (num_seqs <= 0 || tokens.size() % num_seqs != 0 || static_cast<int64_t>(tokens.size()) / num_seqs < 2) {
    return absl::InvalidArgumentError(absl::StrCat("Model::Forward: ", tokens.size(), " tokens are not ",
                                                   num_seqs, " sequences of S + 1 >= 2 tokens"));
  }
  const int64_t S = static_cast<int64_t>(tokens.size()) / num_seqs - 1;
  if (S > cfg_.seq_len()) {
    return absl::InvalidArgumentError(absl::StrCat("Model::Forward: sequences of ", S,
                                                   " positions exceed model.seq_len = ", cfg_.seq_len()));
  }
  const int64_t T = num_seqs * S, V = cfg_.vocab_size();
  std::vector<int32_t> input(T), target(T);
  for (int64_t b = 0; b < num_seqs; ++b) {
    for (int64_t s = 0; s < S; ++s) {
      input[b * S + s] = tokens[b * (S + 1) + s];
      target[b * S + s] = tokens[b * (S + 1) + s + 1];
    }
  }
  for (int64_t i = 0; i < static_cast<int64_t>(tokens.size()); ++i) {
    if (tokens[i] < 0 || tokens[i] >= V) {
      return absl::InvalidArgumentError(absl::StrCat("Model::Forward: token ", i, " = ", tokens[i],
                                                     " is outside the vocabulary [0, ", V, ")"));
    }
  }
  num_tokens_ = T;
  HostUploads up;  // inputs and targets in one copy
  up.AddInts(input, Shape{T});
  up.AddInts(target, Shape{T});
  ASSIGN_OR_RETURN(std::vector<Tensor> tokens_dev, up.Upload(stream));
  const Tensor ids = tokens_dev[0];
  targets_ = tokens_dev[1];
  Residual h;
  ASSIGN_OR_RETURN(h.h, embed_.Forward(stream, ids));
  LossParts loss;
  for (size_t l = 0; l < blocks_.size(); ++l) {
    auto& block = blocks_[l];
    trace::Span span(stream, "forward", trace::Kind::kCompute, static_cast<int>(l));
    ASSIGN_OR_RETURN(h, block->Forward(stream, h, num_seqs, S));
    loss.aux += block->aux_loss();
    loss.z += block->z_loss();
    loss.erc += block->erc_loss();
  }
  if (h.branch.defined()) {
    ASSIGN_OR_RETURN(hn_, final_norm_.AddForward(stream, h.h, h.branch));  // the last block's add, fused
  } else {
    ASSIGN_OR_RETURN(hn_, final_norm_.Forward(stream, h.h));
  }
  const Tensor& head =
      cfg_.tie_word_embeddings() ? embed_.weight().compute_value() : lm_head_.compute_value();
  // Logits are f32 in every precision (f32 output of the f32-accumulated GEMM).
  ASSIGN_OR_RETURN(logits_, NewActivation(stream, Shape{T, V}));
  RETURN_IF_ERROR(ops::Gemm(stream, hn_, false, head, true, logits_));
  ASSIGN_OR_RETURN(Tensor losses, NewActivation(stream, Shape{T}));
  ASSIGN_OR_RETURN(lse_, NewActivation(stream, Shape{T}));
  RETURN_IF_ERROR(ops::CrossEntropy(stream, logits_, targets_, losses, lse_));
  ASSIGN_OR_RETURN(Tensor sum, NewActivation(stream, Shape{1}));
  RETURN_IF_ERROR(ops::ReduceSum(stream, losses, sum, static_cast<float>(1.0 / T)));
  if (ce_read != nullptr) {
    loss.ce_read = ce_read->Add(sum);
    return loss;
  }
  ASSIGN_OR_RETURN(loss.ce, ReadScalar(stream, sum));
  return loss;
}

absl::Status Model::Backward(Stream& stream, float loss_scale, const BlockDoneFn& on_block_done) {
  if (!logits_.defined()) {
    return absl::FailedPreconditionError("Model::Backward called without a Forward");
  }
  const int64_t T = num_tokens_;
  const bool tied = cfg_.tie_word_embeddings();
  parallel::Parameter& head = tied ? embed_.weight() : lm_head_;
  // dlogits overwrite the logits in fp32; in bf16 they are written in bf16 (the
  // gradient enters the bf16 backward there; the f32 logits are released after).
  const DType dt = hn_.dtype();
  Tensor dlogits = logits_;
  if (dt != logits_.dtype()) {
    ASSIGN_OR_RETURN(dlogits, NewActivation(stream, logits_.shape(), dt));
  }
  RETURN_IF_ERROR(ops::CrossEntropyBackward(stream, logits_, targets_, lse_, Tensor(),
                                            static_cast<float>(loss_scale / T), dlogits));
  logits_ = Tensor();
  RETURN_IF_ERROR(ops::Gemm(stream, dlogits, true, hn_, false, head.grad, 1.0f, 1.0f));
  ASSIGN_OR_RETURN(Tensor dhn, NewActivation(stream, hn_.shape(), dt));
  RETURN_IF_ERROR(ops::Gemm(stream, dlogits, false, head.compute_value(), false, dhn));
  dlogits = hn_ = lse_ = Tensor();
  ASSIGN_OR_RETURN(Tensor dh, NewActivation(stream, dhn.shape(), dt));
  RETURN_IF_ERROR(final_norm_.Backward(stream, dhn, dh, /*accumulate_dx=*/false));
  dhn = Tensor();
  for (int l = num_layers() - 1; l >= 0; --l) {
    trace::Span span(stream, "backward", trace::Kind::kCompute, l);
    RETURN_IF_ERROR(blocks_[l]->Backward(stream, dh, loss_scale, loss_scale, loss_scale));
    if (on_block_done) {
      trace::Span sync(stream, "grad sync bucket", trace::Kind::kComm);
      RETURN_IF_ERROR(on_block_done(l));
    }
  }
  RETURN_IF_ERROR(embed_.Backward(stream, dh));
  targets_ = Tensor();
  return absl::OkStatus();
}

absl::Status Model::UpdateExpertBiases(
    Stream& stream, const std::function<absl::Status(std::vector<double>&)>& sum_over_data_parallel) {
  std::vector<Router*> routers;
  for (auto& block : blocks_) {
    if (block->is_moe() && block->moe()->router().has_expert_bias())
      routers.push_back(&block->moe()->router());
  }
  if (routers.empty()) return absl::OkStatus();
  const int64_t E = cfg_.moe().num_experts();
  std::vector<double> load;
  for (Router* r : routers) load.insert(load.end(), r->pending_load().begin(), r->pending_load().end());
  RETURN_IF_ERROR(sum_over_data_parallel(load));
  for (size_t i = 0; i < routers.size(); ++i) {
    RETURN_IF_ERROR(routers[i]->UpdateExpertBias(stream, absl::MakeConstSpan(load).subspan(i * E, E)));
  }
  return absl::OkStatus();
}

void Model::SetStep(int64_t step) {
  for (auto& block : blocks_)
    if (block->is_moe()) block->moe()->set_step(step);
}

absl::Status Model::RefreshComputeWeights(Stream& stream) { return RefreshComputeCopies(stream, params_); }

DType Model::compute_dtype() const {
  return params_.size() > 0 ? params_[0]->compute_value().dtype() : DType::kF32;
}

absl::Status Model::ZeroGrads(Stream& stream) {
  // One list fill: a few launches on a GPU, not one per parameter.
  std::vector<Tensor> grads;
  grads.reserve(params_.size());
  for (const parallel::Parameter* p : params_) grads.push_back(p->grad);
  return ops::Fill(stream, grads, 0.0);
}

}  // namespace moe::model
