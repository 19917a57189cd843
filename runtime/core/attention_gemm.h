// Causal attention as strided-batched GEMMs and row passes over a chunk of
// query rows at a time: the "gemm" attention path, which a backend takes
// instead of its fused kernel when AttentionSettingsRef() says so.
//
// For each chunk of queries [i0, i0 + n), over every sequence and query head h
// (KV head g) at once:
//   forward   S = Q_c K[0:L]^T (L = i0 + n keys: the causal half, plus the
//             masked corner of the diagonal block), P = softmax(scale S) with
//             the row log-sum-exp kept, O_c = P V[0:L];
//   backward  S and dP = dO_c V^T recomputed, P = exp(scale S - lse) and
//             dS = P (dP - D) row by row (D = rowsum(dO o O)), then
//             dV += P^T dO_c, dK += scale dS^T Q_c, dQ_c = scale dS K.
// Each product is one batched GEMM over (sequence, head), except dK and dV
// with grouped KV heads: one per member of a group (the group's heads share
// an output). The workspace holds one [B, H, n, L] block of scores (two in
// backward), never [B, H, S, S]; what is kept for backward is the same as the fused
// kernels' (out and lse [B, H, S]), so the two paths are interchangeable
// between forward and backward. dK and dV sum over chunks and over the heads
// of a KV group in a fixed order (deterministic).
//
// The driver is host code over raw pointers; an Engine supplies the
// backend's batched GEMM (cuBLAS on CUDA, the CPU backend's sgemm tiles)
// and the row passes, whose arithmetic is kernel_math.h's. The CPU backend
// runs this same driver, so the CPU tests check the algorithm the CUDA
// backend runs on cuBLAS.
#ifndef MOE_RUNTIME_CORE_ATTENTION_GEMM_H_
#define MOE_RUNTIME_CORE_ATTENTION_GEMM_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moe::attn {

// Which CausalAttention(+Backward) a backend runs: its fused kernel (on CPU the
// tiled online-softmax one, on CUDA one block per query row), this driver, or
// (kFlash) CUDA's tensor-core kernel for bf16 operands (cuda_flash_attention.cu:
// FlashAttention-2 tiling, bf16 P and dS in its products); where that kernel
// does not apply (the CPU, f32 operands, a head_dim other than 32, 64, 128)
// kFlash runs the fused kernel.
enum class AttentionPath { kFused, kGemm, kFlash };

struct AttentionSettings {
  AttentionPath path = AttentionPath::kFused;
  // Bound on the gemm path's score workspace per call (two blocks in backward).
  int64_t workspace_bytes = int64_t{256} << 20;
};
// Process-wide; read from MOE_ATTENTION ("fused" | "gemm" | "flash") and
// MOE_ATTENTION_WORKSPACE_MB at first use. An unknown value is a fatal error
// naming the variable. Tests and benchmarks set it directly.
AttentionSettings& AttentionSettingsRef();
// The settings MOE_ATTENTION and MOE_ATTENTION_WORKSPACE_MB ask for, or an error
// naming the variable and its allowed values (moe-train checks at start-up).
absl::StatusOr<AttentionSettings> AttentionSettingsFromEnv();
absl::StatusOr<AttentionPath> ParseAttentionPath(absl::string_view name);
absl::string_view AttentionPathName(AttentionPath path);

// Whether the batched products of this thread's current attention call may
// round their f32 operands to TF32 (10-bit mantissa, tensor cores) where the
// backend has it: CUDA's gemm path does (CUBLAS_COMPUTE_32F_FAST_TF32); the CPU
// and the fused kernels ignore it. The bf16 staging decorator (bf16_staging.cc)
// allows it around an attention call whose q, k and v are bf16: those operands,
// and out and dout, are then bf16 values widened to f32, which TF32 holds
// exactly, and only the probabilities and their gradients round, at 2^-11,
// finer than the 2^-8 of the bf16 outputs. An f32 call (train.precision fp32)
// keeps full f32 products, so CUDA matches the CPU backend to 1e-5 there.
bool Tf32ProductsAllowed();
class Tf32ProductsScope {
 public:
  explicit Tf32ProductsScope(bool allow);
  ~Tf32ProductsScope();
  Tf32ProductsScope(const Tf32ProductsScope&) = delete;
  Tf32ProductsScope& operator=(const Tf32ProductsScope&) = delete;

 private:
  bool saved_;
};

