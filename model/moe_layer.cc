#include "model/moe_layer.h"

#include <cmath>
#include <numeric>
#include <vector>

#include "model/alltoall_dispatcher.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"
#include "runtime/core/trace.h"

namespace moe::model {

absl::Status MoELayer::Init(Stream& stream, const std::string& prefix, const config::ModelConfig& cfg,
                            float init_std, float down_std, const ShardPlan& plan, uint64_t seed,
                            std::unique_ptr<TokenDispatcher> dispatcher) {
  const int64_t E = cfg.moe().num_experts();
  const int64_t e0 = plan.expert_begin(E), e1 = plan.expert_end(E);
  RETURN_IF_ERROR(router_.Init(stream, prefix, cfg, init_std, seed));
  erc_.Init(prefix, cfg.moe(), seed, plan);
  dispatcher_ = dispatcher ? std::move(dispatcher) : std::make_unique<LocalTokenDispatcher>(e0, e1);
  if (dispatcher_->expert_begin() != e0 || dispatcher_->expert_end() != e1) {
    return absl::InvalidArgumentError(
        absl::StrCat("MoELayer ", prefix, ": the dispatcher serves experts [", dispatcher_->expert_begin(),
                     ", ", dispatcher_->expert_end(), ") but this rank holds [", e0, ", ", e1, ")"));
  }
  if (ExpertTpGroup(plan) != nullptr && dispatcher_->ted_group() != nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "MoELayer ", prefix,
        ": the experts are sharded over TP (parallel.expert_tensor_parallel) but the dispatcher splits "
        "the tokens over TP (TED): every TP rank must dispatch all tokens; build the dispatcher with "
        "model::TedGroup(plan)"));
  }
  if (cfg.moe().shared_expert_ffn_hidden_size() > 0) {
    shared_ = std::make_unique<DenseMLP>();
    RETURN_IF_ERROR(shared_->Init(stream, prefix + "shared_expert.", cfg.hidden_size(),
                                  cfg.moe().shared_expert_ffn_hidden_size(), init_std, down_std, plan, seed));
    gated_ = cfg.moe().shared_expert_gate();
    if (gated_) {
      RETURN_IF_ERROR(CreateParameter(stream, prefix + "shared_expert_gate.weight",
                                      Shape{1, cfg.hidden_size()}, parallel::ParamKind::kDense,
                                      parallel::ShardSpec{}, InitSpec::Normal(init_std), seed,
                                      &shared_gate_));
    }
  }
  ASSIGN_OR_RETURN(experts_, MakeExperts(cfg.moe().experts_impl()));
  expert_tp_ = ExpertTpGroup(plan);
  return experts_->Init(stream, prefix + "experts.", cfg.hidden_size(), cfg.moe().expert_ffn_hidden_size(), E,
                        e0, e1, init_std, down_std, seed, expert_tp_ != nullptr ? plan.tp_size : 1,
                        plan.tp_rank);
}

absl::Status MoELayer::CollectParameters(parallel::ParameterList* list) {
  RETURN_IF_ERROR(list->Add(&router_.weight()));
  RETURN_IF_ERROR(list->Add(&experts_->gate_proj()));
  RETURN_IF_ERROR(list->Add(&experts_->up_proj()));
  RETURN_IF_ERROR(list->Add(&experts_->down_proj()));
  if (shared_ != nullptr) {
    RETURN_IF_ERROR(list->Add(&shared_->gate_proj()));
    RETURN_IF_ERROR(list->Add(&shared_->up_proj()));
    RETURN_IF_ERROR(list->Add(&shared_->down_proj()));
  }
  if (gated_) RETURN_IF_ERROR(list->Add(&shared_gate_));
  return absl::OkStatus();
}

