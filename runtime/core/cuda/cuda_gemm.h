// cuBLAS GEMMs of the CUDA backend (cuda_gemm.cc): plain, batched (GQA
// broadcast) and the grouped expert GEMM with its two paths; and the gemm
// attention path built on them (cuda_attention_gemm.cc). Called by
// cuda_kernels.cc after ops.cc validated the arguments.
//
// Compiled only with MOE_WITH_CUDA.
#ifndef MOE_RUNTIME_CORE_CUDA_CUDA_GEMM_H_
#define MOE_RUNTIME_CORE_CUDA_CUDA_GEMM_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "runtime/core/backend.h"
#include "runtime/core/tensor.h"

namespace moe::cuda {

enum class GroupedGemmPath { kAuto, kPerExpert, kGrouped, kStreams };
// The path the grouped GEMM takes (from MOE_CUDA_GROUPED_GEMM at first use;
// benchmarks set it to compare both paths in one process).
GroupedGemmPath& GroupedGemmPathSetting();
// Whether a grouped GEMM with these operand types takes cublasGemmGroupedBatchedEx.
bool UseGroupedGemm(DType a, DType b, DType c);

absl::Status Gemm(Stream& s, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const Tensor& c,
                  float alpha, float beta);
absl::Status BatchedGemm(Stream& s, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
                         const Tensor& c, float alpha, float beta);
absl::Status GroupedGemm(Stream& s, const Tensor& x, const Tensor& w, bool trans_w, const Tensor& y,
                         absl::Span<const int64_t> offsets, float alpha, float beta);
absl::Status GroupedGemmWeightGrad(Stream& s, const Tensor& dy, const Tensor& x, const Tensor& dw,
                                   absl::Span<const int64_t> offsets, float alpha, float beta);

// Causal attention on cuBLAS: attention_gemm.h's driver (cuda_attention_gemm.cc),
// taken when MOE_ATTENTION=gemm. Arguments as ops::CausalAttention(+Backward).
absl::Status GemmCausalAttention(Stream& s, const Tensor& q, const Tensor& k, const Tensor& v, float scale,
                                 const Tensor& out, const Tensor& lse);
absl::Status GemmCausalAttentionBackward(Stream& s, const Tensor& q, const Tensor& k, const Tensor& v,
                                         const Tensor& out, const Tensor& lse, float scale,
                                         const Tensor& dout, const Tensor& dq, const Tensor& dk,
                                         const Tensor& dv);

}  // namespace moe::cuda

#endif  // MOE_RUNTIME_CORE_CUDA_CUDA_GEMM_H_
