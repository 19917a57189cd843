// The bf16 staging decorator (bf16_staging.h): every bf16 operand of a wrapped
// op goes through an f32 copy, so one f32 implementation per op serves both
// precisions, on the CPU backend (every op, GEMMs too) and on CUDA (every op
// but the GEMMs, which cuBLAS runs on bf16 operands with f32 accumulation).
//
// Why staging and not bf16 loops: the CPU has no bf16 arithmetic worth the
// name, OpenBLAS's sgemm is the fast path for the GEMMs (the whole operand as
// one f32 tile), and one f32 implementation per op keeps the kernels in one
// place. The result is exactly ops.h's precision contract: bf16 inputs are
// widened exactly (kmath::BF16ToF32), the op computes and accumulates in f32,
// and each bf16 output element is rounded once (kmath::F32ToBF16, nearest
// even) when the staged result is cast back. On CUDA the attention and
// reduction kernels thus read and write f32 around two Cast kernels: the same
// numbers as bf16-native kernels would give, for more memory traffic; the
// arithmetic element-wise kernels (Add ... SwiGLUBackward), the norms, RoPE,
// the cross-entropy and the row scatter-add and dot are bf16-native there and
// pass through (stage_elementwise = false, stage_rows = false).
//
// Per call, for every bf16 tensor argument:
//   read  (an input, or an output the op also reads: beta != 0, accumulate,
//          in place): Cast bf16 -> f32 into a temporary before the kernel;
//   write (an output): the kernel writes the f32 temporary; Cast f32 -> bf16
//          after it.
// A tensor passed twice (in place: SwiGLUBackward's dgate = gate) maps to one
// temporary. Everything is enqueued on the op's stream in order. Temporaries
// are released when the call returns, before its work ran: the CPU stream's
// enqueued work holds tensor handles to them, and the CUDA allocator hands a
// freed block out again only after every stream has passed the free
// (cuda/cuda_backend.h). They are counted as activations (scratch) by the
// memory tracker.
#include "runtime/core/bf16_staging.h"

#include <initializer_list>
#include <memory>
#include <utility>
#include <vector>

#include "absl/functional/function_ref.h"
#include "runtime/core/attention_gemm.h"
#include "runtime/core/status.h"

namespace moe {
namespace {

bool IsBf16(const Tensor& t) { return t.defined() && t.dtype() == DType::kBF16; }
// q, k and v are bf16: the staged attention call's products may run at TF32
// (attention_gemm.h, Tf32ProductsScope).
bool BF16Products(const Tensor& q, const Tensor& k, const Tensor& v) {
  return IsBf16(q) && IsBf16(k) && IsBf16(v);
}

// The f32 stand-ins of one call.
class Staging {
 public:
  Staging(Kernels& f32, Stream& s) : f32_(f32), s_(s) {}

  // The tensor the f32 kernel reads in place of `t`.
  Tensor In(const Tensor& t) { return Stage(t, /*read=*/true, /*write=*/false); }
  // The tensor the f32 kernel writes in place of `t`; `read`: it reads it too.
  Tensor Out(const Tensor& t, bool read) { return Stage(t, read, /*write=*/true); }
  // In and out (in-place ops).
  Tensor InOut(const Tensor& t) { return Stage(t, true, true); }

  // Enqueues `kernel` (the f32 op on the staged tensors) unless staging
  // failed, then casts the written temporaries back to their bf16 tensors.
  absl::Status Run(absl::FunctionRef<absl::Status()> kernel) {
    RETURN_IF_ERROR(status_);
    RETURN_IF_ERROR(kernel());
    for (const Entry& e : entries_)
      if (e.written) RETURN_IF_ERROR(f32_.Cast(s_, e.f32, e.bf16));
    return absl::OkStatus();
  }

 private:
  struct Entry {
    Tensor bf16, f32;
    bool written = false;
  };

  Tensor Stage(const Tensor& t, bool read, bool write) {
    if (!IsBf16(t) || !status_.ok()) return t;
    for (Entry& e : entries_) {
      if (e.bf16.raw_data() == t.raw_data() && e.bf16.numel() == t.numel()) {
        e.written = e.written || write;
        return e.f32.Reshape(t.shape());
      }
    }
    absl::StatusOr<Tensor> tmp =
        Tensor::Empty(s_.backend(), t.shape(), DType::kF32, MemoryCategory::kActivations);
    if (!tmp.ok()) {
      status_ = tmp.status();
      return t;
    }
    if (read) {
      absl::Status st = f32_.Cast(s_, t, *tmp);
      if (!st.ok()) status_ = st;
    }
    entries_.push_back({t, *tmp, write});
    return *tmp;
  }

