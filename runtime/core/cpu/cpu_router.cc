// The router's per-token kernels (ops.h RouterScores, RouterScoresBackward):
// tokens in parallel on the pool, each row by kmath's row functions, which the
// CUDA backend's kernels (cuda_router.cu) call too.
#include "absl/strings/str_cat.h"
#include "runtime/core/cpu/cpu_kernels.h"
#include "runtime/core/kernel_math.h"

namespace moe::cpu {

absl::Status CpuKernels::RouterScores(S& s, T logits, T bias, T selection, const RouterChoice& choice,
                                      T scores, T aux_scores, T lse, T experts, T selected) {
  return AsCpu(s).Run([=]() -> absl::Status {
    const int64_t rows = logits.size(0), E = logits.size(1);
    const int k = choice.top_k;
    const int32_t* forced = selection.defined() ? selection.data<int32_t>() : nullptr;
    for (int64_t i = 0; forced != nullptr && i < rows * k; ++i) {
      if (forced[i] < 0 || forced[i] >= E) {
        return absl::InvalidArgumentError(
            absl::StrCat("ops::RouterScores: selection[", i, "] = ", forced[i], " is outside [0, ", E, ")"));
      }
    }
    const float* z = logits.data<float>();
    const float* b = bias.defined() ? bias.data<float>() : nullptr;
    float* ps = scores.data<float>();
    float* pq = aux_scores.defined() ? aux_scores.data<float>() : nullptr;
    float* pl = lse.data<float>();
    int32_t* pe = experts.data<int32_t>();
    float* pv = selected.data<float>();
    Pool().ParallelFor(rows, GrainFor(E * (4 + k)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float* sr = ps + r * E;
        pl[r] =
            kmath::RouterScoresRow(z + r * E, E, choice.sigmoid, sr, pq != nullptr ? pq + r * E : nullptr);
        if (forced == nullptr) {
          kmath::RouterChooseRow(sr, b, E, k, choice.num_groups, choice.group_topk, pe + r * k, pv + r * k);
          continue;
        }
        for (int j = 0; j < k; ++j) {
          pe[r * k + j] = forced[r * k + j];
          pv[r * k + j] = sr[forced[r * k + j]];
        }
      }
    });
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::RouterScoresBackward(S& s, T scores, T logits, T lse, T daux, T dscores,
                                              bool sigmoid, float z_coef, T dlogits) {
  return AsCpu(s).Run([=]() {
    const int64_t rows = scores.size(0), E = scores.size(1);
    const int64_t per_row = rows / daux.size(0);  // tokens per daux row
    const float* ps = scores.data<float>();
    const float* pz = logits.defined() ? logits.data<float>() : nullptr;
    const float* pl = lse.data<float>();
    const float* pq = daux.data<float>();
    const float* pd = dscores.defined() ? dscores.data<float>() : nullptr;
    float* out = dlogits.data<float>();
    Pool().ParallelFor(rows, GrainFor(E * 6), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        kmath::RouterScoresBackwardRow(ps + r * E, pz != nullptr ? pz + r * E : nullptr, pl[r],
                                       pq + (r / per_row) * E, pd != nullptr ? pd + r * E : nullptr, E,
                                       sigmoid, z_coef, out + r * E);
      }
    });
    return absl::OkStatus();
  });
}

}  // namespace moe::cpu
