// The backend implementers' interface behind ops.h: one virtual per op. ops.cc
// validates every argument, then calls stream.backend().kernels().<Op>(...) with
// the same arguments, so a backend may assume shapes, dtypes and devices are
// consistent (ops.h states them). A kernel returns OK once the work is
// enqueued on `stream`; errors found while running (an index out of range)
// are returned directly on an inline stream, else kept for Synchronize().
// A backend that lacks an op answers SupportsOp() false; ops.cc then returns
// Unimplemented naming the op and the backend without calling the kernel.
#ifndef MOE_RUNTIME_CORE_KERNELS_H_
#define MOE_RUNTIME_CORE_KERNELS_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "runtime/core/backend.h"
#include "runtime/core/tensor.h"

namespace moe {

// One parameter's tensors for the AdamW step over a list (ops.h AdamW over
// targets): param_bf16 may be undefined; weight_decay is the parameter's own.
struct AdamWTarget {
  Tensor param, grad, exp_avg, exp_avg_sq, param_bf16;
  float weight_decay = 0;
};

// The error of a ScatterAddRows whose by_row (ops.h) does not match its
// index: `entry` of by_row holds `value` (every backend says the same).
absl::Status ByRowMismatch(const char* op, int64_t entry, int64_t value);

// What ScatterAddRows does with dst (ops.h): add into it, or start every
// destination row from 0 (dst is not read: one launch where a fill and a
// scatter-add were two).
enum class ScatterMode : uint8_t { kAccumulate, kOverwrite };

// How ops::RouterScores scores and chooses (ops.h): sigmoid or softmax
// scores, top_k experts per token, and group-limited routing when
// group_topk > 0 (num_groups groups, at most kmath::kRouterMaxGroups).
struct RouterChoice {
  bool sigmoid = false;
  int top_k = 1;
  int64_t num_groups = 1;
  int group_topk = 0;
};

class Kernels {
 public:
  virtual ~Kernels() = default;
  using S = Stream;
  using T = const Tensor&;

