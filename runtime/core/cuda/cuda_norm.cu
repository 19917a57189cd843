// RMSNorm forward (with the fused residual add) and backward: one block per
// row. Activations and the weight are f32 or bf16 each (cuda_launch.cuh Ld /
// St: widened exactly, f32 arithmetic, double row sums, one rounding per
// output); rstd is f32.
#include "runtime/core/cuda/cuda_launch.cuh"

namespace moe::cuda {
namespace {

// residual.p null: RmsNorm of x. Else AddRmsNorm: v = x + residual (f32) is
// written to `sum` and normalised. The second pass recomputes v instead of
// reading `sum` back, so a bf16 sum (rounded) does not feed the normalised
// output: the numbers of the staged f32 kernel. sum may alias x or residual:
// each thread reads and writes only its own elements in both passes.
template <int M>
__global__ void RmsNormKernel(ElemIn x, ElemIn residual, ElemOut sum, ElemIn w, float eps, ElemOut out,
                              float* rstd, int64_t d) {
  __shared__ double shared[32];
  const int64_t base = blockIdx.x * d;
  const bool add = residual.p != nullptr;
  double acc = 0;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    const float v = add ? Ld<M>(x, base + i) + Ld<M>(residual, base + i) : Ld<M>(x, base + i);
    acc += static_cast<double>(v) * v;
  }
  const float rs = kmath::RmsNormRstd(BlockSum(acc, shared), d, eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = rs;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    const float v = add ? Ld<M>(x, base + i) + Ld<M>(residual, base + i) : Ld<M>(x, base + i);
    if (add) St<M>(sum, base + i, v);
    St<M>(out, base + i, v * rs * Ld<M>(w, i));
  }
}

template <int M>
__global__ void RmsNormDxKernel(ElemIn x, ElemIn w, const float* rstd, ElemIn dout, ElemOut dx,
                                bool accumulate, int64_t d) {
  __shared__ double shared[32];
  const int64_t base = blockIdx.x * d;
  double acc = 0;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x)
    acc += static_cast<double>(Ld<M>(w, i)) * Ld<M>(dout, base + i) * Ld<M>(x, base + i);
  const float rs = rstd[blockIdx.x];
  const float coef = kmath::RmsNormBackwardCoef(BlockSum(acc, shared), d, rs);
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    const float g = kmath::RmsNormDx(Ld<M>(x, base + i), Ld<M>(w, i), Ld<M>(dout, base + i), rs, coef);
    St<M>(dx, base + i, accumulate ? Ld<M>(dx, base + i) + g : g);
  }
}

// dweight[c] += sum_r dout[r, c] x[r, c] rstd[r], rows [blockIdx.y * per, ...)
// in order (ColumnChunks): into partial[y, c], or with one chunk (partial null)
// straight into dweight.
template <int M>
__global__ void RmsNormDwKernel(ElemIn x, const float* rstd, ElemIn dout, ElemOut dw, int64_t rows, int64_t d,
                                int64_t per, double* partial) {
  const int64_t r0 = blockIdx.y * per, r1 = r0 + per < rows ? r0 + per : rows;
  MOE_GRID_STRIDE(c, d) {
    double acc = 0;
    for (int64_t r = r0; r < r1; ++r)
      acc += static_cast<double>(Ld<M>(dout, r * d + c)) * Ld<M>(x, r * d + c) * rstd[r];
    if (partial != nullptr)
      partial[blockIdx.y * d + c] = acc;
    else
      St<M>(dw, c, Ld<M>(dw, c) + static_cast<float>(acc));
  }
}

// The chunks' partials of each column, added in chunk order, into dweight.
template <int M>
__global__ void RmsNormDwFinishKernel(const double* partial, int64_t chunks, ElemOut dw, int64_t d) {
  MOE_GRID_STRIDE(c, d) {
    double acc = 0;
    for (int64_t k = 0; k < chunks; ++k) acc += partial[k * d + c];
    St<M>(dw, c, Ld<M>(dw, c) + static_cast<float>(acc));
  }
}

int RowThreads(int64_t d) { return d >= 1024 ? 512 : (d >= 256 ? 256 : 128); }

}  // namespace

cudaError_t LaunchRmsNorm(ElemIn x, ElemIn residual, ElemOut sum, ElemIn weight, float eps, ElemOut out,
                          float* rstd, int64_t rows, int64_t d, cudaStream_t s) {
  const int mode = residual.p != nullptr ? ElemMode({x.t, residual.t, sum.t, weight.t, out.t})
                                         : ElemMode({x.t, weight.t, out.t});
  MOE_MODE_LAUNCH(RmsNormKernel, mode, rows, rows, RowThreads(d), s, x, residual, sum, weight, eps, out, rstd,
                  d);
  return cudaGetLastError();
}

cudaError_t LaunchRmsNormBackward(ElemIn x, ElemIn weight, const float* rstd, ElemIn dout, ElemOut dx,
                                  ElemOut dweight, bool accumulate_dx, int64_t rows, int64_t d, void* scratch,
                                  cudaStream_t s) {
  if (rows == 0) return cudaGetLastError();
  const int mode = ElemMode({x.t, weight.t, dout.t, dx.t, dweight.t});
  MOE_MODE_LAUNCH(RmsNormDxKernel, mode, rows, rows, RowThreads(d), s, x, weight, rstd, dout, dx,
                  accumulate_dx, d);
  const int64_t chunks = ColumnChunks(rows);
  if (chunks > 1 && scratch == nullptr) return cudaErrorInvalidValue;  // ColumnSumScratchBytes were due
  double* partial = chunks > 1 ? static_cast<double*>(scratch) : nullptr;
  MOE_MODE_LAUNCH(RmsNormDwKernel, mode, d, dim3(GridFor(d), static_cast<unsigned>(chunks)), kThreads, s, x,
                  rstd, dout, dweight, rows, d, ColumnChunkRows(rows), partial);
  if (chunks > 1)
    MOE_MODE_LAUNCH(RmsNormDwFinishKernel, mode, d, GridFor(d), kThreads, s, partial, chunks, dweight, d);
  return cudaGetLastError();
}

}  // namespace moe::cuda
