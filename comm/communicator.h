// Communicator: the one interface the layers above use to move data between
// ranks, shaped like NCCL.
//
// Data plane (stream-ordered, as ncclAllReduce(send, recv, count, dtype, op,
// comm, stream)): every call names the backend Stream whose earlier work
// produced its input. The operation starts after that work, work enqueued on
// the stream after the call starts after the operation, and the call returns
// at once (OK = enqueued). Its completion is a point of that stream: record
// an Event there and make the compute stream Wait on it; no host thread waits.
//
//   ASSIGN_OR_RETURN(auto world, CreateWorldCommunicator(options));
//   ASSIGN_OR_RETURN(auto ep, world->Split(layout.ep_group_id, layout.ep_rank, "ep"));
//   RETURN_IF_ERROR(comm_stream.Wait(produced));            // event recorded after the producer
//   RETURN_IF_ERROR(ep->AllToAllV(send, send_counts, send_displs, recv, recv_counts,
//                                 recv_displs, DType::kBF16, comm_stream));
//   RETURN_IF_ERROR(comm_stream.Record(exchanged));
//   ... enqueue compute that does not need recv on `compute` ...
//   RETURN_IF_ERROR(compute.Wait(exchanged));               // later compute reads recv
//
// Control plane (host form): the same calls without a stream return a Work
// whose Wait() blocks the host until the operation finished (a counted host
// wait, backend.h). They take host buffers and are for small host-side
// agreements (counts, rates, stop and config agreement, checkpoint
// metadata); ProcessGroups gives each group a host communicator for them.
//
// Contract
// - Every call is asynchronous: it validates its arguments (args_check.h),
//   enqueues the operation and returns. An OK status means "enqueued";
//   Work::Wait() returns the operation's own status; a failed stream-ordered
//   operation's status is kept by its stream (Stream::Synchronize reports it)
//   and makes the communicator unusable. A bad argument returns an error
//   naming the operation and the argument, and nothing is enqueued or sent.
// - Backends: MPI runs each operation on its progress thread; a
//   stream-ordered operation first waits there for the stream's marker (an
//   Event recorded at the call), and the stream gets a work item that waits
//   for the operation, so both the CPU worker stream and the inline stream see
//   the GPU order. NCCL enqueues on its own CUDA stream bracketed by
//   cudaStreamWaitEvent in both directions with the given stream.
// - Operations of one communicator run one after another in enqueue order (a
//   stream): an operation may read what an earlier one wrote. Operations of
//   different communicators run concurrently.
// - Collectives are collective: every rank of the group calls them in the same
//   order with matching arguments (same count, dtype, op, root; AllToAllV send
//   counts matching the peers' recv counts).
// - Buffers are borrowed: they must stay valid and untouched (recv) or
//   unmodified (send) until the operation's Work is done. Counts and
//   displacements are in elements of `dtype`. The MPI backend takes host
//   buffers, the NCCL backend device buffers of its device (device()). A
//   stream-ordered call of the MPI backend with a stream of a CUDA device
//   takes that device's buffers and stages them through host memory
//   (host_staging.h: comm.backend "mpi" with train.device "cuda").
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
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "comm/instrumentation.h"
#include "comm/op.h"
#include "runtime/core/backend.h"
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
  // Runs fn(final status) once the operation is done: at once, on this
  // thread, if it is; else on the thread that completes it (the progress
  // thread; for an operation started directly, whichever thread's Wait or
  // Test completes it). `fn` must not block.
  virtual void OnDone(std::function<void(const absl::Status&)> fn) = 0;
};

// The completion every backend's WorkState shares: a HostGate (backend.h)
// that Complete opens with the final status, waking the waiters, then
// running the OnDone callbacks on Complete's thread.
class CompletionState : public WorkState {
 public:
  // Blocks until Complete; refused inside a CUDA host function (backend.h).
  absl::Status Wait() override;
  bool Test() override { return done(); }
  void OnDone(std::function<void(const absl::Status&)> fn) override { done_.OnOpen(std::move(fn)); }
  void Complete(absl::Status status) { done_.Open(std::move(status)); }

 protected:
  bool done() const { return done_.is_open(); }
  absl::Status final_status() const { return done_.Wait(); }  // at once when done()

 private:
  HostGate done_;
};

// A handle to an enqueued operation. Copyable; all copies see the same
// operation. A default-constructed Work is already done and OK.
class Work {
 public:
  Work() = default;
  Work(std::shared_ptr<WorkState> state, uint64_t sequence) : state_(std::move(state)), sequence_(sequence) {}
  // Blocks the host until the operation finished; returns its final status.
  // The watchdog bounds the wait (the job aborts past the deadline). Counted
  // as a host wait (HostSyncCount, backend.h).
  absl::Status Wait() const;
  // Non-blocking: true once the operation finished (then Wait returns at once).
  bool Test() const { return state_ ? state_->Test() : true; }
  uint64_t sequence() const { return sequence_; }
  WorkState* state() const { return state_.get(); }
  const std::shared_ptr<WorkState>& shared_state() const { return state_; }

 private:
  std::shared_ptr<WorkState> state_;
  uint64_t sequence_ = 0;
};

