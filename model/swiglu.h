// The SwiGLU feed-forward of docs/model.md on a block of rows, shared by DenseMLP
// and the per-expert loop of SequentialExperts, and its grouped form over
// stacked experts, shared by GroupedExperts and LLEP's borrowed experts:
//   y = (silu(x Wg^T) * (x Wu^T)) Wd^T,  Wg, Wu [F, d], Wd [d, F].
#ifndef MOE_MODEL_SWIGLU_H_
#define MOE_MODEL_SWIGLU_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "runtime/core/backend.h"
#include "runtime/core/tensor.h"

namespace moe::model {

// Forward on x [n, d] with caller-provided scratch gate, up, act [n, F] (kept
// for backward) and output y [n, d] (overwritten). n may be 0 (nothing runs).
absl::Status SwiGLUForward(Stream& stream, const Tensor& x, const Tensor& wg, const Tensor& wu,
                           const Tensor& wd, const Tensor& gate, const Tensor& up, const Tensor& act,
                           const Tensor& y);

// Backward: dwg, dwu, dwd += gradients; dx [n, d] overwritten. gate and up are
// overwritten with their gradients (their forward values are consumed);
// dact [n, F] is scratch.
absl::Status SwiGLUBackward(Stream& stream, const Tensor& x, const Tensor& wg, const Tensor& wu,
                            const Tensor& wd, const Tensor& gate, const Tensor& up, const Tensor& act,
                            const Tensor& dact, const Tensor& dy, const Tensor& dwg, const Tensor& dwu,
                            const Tensor& dwd, const Tensor& dx);

// The grouped form, for experts stacked on dim 0: rows [offsets[i],
// offsets[i + 1]) of x [N, d] go through expert i of wg, wu [n, F, d] and
// wd [n, d, F] (n + 1 host offsets from 0 to N), one grouped GEMM per
// projection. gate, up, act [N, F] are caller-provided and kept for backward;
// y [N, d] is overwritten. Used by GroupedExperts and LLEP's borrowed experts.
absl::Status GroupedSwiGLUForward(Stream& stream, const Tensor& x, const Tensor& wg, const Tensor& wu,
                                  const Tensor& wd, absl::Span<const int64_t> offsets, const Tensor& gate,
                                  const Tensor& up, const Tensor& act, const Tensor& y);

// Backward: dwg, dwu, dwd += gradients; dx [N, d] overwritten. gate and up
// are overwritten with their gradients; dact [N, F] is scratch.
absl::Status GroupedSwiGLUBackward(Stream& stream, const Tensor& x, const Tensor& wg, const Tensor& wu,
                                   const Tensor& wd, absl::Span<const int64_t> offsets, const Tensor& gate,
                                   const Tensor& up, const Tensor& act, const Tensor& dact, const Tensor& dy,
                                   const Tensor& dwg, const Tensor& dwu, const Tensor& dwd, const Tensor& dx);

}  // namespace moe::model

#endif  // MOE_MODEL_SWIGLU_H_
