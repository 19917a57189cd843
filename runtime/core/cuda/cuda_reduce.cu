// Reductions: sum, sum of squares, max (the clipping norm, losses) and column sums.
// Sums accumulate in double in a fixed order, so results do not depend on timing.
#include <cfloat>

#include "runtime/core/cuda/cuda_launch.cuh"

namespace moe::cuda {
namespace {

constexpr int kReduceThreads = 1024;

// One block: each thread strides over x, then a fixed-order block sum. Read
// bandwidth is that of one SM; gradient clipping calls it once per parameter
// tensor, and the trainer reads the one resulting scalar.
__global__ void ReduceKernel(const float* x, int64_t n, ReduceKind kind, float* out, float alpha,
                             float beta) {
  __shared__ double shared[32];
  if (kind == ReduceKind::kMax) {
    float m = -INFINITY;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) m = x[i] > m ? x[i] : m;
    double r = BlockMax(static_cast<double>(m), shared);
    if (threadIdx.x == 0) out[0] = static_cast<float>(r);
    return;
  }
  double acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double v = x[i];
    acc += kind == ReduceKind::kSumSquares ? v * v : v;
  }
  const double total = BlockSum(acc, shared);
  if (threadIdx.x == 0) {
    out[0] = static_cast<float>(alpha * total + (beta == 0.0f ? 0.0 : static_cast<double>(beta) * out[0]));
  }
}

__global__ void SumRowsKernel(const float* x, int64_t rows, int64_t cols, float* out, float alpha,
                              float beta) {
  MOE_GRID_STRIDE(c, cols) {
    double acc = 0;
    for (int64_t r = 0; r < rows; ++r) acc += x[r * cols + c];
    out[c] = static_cast<float>(alpha * acc + (beta == 0.0f ? 0.0 : static_cast<double>(beta) * out[c]));
  }
}

}  // namespace

cudaError_t LaunchReduce(const float* x, int64_t n, ReduceKind kind, float* out, float alpha, float beta,
                         cudaStream_t s) {
  MOE_LAUNCH(ReduceKernel, 1, kReduceThreads, 0, s, x, n, kind, out, alpha, beta);
  return cudaGetLastError();
}

cudaError_t LaunchSumRows(const float* x, int64_t rows, int64_t cols, float* out, float alpha, float beta,
                          cudaStream_t s) {
  if (cols > 0) MOE_LAUNCH(SumRowsKernel, GridFor(cols), kThreads, 0, s, x, rows, cols, out, alpha, beta);
  return cudaGetLastError();
}

}  // namespace moe::cuda
