#include "model/alltoall_dispatcher.h"

#include <chrono>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "parallel/layout.h"
#include "parallel/tensor_parallel.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"
#include "runtime/core/trace.h"

namespace moe::model {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Chunk after chunk of rows scattered into one fresh buffer: chunk 0
// overwrites all of it (the zero fill in its own kernel, with rows or
// without), later chunks add.
ScatterMode FreshChunkMode(int chunk) {
  return chunk == 0 ? ScatterMode::kOverwrite : ScatterMode::kAccumulate;
}

}  // namespace

AllToAllTokenDispatcher::AllToAllTokenDispatcher(comm::Communicator* ep, comm::Communicator* tp,
                                                 int64_t num_experts, int num_chunks)
    : ep_(ep), tp_(tp), num_experts_(num_experts), num_chunks_(num_chunks < 1 ? 1 : num_chunks) {
  const int P = ep_->size();
  std::tie(expert_begin_, expert_end_) = parallel::OwnedExperts(num_experts, P, ep_->rank());
  owner_.resize(num_experts);
  for (int64_t e = 0; e < num_experts; ++e) owner_[e] = parallel::ExpertOwner(e, num_experts, P);
}

int64_t AllToAllTokenDispatcher::WireBytes(int chunk, bool toward_experts) const {
  const std::vector<int64_t> rows =
      toward_experts ? plan_.SendRowsPerRank(chunk) : plan_.RecvRowsPerRank(chunk);
  int64_t n = 0;
  for (int p = 0; p < static_cast<int>(rows.size()); ++p) {
    if (p != ep_->rank()) n += rows[p];
  }
  return n * hidden_ * static_cast<int64_t>(DTypeSize(dtype_));
}

