#include "model/moe_layer.h"

#include <vector>

#include "model/alltoall_dispatcher.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"

namespace moe::model {

absl::Status MoELayer::Init(Stream& stream, const std::string& prefix, const config::ModelConfig& cfg,
                            float init_std, float down_std, const ShardPlan& plan, uint64_t seed,
                            std::unique_ptr<TokenDispatcher> dispatcher) {
  const int64_t E = cfg.moe().num_experts();
  const int64_t e0 = plan.expert_begin(E), e1 = plan.expert_end(E);
  RETURN_IF_ERROR(router_.Init(stream, prefix, cfg, init_std, seed));
  dispatcher_ = dispatcher ? std::move(dispatcher) : std::make_unique<LocalTokenDispatcher>(e0, e1);
  if (dispatcher_->expert_begin() != e0 || dispatcher_->expert_end() != e1) {
    return absl::InvalidArgumentError(
        absl::StrCat("MoELayer ", prefix, ": the dispatcher serves experts [", dispatcher_->expert_begin(),
                     ", ", dispatcher_->expert_end(), ") but this rank holds [", e0, ", ", e1, ")"));
  }
  ASSIGN_OR_RETURN(experts_, MakeExperts(cfg.moe().experts_impl()));
  return experts_->Init(stream, prefix + "experts.", cfg.hidden_size(), cfg.moe().expert_ffn_hidden_size(), E,
                        e0, e1, init_std, down_std, seed);
}

absl::StatusOr<Tensor> MoELayer::Forward(Stream& stream, const Tensor& x, int64_t seq_len) {
  ASSIGN_OR_RETURN(const RoutingPlan* plan, router_.Forward(stream, x, seq_len));
  auto* a2a = dynamic_cast<AllToAllTokenDispatcher*>(dispatcher_.get());
  llep_active_ = false;
  if (llep_ != nullptr) {
    if (a2a == nullptr) {
      return absl::FailedPreconditionError(
          "MoELayer: LLEP needs the all-to-all dispatcher (expert parallel > 1)");
    }
    ASSIGN_OR_RETURN(llep_active_, llep_->Plan(stream, x, *plan));
  }
  x_ = x;
  if (llep_active_) return llep_->Forward(stream, x, *plan, *experts_, *a2a);
  if (a2a != nullptr) {
    saved_.assign(a2a->num_chunks(), Experts::Saved());
    const int64_t e0 = a2a->expert_begin(), num_local = a2a->expert_end() - e0;
    auto forward = [&](int chunk, const Tensor& rows,
                       absl::Span<const int64_t> offsets) -> absl::StatusOr<Tensor> {
      ASSIGN_OR_RETURN(Tensor out, experts_->Forward(stream, rows, offsets.subspan(e0, num_local + 1)));
      saved_[chunk] = experts_->TakeSaved();
      return out;
    };
    return a2a->ForwardPipelined(stream, x, *plan, forward);
  }
  ASSIGN_OR_RETURN(ExpertInput in, dispatcher_->Dispatch(stream, x, *plan));
  ASSIGN_OR_RETURN(Tensor out, experts_->Forward(stream, in.tokens, in.offsets));
  return dispatcher_->Combine(stream, out);
}

absl::StatusOr<Tensor> MoELayer::Backward(Stream& stream, const Tensor& dy, float aux_scale, float z_scale) {
  std::vector<float> dweights;
  if (auto* a2a = dynamic_cast<AllToAllTokenDispatcher*>(dispatcher_.get())) {
    ASSIGN_OR_RETURN(Tensor dx_experts, NewActivation(stream, x_.shape()));
    RETURN_IF_ERROR(ops::Fill(stream, dx_experts, 0.0));
    if (llep_active_) {
      llep_active_ = false;
      RETURN_IF_ERROR(llep_->Backward(stream, dy, *experts_, *a2a, &dweights, dx_experts));
    } else {
      auto backward = [&](int chunk, const Tensor& rows,
                          absl::Span<const int64_t>) -> absl::StatusOr<Tensor> {
        experts_->RestoreSaved(std::move(saved_[chunk]));
        return experts_->Backward(stream, rows);
      };
      RETURN_IF_ERROR(a2a->BackwardPipelined(stream, dy, backward, &dweights, dx_experts));
      saved_.clear();
    }
    ASSIGN_OR_RETURN(Tensor dx, router_.Backward(stream, dweights, aux_scale, z_scale));
    RETURN_IF_ERROR(ops::Add(stream, dx, dx_experts, dx));
    x_ = Tensor();
    return dx;
  }
  ASSIGN_OR_RETURN(Tensor d_out, dispatcher_->CombineBackward(stream, dy, &dweights));
  ASSIGN_OR_RETURN(Tensor d_in, experts_->Backward(stream, d_out));
  ASSIGN_OR_RETURN(Tensor dx, router_.Backward(stream, dweights, aux_scale, z_scale));
  RETURN_IF_ERROR(dispatcher_->DispatchBackward(stream, d_in, dx));
  x_ = Tensor();
  return dx;
}

}  // namespace moe::model
