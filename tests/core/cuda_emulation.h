// A CPU stand-in for the part of CUDA that the kernels of runtime/core/cuda/
// use (cuda_launch.cuh, the flash attention, element-wise, norm, RoPE and
// softmax files), so that the CPU suite runs those kernels (the real source,
// compiled as C++ with MOE_CUDA_EMULATION defined) where no GPU can:
//   - a launch runs each block as blockDim.x real threads, one block after the
//     other; __syncthreads and __syncwarp are real barriers and
//     __shfl_xor_sync exchanges through them, so a missing barrier shows as a
//     wrong result (and as a race under ThreadSanitizer);
//   - dynamic shared memory is exactly the launch's byte count, filled with
//     NaN bytes; a launch above 48 KiB fails unless cudaFuncSetAttribute
//     raised that kernel's limit, as on a GPU;
//   - nvcuda::wmma fragments hold their whole 16 x 16 tile, with the
//     documented element mapping of load/store_matrix_sync (row_major:
//     p[r * ldm + c]; col_major: p[c * ldm + r]), the documented alignment
//     (32-byte pointers; ldm a multiple of 8 for 16-bit elements, 4 for f32)
//     checked on every call, and mma_sync in f32.
// What it cannot show: real-hardware timing, memory-model or register effects.
// Test code only (tests/core/flash_attention_emulation_test.cc,
// tests/core/cuda_kernels_emulation_test.cc).
#ifndef MOE_TESTS_CORE_CUDA_EMULATION_H_
#define MOE_TESTS_CORE_CUDA_EMULATION_H_

#ifndef MOE_CUDA_EMULATION
#error "define MOE_CUDA_EMULATION before including cuda_emulation.h"
#endif

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "runtime/core/kernel_math.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define CUDART_CB
// A kernel's __shared__ array: one per kernel, shared by the threads of the
// block that runs (blocks run one after another, one kernel at a time).
#define __shared__ static

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorLaunchOutOfResources = 7,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorNotReady = 600,
};
struct CUstream_st;
struct CUevent_st;
using cudaStream_t = CUstream_st*;
using cudaEvent_t = CUevent_st*;
using cudaHostFn_t = void (*)(void*);
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
enum cudaMemcpyKind {
  cudaMemcpyHostToHost,
  cudaMemcpyHostToDevice,
  cudaMemcpyDeviceToHost,
  cudaMemcpyDeviceToDevice,
  cudaMemcpyDefault
};
constexpr unsigned cudaStreamDefault = 0, cudaStreamNonBlocking = 1;
constexpr unsigned cudaEventDefault = 0, cudaEventDisableTiming = 2;
constexpr unsigned cudaHostAllocDefault = 0, cudaHostAllocPortable = 1, cudaHostAllocMapped = 2;

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct EmulatedIndex {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmulatedIndex threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
struct uint4 {
  uint32_t x, y, z, w;
};
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }
struct __nv_bfloat16 {
  uint16_t bits;
};

namespace moe::cuda_emulation {

[[noreturn]] inline void Fail(const char* what, const void* p, size_t n) {
  std::fprintf(stderr, "cuda emulation: %s (pointer %p, %zu)\n", what, p, n);
  std::abort();
}

// ---- One kernel's blocks ------------------------------------------------------
// A barrier among `count` emulated threads.
struct Group {
  explicit Group(unsigned n = 0) : count(n) {}
  unsigned count, arrived = 0, generation = 0;
  std::unique_ptr<std::barrier<>> os;  // the threads mode's
};

struct State {
  std::mutex kernel_mu;  // one kernel runs at a time
  std::mutex limit_mu;
  std::map<const void*, size_t> shared_limit;  // cudaFuncSetAttribute
  unsigned char* shared = nullptr;
  size_t shared_bytes = 0;
  Group block;
  std::vector<Group> warps;
  double exchange[32][32] = {};  // [warp][lane]
};
inline State& S() {
  static State* state = new State();  // never destroyed (stream workers may outlive static destruction)
  return *state;
}
inline thread_local bool t_in_host_function = false;    // on the host-function thread while it runs one
inline thread_local cudaError_t t_error = cudaSuccess;  // per host thread, as CUDA's last error
// Devices: MOE_CUDA_EMULATION_DEVICES of them (default 1, at most 16); each
// host thread has a current one (0 until cudaSetDevice), as in CUDA.
inline int DeviceCount() {
  static const int n = [] {
    const char* v = std::getenv("MOE_CUDA_EMULATION_DEVICES");
    const int d = v != nullptr ? std::atoi(v) : 1;
    return d < 1 ? 1 : d > 16 ? 16 : d;
  }();
  return n;
}
inline thread_local int t_device = 0;

#ifdef MOE_CUDA_EMULATION_FIBERS
// Fibers: a block's threads are coroutines on the one host thread that runs
// the kernel, switched at barriers only (fast; no data race between them can
// show, a missing barrier still does as a wrong result). On x86-64 a switch
// saves and loads the callee-saved registers and the stack pointer (no system
// call, unlike swapcontext's signal mask; the floating-point control words are
// the thread's, which no kernel changes); elsewhere it is swapcontext.
#if defined(__x86_64__)
extern "C" void moe_cuda_emulation_switch(void** save_sp, void* load_sp);
// Weak: every translation unit that includes this header defines it.
asm(R"(
  .text
  .weak moe_cuda_emulation_switch
  .type moe_cuda_emulation_switch, @function
moe_cuda_emulation_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size moe_cuda_emulation_switch, .-moe_cuda_emulation_switch
)");
struct Context {
  void* sp = nullptr;
};
inline void SwitchTo(Context& save, Context& load) { moe_cuda_emulation_switch(&save.sp, load.sp); }
// A context that enters `entry` (which must never return) on the given stack.
inline void Prepare(Context& c, void* stack, size_t bytes, void (*entry)(), Context*) {
  auto* p = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t{15});
  *--p = 0;                                  // entry's return address: none
  *--p = reinterpret_cast<uint64_t>(entry);  // 16-byte aligned, so entry starts as if called
  for (int r = 0; r < 6; ++r) *--p = 0;      // rbp, rbx, r12-r15
  c.sp = p;
}
#else
struct Context {
  ucontext_t uc;
};
inline void SwitchTo(Context& save, Context& load) { swapcontext(&save.uc, &load.uc); }
inline void Prepare(Context& c, void* stack, size_t bytes, void (*entry)(), Context* back) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = &back->uc;
  makecontext(&c.uc, entry, 0);
}
#endif