absl::Status AllToAllTokenDispatcher::Prepare(Stream& stream, const Tensor& x, const RoutingPlan& plan,
                                              int num_chunks, const Reroute* reroute) {
  const auto t0 = Clock::now();
  const int64_t T = plan.num_tokens, E = num_experts_;
  const int k = plan.top_k;
  if (plan.num_experts != E) {
    return absl::InvalidArgumentError(absl::StrCat("AllToAllTokenDispatcher: the plan routes to ",
                                                   plan.num_experts,
                                                   " experts but the dispatcher was built for ", E));
  }
  if (x.rank() != 2 || x.size(0) != T) {
    return absl::InvalidArgumentError(
        absl::StrCat("AllToAllTokenDispatcher: x ", x.ToString(), " is not [T = ", T, ", d]"));
  }
  num_tokens_ = T;
  hidden_ = x.size(1);
  dtype_ = x.dtype();
  num_assignments_ = T * k;
  const int tp_size = tp_ != nullptr ? tp_->size() : 1, tp_rank = tp_ != nullptr ? tp_->rank() : 0;
  std::tie(slice_begin_, slice_end_) = parallel::RowSlice(T, tp_size, tp_rank);
  const int64_t slice_len = slice_end_ - slice_begin_;
  const int P = ep_->size();
  rerouted_ = reroute != nullptr && !reroute->dst.empty();
  if (rerouted_ && static_cast<int64_t>(reroute->dst.size()) != T * k) {
    return absl::InvalidArgumentError(absl::StrCat("AllToAllTokenDispatcher: the reroute has ",
                                                   reroute->dst.size(), " destinations for T * k = ", T * k,
                                                   " assignments"));
  }
  std::vector<int64_t> counts(static_cast<size_t>(num_chunks) * P * E, 0);
  chunks_.assign(num_chunks, Chunk());
  std::vector<std::vector<int64_t>> lists(static_cast<size_t>(P) * E);
  for (int c = 0; c < num_chunks; ++c) {
    const auto [cb, ce] = parallel::RowSlice(slice_len, num_chunks, c);
    for (auto& l : lists) l.clear();
    for (int64_t t = slice_begin_ + cb; t < slice_begin_ + ce; ++t) {
      for (int j = 0; j < k; ++j) {
        const int64_t a = t * k + j;
        if (!plan.kept[a]) continue;
        const int64_t e = plan.experts[a];
        const int dst = rerouted_ ? reroute->dst[a] : owner_[e];
        if (dst < 0 || dst >= P) {
          return absl::InvalidArgumentError(absl::StrCat("AllToAllTokenDispatcher: assignment ", a,
                                                         " is rerouted to EP rank ", dst, " of ", P));
        }
        lists[static_cast<size_t>(dst) * E + e].push_back(a);
      }
    }
    Chunk& ch = chunks_[c];
    std::vector<int32_t> tok, assignment;
    std::vector<float> w;
    for (int p = 0; p < P; ++p) {
      for (int64_t e = 0; e < E; ++e) {
        const auto& l = lists[static_cast<size_t>(p) * E + e];
        counts[(static_cast<size_t>(c) * P + p) * E + e] = static_cast<int64_t>(l.size());
        for (int64_t a : l) {
          assignment.push_back(static_cast<int32_t>(a));
          tok.push_back(static_cast<int32_t>(a / k - slice_begin_));
          w.push_back(plan.weights[a]);
        }
      }
    }
    const int64_t n = static_cast<int64_t>(tok.size());
    // The rows of each token of the slice and of each assignment, so that the
    // scatter-adds back to them need not sort on the device.
    ASSIGN_OR_RETURN(const std::vector<int32_t> by_token, ops::ScatterRowOrder(tok, slice_len));
    ASSIGN_OR_RETURN(const std::vector<int32_t> by_assignment, ops::ScatterRowOrder(assignment, T * k));
    HostUploads up;  // the chunk's five tables in one copy
    up.AddInts(tok, Shape{n});
    up.AddFloats(w, Shape{n});
    up.AddInts(assignment, Shape{n});
    up.AddInts(by_token, Shape{static_cast<int64_t>(by_token.size())});
    up.AddInts(by_assignment, Shape{static_cast<int64_t>(by_assignment.size())});
    ASSIGN_OR_RETURN(std::vector<Tensor> tables, up.Upload(stream));
    ch.token_index = tables[0];
    ch.weights = tables[1];
    ch.assignment = tables[2];
    ch.by_token = tables[3];
    ch.by_assignment = tables[4];
  }
  stats_.permute_s += Since(t0);
  const auto t1 = Clock::now();
  if (reroute != nullptr && !reroute->recv_counts.empty()) {
    // Every rank derived its receive counts from the same gathered table: no exchange.
    if (reroute->recv_counts.size() != counts.size()) {
      return absl::InvalidArgumentError(absl::StrCat("AllToAllTokenDispatcher: the reroute has ",
                                                     reroute->recv_counts.size(),
                                                     " receive counts for C * P * E = ", counts.size()));
    }
    ASSIGN_OR_RETURN(
        plan_, parallel::ExchangePlan::FromCounts(P, num_chunks, E, std::move(counts), reroute->recv_counts));
    return absl::OkStatus();
  }
  // The one host copy point of counts in this layer.
  {
    trace::Span span(stream, "count exchange", trace::Kind::kComm);
    ASSIGN_OR_RETURN(plan_, parallel::ExchangePlan::Create(*ep_, stream, num_chunks, E, counts));
  }
  stats_.counts_s += Since(t1);
  stats_.counts_bytes += static_cast<int64_t>(counts.size() / P * (P - 1) * sizeof(int64_t));
  return absl::OkStatus();
}

absl::StatusOr<Tensor> AllToAllTokenDispatcher::SendRows(Stream& stream, int chunk,
                                                         const Tensor& src_slice) const {
  const Chunk& ch = chunks_[chunk];
  const int64_t n = ch.token_index.numel();
  ASSIGN_OR_RETURN(Tensor rows, NewActivation(stream, Shape{n, hidden_}, dtype_));
  if (n > 0) RETURN_IF_ERROR(ops::GatherRows(stream, src_slice, ch.token_index, rows));
  return rows;
}

