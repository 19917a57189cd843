#include "runtime/core/cpu/cpu_backend.h"

#include <cblas.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

#include "absl/strings/str_cat.h"
#include "runtime/core/check.h"
#include "runtime/core/status.h"

namespace moe::cpu {

// ---- ThreadPool ---------------------------------------------------------------

namespace {
thread_local bool tls_in_pool_job = false;

int DefaultThreads() {
  if (const char* env = std::getenv("OPENBLAS_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  int n = static_cast<int>(std::thread::hardware_concurrency());
  return n > 0 ? n : 1;
}
}  // namespace

ThreadPool::ThreadPool(int num_threads) { Start(num_threads); }
ThreadPool::~ThreadPool() { Stop(); }

void ThreadPool::Start(int num_threads) {
  num_threads_ = std::max(1, num_threads);
  stop_ = false;
  for (int i = 1; i < num_threads_; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

void ThreadPool::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
}

void ThreadPool::Resize(int num_threads) {
  std::lock_guard<std::mutex> job(job_mutex_);
  Stop();
  Start(num_threads);
}

void ThreadPool::RunChunks(Job& job) {
  tls_in_pool_job = true;
  for (;;) {
    const int64_t c = job.next.fetch_add(1);
    if (c >= job.num_chunks) break;
    (*job.fn)(c * job.chunk, std::min(job.n, (c + 1) * job.chunk));
    if (job.done.fetch_add(1) + 1 == job.num_chunks) {
      std::lock_guard<std::mutex> lock(mu_);  // the caller checks `done` under mu_
      done_cv_.notify_all();
    }
  }
  tls_in_pool_job = false;
}

void ThreadPool::WorkerLoop() {
  int64_t seen = 0;
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      job = job_;
    }
    // A helper that wakes after the job ended finds no chunk left; it touches
    // only the counters of the Job it holds, never the finished caller's fn.
    if (job != nullptr) RunChunks(*job);
  }
}

void ThreadPool::ParallelFor(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  int64_t chunk = std::max<int64_t>(grain, 1);
  int64_t num_chunks = (n + chunk - 1) / chunk;
  auto serial = [&] {
    for (int64_t c = 0; c < num_chunks; ++c) fn(c * chunk, std::min(n, (c + 1) * chunk));
  };
  if (num_chunks == 1 || num_threads_ == 1 || tls_in_pool_job || !job_mutex_.try_lock()) {
    serial();
    return;
  }
  auto job = std::make_shared<Job>();
  job->fn = &fn;
  job->n = n;
  job->chunk = chunk;
  job->num_chunks = num_chunks;
  {
    std::lock_guard<std::mutex> lock(mu_);
    job_ = job;
    ++generation_;
  }
  cv_.notify_all();
  RunChunks(*job);
  {
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [&] { return job->done.load() == num_chunks; });
    job_.reset();
  }
  job_mutex_.unlock();
}

ThreadPool& Pool() {
  static ThreadPool* pool = new ThreadPool(DefaultThreads());
  return *pool;
}

}  // namespace moe::cpu

namespace moe::cpu {

// ---- Streams and events ---------------------------------------------------------

CpuStream::CpuStream(Backend& backend, StreamMode mode)
    : backend_(backend), mode_(mode), state_(std::make_shared<StreamState>()) {
  if (mode_ == StreamMode::kWorker) worker_ = std::thread([this] { WorkerLoop(); });
}

CpuStream::~CpuStream() {
  if (mode_ != StreamMode::kWorker) return;
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    stop_ = true;
  }
  queue_cv_.notify_all();
  worker_.join();
}

void CpuStream::WorkerLoop() {
  MarkDeviceThread();
  for (;;) {
    std::function<absl::Status()> fn;
    {
      std::unique_lock<std::mutex> lock(queue_mu_);
      queue_cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ and drained
      fn = std::move(queue_.front());
      queue_.pop_front();
    }
    absl::Status status = fn();
    std::lock_guard<std::mutex> lock(state_->mu);
    if (!status.ok() && state_->error.ok()) state_->error = status;
    ++state_->completed;
    state_->cv.notify_all();
  }
}

