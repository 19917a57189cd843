// Row gather / scatter-add (permute into expert order, un-permute with the
// combine weights, embedding forward and backward) and the gathered row dot
// (gradient of the combine weights). Bad indices are reported through the
// stream's DeviceError record and the row is skipped. Scatter-add and row dot
// take f32 or bf16 rows (cuda_launch.cuh Ld / St), and so does the weighted
// gather; the plain gather copies bytes.
#include <algorithm>
#include <cub/device/device_radix_sort.cuh>

#include "runtime/core/cuda/cuda_launch.cuh"

namespace moe::cuda {
namespace {

template <typename W>
__global__ void GatherKernel(const W* src, const int32_t* index, W* dst, int64_t m, int64_t n, int64_t words,
                             DeviceError* err, int op) {
  MOE_GRID_STRIDE(t, m * words) {
    const int64_t i = t / words, w = t % words;
    const int32_t r = index[i];
    if (r < 0 || r >= n) {
      if (w == 0) ReportBadIndex(err, op, i, r, n);
      continue;
    }
    dst[t] = src[static_cast<int64_t>(r) * words + w];
  }
}

template <int M>
__global__ void GatherScaledKernel(ElemIn src, const int32_t* index, const float* weight, ElemOut dst,
                                   int64_t m, int64_t n, int64_t d, DeviceError* err, int op) {
  MOE_GRID_STRIDE(t, m * d) {
    const int64_t i = t / d, c = t % d;
    const int32_t r = index[i];
    if (r < 0 || r >= n) {
      if (c == 0) ReportBadIndex(err, op, i, r, n);
      continue;
    }
    St<M>(dst, t, weight[i] * Ld<M>(src, static_cast<int64_t>(r) * d + c));
  }
}

// ScatterAddRows in three steps, deterministic without atomics on the data:
//  1. key[i] = index[i], or n for a bad index; val[i] = i;
//  2. a stable radix sort of (key, val) (CUB): each destination's sources end
//     up together, still in i order;
//  3. one block per destination row: its sources' range by binary search,
//     threads over the columns, each adding its sources in i order into an
//     f32 accumulator started from dst (widened; from 0 when overwriting)
//     and stored once (rounded once if dst is bf16): the order and
//     arithmetic of the CPU backend's loop, with every destination row and
//     column in parallel. A row without sources is left alone, or stored 0
//     when overwriting. Block 0
//     also reports the smallest bad i: bad keys sort last, their values in
//     ascending i, so it is the value at the first key n.
// Where the sort does not run (no columns, no destination rows), the keys
// pass keeps the smallest bad i by atomicMin instead and a one-thread kernel
// reports it.
// Given by_row (ops.h ScatterRowOrder: offsets [n + 1], then the sources row
// by row), steps 1 and 2 are skipped: step 3 reads each row's range from the
// offsets and checks, with its threads in parallel, that every source in it
// is in [0, m), has index == the row and is above the one before it; block 0
// checks that the offsets run from 0 to m. That makes the entries a
// permutation of [0, m) grouped by destination, the sort's own output.
__global__ void ScatterKeysKernel(const int32_t* index, uint32_t* keys, int32_t* vals, int64_t m, int64_t n,
                                  unsigned long long* min_bad) {
  MOE_GRID_STRIDE(i, m) {
    const int32_t r = index[i];
    const bool bad = r < 0 || r >= n;
    keys[i] = bad ? static_cast<uint32_t>(n) : static_cast<uint32_t>(r);
    vals[i] = static_cast<int32_t>(i);
    if (bad && min_bad != nullptr) atomicMin(min_bad, static_cast<unsigned long long>(i));
  }
}

__global__ void ReportMinBadKernel(const unsigned long long* min_bad, const int32_t* index, int64_t n,
                                   DeviceError* err, int op) {
  const unsigned long long i = *min_bad;
  if (i != ~0ull) ReportBadIndex(err, op, static_cast<long long>(i), index[i], n);
}

// The first position of sorted keys[0, m) that is >= key.
__device__ inline int64_t LowerBound(const uint32_t* keys, int64_t m, uint32_t key) {
  int64_t lo = 0, hi = m;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (keys[mid] < key)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// Each row's sources: from the sorted keys (offsets null), or from by_row's
// offsets (keys null; order = by_row + n + 1), checked.
template <int M>
__global__ void ScatterAddSortedKernel(ElemIn src, const uint32_t* keys, const int32_t* offsets,
                                       const int32_t* order, ElemOut dst, const float* weight, bool overwrite,
                                       int64_t m, int64_t n, int64_t d, const int32_t* index,
                                       DeviceError* err, int op) {
  __shared__ int64_t range[2];
  __shared__ int range_bad, entry_bad;  // by_row's offsets of the row, its entries
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    if (offsets != nullptr) {
      if (offsets[0] != 0) ReportDeviceError(err, 2, op, 0, offsets[0], 0);
      if (offsets[n] != m) ReportDeviceError(err, 2, op, n, offsets[n], 0);
    } else {
      const int64_t first_bad = LowerBound(keys, m, static_cast<uint32_t>(n));
      if (first_bad < m) {
        const int64_t i = order[first_bad];
        ReportBadIndex(err, op, i, index[i], n);
      }
    }
  }
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    if (threadIdx.x == 0) {
      if (offsets != nullptr) {
        range[0] = offsets[r];
        range[1] = offsets[r + 1];
        range_bad = range[0] < 0 || range[1] < range[0] || range[1] > m;
        if (range_bad) ReportDeviceError(err, 2, op, r + 1, offsets[r + 1], 0);
      } else {
        range[0] = LowerBound(keys, m, static_cast<uint32_t>(r));
        range[1] = LowerBound(keys, m, static_cast<uint32_t>(r + 1));
        range_bad = 0;
      }
      entry_bad = 0;
    }
    __syncthreads();
    int64_t lo = range[0], hi = range[1];
    if (offsets != nullptr && range_bad == 0) {  // the same for the whole block
      for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
        const int32_t i = order[j];
        if (i < 0 || i >= m || index[i] != r || (j > lo && order[j - 1] >= i)) {
          ReportDeviceError(err, 2, op, n + 1 + j, i, 0);
          atomicExch(&entry_bad, 1);
        }
      }
      __syncthreads();
    }
    if (range_bad != 0 || entry_bad != 0) lo = hi = 0;  // a row of a bad by_row gets no sources
    __syncthreads();  // every thread has read the range and flags before thread 0 writes the next row's
    if (lo == hi && !overwrite) continue;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      float acc = overwrite ? 0.0f : Ld<M>(dst, r * d + c);
      for (int64_t j = lo; j < hi; ++j) {
        const int64_t i = order[j];
        const float w = weight != nullptr ? weight[i] : 1.0f;
        // Product and sum rounded separately, never fused: the CPU loop's arithmetic.
        acc = __fadd_rn(acc, __fmul_rn(w, Ld<M>(src, i * d + c)));
      }
      St<M>(dst, r * d + c, acc);
    }
  }
}

