// bf16 through f32 kernels: a Kernels decorator that stages every bf16
// operand through an f32 copy (Cast in, the f32 kernel, Cast out), giving
// ops.h's precision contract (bf16 storage, f32 arithmetic and accumulation,
// one rounding per output element) on a backend whose kernels are f32.
//
//   CPU:  MakeBf16StagingKernels(std::make_unique<CpuKernels>(), {.stage_gemms = true})
//   CUDA: MakeBf16StagingKernels(MakeCudaKernels(), {.stage_gemms = false,
//                                                    .stage_elementwise = false,
//                                                    .stage_rows = false,
//                                                    .native_attention = cuda::NativeAttentionTakes})
//         (cuBLAS runs the GEMMs on bf16 operands with f32 accumulation; the
//         element-wise, norm, RoPE, cross-entropy and row scatter/dot
//         kernels read and write bf16 themselves, and so does attention on
//         the fused and flash kernels (native_attention); attention on the
//         gemm path and the reductions are staged)
//
// Routing (Softmax, LogSumExp, TopK), master weights and optimizer state
// (InitNormal, AdamW) are f32 only by contract and pass through; so do the
// dtype-agnostic Copy, Cast, Fill and GatherRows (the weighted GatherRows is
// arithmetic: a row op). Internal to runtime/core.
#ifndef MOE_RUNTIME_CORE_BF16_STAGING_H_
#define MOE_RUNTIME_CORE_BF16_STAGING_H_

#include <memory>

#include "runtime/core/kernels.h"

namespace moe {

struct Bf16StagingOptions {
  // Stage the four GEMM kinds too (false: they get bf16 tensors as they are).
  bool stage_gemms = true;
  // Stage the arithmetic element-wise ops (Add, Axpby, Mul, Scale, Silu,
  // SiluBackward, SwiGLU, SwiGLUBackward); false: the wrapped kernels take
  // bf16 operands themselves, with this layer's arithmetic (widen exactly,
  // f32, round each output once).
  bool stage_elementwise = true;
  // Stage the norm, RoPE, cross-entropy and row ops (RmsNorm, AddRmsNorm,
  // RmsNormBackward, Rope, RopeBackward, CrossEntropy, CrossEntropyBackward,
  // ScatterAddRows, GatherRowDot, the weighted GatherRows); false: the wrapped kernels take their bf16
  // activations, weight, logits, dlogits and rows themselves, with the same
  // arithmetic (rstd, lse, losses, combine weights and dots are f32 either
  // way).
  bool stage_rows = true;
  // Attention calls this accepts (q, k, v first, then out, or out, dout, dq,
  // dk, dv) reach the wrapped kernels with their bf16 tensors; the rest are
  // staged. Null: every attention call is staged. CUDA: cuda::NativeAttentionTakes.
  bool (*native_attention)(absl::Span<const Tensor* const> tensors) = nullptr;
};

std::unique_ptr<Kernels> MakeBf16StagingKernels(std::unique_ptr<Kernels> f32, Bf16StagingOptions options);

}  // namespace moe

#endif  // MOE_RUNTIME_CORE_BF16_STAGING_H_
