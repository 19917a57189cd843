// Device backends, split as ggml-backend splits them:
//
//   BufferType  allocates Buffers for one device (alignment, host-visible or not)
//   Buffer      one allocation: device pointer, size, memory category; frees on destruction
//   Stream      an ordered queue of work on one device (cudaStream_t on CUDA; on CPU a
//               work queue run inline or by a worker thread)
//   Event       a point in a stream's queue that other streams or the host can wait for
//   Backend     one device: its buffer type, streams, events, memory tracker, and the
//               ops it supports (SupportsOp); ops themselves are called through ops.h
//
// Model and parallel code see only these interfaces and ops.h; nothing in them
// is CPU-specific, so the same schedule (compute on one stream, communication
// on another, ordered by events) runs on CPU and CUDA.
//
//   ASSIGN_OR_RETURN(Backend * backend, GetBackend(Device::Cpu()));
//   Stream& compute = backend->default_stream();
//   ASSIGN_OR_RETURN(std::unique_ptr<Stream> comm, backend->CreateStream(StreamMode::kWorker));
//   ASSIGN_OR_RETURN(std::unique_ptr<Event> ready, backend->CreateEvent());
//   RETURN_IF_ERROR(ops::Gemm(compute, x, false, w, true, y));  // enqueued on compute
//   RETURN_IF_ERROR(compute.Record(*ready));
//   RETURN_IF_ERROR(comm->Wait(*ready));        // comm work after this runs after the GEMM
//   RETURN_IF_ERROR(comm->LaunchHostFunc([=] { return SendRows(y); }));
//   RETURN_IF_ERROR(comm->Synchronize());       // host waits; returns the first async error
//
// Error model: a call returning OK means "enqueued"; an error raised by work
// that already ran asynchronously is kept by the stream and returned by its
// next Synchronize() (and by the Synchronize() of events recorded after it).
//
// Host waits. Stream::Synchronize, Event::Synchronize and comm::Work::Wait
// block the host on device work; on a GPU each one stalls the launch queue.
// Every such call made from a host thread is counted (HostSyncCount), so
// tests can pin the number a training step makes. Stream::Wait(Event) is not
// a host wait: on CUDA the device waits; on a CPU inline stream the calling
// thread is that stream's device and waits as the GPU would. Waits made on a
// device-side thread (a CPU stream's worker, a communicator's progress
// thread; see MarkDeviceThread) are not counted either.
#ifndef MOE_RUNTIME_CORE_BACKEND_H_
#define MOE_RUNTIME_CORE_BACKEND_H_

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "runtime/core/dtype.h"
#include "runtime/core/memory.h"

