// The AdamW step (one tensor, or a list in one launch) and Philox initialisation (the same element values as
// the CPU backend: kernel_math.h's AdamWElement and PhiloxNormal).
#include "runtime/core/cuda/cuda_launch.cuh"

namespace moe::cuda {
namespace {

// p16 (may be null): the updated p rounded to bf16, the compute copy. g is
// read as scale * g (the clipping coefficient).
__global__ void AdamWKernel(float* p, const float* g, float* m, float* v, uint16_t* p16, float scale,
                            float lr, float beta1, float beta2, float eps, float weight_decay, float bc1,
                            float bc2, int64_t n) {
  MOE_GRID_STRIDE(i, n) {
    float pi = p[i], mi = m[i], vi = v[i];
    const float gs = scale * g[i];
    kmath::AdamWElement(gs, lr, beta1, beta2, eps, weight_decay, bc1, bc2, &pi, &mi, &vi);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if (p16 != nullptr) p16[i] = kmath::F32ToBF16(pi);
  }
}

// AdamWKernel over a list: each entry's elements as AdamWKernel's.
struct AdamWList {
  ListBlocks blocks;
  AdamWEntry e[kMaxListTensors];
};
__global__ void AdamWListKernel(AdamWList l, float scale, float lr, float beta1, float beta2, float eps,
                                float bc1, float bc2) {
  const int i = ListEntry(l.blocks, blockIdx.x);
  const AdamWEntry e = l.e[i];
  MOE_LIST_STRIDE(j, e.n, l.blocks, i) {
    float pj = e.param[j], mj = e.m[j], vj = e.v[j];
    const float gs = scale * e.grad[j];
    kmath::AdamWElement(gs, lr, beta1, beta2, eps, e.weight_decay, bc1, bc2, &pj, &mj, &vj);
    e.param[j] = pj;
    e.m[j] = mj;
    e.v[j] = vj;
    if (e.param_bf16 != nullptr) e.param_bf16[j] = kmath::F32ToBF16(pj);
  }
}

// Element t of the box (row-major in the box's shape) has global row-major
// index sum_d (offset[d] + idx_d) * stride_d of the global shape.
__global__ void InitNormalKernel(float* p, int64_t n, uint64_t seed, uint32_t k0, uint32_t k1, float std,
                                 InitBox box) {
  MOE_GRID_STRIDE(t, n) {
    int64_t rest = t, global = 0, stride = 1;
    for (int d = box.rank - 1; d >= 0; --d) {
      const int64_t idx = rest % box.local[d];
      rest /= box.local[d];
      global += (box.offset[d] + idx) * stride;
      stride *= box.global[d];
    }
    p[t] = std * kmath::PhiloxNormal(seed, k0, k1, static_cast<uint64_t>(global));
  }
}

}  // namespace

cudaError_t LaunchAdamW(float* param, const float* grad, float* m, float* v, uint16_t* param_bf16,
                        float grad_scale, float lr, float beta1, float beta2, float eps, float weight_decay,
                        float bc1, float bc2, int64_t n, cudaStream_t s) {
  if (n > 0)
    MOE_LAUNCH(AdamWKernel, GridFor(n), kThreads, 0, s, param, grad, m, v, param_bf16, grad_scale, lr, beta1,
               beta2, eps, weight_decay, bc1, bc2, n);
  return cudaGetLastError();
}

cudaError_t LaunchAdamWList(const AdamWEntry* entries, int count, float grad_scale, float lr, float beta1,
                            float beta2, float eps, float bc1, float bc2, cudaStream_t s) {
  AdamWList l{};
  if (!PackElementwiseList(&l, entries, count)) return cudaErrorInvalidValue;
  if (l.blocks.count > 0)
    MOE_LAUNCH(AdamWListKernel, TotalBlocks(l.blocks), kThreads, 0, s, l, grad_scale, lr, beta1, beta2, eps,
               bc1, bc2);
  return cudaGetLastError();
}

cudaError_t LaunchInitNormal(float* p, int64_t n, uint64_t seed, uint32_t k0, uint32_t k1, float std,
                             InitBox box, cudaStream_t s) {
  if (n > 0) MOE_LAUNCH(InitNormalKernel, GridFor(n), kThreads, 0, s, p, n, seed, k0, k1, std, box);
  return cudaGetLastError();
}

}  // namespace moe::cuda
