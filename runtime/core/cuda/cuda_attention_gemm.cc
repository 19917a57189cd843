// The gemm attention path (attention_gemm.h) on CUDA: each batched product is
// one cublasGemmStridedBatchedEx, or a cublasGemmBatchedEx over device pointer
// arrays where the (sequence, head) matrices are not at one stride (f32
// operands, row-major mapped as in cuda_gemm.cc: C^T = op(B)^T op(A)^T).
// Products are CUBLAS_COMPUTE_32F, or CUBLAS_COMPUTE_32F_FAST_TF32 (tensor
// cores, f32 accumulation) inside a bf16 call (attn::Tf32ProductsAllowed:
// the operands are bf16 values, exact in TF32). The row passes and delta are
// cuda_attention.cu's kernels, whose arithmetic is kernel_math.h's. The score
// workspace is stream-ordered scratch, freed once the work is enqueued.
// Everything is enqueued on the caller's stream; nothing waits.
//
// Unlike the fused kernels this path has no sequence-length or head_dim limit
// (the workspace bounds the chunk of query rows instead) and it runs the
// causal products on cuBLAS. The CPU backend runs the same driver
// (cpu_attention_gemm.cc), so the CPU tests cover the algorithm.
//
// Compiled only with MOE_WITH_CUDA.
#include <cublas_v2.h>

#include "runtime/core/attention_gemm.h"
#include "runtime/core/cuda/cuda_backend.h"
#include "runtime/core/cuda/cuda_check.h"
#include "runtime/core/cuda/cuda_gemm.h"
#include "runtime/core/cuda/cuda_kernels.h"

namespace moe::cuda {
namespace {

int Ld(int64_t v) { return static_cast<int>(v < 1 ? 1 : v); }
cublasOperation_t Op(bool trans) { return trans ? CUBLAS_OP_T : CUBLAS_OP_N; }

BatchOperand AsBatchOperand(const attn::Operand& x) {
  return BatchOperand{x.base, x.stride, x.head_stride, x.head_div};
}

class CudaAttentionEngine : public attn::Engine {
 public:
  CudaAttentionEngine(Stream& s, cublasHandle_t handle)
      : s_(s),
        handle_(handle),
        stream_(NativeStream(s)),
        compute_(attn::Tf32ProductsAllowed() ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F) {}

  // One cublasGemmStridedBatchedEx when every operand's matrices are at one
  // stride; else one cublasGemmBatchedEx over pointer arrays that a kernel
  // fills on the stream (no host-to-device copy, so nothing waits).
  absl::Status Gemm(const attn::BatchedGemm& g) override {
    const int64_t count = g.count();
    if (count == 0 || g.m == 0 || g.n == 0) return absl::OkStatus();
    const float alpha = g.alpha, beta = g.beta;
    int64_t sa = 0, sb = 0, sc = 0;
    if (attn::OneStride(g.a, g.batch, g.heads, &sa) && attn::OneStride(g.b, g.batch, g.heads, &sb) &&
        attn::OneStride(g.c, g.batch, g.heads, &sc)) {
      CUBLAS_RETURN_IF_ERROR(cublasGemmStridedBatchedEx(
          handle_, Op(g.trans_b), Op(g.trans_a), static_cast<int>(g.n), static_cast<int>(g.m),
          static_cast<int>(g.k), &alpha, g.b.base, CUDA_R_32F, Ld(g.b.ld), sb, g.a.base, CUDA_R_32F,
          Ld(g.a.ld), sa, &beta, const_cast<float*>(g.c.base), CUDA_R_32F, Ld(g.c.ld), sc,
          static_cast<int>(count), compute_, CUBLAS_GEMM_DEFAULT));
      return absl::OkStatus();
    }
    ASSIGN_OR_RETURN(void* arrays, ScratchAlloc(s_, 3 * static_cast<size_t>(count) * sizeof(void*)));
    void** ptrs = static_cast<void**>(arrays);  // [a..., b..., c...]
    cudaError_t e = LaunchBatchPointers(AsBatchOperand(g.a), AsBatchOperand(g.b), AsBatchOperand(g.c),
                                        g.batch, g.heads, ptrs, stream_);
    cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
    if (e == cudaSuccess)
      st = cublasGemmBatchedEx(handle_, Op(g.trans_b), Op(g.trans_a), static_cast<int>(g.n),
                               static_cast<int>(g.m), static_cast<int>(g.k), &alpha, ptrs + count, CUDA_R_32F,
                               Ld(g.b.ld), ptrs, CUDA_R_32F, Ld(g.a.ld), &beta, ptrs + 2 * count, CUDA_R_32F,
                               Ld(g.c.ld), static_cast<int>(count), compute_, CUBLAS_GEMM_DEFAULT);
    ScratchFree(s_, arrays);  // stream-ordered: after the GEMM
    CUDA_RETURN_IF_ERROR(e);
    CUBLAS_RETURN_IF_ERROR(st);
    return absl::OkStatus();
  }