absl::Status AllToAllTokenDispatcher::CheckLocalRows(absl::Span<const int64_t> all,
                                                     const Tensor& grouped) const {
  if (rerouted_) return absl::OkStatus();
  if (all[expert_begin_] != 0 || all[expert_end_] != grouped.size(0)) {
    return absl::InternalError(absl::StrCat("AllToAllTokenDispatcher: EP rank ", ep_->rank(), " received ",
                                            grouped.size(0) - (all[expert_end_] - all[expert_begin_]),
                                            " rows for experts outside its [", expert_begin_, ", ",
                                            expert_end_, ")"));
  }
  return absl::OkStatus();
}

absl::Status AllToAllTokenDispatcher::StartWeightGrads(Stream& stream) {
  ASSIGN_OR_RETURN(dweights_, NewActivation(stream, Shape{num_assignments_}));
  return absl::OkStatus();
}

absl::StatusOr<Tensor> AllToAllTokenDispatcher::WeightedGradRows(Stream& stream, int chunk,
                                                                 const Tensor& dy_slice) {
  Chunk& ch = chunks_[chunk];
  const int64_t n = ch.token_index.numel();
  ASSIGN_OR_RETURN(Tensor d_rows, NewActivation(stream, Shape{n, hidden_}, dtype_));
  // d w of row r = dy[t_r] . out_r, into the device vector of all T * k
  // assignments (each row is one assignment: the scatter only places it;
  // chunk 0's, rows or none, zeroes the rest).
  ASSIGN_OR_RETURN(Tensor dw, NewActivation(stream, Shape{n}));
  RETURN_IF_ERROR(ops::GatherRowDot(stream, dy_slice, ch.token_index, ch.combined, dw));
  RETURN_IF_ERROR(ops::ScatterAddRows(stream, dw.Reshape(Shape{n, 1}), ch.assignment,
                                      dweights_.Reshape(Shape{num_assignments_, 1}), Tensor(),
                                      FreshChunkMode(chunk), ch.by_assignment));
  // d out_r = w_r dy[t_r]: a weighted gather.
  RETURN_IF_ERROR(ops::GatherRows(stream, dy_slice, ch.token_index, d_rows, ch.weights));
  ch.combined = Tensor();
  return d_rows;
}

