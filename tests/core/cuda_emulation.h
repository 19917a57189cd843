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

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "runtime/core/kernel_math.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(threads)
// A kernel's __shared__ array: one per kernel, shared by the threads of the
// block that runs (blocks run one after another).
#define __shared__ static

using cudaError_t = int;
using cudaStream_t = void*;
constexpr cudaError_t cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchOutOfResources = 7;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };

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

struct State {
  std::map<const void*, size_t> shared_limit;  // cudaFuncSetAttribute
  cudaError_t error = cudaSuccess;
  unsigned char* shared = nullptr;
  size_t shared_bytes = 0;
  std::barrier<>* block_barrier = nullptr;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  double exchange[32][32] = {};  // [warp][lane]
};
inline State& S() {
  static State state;
  return state;
}

[[noreturn]] inline void Fail(const char* what, const void* p, size_t n) {
  std::fprintf(stderr, "cuda emulation: %s (pointer %p, %zu)\n", what, p, n);
  std::abort();
}
inline void CheckFragmentPointer(const void* p, unsigned ldm, unsigned ldm_multiple, size_t span_bytes) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) Fail("fragment pointer not 32-byte aligned", p, 32);
  if (ldm % ldm_multiple != 0) Fail("ldm not a multiple of the element's requirement", p, ldm);
  const auto* c = static_cast<const unsigned char*>(p);
  State& s = S();
  if (c >= s.shared && c < s.shared + s.shared_bytes && c + span_bytes > s.shared + s.shared_bytes)
    Fail("fragment reaches past the dynamic shared memory", p, span_bytes);
}

// Runs `body` (the kernel call) as grid.x * grid.y blocks of block.x threads.
template <typename Body>
void Launch(const void* kernel, dim3 grid, dim3 block, size_t shared_bytes, Body&& body) {
  State& s = S();
  const auto limit = s.shared_limit.find(kernel);
  if (shared_bytes > 48 * 1024 && (limit == s.shared_limit.end() || limit->second < shared_bytes)) {
    s.error = cudaErrorLaunchOutOfResources;
    return;
  }
  if (grid.y > 65535 || grid.z > 65535 || block.x > 1024 || block.x % 32 != 0) {
    s.error = cudaErrorInvalidValue;
    return;
  }
  gridDim = grid;
  blockDim = block;
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::vector<unsigned char> shared(shared_bytes + 128, 0xff);  // NaN bytes
      s.shared = shared.data() + (128 - reinterpret_cast<uintptr_t>(shared.data()) % 128) % 128;
      s.shared_bytes = shared_bytes;
      std::barrier<> block_barrier(block.x);
      s.block_barrier = &block_barrier;
      s.warp_barriers.clear();
      for (unsigned w = 0; w < block.x / 32; ++w)
        s.warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
      std::vector<std::thread> threads;
      for (unsigned t = 0; t < block.x; ++t)
        threads.emplace_back([&, t] {
          threadIdx.x = t;
          blockIdx.x = bx;
          blockIdx.y = by;
          body();
        });
      for (std::thread& t : threads) t.join();
      s.shared = nullptr;
    }
  }
}

}  // namespace moe::cuda_emulation

inline cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute, int bytes) {
  if (bytes < 0 || bytes > 227 * 1024) return cudaErrorInvalidValue;  // sm_90's opt-in limit
  moe::cuda_emulation::S().shared_limit[kernel] = static_cast<size_t>(bytes);
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = moe::cuda_emulation::S().error;
  moe::cuda_emulation::S().error = cudaSuccess;
  return e;
}
inline void __syncthreads() { moe::cuda_emulation::S().block_barrier->arrive_and_wait(); }
inline void __syncwarp() { moe::cuda_emulation::S().warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(std::is_floating_point_v<T>, "the kernels shuffle float and double");
  if (mask != 0xffffffffu)
    moe::cuda_emulation::Fail("__shfl_xor_sync: only full-warp masks are emulated", nullptr, mask);
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
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
using std::isinf;

// The two macros cuda_launch.cuh defines for the real build.
#define MOE_DYNAMIC_SHARED(name) unsigned char* name = moe::cuda_emulation::S().shared
#define MOE_LAUNCH(kernel, grid, block, shared_bytes, stream, ...)                                          \
  moe::cuda_emulation::Launch(reinterpret_cast<const void*>(kernel), dim3(grid), dim3(block), shared_bytes, \
                              [&] { kernel(__VA_ARGS__); })

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
