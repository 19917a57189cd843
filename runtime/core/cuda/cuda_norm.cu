// RMSNorm forward (with the fused residual add) and backward: one block per row.
#include "runtime/core/cuda/cuda_launch.cuh"

namespace moe::cuda {
namespace {

__global__ void RmsNormKernel(const float* x, const float* residual, float* sum, const float* w, float eps,
                              float* out, float* rstd, int64_t d) {
  __shared__ double shared[32];
  const int64_t r = blockIdx.x;
  const float* xr = x + r * d;
  double acc = 0;
  if (residual != nullptr) {
    const float* rr = residual + r * d;
    float* sr = sum + r * d;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
      const float v = xr[i] + rr[i];
      sr[i] = v;
      acc += static_cast<double>(v) * v;
    }
    __syncthreads();
    xr = sr;  // sum may alias x or residual: every thread reads back its own elements only
  } else {
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) acc += static_cast<double>(xr[i]) * xr[i];
  }
  const float rs = kmath::RmsNormRstd(BlockSum(acc, shared), d, eps);
  if (threadIdx.x == 0) rstd[r] = rs;
  float* orow = out + r * d;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) orow[i] = xr[i] * rs * w[i];
}

__global__ void RmsNormDxKernel(const float* x, const float* w, const float* rstd, const float* dout,
                                float* dx, bool accumulate, int64_t d) {
  __shared__ double shared[32];
  const int64_t r = blockIdx.x;
  const float *xr = x + r * d, *dr = dout + r * d;
  double acc = 0;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) acc += static_cast<double>(w[i]) * dr[i] * xr[i];
  const float rs = rstd[r];
  const float coef = kmath::RmsNormBackwardCoef(BlockSum(acc, shared), d, rs);
  float* dxr = dx + r * d;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    const float g = kmath::RmsNormDx(xr[i], w[i], dr[i], rs, coef);
    dxr[i] = accumulate ? dxr[i] + g : g;
  }
}

// dweight[c] += sum_r dout[r, c] x[r, c] rstd[r] (rows in order: deterministic).
__global__ void RmsNormDwKernel(const float* x, const float* rstd, const float* dout, float* dw, int64_t rows,
                                int64_t d) {
  MOE_GRID_STRIDE(c, d) {
    double acc = 0;
    for (int64_t r = 0; r < rows; ++r) acc += static_cast<double>(dout[r * d + c]) * x[r * d + c] * rstd[r];
    dw[c] += static_cast<float>(acc);
  }
}

int RowThreads(int64_t d) { return d >= 1024 ? 512 : (d >= 256 ? 256 : 128); }

}  // namespace

cudaError_t LaunchRmsNorm(const float* x, const float* residual, float* sum, const float* weight, float eps,
                          float* out, float* rstd, int64_t rows, int64_t d, cudaStream_t s) {
  if (rows > 0) RmsNormKernel<<<rows, RowThreads(d), 0, s>>>(x, residual, sum, weight, eps, out, rstd, d);
  return cudaGetLastError();
}

cudaError_t LaunchRmsNormBackward(const float* x, const float* weight, const float* rstd, const float* dout,
                                  float* dx, float* dweight, bool accumulate_dx, int64_t rows, int64_t d,
                                  cudaStream_t s) {
  if (rows == 0) return cudaGetLastError();
  RmsNormDxKernel<<<rows, RowThreads(d), 0, s>>>(x, weight, rstd, dout, dx, accumulate_dx, d);
  RmsNormDwKernel<<<GridFor(d), kThreads, 0, s>>>(x, rstd, dout, dweight, rows, d);
  return cudaGetLastError();
}

}  // namespace moe::cuda
