// Argument checks for every op (one place, like NCCL's ArgsCheck), then the
// backend's kernel.
#include "runtime/core/ops.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "runtime/core/kernel_math.h"
#include "runtime/core/kernels.h"
#include "runtime/core/op_profile.h"
#include "runtime/core/status.h"

namespace moe {

absl::Status ByRowMismatch(const char* op, int64_t entry, int64_t value) {
  return absl::InvalidArgumentError(
      absl::StrCat("ops::", op, ": by_row[", entry, "] = ", value,
                   " does not match index (make it with ops::ScatterRowOrder)"));
}

}  // namespace moe

namespace moe::ops {
namespace {

absl::Status Bad(const char* op, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("ops::", op, ": ", what));
}

// Defined, on the stream's device, of `dtype`.
absl::Status Arg(const char* op, Stream& s, const char* name, const Tensor& t, DType dtype) {
  if (!t.defined()) return Bad(op, absl::StrCat(name, " is undefined"));
  if (!(t.device() == s.backend().device()))
    return Bad(op, absl::StrCat(name, " ", t.ToString(), " is not on the stream's device ",
                                s.backend().device().ToString()));
  if (t.dtype() != dtype)
    return Bad(op, absl::StrCat(name, " ", t.ToString(), " must be ", DTypeName(dtype)));
  return absl::OkStatus();
}

absl::Status F32(const char* op, Stream& s, const char* name, const Tensor& t) {
  return Arg(op, s, name, t, DType::kF32);
}

// Defined, on the stream's device, f32 or bf16 (ops.h "[any]").
absl::Status Flt(const char* op, Stream& s, const char* name, const Tensor& t) {
  RETURN_IF_ERROR(Arg(op, s, name, t, t.dtype()));
  if (t.dtype() != DType::kF32 && t.dtype() != DType::kBF16)
    return Bad(op, absl::StrCat(name, " ", t.ToString(), " must be f32 or bf16"));
  return absl::OkStatus();
}

// ops.h "[same]": both f32 or bf16 and of one dtype.
absl::Status Same(const char* op, Stream& s, const char* a_name, const Tensor& a, const char* b_name,
                  const Tensor& b) {
  RETURN_IF_ERROR(Flt(op, s, a_name, a));
  RETURN_IF_ERROR(Flt(op, s, b_name, b));
  if (a.dtype() != b.dtype())
    return Bad(
        op, absl::StrCat(b_name, " ", b.ToString(), " must have the dtype of ", a_name, " ", a.ToString()));
  return absl::OkStatus();
}

// An output that overlaps an input must be that very tensor (in place), of its dtype.
absl::Status AliasOk(const char* op, const char* in_name, const Tensor& in, const char* out_name,
                     const Tensor& out) {
  if (in.Overlaps(out) && (in.raw_data() != out.raw_data() || in.dtype() != out.dtype()))
    return Bad(op, absl::StrCat(out_name, " ", out.ToString(), " overlaps ", in_name, " ", in.ToString(),
                                " without being the same tensor"));
  return absl::OkStatus();
}

absl::Status SameShape(const char* op, const char* a_name, const Tensor& a, const char* b_name,
                       const Tensor& b) {
  if (a.shape() != b.shape())
    return Bad(
        op, absl::StrCat(b_name, " ", b.ToString(), " must have the shape of ", a_name, " ", a.ToString()));
  return absl::OkStatus();
}

absl::Status Numel(const char* op, const char* name, const Tensor& t, int64_t n) {
  if (t.numel() != n) return Bad(op, absl::StrCat(name, " ", t.ToString(), " must have ", n, " elements"));
  return absl::OkStatus();
}

absl::Status Supported(const char* op, Stream& s, OpKind kind) {
  if (!s.backend().SupportsOp(kind))
    return absl::UnimplementedError(
        absl::StrCat("ops::", op, " is not supported by the ", s.backend().name(), " backend"));
  return absl::OkStatus();
}

absl::Status NoOverlap(const char* op, const char* in_name, const Tensor& in, const char* out_name,
                       const Tensor& out) {
  if (in.Overlaps(out))
    return Bad(op, absl::StrCat(out_name, " overlaps ", in_name, " (not allowed in place)"));
  return absl::OkStatus();
}

int64_t Cols(const Tensor& t) { return t.rank() == 0 ? 1 : t.size(-1); }
int64_t LeadRows(const Tensor& t) {
  if (t.rank() <= 1) return 1;
  int64_t r = 1;
  for (int i = 0; i + 1 < t.rank(); ++i) r *= t.size(i);
  return r;
}

absl::Status Offsets(const char* op, absl::Span<const int64_t> offsets, int64_t num_experts, int64_t rows) {
  if (static_cast<int64_t>(offsets.size()) != num_experts + 1)
    return Bad(op, absl::StrCat("offsets has ", offsets.size(),
                                " entries; expected num_experts + 1 = ", num_experts + 1));
  if (offsets[0] != 0) return Bad(op, absl::StrCat("offsets[0] = ", offsets[0], " must be 0"));
  for (int64_t e = 0; e < num_experts; ++e)
    if (offsets[e + 1] < offsets[e])
      return Bad(op, absl::StrCat("offsets must be non-decreasing: offsets[", e, "] = ", offsets[e],
                                  " > offsets[", e + 1, "] = ", offsets[e + 1]));
  if (offsets[num_experts] != rows)
    return Bad(op,
               absl::StrCat("offsets[E] = ", offsets[num_experts], " must equal the number of rows ", rows));
  return absl::OkStatus();
}

}  // namespace

absl::Status Copy(Stream& s, const Tensor& src, const Tensor& dst) {
  RETURN_IF_ERROR(Supported("Copy", s, OpKind::kCopy));
  if (!src.defined() || !dst.defined()) return Bad("Copy", "src and dst must be defined");
  if (src.dtype() != dst.dtype() || src.numel() != dst.numel())
    return Bad("Copy", absl::StrCat("src ", src.ToString(), " and dst ", dst.ToString(),
                                    " must have the same dtype and element count"));
  ProfileScope scope(s, OpKind::kCopy);
  return s.backend().kernels().Copy(s, src, dst);
}

absl::Status Cast(Stream& s, const Tensor& src, const Tensor& dst) {
  RETURN_IF_ERROR(Supported("Cast", s, OpKind::kCast));
  RETURN_IF_ERROR(Arg("Cast", s, "src", src, src.dtype()));
  RETURN_IF_ERROR(Arg("Cast", s, "dst", dst, dst.dtype()));
  RETURN_IF_ERROR(Numel("Cast", "dst", dst, src.numel()));
  auto ok_pair = [](DType a, DType b) {
    auto in = [](DType t, DType x, DType y) { return t == x || t == y; };
    return a == b || (in(a, DType::kF32, DType::kBF16) && in(b, DType::kF32, DType::kBF16)) ||
           (in(a, DType::kF32, DType::kF64) && in(b, DType::kF32, DType::kF64)) ||
           (in(a, DType::kI32, DType::kI64) && in(b, DType::kI32, DType::kI64));
  };
  if (!ok_pair(src.dtype(), dst.dtype()))
    return Bad("Cast",
               absl::StrCat("no conversion from ", DTypeName(src.dtype()), " to ", DTypeName(dst.dtype())));
  ProfileScope scope(s, OpKind::kCast);
  return s.backend().kernels().Cast(s, src, dst);
}