absl::Status AllToAllTokenDispatcher::FinishForward(Stream& stream, const Tensor& y_slice, Tensor* y) {
  if (tp_ == nullptr || tp_->size() == 1) {
    *y = y_slice;
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(*y, parallel::AllGatherRows(*tp_, stream, y_slice, num_tokens_));
  return absl::OkStatus();
}

absl::Status AllToAllTokenDispatcher::FinishBackward(Stream& stream, const Tensor& dx_slice, Tensor* dweights,
                                                     const Tensor& dx) {
  const bool ted = tp_ != nullptr && tp_->size() > 1;
  // Each TP rank filled the weights of its own tokens; the sum is all of them.
  if (ted) RETURN_IF_ERROR(parallel::AllReduceSum(*tp_, stream, dweights_));
  // The router's backward takes them on the stream (no host read).
  *dweights = std::move(dweights_);
  dweights_ = Tensor();
  if (!ted || !dx_slice.defined()) return absl::OkStatus();  // scattered straight into dx
  ASSIGN_OR_RETURN(Tensor full, parallel::AllGatherRows(*tp_, stream, dx_slice, num_tokens_));
  return ops::Copy(stream, full, dx);
}

// ---- TokenDispatcher interface: one exchange, no overlap ----------------------

absl::StatusOr<ExpertInput> AllToAllTokenDispatcher::Dispatch(Stream& stream, const Tensor& x,
                                                              const RoutingPlan& plan) {
  RETURN_IF_ERROR(Prepare(stream, x, plan, 1, nullptr));
  ASSIGN_OR_RETURN(Tensor send, SendRows(stream, 0, x.Slice(slice_begin_, slice_end_)));
  const auto t0 = Clock::now();
  ASSIGN_OR_RETURN(Tensor grouped, parallel::Dispatch(*ep_, stream, plan_, 0, send));
  stats_.dispatch_s += Since(t0);
  stats_.dispatch_bytes += WireBytes(0, true);
  const std::vector<int64_t> all = plan_.ExpertOffsets(0);
  RETURN_IF_ERROR(CheckLocalRows(all, grouped));
  ExpertInput in;
  in.tokens = grouped;
  in.offsets.assign(all.begin() + expert_begin_, all.begin() + expert_end_ + 1);
  return in;
}

absl::StatusOr<Tensor> AllToAllTokenDispatcher::Combine(Stream& stream, const Tensor& expert_out) {
  if (chunks_.size() != 1)
    return absl::FailedPreconditionError("AllToAllTokenDispatcher::Combine before Dispatch");
  const auto t0 = Clock::now();
  ASSIGN_OR_RETURN(chunks_[0].combined, parallel::Combine(*ep_, stream, plan_, 0, expert_out));
  stats_.combine_s += Since(t0);
  stats_.combine_bytes += WireBytes(0, false);
  const auto t1 = Clock::now();
  ASSIGN_OR_RETURN(Tensor y_slice, NewActivation(stream, Shape{slice_end_ - slice_begin_, hidden_}, dtype_));
  const Chunk& ch = chunks_[0];
  RETURN_IF_ERROR(ops::ScatterAddRows(stream, ch.combined, ch.token_index, y_slice, ch.weights,
                                      FreshChunkMode(0), ch.by_token));
  Tensor y;
  RETURN_IF_ERROR(FinishForward(stream, y_slice, &y));
  stats_.unpermute_s += Since(t1);
  return y;
}

absl::StatusOr<Tensor> AllToAllTokenDispatcher::CombineBackward(Stream& stream, const Tensor& dy,
                                                                Tensor* dweights) {
  if (chunks_.size() != 1) {
    return absl::FailedPreconditionError("AllToAllTokenDispatcher::CombineBackward before Dispatch/Combine");
  }
  RETURN_IF_ERROR(StartWeightGrads(stream));
  ASSIGN_OR_RETURN(Tensor d_rows, WeightedGradRows(stream, 0, dy.Slice(slice_begin_, slice_end_)));
  RETURN_IF_ERROR(FinishBackward(stream, Tensor(), dweights, Tensor()));
  const auto t0 = Clock::now();
  ASSIGN_OR_RETURN(Tensor grouped, parallel::Dispatch(*ep_, stream, plan_, 0, d_rows));
  stats_.combine_s += Since(t0);
  stats_.combine_bytes += WireBytes(0, true);
  RETURN_IF_ERROR(CheckLocalRows(plan_.ExpertOffsets(0), grouped));
  return grouped;
}

absl::Status AllToAllTokenDispatcher::DispatchBackward(Stream& stream, const Tensor& d_expert_in,
                                                       const Tensor& dx) {
  if (chunks_.size() != 1)
    return absl::FailedPreconditionError("AllToAllTokenDispatcher::DispatchBackward first");
  const auto t0 = Clock::now();
  ASSIGN_OR_RETURN(Tensor d_send, parallel::Combine(*ep_, stream, plan_, 0, d_expert_in));
  stats_.dispatch_s += Since(t0);
  stats_.dispatch_bytes += WireBytes(0, false);
  const Chunk& ch = chunks_[0];
  const bool ted = tp_ != nullptr && tp_->size() > 1;
  // Overwrites dx (without TED the slice is all of it), or with TED a fresh
  // buffer of this rank's slice, which the TP ranks then gather into dx.
  Tensor target = dx.Slice(slice_begin_, slice_end_);
  if (ted) {
    ASSIGN_OR_RETURN(target, NewActivation(stream, Shape{slice_end_ - slice_begin_, hidden_}, dtype_));
  }
  RETURN_IF_ERROR(
      ops::ScatterAddRows(stream, d_send, ch.token_index, target, Tensor(), FreshChunkMode(0), ch.by_token));
  if (ted) {
    ASSIGN_OR_RETURN(Tensor full, parallel::AllGatherRows(*tp_, stream, target, num_tokens_));
    RETURN_IF_ERROR(ops::Copy(stream, full, dx));
  }
  chunks_.clear();
  return absl::OkStatus();
}

// ---- Pipelined chunks -----------------------------------------------------------

absl::StatusOr<Tensor> AllToAllTokenDispatcher::ForwardPipelined(Stream& stream, const Tensor& x,
                                                                 const RoutingPlan& plan,
                                                                 const ExpertFn& expert_forward,
                                                                 const Reroute* reroute) {
  const int C = num_chunks_;
  RETURN_IF_ERROR(Prepare(stream, x, plan, C, reroute));
  const Tensor x_slice = x.Slice(slice_begin_, slice_end_);
  // Every chunk's dispatch is enqueued before any expert runs: the link then
  // never idles while a chunk computes (chunk c + 2's rows no longer queue
  // behind chunk c's combine), and the later chunks' permutes run while the
  // first transfer is in flight. Each combine follows its chunk's experts.
  // The in-flight transfers hold their send rows until FinishDispatch frees
  // them (no more than the one-chunk exchange holds at once).
  std::vector<parallel::InFlight> sent(C), back(C);
  for (int c = 0; c < C; ++c) {
    auto t0 = Clock::now();
    Tensor send;
    {
      trace::Span span(stream, "permute", trace::Kind::kCompute);
      ASSIGN_OR_RETURN(send, SendRows(stream, c, x_slice));
    }
    stats_.permute_s += Since(t0);
    t0 = Clock::now();
    {
      trace::Span span(stream, "dispatch a2a", trace::Kind::kComm);
      ASSIGN_OR_RETURN(sent[c], parallel::StartDispatch(*ep_, stream, plan_, c, send));
    }
    stats_.dispatch_s += Since(t0);
    stats_.dispatch_bytes += WireBytes(c, true);
  }
  for (int c = 0; c < C; ++c) {
    auto t0 = Clock::now();
    Tensor grouped;
    {
      trace::Span span(stream, "dispatch a2a", trace::Kind::kComm);
      ASSIGN_OR_RETURN(grouped, parallel::FinishDispatch(stream, plan_, sent[c], &exposed_));
    }
    stats_.dispatch_s += Since(t0);
    const std::vector<int64_t> offsets = plan_.ExpertOffsets(c);
    RETURN_IF_ERROR(CheckLocalRows(offsets, grouped));
    t0 = Clock::now();
    Tensor out;
    {
      trace::Span span(stream, "experts");
      ASSIGN_OR_RETURN(out, expert_forward(c, grouped, offsets));
    }
    stats_.expert_s += Since(t0);
    t0 = Clock::now();
    {
      trace::Span span(stream, "combine a2a", trace::Kind::kComm);
      ASSIGN_OR_RETURN(back[c], parallel::StartCombine(*ep_, stream, plan_, c, out));
    }
    stats_.combine_s += Since(t0);
    stats_.combine_bytes += WireBytes(c, false);
  }
  ASSIGN_OR_RETURN(Tensor y_slice, NewActivation(stream, Shape{slice_end_ - slice_begin_, hidden_}, dtype_));
  for (int c = 0; c < C; ++c) {
    auto t0 = Clock::now();
    {
      trace::Span span(stream, "combine a2a", trace::Kind::kComm);
      ASSIGN_OR_RETURN(chunks_[c].combined, parallel::FinishCombine(stream, plan_, back[c], &exposed_));
    }
    stats_.combine_s += Since(t0);
    t0 = Clock::now();
    const Chunk& ch = chunks_[c];
    if (c == 0 || ch.token_index.numel() > 0) {
      trace::Span span(stream, "unpermute", trace::Kind::kCompute);
      RETURN_IF_ERROR(ops::ScatterAddRows(stream, ch.combined, ch.token_index, y_slice, ch.weights,
                                          FreshChunkMode(c), ch.by_token));
    }
    stats_.unpermute_s += Since(t0);
  }
  const auto t0 = Clock::now();
  Tensor y;
  {
    trace::Span span(stream, "unpermute", trace::Kind::kCompute);
    RETURN_IF_ERROR(FinishForward(stream, y_slice, &y));
  }
  stats_.unpermute_s += Since(t0);
  return y;
}

absl::Status AllToAllTokenDispatcher::BackwardPipelined(Stream& stream, const Tensor& dy,
                                                        const ExpertFn& expert_backward, Tensor* dweights,
                                                        const Tensor& dx) {
  const int C = static_cast<int>(chunks_.size());
  if (C != num_chunks_) {
    return absl::FailedPreconditionError(
        "AllToAllTokenDispatcher::BackwardPipelined without ForwardPipelined");
  }
  RETURN_IF_ERROR(StartWeightGrads(stream));
  const Tensor dy_slice = dy.Slice(slice_begin_, slice_end_);
  // As in the forward: every chunk's output gradients go out before any
  // expert's backward runs.
  std::vector<parallel::InFlight> sent(C), back(C);
  for (int c = 0; c < C; ++c) {
    auto t0 = Clock::now();
    Tensor d;
    {
      trace::Span span(stream, "unpermute", trace::Kind::kCompute);
      ASSIGN_OR_RETURN(d, WeightedGradRows(stream, c, dy_slice));
    }
    stats_.unpermute_s += Since(t0);
    t0 = Clock::now();
    {
      trace::Span span(stream, "combine a2a", trace::Kind::kComm);
      ASSIGN_OR_RETURN(sent[c], parallel::StartDispatch(*ep_, stream, plan_, c, d));
    }
    stats_.combine_s += Since(t0);
    stats_.combine_bytes += WireBytes(c, true);
  }
  for (int c = 0; c < C; ++c) {
    auto t0 = Clock::now();
    Tensor grouped;
    {
      trace::Span span(stream, "combine a2a", trace::Kind::kComm);
      ASSIGN_OR_RETURN(grouped, parallel::FinishDispatch(stream, plan_, sent[c], &exposed_));
    }
    stats_.combine_s += Since(t0);
    const std::vector<int64_t> offsets = plan_.ExpertOffsets(c);
    RETURN_IF_ERROR(CheckLocalRows(offsets, grouped));
    t0 = Clock::now();
    Tensor d_in;
    {
      trace::Span span(stream, "experts");
      ASSIGN_OR_RETURN(d_in, expert_backward(c, grouped, offsets));
    }
    stats_.expert_s += Since(t0);
    t0 = Clock::now();
    {
      trace::Span span(stream, "dispatch a2a", trace::Kind::kComm);
      ASSIGN_OR_RETURN(back[c], parallel::StartCombine(*ep_, stream, plan_, c, d_in));
    }
    stats_.dispatch_s += Since(t0);
    stats_.dispatch_bytes += WireBytes(c, false);
  }
  const bool ted = tp_ != nullptr && tp_->size() > 1;
  Tensor target = dx.Slice(slice_begin_, slice_end_);  // or a fresh buffer, as in DispatchBackward
  if (ted) {
    ASSIGN_OR_RETURN(target, NewActivation(stream, Shape{slice_end_ - slice_begin_, hidden_}, dtype_));
  }
  for (int c = 0; c < C; ++c) {
    auto t0 = Clock::now();
    Tensor d_send;
    {
      trace::Span span(stream, "dispatch a2a", trace::Kind::kComm);
      ASSIGN_OR_RETURN(d_send, parallel::FinishCombine(stream, plan_, back[c], &exposed_));
    }
    stats_.dispatch_s += Since(t0);
    const Chunk& ch = chunks_[c];
    if (c == 0 || ch.token_index.numel() > 0) {
      trace::Span span(stream, "permute", trace::Kind::kCompute);
      RETURN_IF_ERROR(ops::ScatterAddRows(stream, d_send, ch.token_index, target, Tensor(), FreshChunkMode(c),
                                          ch.by_token));
    }
  }
  const auto t0 = Clock::now();
  {
    trace::Span span(stream, "permute", trace::Kind::kCompute);
    RETURN_IF_ERROR(FinishBackward(stream, ted ? target : Tensor(), dweights, dx));
  }
  stats_.unpermute_s += Since(t0);
  chunks_.clear();
  return absl::OkStatus();
}

absl::Status AllToAllTokenDispatcher::CollectEventTimes() {
  ASSIGN_OR_RETURN(double s, exposed_.Collect());
  stats_.exposed_comm_s += s;
  return absl::OkStatus();
}

}  // namespace moe::model
