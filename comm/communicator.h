// Communicator: the one interface the layers above use to move data between
// ranks, shaped like NCCL.
//
//   ASSIGN_OR_RETURN(auto world, CreateWorldCommunicator(options));
//   ASSIGN_OR_RETURN(auto ep, world->Split(layout.ep_group_id, layout.ep_rank, "ep"));
//   ASSIGN_OR_RETURN(Work w, ep->AllToAllV(send, send_counts, send_displs,
//                                           recv, recv_counts, recv_displs, DType::kBF16));
//   ... compute while the exchange runs ...
//   RETURN_IF_ERROR(w.Wait());
//
// Contract
// - Every call is asynchronous: it validates its arguments (args_check.h),
//   enqueues the operation on the communicator's stream and returns. An OK
//   status means "enqueued"; Work::Wait() returns the operation's own status.
//   A bad argument returns an error naming the operation and the argument, and
//   nothing is enqueued or sent.
// - Operations of one communicator run one after another in enqueue order (a
//   stream): an operation may read what an earlier one wrote. Operations of
//   different communicators run concurrently.
// - Collectives are collective: every rank of the group calls them in the same
//   order with matching arguments (same count, dtype, op, root; AllToAllV send
//   counts matching the peers' recv counts).
// - Buffers are borrowed: they must stay valid and untouched (recv) or
//   unmodified (send) until the operation's Work is done. Counts and
//   displacements are in elements of `dtype`. The MPI backend takes host
//   buffers, the NCCL backend device buffers of its device (device()).
// - In place: AllReduce with send == recv; Broadcast with send == recv (send is
//   only read on the root); AllGather with send == recv + rank * count;
//   AllGatherV with send == recv + recv_displs[rank]; ReduceScatter with
//   recv == send + rank * count. AllToAll(V) cannot run in place.
// - Deadline: every operation must finish within timeout_s() of starting. A
//   process-wide watchdog that sees one overdue prints rank, group, operation,
//   sequence number, bytes and the wait, then aborts the whole job
//   (ncclCommAbort, MPI_Abort). Nothing hangs forever.
// - A communicator is used from one thread at a time (like an NCCL comm);
//   Work handles may be waited on from any thread. Destroying a communicator
//   waits for its enqueued operations.
#ifndef MOE_COMM_COMMUNICATOR_H_
#define MOE_COMM_COMMUNICATOR_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "comm/instrumentation.h"
#include "comm/op.h"
#include "runtime/core/dtype.h"

namespace moe::config {
class CommConfig;
}

namespace moe::comm {

// The completion state of one operation; implemented by each backend.
class WorkState {
 public:
  virtual ~WorkState() = default;
  virtual absl::Status Wait() = 0;  // blocks until done
  virtual bool Test() = 0;          // true once done
};

// A handle to an enqueued operation. Copyable; all copies see the same
// operation. A default-constructed Work is already done and OK.
class Work {
 public:
  Work() = default;
  Work(std::shared_ptr<WorkState> state, uint64_t sequence) : state_(std::move(state)), sequence_(sequence) {}
  // Blocks until the operation finished; returns its final status. The
  // watchdog bounds the wait (the job aborts past the deadline).
  absl::Status Wait() const { return state_ ? state_->Wait() : absl::OkStatus(); }
  // Non-blocking: true once the operation finished (then Wait returns at once).
  bool Test() const { return state_ ? state_->Test() : true; }
  uint64_t sequence() const { return sequence_; }
  WorkState* state() const { return state_.get(); }

 private:
  std::shared_ptr<WorkState> state_;
  uint64_t sequence_ = 0;
};

struct CommOptions {
  double timeout_s = 600;          // comm.timeout_s: deadline of every operation
  std::string backend = "auto";    // comm.backend: "auto" | "mpi" | "nccl"
  std::string name = "world";      // the group's name in records and watchdog messages
  std::shared_ptr<CommSink> sink;  // optional; inherited by Split
  int cuda_device = -1;            // NCCL: device index, -1 = local rank mod device count
};

// comm.timeout_s and comm.backend of the job config (after ApplyDefaults).
absl::StatusOr<CommOptions> CommOptionsFromConfig(const config::CommConfig& config);

// Split color for ranks that join no group (Split returns nullptr for them).
inline constexpr int kNoColor = -1;

class Communicator {
 public:
  virtual ~Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  // World ranks of the members, in group-rank order.
  const std::vector<int>& group_ranks() const { return group_ranks_; }
  const std::string& name() const { return options_.name; }
  const CommOptions& options() const { return options_; }
  double timeout_s() const { return timeout_s_.load(); }
  // Applies to operations enqueued from now on. Must be > 0.
  absl::Status set_timeout_s(double seconds);
  // Where buffers must live: cpu (MPI) or cuda:i (NCCL).
  virtual Device device() const = 0;
  virtual const char* backend_name() const = 0;