struct Fibers {
  Context scheduler;
  std::vector<Context> ctx;
  std::vector<void*> stacks;
  std::vector<char> done;
  std::vector<std::pair<const Group*, unsigned>> waiting;  // the barrier and generation a thread waits for
  unsigned current = 0;
  uint64_t progress = 0;
  const std::function<void()>* body = nullptr;
  static constexpr size_t kStack = 256 * 1024;
  ~Fibers() {
    for (void* s : stacks) munmap(s, kStack);
  }
};
inline Fibers& F() {
  static thread_local Fibers f;
  return f;
}
inline void Yield() {
  Fibers& f = F();
  SwitchTo(f.ctx[f.current], f.scheduler);
}
inline void FiberEntry() {
  Fibers& f = F();
  (*f.body)();
  f.done[f.current] = 1;
  ++f.progress;
  SwitchTo(f.ctx[f.current], f.scheduler);  // never resumed
  Fail("a finished fiber was resumed", nullptr, f.current);
}
inline void Arrive(Group& g) {
  Fibers& f = F();
  const unsigned generation = g.generation;
  ++f.progress;
  if (++g.arrived == g.count) {
    g.arrived = 0;
    ++g.generation;
    return;
  }
  f.waiting[f.current] = {&g, generation};
  while (g.generation == generation) Yield();
  f.waiting[f.current] = {nullptr, 0};
}
inline void RunBlock(unsigned threads, const std::function<void()>& body) {
  Fibers& f = F();
  f.body = &body;
  f.ctx.resize(threads);
  f.done.assign(threads, 0);
  f.waiting.assign(threads, {nullptr, 0});
  while (f.stacks.size() < threads) {
    void* s = mmap(nullptr, Fibers::kStack, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (s == MAP_FAILED) Fail("no memory for a fiber stack", nullptr, Fibers::kStack);
    f.stacks.push_back(s);
  }
  for (unsigned t = 0; t < threads; ++t)
    Prepare(f.ctx[t], f.stacks[t], Fibers::kStack, &FiberEntry, &f.scheduler);
  for (unsigned left = threads; left > 0;) {
    const uint64_t before = f.progress;
    left = 0;
    for (unsigned t = 0; t < threads; ++t) {
      if (f.done[t]) continue;
      const auto [group, generation] = f.waiting[t];
      if (group == nullptr || group->generation != generation) {  // else it would only yield again
        f.current = t;
        threadIdx.x = t;
        SwitchTo(f.scheduler, f.ctx[t]);
      }
      left += f.done[t] ? 0 : 1;
    }
    if (left > 0 && f.progress == before)
      Fail("deadlock: a barrier that not every thread of the block (or warp) reaches", nullptr, left);
  }
}
#else
// Threads: each thread of a block is a host thread, barriers are real barriers
// (a missing one shows as a wrong result and as a race under ThreadSanitizer).
inline void Arrive(Group& g) { g.os->arrive_and_wait(); }
inline void RunBlock(unsigned threads, const std::function<void()>& body) {
  const dim3 block_index(blockIdx.x, blockIdx.y);
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      threadIdx.x = t;
      blockIdx.x = block_index.x;
      blockIdx.y = block_index.y;
      body();
    });
  for (std::thread& t : pool) t.join();
}
#endif

inline void CheckFragmentPointer(const void* p, unsigned ldm, unsigned ldm_multiple, size_t span_bytes) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) Fail("fragment pointer not 32-byte aligned", p, 32);
  if (ldm % ldm_multiple != 0) Fail("ldm not a multiple of the element's requirement", p, ldm);
  const auto* c = static_cast<const unsigned char*>(p);
  State& s = S();
  if (c >= s.shared && c < s.shared + s.shared_bytes && c + span_bytes > s.shared + s.shared_bytes)
    Fail("fragment reaches past the dynamic shared memory", p, span_bytes);
}

// Runs grid.x * grid.y blocks of block.x threads, one block after another.
inline void RunKernel(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body) {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.kernel_mu);
  gridDim = grid;
  blockDim = block;
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::vector<unsigned char> shared(shared_bytes + 128, 0xff);  // NaN bytes
      s.shared = shared.data() + (128 - reinterpret_cast<uintptr_t>(shared.data()) % 128) % 128;
      s.shared_bytes = shared_bytes;
      s.block = Group(block.x);
      s.warps.clear();
      for (unsigned w = 0; w * 32 < block.x; ++w) s.warps.emplace_back(std::min(32u, block.x - w * 32));