namespace moe {

class Backend;
class Kernels;

// One allocation. Move-free: owned through std::shared_ptr by Tensors.
class Buffer {
 public:
  virtual ~Buffer() = default;
  // Device address (a host pointer for CPU buffers). Never null, even for size 0.
  virtual void* data() const = 0;
  virtual size_t size() const = 0;
  virtual MemoryCategory category() const = 0;
  virtual Device device() const = 0;
  // Can the host dereference data()? (CPU: yes; CUDA device memory: no.)
  virtual bool host_visible() const = 0;
};

class BufferType {
 public:
  virtual ~BufferType() = default;
  virtual std::string name() const = 0;  // "cpu", "cuda:0"
  virtual size_t alignment() const = 0;
  virtual Device device() const = 0;
  // Allocates `bytes` (0 is allowed) attributed to `category` in the device's
  // MemoryTracker; the bytes are released from the tracker when the Buffer dies.
  // ResourceExhausted when the device has no room.
  virtual absl::StatusOr<std::shared_ptr<Buffer>> Allocate(size_t bytes, MemoryCategory category) = 0;
};

class Event;
class HostGate;

enum class StreamMode : uint8_t {
  // Work runs on the calling thread when it is enqueued (in order, trivially).
  // CPU default stream; on CUDA every stream is asynchronous and this mode is
  // treated as kWorker.
  kInline = 0,
  // Work runs later, in enqueue order, on the stream's own thread (CPU) or on
  // the device (CUDA).
  kWorker = 1,
};

// An ordered queue of work on one device. Not copyable; destroying a stream
// waits for its queued work. Enqueueing from several host threads into one
// stream is allowed (order between them is the order of the calls).
class Stream {
 public:
  virtual ~Stream() = default;
  virtual Backend& backend() const = 0;
  virtual StreamMode mode() const = 0;
  // Blocks the host until everything enqueued so far has run; returns the
  // first error raised by asynchronous work on this stream (and clears it).
  virtual absl::Status Synchronize() = 0;
  // Marks the current end of this stream's queue in `event`.
  virtual absl::Status Record(Event& event) = 0;
  // Work enqueued on this stream after Wait() runs only after `event`'s work.
  // Waiting on an event never recorded returns at once (as CUDA does). An
  // asynchronous error of the event's stream up to the event reaches this
  // stream too (CUDA errors are sticky), so a failed transfer is reported by
  // the Synchronize of the compute stream that consumed it.
  virtual absl::Status Wait(const Event& event) = 0;
  // Enqueues a host function (cudaLaunchHostFunc on CUDA). A non-OK status it
  // returns is kept and reported by Synchronize(). Communicators use this to
  // run MPI calls in stream order.
  // A host function must not wait for other work: CUDA may run the host
  // functions of every stream on one thread, and forbids waits that depend on
  // CUDA work not ordered before them. To make a stream wait for the host
  // (a communication run by a progress thread), use WaitHostGate.
  virtual absl::Status LaunchHostFunc(std::function<absl::Status()> fn) = 0;
  // Work enqueued on this stream after the call runs once `gate` is opened
  // (HostGate::Open, from any host thread). The wait holds no host thread on
  // CUDA: a one-thread kernel polls a word of mapped host memory. A non-OK
  // status given to Open is kept by the stream and returned by Synchronize.
  // Destroying the stream waits for its gates, as for any queued work.
  virtual absl::Status WaitHostGate(std::shared_ptr<HostGate> gate) = 0;
  // Enqueues a copy of `bytes` of host memory at `src` into `dst` (memory of
  // this stream's device) and returns without waiting for the stream: the
  // bytes are taken before it returns, so `src` may be reused at once, and
  // land in stream order. CUDA: through the stream's page-locked upload ring
  // (cuda_backend.h); CPU: copied now (inline) or by the worker
  // from a private copy. Tensor::FromHostOn builds on it.
  virtual absl::Status CopyFromHost(void* dst, const void* src, size_t bytes) = 0;
  // The native queue (cudaStream_t on CUDA); nullptr on CPU.
  virtual void* native_handle() const { return nullptr; }
};

// A marker in a stream. Record it again to move it; Synchronize() waits on the host.
class Event {
 public:
  virtual ~Event() = default;
  // Blocks the host until the work before the last Record() has run; returns
  // the first asynchronous error of the recorded stream up to that point.
  virtual absl::Status Synchronize() const = 0;
  // True when the recorded work has run (or the event was never recorded).
  virtual bool Query() const = 0;
  // Milliseconds from `start`'s completion to this event's completion, as
  // cudaEventElapsedTime: both must be recorded and complete (Query() true),
  // else FailedPrecondition; negative when `start` completed later. On CPU
  // each event holds the steady_clock time at which its stream reached the
  // marker: a worker stream enqueues the marker as a work item, so the time
  // is read when every item enqueued before Record() has finished; an inline
  // stream reads it inside Record() (everything before has already run).
  // Resolution is steady_clock's (nanoseconds), with no device clock skew, so
  // events of different streams of one process are comparable.
  virtual absl::StatusOr<double> ElapsedMsSince(const Event& start) const = 0;
};

// A point the host opens, once, for the streams waiting on it (WaitHostGate).
// Thread-safe.
class HostGate {
 public:
  HostGate() = default;
  HostGate(const HostGate&) = delete;
  HostGate& operator=(const HostGate&) = delete;
  // Opens the gate with `status` (later calls are ignored) and runs the
  // OnOpen callbacks on this thread.
  void Open(absl::Status status);
  // Runs `fn(status)` when the gate opens: now, on this thread, if it is open.
  void OnOpen(std::function<void(const absl::Status&)> fn);
  bool is_open() const { return open_.load(std::memory_order_acquire); }
  // Blocks until the gate opens; returns its status (at once when open). Not
  // counted as a host wait: callers that are the host count their own.
  absl::Status Wait() const;

