// Row softmax and its backward, log-sum-exp, fused softmax cross-entropy and
// top-k (router): one block per row (top-k: one thread per row), double row
// sums as on CPU. Routing is f32; the cross-entropy's logits and dlogits are
// f32 or bf16 each.
#include <cfloat>

#include "runtime/core/cuda/cuda_launch.cuh"

namespace moe::cuda {
namespace {

constexpr int kRowThreads = 256;

// (max, sum of exp(x - max)) of the row at x + base over the block.
template <int M>
__device__ inline float RowLse(ElemIn x, int64_t base, int64_t cols, double* red) {
  float mx = -INFINITY;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float v = Ld<M>(x, base + c);
    mx = v > mx ? v : mx;
  }
  const float m = static_cast<float>(BlockMax(static_cast<double>(mx), red));
  if (isinf(m)) return m;
  double sum = 0;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
    sum += exp(static_cast<double>(Ld<M>(x, base + c) - m));
  return static_cast<float>(m + log(BlockSum(sum, red)));
}

__global__ void SoftmaxKernel(const float* x, float* out, int64_t cols) {
  __shared__ double red[32];
  const float* xr = x + blockIdx.x * cols;
  float* orow = out + blockIdx.x * cols;
  float mx = -INFINITY;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) mx = xr[c] > mx ? xr[c] : mx;
  const float m = static_cast<float>(BlockMax(static_cast<double>(mx), red));
  double sum = 0;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float e = expf(xr[c] - m);
    orow[c] = e;  // out may alias x: each thread rewrites only its own elements
    sum += e;
  }
  const float inv = static_cast<float>(1.0 / BlockSum(sum, red));
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) orow[c] *= inv;
}

__global__ void SoftmaxBackwardKernel(const float* y, const float* dy, float* dx, float alpha, float beta,
                                      int64_t cols) {
  __shared__ double red[32];
  const int64_t base = blockIdx.x * cols;
  double dot = 0;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
    dot += static_cast<double>(y[base + c]) * dy[base + c];
  const float fd = static_cast<float>(BlockSum(dot, red));
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float g = kmath::SoftmaxGrad(alpha * y[base + c], dy[base + c], fd);
    dx[base + c] = beta == 0.0f ? g : g + beta * dx[base + c];
  }
}

__global__ void LogSumExpKernel(const float* x, float* out, int64_t cols) {
  __shared__ double red[32];
  const float l = RowLse<0>(ElemIn{x, ElemType::kF32}, blockIdx.x * cols, cols, red);
  if (threadIdx.x == 0) out[blockIdx.x] = l;
}

// logits and dlogits are f32 or bf16 each (cuda_launch.cuh Ld / St); losses,
// lse and dloss f32. dlogits may alias logits (each element is read by the
// thread that writes it, before it writes it).
template <int M>
__global__ void CrossEntropyKernel(ElemIn logits, const int32_t* targets, float* losses, float* lse,
                                   int64_t cols, DeviceError* err, int op) {
  __shared__ double red[32];
  const int64_t r = blockIdx.x;
  const float l = RowLse<M>(logits, r * cols, cols, red);
  if (threadIdx.x != 0) return;
  lse[r] = l;
  const int32_t t = targets[r];
  if (t >= cols) ReportBadIndex(err, op, r, t, cols);
  losses[r] = (t < 0 || t >= cols) ? 0.0f : l - Ld<M>(logits, r * cols + t);
}

template <int M>
__global__ void CrossEntropyBackwardKernel(ElemIn logits, const int32_t* targets, const float* lse,
                                           const float* dloss, float scale, ElemOut dlogits, int64_t cols,
                                           DeviceError* err, int op) {
  const int64_t r = blockIdx.x, base = r * cols;
  const int32_t t = targets[r];
  if (t >= cols && threadIdx.x == 0) ReportBadIndex(err, op, r, t, cols);
  if (t < 0) {
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) St<M>(dlogits, base + c, 0.0f);
    return;
  }
  const float f = scale * (dloss != nullptr ? dloss[r] : 1.0f), l = lse[r];
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
    St<M>(dlogits, base + c, kmath::CrossEntropyGrad(Ld<M>(logits, base + c), l, f, c == t));
}

// k passes of selection; the j-th pass takes the best column not yet taken
// (strictly after the previous pick in TopKBefore order).
__global__ void TopKKernel(const float* x, int k, float* values, int32_t* indices, int64_t rows,
                           int64_t cols) {
  MOE_GRID_STRIDE(r, rows) {
    const float* xr = x + r * cols;
    float pv = 0.0f;
    int32_t pi = -1;
    for (int j = 0; j < k; ++j) {
      float bv = 0.0f;
      int32_t bi = -1;
      for (int32_t c = 0; c < cols; ++c) {
        if (pi >= 0 && !kmath::TopKBefore(pv, pi, xr[c], c)) continue;  // already taken
        if (bi < 0 || kmath::TopKBefore(xr[c], c, bv, bi)) {
          bv = xr[c];
          bi = c;
        }
      }
      values[r * k + j] = bv;
      indices[r * k + j] = bi;
      pv = bv;
      pi = bi;
    }
  }
}

}  // namespace

cudaError_t LaunchSoftmax(const float* x, float* out, int64_t rows, int64_t cols, cudaStream_t s) {
  if (rows > 0) MOE_LAUNCH(SoftmaxKernel, rows, kRowThreads, 0, s, x, out, cols);
  return cudaGetLastError();
}
cudaError_t LaunchSoftmaxBackward(const float* y, const float* dy, float* dx, float alpha, float beta,
                                  int64_t rows, int64_t cols, cudaStream_t s) {
  if (rows > 0) MOE_LAUNCH(SoftmaxBackwardKernel, rows, kRowThreads, 0, s, y, dy, dx, alpha, beta, cols);
  return cudaGetLastError();
}
cudaError_t LaunchLogSumExp(const float* x, float* out, int64_t rows, int64_t cols, cudaStream_t s) {
  if (rows > 0) MOE_LAUNCH(LogSumExpKernel, rows, kRowThreads, 0, s, x, out, cols);
  return cudaGetLastError();
}
cudaError_t LaunchCrossEntropy(ElemIn logits, const int32_t* targets, float* losses, float* lse, int64_t rows,
                               int64_t cols, DeviceError* err, int op, cudaStream_t s) {
  MOE_MODE_LAUNCH(CrossEntropyKernel, ElemMode({logits.t}), rows, rows, kRowThreads, s, logits, targets,
                  losses, lse, cols, err, op);
  return cudaGetLastError();
}
cudaError_t LaunchCrossEntropyBackward(ElemIn logits, const int32_t* targets, const float* lse,
                                       const float* dloss, float scale, ElemOut dlogits, int64_t rows,
                                       int64_t cols, DeviceError* err, int op, cudaStream_t s) {
  MOE_MODE_LAUNCH(CrossEntropyBackwardKernel, ElemMode({logits.t, dlogits.t}), rows, rows, kRowThreads, s,
                  logits, targets, lse, dloss, scale, dlogits, cols, err, op);
  return cudaGetLastError();
}
cudaError_t LaunchTopK(const float* x, int k, float* values, int32_t* indices, int64_t rows, int64_t cols,
                       cudaStream_t s) {
  if (rows > 0) MOE_LAUNCH(TopKKernel, GridFor(rows, 128), 128, 0, s, x, k, values, indices, rows, cols);
  return cudaGetLastError();
}

}  // namespace moe::cuda