  Kernels& f32_;
  Stream& s_;
  std::vector<Entry> entries_;
  absl::Status status_;
};

class Bf16StagingKernels : public Kernels {
 public:
  Bf16StagingKernels(std::unique_ptr<Kernels> f32, Bf16StagingOptions options)
      : f32_(std::move(f32)), options_(options) {}

  // Dtype-agnostic already (bytes, or conversions).
  absl::Status Copy(S& s, T src, T dst) override { return f32_->Copy(s, src, dst); }
  absl::Status Cast(S& s, T src, T dst) override { return f32_->Cast(s, src, dst); }
  absl::Status Fill(S& s, T t, double value) override { return f32_->Fill(s, t, value); }
  // Rows are copied as bytes; a weighted gather is arithmetic (stage_rows).
  absl::Status GatherRows(S& s, T src, T index, T dst, T weight) override {
    if (!weight.defined() || !options_.stage_rows) return f32_->GatherRows(s, src, index, dst, weight);
    Staging g(*f32_, s);
    Tensor s2 = g.In(src), d2 = g.Out(dst, false);
    return g.Run([&] { return f32_->GatherRows(s, s2, index, d2, weight); });
  }

  absl::Status Gemm(S& s, T a, bool trans_a, T b, bool trans_b, T c, float alpha, float beta) override {
    if (!options_.stage_gemms) return f32_->Gemm(s, a, trans_a, b, trans_b, c, alpha, beta);
    Staging g(*f32_, s);
    Tensor a2 = g.In(a), b2 = g.In(b), c2 = g.Out(c, beta != 0.0f);
    return g.Run([&] { return f32_->Gemm(s, a2, trans_a, b2, trans_b, c2, alpha, beta); });
  }
  absl::Status BatchedGemm(S& s, T a, bool trans_a, T b, bool trans_b, T c, float alpha,
                           float beta) override {
    if (!options_.stage_gemms) return f32_->BatchedGemm(s, a, trans_a, b, trans_b, c, alpha, beta);
    Staging g(*f32_, s);
    Tensor a2 = g.In(a), b2 = g.In(b), c2 = g.Out(c, beta != 0.0f);
    return g.Run([&] { return f32_->BatchedGemm(s, a2, trans_a, b2, trans_b, c2, alpha, beta); });
  }
  absl::Status GroupedGemm(S& s, T x, T w, bool trans_w, T y, absl::Span<const int64_t> offsets, float alpha,
                           float beta) override {
    if (!options_.stage_gemms) return f32_->GroupedGemm(s, x, w, trans_w, y, offsets, alpha, beta);
    Staging g(*f32_, s);
    Tensor x2 = g.In(x), w2 = g.In(w), y2 = g.Out(y, beta != 0.0f);
    return g.Run([&] { return f32_->GroupedGemm(s, x2, w2, trans_w, y2, offsets, alpha, beta); });
  }
  absl::Status GroupedGemmWeightGrad(S& s, T dy, T x, T dw, absl::Span<const int64_t> offsets, float alpha,
                                     float beta) override {
    if (!options_.stage_gemms) return f32_->GroupedGemmWeightGrad(s, dy, x, dw, offsets, alpha, beta);
    Staging g(*f32_, s);
    Tensor dy2 = g.In(dy), x2 = g.In(x), dw2 = g.Out(dw, beta != 0.0f);
    return g.Run([&] { return f32_->GroupedGemmWeightGrad(s, dy2, x2, dw2, offsets, alpha, beta); });
  }

