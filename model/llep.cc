#include "model/llep.h"

#include <algorithm>
#include <chrono>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "model/model.h"
#include "model/swiglu.h"
#include "parallel/layout.h"
#include "parallel/llep_exchange.h"
#include "parallel/tensor_parallel.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"
#include "runtime/core/trace.h"

namespace moe::model {
namespace {

using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

absl::StatusOr<Tensor> NewTensor(Stream& stream, Shape shape, MemoryCategory category,
                                 DType dtype = DType::kF32) {
  return Tensor::Empty(stream.backend(), shape, dtype, category);
}

// The weights the experts compute with (bf16 copies under train.precision bf16):
// what LLEP lends.
parallel::ExpertTensors ExpertValues(Experts& e) {
  return {e.gate_proj().compute_value(), e.up_proj().compute_value(), e.down_proj().compute_value()};
}
parallel::ExpertTensors ExpertGrads(Experts& e) {
  return {e.gate_proj().grad, e.up_proj().grad, e.down_proj().grad};
}

}  // namespace

// ---- Start-up rates and options ---------------------------------------------------

absl::StatusOr<LlepRates> MeasureLlepRates(Stream& stream, comm::Communicator& host_ep,
                                           comm::Communicator& ep_p2p) {
  LlepRates rates;
  {
    const int64_t n = 512;
    ASSIGN_OR_RETURN(Tensor a, NewTensor(stream, Shape{n, n}, MemoryCategory::kOther));
    ASSIGN_OR_RETURN(Tensor b, NewTensor(stream, Shape{n, n}, MemoryCategory::kOther));
    ASSIGN_OR_RETURN(Tensor c, NewTensor(stream, Shape{n, n}, MemoryCategory::kOther));
    RETURN_IF_ERROR(ops::Fill(stream, a, 0.5));
    RETURN_IF_ERROR(ops::Fill(stream, b, 0.25));
    RETURN_IF_ERROR(ops::Gemm(stream, a, false, b, true, c));  // warm-up
    RETURN_IF_ERROR(stream.Synchronize());
    double best = 1e30;
    for (int i = 0; i < 3; ++i) {
      const auto t0 = Clock::now();
      RETURN_IF_ERROR(ops::Gemm(stream, a, false, b, true, c));
      RETURN_IF_ERROR(stream.Synchronize());
      best = std::min(best, Since(t0));
    }
    rates.gemm_flops_per_s = 2.0 * n * n * n / std::max(best, 1e-9);
  }
  const int P = ep_p2p.size();
  if (P > 1) {
    // The data plane's link: device buffers, stream-ordered, timed from the host
    // around a Synchronize (start-up only).
    const int64_t count = 2 << 20;  // 8 MiB of f32
    ASSIGN_OR_RETURN(Tensor send, NewTensor(stream, Shape{count}, MemoryCategory::kCommunication));
    ASSIGN_OR_RETURN(Tensor recv, NewTensor(stream, Shape{count}, MemoryCategory::kCommunication));
    RETURN_IF_ERROR(ops::Fill(stream, send, 1.0));
    const int r = ep_p2p.rank();
    const std::vector<comm::P2POp> ring = {
        comm::P2POp::Send(send.raw_data(), count, DType::kF32, (r + 1) % P),
        comm::P2POp::Recv(recv.raw_data(), count, DType::kF32, (r + P - 1) % P)};
    RETURN_IF_ERROR(stream.Synchronize());
    double best = 1e30;
    for (int i = 0; i < 3; ++i) {
      const auto t0 = Clock::now();
      RETURN_IF_ERROR(ep_p2p.GroupP2P(ring, stream));
      RETURN_IF_ERROR(stream.Synchronize());
      best = std::min(best, Since(t0));
    }
    rates.p2p_bytes_per_s = count * sizeof(float) / std::max(best, 1e-9);
  } else {
    rates.p2p_bytes_per_s = 1e12;
  }
  // Control plane: host doubles over the EP group's host communicator.
  double v[2] = {rates.gemm_flops_per_s, rates.p2p_bytes_per_s};
  ASSIGN_OR_RETURN(comm::Work w, host_ep.AllReduce(v, v, 2, DType::kF64, comm::ReduceOp::kMin));
  RETURN_IF_ERROR(w.Wait());
  rates.gemm_flops_per_s = v[0];
  rates.p2p_bytes_per_s = v[1];
  return rates;
}

parallel::LlepOptions LlepOptionsFromConfig(const config::LlepConfig& cfg, const LlepRates& measured,
                                            int64_t hidden_size, int64_t expert_ffn_hidden_size,
                                            DType weight_dtype) {
  parallel::LlepOptions o;
  o.trigger_ratio = cfg.trigger_ratio();
  o.capacity_factor = cfg.capacity_factor();
  o.min_tokens_per_gemm = cfg.min_tokens_per_gemm();
  o.max_borrowed_experts = cfg.max_borrowed_experts();
  if (cfg.cost_model()) {
    const double d = static_cast<double>(hidden_size), f = static_cast<double>(expert_ffn_hidden_size);
    o.flops_per_token = 18.0 * d * f;  // 3 GEMMs of 2 d Fe forward, twice that backward
    o.weight_bytes = 3.0 * d * f * static_cast<double>(DTypeSize(weight_dtype));
    o.gemm_flops_per_s = cfg.gemm_gflops() > 0 ? cfg.gemm_gflops() * 1e9 : measured.gemm_flops_per_s;
    o.p2p_bytes_per_s = cfg.p2p_gbps() > 0 ? cfg.p2p_gbps() * 1e9 : measured.p2p_bytes_per_s;
  }
  return o;
}

// ---- LlepRunner -----------------------------------------------------------------------

LlepRunner::LlepRunner(comm::Communicator* host_ep, comm::Communicator* ep_p2p, comm::Communicator* tp,
                       int64_t num_experts, parallel::LlepOptions options, comm::Communicator* expert_tp)
    : ep_(host_ep),
      ep_p2p_(ep_p2p),
      tp_(tp),
      expert_tp_(expert_tp),
      num_experts_(num_experts),
      options_(options) {
  std::tie(expert_begin_, expert_end_) = parallel::OwnedExperts(num_experts, ep_->size(), ep_->rank());
}

void LlepRunner::Clear() {
  borrowed_ = Borrowed();
  chunks_.clear();
  weights_landed_.reset();
  forward_done_ = false;
}

absl::StatusOr<bool> LlepRunner::Plan(Stream& stream, const Tensor& x, const RoutingPlan& plan,
                                      int num_chunks) {
  (void)stream;
  const int64_t T = plan.num_tokens, E = num_experts_;
  const int k = plan.top_k;
  if (plan.num_experts != E || x.rank() != 2 || x.size(0) != T || num_chunks < 1) {
    return absl::InvalidArgumentError(absl::StrCat("LlepRunner: x ", x.ToString(), " and a plan of ",
                                                   plan.num_experts, " experts over ", T, " tokens in ",
                                                   num_chunks, " chunks do not match E = ", E));
  }
  Clear();  // a forward without backward (evaluation) leaves state behind
  const int tp_size = tp_ != nullptr ? tp_->size() : 1, tp_rank = tp_ != nullptr ? tp_->rank() : 0;
  std::tie(slice_begin_, slice_end_) = parallel::RowSlice(T, tp_size, tp_rank);
  // This rank's kept assignments per chunk (the dispatcher's chunks: consecutive
  // token ranges of the TED slice) and expert.
  std::vector<int64_t> chunk_counts(static_cast<size_t>(num_chunks) * E, 0);
  for (int c = 0; c < num_chunks; ++c) {
    const auto [cb, ce] = parallel::RowSlice(slice_end_ - slice_begin_, num_chunks, c);
    for (int64_t a = (slice_begin_ + cb) * k; a < (slice_begin_ + ce) * k; ++a) {
      if (!plan.kept[a]) continue;
      ++chunk_counts[static_cast<size_t>(c) * E + plan.experts[a]];
    }
  }
  const int P = ep_->size(), me = ep_->rank();
  // Control plane: the count table is tiny and the planner runs on the host.
  // Gathered per chunk, it also gives every rank what it will receive, fired
  // or not: the dispatcher skips its count exchange.
  ASSIGN_OR_RETURN(const auto all_chunk_counts, parallel::GatherExpertCounts(*ep_, chunk_counts));
  counts_.assign(P, std::vector<int64_t>(E, 0));
  for (int p = 0; p < P; ++p)
    for (size_t i = 0; i < chunk_counts.size(); ++i) counts_[p][i % E] += all_chunk_counts[p][i];
  ASSIGN_OR_RETURN(plan_, parallel::PlanLlep(counts_, options_));
  stats_ = LlepStats();
  stats_.fired = plan_.active;
  stats_.imbalance_before = plan_.imbalance_before;
  stats_.imbalance_after = plan_.active ? plan_.imbalance_after : plan_.imbalance_before;
  reroute_ = Reroute();
  ASSIGN_OR_RETURN(reroute_.recv_counts,
                   parallel::ChunkReceiveCounts(plan_, counts_, all_chunk_counts, num_chunks, me));
  if (!plan_.active) return false;
  stats_.tokens_moved = plan_.tokens_moved;
  for (const auto& m : plan_.weight_moves)
    if (m.dst == me) ++stats_.borrowed_experts;
  // This rank's rows of expert e split over computing ranks in token order.
  const auto mine = parallel::SourceSplits(plan_, counts_, me);
  reroute_.dst.assign(T * k, -1);
  std::vector<size_t> range(E, 0);
  std::vector<int64_t> left(E, 0);
  for (int64_t e = 0; e < E; ++e) left[e] = mine[e].empty() ? 0 : mine[e][0].second;
  for (int64_t a = slice_begin_ * k; a < slice_end_ * k; ++a) {
    if (!plan.kept[a]) continue;
    const int64_t e = plan.experts[a];
    while (left[e] == 0 && range[e] + 1 < mine[e].size()) left[e] = mine[e][++range[e]].second;
    if (left[e] == 0) {
      return absl::InternalError(absl::StrCat("LlepRunner: the plan splits fewer rows of expert ", e,
                                              " than EP rank ", me, " holds (", counts_[me][e], ")"));
    }
    reroute_.dst[a] = mine[e][range[e]].first;
    --left[e];
  }
  return true;
}

absl::Status LlepRunner::PostWeightMoves(Stream& stream, Experts& local) {
  const int me = ep_->rank();
  // The compute copies travel (bf16 under train.precision bf16); gradients come back in f32.
  const Tensor& gate = local.gate_proj().compute_value();
  const DType dt = gate.dtype();
  const int64_t ffn = gate.size(1), d = gate.size(2);
  borrowed_ = Borrowed();
  borrowed_.experts = parallel::BorrowedExperts(plan_, me);
  const int64_t B = static_cast<int64_t>(borrowed_.experts.size());
  stats_.weight_bytes_moved =
      static_cast<int64_t>(plan_.weight_moves.size()) * 3 * ffn * d * static_cast<int64_t>(DTypeSize(dt));
  if (B > 0) {
    ASSIGN_OR_RETURN(borrowed_.weights.gate,
                     NewTensor(stream, Shape{B, ffn, d}, MemoryCategory::kParameters, dt));
    ASSIGN_OR_RETURN(borrowed_.weights.up,
                     NewTensor(stream, Shape{B, ffn, d}, MemoryCategory::kParameters, dt));
    ASSIGN_OR_RETURN(borrowed_.weights.down,
                     NewTensor(stream, Shape{B, d, ffn}, MemoryCategory::kParameters, dt));
  }
  ASSIGN_OR_RETURN(weights_landed_, parallel::StartWeightMoves(*ep_p2p_, stream, plan_, expert_begin_,
                                                               ExpertValues(local), borrowed_.weights));
  return absl::OkStatus();
}

absl::Status LlepRunner::MakeSegments(absl::Span<const int64_t> offsets, int64_t num_rows,
                                      ChunkState* chunk) const {
  const std::vector<int64_t>& experts = borrowed_.experts;
  int64_t borrowed_rows = 0;
  for (int64_t e : experts) borrowed_rows += offsets[e + 1] - offsets[e];
  if (borrowed_rows != num_rows - (offsets[expert_end_] - offsets[expert_begin_])) {
    return absl::InternalError(absl::StrCat("LlepRunner: EP rank ", ep_->rank(),
                                            " received rows for a foreign expert it did not borrow"));
  }
  const int64_t B = static_cast<int64_t>(experts.size());
  const int64_t split = std::lower_bound(experts.begin(), experts.end(), expert_begin_) - experts.begin();
  for (int s = 0; s < 2; ++s) {
    Segment& seg = chunk->segments[s];
    seg = Segment();
    seg.first = s == 0 ? 0 : split;
    seg.last = s == 0 ? split : B;
    seg.row_begin = s == 0 ? 0 : offsets[expert_end_];
    seg.offsets.assign(1, 0);
    for (int64_t i = seg.first; i < seg.last; ++i) {
      const int64_t e = experts[i];
      seg.offsets.push_back(seg.offsets.back() + offsets[e + 1] - offsets[e]);
    }
    seg.row_end = seg.row_begin + seg.offsets.back();
  }
  return absl::OkStatus();
}

absl::Status LlepRunner::BorrowedForward(Stream& stream, Segment& seg, const Tensor& grouped,
                                         const Tensor& out) {
  const int64_t n = seg.row_end - seg.row_begin, ffn = borrowed_.weights.gate.size(1);
  if (n == 0) return absl::OkStatus();
  seg.x = grouped.Slice(seg.row_begin, seg.row_end);
  ASSIGN_OR_RETURN(seg.g, NewActivation(stream, Shape{n, ffn}, grouped.dtype()));
  ASSIGN_OR_RETURN(seg.u, NewActivation(stream, Shape{n, ffn}, grouped.dtype()));
  ASSIGN_OR_RETURN(seg.act, NewActivation(stream, Shape{n, ffn}, grouped.dtype()));
  const parallel::ExpertTensors& w = borrowed_.weights;
  return GroupedSwiGLUForward(stream, seg.x, w.gate.Slice(seg.first, seg.last),
                              w.up.Slice(seg.first, seg.last), w.down.Slice(seg.first, seg.last), seg.offsets,
                              seg.g, seg.u, seg.act, out.Slice(seg.row_begin, seg.row_end));
}

absl::Status LlepRunner::BorrowedBackward(Stream& stream, Segment& seg, const Tensor& dy, const Tensor& dx) {
  const int64_t n = seg.row_end - seg.row_begin;
  if (n == 0) return absl::OkStatus();
  const parallel::ExpertTensors &w = borrowed_.weights, &dw = borrowed_.grads;
  const int64_t a = seg.first, b = seg.last;
  ASSIGN_OR_RETURN(Tensor dact, NewActivation(stream, seg.act.shape(), seg.act.dtype()));
  RETURN_IF_ERROR(GroupedSwiGLUBackward(
      stream, seg.x, w.gate.Slice(a, b), w.up.Slice(a, b), w.down.Slice(a, b), seg.offsets, seg.g, seg.u,
      seg.act, dact, dy.Slice(seg.row_begin, seg.row_end), dw.gate.Slice(a, b), dw.up.Slice(a, b),
      dw.down.Slice(a, b), dx.Slice(seg.row_begin, seg.row_end)));
  seg.x = seg.g = seg.u = seg.act = Tensor();
  return absl::OkStatus();
}

absl::StatusOr<Tensor> LlepRunner::RunExperts(Stream& stream, int chunk, const Tensor& grouped,
                                              absl::Span<const int64_t> offsets, bool forward,
                                              Experts& local) {
  ChunkState& state = chunks_[chunk];
  const int64_t N = grouped.size(0), lb = offsets[expert_begin_], le = offsets[expert_end_];
  const int64_t hidden = grouped.size(1);
  Tensor local_out;
  if (forward) {
    RETURN_IF_ERROR(MakeSegments(offsets, N, &state));
    std::vector<int64_t> lo(offsets.begin() + expert_begin_, offsets.begin() + expert_end_ + 1);
    for (int64_t& v : lo) v -= lb;
    ASSIGN_OR_RETURN(local_out, local.Forward(stream, grouped.Slice(lb, le), lo));
    state.local = local.TakeSaved();
  } else {
    local.RestoreSaved(std::move(state.local));
    ASSIGN_OR_RETURN(local_out, local.Backward(stream, grouped.Slice(lb, le)));
  }
  if (lb == 0 && le == N) {  // no borrowed rows in this chunk
    RETURN_IF_ERROR(SumExpertPartials(expert_tp_, stream, local_out));
    return local_out;
  }
  if (forward) stats_.borrowed_rows += N - (le - lb);
  ASSIGN_OR_RETURN(Tensor out, NewActivation(stream, Shape{N, hidden}, grouped.dtype()));
  if (le > lb) RETURN_IF_ERROR(ops::Copy(stream, local_out, out.Slice(lb, le)));
  local_out = Tensor();
  // Borrowed weights are read after they landed (a device-side wait).
  if (forward && weights_landed_ != nullptr) RETURN_IF_ERROR(stream.Wait(*weights_landed_));
  for (Segment& seg : state.segments) {
    if (forward) {
      RETURN_IF_ERROR(BorrowedForward(stream, seg, grouped, out));
    } else {
      RETURN_IF_ERROR(BorrowedBackward(stream, seg, grouped, out));
    }
  }
  RETURN_IF_ERROR(SumExpertPartials(expert_tp_, stream, out));
  return out;
}

absl::StatusOr<Tensor> LlepRunner::Forward(Stream& stream, const Tensor& x, const RoutingPlan& plan,
                                           Experts& local, TokenDispatcher& dispatcher) {
  if (!plan_.active) return absl::FailedPreconditionError("LlepRunner::Forward without a firing Plan");
  if (dispatcher.expert_begin() != expert_begin_ || dispatcher.expert_end() != expert_end_) {
    return absl::InvalidArgumentError("LlepRunner::Forward: the dispatcher serves other experts");
  }
  // Weights first, so they travel with the tokens.
  {
    trace::Span span(stream, "weight send", trace::Kind::kComm);
    RETURN_IF_ERROR(PostWeightMoves(stream, local));
  }
  chunks_.assign(dispatcher.num_chunks(), ChunkState());
  auto forward = [&](int chunk, const Tensor& rows, absl::Span<const int64_t> offsets) {
    return RunExperts(stream, chunk, rows, offsets, /*forward=*/true, local);
  };
  ASSIGN_OR_RETURN(Tensor y, dispatcher.ForwardPipelined(stream, x, plan, forward, &reroute_));
  // Owners too: their weights must not change (optimizer) while a send is
  // open; the compute stream waits for the moves, the host does not.
  if (weights_landed_ != nullptr) {
    trace::Span span(stream, "weight send", trace::Kind::kComm);
    RETURN_IF_ERROR(stream.Wait(*weights_landed_));
  }
  forward_done_ = true;
  return y;
}

absl::Status LlepRunner::Backward(Stream& stream, const Tensor& dy, Experts& local,
                                  TokenDispatcher& dispatcher, Tensor* dweights, const Tensor& dx) {
  if (!plan_.active || !forward_done_)
    return absl::FailedPreconditionError("LlepRunner::Backward without a firing Forward");
  Borrowed& b = borrowed_;
  if (!b.experts.empty()) {
    for (auto [w, g] : {std::pair{&b.weights.gate, &b.grads.gate}, std::pair{&b.weights.up, &b.grads.up},
                        std::pair{&b.weights.down, &b.grads.down}}) {
      ASSIGN_OR_RETURN(*g, Tensor::ZerosOn(stream, w->shape(), DType::kF32, MemoryCategory::kGradients));
    }
  }
  auto backward = [&](int chunk, const Tensor& rows, absl::Span<const int64_t> offsets) {
    return RunExperts(stream, chunk, rows, offsets, /*forward=*/false, local);
  };
  RETURN_IF_ERROR(dispatcher.BackwardPipelined(stream, dy, backward, dweights, dx));
  {
    trace::Span span(stream, "weight grad return", trace::Kind::kComm);
    RETURN_IF_ERROR(
        parallel::ReturnExpertGradients(*ep_p2p_, stream, plan_, expert_begin_, b.grads, ExpertGrads(local)));
  }
  Clear();  // borrowed weights and grads freed here
  return absl::OkStatus();
}

// ---- Model hook ---------------------------------------------------------------------------

absl::Status EnableLlep(Model& model, const config::ModelConfig& model_cfg,
                        const config::LlepConfig& llep_cfg, comm::Communicator* host_ep,
                        comm::Communicator* ep_p2p, comm::Communicator* tp, Stream& stream,
                        LlepRates* known) {
  comm::Communicator* ep = host_ep;
  if (!llep_cfg.enabled() || ep == nullptr || ep->size() < 2) return absl::OkStatus();
  if (ep_p2p == nullptr || ep_p2p->size() != ep->size()) {
    return absl::InvalidArgumentError("EnableLlep: ep_p2p must be a second communicator over the EP group");
  }
  LlepRates rates;
  const bool need_rates = llep_cfg.cost_model() && (llep_cfg.gemm_gflops() <= 0 || llep_cfg.p2p_gbps() <= 0);
  if (need_rates && known != nullptr && known->gemm_flops_per_s > 0 && known->p2p_bytes_per_s > 0) {
    rates = *known;
  } else if (need_rates) {
    ASSIGN_OR_RETURN(rates, MeasureLlepRates(stream, *ep, *ep_p2p));
    if (known != nullptr) *known = rates;
  }
  for (int l = 0; l < model.num_layers(); ++l) {
    MoELayer* moe = model.block(l).moe();
    if (moe == nullptr) continue;
    // Under expert TP a rank computes and moves its ffn slice only: the cost
    // model's FLOPs and weight bytes are the slice's.
    comm::Communicator* expert_tp = moe->expert_tp_group();
    const parallel::LlepOptions options = LlepOptionsFromConfig(
        llep_cfg, rates, model_cfg.hidden_size(), moe->experts().local_ffn(), model.compute_dtype());
    moe->SetLlep(std::make_unique<LlepRunner>(ep, ep_p2p, expert_tp != nullptr ? nullptr : tp,
                                              model_cfg.moe().num_experts(), options, expert_tp));
  }
  return absl::OkStatus();
}

}  // namespace moe::model
