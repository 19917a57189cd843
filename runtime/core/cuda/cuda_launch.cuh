// Device helpers shared by the .cu files: launch geometry, block reductions in
// a fixed order (deterministic), and the device error record.
#ifndef MOE_RUNTIME_CORE_CUDA_CUDA_LAUNCH_CUH_
#define MOE_RUNTIME_CORE_CUDA_CUDA_LAUNCH_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "runtime/core/cuda/cuda_kernels.h"
#include "runtime/core/kernel_math.h"

namespace moe::cuda {

inline constexpr int kThreads = 256;

// Blocks for a grid-stride loop over n items (at most 65535 * 16 blocks).
inline unsigned GridFor(int64_t n, int threads = kThreads) {
  int64_t b = (n + threads - 1) / threads;
  if (b < 1) b = 1;
  if (b > 1048560) b = 1048560;
  return static_cast<unsigned>(b);
}

#define MOE_GRID_STRIDE(i, n)                                                            \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024), in a
// fixed order; every thread gets the result. `shared` holds 32 values.
template <typename T>
__device__ inline T BlockSum(T v, T* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < warps; ++w) total += shared[w];
  return total;
}

template <typename T>
__device__ inline T BlockMax(T v, T* shared) {
  for (int o = 16; o > 0; o >>= 1) {
    T u = __shfl_xor_sync(0xffffffffu, v, o);
    v = u > v ? u : v;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T m = shared[0];
  for (int w = 1; w < warps; ++w) m = shared[w] > m ? shared[w] : m;
  return m;
}

// Records the first bad index (later ones are dropped).
__device__ inline void ReportBadIndex(DeviceError* err, int op, long long position, long long value,
                                      long long limit) {
  if (err == nullptr) return;
  if (atomicCAS(&err->code, 0, -1) == 0) {
    err->op = op;
    err->position = position;
    err->value = value;
    err->limit = limit;
    __threadfence_system();
    atomicExch(&err->code, 1);
  }
}

}  // namespace moe::cuda

#endif  // MOE_RUNTIME_CORE_CUDA_CUDA_LAUNCH_CUH_