absl::Status CpuStream::Run(std::function<absl::Status()> fn, uint64_t* seq) {
  if (mode_ == StreamMode::kInline) {
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      ++state_->enqueued;
      if (seq != nullptr) *seq = state_->enqueued;
    }
    absl::Status status = fn();
    std::lock_guard<std::mutex> lock(state_->mu);
    ++state_->completed;
    state_->cv.notify_all();
    return status;
  }
  std::lock_guard<std::mutex> qlock(queue_mu_);
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    ++state_->enqueued;
    if (seq != nullptr) *seq = state_->enqueued;
  }
  queue_.push_back(std::move(fn));
  queue_cv_.notify_one();
  return absl::OkStatus();
}

absl::Status CpuStream::Synchronize() {
  CountHostSync();
  uint64_t seq;
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    seq = state_->enqueued;
  }
  state_->WaitFor(seq);
  std::lock_guard<std::mutex> lock(state_->mu);
  absl::Status error = state_->error;
  state_->error = absl::OkStatus();
  return error;
}

absl::Status CpuStream::Record(Event& event) {
  auto* e = dynamic_cast<CpuEvent*>(&event);
  if (e == nullptr) return absl::InvalidArgumentError("Stream::Record: event is not a CPU event");
  auto stamp = std::make_shared<EventStamp>();
  uint64_t seq = 0;
  // The marker: its time is taken when every earlier item has finished. The
  // stream counts it complete after it returns, under StreamState::mu, so a
  // reader that sees it complete sees the time.
  RETURN_IF_ERROR(Run(
      [stamp] {
        stamp->time = std::chrono::steady_clock::now();
        return absl::OkStatus();
      },
      &seq));
  e->Set(state_, seq, std::move(stamp));
  return absl::OkStatus();
}

absl::Status CpuStream::Wait(const Event& event) {
  auto* e = dynamic_cast<const CpuEvent*>(&event);
  if (e == nullptr) return absl::InvalidArgumentError("Stream::Wait: event is not a CPU event");
  std::shared_ptr<StreamState> st;
  uint64_t seq;
  e->Get(&st, &seq);
  if (st == nullptr || st == state_) return absl::OkStatus();  // own stream: already ordered
  // An asynchronous error of the waited-for stream reaches this one (as a
  // CUDA error is sticky for every stream of the context): it is reported by
  // this stream's next Synchronize (inline: returned here).
  auto wait = [st, seq] {
    st->WaitFor(seq);
    std::lock_guard<std::mutex> lock(st->mu);
    return st->error;
  };
  if (mode_ == StreamMode::kInline) return wait();  // this thread is the inline stream's device
  return Run(std::move(wait));
}

absl::Status CpuStream::LaunchHostFunc(std::function<absl::Status()> fn) { return Run(std::move(fn)); }

absl::Status CpuStream::CopyFromHost(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  if (mode_ == StreamMode::kInline) {
    std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }
  auto copy = std::make_shared<std::vector<char>>(static_cast<const char*>(src),
                                                  static_cast<const char*>(src) + bytes);
  return Run([dst, copy] {
    std::memcpy(dst, copy->data(), copy->size());
    return absl::OkStatus();
  });
}

// The worker (or, inline, the calling thread: the stream's device) waits for
// the gate, as a GPU would spin on it.
absl::Status CpuStream::WaitHostGate(std::shared_ptr<HostGate> gate) {
  return Run([gate = std::move(gate)] { return gate->Wait(); });
}

void CpuEvent::Set(std::shared_ptr<StreamState> state, uint64_t seq, std::shared_ptr<EventStamp> stamp) {
  std::lock_guard<std::mutex> lock(mu_);
  state_ = std::move(state);
  seq_ = seq;
  stamp_ = std::move(stamp);
}