  absl::Status SoftmaxRows(const attn::ScoreBlock& b, float scale, float* lse) override {
    CUDA_RETURN_IF_ERROR(LaunchAttentionSoftmaxRows(b.s, b.ld, b.stride, b.batch, b.rows, b.keys, b.i0,
                                                    b.lse_stride, scale, lse, stream_));
    return absl::OkStatus();
  }

  absl::Status SoftmaxBackwardRows(const attn::ScoreBlock& b, float* dp, float scale, const float* lse,
                                   const float* delta) override {
    CUDA_RETURN_IF_ERROR(LaunchAttentionSoftmaxBackwardRows(b.s, dp, b.ld, b.stride, b.batch, b.rows, b.keys,
                                                            b.i0, b.lse_stride, scale, lse, delta, stream_));
    return absl::OkStatus();
  }

  absl::Status DeltaRows(const attn::Shape& sh, const float* out, const float* dout, float* delta) override {
    CUDA_RETURN_IF_ERROR(LaunchAttentionDelta(
        out, dout, delta, AttentionShape{sh.batch, sh.seq, sh.heads, sh.kv_heads, sh.head_dim}, stream_));
    return absl::OkStatus();
  }

  absl::Status Zero(float* p, int64_t n) override {
    if (n > 0) CUDA_RETURN_IF_ERROR(cudaMemsetAsync(p, 0, static_cast<size_t>(n) * sizeof(float), stream_));
    return absl::OkStatus();
  }

 private:
  Stream& s_;
  cublasHandle_t handle_;
  cudaStream_t stream_;
  cublasComputeType_t compute_;
};

attn::Shape ShapeOf(const Tensor& q, const Tensor& k) {
  return attn::Shape{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
}

float* F(const Tensor& t) { return static_cast<float*>(t.raw_data()); }

// Scratch of `floats` floats on `s`, freed (stream-ordered) when the holder goes.
class Scratch {
 public:
  explicit Scratch(Stream& s) : s_(s) {}
  ~Scratch() {
    if (p_ != nullptr) ScratchFree(s_, p_);
  }
  absl::StatusOr<float*> Get(int64_t floats) {
    ASSIGN_OR_RETURN(p_, ScratchAlloc(s_, static_cast<size_t>(floats) * sizeof(float)));
    return static_cast<float*>(p_);
  }

 private:
  Stream& s_;
  void* p_ = nullptr;
};

}  // namespace

absl::Status GemmCausalAttention(Stream& s, const Tensor& q, const Tensor& k, const Tensor& v, float scale,
                                 const Tensor& out, const Tensor& lse) {
  const attn::Shape sh = ShapeOf(q, k);
  if (sh.batch * sh.seq == 0) return absl::OkStatus();
  ASSIGN_OR_RETURN(cublasHandle_t h, CublasHandle(s));
  const int64_t chunk = attn::ChunkRows(sh, attn::AttentionSettingsRef().workspace_bytes);
  Scratch work(s);
  ASSIGN_OR_RETURN(float* w, work.Get(attn::WorkspaceFloats(sh, chunk, /*backward=*/false)));
  CudaAttentionEngine engine(s, h);
  return attn::Forward(engine, sh, F(q), F(k), F(v), scale, F(out), F(lse), w, chunk);
}

absl::Status GemmCausalAttentionBackward(Stream& s, const Tensor& q, const Tensor& k, const Tensor& v,
                                         const Tensor& out, const Tensor& lse, float scale,
                                         const Tensor& dout, const Tensor& dq, const Tensor& dk,
                                         const Tensor& dv) {
  const attn::Shape sh = ShapeOf(q, k);
  if (sh.batch * sh.seq == 0) return absl::OkStatus();
  ASSIGN_OR_RETURN(cublasHandle_t h, CublasHandle(s));
  const int64_t chunk = attn::ChunkRows(sh, attn::AttentionSettingsRef().workspace_bytes);
  Scratch work(s), delta(s);
  ASSIGN_OR_RETURN(float* w, work.Get(attn::WorkspaceFloats(sh, chunk, /*backward=*/true)));
  ASSIGN_OR_RETURN(float* d, delta.Get(sh.batch * sh.heads * sh.seq));
  CudaAttentionEngine engine(s, h);
  return attn::Backward(engine, sh, F(q), F(k), F(v), F(out), F(lse), scale, F(dout), F(dq), F(dk), F(dv), d,
                        w, chunk);
}

}  // namespace moe::cuda