  absl::Status Add(S& s, T a, T b, T out) override {
    if (!options_.stage_elementwise) return f32_->Add(s, a, b, out);
    Staging g(*f32_, s);
    Tensor a2 = g.In(a), b2 = g.In(b), o2 = g.Out(out, false);
    return g.Run([&] { return f32_->Add(s, a2, b2, o2); });
  }
  absl::Status Axpby(S& s, float alpha, T x, float beta, T y) override {
    if (!options_.stage_elementwise) return f32_->Axpby(s, alpha, x, beta, y);
    Staging g(*f32_, s);
    Tensor x2 = g.In(x), y2 = g.Out(y, beta != 0.0f);
    return g.Run([&] { return f32_->Axpby(s, alpha, x2, beta, y2); });
  }
  absl::Status Mul(S& s, T a, T b, T out) override {
    if (!options_.stage_elementwise) return f32_->Mul(s, a, b, out);
    Staging g(*f32_, s);
    Tensor a2 = g.In(a), b2 = g.In(b), o2 = g.Out(out, false);
    return g.Run([&] { return f32_->Mul(s, a2, b2, o2); });
  }
  absl::Status Scale(S& s, T x, float alpha, T out) override {
    if (!options_.stage_elementwise) return f32_->Scale(s, x, alpha, out);
    Staging g(*f32_, s);
    Tensor x2 = g.In(x), o2 = g.Out(out, false);
    return g.Run([&] { return f32_->Scale(s, x2, alpha, o2); });
  }
  absl::Status Silu(S& s, T x, T out) override {
    if (!options_.stage_elementwise) return f32_->Silu(s, x, out);
    Staging g(*f32_, s);
    Tensor x2 = g.In(x), o2 = g.Out(out, false);
    return g.Run([&] { return f32_->Silu(s, x2, o2); });
  }
  absl::Status SiluBackward(S& s, T x, T dout, T dx, float alpha, float beta) override {
    if (!options_.stage_elementwise) return f32_->SiluBackward(s, x, dout, dx, alpha, beta);
    Staging g(*f32_, s);
    Tensor x2 = g.In(x), d2 = g.In(dout), dx2 = g.Out(dx, beta != 0.0f);
    return g.Run([&] { return f32_->SiluBackward(s, x2, d2, dx2, alpha, beta); });
  }
  absl::Status SwiGLU(S& s, T gate, T up, T out) override {
    if (!options_.stage_elementwise) return f32_->SwiGLU(s, gate, up, out);
    Staging g(*f32_, s);
    Tensor g2 = g.In(gate), u2 = g.In(up), o2 = g.Out(out, false);
    return g.Run([&] { return f32_->SwiGLU(s, g2, u2, o2); });
  }
  absl::Status SwiGLUBackward(S& s, T gate, T up, T dout, T dgate, T dup) override {
    if (!options_.stage_elementwise) return f32_->SwiGLUBackward(s, gate, up, dout, dgate, dup);
    Staging g(*f32_, s);
    Tensor g2 = g.In(gate), u2 = g.In(up), d2 = g.In(dout), dg2 = g.Out(dgate, false),
           du2 = g.Out(dup, false);
    return g.Run([&] { return f32_->SwiGLUBackward(s, g2, u2, d2, dg2, du2); });
  }

  absl::Status ReduceSum(S& s, T x, T out, float alpha, float beta) override {
    Staging g(*f32_, s);
    Tensor x2 = g.In(x);
    return g.Run([&] { return f32_->ReduceSum(s, x2, out, alpha, beta); });
  }
  absl::Status ReduceSumSquares(S& s, T x, T out, float alpha, float beta) override {
    Staging g(*f32_, s);
    Tensor x2 = g.In(x);
    return g.Run([&] { return f32_->ReduceSumSquares(s, x2, out, alpha, beta); });
  }
  absl::Status ReduceMax(S& s, T x, T out) override {
    Staging g(*f32_, s);
    Tensor x2 = g.In(x);
    return g.Run([&] { return f32_->ReduceMax(s, x2, out); });
  }
  absl::Status SumRows(S& s, T x, T out, float alpha, float beta) override {
    Staging g(*f32_, s);
    Tensor x2 = g.In(x);
    return g.Run([&] { return f32_->SumRows(s, x2, out, alpha, beta); });
  }