void CpuEvent::Get(std::shared_ptr<StreamState>* state, uint64_t* seq) const {
  std::lock_guard<std::mutex> lock(mu_);
  *state = state_;
  *seq = seq_;
}

void CpuEvent::WaitDevice() const {
  std::shared_ptr<StreamState> st;
  uint64_t seq;
  Get(&st, &seq);
  if (st != nullptr) st->WaitFor(seq);
}

absl::Status CpuEvent::Synchronize() const {
  CountHostSync();
  std::shared_ptr<StreamState> st;
  uint64_t seq;
  Get(&st, &seq);
  if (st == nullptr) return absl::OkStatus();
  st->WaitFor(seq);
  std::lock_guard<std::mutex> lock(st->mu);
  return st->error;
}

bool CpuEvent::Query() const {
  std::shared_ptr<StreamState> st;
  uint64_t seq;
  Get(&st, &seq);
  if (st == nullptr) return true;
  std::lock_guard<std::mutex> lock(st->mu);
  return st->completed >= seq;
}

std::shared_ptr<EventStamp> CpuEvent::ReachedStamp() const {
  std::shared_ptr<StreamState> st;
  std::shared_ptr<EventStamp> stamp;
  uint64_t seq;
  {
    std::lock_guard<std::mutex> lock(mu_);
    st = state_;
    seq = seq_;
    stamp = stamp_;
  }
  if (st == nullptr || stamp == nullptr) return nullptr;
  std::lock_guard<std::mutex> lock(st->mu);  // pairs with the worker's count
  return st->completed >= seq ? stamp : nullptr;
}

absl::StatusOr<double> CpuEvent::ElapsedMsSince(const Event& start) const {
  auto* s = dynamic_cast<const CpuEvent*>(&start);
  if (s == nullptr) return absl::InvalidArgumentError("Event::ElapsedMsSince: start is not a CPU event");
  std::shared_ptr<EventStamp> a = s->ReachedStamp(), b = ReachedStamp();
  if (a == nullptr || b == nullptr) {
    return absl::FailedPreconditionError(
        "Event::ElapsedMsSince: both events must be recorded and complete (Query() true) first");
  }
  return std::chrono::duration<double, std::milli>(b->time - a->time).count();
}

CpuStream& AsCpu(Stream& s) {
  auto* cpu = dynamic_cast<CpuStream*>(&s);
  MOE_CHECK(cpu != nullptr) << "a CPU kernel was given a non-CPU stream";
  return *cpu;
}

// ---- Buffers ------------------------------------------------------------------------

namespace {

constexpr size_t kAlignment = 64;

// Freed blocks are kept by size and handed out again (a caching allocator, as
// GPU runtimes have): a training step allocates the same activation sizes
// every micro-batch, and fresh large allocations would come back from the
// kernel as new zero pages each time (page faults and zeroing cost as much as
// the element-wise work). The cache holds at most kMaxCachedBytes; memory
// accounting counts live buffers only.
class BlockCache {
 public:
  static constexpr size_t kMaxCachedBytes = size_t{1} << 30;

  void* Take(size_t rounded) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.find(rounded);
    if (it == free_.end()) return nullptr;
    void* p = it->second;
    free_.erase(it);
    cached_bytes_ -= rounded;
    return p;
  }
  void Give(void* p, size_t rounded) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cached_bytes_ + rounded <= kMaxCachedBytes) {
        free_.emplace(rounded, p);
        cached_bytes_ += rounded;
        return;
      }
    }
    std::free(p);
  }
  // Returns every cached block to the system (an allocation that failed).
  void Release() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [size, p] : free_) std::free(p);
    free_.clear();
    cached_bytes_ = 0;
  }

 private:
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t cached_bytes_ = 0;
};