// a and b f32 or bf16 each (widened exactly), the dot in double, out f32.
template <int M>
__global__ void GatherRowDotKernel(ElemIn a, const int32_t* index, ElemIn b, float* out, float alpha,
                                   float beta, int64_t n, int64_t d, DeviceError* err, int op) {
  __shared__ double red[32];
  const int64_t i = blockIdx.x;
  const int32_t r = index[i];
  const bool bad = r < 0 || r >= n;
  double dot = 0;
  if (!bad)
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x)
      dot += static_cast<double>(Ld<M>(a, static_cast<int64_t>(r) * d + c)) * Ld<M>(b, i * d + c);
  const double total = BlockSum(dot, red);
  if (threadIdx.x != 0) return;
  if (bad) {
    ReportBadIndex(err, op, i, r, n);
    return;
  }
  const float g = static_cast<float>(alpha * total);
  out[i] = beta == 0.0f ? g : __fadd_rn(g, __fmul_rn(beta, out[i]));  // unfused, as on CPU
}

// The scratch of LaunchScatterAddRows: keys and values in and out (4 x m
// int32), the smallest bad i, then CUB's temporary storage.
struct ScatterScratch {
  uint32_t *keys_in, *keys_out;
  int32_t *vals_in, *vals_out;
  unsigned long long* min_bad;
  void* cub;
  size_t cub_bytes;
};

size_t AlignUp(size_t v) { return (v + 255) & ~static_cast<size_t>(255); }

// Bits of the sort keys: values 0 .. n.
int KeyBits(int64_t n) {
  int bits = 1;
  while (bits < 32 && (static_cast<uint64_t>(1) << bits) <= static_cast<uint64_t>(n)) ++bits;
  return bits;
}

size_t CubSortBytes(int64_t m, int64_t n) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const uint32_t*>(nullptr),
                                  static_cast<uint32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), static_cast<int>(m), 0, KeyBits(n));
  return bytes;
}

ScatterScratch Carve(void* base, int64_t m, int64_t n) {
  char* p = static_cast<char*>(base);
  const size_t words = AlignUp(static_cast<size_t>(m) * 4);
  ScatterScratch sc{};
  sc.keys_in = reinterpret_cast<uint32_t*>(p);
  sc.keys_out = reinterpret_cast<uint32_t*>(p + words);
  sc.vals_in = reinterpret_cast<int32_t*>(p + 2 * words);
  sc.vals_out = reinterpret_cast<int32_t*>(p + 3 * words);
  sc.min_bad = reinterpret_cast<unsigned long long*>(p + 4 * words);
  sc.cub = p + 4 * words + 256;
  sc.cub_bytes = CubSortBytes(m, n);
  return sc;
}

}  // namespace

