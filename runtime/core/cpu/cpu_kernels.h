// The CPU Kernels table (internal). Methods are defined by topic in
// cpu_gemm.cc, cpu_elementwise.cc, cpu_nn.cc and cpu_router.cc; each wraps its loop in
// AsCpu(stream).Run(...), capturing tensor handles by value (they keep the
// storage alive until the work has run) and copying host spans.
#ifndef MOE_RUNTIME_CORE_CPU_CPU_KERNELS_H_
#define MOE_RUNTIME_CORE_CPU_CPU_KERNELS_H_

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "runtime/core/cpu/cpu_backend.h"
#include "runtime/core/kernels.h"

namespace moe::cpu {

// Hot loops are built for AVX-512, AVX2+FMA and baseline x86-64 and chosen at load
// time (GCC function multi-versioning); elsewhere they build once for the target.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MOE_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MOE_CPU_CLONES
#endif

// Matrix view helpers (ops.h "matrix view").
inline int64_t Cols(const Tensor& t) { return t.rank() == 0 ? 1 : t.size(-1); }
inline int64_t LeadRows(const Tensor& t) {
  int64_t r = 1;
  for (int i = 0; i + 1 < t.rank(); ++i) r *= t.size(i);
  return r;
}

// Items per ParallelFor chunk so that a chunk holds about kGrainWork scalar operations.
inline constexpr int64_t kGrainWork = 1 << 15;
inline int64_t GrainFor(int64_t work_per_item) {
  return std::max<int64_t>(1, kGrainWork / std::max<int64_t>(work_per_item, 1));
}

// Row-major C[m, n] = alpha * op(A) op(B) + beta * C through single-threaded
// cblas_sgemm calls on tiles of C run by the pool (cpu_gemm.cc); handles empty
// sizes (k = 0 gives C = beta * C, beta = 0 never reads C).
void Sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
           int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// One matrix of a grouped or batched GEMM (row-major, as Sgemm).
struct GemmTask {
  bool trans_a, trans_b;
  int64_t m, n, k;
  const float* a;
  int64_t lda;
  const float* b;
  int64_t ldb;
  float* c;
  int64_t ldc;
};
// Runs every tile of every task as one pool job (tasks in order, tiles in grid
// order), each C = alpha op(A) op(B) + beta C.
void RunGemmTasks(const std::vector<GemmTask>& tasks, float alpha, float beta);

// The gemm attention path (attention_gemm.h) on this backend's sgemm and row
// loops (cpu_attention_gemm.cc); called from inside the stream's work.
absl::Status GemmCausalAttention(const Tensor& q, const Tensor& k, const Tensor& v, float scale,
                                 const Tensor& out, const Tensor& lse);
absl::Status GemmCausalAttentionBackward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                                         const Tensor& lse, float scale, const Tensor& dout, const Tensor& dq,
                                         const Tensor& dk, const Tensor& dv);

// The f32 kernels (every floating tensor f32).
class CpuKernels : public Kernels {
 public:
  absl::Status Copy(S& s, T src, T dst) override;
  absl::Status Cast(S& s, T src, T dst) override;
  absl::Status Fill(S& s, T t, double value) override;
  absl::Status Gemm(S& s, T a, bool trans_a, T b, bool trans_b, T c, float alpha, float beta) override;
  absl::Status BatchedGemm(S& s, T a, bool trans_a, T b, bool trans_b, T c, float alpha, float beta) override;
  absl::Status GroupedGemm(S& s, T x, T w, bool trans_w, T y, absl::Span<const int64_t> offsets, float alpha,
                           float beta) override;
  absl::Status GroupedGemmWeightGrad(S& s, T dy, T x, T dw, absl::Span<const int64_t> offsets, float alpha,
                                     float beta) override;
  absl::Status Add(S& s, T a, T b, T out) override;
  absl::Status Axpby(S& s, float alpha, T x, float beta, T y) override;
  absl::Status Mul(S& s, T a, T b, T out) override;
  absl::Status Scale(S& s, T x, float alpha, T out) override;
  absl::Status Silu(S& s, T x, T out) override;
  absl::Status SiluBackward(S& s, T x, T dout, T dx, float alpha, float beta) override;
  absl::Status SwiGLU(S& s, T gate, T up, T out) override;
  absl::Status SwiGLUBackward(S& s, T gate, T up, T dout, T dgate, T dup) override;
  absl::Status ReduceSum(S& s, T x, T out, float alpha, float beta) override;
  absl::Status ReduceSumSquares(S& s, T x, T out, float alpha, float beta) override;
  absl::Status ReduceMax(S& s, T x, T out) override;
  absl::Status SumRows(S& s, T x, T out, float alpha, float beta) override;
  absl::Status RmsNorm(S& s, T x, T weight, float eps, T out, T rstd) override;
  absl::Status RmsNormBackward(S& s, T x, T weight, T rstd, T dout, T dx, T dweight,
                               bool accumulate_dx) override;
  absl::Status AddRmsNorm(S& s, T x, T residual, T weight, float eps, T sum, T out, T rstd) override;
  absl::Status Rope(S& s, T x, T out, double theta, int64_t position_offset) override;
  absl::Status RopeBackward(S& s, T dout, T dx, double theta, int64_t position_offset) override;
  absl::Status CausalAttention(S& s, T q, T k, T v, float scale, T out, T lse) override;
  absl::Status CausalAttentionBackward(S& s, T q, T k, T v, T out, T lse, float scale, T dout, T dq, T dk,
                                       T dv) override;
  absl::Status Softmax(S& s, T x, T out) override;
  absl::Status SoftmaxBackward(S& s, T y, T dy, T dx, float alpha, float beta) override;
  absl::Status LogSumExp(S& s, T x, T out) override;
  absl::Status CrossEntropy(S& s, T logits, T targets, T losses, T lse) override;
  absl::Status CrossEntropyBackward(S& s, T logits, T targets, T lse, T dloss, float scale,
                                    T dlogits) override;
  absl::Status TopK(S& s, T x, int k, T values, T indices) override;
  absl::Status RouterScores(S& s, T logits, T bias, T selection, const RouterChoice& choice, T scores,
                            T aux_scores, T lse, T experts, T selected) override;  // cpu_router.cc
  absl::Status RouterScoresBackward(S& s, T scores, T logits, T lse, T daux, T dscores, bool sigmoid,
                                    float z_coef, T dlogits) override;
  absl::Status GatherRows(S& s, T src, T index, T dst, T weight) override;
  absl::Status ScatterAddRows(S& s, T src, T index, T dst, T weight, ScatterMode mode, T by_row) override;
  absl::Status GatherRowDot(S& s, T a, T index, T b, T out, float alpha, float beta) override;
  absl::Status InitNormal(S& s, T t, uint64_t seed, absl::string_view name, const Shape& global_shape,
                          absl::Span<const int64_t> offsets, float std) override;
  absl::Status AdamW(S& s, T param, T grad, T exp_avg, T exp_avg_sq, T param_bf16, float grad_scale, float lr,
                     float beta1, float beta2, float eps, float weight_decay, int64_t step) override;
};

}  // namespace moe::cpu

#endif  // MOE_RUNTIME_CORE_CPU_CPU_KERNELS_H_