 private:
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  std::atomic<bool> open_{false};
  absl::Status status_;  // final once open_
  std::vector<std::function<void(const absl::Status&)>> on_open_;
};

// True on a thread while it runs a CUDA host function (cudaLaunchHostFunc),
// where waiting for other work is forbidden: the waits of Stream, Event and
// comm::Work return FailedPrecondition there (RefuseWaitInHostFunction)
// instead of risking a deadlock that depends on the driver's thread.
bool InHostFunction();
// Set by the CUDA backend around each host function it runs.
void SetInHostFunction(bool in);
// OK, or the FailedPrecondition for a wait named `what` made in a host function.
absl::Status RefuseWaitInHostFunction(const char* what);

// Host-wait accounting (see "Host waits" above). Counts are process-wide.
uint64_t HostSyncCount();
// Called by a backend or communicator at each host wait; a no-op on threads
// marked with MarkDeviceThread.
void CountHostSync();
// Marks the calling thread as device-side for the rest of its life.
void MarkDeviceThread();
bool IsDeviceThread();

// Op kinds, for SupportsOp (one per entry point of ops.h).
enum class OpKind : uint8_t {
  kCopy,
  kCast,
  kFill,
  kGemm,
  kBatchedGemm,
  kGroupedGemm,
  kGroupedGemmWeightGrad,
  kAdd,
  kAxpby,
  kMul,
  kScale,
  kSilu,
  kSiluBackward,
  kSwiGLU,
  kSwiGLUBackward,
  kReduceSum,
  kReduceSumSquares,
  kReduceMax,
  kSumRows,
  kRmsNorm,
  kRmsNormBackward,
  kAddRmsNorm,
  kRope,
  kRopeBackward,
  kCausalAttention,
  kCausalAttentionBackward,
  kSoftmax,
  kSoftmaxBackward,
  kLogSumExp,
  kCrossEntropy,
  kCrossEntropyBackward,
  kTopK,
  kRouterScores,
  kRouterScoresBackward,
  kGatherRows,
  kScatterAddRows,
  kGatherRowDot,
  kInitNormal,
  kAdamW,
  kNumOpKinds
};
const char* OpKindName(OpKind op);

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;  // "cpu", "cuda:0"
  virtual BufferType& default_buffer_type() = 0;
  // The stream ops use when the caller has no other: inline on CPU, the
  // device's default stream on CUDA. Lives as long as the backend.
  virtual Stream& default_stream() = 0;
  virtual absl::StatusOr<std::unique_ptr<Stream>> CreateStream(StreamMode mode) = 0;
  virtual absl::StatusOr<std::unique_ptr<Event>> CreateEvent() = 0;
  virtual MemoryTracker& memory() = 0;
  virtual bool SupportsOp(OpKind op) const = 0;
  // Threads this backend's kernels use (CPU: OpenBLAS and the element-wise
  // pool). n <= 0 restores the default (env OPENBLAS_NUM_THREADS, else all cores).
  virtual void SetNumThreads(int n) = 0;
  virtual int num_threads() const = 0;
  // The kernels behind ops.h (backend implementers' interface, kernels.h).
  virtual Kernels& kernels() = 0;

  // Host memory this device copies to and from at full speed and
  // asynchronously (a copy into it does not wait for its stream): page-locked
  // memory (cudaHostAlloc, portable to every device) on CUDA, ordinary memory
  // on the CPU. The buffer is on Device::Cpu(), host-visible, and counted in
  // the CPU backend's MemoryTracker under `category`. Allocating (and on CUDA
  // freeing) page-locked memory may wait for the whole device, so a thread
  // that a stream may be waiting for must not allocate it: on a device-side
  // thread (MarkDeviceThread: a communicator's progress thread, a CPU
  // stream's worker) or in a host function this returns FailedPrecondition,
  // on every backend. A buffer whose last reference dies on such a thread is
  // freed later, at the next allocation on an ordinary thread. Used for
  // staging buffers that are allocated once and reused (the MPI
  // communicator's staging region, the checkpoint bucket).
  absl::StatusOr<std::shared_ptr<Buffer>> AllocatePinnedHost(size_t bytes, MemoryCategory category);

 protected:
  // AllocatePinnedHost once the thread is checked; by default the CPU
  // backend's ordinary memory.
  virtual absl::StatusOr<std::shared_ptr<Buffer>> AllocatePinnedHostImpl(size_t bytes,
                                                                         MemoryCategory category);
};

// The backend of `device`, created on first use and alive until exit. The CPU
// backend always exists; "cuda:N" is FailedPrecondition when this build has no
// CUDA backend (configure with -DMOE_WITH_CUDA=ON on a machine with the toolkit).
absl::StatusOr<Backend*> GetBackend(Device device);
// Parses "cpu" / "cuda" / "cuda:N".
absl::StatusOr<Device> ParseDevice(const std::string& text);

}  // namespace moe

#endif  // MOE_RUNTIME_CORE_BACKEND_H_
