// LLEP at run time (Least-Loaded Expert Parallelism, arXiv 2601.17111): per
// MoE layer and micro-batch, the EP group agrees on a plan
// (parallel/llep_planner.h) and, when it fires, some (token, expert) pairs are
// computed by a helper rank with a borrowed copy of the expert's weights.
// Routing never changes, so the layer's outputs and gradients equal standard
// EP's up to float summation order. The wire protocol (count gather, weight
// moves, gradient return) is parallel/llep_exchange.h's.
//
// One layer, forward (LlepRunner::Plan, then Forward when Plan returned true):
//   1. counts: this rank's kept assignments per chunk and expert (its TED
//      slice of the micro-batch), gathered over the EP group's host
//      communicator (control plane) -> the table [P][C * E] on every rank,
//      summed over chunks to [P][E]; PlanLlep on it (every rank
//      computes the same plan), and from it the computing rank of each of this
//      rank's assignments (SourceSplits, in token order) and the rows this rank
//      will receive.
//   2. weights: for every move (e, owner, helper) of the plan, the owner sends
//      gate/up/down of e to the helper (GroupP2P on ep_p2p's side stream),
//      enqueued before the token all-to-all so both are on the wire together.
//   3. tokens: the all-to-all dispatcher's pipelined path with that Reroute
//      (model/alltoall_dispatcher.h): parallel.overlap_chunks chunks, each
//      chunk's exchange in flight while the previous chunk computes; the
//      receive counts of every chunk come from the plan and the gathered
//      per-chunk table (parallel::ChunkReceiveCounts; no count exchange).
//   4. experts, per chunk: the local experts on their rows, the borrowed ones
//      (a grouped SwiGLU over each contiguous run of borrowed rows, in place)
//      after the compute stream waited for the weights' arrival event.
//   5. combine, weighted sum and TED all-gather: the dispatcher's.
// Backward mirrors it through the dispatcher; then the helpers' gradients of
// borrowed weights go back to the owner (GroupP2P on ep_p2p's side stream) and
// are added to its expert grads on the compute stream after the transfer; the
// borrowed weights and grads are freed at the end of the layer's backward.
//
// Host waits: one per layer and micro-batch, the count gather (the planner
// runs on the host), which also stands in for the dispatcher's count
// exchange whether LLEP fires or not (MoELayer passes reroute() to a standard
// dispatch); weights and gradients move without any (the compute stream waits
// on their events).
//
// Collective: every rank of the EP group (and the TP group) calls Plan,
// Forward and Backward in the same order. Communicators are borrowed.
#ifndef MOE_MODEL_LLEP_H_
#define MOE_MODEL_LLEP_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "comm/communicator.h"
#include "model/common.h"
#include "model/experts.h"
#include "model/router.h"
#include "model/token_dispatcher.h"
#include "parallel/llep_exchange.h"
#include "parallel/llep_planner.h"

namespace moe::model {

class Model;

// What LLEP did in the last micro-batch of a layer (for metrics.jsonl).
struct LlepStats {
  bool fired = false;
  double imbalance_before = 1.0, imbalance_after = 1.0;  // max / mean of per-rank loads
  int64_t tokens_moved = 0;        // (token, expert) pairs computed off their native rank (whole EP group)
  int64_t weight_bytes_moved = 0;  // expert weight bytes sent P2P in the forward (whole EP group)
  int borrowed_experts = 0;        // experts borrowed by this rank
  int64_t borrowed_rows = 0;       // rows this rank computed with borrowed weights (forward)
};

// Measured start-up rates for the cost model.
struct LlepRates {
  double gemm_flops_per_s = 0;
  double p2p_bytes_per_s = 0;
};

// Collective over `host_ep` (the EP group's host communicator) and `ep_p2p`
// (the same ranks): times a [512 x 512 x 512] GEMM on `stream` and a ring
// exchange of 8 MiB of device buffers on ep_p2p (stream-ordered); both rates
// are agreed by AllReduce min over host_ep (control plane), so every rank
// plans with the same numbers.
absl::StatusOr<LlepRates> MeasureLlepRates(Stream& stream, comm::Communicator& host_ep,
                                           comm::Communicator& ep_p2p);

// Planner options from the job's llep config; rates (GFLOP/s, GB/s) come from
// the config when > 0, else from `measured`. The cost model uses the SwiGLU
// expert's forward+backward FLOPs per token (18 d Fe) and its weight bytes
// (3 d Fe elements of weight_dtype: the compute copies are what travels).
parallel::LlepOptions LlepOptionsFromConfig(const config::LlepConfig& cfg, const LlepRates& measured,
                                            int64_t hidden_size, int64_t expert_ffn_hidden_size,
                                            DType weight_dtype = DType::kF32);

class LlepRunner {
 public:
  // host_ep: the EP group's host communicator (ProcessGroups::host.ep; rank
  // r owns the experts [E r / P, E (r + 1) / P)) for the count gather;
  // ep_p2p: a data-plane communicator over the same ranks for weight moves;
  // tp: the TP group or nullptr (TED: TP rank r handles RowSlice(T, tp, r));
  // expert_tp: the TP group the experts are sharded over (expert TP; then tp
  // is null) or nullptr. Under expert TP each TP rank moves its own ffn slice
  // of a borrowed expert over its EP group (the slices of one expert travel
  // in parallel, tp times fewer bytes each) and the experts' partial outputs
  // (input grads), local and borrowed, are summed over expert_tp.
  LlepRunner(comm::Communicator* host_ep, comm::Communicator* ep_p2p, comm::Communicator* tp,
             int64_t num_experts, parallel::LlepOptions options, comm::Communicator* expert_tp = nullptr);

