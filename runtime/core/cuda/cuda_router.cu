// The router's per-token kernels (ops.h RouterScores, RouterScoresBackward):
// one thread per token, each row by kmath's row functions, which the CPU
// backend calls too (cpu_router.cc). E and k are small (tens to a few
// hundred experts), so a row's loops stay in one thread's registers and L1.
#include "runtime/core/cuda/cuda_launch.cuh"

namespace moe::cuda {
namespace {

__global__ void RouterScoresKernel(const float* logits, const float* bias, const int32_t* selection,
                                   bool sigmoid, int k, int64_t num_groups, int group_topk, float* scores,
                                   float* aux_scores, float* lse, int32_t* experts, float* selected,
                                   int64_t rows, int64_t E, DeviceError* err, int op) {
  MOE_GRID_STRIDE(r, rows) {
    float* sr = scores + r * E;
    lse[r] = kmath::RouterScoresRow(logits + r * E, E, sigmoid, sr,
                                    aux_scores != nullptr ? aux_scores + r * E : nullptr);
    if (selection == nullptr) {
      kmath::RouterChooseRow(sr, bias, E, k, num_groups, group_topk, experts + r * k, selected + r * k);
      continue;
    }
    for (int j = 0; j < k; ++j) {
      const int32_t e = selection[r * k + j];
      const bool ok = e >= 0 && e < E;
      if (!ok) ReportBadIndex(err, op, r * k + j, e, E);
      experts[r * k + j] = e;
      selected[r * k + j] = ok ? sr[e] : 0.0f;
    }
  }
}

__global__ void RouterScoresBackwardKernel(const float* scores, const float* logits, const float* lse,
                                           const float* daux, const float* dscores, bool sigmoid,
                                           float z_coef, float* dlogits, int64_t rows, int64_t E,
                                           int64_t per_row) {
  MOE_GRID_STRIDE(r, rows) {
    kmath::RouterScoresBackwardRow(scores + r * E, logits != nullptr ? logits + r * E : nullptr, lse[r],
                                   daux + (r / per_row) * E, dscores != nullptr ? dscores + r * E : nullptr,
                                   E, sigmoid, z_coef, dlogits + r * E);
  }
}

constexpr int kRouterThreads = 128;

}  // namespace

cudaError_t LaunchRouterScores(const float* logits, const float* bias, const int32_t* selection, bool sigmoid,
                               int top_k, int64_t num_groups, int group_topk, float* scores,
                               float* aux_scores, float* lse, int32_t* experts, float* selected, int64_t rows,
                               int64_t E, DeviceError* err, int op, cudaStream_t s) {
  if (rows > 0)
    MOE_LAUNCH(RouterScoresKernel, GridFor(rows, kRouterThreads), kRouterThreads, 0, s, logits, bias,
               selection, sigmoid, top_k, num_groups, group_topk, scores, aux_scores, lse, experts, selected,
               rows, E, err, op);
  return cudaGetLastError();
}

cudaError_t LaunchRouterScoresBackward(const float* scores, const float* logits, const float* lse,
                                       const float* daux, const float* dscores, bool sigmoid, float z_coef,
                                       float* dlogits, int64_t rows, int64_t E, int64_t daux_rows,
                                       cudaStream_t s) {
  if (rows > 0)
    MOE_LAUNCH(RouterScoresBackwardKernel, GridFor(rows, kRouterThreads), kRouterThreads, 0, s, scores,
               logits, lse, daux, dscores, sigmoid, z_coef, dlogits, rows, E, rows / daux_rows);
  return cudaGetLastError();
}

}  // namespace moe::cuda
