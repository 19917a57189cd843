// Element-wise kernels: fill, cast, add, axpby, mul, scale, SiLU, SwiGLU.
#include "runtime/core/cuda/cuda_launch.cuh"

namespace moe::cuda {
namespace {

__device__ inline double LoadAs(const void* p, ElemType t, int64_t i) {
  switch (t) {
    case ElemType::kF32:
      return static_cast<const float*>(p)[i];
    case ElemType::kBF16:
      return kmath::BF16ToF32(static_cast<const uint16_t*>(p)[i]);
    case ElemType::kI32:
      return static_cast<const int32_t*>(p)[i];
    case ElemType::kI64:
      return static_cast<double>(static_cast<const int64_t*>(p)[i]);
    case ElemType::kF64:
      return static_cast<const double*>(p)[i];
  }
  return 0;
}

__device__ inline void StoreAs(void* p, ElemType t, int64_t i, double v) {
  switch (t) {
    case ElemType::kF32:
      static_cast<float*>(p)[i] = static_cast<float>(v);
      break;
    case ElemType::kBF16:
      static_cast<uint16_t*>(p)[i] = kmath::F32ToBF16(static_cast<float>(v));
      break;
    case ElemType::kI32:
      static_cast<int32_t*>(p)[i] = static_cast<int32_t>(v);
      break;
    case ElemType::kI64:
      static_cast<int64_t*>(p)[i] = static_cast<int64_t>(v);
      break;
    case ElemType::kF64:
      static_cast<double*>(p)[i] = v;
      break;
  }
}

__global__ void FillKernel(void* p, ElemType t, int64_t n, double value) {
  MOE_GRID_STRIDE(i, n) StoreAs(p, t, i, value);
}

__global__ void CastKernel(const void* src, ElemType st, void* dst, ElemType dt, int64_t n) {
  // i64 -> i32 and back go through double, exact for |v| < 2^53 (indices, counts).
  MOE_GRID_STRIDE(i, n) StoreAs(dst, dt, i, LoadAs(src, st, i));
}

__global__ void AddKernel(const float* a, const float* b, float* out, int64_t n) {
  MOE_GRID_STRIDE(i, n) out[i] = a[i] + b[i];
}
__global__ void MulKernel(const float* a, const float* b, float* out, int64_t n) {
  MOE_GRID_STRIDE(i, n) out[i] = a[i] * b[i];
}
__global__ void AxpbyKernel(float alpha, const float* x, float beta, float* y, int64_t n) {
  // beta = 0 never reads y (NaNs there do not propagate), as ops.h promises.
  MOE_GRID_STRIDE(i, n) y[i] = beta == 0.0f ? alpha * x[i] : alpha * x[i] + beta * y[i];
}
__global__ void ScaleKernel(const float* x, float alpha, float* out, int64_t n) {
  MOE_GRID_STRIDE(i, n) out[i] = alpha * x[i];
}
__global__ void SiluKernel(const float* x, float* out, int64_t n) {
  MOE_GRID_STRIDE(i, n) out[i] = kmath::Silu(x[i]);
}
__global__ void SiluBackwardKernel(const float* x, const float* dout, float* dx, float alpha, float beta,
                                   int64_t n) {
  MOE_GRID_STRIDE(i, n) {
    const float g = alpha * dout[i] * kmath::SiluGrad(x[i]);
    dx[i] = beta == 0.0f ? g : g + beta * dx[i];
  }
}
__global__ void SwiGLUKernel(const float* gate, const float* up, float* out, int64_t n) {
  MOE_GRID_STRIDE(i, n) out[i] = kmath::SwiGLU(gate[i], up[i]);
}
__global__ void SwiGLUBackwardKernel(const float* gate, const float* up, const float* dout, float* dgate,
                                     float* dup, int64_t n) {
  MOE_GRID_STRIDE(i, n) {
    float dg, du;
    kmath::SwiGLUBackward(gate[i], up[i], dout[i], &dg, &du);
    dgate[i] = dg;
    dup[i] = du;
  }
}

}  // namespace

cudaError_t LaunchFill(void* p, ElemType t, int64_t n, double value, cudaStream_t s) {
  if (n > 0) FillKernel<<<GridFor(n), kThreads, 0, s>>>(p, t, n, value);
  return cudaGetLastError();
}
cudaError_t LaunchCast(const void* src, ElemType st, void* dst, ElemType dt, int64_t n, cudaStream_t s) {
  if (n > 0) CastKernel<<<GridFor(n), kThreads, 0, s>>>(src, st, dst, dt, n);
  return cudaGetLastError();
}
cudaError_t LaunchAdd(const float* a, const float* b, float* out, int64_t n, cudaStream_t s) {
  if (n > 0) AddKernel<<<GridFor(n), kThreads, 0, s>>>(a, b, out, n);
  return cudaGetLastError();
}
cudaError_t LaunchMul(const float* a, const float* b, float* out, int64_t n, cudaStream_t s) {
  if (n > 0) MulKernel<<<GridFor(n), kThreads, 0, s>>>(a, b, out, n);
  return cudaGetLastError();
}
cudaError_t LaunchAxpby(float alpha, const float* x, float beta, float* y, int64_t n, cudaStream_t s) {
  if (n > 0) AxpbyKernel<<<GridFor(n), kThreads, 0, s>>>(alpha, x, beta, y, n);
  return cudaGetLastError();
}
cudaError_t LaunchScale(const float* x, float alpha, float* out, int64_t n, cudaStream_t s) {
  if (n > 0) ScaleKernel<<<GridFor(n), kThreads, 0, s>>>(x, alpha, out, n);
  return cudaGetLastError();
}
cudaError_t LaunchSilu(const float* x, float* out, int64_t n, cudaStream_t s) {
  if (n > 0) SiluKernel<<<GridFor(n), kThreads, 0, s>>>(x, out, n);
  return cudaGetLastError();
}
cudaError_t LaunchSiluBackward(const float* x, const float* dout, float* dx, float alpha, float beta,
                               int64_t n, cudaStream_t s) {
  if (n > 0) SiluBackwardKernel<<<GridFor(n), kThreads, 0, s>>>(x, dout, dx, alpha, beta, n);
  return cudaGetLastError();
}
cudaError_t LaunchSwiGLU(const float* gate, const float* up, float* out, int64_t n, cudaStream_t s) {
  if (n > 0) SwiGLUKernel<<<GridFor(n), kThreads, 0, s>>>(gate, up, out, n);
  return cudaGetLastError();
}
cudaError_t LaunchSwiGLUBackward(const float* gate, const float* up, const float* dout, float* dgate,
                                 float* dup, int64_t n, cudaStream_t s) {
  if (n > 0) SwiGLUBackwardKernel<<<GridFor(n), kThreads, 0, s>>>(gate, up, dout, dgate, dup, n);
  return cudaGetLastError();
}

}  // namespace moe::cuda