#ifndef MOE_CUDA_EMULATION_FIBERS
      s.block.os = std::make_unique<std::barrier<>>(block.x);
      for (Group& g : s.warps) g.os = std::make_unique<std::barrier<>>(g.count);
#endif
      blockIdx.x = bx;
      blockIdx.y = by;
      RunBlock(block.x, body);
      s.shared = nullptr;
    }
  }
}

// ---- Streams and events -------------------------------------------------------
// A stream is a host thread that runs its operations (kernels, copies, host
// functions, event records, waits) in order; the enqueuing call returns at
// once, as on a GPU, so a missing Synchronize or Wait shows as a race. The
// null stream runs each operation in the calling thread before returning.
struct Progress {
  std::mutex mu;
  std::condition_variable cv;
  uint64_t completed = 0;
  void WaitFor(uint64_t ticket) {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return completed >= ticket; });
  }
  bool Reached(uint64_t ticket) {
    std::lock_guard<std::mutex> lock(mu);
    return completed >= ticket;
  }
};

class Stream {
 public:
  Stream() : worker_([this] { Run(); }) {}
  ~Stream() {
    Synchronize();
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    worker_.join();
  }
  uint64_t Enqueue(std::function<void()> op) {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(std::move(op));
    cv_.notify_all();
    return ++enqueued_;
  }
  uint64_t enqueued() {
    std::lock_guard<std::mutex> lock(mu_);
    return enqueued_;
  }
  void Synchronize() { progress_->WaitFor(enqueued()); }
  const std::shared_ptr<Progress>& progress() const { return progress_; }

 private:
  void Run() {
    for (;;) {
      std::function<void()> op;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;
        op = std::move(queue_.front());
        queue_.pop_front();
      }
      op();
      {
        std::lock_guard<std::mutex> lock(progress_->mu);
        ++progress_->completed;
      }
      progress_->cv.notify_all();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  uint64_t enqueued_ = 0;
  bool stop_ = false;
  std::shared_ptr<Progress> progress_ = std::make_shared<Progress>();

 public:
  const int device = t_device;  // the creating thread's current device

 private:
  std::thread worker_;  // last: starts after the members it uses
};

struct Event {
  std::mutex mu;
  const int device = t_device;  // the creating thread's current device
  bool timing = true;
  std::shared_ptr<Progress> progress;  // of the stream it was last recorded on; null: complete
  uint64_t ticket = 0;
  std::shared_ptr<std::chrono::steady_clock::time_point> when;
  // The stream progress and ticket of the last record (null: nothing to wait for).
  std::pair<std::shared_ptr<Progress>, uint64_t> Last() {
    std::lock_guard<std::mutex> lock(mu);
    return {progress, ticket};
  }
};

struct Streams {
  std::mutex mu;
  std::set<Stream*> live;
};
inline Streams& LiveStreams() {
  static Streams* s = new Streams();  // never destroyed (streams may outlive static destruction)
  return *s;
}
// Waits for the work every live stream holds now (of every device: the
// calls that wait for "the device" are only made with one device in use).
inline void SynchronizeDevice() {
  std::vector<std::pair<std::shared_ptr<Progress>, uint64_t>> work;
  {
    std::lock_guard<std::mutex> lock(LiveStreams().mu);  // no stream is destroyed meanwhile
    for (Stream* s : LiveStreams().live) work.emplace_back(s->progress(), s->enqueued());
  }
  for (auto& [progress, ticket] : work) progress->WaitFor(ticket);
}
// The device work census: how many kernels, library calls, copies, fills
// and host functions were enqueued, by name (a kernel's function name,
// "cudaMemcpyAsync DtoH", "cublasGemmStridedBatchedEx", ...), counted as
// the calls are accepted. A GPU pays a launch's fixed cost (microseconds)
// for each, whatever its size, so tests bound how many a training step
// makes (tests/runtime/device_work_test.cc).
struct WorkCensus {
  std::mutex mu;
  std::map<std::string, uint64_t> counts;
};
inline WorkCensus& Census() {
  static WorkCensus* c = new WorkCensus();  // never destroyed (stream workers may outlive static destruction)
  return *c;
}
inline void CountWork(const char* what) {
  WorkCensus& c = Census();
  std::lock_guard<std::mutex> lock(c.mu);
  ++c.counts[what];
}
inline std::map<std::string, uint64_t> WorkCensusSnapshot() {
  WorkCensus& c = Census();
  std::lock_guard<std::mutex> lock(c.mu);
  return c.counts;
}

// The host's waits (cudaStreamSynchronize, cudaEventSynchronize,
// cudaDeviceSynchronize), while recorded (RecordHostWaits(true)): each with
// the census as it stood when the host began to wait, i.e. the work the
// device had been given to run meanwhile (tests/runtime/device_work_test.cc).
struct HostWaitLog {
  std::mutex mu;
  bool on = false;
  std::vector<std::map<std::string, uint64_t>> waits;
};
inline HostWaitLog& HostWaits() {
  static HostWaitLog* log = new HostWaitLog();  // never destroyed, as the census
  return *log;
}
inline void RecordHostWaits(bool on) {
  HostWaitLog& log = HostWaits();
  std::lock_guard<std::mutex> lock(log.mu);
  log.on = on;
  log.waits.clear();
}
inline std::vector<std::map<std::string, uint64_t>> RecordedHostWaits() {
  HostWaitLog& log = HostWaits();
  std::lock_guard<std::mutex> lock(log.mu);
  return log.waits;
}
inline void NoteHostWait() {
  HostWaitLog& log = HostWaits();
  std::lock_guard<std::mutex> lock(log.mu);
  if (log.on) log.waits.push_back(WorkCensusSnapshot());
}

// Runs `op` in stream order: now on the null stream.
inline void Submit(cudaStream_t stream, std::function<void()> op) {
  if (t_in_host_function)
    Fail("a CUDA call enqueued work from a host function (cudaLaunchHostFunc); CUDA forbids it", stream, 0);
  if (stream == nullptr)
    op();
  else
    reinterpret_cast<Stream*>(stream)->Enqueue(std::move(op));
}

// A launch checks its configuration as CUDA does (the error is the launching
// thread's next cudaGetLastError) and runs in stream order.
inline void Launch(const void* kernel, const char* name, dim3 grid, dim3 block, size_t shared_bytes,
                   cudaStream_t stream, std::function<void()> body) {
  State& s = S();
  if (stream != nullptr && reinterpret_cast<Stream*>(stream)->device != t_device) {
    t_error = cudaErrorInvalidResourceHandle;  // a launch into a stream of another device fails
    return;
  }
  size_t limit = 48 * 1024;
  {
    std::lock_guard<std::mutex> lock(s.limit_mu);
    if (auto it = s.shared_limit.find(kernel); it != s.shared_limit.end())
      limit = std::max(limit, it->second);
  }
  if (shared_bytes > limit) {
    t_error = cudaErrorLaunchOutOfResources;
    return;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z != 1 || grid.x > 2147483647u || grid.y > 65535 || block.x == 0 ||
      block.x > 1024 || block.y != 1 || block.z != 1) {
    t_error = cudaErrorInvalidConfiguration;
    return;
  }
  CountWork(name);
  Submit(stream,
         [grid, block, shared_bytes, body = std::move(body)] { RunKernel(grid, block, shared_bytes, body); });
}

// ---- Host functions -----------------------------------------------------------
// CUDA may run the host functions of every stream on one thread, and forbids
// CUDA calls in them. So here: one process-wide thread runs them all (a stream
// hands its host function over and waits for it, keeping stream order), and
// a CUDA call made inside one aborts with its name. A host function that
// waits for work queued behind another stream's host function hangs here as
// it may on a GPU.
inline void NotInHostFunction(const char* api) {
  if (t_in_host_function) Fail(api, nullptr, 0);
}
class HostFunctionThread {
 public:
  // Runs fn(arg) on the thread; returns when it has.
  void Run(cudaHostFn_t fn, void* arg) {
    auto done = std::make_shared<Progress>();
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back([fn, arg, done] {
        t_in_host_function = true;
        fn(arg);
        t_in_host_function = false;
        {
          std::lock_guard<std::mutex> l(done->mu);
          done->completed = 1;
        }
        done->cv.notify_all();
      });
    }
    cv_.notify_all();
    done->WaitFor(1);
  }

