// Host gates (backend.h Stream::WaitHostGate): a one-thread kernel holds its
// stream until the host has opened the gate. Each stream counts its opened
// gates in a word of mapped host memory (StreamRecord::gates_open, written by
// the host with a release store); the kernel of the stream's n-th gate spins
// until the word reaches n. No host thread waits, so no host function does.
#include "runtime/core/cuda/cuda_launch.cuh"

namespace moe::cuda {
namespace {

__device__ __forceinline__ unsigned long long LoadAcquireSystem(const unsigned long long* p) {
#if defined(__CUDA_ARCH__)
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
#else
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
#endif
}

__global__ void WaitHostGateKernel(const unsigned long long* gates_open, unsigned long long ticket) {
  // PCIe reads of the word, at most one per ~2 us once the wait is long.
  unsigned ns = 32;
  while (LoadAcquireSystem(gates_open) < ticket) {
    __nanosleep(ns);
    if (ns < 2048) ns *= 2;
  }
}

}  // namespace

cudaError_t LaunchWaitHostGate(const unsigned long long* gates_open, unsigned long long ticket,
                               cudaStream_t s) {
  MOE_LAUNCH(WaitHostGateKernel, 1, 1, 0, s, gates_open, ticket);
  return cudaGetLastError();
}

}  // namespace moe::cuda
