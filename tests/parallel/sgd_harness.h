// The SGD harness of the layout-invariance and LLEP-exactness tests: one
// training step of a whole Model on docs/model.md's global batch rule, so every
// layout (tp, ep, dp, grad_accum) trains on the same sequences:
//   micro-batch a * dp + dp_rank of the step's global batch (a < grad_accum),
//   loss scaled by 1 / (dp * grad_accum), GradSync (sum over DP / EDP),
//   then p -= lr * g, the bf16 copies refreshed and the expert biases updated
//   from the global load (auxiliary-loss-free balancing).
#ifndef MOE_TESTS_PARALLEL_SGD_HARNESS_H_
#define MOE_TESTS_PARALLEL_SGD_HARNESS_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "model/model.h"
#include "parallel/grad_sync.h"
#include "parallel/process_groups.h"
#include "runtime/core/config.h"

namespace moe::model::testing {

// LLEP firing on any imbalance, planned from the counts alone (no cost model),
// so a test decides when it fires by the routing it forces.
config::LlepConfig AlwaysLlep();

// Sequence `seq` of step `step`'s global batch: seq_len + 1 tokens below
// `vocab`, a hash of (step, seq, position): the same on every layout.
std::vector<int32_t> HashedSequence(int step, int seq, int seq_len, int vocab);

struct SgdSchedule {
  int micro_batch = 2;           // sequences per micro-batch
  int global_micro_batches = 4;  // dp x grad_accum
  int seq_len = 8;
  double lr = 0.5;
  // Mark each block's parameters ready for GradSync as that block's backward
  // finishes during the last micro-batch (the trainer's overlap), rather
  // than all of them after the backward.
  bool mark_ready_per_block = false;
};

// Called after each micro-batch's forward (for routing and LLEP statistics)
// and after its backward.
struct StepHooks {
  std::function<void(const LossParts&)> after_forward;
  std::function<void()> after_backward;
};

// One SGD step (step is 0-based) on this rank's micro-batches; returns the
// mean loss over the global batch (summed over DP).
double SgdStep(Model& model, Stream& stream, const parallel::ProcessGroups& groups, parallel::GradSync& sync,
               int step, const SgdSchedule& schedule, const StepHooks& hooks = {});

// This rank's values of the model's parameters and buffers, by canonical name.
std::map<std::string, std::vector<float>> LocalValues(const Model& model);

}  // namespace moe::model::testing

#endif  // MOE_TESTS_PARALLEL_SGD_HARNESS_H_
