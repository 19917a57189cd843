// The ops every layer above runtime/core computes with. Each call validates its
// arguments here, once (shapes, dtypes, devices; a bad call returns
// InvalidArgument naming the argument, its shape and what was expected), then
// enqueues the work on `stream` through stream.backend().kernels().
//
// Conventions
// - Every tensor must live on stream's device. Outputs are passed as
//   `const Tensor&` handles and written in place (tensor.h explains why).
// - OK means enqueued; on an inline (CPU default) stream it also means done.
//   Read results on the host only after the stream is synchronized.
// - Index tensors are i32. Floating tensors are f32 or bf16 (precision below).
// - "Matrix view": a tensor of rank >= 2 used as a matrix is [numel / last, last]
//   (leading dimensions merged), so [B, S, d] activations go straight into GEMMs.
// - alpha/beta follow BLAS: out = alpha * f(inputs) + beta * out, so backward
//   passes accumulate gradients with beta = 1. With beta = 0, `out` is never
//   read (NaNs in it do not propagate).
// - Outputs must not overlap inputs unless a function says in-place is allowed.
//
//
// Precision (train.precision, docs/design.md "Precision"). Floating tensors are
// f32 or bf16; every kernel computes in f32: it loads bf16 as f32
// (kmath::BF16ToF32), computes and accumulates in f32 (the CPU reductions in
// double), and rounds each output element ONCE, when it is stored, to the
// output's dtype (kmath::F32ToBF16, round to nearest even). So an output never
// depends on how a backend tiles its loop, and a bf16 result is the f32 result
// rounded. Which dtypes each op accepts is marked at the op:
//   [any]   each floating tensor argument may be f32 or bf16, independently;
//   [same]  the named tensors share one dtype, f32 or bf16;
//   [f32]   the named tensors are f32 only.
// f32-only tensors are the numerically sensitive ones: statistics kept for
// backward (rstd, attention lse, cross-entropy lse), losses, routing (router
// softmax, top-k, combine weights and their gradients), reduction results,
// initialisation targets (master weights) and the optimizer (AdamW: master
// weight, f32 gradient, moments). GEMM outputs may be f32 from bf16 inputs:
// that is how weight gradients accumulate into the f32 gradients (beta = 1, as
// Megatron's main_grad), and how router and LM-head logits come out in f32.
// The model's use (docs/design.md): bf16 weight copies and activations, f32
// master weights, gradients, optimizer moments, routing and losses.
// A backend without native bf16 kernels may stage bf16 operands through f32
// copies (bf16_staging.h: the CPU backend for every op, CUDA for the
// reductions and the gemm attention path); results are the same.
//
// Threads (CPU): GEMMs use OpenBLAS threads, the other ops a small pool of the
// same size; Backend::SetNumThreads / OPENBLAS_NUM_THREADS set it. Keep
// threads per rank x ranks per node <= cores.
#ifndef MOE_RUNTIME_CORE_OPS_H_
#define MOE_RUNTIME_CORE_OPS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "runtime/core/backend.h"
#include "runtime/core/kernels.h"  // AdamWTarget
#include "runtime/core/tensor.h"