 private:
  void Loop() {
    for (;;) {
      std::function<void()> op;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return !queue_.empty(); });
        op = std::move(queue_.front());
        queue_.pop_front();
      }
      op();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  std::thread worker_{[this] { Loop(); }};  // last; detached, as the object is never destroyed

 public:
  HostFunctionThread() { worker_.detach(); }
};
inline HostFunctionThread& HostFunctions() {
  static auto* t =
      new HostFunctionThread();  // never destroyed (stream workers may outlive static destruction)
  return *t;
}

}  // namespace moe::cuda_emulation

// ---- The runtime API -------------------------------------------------------------
inline cudaError_t cudaGetLastError() { return std::exchange(moe::cuda_emulation::t_error, cudaSuccess); }
inline cudaError_t cudaPeekAtLastError() { return moe::cuda_emulation::t_error; }
inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidValue:
      return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation:
      return "cudaErrorMemoryAllocation";
    case cudaErrorLaunchOutOfResources:
      return "cudaErrorLaunchOutOfResources";
    case cudaErrorInvalidConfiguration:
      return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice:
      return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle:
      return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady:
      return "cudaErrorNotReady";
  }
  return "cudaErrorUnknown";
}
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "error of the CPU emulation of CUDA (tests/core/cuda_emulation.h)";
}
inline cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute, int bytes) {
  moe::cuda_emulation::NotInHostFunction(
      "cudaFuncSetAttribute called in a host function (cudaLaunchHostFunc); CUDA forbids it");
  if (bytes < 0 || bytes > 227 * 1024) return cudaErrorInvalidValue;  // sm_90's opt-in limit
  std::lock_guard<std::mutex> lock(moe::cuda_emulation::S().limit_mu);
  moe::cuda_emulation::S().shared_limit[kernel] = static_cast<size_t>(bytes);
  return cudaSuccess;
}

inline cudaError_t cudaGetDeviceCount(int* n) {
  moe::cuda_emulation::NotInHostFunction(
      "cudaGetDeviceCount called in a host function (cudaLaunchHostFunc); CUDA forbids it");
  *n = moe::cuda_emulation::DeviceCount();
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  moe::cuda_emulation::NotInHostFunction(
      "cudaGetDevice called in a host function (cudaLaunchHostFunc); CUDA forbids it");
  *d = moe::cuda_emulation::t_device;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) {
  moe::cuda_emulation::NotInHostFunction(
      "cudaSetDevice called in a host function (cudaLaunchHostFunc); CUDA forbids it");
  if (d < 0 || d >= moe::cuda_emulation::DeviceCount()) return cudaErrorInvalidDevice;
  moe::cuda_emulation::t_device = d;
  return cudaSuccess;
}

