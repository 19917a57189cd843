#include "model/swiglu.h"

#include "runtime/core/ops.h"
#include "runtime/core/status.h"

namespace moe::model {

absl::Status SwiGLUForward(Stream& stream, const Tensor& x, const Tensor& wg, const Tensor& wu,
                           const Tensor& wd, const Tensor& gate, const Tensor& up, const Tensor& act,
                           const Tensor& y) {
  if (x.size(0) == 0) return absl::OkStatus();
  RETURN_IF_ERROR(ops::Gemm(stream, x, false, wg, true, gate));
  RETURN_IF_ERROR(ops::Gemm(stream, x, false, wu, true, up));
  RETURN_IF_ERROR(ops::SwiGLU(stream, gate, up, act));
  return ops::Gemm(stream, act, false, wd, true, y);
}

absl::Status SwiGLUBackward(Stream& stream, const Tensor& x, const Tensor& wg, const Tensor& wu,
                            const Tensor& wd, const Tensor& gate, const Tensor& up, const Tensor& act,
                            const Tensor& dact, const Tensor& dy, const Tensor& dwg, const Tensor& dwu,
                            const Tensor& dwd, const Tensor& dx) {
  if (x.size(0) == 0) return absl::OkStatus();
  RETURN_IF_ERROR(ops::Gemm(stream, dy, true, act, false, dwd, 1.0f, 1.0f));
  RETURN_IF_ERROR(ops::Gemm(stream, dy, false, wd, false, dact));
  RETURN_IF_ERROR(ops::SwiGLUBackward(stream, gate, up, dact, gate, up));  // in place
  RETURN_IF_ERROR(ops::Gemm(stream, gate, true, x, false, dwg, 1.0f, 1.0f));
  RETURN_IF_ERROR(ops::Gemm(stream, up, true, x, false, dwu, 1.0f, 1.0f));
  RETURN_IF_ERROR(ops::Gemm(stream, gate, false, wg, false, dx));
  return ops::Gemm(stream, up, false, wu, false, dx, 1.0f, 1.0f);
}

absl::Status GroupedSwiGLUForward(Stream& stream, const Tensor& x, const Tensor& wg, const Tensor& wu,
                                  const Tensor& wd, absl::Span<const int64_t> offsets, const Tensor& gate,
                                  const Tensor& up, const Tensor& act, const Tensor& y) {
  if (x.size(0) == 0) return absl::OkStatus();
  RETURN_IF_ERROR(ops::GroupedGemm(stream, x, wg, true, gate, offsets));
  RETURN_IF_ERROR(ops::GroupedGemm(stream, x, wu, true, up, offsets));
  RETURN_IF_ERROR(ops::SwiGLU(stream, gate, up, act));
  return ops::GroupedGemm(stream, act, wd, true, y, offsets);
}

absl::Status GroupedSwiGLUBackward(Stream& stream, const Tensor& x, const Tensor& wg, const Tensor& wu,
                                   const Tensor& wd, absl::Span<const int64_t> offsets, const Tensor& gate,
                                   const Tensor& up, const Tensor& act, const Tensor& dact, const Tensor& dy,
                                   const Tensor& dwg, const Tensor& dwu, const Tensor& dwd,
                                   const Tensor& dx) {
  if (x.size(0) == 0) return absl::OkStatus();
  RETURN_IF_ERROR(ops::GroupedGemmWeightGrad(stream, dy, act, dwd, offsets, 1.0f, 1.0f));
  RETURN_IF_ERROR(ops::GroupedGemm(stream, dy, wd, false, dact, offsets));
  RETURN_IF_ERROR(ops::SwiGLUBackward(stream, gate, up, dact, gate, up));  // in place
  RETURN_IF_ERROR(ops::GroupedGemmWeightGrad(stream, gate, x, dwg, offsets, 1.0f, 1.0f));
  RETURN_IF_ERROR(ops::GroupedGemmWeightGrad(stream, up, x, dwu, offsets, 1.0f, 1.0f));
  RETURN_IF_ERROR(ops::GroupedGemm(stream, gate, wg, false, dx, offsets));
  return ops::GroupedGemm(stream, up, wu, false, dx, offsets, 1.0f, 1.0f);
}

}  // namespace moe::model
