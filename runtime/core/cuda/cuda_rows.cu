// Row gather / scatter-add (permute into expert order, un-permute with the
// combine weights, embedding forward and backward) and the gathered row dot
// (gradient of the combine weights). Bad indices are reported through the
// stream's DeviceError record and the row is skipped.
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

// One thread per column: the M source rows are added in i order, so repeated
// indices accumulate deterministically (ops.h), as on CPU.
__global__ void ScatterAddKernel(const float* src, const int32_t* index, float* dst, const float* weight,
                                 int64_t m, int64_t n, int64_t d, DeviceError* err, int op) {
  MOE_GRID_STRIDE(c, d) {
    for (int64_t i = 0; i < m; ++i) {
      const int32_t r = index[i];
      if (r < 0 || r >= n) {
        if (c == 0) ReportBadIndex(err, op, i, r, n);
        continue;
      }
      const float w = weight != nullptr ? weight[i] : 1.0f;
      dst[static_cast<int64_t>(r) * d + c] += w * src[i * d + c];
    }
  }
}

__global__ void GatherRowDotKernel(const float* a, const int32_t* index, const float* b, float* out,
                                   float alpha, float beta, int64_t n, int64_t d, DeviceError* err, int op) {
  __shared__ double red[32];
  const int64_t i = blockIdx.x;
  const int32_t r = index[i];
  const bool bad = r < 0 || r >= n;
  double dot = 0;
  if (!bad)
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x)
      dot += static_cast<double>(a[static_cast<int64_t>(r) * d + c]) * b[i * d + c];
  const double total = BlockSum(dot, red);
  if (threadIdx.x != 0) return;
  if (bad) {
    ReportBadIndex(err, op, i, r, n);
    return;
  }
  const float g = static_cast<float>(alpha * total);
  out[i] = beta == 0.0f ? g : g + beta * out[i];
}

}  // namespace

cudaError_t LaunchGatherRows(const void* src, const int32_t* index, void* dst, int64_t m, int64_t n,
                             int64_t row_bytes, DeviceError* err, int op, cudaStream_t s) {
  if (m == 0 || row_bytes == 0) return cudaGetLastError();
  if (row_bytes % 4 == 0) {
    const int64_t words = row_bytes / 4;
    GatherKernel<<<GridFor(m * words), kThreads, 0, s>>>(static_cast<const uint32_t*>(src), index,
                                                         static_cast<uint32_t*>(dst), m, n, words, err, op);
  } else {
    GatherKernel<<<GridFor(m * row_bytes), kThreads, 0, s>>>(
        static_cast<const uint8_t*>(src), index, static_cast<uint8_t*>(dst), m, n, row_bytes, err, op);
  }
  return cudaGetLastError();
}

cudaError_t LaunchScatterAddRows(const float* src, const int32_t* index, float* dst, const float* weight,
                                 int64_t m, int64_t n, int64_t d, DeviceError* err, int op, cudaStream_t s) {
  if (m > 0 && d > 0)
    ScatterAddKernel<<<GridFor(d, 128), 128, 0, s>>>(src, index, dst, weight, m, n, d, err, op);
  return cudaGetLastError();
}

cudaError_t LaunchGatherRowDot(const float* a, const int32_t* index, const float* b, float* out, float alpha,
                               float beta, int64_t m, int64_t n, int64_t d, DeviceError* err, int op,
                               cudaStream_t s) {
  if (m > 0) GatherRowDotKernel<<<m, 128, 0, s>>>(a, index, b, out, alpha, beta, n, d, err, op);
  return cudaGetLastError();
}

}  // namespace moe::cuda