  // Collective over host_ep: gathers the count table (per chunk of the
  // dispatcher's num_chunks) and plans. Returns true when LLEP fires for this
  // micro-batch (then call Forward/Backward); false means standard EP (the
  // caller uses its usual dispatcher, with reroute() for the receive counts).
  absl::StatusOr<bool> Plan(Stream& stream, const Tensor& x, const RoutingPlan& plan, int num_chunks);
  // After Plan: the receive counts of every chunk, and when LLEP fired the
  // computing rank of each assignment; a standard dispatch passes it too (dst
  // empty), so that neither needs the dispatcher's count exchange.
  const Reroute& reroute() const { return reroute_; }
  // x [T, d] (unchanged until Backward) -> y [T, d], through `dispatcher`
  // (over the same EP and TP groups) with this plan's reroute.
  absl::StatusOr<Tensor> Forward(Stream& stream, const Tensor& x, const RoutingPlan& plan, Experts& local,
                                 TokenDispatcher& dispatcher);
  // dy [T, d] -> dx [T, d] = the expert path's input gradient (overwritten,
  // as TokenDispatcher::BackwardPipelined); *dweights f32
  // [T k] = d loss / d w_t,e on the device; local expert grads += this rank's
  // part plus the helpers' returned gradients.
  absl::Status Backward(Stream& stream, const Tensor& dy, Experts& local, TokenDispatcher& dispatcher,
                        Tensor* dweights, const Tensor& dx);

  const LlepStats& stats() const { return stats_; }
  const parallel::LlepPlan& plan() const { return plan_; }
  const std::vector<std::vector<int64_t>>& counts() const { return counts_; }
  // Borrowed expert weights currently held (0 outside a layer's forward..backward).
  int num_borrowed_held() const { return static_cast<int>(borrowed_.experts.size()); }

 private:
  // A chunk's received rows are grouped in global expert order, so the
  // borrowed experts below this rank's range own the rows before the local
  // block and those above own the rows after it: two segments, each run in
  // place on a view of the grouped rows.
  struct Segment {
    int64_t row_begin = 0, row_end = 0;  // rows of the chunk's grouped tensor
    int64_t first = 0, last = 0;         // borrowed experts [first, last) (indices into experts)
    std::vector<int64_t> offsets;        // last - first + 1, relative to row_begin
    Tensor x, g, u, act;                 // saved for backward (x is a view)
  };
  // What one chunk's forward keeps for its backward.
  struct ChunkState {
    Experts::Saved local;
    Segment segments[2];  // below and above the local experts
  };
  struct Borrowed {
    std::vector<int64_t> experts;            // sorted global indices
    parallel::ExpertTensors weights, grads;  // [B, Fe, d], [B, Fe, d], [B, d, Fe]
  };
  // Allocates the borrowed stacks and enqueues the plan's weight moves.
  absl::Status PostWeightMoves(Stream& stream, Experts& local);
  // The dispatcher's ExpertFn: local rows [off[e0], off[e1]) through the local
  // experts, the borrowed segments through the borrowed weights, written into
  // one [N, d] output in grouped order.
  absl::StatusOr<Tensor> RunExperts(Stream& stream, int chunk, const Tensor& grouped,
                                    absl::Span<const int64_t> offsets, bool forward, Experts& local);
  // The borrowed segments of a chunk from its offsets (E + 1); checks that
  // every foreign expert with rows here is borrowed.
  absl::Status MakeSegments(absl::Span<const int64_t> offsets, int64_t num_rows, ChunkState* chunk) const;
  // One segment: x rows [row_begin, row_end) of `grouped` -> out's same rows.
  absl::Status BorrowedForward(Stream& stream, Segment& seg, const Tensor& grouped, const Tensor& out);
  absl::Status BorrowedBackward(Stream& stream, Segment& seg, const Tensor& dy, const Tensor& dx);
  void Clear();

  comm::Communicator* ep_;  // the EP group's host communicator
  comm::Communicator* ep_p2p_;
  comm::Communicator* tp_;
  comm::Communicator* expert_tp_;
  int64_t num_experts_, expert_begin_, expert_end_;
  parallel::LlepOptions options_;

  std::vector<std::vector<int64_t>> counts_;  // [P][E]
  parallel::LlepPlan plan_;
  LlepStats stats_;

  // State of the current micro-batch.
  int64_t slice_begin_ = 0, slice_end_ = 0;
  Reroute reroute_;
  std::shared_ptr<Event> weights_landed_;  // null: this rank moves no weights
  Borrowed borrowed_;
  std::vector<ChunkState> chunks_;
  bool forward_done_ = false;
};

// Gives every MoE layer of `model` an LlepRunner (llep.enabled). `tp` is
// the TP group (or null); a layer with experts sharded over TP
// (MoELayer::expert_tp_group) gets it as its expert_tp and no TED split. Rates are
// measured once here (collective over host_ep and ep_p2p) when the config
// leaves them at 0, unless `rates` is given with both rates > 0: then those are
// used (a resumed run passes the rates its checkpoint kept, so it plans as the
// run it continues). A measurement is stored in `*rates` when `rates` is not null.
absl::Status EnableLlep(Model& model, const config::ModelConfig& model_cfg,
                        const config::LlepConfig& llep_cfg, comm::Communicator* host_ep,
                        comm::Communicator* ep_p2p, comm::Communicator* tp, Stream& stream,
                        LlepRates* rates = nullptr);

}  // namespace moe::model

#endif  // MOE_MODEL_LLEP_H_