// Device memory is host memory, filled with 0xff bytes (NaN as f32 and bf16,
// -1 as integers) so that a read before any write shows; freeing waits for
// the device (cudaFree) or for the stream (cudaFreeAsync) as CUDA does. Each
// allocation is registered as device or pinned host memory, so copies and
// memsets check their pointers, and a copy from pageable host memory reads
// its source during the call (CUDA stages it before returning).
namespace moe::cuda_emulation {
enum class Memory { kPageable, kDevice, kPinned };
struct Block {
  size_t bytes;
  Memory kind;
  int device;  // the allocating thread's current device
};
struct Allocations {
  std::mutex mu;
  std::map<uintptr_t, Block> blocks;  // by start
};
inline Allocations& Registry() {
  static Allocations* a = new Allocations();  // never destroyed
  return *a;
}
// The allocation [p, p + bytes) lies in (kind kPageable: none); a range that
// starts in one and runs past its end aborts (on a GPU, a fault).
inline Block BlockOf(const void* p, size_t bytes) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  Allocations& r = Registry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.blocks.upper_bound(a);
  if (it == r.blocks.begin()) return {0, Memory::kPageable, -2};
  --it;
  if (a >= it->first + it->second.bytes) return {0, Memory::kPageable, -2};
  if (a + bytes > it->first + it->second.bytes)
    Fail("a copy or memset runs past the end of an allocation", p, bytes);
  return it->second;
}
inline Memory KindOf(const void* p, size_t bytes) { return BlockOf(p, bytes).kind; }
inline cudaError_t Allocate(void** p, size_t bytes, Memory kind) {
  *p = nullptr;
  if (bytes == 0) return cudaSuccess;
  void* q = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
  if (q == nullptr) return t_error = cudaErrorMemoryAllocation;
  std::memset(q, 0xff, bytes);
  std::lock_guard<std::mutex> lock(Registry().mu);
  Registry().blocks[reinterpret_cast<uintptr_t>(q)] = {bytes, kind, t_device};
  *p = q;
  return cudaSuccess;
}
inline cudaError_t Release(void* p, Memory kind) {
  if (p == nullptr) return cudaSuccess;
  {
    std::lock_guard<std::mutex> lock(Registry().mu);
    auto it = Registry().blocks.find(reinterpret_cast<uintptr_t>(p));
    if (it == Registry().blocks.end() || it->second.kind != kind) return cudaErrorInvalidValue;
    Registry().blocks.erase(it);
  }
  std::free(p);
  return cudaSuccess;
}
}  // namespace moe::cuda_emulation