cudaError_t LaunchGatherRows(const void* src, const int32_t* index, void* dst, int64_t m, int64_t n,
                             int64_t row_bytes, DeviceError* err, int op, cudaStream_t s) {
  if (m == 0 || row_bytes == 0) return cudaGetLastError();
  if (row_bytes % 4 == 0) {
    const int64_t words = row_bytes / 4;
    MOE_LAUNCH(GatherKernel<uint32_t>, GridFor(m * words), kThreads, 0, s, static_cast<const uint32_t*>(src),
               index, static_cast<uint32_t*>(dst), m, n, words, err, op);
  } else {
    MOE_LAUNCH(GatherKernel<uint8_t>, GridFor(m * row_bytes), kThreads, 0, s,
               static_cast<const uint8_t*>(src), index, static_cast<uint8_t*>(dst), m, n, row_bytes, err, op);
  }
  return cudaGetLastError();
}

cudaError_t LaunchGatherRowsScaled(ElemIn src, const int32_t* index, const float* weight, ElemOut dst,
                                   int64_t m, int64_t n, int64_t d, DeviceError* err, int op,
                                   cudaStream_t s) {
  MOE_ELEM_LAUNCH(GatherScaledKernel, ElemMode({src.t, dst.t}), m * d, s, src, index, weight, dst, m, n, d,
                  err, op);
  return cudaGetLastError();
}

size_t ScatterAddRowsScratchBytes(int64_t m, int64_t n, bool by_row) {
  if (m <= 0 || by_row) return 0;
  return 4 * AlignUp(static_cast<size_t>(m) * 4) + 256 + CubSortBytes(m, n);
}

cudaError_t LaunchScatterAddRows(ElemIn src, const int32_t* index, ElemOut dst, const float* weight,
                                 bool overwrite, const int32_t* by_row, int64_t m, int64_t n, int64_t d,
                                 void* scratch, DeviceError* err, int op, cudaStream_t s) {
  if (m <= 0) {  // no sources: dst stays, or is all zero bits (+0 in f32 and bf16)
    if (!overwrite || n <= 0 || d <= 0) return cudaGetLastError();
    const size_t elem = dst.t == ElemType::kBF16 ? 2 : 4;
    return cudaMemsetAsync(dst.p, 0, static_cast<size_t>(n) * static_cast<size_t>(d) * elem, s);
  }
  const int threads = d >= 128 ? 128 : static_cast<int>(std::max<int64_t>(32, (d + 31) / 32 * 32));
  if (by_row != nullptr) {
    // No keys, no sort: one launch, which checks every row (with or without columns).
    const unsigned blocks = static_cast<unsigned>(std::clamp<int64_t>(n, 1, 1048560));
    MOE_MODE_LAUNCH(ScatterAddSortedKernel, ElemMode({src.t, dst.t}), m, blocks, threads, s, src, nullptr,
                    by_row, by_row + n + 1, dst, weight, overwrite, m, n, d, index, err, op);
    return cudaGetLastError();
  }
  const ScatterScratch sc = Carve(scratch, m, n);
  if (d <= 0 || n <= 0) {
    // Nothing to add; bad indices count all the same (every one of them when n = 0).
    cudaError_t e = cudaMemsetAsync(sc.min_bad, 0xff, sizeof(unsigned long long), s);
    if (e != cudaSuccess) return e;
    MOE_LAUNCH(ScatterKeysKernel, GridFor(m), kThreads, 0, s, index, sc.keys_in, sc.vals_in, m, n,
               sc.min_bad);
    MOE_LAUNCH(ReportMinBadKernel, 1, 1, 0, s, sc.min_bad, index, n, err, op);
    return cudaGetLastError();
  }
  MOE_LAUNCH(ScatterKeysKernel, GridFor(m), kThreads, 0, s, index, sc.keys_in, sc.vals_in, m, n, nullptr);
  size_t cub_bytes = sc.cub_bytes;
  const cudaError_t e =
      cub::DeviceRadixSort::SortPairs(sc.cub, cub_bytes, sc.keys_in, sc.keys_out, sc.vals_in, sc.vals_out,
                                      static_cast<int>(m), 0, KeyBits(n), s);
  if (e != cudaSuccess) return e;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(n, 1048560));
  MOE_MODE_LAUNCH(ScatterAddSortedKernel, ElemMode({src.t, dst.t}), n, blocks, threads, s, src, sc.keys_out,
                  nullptr, sc.vals_out, dst, weight, overwrite, m, n, d, index, err, op);
  return cudaGetLastError();
}

cudaError_t LaunchGatherRowDot(ElemIn a, const int32_t* index, ElemIn b, float* out, float alpha, float beta,
                               int64_t m, int64_t n, int64_t d, DeviceError* err, int op, cudaStream_t s) {
  MOE_MODE_LAUNCH(GatherRowDotKernel, ElemMode({a.t, b.t}), m, m, 128, s, a, index, b, out, alpha, beta, n, d,
                  err, op);
  return cudaGetLastError();
}

}  // namespace moe::cuda
