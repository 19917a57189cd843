// The SwiGLU feed-forward of docs/model.md on a block of rows, shared by DenseMLP
// and the per-expert loop of SequentialExperts:
//   y = (silu(x Wg^T) * (x Wu^T)) Wd^T,  Wg, Wu [F, d], Wd [d, F].
#ifndef MOE_MODEL_SWIGLU_H_
#define MOE_MODEL_SWIGLU_H_

#include "absl/status/status.h"
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

}  // namespace moe::model

#endif  // MOE_MODEL_SWIGLU_H_