absl::StatusOr<Tensor> MoELayer::Forward(Stream& stream, const Tensor& x, int64_t seq_len) {
  // One host read for all the host needs before it routes: the router's
  // logits (and expert bias) and the shared expert's gate logits.
  read_.Reset();
  {
    trace::Span span(stream, "route");
    RETURN_IF_ERROR(router_.EnqueueLogits(stream, x, seq_len, &read_));
  }
  // The coupling loss's proxies start from the router's rows: read with them.
  const size_t router_read = erc_.enabled() ? read_.Add(router_.weight().value) : 0;
  size_t gate_read = 0;
  if (gated_) {
    ASSIGN_OR_RETURN(Tensor logits, NewActivation(stream, Shape{x.size(0), 1}));
    RETURN_IF_ERROR(ops::Gemm(stream, x, false, shared_gate_.compute_value(), true, logits));
    gate_read = read_.Add(logits);
  }
  RETURN_IF_ERROR(read_.Start(stream));
  // The shared expert needs no routing: enqueued before the host waits for
  // the read, so that on a GPU it computes while the host routes.
  Tensor shared_out;
  if (shared_ != nullptr) {
    ASSIGN_OR_RETURN(shared_out, shared_->Forward(stream, x));
  }
  RETURN_IF_ERROR(read_.Wait());
  const RoutingPlan* plan = nullptr;
  {
    trace::Span span(stream, "route");
    ASSIGN_OR_RETURN(plan, router_.Route(read_));
  }
  ASSIGN_OR_RETURN(Tensor y, RoutedForward(stream, x, *plan));
  if (shared_ != nullptr) {
    RETURN_IF_ERROR(SharedCombine(stream, x, shared_out,
                                  gated_ ? read_.values(gate_read) : absl::Span<const float>(), y));
  }
  if (erc_.enabled()) {
    trace::Span span(stream, "ERC loss");
    RETURN_IF_ERROR(erc_.Forward(stream, router_.weight().value, experts_->gate_proj().value,
                                 experts_->expert_begin(), dispatcher_->ep_group(), read_.values(router_read))
                        .status());
  }
  return y;
}

absl::StatusOr<Tensor> MoELayer::Backward(Stream& stream, const Tensor& dy, float aux_scale, float z_scale,
                                          float erc_scale) {
  if (erc_.enabled()) {
    trace::Span span(stream, "ERC loss");
    RETURN_IF_ERROR(erc_.Backward(stream, erc_scale, experts_->gate_proj().value, router_.weight().grad,
                                  experts_->gate_proj().grad));
  }
  // The shared expert first: RoutedBackward releases x.
  Tensor dx_shared;
  if (shared_ != nullptr) {
    ASSIGN_OR_RETURN(dx_shared, NewActivation(stream, dy.shape(), dy.dtype()));
    RETURN_IF_ERROR(ops::Fill(stream, dx_shared, 0.0));
    RETURN_IF_ERROR(SharedBackward(stream, dy, dx_shared));
  }
  ASSIGN_OR_RETURN(Tensor dx, RoutedBackward(stream, dy, aux_scale, z_scale));
  if (shared_ != nullptr) RETURN_IF_ERROR(ops::Add(stream, dx, dx_shared, dx));
  return dx;
}

absl::Status MoELayer::SharedCombine(Stream& stream, const Tensor& x, const Tensor& s,
                                     absl::Span<const float> gate_logits, const Tensor& y) {
  if (!gated_) return ops::Add(stream, y, s, y);
  const int64_t T = x.size(0);
  // g_t = sigmoid(logit_t) and its slope g_t (1 - g_t), for the backward.
  std::vector<float> gate(T), slope(T);
  for (int64_t t = 0; t < T; ++t) {
    const double g = 1.0 / (1.0 + std::exp(-static_cast<double>(gate_logits[t])));
    gate[t] = static_cast<float>(g);
    slope[t] = static_cast<float>(g * (1.0 - g));
  }
  std::vector<int32_t> rows(T);
  std::iota(rows.begin(), rows.end(), 0);
  // Row t to row t: its order is 0..T (offsets) then 0..T-1 (no device sort).
  std::vector<int32_t> by_row(2 * T + 1);
  std::iota(by_row.begin(), by_row.begin() + T + 1, 0);
  std::iota(by_row.begin() + T + 1, by_row.end(), 0);
  HostUploads up;  // rows, gates, slopes and the order in one copy
  up.AddInts(rows, Shape{T});
  up.AddFloats(gate, Shape{T});
  up.AddFloats(slope, Shape{T});
  up.AddInts(by_row, Shape{2 * T + 1});
  ASSIGN_OR_RETURN(std::vector<Tensor> tables, up.Upload(stream));
  rows_ = tables[0];
  gate_ = tables[1];
  gate_slope_ = tables[2];
  // y_t += g_t s_t
  RETURN_IF_ERROR(ops::ScatterAddRows(stream, s, rows_, y, gate_, ScatterMode::kAccumulate, tables[3]));
  shared_out_ = s;
  shared_x_ = x;
  return absl::OkStatus();
}