class CpuBuffer : public Buffer {
 public:
  CpuBuffer(void* data, size_t size, size_t rounded, MemoryCategory category, MemoryTracker* tracker,
            BlockCache* cache)
      : data_(data), size_(size), rounded_(rounded), category_(category), tracker_(tracker), cache_(cache) {}
  ~CpuBuffer() override {
    cache_->Give(data_, rounded_);
    tracker_->OnFree(category_, static_cast<int64_t>(size_));
  }
  void* data() const override { return data_; }
  size_t size() const override { return size_; }
  MemoryCategory category() const override { return category_; }
  Device device() const override { return Device::Cpu(); }
  bool host_visible() const override { return true; }

 private:
  void* data_;
  size_t size_, rounded_;
  MemoryCategory category_;
  MemoryTracker* tracker_;
  BlockCache* cache_;
};

class CpuBufferType : public BufferType {
 public:
  explicit CpuBufferType(MemoryTracker* tracker) : tracker_(tracker) {}
  std::string name() const override { return "cpu"; }
  size_t alignment() const override { return kAlignment; }
  Device device() const override { return Device::Cpu(); }
  absl::StatusOr<std::shared_ptr<Buffer>> Allocate(size_t bytes, MemoryCategory category) override {
    size_t rounded = std::max(kAlignment, (bytes + kAlignment - 1) / kAlignment * kAlignment);
    void* p = cache_.Take(rounded);
    if (p == nullptr) p = std::aligned_alloc(kAlignment, rounded);
    if (p == nullptr) {
      cache_.Release();
      p = std::aligned_alloc(kAlignment, rounded);
    }
    if (p == nullptr)
      return absl::ResourceExhaustedError(absl::StrCat("cpu: cannot allocate ", bytes, " bytes for ",
                                                       MemoryCategoryName(category), " (",
                                                       tracker_->Total().live_bytes, " bytes live)"));
    tracker_->OnAllocate(category, static_cast<int64_t>(bytes));
    return std::shared_ptr<Buffer>(
        std::make_shared<CpuBuffer>(p, bytes, rounded, category, tracker_, &cache_));
  }

 private:
  MemoryTracker* tracker_;
  BlockCache cache_;
};

class CpuBackend : public Backend {
 public:
  CpuBackend()
      : buffer_type_(&memory_), default_stream_(*this, StreamMode::kInline), kernels_(MakeCpuKernels()) {
    openblas_set_num_threads(1);  // one threading layer: the pool's (cpu_backend.h)
    num_threads_ = Pool().num_threads();
  }
  Device device() const override { return Device::Cpu(); }
  std::string name() const override { return "cpu"; }
  BufferType& default_buffer_type() override { return buffer_type_; }
  Stream& default_stream() override { return default_stream_; }
  absl::StatusOr<std::unique_ptr<Stream>> CreateStream(StreamMode mode) override {
    return std::unique_ptr<Stream>(std::make_unique<CpuStream>(*this, mode));
  }
  absl::StatusOr<std::unique_ptr<Event>> CreateEvent() override {
    return std::unique_ptr<Event>(std::make_unique<CpuEvent>());
  }
  MemoryTracker& memory() override { return memory_; }
  bool SupportsOp(OpKind op) const override { return op < OpKind::kNumOpKinds; }
  void SetNumThreads(int n) override {
    if (n <= 0) n = DefaultThreads();
    Pool().Resize(n);
    num_threads_ = n;
  }
  int num_threads() const override { return num_threads_; }
  Kernels& kernels() override { return *kernels_; }

 private:
  MemoryTracker memory_;
  CpuBufferType buffer_type_;
  CpuStream default_stream_;
  std::unique_ptr<Kernels> kernels_;
  int num_threads_ = 1;
};

}  // namespace

Backend& CpuBackendInstance() {
  static CpuBackend* backend = new CpuBackend();  // never destroyed: outlives every tensor
  return *backend;
}

}  // namespace moe::cpu