enum cudaMemoryType {
  cudaMemoryTypeUnregistered = 0,
  cudaMemoryTypeHost = 1,
  cudaMemoryTypeDevice = 2,
  cudaMemoryTypeManaged = 3
};
struct cudaPointerAttributes {
  cudaMemoryType type;
  int device;
  void* devicePointer;
  void* hostPointer;
};
// As CUDA 11 on: pageable memory is "unregistered" (not an error).
inline cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void* p) {
  moe::cuda_emulation::NotInHostFunction(
      "cudaPointerGetAttributes called in a host function (cudaLaunchHostFunc); CUDA forbids it");
  using moe::cuda_emulation::Memory;
  const moe::cuda_emulation::Block b = moe::cuda_emulation::BlockOf(p, 1);
  void* q = const_cast<void*>(p);
  *a = {b.kind == Memory::kDevice   ? cudaMemoryTypeDevice
        : b.kind == Memory::kPinned ? cudaMemoryTypeHost
                                    : cudaMemoryTypeUnregistered,
        b.device, b.kind == Memory::kPageable ? nullptr : q, b.kind == Memory::kDevice ? nullptr : q};
  return cudaSuccess;
}
inline cudaError_t cudaMalloc(void** p, size_t bytes) {
  moe::cuda_emulation::NotInHostFunction(
      "cudaMalloc called in a host function (cudaLaunchHostFunc); CUDA forbids it");
  return moe::cuda_emulation::Allocate(p, bytes, moe::cuda_emulation::Memory::kDevice);
}
inline cudaError_t cudaFree(void* p) {
  moe::cuda_emulation::NotInHostFunction(
      "cudaFree called in a host function (cudaLaunchHostFunc); CUDA forbids it");
  moe::cuda_emulation::SynchronizeDevice();
  return moe::cuda_emulation::Release(p, moe::cuda_emulation::Memory::kDevice);
}
inline cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) { return cudaMalloc(p, bytes); }
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t s) {
  moe::cuda_emulation::NotInHostFunction(
      "cudaFreeAsync called in a host function (cudaLaunchHostFunc); CUDA forbids it");
  if (p != nullptr && moe::cuda_emulation::KindOf(p, 1) != moe::cuda_emulation::Memory::kDevice)
    return cudaErrorInvalidValue;
  moe::cuda_emulation::Submit(s, [p] {
    if (moe::cuda_emulation::Release(p, moe::cuda_emulation::Memory::kDevice) != cudaSuccess)
      moe::cuda_emulation::Fail("cudaFreeAsync of memory freed already", p, 0);
  });
  return cudaSuccess;
}
inline cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned) {
  moe::cuda_emulation::NotInHostFunction(
      "cudaHostAlloc called in a host function (cudaLaunchHostFunc); CUDA forbids it");
  moe::cuda_emulation::SynchronizeDevice();
  return moe::cuda_emulation::Allocate(p, bytes, moe::cuda_emulation::Memory::kPinned);
}
inline cudaError_t cudaFreeHost(void* p) {
  moe::cuda_emulation::NotInHostFunction(
      "cudaFreeHost called in a host function (cudaLaunchHostFunc); CUDA forbids it");
  moe::cuda_emulation::SynchronizeDevice();
  return moe::cuda_emulation::Release(p, moe::cuda_emulation::Memory::kPinned);
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                                   cudaStream_t s) {
  moe::cuda_emulation::NotInHostFunction(
      "cudaMemcpyAsync called in a host function (cudaLaunchHostFunc); CUDA forbids it");
  using moe::cuda_emulation::Memory;
  if (bytes == 0) return cudaSuccess;
  if (dst == nullptr || src == nullptr) return cudaErrorInvalidValue;
  const Memory from = moe::cuda_emulation::KindOf(src, bytes), to = moe::cuda_emulation::KindOf(dst, bytes);
  const bool host_from = from != Memory::kDevice, host_to = to != Memory::kDevice;
  if ((kind == cudaMemcpyHostToDevice && (!host_from || host_to)) ||
      (kind == cudaMemcpyDeviceToHost && (host_from || !host_to)) ||
      (kind == cudaMemcpyDeviceToDevice && (host_from || host_to)) ||
      (kind == cudaMemcpyHostToHost && (!host_from || !host_to)))
    return cudaErrorInvalidValue;  // a kind that the pointers contradict
  moe::cuda_emulation::CountWork(host_from && host_to ? "cudaMemcpyAsync HtoH"
                                 : host_from          ? "cudaMemcpyAsync HtoD"
                                 : host_to            ? "cudaMemcpyAsync DtoH"
                                                      : "cudaMemcpyAsync DtoD");
  if (host_from && host_to) {  // host to host: synchronous, as CUDA's
    if (s != nullptr) reinterpret_cast<moe::cuda_emulation::Stream*>(s)->Synchronize();
    std::memmove(dst, src, bytes);
    return cudaSuccess;
  }
  if (from == Memory::kPageable && !host_to) {
    // From pageable memory: the stream's earlier work first, then the source
    // is staged before the call returns (the caller may reuse it at once).
    if (s != nullptr) reinterpret_cast<moe::cuda_emulation::Stream*>(s)->Synchronize();
    std::memmove(dst, src, bytes);
    return cudaSuccess;
  }
  if (to == Memory::kPageable && !host_from) {
    // Into pageable memory: CUDA returns once the copy is done, so the call
    // waits for the stream's earlier work (only page-locked memory makes a
    // device-to-host copy asynchronous).
    if (s != nullptr) reinterpret_cast<moe::cuda_emulation::Stream*>(s)->Synchronize();
    std::memmove(dst, src, bytes);
    return cudaSuccess;
  }
  moe::cuda_emulation::Submit(s, [=] { std::memmove(dst, src, bytes); });
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t s) {
  moe::cuda_emulation::NotInHostFunction(
      "cudaMemsetAsync called in a host function (cudaLaunchHostFunc); CUDA forbids it");
  if (bytes == 0) return cudaSuccess;
  if (dst == nullptr || moe::cuda_emulation::KindOf(dst, bytes) != moe::cuda_emulation::Memory::kDevice)
    return cudaErrorInvalidValue;
  moe::cuda_emulation::CountWork("cudaMemsetAsync");
  moe::cuda_emulation::Submit(s, [=] { std::memset(dst, value, bytes); });
  return cudaSuccess;
}

inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) {
  moe::cuda_emulation::NotInHostFunction(
      "cudaStreamCreateWithFlags called in a host function (cudaLaunchHostFunc); CUDA forbids it");
  auto* stream = new moe::cuda_emulation::Stream();
  {
    auto& live = moe::cuda_emulation::LiveStreams();
    std::lock_guard<std::mutex> lock(live.mu);
    live.live.insert(stream);
  }
  *s = reinterpret_cast<cudaStream_t>(stream);
  return cudaSuccess;
}
inline cudaError_t cudaStreamCreate(cudaStream_t* s) {
  moe::cuda_emulation::NotInHostFunction(
      "cudaStreamCreate called in a host function (cudaLaunchHostFunc); CUDA forbids it");
  return cudaStreamCreateWithFlags(s, cudaStreamDefault);
}
inline cudaError_t cudaStreamDestroy(cudaStream_t s) {
  moe::cuda_emulation::NotInHostFunction(
      "cudaStreamDestroy called in a host function (cudaLaunchHostFunc); CUDA forbids it");
  if (s == nullptr) return cudaErrorInvalidResourceHandle;
  auto* stream = reinterpret_cast<moe::cuda_emulation::Stream*>(s);
  {
    auto& live = moe::cuda_emulation::LiveStreams();
    std::lock_guard<std::mutex> lock(live.mu);
    if (live.live.erase(stream) == 0) return cudaErrorInvalidResourceHandle;
  }
  delete stream;  // its work finishes first
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  moe::cuda_emulation::NotInHostFunction(
      "cudaStreamSynchronize called in a host function (cudaLaunchHostFunc); CUDA forbids it");
  moe::cuda_emulation::NoteHostWait();
  if (s != nullptr) reinterpret_cast<moe::cuda_emulation::Stream*>(s)->Synchronize();
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() {
  moe::cuda_emulation::NotInHostFunction(
      "cudaDeviceSynchronize called in a host function (cudaLaunchHostFunc); CUDA forbids it");
  moe::cuda_emulation::NoteHostWait();
  moe::cuda_emulation::SynchronizeDevice();
  return cudaSuccess;
}
inline cudaError_t cudaLaunchHostFunc(cudaStream_t s, cudaHostFn_t fn, void* arg) {
  moe::cuda_emulation::NotInHostFunction(
      "cudaLaunchHostFunc called in a host function (cudaLaunchHostFunc); CUDA forbids it");
  moe::cuda_emulation::CountWork("cudaLaunchHostFunc");
  moe::cuda_emulation::Submit(s, [fn, arg] { moe::cuda_emulation::HostFunctions().Run(fn, arg); });
  return cudaSuccess;
}

inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags) {
  moe::cuda_emulation::NotInHostFunction(
      "cudaEventCreateWithFlags called in a host function (cudaLaunchHostFunc); CUDA forbids it");
  auto* event = new moe::cuda_emulation::Event();
  event->timing = (flags & cudaEventDisableTiming) == 0;
  *e = reinterpret_cast<cudaEvent_t>(event);
  return cudaSuccess;
}
inline cudaError_t cudaEventCreate(cudaEvent_t* e) { return cudaEventCreateWithFlags(e, cudaEventDefault); }
inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
  moe::cuda_emulation::NotInHostFunction(
      "cudaEventDestroy called in a host function (cudaLaunchHostFunc); CUDA forbids it");
  if (e == nullptr) return cudaErrorInvalidResourceHandle;
  delete reinterpret_cast<moe::cuda_emulation::Event*>(e);
  return cudaSuccess;
}
// Records the stream's work so far: the event completes when the stream gets here.
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = nullptr) {
  moe::cuda_emulation::NotInHostFunction(
      "cudaEventRecord called in a host function (cudaLaunchHostFunc); CUDA forbids it");
  if (e == nullptr) return cudaErrorInvalidResourceHandle;
  auto* event = reinterpret_cast<moe::cuda_emulation::Event*>(e);
  auto when = std::make_shared<std::chrono::steady_clock::time_point>();
  std::lock_guard<std::mutex> lock(event->mu);
  event->when = when;
  if (s == nullptr) {
    *when = std::chrono::steady_clock::now();
    event->progress = nullptr;
    return cudaSuccess;
  }
  auto* stream = reinterpret_cast<moe::cuda_emulation::Stream*>(s);
  if (stream->device != event->device) return cudaErrorInvalidResourceHandle;  // as CUDA's
  event->progress = stream->progress();
  event->ticket = stream->Enqueue([when] { *when = std::chrono::steady_clock::now(); });
  return cudaSuccess;
}
inline cudaError_t cudaEventQuery(cudaEvent_t e) {
  moe::cuda_emulation::NotInHostFunction(
      "cudaEventQuery called in a host function (cudaLaunchHostFunc); CUDA forbids it");
  auto* event = reinterpret_cast<moe::cuda_emulation::Event*>(e);
  std::lock_guard<std::mutex> lock(event->mu);
  return event->progress == nullptr || event->progress->Reached(event->ticket) ? cudaSuccess
                                                                               : cudaErrorNotReady;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  moe::cuda_emulation::NotInHostFunction(
      "cudaEventSynchronize called in a host function (cudaLaunchHostFunc); CUDA forbids it");
  moe::cuda_emulation::NoteHostWait();
  const auto [progress, ticket] = reinterpret_cast<moe::cuda_emulation::Event*>(e)->Last();
  if (progress != nullptr) progress->WaitFor(ticket);
  return cudaSuccess;
}
// Work enqueued on `s` later waits for the event's last record (as of this call).
inline cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned = 0) {
  moe::cuda_emulation::NotInHostFunction(
      "cudaStreamWaitEvent called in a host function (cudaLaunchHostFunc); CUDA forbids it");
  const auto [progress, ticket] = reinterpret_cast<moe::cuda_emulation::Event*>(e)->Last();
  if (progress != nullptr) moe::cuda_emulation::Submit(s, [p = progress, t = ticket] { p->WaitFor(t); });
  return cudaSuccess;
}
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  moe::cuda_emulation::NotInHostFunction(
      "cudaEventElapsedTime called in a host function (cudaLaunchHostFunc); CUDA forbids it");
  auto* a = reinterpret_cast<moe::cuda_emulation::Event*>(start);
  auto* b = reinterpret_cast<moe::cuda_emulation::Event*>(end);
  if (!a->timing || !b->timing || a->when == nullptr || b->when == nullptr)
    return cudaErrorInvalidResourceHandle;
  if (cudaEventQuery(start) != cudaSuccess || cudaEventQuery(end) != cudaSuccess) return cudaErrorNotReady;
  *ms = std::chrono::duration<float, std::milli>(*b->when - *a->when).count();
  return cudaSuccess;
}

// ---- Device functions ------------------------------------------------------------
inline void __syncthreads() { moe::cuda_emulation::Arrive(moe::cuda_emulation::S().block); }
inline void __syncwarp() { moe::cuda_emulation::Arrive(moe::cuda_emulation::S().warps[threadIdx.x / 32]); }
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(std::is_floating_point_v<T>, "the kernels shuffle float and double");
  if (mask != 0xffffffffu)
    moe::cuda_emulation::Fail("__shfl_xor_sync: only full-warp masks are emulated", nullptr, mask);
  if (moe::cuda_emulation::S().warps[threadIdx.x / 32].count != 32)
    moe::cuda_emulation::Fail("__shfl_xor_sync in a warp that is not full", nullptr, threadIdx.x);
  auto& x = moe::cuda_emulation::S().exchange[threadIdx.x / 32];
  const unsigned lane = threadIdx.x % 32;
  x[lane] = static_cast<double>(v);  // exact for float
  __syncwarp();
  const T r = static_cast<T>(x[lane ^ static_cast<unsigned>(lane_mask)]);
  __syncwarp();
  return r;
}
inline int atomicCAS(int* p, int compare, int value) {
  std::atomic_ref<int>(*p).compare_exchange_strong(compare, value);
  return compare;  // the old value
}
inline int atomicExch(int* p, int value) { return std::atomic_ref<int>(*p).exchange(value); }
template <typename T>
T atomicMin(T* p, T value) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (value < old && !a.compare_exchange_weak(old, value)) {
  }
  return old;
}
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned ns) { std::this_thread::sleep_for(std::chrono::nanoseconds(ns)); }
// Rounded separately, never contracted into an FMA (volatile keeps GCC from fusing).
inline float __fmul_rn(float a, float b) {
  volatile float r = a * b;
  return r;
}
inline float __fadd_rn(float a, float b) {
  volatile float r = a + b;
  return r;
}
using std::isinf;