absl::Status MoELayer::SharedBackward(Stream& stream, const Tensor& dy, const Tensor& dx) {
  if (!gated_) {
    ASSIGN_OR_RETURN(Tensor d, shared_->Backward(stream, dy));
    return ops::Add(stream, dx, d, dx);
  }
  const int64_t T = dy.size(0);
  // d g_t = dy_t . s_t; d logit_t = d g_t g_t (1 - g_t), on the stream (no host read).
  ASSIGN_OR_RETURN(Tensor dg, NewActivation(stream, Shape{T}));
  RETURN_IF_ERROR(ops::GatherRowDot(stream, dy, rows_, shared_out_, dg));
  RETURN_IF_ERROR(ops::Mul(stream, dg, gate_slope_, dg));
  // The f32 gate gradient enters the GEMMs in the compute dtype (bf16 operands; f32 weight grad).
  ASSIGN_OR_RETURN(Tensor dlogit, CastActivation(stream, dg.Reshape(Shape{T, 1}), shared_x_.dtype()));
  RETURN_IF_ERROR(ops::Gemm(stream, dlogit, true, shared_x_, false, shared_gate_.grad, 1.0f, 1.0f));
  RETURN_IF_ERROR(ops::Gemm(stream, dlogit, false, shared_gate_.compute_value(), false, dx, 1.0f, 1.0f));
  // The shared expert sees g_t dy_t.
  ASSIGN_OR_RETURN(Tensor dys, NewActivation(stream, dy.shape(), dy.dtype()));
  RETURN_IF_ERROR(ops::GatherRows(stream, dy, rows_, dys, gate_));  // dys_t = g_t dy_t
  ASSIGN_OR_RETURN(Tensor d, shared_->Backward(stream, dys));
  RETURN_IF_ERROR(ops::Add(stream, dx, d, dx));
  shared_out_ = shared_x_ = rows_ = gate_ = gate_slope_ = Tensor();
  return absl::OkStatus();
}

absl::StatusOr<Tensor> MoELayer::RoutedForward(Stream& stream, const Tensor& x, const RoutingPlan& routing) {
  const RoutingPlan* plan = &routing;
  llep_active_ = false;
  if (llep_ != nullptr) {
    trace::Span span(stream, "LLEP plan", trace::Kind::kComm);
    ASSIGN_OR_RETURN(llep_active_, llep_->Plan(stream, x, *plan, dispatcher_->num_chunks()));
  }
  x_ = x;
  if (llep_active_) return llep_->Forward(stream, x, *plan, *experts_, *dispatcher_);
  saved_.assign(dispatcher_->num_chunks(), Experts::Saved());
  const int64_t e0 = dispatcher_->expert_begin(), num_local = dispatcher_->expert_end() - e0;
  auto forward = [&](int chunk, const Tensor& rows,
                     absl::Span<const int64_t> offsets) -> absl::StatusOr<Tensor> {
    ASSIGN_OR_RETURN(Tensor out, experts_->Forward(stream, rows, offsets.subspan(e0, num_local + 1)));
    saved_[chunk] = experts_->TakeSaved();
    RETURN_IF_ERROR(SumExpertPartials(expert_tp_, stream, out));
    return out;
  };
  // LLEP's count gather gave the receive counts (no count exchange); without LLEP, none.
  return dispatcher_->ForwardPipelined(stream, x, *plan, forward,
                                       llep_ != nullptr ? &llep_->reroute() : nullptr);
}

absl::StatusOr<Tensor> MoELayer::RoutedBackward(Stream& stream, const Tensor& dy, float aux_scale,
                                                float z_scale) {
  Tensor dweights;  // f32 [T * k] on the device
  // Overwritten by the dispatcher (TokenDispatcher::BackwardPipelined): no fill.
  ASSIGN_OR_RETURN(Tensor dx_experts, NewActivation(stream, x_.shape(), x_.dtype()));
  if (llep_active_) {
    llep_active_ = false;
    RETURN_IF_ERROR(llep_->Backward(stream, dy, *experts_, *dispatcher_, &dweights, dx_experts));
  } else {
    auto backward = [&](int chunk, const Tensor& rows, absl::Span<const int64_t>) -> absl::StatusOr<Tensor> {
      experts_->RestoreSaved(std::move(saved_[chunk]));
      ASSIGN_OR_RETURN(Tensor dx_rows, experts_->Backward(stream, rows));
      RETURN_IF_ERROR(SumExpertPartials(expert_tp_, stream, dx_rows));
      return dx_rows;
    };
    RETURN_IF_ERROR(dispatcher_->BackwardPipelined(stream, dy, backward, &dweights, dx_experts));
    saved_.clear();
  }
  trace::Span span(stream, "route");
  ASSIGN_OR_RETURN(Tensor dx, router_.Backward(stream, dweights, aux_scale, z_scale));
  RETURN_IF_ERROR(ops::Add(stream, dx, dx_experts, dx));
  x_ = Tensor();
  return dx;
}

}  // namespace moe::model
