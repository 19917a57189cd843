// Token exchange of expert parallelism: the all-to-all that moves token rows
// to the ranks that compute their experts, and back.
//
// The sender permutes its token copies into contiguous blocks ordered by
// (destination EP rank, expert) and describes them with a count table
// send[chunk][dst][e]: rows of chunk `chunk` for expert e that go to rank dst.
// The table is a first-class input: a plan may send some of expert e's rows to
// a rank that does not own e (LLEP), so nothing here assumes "dst = owner(e)".
//
//   sender (rank s)                         receiver (rank r)
//   rows ordered (dst, e)   --AllToAllV-->  rows ordered (src, e)
//                                           --reorder--> grouped (e, src):
//                                           expert e's rows contiguous at
//                                           [offsets[e], offsets[e + 1])
//
// Combine is the exact reverse: rows grouped (e, src) on the receiver go back
// to their senders, who get them in their original (dst, e) order, so row i of
// the combine's output belongs to row i of the dispatch's input.
//
// Backward: the gradient of Dispatch is Combine applied to the gradient of its
// output, and the gradient of Combine is Dispatch applied to the gradient of
// its output (both are permutations). The same four calls serve both passes.
//
// Chunks (parallel.overlap_chunks): the counts of all chunks are exchanged at
// once (ExchangePlan::Create, the single host copy point of counts per layer);
// each chunk's rows then move with their own AllToAllV, so a caller can
// pipeline:
//
//   ASSIGN_OR_RETURN(ExchangePlan plan, ExchangePlan::Create(ep, stream, C, E, counts));
//   ASSIGN_OR_RETURN(InFlight next, StartDispatch(ep, stream, plan, 0, send[0]));
//   for (int c = 0; c < C; ++c) {
//     InFlight cur = std::move(next);
//     if (c + 1 < C) ASSIGN_OR_RETURN(next, StartDispatch(ep, stream, plan, c + 1, send[c + 1]));
//     ASSIGN_OR_RETURN(Tensor grouped, FinishDispatch(stream, plan, cur));  // waits for chunk c only
//     ... experts on chunk c while chunk c + 1 is on the wire ...
//   }
//
// Streams, no host waits: Start* records an event on `stream` (where the rows
// were written), and the EP communicator's side stream waits on it and runs
// the AllToAllV; Finish* makes `stream` wait on the transfer's completion
// event and enqueues the reorder there. The host never blocks on rows.
// Host reads: ExchangePlan::Create reads the exchanged counts on the host
// (one Stream::Synchronize): they size every chunk's transfer and buffers,
// so it is the one host wait of a MoE layer per micro-batch (the backward
// reuses the forward's plan).
// Collective: every rank of the EP group calls Create, and Start*/Finish* for
// every chunk, in the same order.
#ifndef MOE_PARALLEL_TOKEN_EXCHANGE_H_
#define MOE_PARALLEL_TOKEN_EXCHANGE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "comm/communicator.h"
#include "runtime/core/backend.h"
#include "runtime/core/tensor.h"

namespace moe::parallel {

// The row counts of one layer's exchange on this rank, for every chunk, peer
// (EP group rank) and expert (global index 0..E-1). Host data.
class ExchangePlan {
 public:
  ExchangePlan() = default;

  // Collective over `ep`: sends this rank's table send_counts [C * P * E]
  // (index (c * P + dst) * E + e, P = ep.size()) and receives every peer's
  // row for this rank (one AllToAll of C * E int64 per peer). The counts are
  // staged through a tensor on stream's device and copied to the host here.
  static absl::StatusOr<ExchangePlan> Create(comm::Communicator& ep, Stream& stream, int num_chunks,
                                             int64_t num_experts, absl::Span<const int64_t> send_counts);
  // From both tables already on the host (tests, or a caller that computed the
  // global table itself): recv_counts [C * P * E] index (c * P + src) * E + e.
  static absl::StatusOr<ExchangePlan> FromCounts(int num_ranks, int num_chunks, int64_t num_experts,
                                                 std::vector<int64_t> send_counts,
                                                 std::vector<int64_t> recv_counts);

  int num_chunks() const { return num_chunks_; }
  int num_ranks() const { return num_ranks_; }
  int64_t num_experts() const { return num_experts_; }
  int64_t send(int chunk, int dst, int64_t e) const { return send_[Index(chunk, dst, e)]; }
  int64_t recv(int chunk, int src, int64_t e) const { return recv_[Index(chunk, src, e)]; }
  // Rows this rank sends / receives in `chunk` (all peers, self included).
  int64_t num_send_rows(int chunk) const;
  int64_t num_recv_rows(int chunk) const;
  // Received rows of `chunk`, grouped by expert: expert e at [o[e], o[e + 1]),
  // E + 1 values (0 rows for experts nobody sent here).
  std::vector<int64_t> ExpertOffsets(int chunk) const;
  // Per-peer row counts of the chunk (what goes to / comes from rank p).
  std::vector<int64_t> SendRowsPerRank(int chunk) const;
  std::vector<int64_t> RecvRowsPerRank(int chunk) const;