  // Collective over this communicator: ranks with the same color form a new
  // communicator, ordered by (key, rank here). color = kNoColor joins none and
  // gets nullptr. Runs after the operations enqueued before it; blocks until
  // the new communicator exists. `name` labels the group (default
  // "<parent>/<color>"); options (timeout, sink) are inherited.
  absl::StatusOr<std::unique_ptr<Communicator>> Split(int color, int key, std::string name = "");

  // recv[i] = op over ranks of send[i], count elements.
  absl::StatusOr<Work> AllReduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op);
  // recv = root's send, count elements. send is read on the root only.
  absl::StatusOr<Work> Broadcast(const void* send, void* recv, size_t count, DType dtype, int root);
  // recv (size * count) = concatenation of every rank's send (count) by rank.
  absl::StatusOr<Work> AllGather(const void* send, void* recv, size_t count, DType dtype);
  // recv + recv_displs[r] gets rank r's send of recv_counts[r] elements;
  // send_count must equal recv_counts[rank()].
  absl::StatusOr<Work> AllGatherV(const void* send, size_t send_count, void* recv,
                                  absl::Span<const size_t> recv_counts, absl::Span<const size_t> recv_displs,
                                  DType dtype);
  // recv (count) = op over ranks of block rank() of send (size * count).
  absl::StatusOr<Work> ReduceScatter(const void* send, void* recv, size_t count, DType dtype, ReduceOp op);
  // Block r (count elements) of send goes to rank r; block r of recv comes from rank r.
  absl::StatusOr<Work> AllToAll(const void* send, void* recv, size_t count, DType dtype);
  // send + send_displs[r] (send_counts[r] elements) goes to rank r; recv +
  // recv_displs[r] (recv_counts[r]) comes from rank r. Zero counts are fine;
  // recv regions must not overlap each other or the send regions.
  absl::StatusOr<Work> AllToAllV(const void* send, absl::Span<const size_t> send_counts,
                                 absl::Span<const size_t> send_displs, void* recv,
                                 absl::Span<const size_t> recv_counts, absl::Span<const size_t> recv_displs,
                                 DType dtype);
  // Point to point with another rank (peer != rank(); use GroupP2P to talk to self).
  absl::StatusOr<Work> Send(const void* buf, size_t count, DType dtype, int peer);
  absl::StatusOr<Work> Recv(void* buf, size_t count, DType dtype, int peer);
  // A batch of sends and receives that run together (ncclGroupStart/End):
  // no ordering among them, so exchanges in both directions cannot deadlock.
  absl::StatusOr<Work> GroupP2P(absl::Span<const P2POp> ops);
  absl::StatusOr<Work> Barrier();

  // Waits for every operation enqueued so far; returns the first error.
  absl::Status Synchronize();

 protected:
  Communicator(int rank, int size, std::vector<int> group_ranks, CommOptions options);
  // Enqueues a validated operation (sequence, timeout, bytes filled in).
  virtual absl::StatusOr<Work> Submit(OpDesc op) = 0;
  // Runs a validated split (after the enqueued operations) and builds the child.
  virtual absl::StatusOr<std::unique_ptr<Communicator>> SplitImpl(OpDesc op, CommOptions child_options) = 0;

 private:
  absl::StatusOr<Work> CheckAndSubmit(OpDesc op);

  int rank_, size_;
  std::vector<int> group_ranks_;
  CommOptions options_;
  std::atomic<double> timeout_s_;
  uint64_t next_sequence_ = 0;
  Work last_;
};

// The world communicator of the configured backend: "mpi" (host buffers),
// "nccl" (device buffers; only when built with CUDA), "auto" = nccl when built
// with CUDA and a device is visible, mpi otherwise. Collective over the world.
// MpiEnv::Init must have run.
absl::StatusOr<std::unique_ptr<Communicator>> CreateWorldCommunicator(const CommOptions& options);

}  // namespace moe::comm

#endif  // MOE_COMM_COMMUNICATOR_H_
