// Reductions: sum, sum of squares, max (the clipping norm, losses) and column sums.
// Sums accumulate in double in a fixed order that depends on the sizes only, so
// results do not depend on timing; both spread over the whole GPU.
#include <cfloat>

#include "runtime/core/cuda/cuda_launch.cuh"

namespace moe::cuda {
namespace {

constexpr int kReduceThreads = 512;
// Elements per block of the first pass (32 per thread), and at most this many
// blocks: a gradient tensor of tens of millions of elements is read by every
// SM, where one block would read it at one SM's bandwidth.
constexpr int64_t kReducePerBlock = int64_t{kReduceThreads} * 32;
constexpr int64_t kMaxReduceBlocks = 1024;

int64_t ReduceBlocks(int64_t n) {
  const int64_t b = (n + kReducePerBlock - 1) / kReducePerBlock;
  return b < 1 ? 1 : (b > kMaxReduceBlocks ? kMaxReduceBlocks : b);
}

// Block b reduces x[b * slice, min(n, (b + 1) * slice)): each thread strides
// over the slice, then a fixed-order block sum (or max). With `partial` the
// block's result goes to partial[b]; without it (one block) to out[0]:
// alpha * r + beta * out[0], or r for the max.
// The block's reduction of x[begin, end) (every thread gets it).
template <typename In>
__device__ double ReduceRange(const In* x, int64_t begin, int64_t end, ReduceKind kind, double* shared) {
  if (kind == ReduceKind::kMax) {
    double m = -INFINITY;
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const double v = x[i];
      m = v > m ? v : m;
    }
    return BlockMax(m, shared);
  }
  double acc = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const double v = x[i];
    acc += kind == ReduceKind::kSumSquares ? v * v : v;
  }
  return BlockSum(acc, shared);
}

template <typename In>
__global__ void ReduceKernel(const In* x, int64_t n, int64_t slice, ReduceKind kind, double* partial,
                             float* out, float alpha, float beta) {
  __shared__ double shared[32];
  const int64_t begin = blockIdx.x * slice, end = begin + slice < n ? begin + slice : n;
  const double r = ReduceRange(x, begin, end, kind, shared);
  if (threadIdx.x != 0) return;
  if (partial != nullptr) {
    partial[blockIdx.x] = r;
  } else if (kind == ReduceKind::kMax) {
    out[0] = static_cast<float>(r);
  } else {
    out[0] = static_cast<float>(alpha * r + (beta == 0.0f ? 0.0 : static_cast<double>(beta) * out[0]));
  }
}

// The sum of squares over a list, first pass: entry i's blocks are the ones
// LaunchReduce would give it (ReduceBlocks, the same slices), each writing
// its partial to partial[block]. The second pass sums each entry's
// partials as LaunchReduce's second (or, for one block, passes it on
// unchanged: the first pass's value plus zeros), so out[i] is LaunchReduce's
// result bit for bit.
struct ReduceList {
  ListBlocks blocks;
  ReduceEntry e[kMaxListTensors];
};
__global__ void SumSquaresListKernel(ReduceList l, double* partial) {
  __shared__ double shared[32];
  const int i = ListEntry(l.blocks, blockIdx.x);
  const int64_t blocks = l.blocks.first[i + 1] - l.blocks.first[i], n = l.e[i].n;
  const int64_t slice = (n + blocks - 1) / blocks, b = blockIdx.x - l.blocks.first[i];
  const int64_t begin = b * slice, end = begin + slice < n ? begin + slice : n;
  const double r = ReduceRange(l.e[i].x, begin, end, ReduceKind::kSumSquares, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = r;
}
// One block per entry.
__global__ void SumListFinishKernel(ListBlocks l, const double* partial, float* out) {
  __shared__ double shared[32];
  const int i = blockIdx.x;
  const double r = ReduceRange(partial, l.first[i], l.first[i + 1], ReduceKind::kSum, shared);
  if (threadIdx.x == 0) out[i] = static_cast<float>(r);
}

// Column sums of rows [blockIdx.y * per, ...) (ColumnChunks): to partial[y, c],
// or with one chunk (partial null) to out[c] = alpha * sum + beta * out[c].
__global__ void SumRowsKernel(const float* x, int64_t rows, int64_t cols, int64_t per, double* partial,
                              float* out, float alpha, float beta) {
  const int64_t r0 = blockIdx.y * per, r1 = r0 + per < rows ? r0 + per : rows;
  MOE_GRID_STRIDE(c, cols) {
    double acc = 0;
    for (int64_t r = r0; r < r1; ++r) acc += x[r * cols + c];
    if (partial != nullptr)
      partial[blockIdx.y * cols + c] = acc;
    else
      out[c] = static_cast<float>(alpha * acc + (beta == 0.0f ? 0.0 : static_cast<double>(beta) * out[c]));
  }
}

// The chunks' partials of each column, added in chunk order.
__global__ void SumRowsFinishKernel(const double* partial, int64_t chunks, int64_t cols, float* out,
                                    float alpha, float beta) {
  MOE_GRID_STRIDE(c, cols) {
    double acc = 0;
    for (int64_t k = 0; k < chunks; ++k) acc += partial[k * cols + c];
    out[c] = static_cast<float>(alpha * acc + (beta == 0.0f ? 0.0 : static_cast<double>(beta) * out[c]));
  }
}

}  // namespace

