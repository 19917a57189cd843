// LLEP's wire protocol (the algorithm and its use of the token exchange are in
// model/llep.h; the plan in parallel/llep_planner.h). Three exchanges per MoE
// layer and micro-batch, all derived from the same plan on every EP rank, so
// the point-to-point pairs match without further agreement:
//
//   counts    control plane: every EP rank's kept assignments per chunk and
//             expert, AllGather over the EP group's host communicator
//             (ProcessGroups::host.ep) -> the table the planner runs on and
//             from which every rank derives what it receives (no count
//             exchange). The planner runs on the host, so this is a host read
//             by nature: one host wait per MoE layer per micro-batch with LLEP on.
//   weights   data plane: for every move (e, owner, helper), the owner sends
//             gate/up/down of e to the helper (GroupP2P on the EP group's
//             second communicator, ep_p2p, so the weights travel while the
//             token all-to-all runs on ep).
//   gradients data plane: after the backward, each helper sends the gradients
//             of its borrowed weights back; the owner adds them to its expert
//             grads in plan order (expert, helper), so the sum is deterministic.
//
// Streams, no host waits: weights and gradients go on ep_p2p's side stream
// after an event recorded on the compute stream (parallel/token_exchange.h's
// EnqueueOnSideStream); the compute stream Waits on the returned event before
// it reads borrowed weights (and before an owner's weights may change) and
// before the owner's gradient sums. A rank with nothing to send or receive
// posts nothing.
//
// Collective: every rank of the EP group calls each function in the same order
// with the same plan.
#ifndef MOE_PARALLEL_LLEP_EXCHANGE_H_
#define MOE_PARALLEL_LLEP_EXCHANGE_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "comm/communicator.h"
#include "parallel/llep_planner.h"
#include "runtime/core/backend.h"
#include "runtime/core/tensor.h"

namespace moe::parallel {

// Control plane, collective over `host_ep` (host buffers): this rank's counts
// (the same number n on every rank: E per expert, or C * E per chunk and
// expert as LlepRunner gathers them) -> counts[p][i] of every EP rank p.
absl::StatusOr<std::vector<std::vector<int64_t>>> GatherExpertCounts(comm::Communicator& host_ep,
                                                                     absl::Span<const int64_t> counts);

// Stacked expert matrices, f32: gate [n, Fe, d], up [n, Fe, d], down [n, d, Fe].
// Either weights or their gradients.
struct ExpertTensors {
  Tensor gate, up, down;
};

// The experts this rank borrows in `plan` (sorted), as EP rank `rank`.
std::vector<int64_t> BorrowedExperts(const LlepPlan& plan, int rank);

// Forward: enqueues the plan's weight moves on ep_p2p's side stream after the
// work on `stream`. `local` holds this rank's experts [expert_begin, ...);
// `borrowed` has one row per BorrowedExperts(plan, ep_p2p.rank()) entry and
// receives them. Returns the completion event, or null when this rank takes no
// part. `stream` must Wait on it before reading `borrowed` and before `local`
// changes. The weights travel in their dtype: f32, or the bf16 compute copies
// under train.precision bf16 (`borrowed` of the same dtype); gradients are f32.
absl::StatusOr<std::shared_ptr<Event>> StartWeightMoves(comm::Communicator& ep_p2p, Stream& stream,
                                                        const LlepPlan& plan, int64_t expert_begin,
                                                        const ExpertTensors& local,
                                                        const ExpertTensors& borrowed);

// Backward: helpers send `borrowed_grads` (rows as in StartWeightMoves) back
// to the owners; an owner receives them and, on `stream` after the transfer,
// adds them to `local_grads` in plan order. Returns once enqueued.
absl::Status ReturnExpertGradients(comm::Communicator& ep_p2p, Stream& stream, const LlepPlan& plan,
                                   int64_t expert_begin, const ExpertTensors& borrowed_grads,
                                   const ExpertTensors& local_grads);

}  // namespace moe::parallel

#endif  // MOE_PARALLEL_LLEP_EXCHANGE_H_
