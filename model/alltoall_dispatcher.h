// AllToAllTokenDispatcher: the expert-parallel TokenDispatcher (Megatron's
// MoEAlltoAllTokenDispatcher) with DeepSpeed-TED duplicate-token dropping and
// chunked overlap.
//
// Forward, on the micro-batch's T tokens x [T, d] and the router's plan (the
// plan is computed on all T tokens, identically on every TP rank, so capacity
// drops are those of the whole micro-batch whatever the layout):
//
//   1. TED: TP rank r takes the tokens RowSlice(T, tp, r) only (tp = 1: all).
//   2. Those tokens' kept assignments are cut into num_chunks chunks of tokens
//      and, per chunk, ordered by (destination EP rank, expert, token): the
//      destination of expert e is its owner (EP rank owning e).
//   3. The count table [chunk][destination][expert] is exchanged once
//      (parallel::ExchangePlan::Create: the one host copy of counts per layer).
//   4. Per chunk: rows gathered (x[t]), AllToAllV, grouped by local expert ->
//      experts -> AllToAllV back -> y_slice[t] += w_t,e * out.
//   5. TED: y = AllGatherRows(tp, y_slice) restores [T, d].
//
// Backward mirrors it: dy [T, d] (the same on every TP rank) is sliced; per
// chunk d out = w * dy[t] goes the dispatch way, the experts' input grads come
// back the combine way and are scattered into dx; d w_t,e = dy[t] . out is
// summed over TP (each TP rank fills its own tokens) so that the router's
// backward sees all T tokens; dx is all-gathered over TP.
//
// Driven through the TokenDispatcher interface (ForwardPipelined /
// BackwardPipelined): num_chunks exchanges, every chunk's outbound exchange
// enqueued before the first chunk's experts run and each chunk's return
// right after its experts (parallel.overlap_chunks), so the link never idles
// while a chunk computes; the
// caller's `expert_fn` computes one chunk. Dispatch / Combine /
// CombineBackward / DispatchBackward do the same with one exchange and no
// overlap (tests compare the two); the results agree up to float summation
// order, for any chunk count.
//
// LLEP (model/llep.h) drives the pipelined path with a Reroute: the EP rank
// that computes each assignment instead of the expert's owner, so a helper
// receives rows of experts it borrowed. Everything else (chunks, TED slices,
// combine weights, d w) is the same code.
//
// Collective: every rank of the EP group (and of the TP group) runs the same
// calls in the same order. Communicators are borrowed and must outlive the
// dispatcher.
#ifndef MOE_MODEL_ALLTOALL_DISPATCHER_H_
#define MOE_MODEL_ALLTOALL_DISPATCHER_H_

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "comm/communicator.h"
#include "model/token_dispatcher.h"
#include "parallel/token_exchange.h"

namespace moe::model {

// Per-phase counters of one dispatcher (accumulated until Reset), for the
// benchmark and the metrics: host seconds per phase and payload bytes this
// rank sent to other EP ranks (self excluded). Nothing synchronizes to take
// them: on the CPU's inline compute stream a phase's seconds are its work
// (including the wait for its transfer, in dispatch/combine); on an
// asynchronous stream they are enqueue times (Event::ElapsedMsSince gives
// device times). A backward transfer counts in
// the phase it mirrors: "dispatch" is the forward token all-to-all plus the
// backward return of the experts' input grads; "combine" is the forward return
// of expert outputs plus the backward send of output grads. "counts" is the
// count exchange (once per layer and micro-batch).
struct DispatchStats {
  double permute_s = 0, dispatch_s = 0, expert_s = 0, combine_s = 0, unpermute_s = 0, counts_s = 0;
  // The compute stream's waits for pipelined transfers, timed by events
  // (parallel::ExposedCommTimer); added by CollectEventTimes.
  double exposed_comm_s = 0;
  int64_t dispatch_bytes = 0, combine_bytes = 0, counts_bytes = 0;
  void Reset() { *this = DispatchStats(); }
};

class AllToAllTokenDispatcher : public TokenDispatcher {
 public:
  // ep: the EP group (EP rank r owns the experts [E r / P, E (r + 1) / P));
  // tp: the TP group, or nullptr for TP = 1. num_chunks >= 1.
  AllToAllTokenDispatcher(comm::Communicator* ep, comm::Communicator* tp, int64_t num_experts,
                          int num_chunks);