// The two macros cuda_launch.cuh defines for the real build. Arguments are
// copied at the launch, as a kernel's are.
#define MOE_DYNAMIC_SHARED(name) unsigned char* name = moe::cuda_emulation::S().shared
#define MOE_LAUNCH(kernel, grid, block, shared_bytes, stream, ...)                                     \
  moe::cuda_emulation::Launch(reinterpret_cast<const void*>(kernel), #kernel, dim3(grid), dim3(block), \
                              shared_bytes, stream, [=] { kernel(__VA_ARGS__); })

// ---- CUB: DeviceRadixSort::SortPairs (a stable sort by the key's bits
// [begin_bit, end_bit), in stream order; the temporary storage is written over).
namespace cub {
struct DeviceRadixSort {
  template <typename K, typename V>
  static cudaError_t SortPairs(void* temp, size_t& temp_bytes, const K* keys_in, K* keys_out,
                               const V* values_in, V* values_out, int n, int begin_bit = 0,
                               int end_bit = sizeof(K) * 8, cudaStream_t stream = nullptr) {
    const size_t need = 256 + static_cast<size_t>(std::max(n, 0)) * (sizeof(K) + sizeof(V) + sizeof(int));
    if (temp == nullptr) {
      temp_bytes = need;
      return cudaSuccess;
    }
    if (temp_bytes < need || n < 0 || begin_bit < 0 || end_bit > static_cast<int>(sizeof(K) * 8) ||
        begin_bit > end_bit)
      return cudaErrorInvalidValue;
    moe::cuda_emulation::CountWork("cub::DeviceRadixSort::SortPairs");
    moe::cuda_emulation::Submit(stream, [=] {
      std::memset(temp, 0xab, need);
      std::vector<int> order(n);
      for (int i = 0; i < n; ++i) order[i] = i;
      const int bits = end_bit - begin_bit;
      auto digit = [&](K k) {
        const uint64_t v = static_cast<uint64_t>(k) >> begin_bit;
        return bits >= 64 ? v : v & ((uint64_t{1} << bits) - 1);
      };
      std::stable_sort(order.begin(), order.end(),
                       [&](int a, int b) { return digit(keys_in[a]) < digit(keys_in[b]); });
      std::vector<K> k(n);
      std::vector<V> v(n);
      for (int i = 0; i < n; ++i) k[i] = keys_in[order[i]], v[i] = values_in[order[i]];
      std::copy(k.begin(), k.end(), keys_out);
      std::copy(v.begin(), v.end(), values_out);
    });
    return cudaSuccess;
  }
};
}  // namespace cub

namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  float v[16][16];
};
template <typename F>
void fill_fragment(F& f, float value) {
  for (auto& row : f.v)
    for (float& x : row) x = value;
}
template <typename Use, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, __nv_bfloat16, Layout>& f, const __nv_bfloat16* p,
                      unsigned ldm) {
  moe::cuda_emulation::CheckFragmentPointer(p, ldm, 8, 2 * (15 * ldm + 16));
  constexpr bool row = std::is_same_v<Layout, row_major>;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r][c] = moe::kmath::BF16ToF32(p[row ? r * ldm + c : c * ldm + r].bits);
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
  moe::cuda_emulation::CheckFragmentPointer(p, ldm, 4, 4 * (15 * ldm + 16));
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r][c] = p[layout == mem_row_major ? r * ldm + c : c * ldm + r];
}
// Each lane stores a share of the tile, as the lanes of a warp do.
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  moe::cuda_emulation::CheckFragmentPointer(p, ldm, 4, 4 * (15 * ldm + 16));
  for (unsigned e = threadIdx.x % 32; e < 256; e += 32) {
    const unsigned r = e / 16, c = e % 16;
    p[layout == mem_row_major ? r * ldm + c : c * ldm + r] = f.v[r][c];
  }
}
// wmma operations are warp-synchronous (.sync): no lane gets past an
// mma_sync before every lane has reached it, so a lane's store of a tile
// cannot overtake another lane's earlier load of it. The emulation keeps that
// one ordering with a barrier here and adds none to the loads and stores
// (every lane holds and computes the whole tile), so the kernel's own
// __syncwarp calls are what order the lanes' other shared-memory accesses.
template <typename A, typename B, typename C>
void mma_sync(C& d, const A& a, const B& b, const C& c) {
  __syncwarp();
  C t;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.v[i][j];
      for (int k = 0; k < 16; ++k) s += a.v[i][k] * b.v[k][j];
      t.v[i][j] = s;
    }
  d = t;
}
}  // namespace nvcuda::wmma

#endif  // MOE_TESTS_CORE_CUDA_EMULATION_H_