size_t ReduceScratchBytes(int64_t n) {
  const int64_t blocks = ReduceBlocks(n);
  return blocks == 1 ? 0 : static_cast<size_t>(blocks) * sizeof(double);
}

cudaError_t LaunchReduce(const float* x, int64_t n, ReduceKind kind, float* out, float alpha, float beta,
                         void* scratch, cudaStream_t s) {
  const int64_t blocks = ReduceBlocks(n);
  if (blocks == 1) {
    MOE_LAUNCH(ReduceKernel<float>, 1, kReduceThreads, 0, s, x, n, n, kind, nullptr, out, alpha, beta);
    return cudaGetLastError();
  }
  if (scratch == nullptr) return cudaErrorInvalidValue;  // ReduceScratchBytes(n) were due
  double* partial = static_cast<double*>(scratch);
  MOE_LAUNCH(ReduceKernel<float>, static_cast<unsigned>(blocks), kReduceThreads, 0, s, x, n,
             (n + blocks - 1) / blocks, kind, partial, out, alpha, beta);
  const ReduceKind second = kind == ReduceKind::kMax ? ReduceKind::kMax : ReduceKind::kSum;
  MOE_LAUNCH(ReduceKernel<double>, 1, kReduceThreads, 0, s, partial, blocks, blocks, second, nullptr, out,
             alpha, beta);
  return cudaGetLastError();
}

size_t SumSquaresListScratchBytes(const ReduceEntry* entries, int count) {
  int64_t blocks = 0;
  for (int i = 0; i < count; ++i) blocks += ReduceBlocks(entries[i].n);
  return static_cast<size_t>(blocks) * sizeof(double);
}

cudaError_t LaunchSumSquaresList(const ReduceEntry* entries, int count, float* out, void* scratch,
                                 cudaStream_t s) {
  if (count < 0 || count > kMaxListTensors) return cudaErrorInvalidValue;
  if (count == 0) return cudaGetLastError();
  if (scratch == nullptr) return cudaErrorInvalidValue;  // SumSquaresListScratchBytes were due
  ReduceList l{};
  for (int i = 0; i < count; ++i) {  // every entry, empty ones too (their sum: 0)
    l.e[i] = entries[i];
    ListAppend(&l.blocks, ReduceBlocks(entries[i].n));
  }
  double* partial = static_cast<double*>(scratch);
  MOE_LAUNCH(SumSquaresListKernel, TotalBlocks(l.blocks), kReduceThreads, 0, s, l, partial);
  MOE_LAUNCH(SumListFinishKernel, static_cast<unsigned>(count), kReduceThreads, 0, s, l.blocks, partial, out);
  return cudaGetLastError();
}

size_t ColumnSumScratchBytes(int64_t rows, int64_t cols) {
  const int64_t chunks = ColumnChunks(rows);
  return chunks == 1 ? 0 : static_cast<size_t>(chunks * cols) * sizeof(double);
}

cudaError_t LaunchSumRows(const float* x, int64_t rows, int64_t cols, float* out, float alpha, float beta,
                          void* scratch, cudaStream_t s) {
  if (cols <= 0) return cudaGetLastError();
  const int64_t chunks = ColumnChunks(rows);
  if (chunks > 1 && scratch == nullptr) return cudaErrorInvalidValue;  // ColumnSumScratchBytes were due
  double* partial = chunks > 1 ? static_cast<double*>(scratch) : nullptr;
  MOE_LAUNCH(SumRowsKernel, dim3(GridFor(cols), static_cast<unsigned>(chunks)), kThreads, 0, s, x, rows, cols,
             ColumnChunkRows(rows), partial, out, alpha, beta);
  if (chunks > 1)
    MOE_LAUNCH(SumRowsFinishKernel, GridFor(cols), kThreads, 0, s, partial, chunks, cols, out, alpha, beta);
  return cudaGetLastError();
}

}  // namespace moe::cuda
