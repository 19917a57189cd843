// Device helpers shared by the .cu files: launch geometry, f32 / bf16 operand
// access (Ld / St, by mode), block reductions in a fixed order
// (deterministic), and the device error record.
#ifndef MOE_RUNTIME_CORE_CUDA_CUDA_LAUNCH_CUH_
#define MOE_RUNTIME_CORE_CUDA_CUDA_LAUNCH_CUH_

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

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

// Column sums over many rows (SumRows, RMSNorm's weight gradient) run in row
// chunks, so that more blocks than one per 256 columns share the rows: the
// grid's row y sums rows [y * per, (y + 1) * per) of its columns in double
// (per = ColumnChunkRows), and with more than one chunk a second pass adds the
// chunks' partials (ColumnSumScratchBytes, cuda_kernels.h) in chunk order. The
// chunking depends on the row count only, so the sums are deterministic.
inline constexpr int64_t kColumnChunkRows = 128;
inline constexpr int64_t kMaxColumnChunks = 64;
inline int64_t ColumnChunks(int64_t rows) {
  const int64_t c = (rows + kColumnChunkRows - 1) / kColumnChunkRows;
  return c < 1 ? 1 : (c > kMaxColumnChunks ? kMaxColumnChunks : c);
}
inline int64_t ColumnChunkRows(int64_t rows) {
  const int64_t c = ColumnChunks(rows);
  return (rows + c - 1) / c;
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

// Records the stream's first error (later ones are dropped): DeviceError's code.
__device__ inline void ReportDeviceError(DeviceError* err, int code, int op, long long position,
                                         long long value, long long limit) {
  if (err == nullptr) return;
  if (atomicCAS(&err->code, 0, -1) == 0) {
    err->op = op;
    err->position = position;
    err->value = value;
    err->limit = limit;
    __threadfence_system();
    atomicExch(&err->code, code);
  }
}
__device__ inline void ReportBadIndex(DeviceError* err, int op, long long position, long long value,
                                      long long limit) {
  ReportDeviceError(err, 1, op, position, value, limit);
}

// ---- f32 / bf16 operands (cuda_kernels.h ElemIn / ElemOut) -------------------
// Kernels that take each floating operand as f32 or bf16 are templated on a
// mode M: 0 = every operand f32, 1 = every operand bf16, 2 = per-operand types
// read from the operand. The all-f32 and all-bf16 instantiations carry no
// per-element type test; ElemMode picks one from the operands' types.
template <int M>
__device__ __forceinline__ bool IsBf16(ElemType t) {
  return M == 2 ? t == ElemType::kBF16 : M == 1;
}
// kmath::LoadF32 / StoreF32: the conversions of the CPU backend's Cast (bf16
// widened exactly; an f32 result rounded once, to nearest even).
template <int M>
__device__ __forceinline__ float Ld(ElemIn x, int64_t i) {
  return IsBf16<M>(x.t) ? kmath::LoadF32(static_cast<const uint16_t*>(x.p), i)
                        : kmath::LoadF32(static_cast<const float*>(x.p), i);
}
template <int M>
__device__ __forceinline__ float Ld(ElemOut x, int64_t i) {
  return Ld<M>(ElemIn{x.p, x.t}, i);
}
template <int M>
__device__ __forceinline__ void St(ElemOut x, int64_t i, float v) {
  if (IsBf16<M>(x.t))
    kmath::StoreF32(static_cast<uint16_t*>(x.p), i, v);
  else
    kmath::StoreF32(static_cast<float*>(x.p), i, v);
}

inline int ElemMode(std::initializer_list<ElemType> types) {
  bool f32 = true, bf16 = true;
  for (ElemType t : types) {
    f32 = f32 && t == ElemType::kF32;
    bf16 = bf16 && t == ElemType::kBF16;
  }
  return f32 ? 0 : bf16 ? 1 : 2;
}

// ---- the list forms (ops.h): up to kMaxListTensors tensors a launch -----------
// Entry i owns the grid's blocks [first[i], first[i + 1]): as many as the
// one-tensor kernel would launch for it, so each element gets the same work
// and the same arithmetic (the results are the one-tensor op's, bit for bit).
struct ListBlocks {
  int count;
  int first[kMaxListTensors + 1];
};
// The entry that owns block b (count <= kMaxListTensors: a linear scan).
__device__ inline int ListEntry(const ListBlocks& l, int64_t b) {
  int i = 0;
  while (i + 1 < l.count && b >= l.first[i + 1]) ++i;
  return i;
}
// Appends an entry of `blocks` blocks.
inline void ListAppend(ListBlocks* l, int64_t blocks) {
  if (l->count == 0) l->first[0] = 0;
  l->first[l->count + 1] = l->first[l->count] + static_cast<int>(blocks);
  ++l->count;
}
// Packs the non-empty entries (n > 0) of an element-wise list (a struct with
// `blocks` and `e[kMaxListTensors]`), each with the one-tensor kernel's
// GridFor(n) blocks; false when count is out of range. The grid is then
// TotalBlocks(l->blocks), none when every entry is empty.
template <typename List, typename Entry>
inline bool PackElementwiseList(List* l, const Entry* entries, int count) {
  if (count < 0 || count > kMaxListTensors) return false;
  for (int i = 0; i < count; ++i) {
    if (entries[i].n <= 0) continue;
    l->e[l->blocks.count] = entries[i];
    ListAppend(&l->blocks, GridFor(entries[i].n));
  }
  return true;
}
inline unsigned TotalBlocks(const ListBlocks& l) {
  return l.count == 0 ? 0u : static_cast<unsigned>(l.first[l.count]);
}

// Grid-stride over n items within the entry's blocks (i: the entry).
#define MOE_LIST_STRIDE(j, n, l, i)                                                              \
  for (int64_t j = (blockIdx.x - static_cast<int64_t>((l).first[i])) * blockDim.x + threadIdx.x, \
               j##_step = static_cast<int64_t>((l).first[(i) + 1] - (l).first[i]) * blockDim.x;  \
       j < (n); j += j##_step)

// A kernel's dynamic shared memory, and a launch: as macros so that a file
// written with them also runs under tests/core/cuda_emulation.h (the CPU
// suite's stand-in, which defines both its own way).
#ifndef MOE_CUDA_EMULATION
#define MOE_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#define MOE_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  kernel<<<(grid), (block), (shared_bytes), (stream)>>>(__VA_ARGS__)
#endif

// Launches kernel<mode> on (grid, block) and stream s when items > 0.
#define MOE_MODE_LAUNCH(kernel, mode, items, grid, block, s, ...)    \
  do {                                                               \
    if ((items) <= 0) break;                                         \
    switch (mode) {                                                  \
      case 0:                                                        \
        MOE_LAUNCH(kernel<0>, (grid), (block), 0, (s), __VA_ARGS__); \
        break;                                                       \
      case 1:                                                        \
        MOE_LAUNCH(kernel<1>, (grid), (block), 0, (s), __VA_ARGS__); \
        break;                                                       \
      default:                                                       \
        MOE_LAUNCH(kernel<2>, (grid), (block), 0, (s), __VA_ARGS__); \
    }                                                                \
  } while (0)

// The same over n items, one grid-stride loop (GridFor(n) x kThreads).
#define MOE_ELEM_LAUNCH(kernel, mode, n, s, ...) \
  MOE_MODE_LAUNCH(kernel, mode, n, GridFor(n), kThreads, s, __VA_ARGS__)

}  // namespace moe::cuda

#endif  // MOE_RUNTIME_CORE_CUDA_CUDA_LAUNCH_CUH_