  absl::Status RmsNorm(S& s, T x, T weight, float eps, T out, T rstd) override {
    if (!options_.stage_rows) return f32_->RmsNorm(s, x, weight, eps, out, rstd);
    Staging g(*f32_, s);
    Tensor x2 = g.In(x), w2 = g.In(weight), o2 = g.Out(out, false);
    return g.Run([&] { return f32_->RmsNorm(s, x2, w2, eps, o2, rstd); });
  }
  absl::Status RmsNormBackward(S& s, T x, T weight, T rstd, T dout, T dx, T dweight,
                               bool accumulate_dx) override {
    if (!options_.stage_rows)
      return f32_->RmsNormBackward(s, x, weight, rstd, dout, dx, dweight, accumulate_dx);
    Staging g(*f32_, s);
    Tensor x2 = g.In(x), w2 = g.In(weight), d2 = g.In(dout), dx2 = g.Out(dx, accumulate_dx),
           dw2 = g.Out(dweight, true);
    return g.Run([&] { return f32_->RmsNormBackward(s, x2, w2, rstd, d2, dx2, dw2, accumulate_dx); });
  }
  absl::Status AddRmsNorm(S& s, T x, T residual, T weight, float eps, T sum, T out, T rstd) override {
    if (!options_.stage_rows) return f32_->AddRmsNorm(s, x, residual, weight, eps, sum, out, rstd);
    Staging g(*f32_, s);
    Tensor x2 = g.In(x), r2 = g.In(residual), w2 = g.In(weight), s2 = g.Out(sum, false),
           o2 = g.Out(out, false);
    return g.Run([&] { return f32_->AddRmsNorm(s, x2, r2, w2, eps, s2, o2, rstd); });
  }
  absl::Status Rope(S& s, T x, T out, double theta, int64_t position_offset) override {
    if (!options_.stage_rows) return f32_->Rope(s, x, out, theta, position_offset);
    Staging g(*f32_, s);
    Tensor x2 = g.In(x), o2 = g.Out(out, false);
    return g.Run([&] { return f32_->Rope(s, x2, o2, theta, position_offset); });
  }
  absl::Status RopeBackward(S& s, T dout, T dx, double theta, int64_t position_offset) override {
    if (!options_.stage_rows) return f32_->RopeBackward(s, dout, dx, theta, position_offset);
    Staging g(*f32_, s);
    Tensor d2 = g.In(dout), dx2 = g.Out(dx, false);
    return g.Run([&] { return f32_->RopeBackward(s, d2, dx2, theta, position_offset); });
  }
  absl::Status CausalAttention(S& s, T q, T k, T v, float scale, T out, T lse) override {
    if (Native({&q, &k, &v, &out})) return f32_->CausalAttention(s, q, k, v, scale, out, lse);
    Staging g(*f32_, s);
    Tensor q2 = g.In(q), k2 = g.In(k), v2 = g.In(v), o2 = g.Out(out, false);
    attn::Tf32ProductsScope tf32(BF16Products(q, k, v));
    return g.Run([&] { return f32_->CausalAttention(s, q2, k2, v2, scale, o2, lse); });
  }
  absl::Status CausalAttentionBackward(S& s, T q, T k, T v, T out, T lse, float scale, T dout, T dq, T dk,
                                       T dv) override {
    if (Native({&q, &k, &v, &out, &dout, &dq, &dk, &dv}))
      return f32_->CausalAttentionBackward(s, q, k, v, out, lse, scale, dout, dq, dk, dv);
    Staging g(*f32_, s);
    Tensor q2 = g.In(q), k2 = g.In(k), v2 = g.In(v), o2 = g.In(out), d2 = g.In(dout), dq2 = g.Out(dq, false),
           dk2 = g.Out(dk, false), dv2 = g.Out(dv, false);
    attn::Tf32ProductsScope tf32(BF16Products(q, k, v));
    return g.Run(
        [&] { return f32_->CausalAttentionBackward(s, q2, k2, v2, o2, lse, scale, d2, dq2, dk2, dv2); });
  }

  // Routing: f32 only (ops.h), nothing to stage.
  absl::Status Softmax(S& s, T x, T out) override { return f32_->Softmax(s, x, out); }
  absl::Status SoftmaxBackward(S& s, T y, T dy, T dx, float alpha, float beta) override {
    return f32_->SoftmaxBackward(s, y, dy, dx, alpha, beta);
  }
  absl::Status LogSumExp(S& s, T x, T out) override { return f32_->LogSumExp(s, x, out); }
  absl::Status TopK(S& s, T x, int k, T values, T indices) override {
    return f32_->TopK(s, x, k, values, indices);
  }
  absl::Status RouterScores(S& s, T logits, T bias, T selection, const RouterChoice& choice, T scores,
                            T aux_scores, T lse, T experts, T selected) override {
    return f32_->RouterScores(s, logits, bias, selection, choice, scores, aux_scores, lse, experts, selected);
  }
  absl::Status RouterScoresBackward(S& s, T scores, T logits, T lse, T daux, T dscores, bool sigmoid,
                                    float z_coef, T dlogits) override {
    return f32_->RouterScoresBackward(s, scores, logits, lse, daux, dscores, sigmoid, z_coef, dlogits);
  }

