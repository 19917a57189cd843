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

struct FillList {
  ListBlocks blocks;
  FillEntry e[kMaxListTensors];
};
__global__ void FillListKernel(FillList l, double value) {
  const int i = ListEntry(l.blocks, blockIdx.x);
  const FillEntry e = l.e[i];
  MOE_LIST_STRIDE(j, e.n, l.blocks, i) StoreAs(e.p, e.t, j, value);
}

__global__ void CastKernel(const void* src, ElemType st, void* dst, ElemType dt, int64_t n) {
  // i64 -> i32 and back go through double, exact for |v| < 2^53 (indices, counts).
  MOE_GRID_STRIDE(i, n) StoreAs(dst, dt, i, LoadAs(src, st, i));
}

template <int M>
__global__ void AddKernel(ElemIn a, ElemIn b, ElemOut out, int64_t n) {
  MOE_GRID_STRIDE(i, n) St<M>(out, i, Ld<M>(a, i) + Ld<M>(b, i));
}
template <int M>
__global__ void MulKernel(ElemIn a, ElemIn b, ElemOut out, int64_t n) {
  MOE_GRID_STRIDE(i, n) St<M>(out, i, Ld<M>(a, i) * Ld<M>(b, i));
}
template <int M>
__global__ void AxpbyKernel(float alpha, ElemIn x, float beta, ElemOut y, int64_t n) {
  // beta = 0 never reads y (NaNs there do not propagate), as ops.h promises.
  MOE_GRID_STRIDE(i, n)
  St<M>(y, i, beta == 0.0f ? alpha * Ld<M>(x, i) : alpha * Ld<M>(x, i) + beta * Ld<M>(y, i));
}
template <int M>
__global__ void ScaleKernel(ElemIn x, float alpha, ElemOut out, int64_t n) {
  MOE_GRID_STRIDE(i, n) St<M>(out, i, alpha * Ld<M>(x, i));
}
template <int M>
__global__ void SiluKernel(ElemIn x, ElemOut out, int64_t n) {
  MOE_GRID_STRIDE(i, n) St<M>(out, i, kmath::Silu(Ld<M>(x, i)));
}
template <int M>
__global__ void SiluBackwardKernel(ElemIn x, ElemIn dout, ElemOut dx, float alpha, float beta, int64_t n) {
  MOE_GRID_STRIDE(i, n) {
    const float g = alpha * Ld<M>(dout, i) * kmath::SiluGrad(Ld<M>(x, i));
    St<M>(dx, i, beta == 0.0f ? g : g + beta * Ld<M>(dx, i));
  }
}
template <int M>
__global__ void SwiGLUKernel(ElemIn gate, ElemIn up, ElemOut out, int64_t n) {
  MOE_GRID_STRIDE(i, n) St<M>(out, i, kmath::SwiGLU(Ld<M>(gate, i), Ld<M>(up, i)));
}
template <int M>
__global__ void SwiGLUBackwardKernel(ElemIn gate, ElemIn up, ElemIn dout, ElemOut dgate, ElemOut dup,
                                     int64_t n) {
  MOE_GRID_STRIDE(i, n) {
    float dg, du;
    kmath::SwiGLUBackward(Ld<M>(gate, i), Ld<M>(up, i), Ld<M>(dout, i), &dg, &du);
    St<M>(dgate, i, dg);
    St<M>(dup, i, du);
  }
}

}  // namespace

cudaError_t LaunchFill(void* p, ElemType t, int64_t n, double value, cudaStream_t s) {
  if (n > 0) MOE_LAUNCH(FillKernel, GridFor(n), kThreads, 0, s, p, t, n, value);
  return cudaGetLastError();
}
cudaError_t LaunchFillList(const FillEntry* entries, int count, double value, cudaStream_t s) {
  FillList l{};
  if (!PackElementwiseList(&l, entries, count)) return cudaErrorInvalidValue;
  if (l.blocks.count > 0) MOE_LAUNCH(FillListKernel, TotalBlocks(l.blocks), kThreads, 0, s, l, value);
  return cudaGetLastError();
}
cudaError_t LaunchCast(const void* src, ElemType st, void* dst, ElemType dt, int64_t n, cudaStream_t s) {
  if (n > 0) MOE_LAUNCH(CastKernel, GridFor(n), kThreads, 0, s, src, st, dst, dt, n);
  return cudaGetLastError();
}
cudaError_t LaunchAdd(ElemIn a, ElemIn b, ElemOut out, int64_t n, cudaStream_t s) {
  MOE_ELEM_LAUNCH(AddKernel, ElemMode({a.t, b.t, out.t}), n, s, a, b, out, n);
  return cudaGetLastError();
}
cudaError_t LaunchMul(ElemIn a, ElemIn b, ElemOut out, int64_t n, cudaStream_t s) {
  MOE_ELEM_LAUNCH(MulKernel, ElemMode({a.t, b.t, out.t}), n, s, a, b, out, n);
  return cudaGetLastError();
}
cudaError_t LaunchAxpby(float alpha, ElemIn x, float beta, ElemOut y, int64_t n, cudaStream_t s) {
  MOE_ELEM_LAUNCH(AxpbyKernel, ElemMode({x.t, y.t}), n, s, alpha, x, beta, y, n);
  return cudaGetLastError();
}
cudaError_t LaunchScale(ElemIn x, float alpha, ElemOut out, int64_t n, cudaStream_t s) {
  MOE_ELEM_LAUNCH(ScaleKernel, ElemMode({x.t, out.t}), n, s, x, alpha, out, n);
  return cudaGetLastError();
}
cudaError_t LaunchSilu(ElemIn x, ElemOut out, int64_t n, cudaStream_t s) {
  MOE_ELEM_LAUNCH(SiluKernel, ElemMode({x.t, out.t}), n, s, x, out, n);
  return cudaGetLastError();
}
cudaError_t LaunchSiluBackward(ElemIn x, ElemIn dout, ElemOut dx, float alpha, float beta, int64_t n,
                               cudaStream_t s) {
  MOE_ELEM_LAUNCH(SiluBackwardKernel, ElemMode({x.t, dout.t, dx.t}), n, s, x, dout, dx, alpha, beta, n);
  return cudaGetLastError();
}
cudaError_t LaunchSwiGLU(ElemIn gate, ElemIn up, ElemOut out, int64_t n, cudaStream_t s) {
  MOE_ELEM_LAUNCH(SwiGLUKernel, ElemMode({gate.t, up.t, out.t}), n, s, gate, up, out, n);
  return cudaGetLastError();
}
cudaError_t LaunchSwiGLUBackward(ElemIn gate, ElemIn up, ElemIn dout, ElemOut dgate, ElemOut dup, int64_t n,
                                 cudaStream_t s) {
  MOE_ELEM_LAUNCH(SwiGLUBackwardKernel, ElemMode({gate.t, up.t, dout.t, dgate.t, dup.t}), n, s, gate, up,
                  dout, dgate, dup, n);
  return cudaGetLastError();
}

}  // namespace moe::cuda
