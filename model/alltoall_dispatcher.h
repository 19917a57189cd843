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
// Two ways to drive it:
//   - the TokenDispatcher interface (Dispatch / Combine / CombineBackward /
//     DispatchBackward): one exchange for all tokens, the experts run once
//     between the calls (no overlap);
//   - ForwardPipelined / BackwardPipelined: num_chunks exchanges, the
//     exchange of chunk c + 1 enqueued before chunk c's experts run
//     (parallel.overlap_chunks); the caller's `expert_fn` computes one chunk.
// Both give the same results up to float summation order, for any chunk count.
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
  int64_t dispatch_bytes = 0, combine_bytes = 0, counts_bytes = 0;
  void Reset() { *this = DispatchStats(); }
};

// Where each assignment is computed when it is not the expert's owner (LLEP).
struct Reroute {
  // [T * k]: the EP rank that computes assignment a = t * k + j; read for the
  // kept assignments of this rank's TED slice only.
  std::vector<int32_t> dst;
  // [P * E], index src * E + e: rows this rank receives from EP rank src for
  // expert e, when the caller knows them (every rank planned from the same
  // count table). With one chunk the count exchange is then skipped; empty
  // (or several chunks): the counts are exchanged as usual.
  std::vector<int64_t> recv_counts;
};

class AllToAllTokenDispatcher : public TokenDispatcher {
 public:
  // ep: the EP group (EP rank r owns the experts [E r / P, E (r + 1) / P));
  // tp: the TP group, or nullptr for TP = 1. num_chunks >= 1.
  AllToAllTokenDispatcher(comm::Communicator* ep, comm::Communicator* tp, int64_t num_experts,
                          int num_chunks);

  int64_t expert_begin() const override { return expert_begin_; }
  int64_t expert_end() const override { return expert_end_; }
  int num_chunks() const { return num_chunks_; }

  // TokenDispatcher: one chunk, no overlap.
  absl::StatusOr<ExpertInput> Dispatch(Stream& stream, const Tensor& x, const RoutingPlan& plan) override;
  absl::StatusOr<Tensor> Combine(Stream& stream, const Tensor& expert_out) override;
  absl::StatusOr<Tensor> CombineBackward(Stream& stream, const Tensor& dy,
                                         std::vector<float>* dweights) override;
  absl::Status DispatchBackward(Stream& stream, const Tensor& d_expert_in, const Tensor& dx) override;

  // Computes one chunk's experts: rows [N, d] grouped by expert, expert e
  // (global index) at [offsets[e], offsets[e + 1]) (E + 1 values; without a
  // Reroute only this rank's experts have rows) -> [N, d] (forward: outputs;
  // backward: input grads from output grads).
  using ExpertFn =
      std::function<absl::StatusOr<Tensor>(int chunk, const Tensor& rows, absl::Span<const int64_t> offsets)>;
  // x [T, d] -> y [T, d], with expert_fn called once per chunk in chunk order.
  // `reroute` (null: every assignment goes to its expert's owner) must stay
  // valid during the call only; the backward reuses the forward's exchange.
  absl::StatusOr<Tensor> ForwardPipelined(Stream& stream, const Tensor& x, const RoutingPlan& plan,
                                          const ExpertFn& expert_forward, const Reroute* reroute = nullptr);
  // dy [T, d] -> dx [T, d] += the expert path's input gradient; dweights
  // [T * k] = d loss / d w_t,e for all T tokens (0 for dropped assignments).
  absl::Status BackwardPipelined(Stream& stream, const Tensor& dy, const ExpertFn& expert_backward,
                                 std::vector<float>* dweights, const Tensor& dx);

  DispatchStats& stats() { return stats_; }

 private:
  struct Chunk {
    Tensor assignment;   // i32 [n]: assignment a = t * k + j of each send row
    Tensor token_index;  // i32 [n]: the token of each send row, relative to the slice
    Tensor row_index;    // i32 [n]: 0..n-1
    Tensor weights;      // f32 [n]: w_t,e
    Tensor combined;     // [n, d] expert outputs back on this rank (for d w)
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
  // d w of a backward: StartWeightGrads zeroes the device vector [T * k],
  // each chunk's WeightedGradRows scatters its rows' d w there, and
  // FinishBackward sums it over TP and reads it on the host once.
  absl::Status StartWeightGrads(Stream& stream);
  absl::StatusOr<Tensor> WeightedGradRows(Stream& stream, int chunk, const Tensor& dy_slice);
  absl::Status FinishForward(Stream& stream, const Tensor& y_slice, Tensor* y);
  absl::Status FinishBackward(Stream& stream, const Tensor& dx_slice, std::vector<float>* dweights,
                              const Tensor& dx);

  comm::Communicator* ep_;
  comm::Communicator* tp_;
  int64_t num_experts_, expert_begin_, expert_end_;
  int num_chunks_;
  std::vector<int> owner_;  // EP rank of each expert

  // State of the current micro-batch.
  int64_t num_tokens_ = 0, hidden_ = 0, num_assignments_ = 0;
  int64_t slice_begin_ = 0, slice_end_ = 0;
  parallel::ExchangePlan plan_;
  bool rerouted_ = false;
  std::vector<Chunk> chunks_;
  Tensor dweights_;  // f32 [T * k] during a backward
  DispatchStats stats_;
};

}  // namespace moe::model

#endif  // MOE_MODEL_ALLTOALL_DISPATCHER_H_