absl::Status Fill(Stream& s, const Tensor& t, double value) {
  RETURN_IF_ERROR(Supported("Fill", s, OpKind::kFill));
  RETURN_IF_ERROR(Arg("Fill", s, "t", t, t.dtype()));
  if (t.dtype() == DType::kU8) return Bad("Fill", "u8 tensors are not supported");
  ProfileScope scope(s, OpKind::kFill);
  return s.backend().kernels().Fill(s, t, value);
}

absl::Status Gemm(Stream& s, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const Tensor& c,
                  float alpha, float beta) {
  const char* op = "Gemm";
  RETURN_IF_ERROR(Supported(op, s, OpKind::kGemm));
  RETURN_IF_ERROR(Same(op, s, "a", a, "b", b));
  RETURN_IF_ERROR(Flt(op, s, "c", c));
  if (a.rank() < 2 || b.rank() < 2 || c.rank() < 2)
    return Bad(op, absl::StrCat("a ", a.ToString(), ", b ", b.ToString(), ", c ", c.ToString(),
                                " must have rank >= 2"));
  int64_t m = trans_a ? Cols(a) : LeadRows(a), k = trans_a ? LeadRows(a) : Cols(a);
  int64_t kb = trans_b ? Cols(b) : LeadRows(b), n = trans_b ? LeadRows(b) : Cols(b);
  if (k != kb || LeadRows(c) != m || Cols(c) != n)
    return Bad(op, absl::StrCat("op(a) [", m, ",", k, "] (a ", a.ToString(), trans_a ? "^T" : "",
                                ") x op(b) [", kb, ",", n, "] (b ", b.ToString(), trans_b ? "^T" : "",
                                ") does not fit c ", c.ToString()));
  RETURN_IF_ERROR(NoOverlap(op, "a", a, "c", c));
  RETURN_IF_ERROR(NoOverlap(op, "b", b, "c", c));
  ProfileScope scope(s, OpKind::kGemm);
  return s.backend().kernels().Gemm(s, a, trans_a, b, trans_b, c, alpha, beta);
}

absl::Status BatchedGemm(Stream& s, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
                         const Tensor& c, float alpha, float beta) {
  const char* op = "BatchedGemm";
  RETURN_IF_ERROR(Supported(op, s, OpKind::kBatchedGemm));
  RETURN_IF_ERROR(Same(op, s, "a", a, "b", b));
  RETURN_IF_ERROR(Flt(op, s, "c", c));
  for (const Tensor* t : {&a, &b, &c})
    if (t->rank() < 3 || t->rank() > 4) return Bad(op, absl::StrCat(t->ToString(), " must have rank 3 or 4"));
  auto batch = [](const Tensor& t) { return t.rank() == 4 ? t.size(0) * t.size(1) : t.size(0); };
  int64_t ba = batch(a), bb = batch(b), bc = batch(c);
  if (bb == 0 || ba % bb != 0 || bc != ba)
    return Bad(op, absl::StrCat("batch sizes: a ", a.ToString(), ", b ", b.ToString(), ", c ", c.ToString(),
                                " (b's batch must divide a's; c's must equal a's)"));
  int64_t m = trans_a ? a.size(-1) : a.size(-2), k = trans_a ? a.size(-2) : a.size(-1);
  int64_t kb = trans_b ? b.size(-1) : b.size(-2), n = trans_b ? b.size(-2) : b.size(-1);
  if (k != kb || c.size(-2) != m || c.size(-1) != n)
    return Bad(
        op, absl::StrCat("op(a) [", m, ",", k, "] x op(b) [", kb, ",", n, "] does not fit c ", c.ToString()));
  RETURN_IF_ERROR(NoOverlap(op, "a", a, "c", c));
  RETURN_IF_ERROR(NoOverlap(op, "b", b, "c", c));
  ProfileScope scope(s, OpKind::kBatchedGemm);
  return s.backend().kernels().BatchedGemm(s, a, trans_a, b, trans_b, c, alpha, beta);
}

absl::Status GroupedGemm(Stream& s, const Tensor& x, const Tensor& w, bool trans_w, const Tensor& y,
                         absl::Span<const int64_t> offsets, float alpha, float beta) {
  const char* op = "GroupedGemm";
  RETURN_IF_ERROR(Supported(op, s, OpKind::kGroupedGemm));
  RETURN_IF_ERROR(Same(op, s, "x", x, "w", w));
  RETURN_IF_ERROR(Flt(op, s, "y", y));
  if (x.rank() != 2 || w.rank() != 3 || y.rank() != 2)
    return Bad(op, absl::StrCat("x ", x.ToString(), " and y ", y.ToString(), " must be 2-D and w ",
                                w.ToString(), " 3-D [E, P, Q]"));
  int64_t in = trans_w ? w.size(2) : w.size(1), out = trans_w ? w.size(1) : w.size(2);
  if (x.size(1) != in || y.size(1) != out || y.size(0) != x.size(0))
    return Bad(op, absl::StrCat("x ", x.ToString(), " times w ", w.ToString(), trans_w ? "^T" : "",
                                " does not fit y ", y.ToString()));
  RETURN_IF_ERROR(Offsets(op, offsets, w.size(0), x.size(0)));
  RETURN_IF_ERROR(NoOverlap(op, "x", x, "y", y));
  RETURN_IF_ERROR(NoOverlap(op, "w", w, "y", y));
  ProfileScope scope(s, OpKind::kGroupedGemm);
  return s.backend().kernels().GroupedGemm(s, x, w, trans_w, y, offsets, alpha, beta);
}

absl::Status GroupedGemmWeightGrad(Stream& s, const Tensor& dy, const Tensor& x, const Tensor& dw,
                                   absl::Span<const int64_t> offsets, float alpha, float beta) {
  const char* op = "GroupedGemmWeightGrad";
  RETURN_IF_ERROR(Supported(op, s, OpKind::kGroupedGemmWeightGrad));
  RETURN_IF_ERROR(Same(op, s, "dy", dy, "x", x));
  RETURN_IF_ERROR(Flt(op, s, "dw", dw));
  if (dy.rank() != 2 || x.rank() != 2 || dw.rank() != 3 || dy.size(0) != x.size(0) ||
      dw.size(1) != dy.size(1) || dw.size(2) != x.size(1))
    return Bad(op, absl::StrCat("dy ", dy.ToString(), " [rows, P], x ", x.ToString(), " [rows, Q] and dw ",
                                dw.ToString(), " [E, P, Q] do not fit"));
  RETURN_IF_ERROR(Offsets(op, offsets, dw.size(0), x.size(0)));
  RETURN_IF_ERROR(NoOverlap(op, "dy", dy, "dw", dw));
  RETURN_IF_ERROR(NoOverlap(op, "x", x, "dw", dw));
  ProfileScope scope(s, OpKind::kGroupedGemmWeightGrad);
  return s.backend().kernels().GroupedGemmWeightGrad(s, dy, x, dw, offsets, alpha, beta);
}