// q, out, dout, dq: [batch, seq, heads, head_dim]; k, v, dk, dv: [batch, seq,
// kv_heads, head_dim]; lse and delta: [batch, heads, seq].
struct Shape {
  int64_t batch, seq, heads, kv_heads, head_dim;
};

// Query rows per chunk: the backward's two [batch, heads, rows, seq] score
// blocks fit in `workspace_bytes`
// (a multiple of 64 when that allows 64 or more), and at most seq / kMinChunks
// rounded up to a multiple of 64 (the causal waste, the masked half of each
// chunk's diagonal block, is then about 1 / kMinChunks of the work); at least
// 1, at most seq.
inline constexpr int64_t kMinChunks = 8;
int64_t ChunkRows(const Shape& sh, int64_t workspace_bytes);
// Floats of workspace Forward / Backward need at this chunk size.
int64_t WorkspaceFloats(const Shape& sh, int64_t chunk, bool backward);

// One operand of a batched GEMM over the matrices t = b * heads + h (b < batch,
// h < heads): matrix t at base + b * stride + (h / head_div) * head_stride, its
// rows at ld. head_div > 1 maps query heads onto their grouped KV head.
struct Operand {
  const float* base;
  int64_t ld, stride, head_stride, head_div;
  const float* At(int64_t t, int64_t heads) const {
    return base + (t / heads) * stride + ((t % heads) / head_div) * head_stride;
  }
};

// Whether x's matrices t < batch * heads are at x.base + t * stride for one
// stride (then *stride is it): a strided-batched GEMM can take x.
bool OneStride(const Operand& x, int64_t batch, int64_t heads, int64_t* stride);

// Row-major c[t] = alpha op(a[t]) op(b[t]) + beta c[t] for t < batch * heads;
// op(a) is m x k, op(b) k x n. The c matrices never overlap (c.head_div is 1), so
// the products may run in any order; beta 0 never reads c.
struct BatchedGemm {
  bool trans_a, trans_b;
  int64_t m, n, k;
  float alpha;
  Operand a, b;
  float beta;
  Operand c;  // written: base is the caller's writable memory
  int64_t batch, heads;
  int64_t count() const { return batch * heads; }
};

// A block of scores: `batch` matrices of `rows` x `keys` at s + t * stride (one
// per sequence and head, t = b * heads + h), row r at stride ld, row r being
// query i0 + r. lse and delta of that row are at lse[t * lse_stride + i0 + r]. A
// row sees keys j <= i0 + r; the rest of it is written 0 by the row passes and
// otherwise never read.
struct ScoreBlock {
  float* s;
  int64_t ld, stride, batch, rows, keys, i0, lse_stride;
};

class Engine {
 public:
  virtual ~Engine() = default;
  virtual absl::Status Gemm(const BatchedGemm& g) = 0;
  // In place: s = softmax(scale s) over each row's visible keys (kmath::AttentionProb
  // of the row's log-sum-exp), and that log-sum-exp to lse.
  virtual absl::Status SoftmaxRows(const ScoreBlock& blk, float scale, float* lse) = 0;
  // In place: s = P = exp(scale s - lse), dp = dS = P (dp - delta) (kmath::AttentionScoreGrad).
  virtual absl::Status SoftmaxBackwardRows(const ScoreBlock& blk, float* dp, float scale, const float* lse,
                                           const float* delta) = 0;
  // delta[(b * heads + h) * seq + i] = out[b, i, h] . dout[b, i, h].
  virtual absl::Status DeltaRows(const Shape& sh, const float* out, const float* dout, float* delta) = 0;
  // p[0, n) = 0.
  virtual absl::Status Zero(float* p, int64_t n) = 0;
};

// Forward; `work` holds WorkspaceFloats(sh, chunk, false) floats.
absl::Status Forward(Engine& e, const Shape& sh, const float* q, const float* k, const float* v, float scale,
                     float* out, float* lse, float* work, int64_t chunk);
// Backward; `delta` holds batch * heads * seq floats, `work`
// WorkspaceFloats(sh, chunk, true). dq, dk and dv are overwritten.
absl::Status Backward(Engine& e, const Shape& sh, const float* q, const float* k, const float* v,
                      const float* out, const float* lse, float scale, const float* dout, float* dq,
                      float* dk, float* dv, float* delta, float* work, int64_t chunk);

}  // namespace moe::attn

#endif  // MOE_RUNTIME_CORE_ATTENTION_GEMM_H_