  int64_t expert_begin() const override { return expert_begin_; }
  int64_t expert_end() const override { return expert_end_; }
  int num_chunks() const override { return num_chunks_; }
  comm::Communicator* ep_group() const override { return ep_; }
  comm::Communicator* ted_group() const override { return tp_ != nullptr && tp_->size() > 1 ? tp_ : nullptr; }

  // One exchange for all tokens, the experts run once between the calls (no
  // overlap): the same results as the pipelined path, which tests compare
  // against (Dispatch, Combine, CombineBackward, DispatchBackward).
  absl::StatusOr<ExpertInput> Dispatch(Stream& stream, const Tensor& x, const RoutingPlan& plan);
  absl::StatusOr<Tensor> Combine(Stream& stream, const Tensor& expert_out);
  absl::StatusOr<Tensor> CombineBackward(Stream& stream, const Tensor& dy, Tensor* dweights);
  absl::Status DispatchBackward(Stream& stream, const Tensor& d_expert_in, const Tensor& dx);

  // TokenDispatcher: parallel.overlap_chunks exchanges, all chunks'
  // outbound exchanges enqueued before chunk 0's experts run; `reroute` sends
  // assignments to the EP rank it names (LLEP).
  absl::StatusOr<Tensor> ForwardPipelined(Stream& stream, const Tensor& x, const RoutingPlan& plan,
                                          const ExpertFn& expert_forward, const Reroute* reroute) override;
  absl::Status BackwardPipelined(Stream& stream, const Tensor& dy, const ExpertFn& expert_backward,
                                 Tensor* dweights, const Tensor& dx) override;

  DispatchStats& stats() { return stats_; }
  // Adds the event-timed waits of the passes run so far to stats().exposed_comm_s;
  // the compute stream must have been synchronized since.
  absl::Status CollectEventTimes();

 private:
  struct Chunk {
    Tensor assignment;     // i32 [n]: assignment a = t * k + j of each send row
    Tensor token_index;    // i32 [n]: the token of each send row, relative to the slice
    Tensor weights;        // f32 [n]: w_t,e
    Tensor by_token;       // i32: ops::ScatterRowOrder(token_index, slice length)
    Tensor by_assignment;  // i32: ops::ScatterRowOrder(assignment, T * k)
    Tensor combined;       // [n, d] expert outputs back on this rank (for d w)
  };
  // Steps 1-3: slices, orders and counts the plan's assignments into `chunks`.
  absl::Status Prepare(Stream& stream, const Tensor& x, const RoutingPlan& plan, int chunks,
                       const Reroute* reroute);
  // Checks that only local experts received rows (unless rerouted); offsets:
  // the chunk's ExpertOffsets (E + 1).
  absl::Status CheckLocalRows(absl::Span<const int64_t> offsets, const Tensor& grouped) const;
  // Payload bytes this rank sends to other EP ranks in `chunk`, toward the
  // experts (the dispatch direction) or back from them.
  int64_t WireBytes(int chunk, bool toward_experts) const;
  absl::StatusOr<Tensor> SendRows(Stream& stream, int chunk, const Tensor& src_slice) const;
  // d w of a backward: StartWeightGrads makes the device vector [T * k],
  // each chunk's WeightedGradRows scatters its rows' d w there (chunk 0
  // overwrites it: no separate zero fill), and FinishBackward sums it over TP
  // and hands it out (no host read).
  absl::Status StartWeightGrads(Stream& stream);
  absl::StatusOr<Tensor> WeightedGradRows(Stream& stream, int chunk, const Tensor& dy_slice);
  absl::Status FinishForward(Stream& stream, const Tensor& y_slice, Tensor* y);
  absl::Status FinishBackward(Stream& stream, const Tensor& dx_slice, Tensor* dweights, const Tensor& dx);

  comm::Communicator* ep_;
  comm::Communicator* tp_;
  int64_t num_experts_, expert_begin_, expert_end_;
  int num_chunks_;
  std::vector<int> owner_;  // EP rank of each expert

  // State of the current micro-batch.
  int64_t num_tokens_ = 0, hidden_ = 0, num_assignments_ = 0;
  DType dtype_ = DType::kF32;  // of the token rows (the compute dtype)
  int64_t slice_begin_ = 0, slice_end_ = 0;
  parallel::ExchangePlan plan_;
  bool rerouted_ = false;
  std::vector<Chunk> chunks_;
  Tensor dweights_;  // f32 [T * k] during a backward
  parallel::ExposedCommTimer exposed_;
  DispatchStats stats_;
};

}  // namespace moe::model

#endif  // MOE_MODEL_ALLTOALL_DISPATCHER_H_