#define MOE_BINARY_OP(Name, Kind)                                                     \
  absl::Status Name(Stream& s, const Tensor& a, const Tensor& b, const Tensor& out) { \
    RETURN_IF_ERROR(Supported(#Name, s, OpKind::Kind));                               \
    RETURN_IF_ERROR(Flt(#Name, s, "a", a));                                           \
    RETURN_IF_ERROR(Flt(#Name, s, "b", b));                                           \
    RETURN_IF_ERROR(Flt(#Name, s, "out", out));                                       \
    RETURN_IF_ERROR(SameShape(#Name, "a", a, "b", b));                                \
    RETURN_IF_ERROR(SameShape(#Name, "a", a, "out", out));                            \
    RETURN_IF_ERROR(AliasOk(#Name, "a", a, "out", out));                              \
    RETURN_IF_ERROR(AliasOk(#Name, "b", b, "out", out));                              \
    ProfileScope scope(s, OpKind::Kind);                                              \
    return s.backend().kernels().Name(s, a, b, out);                                  \
  }
MOE_BINARY_OP(Add, kAdd)
MOE_BINARY_OP(Mul, kMul)
MOE_BINARY_OP(SwiGLU, kSwiGLU)
#undef MOE_BINARY_OP

absl::Status Axpby(Stream& s, float alpha, const Tensor& x, float beta, const Tensor& y) {
  RETURN_IF_ERROR(Supported("Axpby", s, OpKind::kAxpby));
  RETURN_IF_ERROR(Flt("Axpby", s, "x", x));
  RETURN_IF_ERROR(Flt("Axpby", s, "y", y));
  RETURN_IF_ERROR(AliasOk("Axpby", "x", x, "y", y));
  RETURN_IF_ERROR(SameShape("Axpby", "x", x, "y", y));
  ProfileScope scope(s, OpKind::kAxpby);
  return s.backend().kernels().Axpby(s, alpha, x, beta, y);
}

absl::Status Scale(Stream& s, const Tensor& x, float alpha, const Tensor& out) {
  RETURN_IF_ERROR(Supported("Scale", s, OpKind::kScale));
  RETURN_IF_ERROR(Flt("Scale", s, "x", x));
  RETURN_IF_ERROR(Flt("Scale", s, "out", out));
  RETURN_IF_ERROR(AliasOk("Scale", "x", x, "out", out));
  RETURN_IF_ERROR(SameShape("Scale", "x", x, "out", out));
  ProfileScope scope(s, OpKind::kScale);
  return s.backend().kernels().Scale(s, x, alpha, out);
}

absl::Status Silu(Stream& s, const Tensor& x, const Tensor& out) {
  RETURN_IF_ERROR(Supported("Silu", s, OpKind::kSilu));
  RETURN_IF_ERROR(Flt("Silu", s, "x", x));
  RETURN_IF_ERROR(Flt("Silu", s, "out", out));
  RETURN_IF_ERROR(AliasOk("Silu", "x", x, "out", out));
  RETURN_IF_ERROR(SameShape("Silu", "x", x, "out", out));
  ProfileScope scope(s, OpKind::kSilu);
  return s.backend().kernels().Silu(s, x, out);
}

absl::Status SiluBackward(Stream& s, const Tensor& x, const Tensor& dout, const Tensor& dx, float alpha,
                          float beta) {
  const char* op = "SiluBackward";
  RETURN_IF_ERROR(Supported(op, s, OpKind::kSiluBackward));
  RETURN_IF_ERROR(Flt(op, s, "x", x));
  RETURN_IF_ERROR(Flt(op, s, "dout", dout));
  RETURN_IF_ERROR(Flt(op, s, "dx", dx));
  RETURN_IF_ERROR(AliasOk(op, "x", x, "dx", dx));
  RETURN_IF_ERROR(AliasOk(op, "dout", dout, "dx", dx));
  RETURN_IF_ERROR(SameShape(op, "x", x, "dout", dout));
  RETURN_IF_ERROR(SameShape(op, "x", x, "dx", dx));
  ProfileScope scope(s, OpKind::kSiluBackward);
  return s.backend().kernels().SiluBackward(s, x, dout, dx, alpha, beta);
}

absl::Status SwiGLUBackward(Stream& s, const Tensor& gate, const Tensor& up, const Tensor& dout,
                            const Tensor& dgate, const Tensor& dup) {
  const char* op = "SwiGLUBackward";
  RETURN_IF_ERROR(Supported(op, s, OpKind::kSwiGLUBackward));
  for (auto [name, t] : {std::pair<const char*, const Tensor*>{"gate", &gate},
                         {"up", &up},
                         {"dout", &dout},
                         {"dgate", &dgate},
                         {"dup", &dup}}) {
    RETURN_IF_ERROR(Flt(op, s, name, *t));
    RETURN_IF_ERROR(SameShape(op, "gate", gate, name, *t));
  }
  if (dgate.Overlaps(dup)) return Bad(op, "dgate and dup overlap");
  for (auto [oname, o] : {std::pair<const char*, const Tensor*>{"dgate", &dgate}, {"dup", &dup}})
    for (auto [name, t] :
         {std::pair<const char*, const Tensor*>{"gate", &gate}, {"up", &up}, {"dout", &dout}})
      RETURN_IF_ERROR(AliasOk(op, name, *t, oname, *o));
  ProfileScope scope(s, OpKind::kSwiGLUBackward);
  return s.backend().kernels().SwiGLUBackward(s, gate, up, dout, dgate, dup);
}

absl::Status ReduceSum(Stream& s, const Tensor& x, const Tensor& out, float alpha, float beta) {
  RETURN_IF_ERROR(Supported("ReduceSum", s, OpKind::kReduceSum));
  RETURN_IF_ERROR(Flt("ReduceSum", s, "x", x));
  RETURN_IF_ERROR(F32("ReduceSum", s, "out", out));
  RETURN_IF_ERROR(Numel("ReduceSum", "out", out, 1));
  ProfileScope scope(s, OpKind::kReduceSum);
  return s.backend().kernels().ReduceSum(s, x, out, alpha, beta);
}

absl::Status ReduceSumSquares(Stream& s, const Tensor& x, const Tensor& out, float alpha, float beta) {
  RETURN_IF_ERROR(Supported("ReduceSumSquares", s, OpKind::kReduceSumSquares));
  RETURN_IF_ERROR(Flt("ReduceSumSquares", s, "x", x));
  RETURN_IF_ERROR(F32("ReduceSumSquares", s, "out", out));
  RETURN_IF_ERROR(Numel("ReduceSumSquares", "out", out, 1));
  ProfileScope scope(s, OpKind::kReduceSumSquares);
  return s.backend().kernels().ReduceSumSquares(s, x, out, alpha, beta);
}

absl::Status ReduceMax(Stream& s, const Tensor& x, const Tensor& out) {
  RETURN_IF_ERROR(Supported("ReduceMax", s, OpKind::kReduceMax));
  RETURN_IF_ERROR(Flt("ReduceMax", s, "x", x));
  RETURN_IF_ERROR(F32("ReduceMax", s, "out", out));
  RETURN_IF_ERROR(Numel("ReduceMax", "out", out, 1));
  ProfileScope scope(s, OpKind::kReduceMax);
  return s.backend().kernels().ReduceMax(s, x, out);
}

absl::Status SumRows(Stream& s, const Tensor& x, const Tensor& out, float alpha, float beta) {
  RETURN_IF_ERROR(Supported("SumRows", s, OpKind::kSumRows));
  RETURN_IF_ERROR(Flt("SumRows", s, "x", x));
  RETURN_IF_ERROR(F32("SumRows", s, "out", out));
  if (x.rank() < 1) return Bad("SumRows", "x must have rank >= 1");
  RETURN_IF_ERROR(Numel("SumRows", "out", out, Cols(x)));
  RETURN_IF_ERROR(NoOverlap("SumRows", "x", x, "out", out));
  ProfileScope scope(s, OpKind::kSumRows);
  return s.backend().kernels().SumRows(s, x, out, alpha, beta);
}

absl::Status RmsNorm(Stream& s, const Tensor& x, const Tensor& weight, float eps, const Tensor& out,
                     const Tensor& rstd) {
  const char* op = "RmsNorm";
  RETURN_IF_ERROR(Supported(op, s, OpKind::kRmsNorm));
  RETURN_IF_ERROR(Flt(op, s, "x", x));
  RETURN_IF_ERROR(Flt(op, s, "weight", weight));
  RETURN_IF_ERROR(Flt(op, s, "out", out));
  RETURN_IF_ERROR(AliasOk(op, "x", x, "out", out));
  RETURN_IF_ERROR(F32(op, s, "rstd", rstd));
  if (x.rank() < 1) return Bad(op, "x must have rank >= 1");
  RETURN_IF_ERROR(Numel(op, "weight", weight, Cols(x)));
  RETURN_IF_ERROR(SameShape(op, "x", x, "out", out));
  RETURN_IF_ERROR(Numel(op, "rstd", rstd, LeadRows(x)));
  RETURN_IF_ERROR(NoOverlap(op, "x", x, "rstd", rstd));
  RETURN_IF_ERROR(NoOverlap(op, "out", out, "rstd", rstd));
  ProfileScope scope(s, OpKind::kRmsNorm);
  return s.backend().kernels().RmsNorm(s, x, weight, eps, out, rstd);
}

absl::Status AddRmsNorm(Stream& s, const Tensor& x, const Tensor& residual, const Tensor& weight, float eps,
                        const Tensor& sum, const Tensor& out, const Tensor& rstd) {
  const char* op = "AddRmsNorm";
  RETURN_IF_ERROR(Supported(op, s, OpKind::kAddRmsNorm));
  RETURN_IF_ERROR(Flt(op, s, "x", x));
  RETURN_IF_ERROR(Flt(op, s, "residual", residual));
  RETURN_IF_ERROR(Flt(op, s, "weight", weight));
  RETURN_IF_ERROR(Flt(op, s, "sum", sum));
  RETURN_IF_ERROR(Flt(op, s, "out", out));
  RETURN_IF_ERROR(AliasOk(op, "x", x, "sum", sum));
  RETURN_IF_ERROR(AliasOk(op, "residual", residual, "sum", sum));
  RETURN_IF_ERROR(F32(op, s, "rstd", rstd));
  if (x.rank() < 1) return Bad(op, "x must have rank >= 1");
  RETURN_IF_ERROR(SameShape(op, "x", x, "residual", residual));
  RETURN_IF_ERROR(SameShape(op, "x", x, "sum", sum));
  RETURN_IF_ERROR(SameShape(op, "x", x, "out", out));
  RETURN_IF_ERROR(Numel(op, "weight", weight, Cols(x)));
  RETURN_IF_ERROR(Numel(op, "rstd", rstd, LeadRows(x)));
  for (auto [name, t] :
       {std::pair<const char*, const Tensor*>{"x", &x}, {"residual", &residual}, {"sum", &sum}}) {
    RETURN_IF_ERROR(NoOverlap(op, name, *t, "out", out));
    RETURN_IF_ERROR(NoOverlap(op, name, *t, "rstd", rstd));
  }
  RETURN_IF_ERROR(NoOverlap(op, "out", out, "rstd", rstd));
  ProfileScope scope(s, OpKind::kAddRmsNorm);
  return s.backend().kernels().AddRmsNorm(s, x, residual, weight, eps, sum, out, rstd);
}

absl::Status RmsNormBackward(Stream& s, const Tensor& x, const Tensor& weight, const Tensor& rstd,
                             const Tensor& dout, const Tensor& dx, const Tensor& dweight,
                             bool accumulate_dx) {
  const char* op = "RmsNormBackward";
  RETURN_IF_ERROR(Supported(op, s, OpKind::kRmsNormBackward));
  for (auto [name, t] : {std::pair<const char*, const Tensor*>{"x", &x},
                         {"weight", &weight},
                         {"rstd", &rstd},
                         {"dout", &dout},
                         {"dx", &dx},
                         {"dweight", &dweight}})
    RETURN_IF_ERROR(t == &rstd ? F32(op, s, name, *t) : Flt(op, s, name, *t));
  if (x.rank() < 1) return Bad(op, "x must have rank >= 1");
  RETURN_IF_ERROR(Numel(op, "weight", weight, Cols(x)));
  RETURN_IF_ERROR(Numel(op, "dweight", dweight, Cols(x)));
  RETURN_IF_ERROR(Numel(op, "rstd", rstd, LeadRows(x)));
  RETURN_IF_ERROR(SameShape(op, "x", x, "dout", dout));
  RETURN_IF_ERROR(SameShape(op, "x", x, "dx", dx));
  RETURN_IF_ERROR(NoOverlap(op, "x", x, "dx", dx));
  RETURN_IF_ERROR(NoOverlap(op, "dout", dout, "dx", dx));
  ProfileScope scope(s, OpKind::kRmsNormBackward);
  return s.backend().kernels().RmsNormBackward(s, x, weight, rstd, dout, dx, dweight, accumulate_dx);
}

namespace {
absl::Status RopeArgs(const char* op, Stream& s, const Tensor& in, const Tensor& out) {
  RETURN_IF_ERROR(Same(op, s, "input", in, "output", out));
  if (in.rank() != 4 || in.size(3) % 2 != 0)
    return Bad(op, absl::StrCat("input ", in.ToString(),
                                " must be [B, S, num_heads, head_dim] with an even head_dim"));
  RETURN_IF_ERROR(SameShape(op, "input", in, "output", out));
  if (in.Overlaps(out) && in.raw_data() != out.raw_data()) return Bad(op, "output partially overlaps input");
  return absl::OkStatus();
}
}  // namespace

absl::Status Rope(Stream& s, const Tensor& x, const Tensor& out, double theta, int64_t position_offset) {
  RETURN_IF_ERROR(Supported("Rope", s, OpKind::kRope));
  RETURN_IF_ERROR(RopeArgs("Rope", s, x, out));
  ProfileScope scope(s, OpKind::kRope);
  return s.backend().kernels().Rope(s, x, out, theta, position_offset);
}

absl::Status RopeBackward(Stream& s, const Tensor& dout, const Tensor& dx, double theta,
                          int64_t position_offset) {
  RETURN_IF_ERROR(Supported("RopeBackward", s, OpKind::kRopeBackward));
  RETURN_IF_ERROR(RopeArgs("RopeBackward", s, dout, dx));
  ProfileScope scope(s, OpKind::kRopeBackward);
  return s.backend().kernels().RopeBackward(s, dout, dx, theta, position_offset);
}

namespace {
absl::Status AttentionArgs(const char* op, Stream& s, const Tensor& q, const Tensor& k, const Tensor& v,
                           const Tensor& lse) {
  RETURN_IF_ERROR(Same(op, s, "q", q, "k", k));
  RETURN_IF_ERROR(Same(op, s, "q", q, "v", v));
  RETURN_IF_ERROR(F32(op, s, "lse", lse));
  if (q.rank() != 4 || k.rank() != 4)
    return Bad(op,
               absl::StrCat("q ", q.ToString(), " and k ", k.ToString(), " must be [B, S, heads, head_dim]"));
  RETURN_IF_ERROR(SameShape(op, "k", k, "v", v));
  int64_t b = q.size(0), sl = q.size(1), h = q.size(2), hd = q.size(3), hkv = k.size(2);
  if (k.size(0) != b || k.size(1) != sl || k.size(3) != hd || hkv == 0 || h % hkv != 0)
    return Bad(op, absl::StrCat("k ", k.ToString(),
                                " must be [B, S, Hkv, hd] with Hkv dividing H;"
                                " q is ",
                                q.ToString()));
  if (lse.shape() != Shape({b, h, sl}))
    return Bad(op, absl::StrCat("lse ", lse.ToString(), " must be [", b, ",", h, ",", sl, "] (B, H, S)"));
  return absl::OkStatus();
}
}  // namespace

absl::Status CausalAttention(Stream& s, const Tensor& q, const Tensor& k, const Tensor& v, float scale,
                             const Tensor& out, const Tensor& lse) {
  const char* op = "CausalAttention";
  RETURN_IF_ERROR(Supported(op, s, OpKind::kCausalAttention));
  RETURN_IF_ERROR(AttentionArgs(op, s, q, k, v, lse));
  RETURN_IF_ERROR(Same(op, s, "q", q, "out", out));
  RETURN_IF_ERROR(SameShape(op, "q", q, "out", out));
  for (auto [name, t] : {std::pair<const char*, const Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    RETURN_IF_ERROR(NoOverlap(op, name, *t, "out", out));
    RETURN_IF_ERROR(NoOverlap(op, name, *t, "lse", lse));
  }
  if (out.Overlaps(lse)) return Bad(op, "out overlaps lse");
  ProfileScope scope(s, OpKind::kCausalAttention);
  return s.backend().kernels().CausalAttention(s, q, k, v, scale, out, lse);
}

absl::Status CausalAttentionBackward(Stream& s, const Tensor& q, const Tensor& k, const Tensor& v,
                                     const Tensor& out, const Tensor& lse, float scale, const Tensor& dout,
                                     const Tensor& dq, const Tensor& dk, const Tensor& dv) {
  const char* op = "CausalAttentionBackward";
  RETURN_IF_ERROR(Supported(op, s, OpKind::kCausalAttentionBackward));
  RETURN_IF_ERROR(AttentionArgs(op, s, q, k, v, lse));
  for (auto [name, t] : {std::pair<const char*, const Tensor*>{"out", &out},
                         {"dout", &dout},
                         {"dq", &dq},
                         {"dk", &dk},
                         {"dv", &dv}})
    RETURN_IF_ERROR(Same(op, s, "q", q, name, *t));
  RETURN_IF_ERROR(SameShape(op, "q", q, "out", out));
  RETURN_IF_ERROR(SameShape(op, "q", q, "dout", dout));
  RETURN_IF_ERROR(SameShape(op, "q", q, "dq", dq));
  RETURN_IF_ERROR(SameShape(op, "k", k, "dk", dk));
  RETURN_IF_ERROR(SameShape(op, "v", v, "dv", dv));
  for (auto [oname, o] : {std::pair<const char*, const Tensor*>{"dq", &dq}, {"dk", &dk}, {"dv", &dv}})
    for (auto [name, t] : {std::pair<const char*, const Tensor*>{"q", &q},
                           {"k", &k},
                           {"v", &v},
                           {"out", &out},
                           {"lse", &lse},
                           {"dout", &dout}})
      RETURN_IF_ERROR(NoOverlap(op, name, *t, oname, *o));
  if (dq.Overlaps(dk) || dq.Overlaps(dv) || dk.Overlaps(dv)) return Bad(op, "dq, dk, dv overlap");
  ProfileScope scope(s, OpKind::kCausalAttentionBackward);
  return s.backend().kernels().CausalAttentionBackward(s, q, k, v, out, lse, scale, dout, dq, dk, dv);
}

absl::Status Softmax(Stream& s, const Tensor& x, const Tensor& out) {
  RETURN_IF_ERROR(Supported("Softmax", s, OpKind::kSoftmax));
  RETURN_IF_ERROR(F32("Softmax", s, "x", x));
  RETURN_IF_ERROR(F32("Softmax", s, "out", out));
  RETURN_IF_ERROR(SameShape("Softmax", "x", x, "out", out));
  if (x.rank() < 1) return Bad("Softmax", "x must have rank >= 1");
  ProfileScope scope(s, OpKind::kSoftmax);
  return s.backend().kernels().Softmax(s, x, out);
}

absl::Status SoftmaxBackward(Stream& s, const Tensor& y, const Tensor& dy, const Tensor& dx, float alpha,
                             float beta) {
  const char* op = "SoftmaxBackward";
  RETURN_IF_ERROR(Supported(op, s, OpKind::kSoftmaxBackward));
  RETURN_IF_ERROR(F32(op, s, "y", y));
  RETURN_IF_ERROR(F32(op, s, "dy", dy));
  RETURN_IF_ERROR(F32(op, s, "dx", dx));
  if (y.rank() < 1) return Bad(op, "y must have rank >= 1");
  RETURN_IF_ERROR(SameShape(op, "y", y, "dy", dy));
  RETURN_IF_ERROR(SameShape(op, "y", y, "dx", dx));
  RETURN_IF_ERROR(NoOverlap(op, "y", y, "dx", dx));
  RETURN_IF_ERROR(NoOverlap(op, "dy", dy, "dx", dx));
  ProfileScope scope(s, OpKind::kSoftmaxBackward);
  return s.backend().kernels().SoftmaxBackward(s, y, dy, dx, alpha, beta);
}

absl::Status LogSumExp(Stream& s, const Tensor& x, const Tensor& out) {
  RETURN_IF_ERROR(Supported("LogSumExp", s, OpKind::kLogSumExp));
  RETURN_IF_ERROR(F32("LogSumExp", s, "x", x));
  RETURN_IF_ERROR(F32("LogSumExp", s, "out", out));
  if (x.rank() < 1) return Bad("LogSumExp", "x must have rank >= 1");
  RETURN_IF_ERROR(Numel("LogSumExp", "out", out, LeadRows(x)));
  RETURN_IF_ERROR(NoOverlap("LogSumExp", "x", x, "out", out));
  ProfileScope scope(s, OpKind::kLogSumExp);
  return s.backend().kernels().LogSumExp(s, x, out);
}

absl::Status CrossEntropy(Stream& s, const Tensor& logits, const Tensor& targets, const Tensor& losses,
                          const Tensor& lse) {
  const char* op = "CrossEntropy";
  RETURN_IF_ERROR(Supported(op, s, OpKind::kCrossEntropy));
  RETURN_IF_ERROR(Flt(op, s, "logits", logits));
  RETURN_IF_ERROR(Arg(op, s, "targets", targets, DType::kI32));
  RETURN_IF_ERROR(F32(op, s, "losses", losses));
  RETURN_IF_ERROR(F32(op, s, "lse", lse));
  if (logits.rank() < 2) return Bad(op, "logits must have rank >= 2");
  int64_t t = LeadRows(logits);
  RETURN_IF_ERROR(Numel(op, "targets", targets, t));
  RETURN_IF_ERROR(Numel(op, "losses", losses, t));
  RETURN_IF_ERROR(Numel(op, "lse", lse, t));
  RETURN_IF_ERROR(NoOverlap(op, "logits", logits, "losses", losses));
  RETURN_IF_ERROR(NoOverlap(op, "logits", logits, "lse", lse));
  if (losses.Overlaps(lse)) return Bad(op, "losses and lse overlap");
  ProfileScope scope(s, OpKind::kCrossEntropy);
  return s.backend().kernels().CrossEntropy(s, logits, targets, losses, lse);
}

absl::Status CrossEntropyBackward(Stream& s, const Tensor& logits, const Tensor& targets, const Tensor& lse,
                                  const Tensor& dloss, float scale, const Tensor& dlogits) {
  const char* op = "CrossEntropyBackward";
  RETURN_IF_ERROR(Supported(op, s, OpKind::kCrossEntropyBackward));
  RETURN_IF_ERROR(Flt(op, s, "logits", logits));
  RETURN_IF_ERROR(Arg(op, s, "targets", targets, DType::kI32));
  RETURN_IF_ERROR(F32(op, s, "lse", lse));
  RETURN_IF_ERROR(Flt(op, s, "dlogits", dlogits));
  if (logits.rank() < 2) return Bad(op, "logits must have rank >= 2");
  int64_t t = LeadRows(logits);
  RETURN_IF_ERROR(Numel(op, "targets", targets, t));
  RETURN_IF_ERROR(Numel(op, "lse", lse, t));
  if (dloss.defined()) {
    RETURN_IF_ERROR(F32(op, s, "dloss", dloss));
    RETURN_IF_ERROR(Numel(op, "dloss", dloss, t));
  }
  RETURN_IF_ERROR(SameShape(op, "logits", logits, "dlogits", dlogits));
  RETURN_IF_ERROR(AliasOk(op, "logits", logits, "dlogits", dlogits));
  ProfileScope scope(s, OpKind::kCrossEntropyBackward);
  return s.backend().kernels().CrossEntropyBackward(s, logits, targets, lse, dloss, scale, dlogits);
}

absl::Status TopK(Stream& s, const Tensor& x, int k, const Tensor& values, const Tensor& indices) {
  const char* op = "TopK";
  RETURN_IF_ERROR(Supported(op, s, OpKind::kTopK));
  RETURN_IF_ERROR(F32(op, s, "x", x));
  RETURN_IF_ERROR(F32(op, s, "values", values));
  RETURN_IF_ERROR(Arg(op, s, "indices", indices, DType::kI32));
  if (x.rank() < 1) return Bad(op, "x must have rank >= 1");
  if (k < 1 || k > Cols(x))
    return Bad(op,
               absl::StrCat("k = ", k, " must be in [1, ", Cols(x), "] (columns of x ", x.ToString(), ")"));
  RETURN_IF_ERROR(Numel(op, "values", values, LeadRows(x) * k));
  RETURN_IF_ERROR(Numel(op, "indices", indices, LeadRows(x) * k));
  RETURN_IF_ERROR(NoOverlap(op, "x", x, "values", values));
  ProfileScope scope(s, OpKind::kTopK);
  return s.backend().kernels().TopK(s, x, k, values, indices);
}

absl::Status RouterScores(Stream& s, const Tensor& logits, const Tensor& bias, const Tensor& selection,
                          const RouterChoice& choice, const Tensor& scores, const Tensor& aux_scores,
                          const Tensor& lse, const Tensor& experts, const Tensor& selected) {
  const char* op = "RouterScores";
  RETURN_IF_ERROR(Supported(op, s, OpKind::kRouterScores));
  RETURN_IF_ERROR(F32(op, s, "logits", logits));
  if (logits.rank() != 2) return Bad(op, absl::StrCat("logits ", logits.ToString(), " must be [T, E]"));
  const int64_t T = logits.size(0), E = logits.size(1);
  const int k = choice.top_k;
  if (E < 1 || k < 1 || k > E)
    return Bad(op, absl::StrCat("top_k = ", k, " must be in [1, ", E, "] (the experts of logits)"));
  if (choice.group_topk < 0 || (choice.group_topk > 0 && choice.group_topk < choice.num_groups &&
                                (choice.num_groups > kmath::kRouterMaxGroups || E % choice.num_groups != 0 ||
                                 choice.group_topk * (E / choice.num_groups) < k))) {
    return Bad(op, absl::StrCat("group_topk = ", choice.group_topk, " of num_groups = ", choice.num_groups,
                                " must pick at least top_k = ", k, " of ", E,
                                " experts in groups of equal size, with at most ", kmath::kRouterMaxGroups,
                                " groups"));
  }
  RETURN_IF_ERROR(F32(op, s, "scores", scores));
  RETURN_IF_ERROR(SameShape(op, "logits", logits, "scores", scores));
  RETURN_IF_ERROR(F32(op, s, "lse", lse));
  RETURN_IF_ERROR(Numel(op, "lse", lse, T));
  RETURN_IF_ERROR(Arg(op, s, "experts", experts, DType::kI32));
  RETURN_IF_ERROR(Numel(op, "experts", experts, T * k));
  RETURN_IF_ERROR(F32(op, s, "selected", selected));
  RETURN_IF_ERROR(Numel(op, "selected", selected, T * k));
  if (bias.defined()) {
    RETURN_IF_ERROR(F32(op, s, "bias", bias));
    RETURN_IF_ERROR(Numel(op, "bias", bias, E));
  }
  if (selection.defined()) {
    RETURN_IF_ERROR(Arg(op, s, "selection", selection, DType::kI32));
    RETURN_IF_ERROR(Numel(op, "selection", selection, T * k));
  }
  if (aux_scores.defined()) {
    if (!choice.sigmoid) return Bad(op, "aux_scores are the sigmoid router's (softmax: they are the scores)");
    RETURN_IF_ERROR(F32(op, s, "aux_scores", aux_scores));
    RETURN_IF_ERROR(SameShape(op, "logits", logits, "aux_scores", aux_scores));
    RETURN_IF_ERROR(NoOverlap(op, "scores", scores, "aux_scores", aux_scores));
  }
  RETURN_IF_ERROR(NoOverlap(op, "logits", logits, "scores", scores));
  RETURN_IF_ERROR(NoOverlap(op, "logits", logits, "lse", lse));
  RETURN_IF_ERROR(NoOverlap(op, "scores", scores, "selected", selected));
  ProfileScope scope(s, OpKind::kRouterScores);
  return s.backend().kernels().RouterScores(s, logits, bias, selection, choice, scores, aux_scores, lse,
                                            experts, selected);
}

absl::Status RouterScoresBackward(Stream& s, const Tensor& scores, const Tensor& logits, const Tensor& lse,
                                  const Tensor& daux, const Tensor& dscores, bool sigmoid, float z_coef,
                                  const Tensor& dlogits) {
  const char* op = "RouterScoresBackward";
  RETURN_IF_ERROR(Supported(op, s, OpKind::kRouterScoresBackward));
  RETURN_IF_ERROR(F32(op, s, "scores", scores));
  if (scores.rank() != 2) return Bad(op, absl::StrCat("scores ", scores.ToString(), " must be [T, E]"));
  const int64_t T = scores.size(0), E = scores.size(1);
  if (sigmoid || logits.defined()) {
    if (!logits.defined()) return Bad(op, "the sigmoid router's backward needs its logits");
    RETURN_IF_ERROR(F32(op, s, "logits", logits));
    RETURN_IF_ERROR(SameShape(op, "scores", scores, "logits", logits));
  }
  RETURN_IF_ERROR(F32(op, s, "lse", lse));
  RETURN_IF_ERROR(Numel(op, "lse", lse, T));
  RETURN_IF_ERROR(F32(op, s, "daux", daux));
  if (daux.rank() != 2 || daux.size(1) != E || daux.size(0) < 1 || T % daux.size(0) != 0) {
    return Bad(op, absl::StrCat("daux ", daux.ToString(), " must be [B, ", E, "] with B dividing T = ", T));
  }
  if (dscores.defined()) {
    RETURN_IF_ERROR(F32(op, s, "dscores", dscores));
    RETURN_IF_ERROR(SameShape(op, "scores", scores, "dscores", dscores));
    RETURN_IF_ERROR(AliasOk(op, "dscores", dscores, "dlogits", dlogits));
  }
  RETURN_IF_ERROR(F32(op, s, "dlogits", dlogits));
  RETURN_IF_ERROR(SameShape(op, "scores", scores, "dlogits", dlogits));
  RETURN_IF_ERROR(NoOverlap(op, "scores", scores, "dlogits", dlogits));
  if (logits.defined()) RETURN_IF_ERROR(NoOverlap(op, "logits", logits, "dlogits", dlogits));
  RETURN_IF_ERROR(NoOverlap(op, "daux", daux, "dlogits", dlogits));
  ProfileScope scope(s, OpKind::kRouterScoresBackward);
  return s.backend().kernels().RouterScoresBackward(s, scores, logits, lse, daux, dscores, sigmoid, z_coef,
                                                    dlogits);
}

absl::Status GatherRows(Stream& s, const Tensor& src, const Tensor& index, const Tensor& dst,
                        const Tensor& weight) {
  const char* op = "GatherRows";
  RETURN_IF_ERROR(Supported(op, s, OpKind::kGatherRows));
  if (weight.defined()) {  // a product: f32 or bf16 rows each, an f32 weight per row
    RETURN_IF_ERROR(Flt(op, s, "src", src));
    RETURN_IF_ERROR(Flt(op, s, "dst", dst));
    RETURN_IF_ERROR(F32(op, s, "weight", weight));
    RETURN_IF_ERROR(Numel(op, "weight", weight, index.numel()));
    RETURN_IF_ERROR(NoOverlap(op, "weight", weight, "dst", dst));
  } else {  // a copy: one dtype
    RETURN_IF_ERROR(Arg(op, s, "src", src, src.dtype()));
    RETURN_IF_ERROR(Arg(op, s, "dst", dst, src.dtype()));
  }
  RETURN_IF_ERROR(Arg(op, s, "index", index, DType::kI32));
  if (src.rank() < 1 || dst.rank() < 1 || Cols(src) != Cols(dst) || LeadRows(dst) != index.numel())
    return Bad(op, absl::StrCat("src ", src.ToString(), " [N, d], index ", index.ToString(), " [M] and dst ",
                                dst.ToString(), " [M, d] do not fit"));
  RETURN_IF_ERROR(NoOverlap(op, "src", src, "dst", dst));
  ProfileScope scope(s, OpKind::kGatherRows);
  return s.backend().kernels().GatherRows(s, src, index, dst, weight);
}

absl::Status ScatterAddRows(Stream& s, const Tensor& src, const Tensor& index, const Tensor& dst,
                            const Tensor& weight, ScatterMode mode, const Tensor& by_row) {
  const char* op = "ScatterAddRows";
  RETURN_IF_ERROR(Supported(op, s, OpKind::kScatterAddRows));
  RETURN_IF_ERROR(Flt(op, s, "src", src));
  RETURN_IF_ERROR(Arg(op, s, "index", index, DType::kI32));
  RETURN_IF_ERROR(Flt(op, s, "dst", dst));
  if (src.rank() < 1 || dst.rank() < 1 || Cols(src) != Cols(dst) || LeadRows(src) != index.numel())
    return Bad(op, absl::StrCat("src ", src.ToString(), " [M, d], index ", index.ToString(), " [M] and dst ",
                                dst.ToString(), " [N, d] do not fit"));
  if (weight.defined()) {
    RETURN_IF_ERROR(F32(op, s, "weight", weight));
    RETURN_IF_ERROR(Numel(op, "weight", weight, index.numel()));
    RETURN_IF_ERROR(NoOverlap(op, "weight", weight, "dst", dst));
  }
  if (by_row.defined()) {
    RETURN_IF_ERROR(Arg(op, s, "by_row", by_row, DType::kI32));
    RETURN_IF_ERROR(Numel(op, "by_row", by_row, LeadRows(dst) + 1 + index.numel()));
  }
  RETURN_IF_ERROR(NoOverlap(op, "src", src, "dst", dst));
  ProfileScope scope(s, OpKind::kScatterAddRows);
  return s.backend().kernels().ScatterAddRows(s, src, index, dst, weight, mode, by_row);
}

absl::StatusOr<std::vector<int32_t>> ScatterRowOrder(absl::Span<const int32_t> index, int64_t n) {
  const int64_t m = static_cast<int64_t>(index.size());
  if (n < 0 || n >= std::numeric_limits<int32_t>::max() || m >= std::numeric_limits<int32_t>::max())
    return Bad("ScatterRowOrder", absl::StrCat(m, " sources into ", n, " rows do not fit int32 offsets"));
  std::vector<int32_t> out(n + 1 + m, 0);
  int32_t* offsets = out.data();
  for (int64_t i = 0; i < m; ++i) {
    if (index[i] < 0 || index[i] >= n)
      return Bad("ScatterRowOrder", absl::StrCat("index[", i, "] = ", index[i], " is outside [0, ", n, ")"));
    ++offsets[index[i] + 1];
  }
  for (int64_t r = 0; r < n; ++r) offsets[r + 1] += offsets[r];
  std::vector<int32_t> next(offsets, offsets + n);  // a stable counting sort
  for (int64_t i = 0; i < m; ++i) out[n + 1 + next[index[i]]++] = static_cast<int32_t>(i);
  return out;
}

absl::Status GatherRowDot(Stream& s, const Tensor& a, const Tensor& index, const Tensor& b, const Tensor& out,
                          float alpha, float beta) {
  const char* op = "GatherRowDot";
  RETURN_IF_ERROR(Supported(op, s, OpKind::kGatherRowDot));
  RETURN_IF_ERROR(Flt(op, s, "a", a));
  RETURN_IF_ERROR(Arg(op, s, "index", index, DType::kI32));
  RETURN_IF_ERROR(Flt(op, s, "b", b));
  RETURN_IF_ERROR(F32(op, s, "out", out));
  if (a.rank() < 1 || b.rank() < 1 || Cols(a) != Cols(b) || LeadRows(b) != index.numel())
    return Bad(op, absl::StrCat("a ", a.ToString(), " [N, d], index ", index.ToString(), " [M], b ",
                                b.ToString(), " [M, d] do not fit"));
  RETURN_IF_ERROR(Numel(op, "out", out, index.numel()));
  RETURN_IF_ERROR(NoOverlap(op, "a", a, "out", out));
  RETURN_IF_ERROR(NoOverlap(op, "b", b, "out", out));
  ProfileScope scope(s, OpKind::kGatherRowDot);
  return s.backend().kernels().GatherRowDot(s, a, index, b, out, alpha, beta);
}

absl::Status InitNormal(Stream& s, const Tensor& t, uint64_t seed, absl::string_view name,
                        const Shape& global_shape, absl::Span<const int64_t> offsets, float std) {
  const char* op = "InitNormal";
  RETURN_IF_ERROR(Supported(op, s, OpKind::kInitNormal));
  RETURN_IF_ERROR(F32(op, s, "t", t));
  if (global_shape.rank() != t.rank() || static_cast<int>(offsets.size()) != t.rank())
    return Bad(op, absl::StrCat("parameter ", std::string(name), ": t ", t.ToString(), ", global shape ",
                                global_shape.ToString(), " and ", offsets.size(),
                                " offsets must have the same rank"));
  for (int d = 0; d < t.rank(); ++d)
    if (offsets[d] < 0 || offsets[d] + t.size(d) > global_shape[d])
      return Bad(op, absl::StrCat("parameter ", std::string(name), ": box at offsets [",
                                  absl::StrJoin(offsets, ","), "] of shape ", t.shape().ToString(),
                                  " exceeds the global shape ", global_shape.ToString()));
  ProfileScope scope(s, OpKind::kInitNormal);
  return s.backend().kernels().InitNormal(s, t, seed, name, global_shape, offsets, std);
}

absl::Status InitNormal(Stream& s, const Tensor& t, uint64_t seed, absl::string_view name, float std) {
  if (!t.defined()) return Bad("InitNormal", "t is undefined");
  std::vector<int64_t> zeros(t.rank(), 0);
  return InitNormal(s, t, seed, name, t.shape(), zeros, std);
}

namespace {

// One AdamW target's tensors; `prefix` names it in a list ("targets[3].").
absl::Status CheckAdamWTensors(Stream& s, const std::string& prefix, const Tensor& param, const Tensor& grad,
                               const Tensor& exp_avg, const Tensor& exp_avg_sq, const Tensor& param_bf16) {
  const char* op = "AdamW";
  const std::pair<const char*, const Tensor*> f32_args[] = {
      {"param", &param}, {"grad", &grad}, {"exp_avg", &exp_avg}, {"exp_avg_sq", &exp_avg_sq}};
  for (auto [name, t] : f32_args) {
    const std::string full = prefix + name;
    RETURN_IF_ERROR(F32(op, s, full.c_str(), *t));
    RETURN_IF_ERROR(Numel(op, full.c_str(), *t, param.numel()));
  }
  if (param_bf16.defined()) {
    const std::string full = prefix + "param_bf16";
    RETURN_IF_ERROR(Arg(op, s, full.c_str(), param_bf16, DType::kBF16));
    RETURN_IF_ERROR(Numel(op, full.c_str(), param_bf16, param.numel()));
    for (auto [name, t] : f32_args) {
      if (t->Overlaps(param_bf16))
        return Bad(op, absl::StrCat(full, " ", param_bf16.ToString(), " overlaps ", prefix, name, " ",
                                    t->ToString()));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckAdamWScalars(int64_t step, float grad_scale) {
  if (step < 1) return Bad("AdamW", absl::StrCat("step = ", step, " must be >= 1"));
  if (!std::isfinite(grad_scale))
    return Bad("AdamW", absl::StrCat("grad_scale = ", grad_scale, " must be finite"));
  return absl::OkStatus();
}

// The list elements' tensors (name, tensor; element_of: which element each
// belongs to) overlap no tensor of another element, so that a backend may
// run the elements at once. A sweep in address order keeps the furthest-
// reaching tensor so far and the furthest of any other element.
absl::Status NoOverlapAcross(const char* op, const std::vector<std::pair<std::string, Tensor>>& named,
                             const std::vector<size_t>& element_of) {
  const auto begin = [&](size_t j) { return reinterpret_cast<uintptr_t>(named[j].second.raw_data()); };
  const auto end = [&](size_t j) { return begin(j) + named[j].second.nbytes(); };
  std::vector<size_t> order;
  for (size_t i = 0; i < named.size(); ++i)
    if (named[i].second.defined() && named[i].second.nbytes() > 0) order.push_back(i);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return begin(a) < begin(b); });
  constexpr size_t kNone = ~size_t{0};
  size_t best = kNone, other = kNone;  // other: the furthest with an element other than best's
  for (size_t i : order) {
    const size_t witness = best != kNone && element_of[best] != element_of[i] ? best : other;
    if (witness != kNone && end(witness) > begin(i)) {
      return Bad(op, absl::StrCat(named[i].first, " ", named[i].second.ToString(), " overlaps ",
                                  named[witness].first, " ", named[witness].second.ToString(),
                                  " (the list's elements must be disjoint)"));
    }
    if (best != kNone && element_of[best] == element_of[i]) {
      if (end(i) > end(best)) best = i;
    } else if (best == kNone || end(i) > end(best)) {
      other = best;
      best = i;
    } else if (other == kNone || end(i) > end(other)) {
      other = i;
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status AdamW(Stream& s, const Tensor& param, const Tensor& grad, const Tensor& exp_avg,
                   const Tensor& exp_avg_sq, float lr, float beta1, float beta2, float eps,
                   float weight_decay, int64_t step, const Tensor& param_bf16, float grad_scale) {
  RETURN_IF_ERROR(Supported("AdamW", s, OpKind::kAdamW));
  RETURN_IF_ERROR(CheckAdamWTensors(s, "", param, grad, exp_avg, exp_avg_sq, param_bf16));
  RETURN_IF_ERROR(CheckAdamWScalars(step, grad_scale));
  ProfileScope scope(s, OpKind::kAdamW);
  return s.backend().kernels().AdamW(s, param, grad, exp_avg, exp_avg_sq, param_bf16, grad_scale, lr, beta1,
                                     beta2, eps, weight_decay, step);
}

absl::Status Fill(Stream& s, absl::Span<const Tensor> ts, double value) {
  RETURN_IF_ERROR(Supported("Fill", s, OpKind::kFill));
  std::vector<std::pair<std::string, Tensor>> named;
  std::vector<size_t> element_of;
  for (size_t i = 0; i < ts.size(); ++i) {
    const std::string name = absl::StrCat("ts[", i, "]");
    RETURN_IF_ERROR(Arg("Fill", s, name.c_str(), ts[i], ts[i].dtype()));
    if (ts[i].dtype() == DType::kU8) return Bad("Fill", absl::StrCat(name, ": u8 tensors are not supported"));
    named.emplace_back(name, ts[i]);
    element_of.push_back(i);
  }
  RETURN_IF_ERROR(NoOverlapAcross("Fill", named, element_of));
  ProfileScope scope(s, OpKind::kFill);
  return s.backend().kernels().FillMany(s, ts, value);
}

absl::Status ReduceSumSquares(Stream& s, absl::Span<const Tensor> xs, const Tensor& out) {
  const char* op = "ReduceSumSquares";
  RETURN_IF_ERROR(Supported(op, s, OpKind::kReduceSumSquares));
  RETURN_IF_ERROR(F32(op, s, "out", out));
  RETURN_IF_ERROR(Numel(op, "out", out, static_cast<int64_t>(xs.size())));
  for (size_t i = 0; i < xs.size(); ++i) {
    const std::string name = absl::StrCat("xs[", i, "]");
    RETURN_IF_ERROR(Flt(op, s, name.c_str(), xs[i]));
    RETURN_IF_ERROR(NoOverlap(op, name.c_str(), xs[i], "out", out));
  }
  ProfileScope scope(s, OpKind::kReduceSumSquares);
  return s.backend().kernels().ReduceSumSquaresMany(s, xs, out);
}

absl::Status AdamW(Stream& s, absl::Span<const AdamWTarget> targets, float lr, float beta1, float beta2,
                   float eps, int64_t step, float grad_scale) {
  RETURN_IF_ERROR(Supported("AdamW", s, OpKind::kAdamW));
  std::vector<std::pair<std::string, Tensor>> named;
  std::vector<size_t> element_of;
  for (size_t i = 0; i < targets.size(); ++i) {
    const AdamWTarget& t = targets[i];
    const std::string prefix = absl::StrCat("targets[", i, "].");
    RETURN_IF_ERROR(CheckAdamWTensors(s, prefix, t.param, t.grad, t.exp_avg, t.exp_avg_sq, t.param_bf16));
    for (auto [name, tensor] : {std::pair<const char*, const Tensor*>{"param", &t.param},
                                {"grad", &t.grad},
                                {"exp_avg", &t.exp_avg},
                                {"exp_avg_sq", &t.exp_avg_sq},
                                {"param_bf16", &t.param_bf16}}) {
      named.emplace_back(prefix + name, *tensor);
      element_of.push_back(i);
    }
  }
  RETURN_IF_ERROR(NoOverlapAcross("AdamW", named, element_of));
  RETURN_IF_ERROR(CheckAdamWScalars(step, grad_scale));
  ProfileScope scope(s, OpKind::kAdamW);
  return s.backend().kernels().AdamWMany(s, targets, grad_scale, lr, beta1, beta2, eps, step);
}

}  // namespace moe::ops