 private:
  size_t Index(int chunk, int peer, int64_t e) const {
    return (static_cast<size_t>(chunk) * num_ranks_ + peer) * num_experts_ + e;
  }
  int num_chunks_ = 0, num_ranks_ = 0;
  int64_t num_experts_ = 0;
  std::vector<int64_t> send_, recv_;
};

enum class ExchangeDirection : uint8_t { kDispatch = 0, kCombine = 1 };

// One chunk's transfer in flight. Holds the buffers until Finish*.
struct InFlight {
  ExchangeDirection direction = ExchangeDirection::kDispatch;
  int chunk = -1;
  int64_t hidden = 0;
  std::shared_ptr<Event> done;  // recorded on the EP side stream after the AllToAllV
  Tensor send;                  // what goes on the wire (kept alive until done)
  Tensor recv;                  // where it lands
  bool started() const { return chunk >= 0; }
};

// Exposed communication, timed by events: each Wait records an event on the
// compute stream before and after its wait for a transfer's completion event,
// so the elapsed time between them is how long the stream stood still for the
// transfer (on a GPU, the device's idle gap; on the CPU's inline stream, the
// calling thread's wait). Collect reads the pairs once they completed.
class ExposedCommTimer {
 public:
  absl::Status Wait(Stream& stream, const Event& done);
  // Seconds summed over the recorded waits; the events must have completed
  // (synchronize the stream first), else FailedPrecondition. Clears them.
  absl::StatusOr<double> Collect();

 private:
  std::vector<std::pair<std::unique_ptr<Event>, std::unique_ptr<Event>>> waits_;
};

// Sends `rows` [plan.num_send_rows(chunk), d] (order (dst, e)); the receiver's
// FinishDispatch returns [plan.num_recv_rows(chunk), d] grouped (e, src).
// Finish* time the compute stream's wait with `timer` when given.
absl::StatusOr<InFlight> StartDispatch(comm::Communicator& ep, Stream& stream, const ExchangePlan& plan,
                                       int chunk, const Tensor& rows);
absl::StatusOr<Tensor> FinishDispatch(Stream& stream, const ExchangePlan& plan, InFlight& in_flight,
                                      ExposedCommTimer* timer = nullptr);

// Sends `rows` [plan.num_recv_rows(chunk), d] grouped (e, src) back to their
// senders; FinishCombine returns [plan.num_send_rows(chunk), d] in this rank's
// dispatch order (dst, e).
absl::StatusOr<InFlight> StartCombine(comm::Communicator& ep, Stream& stream, const ExchangePlan& plan,
                                      int chunk, const Tensor& rows);
absl::StatusOr<Tensor> FinishCombine(Stream& stream, const ExchangePlan& plan, InFlight& in_flight,
                                     ExposedCommTimer* timer = nullptr);

// Convenience: Start + Finish of one chunk (no overlap).
absl::StatusOr<Tensor> Dispatch(comm::Communicator& ep, Stream& stream, const ExchangePlan& plan, int chunk,
                                const Tensor& rows);
absl::StatusOr<Tensor> Combine(comm::Communicator& ep, Stream& stream, const ExchangePlan& plan, int chunk,
                               const Tensor& rows);

// Runs `enqueue` on `comm`'s side stream after the work already on `stream`
// (an event recorded there), keeps `keep` alive until the side stream has
// passed the enqueued operation, and returns the completion event recorded on
// the side stream after it. `enqueue` gets the side stream and must enqueue
// stream-ordered communicator calls on it. No host wait: `stream` Waits on the
// returned event before it reads what the operation wrote.
absl::StatusOr<std::shared_ptr<Event>> EnqueueOnSideStream(
    comm::Communicator& comm, Stream& stream, const std::function<absl::Status(Stream&)>& enqueue,
    std::vector<Tensor> keep);

// For row g of the grouped (e, src) order of `chunk`, the row of the arrival
// (src, e) order it comes from (exposed for tests and for LLEP's planner).
std::vector<int32_t> GroupedFromArrival(const ExchangePlan& plan, int chunk);

}  // namespace moe::parallel

#endif  // MOE_PARALLEL_TOKEN_EXCHANGE_H_