  absl::Status CrossEntropy(S& s, T logits, T targets, T losses, T lse) override {
    if (!options_.stage_rows) return f32_->CrossEntropy(s, logits, targets, losses, lse);
    Staging g(*f32_, s);
    Tensor l2 = g.In(logits);
    return g.Run([&] { return f32_->CrossEntropy(s, l2, targets, losses, lse); });
  }
  absl::Status CrossEntropyBackward(S& s, T logits, T targets, T lse, T dloss, float scale,
                                    T dlogits) override {
    if (!options_.stage_rows)
      return f32_->CrossEntropyBackward(s, logits, targets, lse, dloss, scale, dlogits);
    Staging g(*f32_, s);
    Tensor l2 = g.In(logits), d2 = g.Out(dlogits, false);
    return g.Run([&] { return f32_->CrossEntropyBackward(s, l2, targets, lse, dloss, scale, d2); });
  }
  absl::Status ScatterAddRows(S& s, T src, T index, T dst, T weight, ScatterMode mode, T by_row) override {
    if (!options_.stage_rows) return f32_->ScatterAddRows(s, src, index, dst, weight, mode, by_row);
    Staging g(*f32_, s);
    Tensor s2 = g.In(src), d2 = g.Out(dst, mode == ScatterMode::kAccumulate);
    return g.Run([&] { return f32_->ScatterAddRows(s, s2, index, d2, weight, mode, by_row); });
  }
  absl::Status GatherRowDot(S& s, T a, T index, T b, T out, float alpha, float beta) override {
    if (!options_.stage_rows) return f32_->GatherRowDot(s, a, index, b, out, alpha, beta);
    Staging g(*f32_, s);
    Tensor a2 = g.In(a), b2 = g.In(b);
    return g.Run([&] { return f32_->GatherRowDot(s, a2, index, b2, out, alpha, beta); });
  }

  // Master weights and optimizer state: f32 only.
  absl::Status InitNormal(S& s, T t, uint64_t seed, absl::string_view name, const Shape& global_shape,
                          absl::Span<const int64_t> offsets, float std) override {
    return f32_->InitNormal(s, t, seed, name, global_shape, offsets, std);
  }
  // Its bf16 output (param_bf16) is written natively by the backend's kernel.
  absl::Status AdamW(S& s, T param, T grad, T exp_avg, T exp_avg_sq, T param_bf16, float grad_scale, float lr,
                     float beta1, float beta2, float eps, float weight_decay, int64_t step) override {
    return f32_->AdamW(s, param, grad, exp_avg, exp_avg_sq, param_bf16, grad_scale, lr, beta1, beta2, eps,
                       weight_decay, step);
  }

  // The list forms: f32 lists go to the backend's own (one launch for many);
  // a bf16 tensor to sum makes the default's one-tensor calls, staged above.
  absl::Status FillMany(S& s, absl::Span<const Tensor> ts, double value) override {
    return f32_->FillMany(s, ts, value);
  }
  absl::Status ReduceSumSquaresMany(S& s, absl::Span<const Tensor> xs, T out) override {
    for (const Tensor& x : xs)
      if (x.dtype() == DType::kBF16) return Kernels::ReduceSumSquaresMany(s, xs, out);
    return f32_->ReduceSumSquaresMany(s, xs, out);
  }
  absl::Status AdamWMany(S& s, absl::Span<const AdamWTarget> targets, float grad_scale, float lr, float beta1,
                         float beta2, float eps, int64_t step) override {
    return f32_->AdamWMany(s, targets, grad_scale, lr, beta1, beta2, eps, step);
  }

 private:
  bool Native(std::initializer_list<const Tensor*> tensors) const {
    return options_.native_attention != nullptr &&
           options_.native_attention(absl::Span<const Tensor* const>(tensors.begin(), tensors.size()));
  }

  std::unique_ptr<Kernels> f32_;
  Bf16StagingOptions options_;
};

}  // namespace

std::unique_ptr<Kernels> MakeBf16StagingKernels(std::unique_ptr<Kernels> f32, Bf16StagingOptions options) {
  return std::make_unique<Bf16StagingKernels>(std::move(f32), options);
}

}  // namespace moe