struct CommOptions {
  double timeout_s = 600;          // comm.timeout_s: deadline of every operation
  std::string backend = "auto";    // comm.backend: "auto" | "mpi" | "nccl"
  Device device = Device::Cpu();   // train.device: where tensors live; "auto" = nccl for cuda, mpi for cpu
  std::string name = "world";      // the group's name in records and watchdog messages
  std::shared_ptr<CommSink> sink;  // optional; inherited by Split
  int cuda_device = -1;            // NCCL: device index, -1 = local rank mod device count
  // MPI: copy every operation's buffers through host staging buffers, as is
  // done for device buffers (host_staging.h), so that CPU tests run that path.
  bool stage_through_host = false;
};

// comm.timeout_s and comm.backend of the job config (after ApplyDefaults),
// for tensors on `device` (train.device). comm.backend = "nccl" with a CPU
// device is an error naming the fix (job_config.cc refuses it first).
absl::StatusOr<CommOptions> CommOptionsFromConfig(const config::CommConfig& config,
                                                  const std::string& device);

// The error for comm.backend = "nccl" with tensors on `device` (the CPU).
std::string NcclNeedsCudaMessage(const std::string& device);

// Split color for ranks that join no group (Split returns nullptr for them).
inline constexpr int kNoColor = -1;

class Communicator {
 public:
  virtual ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  // World ranks of the members, in group-rank order.
  const std::vector<int>& group_ranks() const { return group_ranks_; }
  const std::string& name() const { return options_.name; }
  const CommOptions& options() const { return options_; }
  double timeout_s() const { return timeout_s_.load(); }
  // Applies to operations enqueued from now on. Must be > 0. `field` (a
  // string literal) names the setting in the watchdog's message.
  absl::Status set_timeout_s(double seconds, const char* field = "comm.timeout_s");
  // Where buffers must live: cpu (MPI) or cuda:i (NCCL).
  virtual Device device() const = 0;
  virtual const char* backend_name() const = 0;
  // True for a host-executing backend (MPI): it takes buffers of another
  // device on a stream of that device and stages them through host memory.
  bool StagesDeviceBuffers() const;

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

  // ---- Data plane: the same operations ordered on `stream` (see the top of
  // this file). Buffers live on device(); `stream` belongs to that device.
  absl::Status AllReduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op,
                         Stream& stream);
  absl::Status Broadcast(const void* send, void* recv, size_t count, DType dtype, int root, Stream& stream);
  absl::Status AllGather(const void* send, void* recv, size_t count, DType dtype, Stream& stream);
  absl::Status AllGatherV(const void* send, size_t send_count, void* recv,
                          absl::Span<const size_t> recv_counts, absl::Span<const size_t> recv_displs,
                          DType dtype, Stream& stream);
  absl::Status ReduceScatter(const void* send, void* recv, size_t count, DType dtype, ReduceOp op,
                             Stream& stream);
  absl::Status AllToAll(const void* send, void* recv, size_t count, DType dtype, Stream& stream);
  absl::Status AllToAllV(const void* send, absl::Span<const size_t> send_counts,
                         absl::Span<const size_t> send_displs, void* recv,
                         absl::Span<const size_t> recv_counts, absl::Span<const size_t> recv_displs,
                         DType dtype, Stream& stream);
  absl::Status GroupP2P(absl::Span<const P2POp> ops, Stream& stream);

  // Waits for every operation enqueued so far; returns the first error.
  absl::Status Synchronize();

  // A worker stream of the tensors' device (device(); for MPI, the
  // options' device, whose buffers it stages) for callers that overlap this
  // communicator's data-plane operations with compute, as an NCCL user keeps a comm stream:
  // wait on the producer's event there, enqueue the operation, record the
  // completion event. Created on first use; lives as long as the communicator.
  absl::StatusOr<Stream*> side_stream();

 protected:
  Communicator(int rank, int size, std::vector<int> group_ranks, CommOptions options);
  // Enqueues a validated operation (sequence, timeout, bytes filled in).
  virtual absl::StatusOr<Work> Submit(OpDesc op) = 0;
  // Enqueues a validated operation in `stream`'s order. The default, for
  // backends that run operations on a host thread (MPI): records a marker on
  // `stream` that op.after makes the backend wait for before it starts, and
  // enqueues on `stream` a wait for the operation's Work.
  virtual absl::StatusOr<Work> SubmitOnStream(OpDesc op, Stream& stream);
  // Wraps another communicator (CommWrapper) and forwards to its Submit.
  static absl::StatusOr<Work> SubmitTo(Communicator& target, OpDesc op) {
    return target.Submit(std::move(op));
  }
  // Runs a validated split (after the enqueued operations) and builds the child.
  virtual absl::StatusOr<std::unique_ptr<Communicator>> SplitImpl(OpDesc op, CommOptions child_options) = 0;

 private:
  absl::StatusOr<Work> CheckAndSubmit(OpDesc op);
  absl::Status CheckAndEnqueue(OpDesc op, Stream& stream);

  int rank_, size_;
  std::vector<int> group_ranks_;
  CommOptions options_;
  std::atomic<double> timeout_s_;
  std::atomic<const char*> timeout_field_{"comm.timeout_s"};
  uint64_t next_sequence_ = 0;
  Work last_;
  std::unique_ptr<Stream> side_stream_;
};

// The world communicator of the configured backend: "mpi" (host buffers),
// "nccl" (device buffers; only when built with CUDA), "auto" = nccl when
// options.device is a CUDA device, mpi when it is the CPU (the tensors'
// device decides, never which devices happen to be visible). Collective over
// the world.
// MpiEnv::Init must have run.
absl::StatusOr<std::unique_ptr<Communicator>> CreateWorldCommunicator(const CommOptions& options);

}  // namespace moe::comm

#endif  // MOE_COMM_COMMUNICATOR_H_