  virtual absl::Status Copy(S& s, T src, T dst) = 0;
  virtual absl::Status Cast(S& s, T src, T dst) = 0;
  virtual absl::Status Fill(S& s, T t, double value) = 0;
  virtual absl::Status Gemm(S& s, T a, bool trans_a, T b, bool trans_b, T c, float alpha, float beta) = 0;
  virtual absl::Status BatchedGemm(S& s, T a, bool trans_a, T b, bool trans_b, T c, float alpha,
                                   float beta) = 0;
  virtual absl::Status GroupedGemm(S& s, T x, T w, bool trans_w, T y, absl::Span<const int64_t> offsets,
                                   float alpha, float beta) = 0;
  virtual absl::Status GroupedGemmWeightGrad(S& s, T dy, T x, T dw, absl::Span<const int64_t> offsets,
                                             float alpha, float beta) = 0;
  virtual absl::Status Add(S& s, T a, T b, T out) = 0;
  virtual absl::Status Axpby(S& s, float alpha, T x, float beta, T y) = 0;
  virtual absl::Status Mul(S& s, T a, T b, T out) = 0;
  virtual absl::Status Scale(S& s, T x, float alpha, T out) = 0;
  virtual absl::Status Silu(S& s, T x, T out) = 0;
  virtual absl::Status SiluBackward(S& s, T x, T dout, T dx, float alpha, float beta) = 0;
  virtual absl::Status SwiGLU(S& s, T gate, T up, T out) = 0;
  virtual absl::Status SwiGLUBackward(S& s, T gate, T up, T dout, T dgate, T dup) = 0;
  virtual absl::Status ReduceSum(S& s, T x, T out, float alpha, float beta) = 0;
  virtual absl::Status ReduceSumSquares(S& s, T x, T out, float alpha, float beta) = 0;
  virtual absl::Status ReduceMax(S& s, T x, T out) = 0;
  virtual absl::Status SumRows(S& s, T x, T out, float alpha, float beta) = 0;
  virtual absl::Status RmsNorm(S& s, T x, T weight, float eps, T out, T rstd) = 0;
  virtual absl::Status RmsNormBackward(S& s, T x, T weight, T rstd, T dout, T dx, T dweight,
                                       bool accumulate_dx) = 0;
  virtual absl::Status AddRmsNorm(S& s, T x, T residual, T weight, float eps, T sum, T out, T rstd) = 0;
  virtual absl::Status Rope(S& s, T x, T out, double theta, int64_t position_offset) = 0;
  virtual absl::Status RopeBackward(S& s, T dout, T dx, double theta, int64_t position_offset) = 0;
  virtual absl::Status CausalAttention(S& s, T q, T k, T v, float scale, T out, T lse) = 0;
  virtual absl::Status CausalAttentionBackward(S& s, T q, T k, T v, T out, T lse, float scale, T dout, T dq,
                                               T dk, T dv) = 0;
  virtual absl::Status Softmax(S& s, T x, T out) = 0;
  virtual absl::Status SoftmaxBackward(S& s, T y, T dy, T dx, float alpha, float beta) = 0;
  virtual absl::Status LogSumExp(S& s, T x, T out) = 0;
  virtual absl::Status CrossEntropy(S& s, T logits, T targets, T losses, T lse) = 0;
  virtual absl::Status CrossEntropyBackward(S& s, T logits, T targets, T lse, T dloss, float scale,
                                            T dlogits) = 0;
  virtual absl::Status TopK(S& s, T x, int k, T values, T indices) = 0;
  // bias, selection and aux_scores may be undefined (ops.h RouterScores).
  virtual absl::Status RouterScores(S& s, T logits, T bias, T selection, const RouterChoice& choice, T scores,
                                    T aux_scores, T lse, T experts, T selected) = 0;
  // logits (softmax) and dscores may be undefined (ops.h RouterScoresBackward).
  virtual absl::Status RouterScoresBackward(S& s, T scores, T logits, T lse, T daux, T dscores, bool sigmoid,
                                            float z_coef, T dlogits) = 0;
  virtual absl::Status GatherRows(S& s, T src, T index, T dst, T weight) = 0;
  // by_row may be undefined (ops.h ScatterAddRows).
  virtual absl::Status ScatterAddRows(S& s, T src, T index, T dst, T weight, ScatterMode mode, T by_row) = 0;
  virtual absl::Status GatherRowDot(S& s, T a, T index, T b, T out, float alpha, float beta) = 0;
  virtual absl::Status InitNormal(S& s, T t, uint64_t seed, absl::string_view name, const Shape& global_shape,
                                  absl::Span<const int64_t> offsets, float std) = 0;
  // param_bf16 may be undefined (ops.h AdamW).
  virtual absl::Status AdamW(S& s, T param, T grad, T exp_avg, T exp_avg_sq, T param_bf16, float grad_scale,
                             float lr, float beta1, float beta2, float eps, float weight_decay,
                             int64_t step) = 0;

  // The list forms (ops.h): the same work as the one-tensor op on each
  // element, so the same results bit for bit; a backend whose launches cost
  // (a GPU) overrides them to do the whole list in a few launches. These
  // defaults (kernels.cc) call the one-tensor op for each element in order.
  virtual absl::Status FillMany(S& s, absl::Span<const Tensor> ts, double value);
  // out[i] = the sum of squares of xs[i] (out: f32 [xs.size()]).
  virtual absl::Status ReduceSumSquaresMany(S& s, absl::Span<const Tensor> xs, T out);
  virtual absl::Status AdamWMany(S& s, absl::Span<const AdamWTarget> targets, float grad_scale, float lr,
                                 float beta1, float beta2, float eps, int64_t step);
};

}  // namespace moe

#endif  // MOE_RUNTIME_CORE_KERNELS_H_
