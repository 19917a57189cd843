// The CUDA Kernels table: unpacks Tensors and the Stream, then calls the host
// launchers of cuda_kernels.h (one .cu per op family) or cuBLAS (cuda_gemm.cc).
// ops.cc has validated shapes, dtypes and devices; limits of these kernels
// that the CPU backend does not have (attention sequence length and head
// size) are checked here and named in the error.
#include "runtime/core/cuda/cuda_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/strings/str_cat.h"
#include "runtime/core/attention_gemm.h"
#include "runtime/core/cuda/cuda_backend.h"
#include "runtime/core/cuda/cuda_check.h"
#include "runtime/core/cuda/cuda_gemm.h"
#include "runtime/core/kernels.h"
#include "runtime/core/rng.h"

namespace moe::cuda {
namespace {

int64_t LeadRows(const Tensor& t) { return t.rank() <= 1 ? 1 : t.numel() / std::max<int64_t>(t.size(-1), 1); }
int64_t Cols(const Tensor& t) { return t.rank() == 0 ? 1 : t.size(-1); }

template <typename P = float>
P* Ptr(const Tensor& t) {
  return static_cast<P*>(t.raw_data());
}

absl::StatusOr<ElemType> Elem(DType t) {
  switch (t) {
    case DType::kF32:
      return ElemType::kF32;
    case DType::kBF16:
      return ElemType::kBF16;
    case DType::kI32:
      return ElemType::kI32;
    case DType::kI64:
      return ElemType::kI64;
    case DType::kF64:
      return ElemType::kF64;
    default:
      return absl::InvalidArgumentError(absl::StrCat("cuda: no element kernel for dtype ", DTypeName(t)));
  }
}

#define LAUNCH(call) CUDA_RETURN_IF_ERROR(call)

// An operand of the arithmetic element-wise kernels: f32 or bf16 (their
// launchers widen and round; cuda_kernels.h ElemIn). Other dtypes are refused
// naming the op (ops.cc admits only these two).
absl::StatusOr<ElemType> FloatElem(const char* op, const Tensor& t) {
  if (t.dtype() == DType::kF32) return ElemType::kF32;
  if (t.dtype() == DType::kBF16) return ElemType::kBF16;
  return absl::InvalidArgumentError(
      absl::StrCat("cuda ", op, ": ", t.ToString(), " is neither f32 nor bf16"));
}
absl::StatusOr<ElemIn> In(const char* op, const Tensor& t) {
  ASSIGN_OR_RETURN(ElemType e, FloatElem(op, t));
  return ElemIn{t.raw_data(), e};
}
absl::StatusOr<ElemOut> Out(const char* op, const Tensor& t) {
  ASSIGN_OR_RETURN(ElemType e, FloatElem(op, t));
  return ElemOut{t.raw_data(), e};
}

// The reduction, softmax and routing kernels, and attention on the gemm path,
// are f32: the backend wraps this table in the bf16 staging decorator
// (bf16_staging.h), which hands them f32 copies of bf16 operands. A bf16
// tensor that still reaches one (this table used without the decorator) is refused naming the
// op, rather than read as f32. GEMMs, Copy, Cast, Fill, GatherRows, the
// arithmetic element-wise ops (Add ... SwiGLUBackward), the norms, RoPE,
// the cross-entropy's logits, the row scatter-add and dot, and attention on
// the fused and flash kernels take bf16 (In / Out above).
absl::Status F32Only(const char* op, std::initializer_list<const Tensor*> tensors) {
  for (const Tensor* t : tensors)
    if (t->defined() && t->dtype() == DType::kBF16)
      return absl::UnimplementedError(absl::StrCat("cuda ", op, ": ", t->ToString(),
                                                   ": this CUDA kernel is f32 only; bf16 operands "
                                                   "go through the bf16 staging decorator (bf16_staging.h)"));
  return absl::OkStatus();
}

// Runs `launch` with a device scratch block of `bytes` (null when 0), released
// stream-ordered right after the enqueue (the allocator hands it out again
// only once the stream has passed the launch: cuda_backend.h).
absl::Status LaunchWithScratch(Stream& s, size_t bytes, absl::FunctionRef<cudaError_t(void*)> launch) {
  void* scratch = nullptr;
  if (bytes > 0) {
    ASSIGN_OR_RETURN(scratch, ScratchAlloc(s, bytes));
  }
  const cudaError_t e = launch(scratch);
  if (scratch != nullptr) ScratchFree(s, scratch);
  CUDA_RETURN_IF_ERROR(e);
  return absl::OkStatus();
}

AttentionShape ShapeOf(const Tensor& q, const Tensor& k) {
  return AttentionShape{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
}
// The attention backward's delta scratch: one f32 per row of lse [B, H, S].
size_t DeltaBytes(const Tensor& lse) { return static_cast<size_t>(lse.numel()) * sizeof(float); }

class CudaKernels : public Kernels {
 public:
  absl::Status Copy(S& s, T src, T dst) override {
    if (src.raw_data() == dst.raw_data() || src.nbytes() == 0) return absl::OkStatus();
    // Host <-> device or device <-> device; a pageable host destination makes the call wait.
    CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(dst.raw_data(), src.raw_data(), src.nbytes(), cudaMemcpyDefault, NativeStream(s)));
    return absl::OkStatus();
  }
  absl::Status Cast(S& s, T src, T dst) override {
    ASSIGN_OR_RETURN(ElemType a, Elem(src.dtype()));
    ASSIGN_OR_RETURN(ElemType b, Elem(dst.dtype()));
    LAUNCH(LaunchCast(src.raw_data(), a, dst.raw_data(), b, src.numel(), NativeStream(s)));
    return absl::OkStatus();
  }
  absl::Status Fill(S& s, T t, double value) override {
    ASSIGN_OR_RETURN(ElemType e, Elem(t.dtype()));
    LAUNCH(LaunchFill(t.raw_data(), e, t.numel(), value, NativeStream(s)));
    return absl::OkStatus();
  }
  absl::Status Gemm(S& s, T a, bool ta, T b, bool tb, T c, float alpha, float beta) override {
    return cuda::Gemm(s, a, ta, b, tb, c, alpha, beta);
  }
  absl::Status BatchedGemm(S& s, T a, bool ta, T b, bool tb, T c, float alpha, float beta) override {
    return cuda::BatchedGemm(s, a, ta, b, tb, c, alpha, beta);
  }
  absl::Status GroupedGemm(S& s, T x, T w, bool trans_w, T y, absl::Span<const int64_t> offsets, float alpha,
                           float beta) override {
    return cuda::GroupedGemm(s, x, w, trans_w, y, offsets, alpha, beta);
  }
  absl::Status GroupedGemmWeightGrad(S& s, T dy, T x, T dw, absl::Span<const int64_t> offsets, float alpha,
                                     float beta) override {
    return cuda::GroupedGemmWeightGrad(s, dy, x, dw, offsets, alpha, beta);
  }
  // The arithmetic element-wise ops take f32 and bf16 operands natively (the
  // bf16 staging decorator passes them through: Bf16StagingOptions).
  absl::Status Add(S& s, T a, T b, T out) override {
    ASSIGN_OR_RETURN(const ElemIn ea, In("Add", a));
    ASSIGN_OR_RETURN(const ElemIn eb, In("Add", b));
    ASSIGN_OR_RETURN(const ElemOut eo, Out("Add", out));
    LAUNCH(LaunchAdd(ea, eb, eo, out.numel(), NativeStream(s)));
    return absl::OkStatus();
  }
  absl::Status Axpby(S& s, float alpha, T x, float beta, T y) override {
    ASSIGN_OR_RETURN(const ElemIn ex, In("Axpby", x));
    ASSIGN_OR_RETURN(const ElemOut ey, Out("Axpby", y));
    LAUNCH(LaunchAxpby(alpha, ex, beta, ey, y.numel(), NativeStream(s)));
    return absl::OkStatus();
  }
  absl::Status Mul(S& s, T a, T b, T out) override {
    ASSIGN_OR_RETURN(const ElemIn ea, In("Mul", a));
    ASSIGN_OR_RETURN(const ElemIn eb, In("Mul", b));
    ASSIGN_OR_RETURN(const ElemOut eo, Out("Mul", out));
    LAUNCH(LaunchMul(ea, eb, eo, out.numel(), NativeStream(s)));
    return absl::OkStatus();
  }
  absl::Status Scale(S& s, T x, float alpha, T out) override {
    ASSIGN_OR_RETURN(const ElemIn ex, In("Scale", x));
    ASSIGN_OR_RETURN(const ElemOut eo, Out("Scale", out));
    LAUNCH(LaunchScale(ex, alpha, eo, out.numel(), NativeStream(s)));
    return absl::OkStatus();
  }
  absl::Status Silu(S& s, T x, T out) override {
    ASSIGN_OR_RETURN(const ElemIn ex, In("Silu", x));
    ASSIGN_OR_RETURN(const ElemOut eo, Out("Silu", out));
    LAUNCH(LaunchSilu(ex, eo, out.numel(), NativeStream(s)));
    return absl::OkStatus();
  }
  absl::Status SiluBackward(S& s, T x, T dout, T dx, float alpha, float beta) override {
    ASSIGN_OR_RETURN(const ElemIn ex, In("SiluBackward", x));
    ASSIGN_OR_RETURN(const ElemIn ed, In("SiluBackward", dout));
    ASSIGN_OR_RETURN(const ElemOut edx, Out("SiluBackward", dx));
    LAUNCH(LaunchSiluBackward(ex, ed, edx, alpha, beta, dx.numel(), NativeStream(s)));
    return absl::OkStatus();
  }
  absl::Status SwiGLU(S& s, T gate, T up, T out) override {
    ASSIGN_OR_RETURN(const ElemIn eg, In("SwiGLU", gate));
    ASSIGN_OR_RETURN(const ElemIn eu, In("SwiGLU", up));
    ASSIGN_OR_RETURN(const ElemOut eo, Out("SwiGLU", out));
    LAUNCH(LaunchSwiGLU(eg, eu, eo, out.numel(), NativeStream(s)));
    return absl::OkStatus();
  }
  absl::Status SwiGLUBackward(S& s, T gate, T up, T dout, T dgate, T dup) override {
    ASSIGN_OR_RETURN(const ElemIn eg, In("SwiGLUBackward", gate));
    ASSIGN_OR_RETURN(const ElemIn eu, In("SwiGLUBackward", up));
    ASSIGN_OR_RETURN(const ElemIn ed, In("SwiGLUBackward", dout));
    ASSIGN_OR_RETURN(const ElemOut edg, Out("SwiGLUBackward", dgate));
    ASSIGN_OR_RETURN(const ElemOut edu, Out("SwiGLUBackward", dup));
    LAUNCH(LaunchSwiGLUBackward(eg, eu, ed, edg, edu, gate.numel(), NativeStream(s)));
    return absl::OkStatus();
  }
  absl::Status ReduceSum(S& s, T x, T out, float alpha, float beta) override {
    RETURN_IF_ERROR(F32Only("ReduceSum", {&x, &out}));
    return LaunchWithScratch(s, ReduceScratchBytes(x.numel()), [&](void* scratch) {
      return LaunchReduce(Ptr(x), x.numel(), ReduceKind::kSum, Ptr(out), alpha, beta, scratch,
                          NativeStream(s));
    });
  }
  absl::Status ReduceSumSquares(S& s, T x, T out, float alpha, float beta) override {
    RETURN_IF_ERROR(F32Only("ReduceSumSquares", {&x, &out}));
    return LaunchWithScratch(s, ReduceScratchBytes(x.numel()), [&](void* scratch) {
      return LaunchReduce(Ptr(x), x.numel(), ReduceKind::kSumSquares, Ptr(out), alpha, beta, scratch,
                          NativeStream(s));
    });
  }
  absl::Status ReduceMax(S& s, T x, T out) override {
    RETURN_IF_ERROR(F32Only("ReduceMax", {&x, &out}));
    return LaunchWithScratch(s, ReduceScratchBytes(x.numel()), [&](void* scratch) {
      return LaunchReduce(Ptr(x), x.numel(), ReduceKind::kMax, Ptr(out), 1.0f, 0.0f, scratch,
                          NativeStream(s));
    });
  }
  absl::Status SumRows(S& s, T x, T out, float alpha, float beta) override {
    RETURN_IF_ERROR(F32Only("SumRows", {&x, &out}));
    return LaunchWithScratch(s, ColumnSumScratchBytes(LeadRows(x), Cols(x)), [&](void* scratch) {
      return LaunchSumRows(Ptr(x), LeadRows(x), Cols(x), Ptr(out), alpha, beta, scratch, NativeStream(s));
    });
  }
  // Norm and RoPE: activations and weight f32 or bf16 natively (the bf16
  // staging decorator passes them through: Bf16StagingOptions::stage_rows).
  absl::Status RmsNorm(S& s, T x, T weight, float eps, T out, T rstd) override {
    ASSIGN_OR_RETURN(const ElemIn ex, In("RmsNorm", x));
    ASSIGN_OR_RETURN(const ElemIn ew, In("RmsNorm", weight));
    ASSIGN_OR_RETURN(const ElemOut eo, Out("RmsNorm", out));
    LAUNCH(LaunchRmsNorm(ex, ElemIn{nullptr, ElemType::kF32}, ElemOut{nullptr, ElemType::kF32}, ew, eps, eo,
                         Ptr(rstd), LeadRows(x), Cols(x), NativeStream(s)));
    return absl::OkStatus();
  }
  absl::Status RmsNormBackward(S& s, T x, T weight, T rstd, T dout, T dx, T dweight,
                               bool accumulate_dx) override {
    const char* op = "RmsNormBackward";
    ASSIGN_OR_RETURN(const ElemIn ex, In(op, x));
    ASSIGN_OR_RETURN(const ElemIn ew, In(op, weight));
    ASSIGN_OR_RETURN(const ElemIn ed, In(op, dout));
    ASSIGN_OR_RETURN(const ElemOut edx, Out(op, dx));
    ASSIGN_OR_RETURN(const ElemOut edw, Out(op, dweight));
    return LaunchWithScratch(s, ColumnSumScratchBytes(LeadRows(x), Cols(x)), [&](void* scratch) {
      return LaunchRmsNormBackward(ex, ew, Ptr(rstd), ed, edx, edw, accumulate_dx, LeadRows(x), Cols(x),
                                   scratch, NativeStream(s));
    });
  }
  absl::Status AddRmsNorm(S& s, T x, T residual, T weight, float eps, T sum, T out, T rstd) override {
    const char* op = "AddRmsNorm";
    ASSIGN_OR_RETURN(const ElemIn ex, In(op, x));
    ASSIGN_OR_RETURN(const ElemIn er, In(op, residual));
    ASSIGN_OR_RETURN(const ElemIn ew, In(op, weight));
    ASSIGN_OR_RETURN(const ElemOut es, Out(op, sum));
    ASSIGN_OR_RETURN(const ElemOut eo, Out(op, out));
    LAUNCH(LaunchRmsNorm(ex, er, es, ew, eps, eo, Ptr(rstd), LeadRows(x), Cols(x), NativeStream(s)));
    return absl::OkStatus();
  }
  absl::Status Rope(S& s, T x, T out, double theta, int64_t position_offset) override {
    ASSIGN_OR_RETURN(const ElemIn ex, In("Rope", x));
    ASSIGN_OR_RETURN(const ElemOut eo, Out("Rope", out));
    LAUNCH(LaunchRope(ex, eo, x.size(0), x.size(1), x.size(2), x.size(3), theta, position_offset,
                      /*inverse=*/false, NativeStream(s)));
    return absl::OkStatus();
  }
  absl::Status RopeBackward(S& s, T dout, T dx, double theta, int64_t position_offset) override {
    ASSIGN_OR_RETURN(const ElemIn ed, In("RopeBackward", dout));
    ASSIGN_OR_RETURN(const ElemOut edx, Out("RopeBackward", dx));
    LAUNCH(LaunchRope(ed, edx, dout.size(0), dout.size(1), dout.size(2), dout.size(3), theta, position_offset,
                      /*inverse=*/true, NativeStream(s)));
    return absl::OkStatus();
  }
  absl::Status CausalAttention(S& s, T q, T k, T v, float scale, T out, T lse) override {
    if (FlashAttentionTakes({&q, &k, &v, &out})) {
      LAUNCH(LaunchFlashAttentionForward(Ptr<uint16_t>(q), Ptr<uint16_t>(k), Ptr<uint16_t>(v), scale,
                                         Ptr<uint16_t>(out), Ptr(lse), ShapeOf(q, k), NativeStream(s)));
      return absl::OkStatus();
    }
    if (GemmAttention()) {
      RETURN_IF_ERROR(F32Only("CausalAttention", {&q, &k, &v, &out, &lse}));
      return GemmCausalAttention(s, q, k, v, scale, out, lse);
    }
    // The fused kernels: f32 or bf16 operands (ops.h: all one dtype), lse f32.
    RETURN_IF_ERROR(F32Only("CausalAttention", {&lse}));
    ASSIGN_OR_RETURN(AttentionShape sh, Shape(q, k, "CausalAttention"));
    ASSIGN_OR_RETURN(const ElemIn eq, In("CausalAttention", q));
    ASSIGN_OR_RETURN(const ElemIn ek, In("CausalAttention", k));
    ASSIGN_OR_RETURN(const ElemIn ev, In("CausalAttention", v));
    ASSIGN_OR_RETURN(const ElemOut eo, Out("CausalAttention", out));
    LAUNCH(LaunchAttentionForward(eq, ek, ev, scale, eo, Ptr(lse), sh, NativeStream(s)));
    return absl::OkStatus();
  }
  absl::Status CausalAttentionBackward(S& s, T q, T k, T v, T out, T lse, float scale, T dout, T dq, T dk,
                                       T dv) override {
    if (FlashAttentionTakes({&q, &k, &v, &out, &dout, &dq, &dk, &dv})) {
      return LaunchWithScratch(s, DeltaBytes(lse), [&](void* delta) {
        return LaunchFlashAttentionBackward(Ptr<uint16_t>(q), Ptr<uint16_t>(k), Ptr<uint16_t>(v),
                                            Ptr<uint16_t>(out), Ptr(lse), scale, Ptr<uint16_t>(dout),
                                            Ptr<uint16_t>(dq), Ptr<uint16_t>(dk), Ptr<uint16_t>(dv),
                                            static_cast<float*>(delta), ShapeOf(q, k), NativeStream(s));
      });
    }
    if (GemmAttention()) {
      RETURN_IF_ERROR(F32Only("CausalAttentionBackward", {&q, &k, &v, &out, &lse, &dout, &dq, &dk, &dv}));
      return GemmCausalAttentionBackward(s, q, k, v, out, lse, scale, dout, dq, dk, dv);
    }
    const char* op = "CausalAttentionBackward";
    RETURN_IF_ERROR(F32Only(op, {&lse}));
    ASSIGN_OR_RETURN(AttentionShape sh, Shape(q, k, op));
    ASSIGN_OR_RETURN(const ElemIn eq, In(op, q));
    ASSIGN_OR_RETURN(const ElemIn ek, In(op, k));
    ASSIGN_OR_RETURN(const ElemIn ev, In(op, v));
    ASSIGN_OR_RETURN(const ElemIn eo, In(op, out));
    ASSIGN_OR_RETURN(const ElemIn edo, In(op, dout));
    ASSIGN_OR_RETURN(const ElemOut edq, Out(op, dq));
    ASSIGN_OR_RETURN(const ElemOut edk, Out(op, dk));
    ASSIGN_OR_RETURN(const ElemOut edv, Out(op, dv));
    return LaunchWithScratch(s, DeltaBytes(lse), [&](void* delta) {
      return LaunchAttentionBackward(eq, ek, ev, eo, Ptr(lse), scale, edo, edq, edk, edv,
                                     static_cast<float*>(delta), sh, NativeStream(s));
    });
  }
  absl::Status Softmax(S& s, T x, T out) override {
    RETURN_IF_ERROR(F32Only("Softmax", {&x, &out}));
    LAUNCH(LaunchSoftmax(Ptr(x), Ptr(out), LeadRows(x), Cols(x), NativeStream(s)));
    return absl::OkStatus();
  }
  absl::Status SoftmaxBackward(S& s, T y, T dy, T dx, float alpha, float beta) override {
    RETURN_IF_ERROR(F32Only("SoftmaxBackward", {&y, &dy, &dx}));
    LAUNCH(
        LaunchSoftmaxBackward(Ptr(y), Ptr(dy), Ptr(dx), alpha, beta, LeadRows(y), Cols(y), NativeStream(s)));
    return absl::OkStatus();
  }
  absl::Status LogSumExp(S& s, T x, T out) override {
    RETURN_IF_ERROR(F32Only("LogSumExp", {&x, &out}));
    LAUNCH(LaunchLogSumExp(Ptr(x), Ptr(out), LeadRows(x), Cols(x), NativeStream(s)));
    return absl::OkStatus();
  }
  // The cross-entropy's logits and dlogits: f32 or bf16 natively (stage_rows).
  absl::Status CrossEntropy(S& s, T logits, T targets, T losses, T lse) override {
    ASSIGN_OR_RETURN(const ElemIn el, In("CrossEntropy", logits));
    LAUNCH(LaunchCrossEntropy(el, Ptr<int32_t>(targets), Ptr(losses), Ptr(lse), LeadRows(logits),
                              Cols(logits), DeviceErrorRecord(s), static_cast<int>(OpKind::kCrossEntropy),
                              NativeStream(s)));
    return absl::OkStatus();
  }
  absl::Status CrossEntropyBackward(S& s, T logits, T targets, T lse, T dloss, float scale,
                                    T dlogits) override {
    const char* op = "CrossEntropyBackward";
    ASSIGN_OR_RETURN(const ElemIn el, In(op, logits));
    ASSIGN_OR_RETURN(const ElemOut ed, Out(op, dlogits));
    LAUNCH(LaunchCrossEntropyBackward(el, Ptr<int32_t>(targets), Ptr(lse),
                                      dloss.defined() ? Ptr(dloss) : nullptr, scale, ed, LeadRows(logits),
                                      Cols(logits), DeviceErrorRecord(s),
                                      static_cast<int>(OpKind::kCrossEntropyBackward), NativeStream(s)));
    return absl::OkStatus();
  }
  absl::Status TopK(S& s, T x, int k, T values, T indices) override {
    RETURN_IF_ERROR(F32Only("TopK", {&x, &values, &indices}));
    LAUNCH(LaunchTopK(Ptr(x), k, Ptr(values), Ptr<int32_t>(indices), LeadRows(x), Cols(x), NativeStream(s)));
    return absl::OkStatus();
  }
  absl::Status RouterScores(S& s, T logits, T bias, T selection, const RouterChoice& choice, T scores,
                            T aux_scores, T lse, T experts, T selected) override {
    LAUNCH(LaunchRouterScores(
        Ptr(logits), bias.defined() ? Ptr(bias) : nullptr,
        selection.defined() ? Ptr<int32_t>(selection) : nullptr, choice.sigmoid, choice.top_k,
        choice.num_groups, choice.group_topk, Ptr(scores), aux_scores.defined() ? Ptr(aux_scores) : nullptr,
        Ptr(lse), Ptr<int32_t>(experts), Ptr(selected), logits.size(0), logits.size(1), DeviceErrorRecord(s),
        static_cast<int>(OpKind::kRouterScores), NativeStream(s)));
    return absl::OkStatus();
  }
  absl::Status RouterScoresBackward(S& s, T scores, T logits, T lse, T daux, T dscores, bool sigmoid,
                                    float z_coef, T dlogits) override {
    LAUNCH(LaunchRouterScoresBackward(Ptr(scores), logits.defined() ? Ptr(logits) : nullptr, Ptr(lse),
                                      Ptr(daux), dscores.defined() ? Ptr(dscores) : nullptr, sigmoid, z_coef,
                                      Ptr(dlogits), scores.size(0), scores.size(1), daux.size(0),
                                      NativeStream(s)));
    return absl::OkStatus();
  }
  absl::Status GatherRows(S& s, T src, T index, T dst, T weight) override {
    if (weight.defined()) {  // f32 or bf16 rows natively (stage_rows)
      ASSIGN_OR_RETURN(const ElemIn es, In("GatherRows", src));
      ASSIGN_OR_RETURN(const ElemOut ed, Out("GatherRows", dst));
      LAUNCH(LaunchGatherRowsScaled(es, Ptr<int32_t>(index), Ptr(weight), ed, index.numel(), LeadRows(src),
                                    Cols(src), DeviceErrorRecord(s), static_cast<int>(OpKind::kGatherRows),
                                    NativeStream(s)));
      return absl::OkStatus();
    }
    const int64_t row_bytes = Cols(src) * static_cast<int64_t>(DTypeSize(src.dtype()));
    LAUNCH(LaunchGatherRows(src.raw_data(), Ptr<int32_t>(index), dst.raw_data(), index.numel(), LeadRows(src),
                            row_bytes, DeviceErrorRecord(s), static_cast<int>(OpKind::kGatherRows),
                            NativeStream(s)));
    return absl::OkStatus();
  }
  // The row scatter-add and dot: f32 or bf16 rows natively (stage_rows).
  absl::Status ScatterAddRows(S& s, T src, T index, T dst, T weight, ScatterMode mode, T by_row) override {
    const char* op = "ScatterAddRows";
    ASSIGN_OR_RETURN(const ElemIn es, In(op, src));
    ASSIGN_OR_RETURN(const ElemOut ed, Out(op, dst));
    const int64_t m = index.numel(), n = LeadRows(dst);
    if (m > std::numeric_limits<int32_t>::max() || n >= std::numeric_limits<int32_t>::max())
      return absl::InvalidArgumentError(absl::StrCat("cuda ", op, ": ", m, " source rows into ", n,
                                                     " destination rows exceed this kernel's int32 sort"));
    const int32_t* rows = by_row.defined() ? Ptr<int32_t>(by_row) : nullptr;
    return LaunchWithScratch(s, ScatterAddRowsScratchBytes(m, n, rows != nullptr), [&](void* scratch) {
      return LaunchScatterAddRows(es, Ptr<int32_t>(index), ed, weight.defined() ? Ptr(weight) : nullptr,
                                  mode == ScatterMode::kOverwrite, rows, m, n, Cols(src), scratch,
                                  DeviceErrorRecord(s), static_cast<int>(OpKind::kScatterAddRows),
                                  NativeStream(s));
    });
  }
  absl::Status GatherRowDot(S& s, T a, T index, T b, T out, float alpha, float beta) override {
    ASSIGN_OR_RETURN(const ElemIn ea, In("GatherRowDot", a));
    ASSIGN_OR_RETURN(const ElemIn eb, In("GatherRowDot", b));
    LAUNCH(LaunchGatherRowDot(ea, Ptr<int32_t>(index), eb, Ptr(out), alpha, beta, index.numel(), LeadRows(a),
                              Cols(a), DeviceErrorRecord(s), static_cast<int>(OpKind::kGatherRowDot),
                              NativeStream(s)));
    return absl::OkStatus();
  }
  absl::Status InitNormal(S& s, T t, uint64_t seed, absl::string_view name, const moe::Shape& global_shape,
                          absl::Span<const int64_t> offsets, float std) override {
    RETURN_IF_ERROR(F32Only("InitNormal", {&t}));
    InitBox box{};
    box.rank = t.rank();
    for (int d = 0; d < t.rank(); ++d) {
      box.local[d] = t.size(d);
      box.offset[d] = offsets[d];
      box.global[d] = global_shape[d];
    }
    const PhiloxKey key = PhiloxKeyFromName(name);
    LAUNCH(LaunchInitNormal(Ptr(t), t.numel(), seed, key[0], key[1], std, box, NativeStream(s)));
    return absl::OkStatus();
  }
  absl::Status AdamW(S& s, T param, T grad, T exp_avg, T exp_avg_sq, T param_bf16, float grad_scale, float lr,
                     float beta1, float beta2, float eps, float weight_decay, int64_t step) override {
    RETURN_IF_ERROR(F32Only("AdamW", {&param, &grad, &exp_avg, &exp_avg_sq}));
    // Bias corrections in double, as on CPU.
    const float bc1 = static_cast<float>(1.0 - std::pow(static_cast<double>(beta1), step));
    const float bc2 = static_cast<float>(1.0 - std::pow(static_cast<double>(beta2), step));
    uint16_t* p16 = param_bf16.defined() ? Ptr<uint16_t>(param_bf16) : nullptr;
    LAUNCH(LaunchAdamW(Ptr(param), Ptr(grad), Ptr(exp_avg), Ptr(exp_avg_sq), p16, grad_scale, lr, beta1,
                       beta2, eps, weight_decay, bc1, bc2, param.numel(), NativeStream(s)));
    return absl::OkStatus();
  }

  // The list forms: kMaxListTensors entries a launch.
  absl::Status FillMany(S& s, absl::Span<const Tensor> ts, double value) override {
    std::vector<FillEntry> batch;
    for (size_t i = 0; i < ts.size(); ++i) {
      ASSIGN_OR_RETURN(ElemType e, Elem(ts[i].dtype()));
      batch.push_back(FillEntry{ts[i].raw_data(), e, ts[i].numel()});
      if (batch.size() == kMaxListTensors || i + 1 == ts.size()) {
        LAUNCH(LaunchFillList(batch.data(), static_cast<int>(batch.size()), value, NativeStream(s)));
        batch.clear();
      }
    }
    return absl::OkStatus();
  }
  absl::Status ReduceSumSquaresMany(S& s, absl::Span<const Tensor> xs, T out) override {
    for (const Tensor& x : xs) RETURN_IF_ERROR(F32Only("ReduceSumSquares", {&x, &out}));
    for (size_t first = 0; first < xs.size(); first += kMaxListTensors) {
      std::vector<ReduceEntry> batch;
      for (size_t i = first; i < std::min(xs.size(), first + kMaxListTensors); ++i)
        batch.push_back(ReduceEntry{Ptr(xs[i]), xs[i].numel()});
      const int count = static_cast<int>(batch.size());
      RETURN_IF_ERROR(
          LaunchWithScratch(s, SumSquaresListScratchBytes(batch.data(), count), [&](void* scratch) {
            return LaunchSumSquaresList(batch.data(), count, Ptr(out) + first, scratch, NativeStream(s));
          }));
    }
    return absl::OkStatus();
  }
  absl::Status AdamWMany(S& s, absl::Span<const AdamWTarget> targets, float grad_scale, float lr, float beta1,
                         float beta2, float eps, int64_t step) override {
    const float bc1 = static_cast<float>(1.0 - std::pow(static_cast<double>(beta1), step));
    const float bc2 = static_cast<float>(1.0 - std::pow(static_cast<double>(beta2), step));
    std::vector<AdamWEntry> batch;
    for (size_t i = 0; i < targets.size(); ++i) {
      const AdamWTarget& t = targets[i];
      RETURN_IF_ERROR(F32Only("AdamW", {&t.param, &t.grad, &t.exp_avg, &t.exp_avg_sq}));
      uint16_t* p16 = t.param_bf16.defined() ? Ptr<uint16_t>(t.param_bf16) : nullptr;
      batch.push_back(AdamWEntry{Ptr(t.param), Ptr(t.grad), Ptr(t.exp_avg), Ptr(t.exp_avg_sq), p16,
                                 t.param.numel(), t.weight_decay});
      if (batch.size() == kMaxListTensors || i + 1 == targets.size()) {
        LAUNCH(LaunchAdamWList(batch.data(), static_cast<int>(batch.size()), grad_scale, lr, beta1, beta2,
                               eps, bc1, bc2, NativeStream(s)));
        batch.clear();
      }
    }
    return absl::OkStatus();
  }

 private:
  // MOE_ATTENTION=gemm: attention_gemm.h's driver on cuBLAS, without the fused
  // kernels' limits below.
  static bool GemmAttention() { return attn::AttentionSettingsRef().path == attn::AttentionPath::kGemm; }
  static absl::StatusOr<AttentionShape> Shape(const Tensor& q, const Tensor& k, const char* op) {
    const AttentionShape sh = ShapeOf(q, k);
    if (sh.seq > MaxAttentionSeq() || sh.head_dim > 512)
      return absl::InvalidArgumentError(absl::StrCat("cuda ", op, ": sequence length ", sh.seq,
                                                     " / head_dim ", sh.head_dim,
                                                     " exceed this kernel's limits (", MaxAttentionSeq(),
                                                     " / 512); MOE_ATTENTION=gemm has no such limit"));
    return sh;
  }
};

}  // namespace

bool FlashAttentionTakes(absl::Span<const Tensor* const> tensors) {
  if (attn::AttentionSettingsRef().path != attn::AttentionPath::kFlash || tensors.size() < 3) return false;
  for (const Tensor* t : tensors)
    if (!t->defined() || t->dtype() != DType::kBF16 || reinterpret_cast<uintptr_t>(t->raw_data()) % 16 != 0)
      return false;
  const Tensor &q = *tensors[0], &k = *tensors[1];
  return q.rank() == 4 && k.rank() == 4 && FlashAttentionShapeOk(ShapeOf(q, k));
}

bool NativeAttentionTakes(absl::Span<const Tensor* const> /*tensors*/) {
  // Off the gemm path a call runs on the flash kernels or the fused ones, and
  // both take bf16 operands whatever the shape.
  return attn::AttentionSettingsRef().path != attn::AttentionPath::kGemm;
}

std::unique_ptr<Kernels> MakeCudaKernels() { return std::make_unique<CudaKernels>(); }

}  // namespace moe::cuda
