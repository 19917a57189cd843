// RoPE, rotate-half convention, forward and inverse: one thread per (row,
// head, pair). in and out are f32 or bf16 each (cuda_launch.cuh Ld / St); out
// may alias in (each thread reads its pair before writing it).
#include "runtime/core/cuda/cuda_launch.cuh"

namespace moe::cuda {
namespace {

template <int M>
__global__ void RopeKernel(ElemIn in, ElemOut out, int64_t rows, int64_t seq, int64_t heads, int64_t hd,
                           double theta, int64_t position_offset, bool inverse) {
  const int64_t half = hd / 2;
  MOE_GRID_STRIDE(t, rows * heads * half) {
    const int64_t j = t % half, rh = t / half, r = rh / heads;
    const double angle = static_cast<double>(position_offset + r % seq) * kmath::RopeInvFreq(j, hd, theta);
    const float c = static_cast<float>(cos(angle));
    const float sn = static_cast<float>(inverse ? -sin(angle) : sin(angle));
    const int64_t base = rh * hd;
    float y1, y2;
    kmath::RopePair(Ld<M>(in, base + j), Ld<M>(in, base + j + half), c, sn, &y1, &y2);
    St<M>(out, base + j, y1);
    St<M>(out, base + j + half, y2);
  }
}

}  // namespace

cudaError_t LaunchRope(ElemIn in, ElemOut out, int64_t batch, int64_t seq, int64_t heads, int64_t head_dim,
                       double theta, int64_t position_offset, bool inverse, cudaStream_t s) {
  const int64_t n = batch * seq * heads * (head_dim / 2);
  MOE_ELEM_LAUNCH(RopeKernel, ElemMode({in.t, out.t}), n, s, in, out, batch * seq, seq, heads, head_dim,
                  theta, position_offset, inverse);
  return cudaGetLastError();
}

}  // namespace moe::cuda