namespace moe::ops {

// ---- Data movement ---------------------------------------------------------

// dst = src (same dtype and numel; shapes may differ; any dtype). Either may be on another
// device than the stream (host <-> device copies); in-place is a no-op.
absl::Status Copy(Stream& stream, const Tensor& src, const Tensor& dst);
// dst = src converted (f32 <-> bf16 round-to-nearest-even, f32 <-> f64,
// i32 <-> i64); same numel.
absl::Status Cast(Stream& stream, const Tensor& src, const Tensor& dst);
// Every element = value (f32, bf16, i32, i64 tensors).
absl::Status Fill(Stream& stream, const Tensor& t, double value);

// ---- Matrix products -------------------------------------------------------

// c = alpha * op(a) op(b) + beta * c, op(x) = x^T when trans_x. [same] a, b;
// [any] c (bf16 a, b with an f32 c: f32 output of the f32 accumulation). Matrix views:
// op(a) [M, K], op(b) [K, N], c [M, N]. Transposes cost no copy.
//   Linear forward   y[T, out] = x[T, in] W[out, in]^T:  Gemm(s, x, false, w, true, y)
//   dx[T, in]        = dy W:                              Gemm(s, dy, false, w, false, dx)
//   dW[out, in]     += dy^T x:                            Gemm(s, dy, true, x, false, dw, 1, 1)
absl::Status Gemm(Stream& stream, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
                  const Tensor& c, float alpha = 1.0f, float beta = 0.0f);

// For each batch index i: c[i] = alpha * op(a[i]) op(b[i / r]) + beta * c[i], with
// a [batch, ., .], b [batch / r, ., .] (r = a.batch / b.batch, an integer: GQA
// broadcast), c [batch, M, N]. Rank-3 tensors (or rank 4 [B, H, ., .] = batch B*H).
// Dtypes as Gemm: [same] a, b; [any] c.
absl::Status BatchedGemm(Stream& stream, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
                         const Tensor& c, float alpha = 1.0f, float beta = 0.0f);

// Grouped GEMM over E experts in ONE call. Rows of x and y are grouped by
// expert: expert e owns rows [offsets[e], offsets[e+1]) (offsets: E + 1
// non-decreasing host values, offsets[0] = 0, offsets[E] = x rows; an expert
// may own zero rows). w is [E, P, Q]. [same] x, w; [any] y.
//   trans_w = true : y_e[n_e, P] = alpha * x_e[n_e, Q] w_e^T + beta * y_e   (forward, x W^T)
//   trans_w = false: y_e[n_e, Q] = alpha * x_e[n_e, P] w_e   + beta * y_e   (backward dX)
absl::Status GroupedGemm(Stream& stream, const Tensor& x, const Tensor& w, bool trans_w, const Tensor& y,
                         absl::Span<const int64_t> offsets, float alpha = 1.0f, float beta = 0.0f);
// Weight gradient of the grouped GEMM: dw_e[P, Q] = alpha * dy_e^T x_e + beta * dw_e
// with dy [rows, P], x [rows, Q], dw [E, P, Q], same offsets. An expert with
// zero rows gets dw_e = beta * dw_e. [same] dy, x; [any] dw (f32 expert gradients
// accumulate from bf16 activations).
absl::Status GroupedGemmWeightGrad(Stream& stream, const Tensor& dy, const Tensor& x, const Tensor& dw,
                                   absl::Span<const int64_t> offsets, float alpha = 1.0f, float beta = 0.0f);

// ---- Element-wise (same shapes; out may alias an input of its dtype) ---------
// [any] for every tensor: each is loaded as f32 and the result rounded once.

absl::Status Add(Stream& stream, const Tensor& a, const Tensor& b, const Tensor& out);
// y = alpha * x + beta * y (axpy when beta = 1).
absl::Status Axpby(Stream& stream, float alpha, const Tensor& x, float beta, const Tensor& y);
absl::Status Mul(Stream& stream, const Tensor& a, const Tensor& b, const Tensor& out);
absl::Status Scale(Stream& stream, const Tensor& x, float alpha, const Tensor& out);
// silu(z) = z * sigmoid(z).
absl::Status Silu(Stream& stream, const Tensor& x, const Tensor& out);
// dx = alpha * dout * silu'(x) + beta * dx.
absl::Status SiluBackward(Stream& stream, const Tensor& x, const Tensor& dout, const Tensor& dx,
                          float alpha = 1.0f, float beta = 0.0f);
// out = silu(gate) * up.
absl::Status SwiGLU(Stream& stream, const Tensor& gate, const Tensor& up, const Tensor& out);
// dgate = dout * up * silu'(gate), dup = dout * silu(gate) (overwritten; may alias gate / up).
absl::Status SwiGLUBackward(Stream& stream, const Tensor& gate, const Tensor& up, const Tensor& dout,
                            const Tensor& dgate, const Tensor& dup);

// ---- Reductions (double accumulation on CPU) ---------------------------------
// [any] x; [f32] out.

// out (f32, 1 element) = alpha * sum(x) + beta * out.
absl::Status ReduceSum(Stream& stream, const Tensor& x, const Tensor& out, float alpha = 1.0f,
                       float beta = 0.0f);
// out (f32, 1 element) = alpha * sum(x^2) + beta * out (gradient norms).
absl::Status ReduceSumSquares(Stream& stream, const Tensor& x, const Tensor& out, float alpha = 1.0f,
                              float beta = 0.0f);
// out (f32, 1 element) = max(x); -inf for an empty x.
absl::Status ReduceMax(Stream& stream, const Tensor& x, const Tensor& out);
// Column sums of the matrix view: out[C] = alpha * sum_r x[r, :] + beta * out.
absl::Status SumRows(Stream& stream, const Tensor& x, const Tensor& out, float alpha = 1.0f,
                     float beta = 0.0f);

// ---- Normalisation, position, attention ---------------------------------------

// Rows of the matrix view x [R, d]: rstd[r] = 1 / sqrt(mean(x[r]^2) + eps),
// out[r] = x[r] * rstd[r] * weight. rstd is f32 [R] (kept for backward).
// [any] x, weight, out; [f32] rstd.
absl::Status RmsNorm(Stream& stream, const Tensor& x, const Tensor& weight, float eps, const Tensor& out,
                     const Tensor& rstd);
// dx = d/dx (overwritten unless accumulate_dx, then +=), dweight += d/dweight.
// [any] x, weight, dout, dx, dweight (f32 for a gradient); [f32] rstd.
absl::Status RmsNormBackward(Stream& stream, const Tensor& x, const Tensor& weight, const Tensor& rstd,
                             const Tensor& dout, const Tensor& dx, const Tensor& dweight,
                             bool accumulate_dx = false);
// The residual add fused with the RMSNorm after it, in one pass over memory:
// sum = x + residual, then out, rstd = RmsNorm(sum) as above. sum may alias x or
// residual (the residual stream updated in place); out and rstd overlap nothing.
// Backward is RmsNormBackward on sum (the add passes gradients through).
// [any] x, residual, weight, sum, out; [f32] rstd. out and rstd come from the
// f32 sum before it is rounded to sum's dtype (a fused kernel has it in registers).
absl::Status AddRmsNorm(Stream& stream, const Tensor& x, const Tensor& residual, const Tensor& weight,
                        float eps, const Tensor& sum, const Tensor& out, const Tensor& rstd);

// RoPE, rotate-half convention (docs/model.md), on x [B, S, num_heads, head_dim]
// (head_dim even), position of row s = position_offset + s. out may alias x.
// [same] x, out (and dout, dx below).
absl::Status Rope(Stream& stream, const Tensor& x, const Tensor& out, double theta,
                  int64_t position_offset = 0);
// dx = R^T dout (the inverse rotation); dx may alias dout.
absl::Status RopeBackward(Stream& stream, const Tensor& dout, const Tensor& dx, double theta,
                          int64_t position_offset = 0);

// Causal softmax attention with GQA, heads in place (no transposes):
//   q [B, S, H, hd], k, v [B, S, Hkv, hd] (Hkv divides H; query head j uses kv
//   head j / (H / Hkv)), out [B, S, H, hd], lse [B, H, S] (the row log-sum-exp,
//   all backward keeps: memory O(S) per row, the [S, S] probabilities are never
//   stored), scale usually 1 / sqrt(hd). With s_ij = scale * q[b,i,h] . k[b,j,h/r]:
//   lse[b,h,i] = log sum_{j <= i} exp(s_ij),
//   out[b,i,h] = sum_{j <= i} exp(s_ij - lse[b,h,i]) v[b,j,h/r].
// Only the causal half is computed (blocked, online softmax: FlashAttention-2).
// [same] q, k, v, out (and dout, dq, dk, dv in backward); [f32] lse. Scores,
// the online softmax and the P.V sums are f32 whatever the dtype.
absl::Status CausalAttention(Stream& stream, const Tensor& q, const Tensor& k, const Tensor& v, float scale,
                             const Tensor& out, const Tensor& lse);
// Gradients of CausalAttention given its out and lse and dout [B, S, H, hd]
// (the probabilities are recomputed); dq, dk, dv overwritten.
absl::Status CausalAttentionBackward(Stream& stream, const Tensor& q, const Tensor& k, const Tensor& v,
                                     const Tensor& out, const Tensor& lse, float scale, const Tensor& dout,
                                     const Tensor& dq, const Tensor& dk, const Tensor& dv);

// ---- Softmax, losses, routing ------------------------------------------------
// Routing and losses stay f32 in every precision: [f32] for every floating tensor
// of Softmax, SoftmaxBackward, LogSumExp and TopK; cross-entropy as marked.

// Row softmax of the matrix view; out may alias x.
absl::Status Softmax(Stream& stream, const Tensor& x, const Tensor& out);
// dx = y * (dy - sum(dy * y)) per row, y = softmax output; dx = alpha * that + beta * dx.
absl::Status SoftmaxBackward(Stream& stream, const Tensor& y, const Tensor& dy, const Tensor& dx,
                             float alpha = 1.0f, float beta = 0.0f);
// out[r] = log(sum_c exp(x[r, c])) (f32 [R]).
absl::Status LogSumExp(Stream& stream, const Tensor& x, const Tensor& out);

// Per-row cross-entropy: logits [T, V] (matrix view), targets i32 [T].
// losses[t] = lse[t] - logits[t, targets[t]], lse [T] kept for backward.
// [any] logits; [f32] losses, lse. A target < 0 (ignore) gives loss 0. A target >= V fails the kernel with
// InvalidArgument (returned by this call on an inline stream, else by the
// stream's Synchronize()); the same holds for out-of-range row indices below.
absl::Status CrossEntropy(Stream& stream, const Tensor& logits, const Tensor& targets, const Tensor& losses,
                          const Tensor& lse);
// dlogits[t] = scale * dloss[t] * (softmax(logits[t]) - onehot(targets[t])), with
// dloss f32 [T] or undefined (= all ones). dlogits may alias logits (same dtype).
// [any] logits, dlogits (bf16 dlogits from f32 logits: the gradient enters the
// bf16 backward); [f32] lse, dloss.
absl::Status CrossEntropyBackward(Stream& stream, const Tensor& logits, const Tensor& targets,
                                  const Tensor& lse, const Tensor& dloss, float scale, const Tensor& dlogits);

// Per row of the matrix view x [R, C]: the k largest values in descending order
// (values f32 [R, k]) and their column indices (indices i32 [R, k]). Ties go to
// the lower index first. 1 <= k <= C.
absl::Status TopK(Stream& stream, const Tensor& x, int k, const Tensor& values, const Tensor& indices);

// The MoE router's per-token work (model/router.h, docs/model.md), in one
// pass over logits [T, E] (matrix view): scores [T, E] = softmax(logits), or
// sigmoid(logits) with choice.sigmoid; lse [T] = log sum_e exp(logits) (the z
// loss's); each token's choice.top_k = k experts, best first (experts i32
// [T, k]), and their scores (selected [T, k], the combine weights' source).
// The choice: the top k of u = scores + bias (bias [E], or undefined for 0;
// descending, ties to the lower expert; a NaN u ranks last, so a row still
// names k distinct experts); with choice.group_topk > 0 (< num_groups <=
// kmath::kRouterMaxGroups, and E divisible by num_groups) only among the
// experts of the token's group_topk best of num_groups groups of E /
// num_groups consecutive experts, a group scored by the sum of its
// max(1, min(k / group_topk, E / num_groups)) best u (ties: the lower group).
// `selection` (i32 [T, k], or undefined) replaces the choice (forced routing;
// an expert may repeat; an entry outside [0, E) fails like a bad index).
// aux_scores ([T, E], or undefined; sigmoid only) = scores / their row sum
// (the aux loss's scores). [f32] every floating tensor. Row sums in double
// and kmath's exp: the backends run the same arithmetic (kmath::RouterScoresRow,
// RouterChooseRow).
absl::Status RouterScores(Stream& stream, const Tensor& logits, const Tensor& bias, const Tensor& selection,
                          const RouterChoice& choice, const Tensor& scores, const Tensor& aux_scores,
                          const Tensor& lse, const Tensor& experts, const Tensor& selected);
// The gradient through RouterScores' scores and lse: dlogits [T, E]
// (overwritten) from daux [B, E] = d loss / d q of the aux loss's scores q
// (q = scores for softmax; token t uses row t / (T / B): one row per
// sequence, B dividing T), dscores [T, E] = d loss / d scores through the
// combine weights (or undefined for 0), and d loss / d lse_t = z_coef lse_t
// (the z loss). `logits` (sigmoid only; may be undefined for softmax) gives
// the z loss's softmax. kmath::RouterScoresBackwardRow states the arithmetic.
// [f32] every tensor. dlogits may alias dscores.
absl::Status RouterScoresBackward(Stream& stream, const Tensor& scores, const Tensor& logits,
                                  const Tensor& lse, const Tensor& daux, const Tensor& dscores, bool sigmoid,
                                  float z_coef, const Tensor& dlogits);

// dst[i, :] = src[index[i], :] for i < M: src [N, d], index i32 [M] (0 <= index < N),
// dst [M, d]. Permuting tokens into expert order; embedding lookup. src and dst
// share one dtype (any dtype: rows are copied). With weight (f32 [M]),
// dst[i, :] = weight[i] * src[index[i], :] instead: [any] src, dst; the
// product in f32, rounded once into a bf16 dst (the combine's gradient to
// expert rows).
absl::Status GatherRows(Stream& stream, const Tensor& src, const Tensor& index, const Tensor& dst,
                        const Tensor& weight = Tensor());
// dst[index[i], :] += weight[i] * src[i, :] for i < M (weight f32 [M], or an
// undefined Tensor for 1): src [M, d], dst [N, d]. Repeated indices accumulate
// (deterministically, in i order). Un-permute + weighted combine; embedding backward.
// [any] src, dst; [f32] weight. A bf16 dst element is loaded once, gets all of
// this call's contributions in f32 (in i order) and is rounded once.
// ScatterMode::kOverwrite: dst = 0 first (rows no index names end up 0; dst is
// not read, so it may hold anything): bit for bit a Fill(dst, 0) and the
// scatter-add, in one kernel.
// `by_row` (i32 [N + 1 + M], optional): ScatterRowOrder(index, N), made on the
// host where the index is, so that the device need not sort the sources by
// destination (on CUDA one launch instead of a key pass, a radix sort and the
// add; on CPU destination rows in parallel). Same result bit for bit. An
// entry that does not match index fails like a bad index (InvalidArgument).
absl::Status ScatterAddRows(Stream& stream, const Tensor& src, const Tensor& index, const Tensor& dst,
                            const Tensor& weight = Tensor(), ScatterMode mode = ScatterMode::kAccumulate,
                            const Tensor& by_row = Tensor());
// Host side, for ScatterAddRows' by_row: the sources of each of the n
// destination rows of index[0, m): offsets [n + 1] (row r's sources are
// entries offsets[r] .. offsets[r + 1] of what follows), then the source
// positions i, row by row, ascending within a row (the order the add keeps).
// InvalidArgument names the first index outside [0, n).
absl::StatusOr<std::vector<int32_t>> ScatterRowOrder(absl::Span<const int32_t> index, int64_t n);
// out[i] = alpha * dot(a[index[i], :], b[i, :]) + beta * out[i]: a [N, d], b [M, d],
// out f32 [M]. The gradient of the combine weights. [any] a, b; [f32] out.
absl::Status GatherRowDot(Stream& stream, const Tensor& a, const Tensor& index, const Tensor& b,
                          const Tensor& out, float alpha = 1.0f, float beta = 0.0f);

// ---- Initialisation ----------------------------------------------------------

// Fills `t`, a box of a larger (global) tensor, with Normal(0, std) values that
// depend only on (seed, name, global index) (docs/design.md invariant 2): the global
// tensor has shape `global_shape`; t covers [offsets[d], offsets[d] + t.size(d))
// in every dimension d (t.rank() == global_shape.rank()); the global index of
// an element is its row-major index in global_shape. Generator: Philox4x32-10
// (rng.h): key = PhiloxKeyFromName(name), counter = {index lo, index hi,
// seed lo, seed hi}; the first two words give a Box-Muller normal. [f32] t
// (master weights; bf16 copies are made with Cast).
absl::Status InitNormal(Stream& stream, const Tensor& t, uint64_t seed, absl::string_view name,
                        const Shape& global_shape, absl::Span<const int64_t> offsets, float std);
// The whole tensor is the global tensor (offsets all 0).
absl::Status InitNormal(Stream& stream, const Tensor& t, uint64_t seed, absl::string_view name, float std);

// ---- Optimizer ----------------------------------------------------------------

// One AdamW step (decoupled weight decay), element-wise over same-shape f32
// tensors ([f32]: master weight, f32 gradient, moments), step >= 1 (bias
// correction uses it):
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   p -= lr * (m / (1 - b1^step) / (sqrt(v / (1 - b2^step)) + eps) + weight_decay * p)
// `param_bf16`, when defined (bf16, param's element count, not overlapping
// the others), also receives the updated p rounded to bf16 in the same pass:
// the mixed-precision compute copy (parallel::Parameter::compute), equal bit
// for bit to a Cast of the updated param, without that Cast's second read of
// the master. `grad_scale` (finite) multiplies each gradient element as it is
// read, g = grad_scale * grad (the clipping coefficient, optim/clip.h), the
// gradient itself unchanged: bit for bit a Scale of grad before the step.
absl::Status AdamW(Stream& stream, const Tensor& param, const Tensor& grad, const Tensor& exp_avg,
                   const Tensor& exp_avg_sq, float lr, float beta1, float beta2, float eps,
                   float weight_decay, int64_t step, const Tensor& param_bf16 = Tensor(),
                   float grad_scale = 1.0f);

// ---- List forms ----------------------------------------------------------------
// The one-tensor op on each element of a list, bit for bit, in as few
// launches as the backend can: a GPU pays a fixed cost per launch, and a
// training step has a gradient, a norm term and an update per parameter
// (hundreds at 16 layers). The optimizer, the gradient norm and
// Model::ZeroGrads use these. The elements must not overlap each other (nor,
// for ReduceSumSquares, `out`).

// Fill on each tensor of `ts` (not u8).
absl::Status Fill(Stream& stream, absl::Span<const Tensor> ts, double value);
// out[i] = the sum of squares of xs[i] ([f32] out of xs.size() elements; xs [any]).
absl::Status ReduceSumSquares(Stream& stream, absl::Span<const Tensor> xs, const Tensor& out);
// AdamW on each target (kernels.h AdamWTarget: its tensors as AdamW's, and
// its own weight decay), with one lr, betas, eps, step and grad_scale.
absl::Status AdamW(Stream& stream, absl::Span<const AdamWTarget> targets, float lr, float beta1, float beta2,
                   float eps, int64_t step, float grad_scale = 1.0f);

}  // namespace moe::ops

#endif  // MOE_RUNTIME_CORE_OPS_H_
