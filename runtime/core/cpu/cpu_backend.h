// The CPU backend (internal to runtime/core: model code reaches it only
// through backend.h and ops.h).
//
// Streams: an inline stream runs each piece of work when it is enqueued; a
// worker stream runs them in order on its own thread. Events are (stream
// state, sequence number, time stamp) triples: work item n of a stream is
// done when the stream's completed count reaches n. Record() on a worker
// stream enqueues a marker item that stamps steady_clock when the worker
// reaches it; on an inline stream it stamps at the call.
//
// Threads: one threading layer. Every kernel, GEMMs included, runs on
// ThreadPool (num_threads - 1 helper threads plus the caller); OpenBLAS runs
// single-threaded inside the pool's chunks (cpu_gemm.cc splits each GEMM into
// tiles of C, and grouped GEMMs into (expert, tile) tasks). The thread count
// defaults to OPENBLAS_NUM_THREADS when set, else all cores; with R ranks on a
// node set OPENBLAS_NUM_THREADS (or train.threads_per_rank) to cores / R.
#ifndef MOE_RUNTIME_CORE_CPU_CPU_BACKEND_H_
#define MOE_RUNTIME_CORE_CPU_CPU_BACKEND_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "runtime/core/backend.h"
#include "runtime/core/kernels.h"

namespace moe::cpu {

// A fixed pool running ParallelFor jobs. One job at a time: a caller that finds
// the pool busy (another stream's thread) runs its job alone, so nesting and
// concurrent streams never deadlock.
//
// Chunks are claimed from a shared counter by the caller and by whichever
// helpers are awake; the caller waits only for chunks that were claimed, never
// for a helper that has not woken up yet, so a descheduled helper (a loaded,
// oversubscribed machine) costs its share of the work, not a stall.
class ThreadPool {
 public:
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  // Calls fn(begin, end) over [0, n) split into chunks of at least `grain`
  // items. The split depends only on (n, grain), never on the thread count, so
  // per-chunk partial results are deterministic.
  void ParallelFor(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);
  void Resize(int num_threads);
  int num_threads() const { return num_threads_; }

 private:
  struct Job {
    const std::function<void(int64_t, int64_t)>* fn = nullptr;
    int64_t n = 0, chunk = 1, num_chunks = 0;
    std::atomic<int64_t> next{0}, done{0};
  };
  void Start(int num_threads);
  void Stop();
  void WorkerLoop();
  void RunChunks(Job& job);

  int num_threads_ = 1;
  std::vector<std::thread> workers_;
  std::mutex job_mutex_;  // held by the caller for the duration of a job
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::shared_ptr<Job> job_;  // the job being run (a late helper keeps it alive)
  int64_t generation_ = 0;
  bool stop_ = false;
};

// The pool of the CPU backend (for kernels).
ThreadPool& Pool();

struct StreamState {
  std::mutex mu;
  std::condition_variable cv;
  uint64_t enqueued = 0, completed = 0;
  absl::Status error;  // first asynchronous error not yet reported
  void WaitFor(uint64_t seq) {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return completed >= seq; });
  }
};

class CpuStream : public Stream {
 public:
  CpuStream(Backend& backend, StreamMode mode);
  ~CpuStream() override;
  Backend& backend() const override { return backend_; }
  StreamMode mode() const override { return mode_; }
  absl::Status Synchronize() override;
  absl::Status Record(Event& event) override;
  absl::Status Wait(const Event& event) override;
  absl::Status LaunchHostFunc(std::function<absl::Status()> fn) override;
  absl::Status WaitHostGate(std::shared_ptr<HostGate> gate) override;
  absl::Status CopyFromHost(void* dst, const void* src, size_t bytes) override;
  // Runs `fn` in stream order: now (inline; its status is returned) or on the
  // worker. `*seq` (when given) receives the item's position in the stream.
  absl::Status Run(std::function<absl::Status()> fn, uint64_t* seq = nullptr);

 private:
  void WorkerLoop();
  Backend& backend_;
  StreamMode mode_;
  std::shared_ptr<StreamState> state_;
  std::mutex queue_mu_;
  std::condition_variable queue_cv_;
  std::deque<std::function<absl::Status()>> queue_;
  bool stop_ = false;
  std::thread worker_;
};

// When a recorded marker was reached; written by the stream before it counts
// the marker complete (under StreamState::mu), read after.
struct EventStamp {
  std::chrono::steady_clock::time_point time;
};

class CpuEvent : public Event {
 public:
  absl::Status Synchronize() const override;
  bool Query() const override;
  absl::StatusOr<double> ElapsedMsSince(const Event& start) const override;
  void Set(std::shared_ptr<StreamState> state, uint64_t seq, std::shared_ptr<EventStamp> stamp);
  void Get(std::shared_ptr<StreamState>* state, uint64_t* seq) const;
  // Waits without counting a host sync (device-side waits).
  void WaitDevice() const;

 private:
  // The stamp when the marker was reached, or null when not recorded / not yet reached.
  std::shared_ptr<EventStamp> ReachedStamp() const;
  mutable std::mutex mu_;
  std::shared_ptr<StreamState> state_;
  uint64_t seq_ = 0;
  std::shared_ptr<EventStamp> stamp_;
};

// The stream of a kernel call, known to be a CpuStream (ops.cc checks the device).
CpuStream& AsCpu(Stream& s);

// Makes the CPU Kernels table (cpu_kernels.cc).
std::unique_ptr<Kernels> MakeCpuKernels();

// The CPU Backend singleton.
Backend& CpuBackendInstance();

}  // namespace moe::cpu

#endif  // MOE_RUNTIME_CORE_CPU_CPU_BACKEND_H_
