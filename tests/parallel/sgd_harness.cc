#include "tests/parallel/sgd_harness.h"

#include <catch2/catch.hpp>

#include "runtime/core/ops.h"
#include "runtime/core/status.h"
#include "tests/parallel/parallel_test_util.h"

namespace moe::model::testing {

using parallel::testing::ToVector;
using parallel::testing::ValueOrDie;

config::LlepConfig AlwaysLlep() {
  config::LlepConfig c;
  c.set_enabled(true);
  c.set_trigger_ratio(1.0);  // fire on any imbalance
  c.set_capacity_factor(1.0);
  c.set_min_tokens_per_gemm(1);
  c.set_max_borrowed_experts(0);
  c.set_cost_model(false);
  c.set_gemm_gflops(0);
  c.set_p2p_gbps(0);
  return c;
}

std::vector<int32_t> HashedSequence(int step, int seq, int seq_len, int vocab) {
  std::vector<int32_t> t(seq_len + 1);
  for (int i = 0; i <= seq_len; ++i) {
    uint32_t h = static_cast<uint32_t>(step * 7919 + seq * 104729 + i * 31 + 17) * 2654435761u;
    t[i] = static_cast<int32_t>((h >> 8) % vocab);
  }
  return t;
}

double SgdStep(Model& model, Stream& stream, const parallel::ProcessGroups& groups, parallel::GradSync& sync,
               int step, const SgdSchedule& schedule, const StepHooks& hooks) {
  const parallel::RankLayout& l = groups.layout;
  REQUIRE(schedule.global_micro_batches % l.dp == 0);
  const int grad_accum = schedule.global_micro_batches / l.dp;
  const int vocab = static_cast<int>(model.config().vocab_size());
  // Each block's parameters, for MarkReady as the block's backward finishes.
  std::vector<std::vector<parallel::Parameter*>> block_params(model.num_layers());
  for (int b = 0; b < model.num_layers(); ++b) {
    parallel::ParameterList list;
    MOE_REQUIRE_OK(model.block(b).CollectParameters(&list));
    block_params[b] = list.all();
  }
  MOE_REQUIRE_OK(model.ZeroGrads(stream));
  model.SetStep(step + 1);
  double loss_sum = 0;
  for (int a = 0; a < grad_accum; ++a) {
    const int m = a * l.dp + l.dp_rank;
    std::vector<int32_t> tokens;
    for (int s = 0; s < schedule.micro_batch; ++s) {
      std::vector<int32_t> seq = HashedSequence(step, m * schedule.micro_batch + s, schedule.seq_len, vocab);
      tokens.insert(tokens.end(), seq.begin(), seq.end());
    }
    LossParts loss = ValueOrDie(model.Forward(stream, tokens, schedule.micro_batch));
    loss_sum += loss.total();
    if (hooks.after_forward) hooks.after_forward(loss);
    BlockDoneFn on_block_done;
    if (schedule.mark_ready_per_block && a + 1 == grad_accum) {
      on_block_done = [&](int b) -> absl::Status {
        for (parallel::Parameter* p : block_params[b]) RETURN_IF_ERROR(sync.MarkReady(p));
        return absl::OkStatus();
      };
    }
    MOE_REQUIRE_OK(model.Backward(stream, 1.0f / (l.dp * grad_accum), on_block_done));
    if (hooks.after_backward) hooks.after_backward();
  }
  if (!schedule.mark_ready_per_block) {
    for (parallel::Parameter* p : model.parameters()) MOE_REQUIRE_OK(sync.MarkReady(p));
  }
  MOE_REQUIRE_OK(sync.Finish());
  // The mean loss over the global batch: the sum over DP of the local sums.
  double total = loss_sum;
  comm::Work w = ValueOrDie(groups.dp->AllReduce(&total, &total, 1, DType::kF64, comm::ReduceOp::kSum));
  MOE_REQUIRE_OK(w.Wait());
  for (parallel::Parameter* p : model.parameters()) {
    MOE_REQUIRE_OK(ops::Axpby(stream, static_cast<float>(-schedule.lr), p->grad, 1.0f, p->value));
  }
  MOE_REQUIRE_OK(model.RefreshComputeWeights(stream));
  // Auxiliary-loss-free balancing: the load of the whole global batch.
  MOE_REQUIRE_OK(model.UpdateExpertBiases(stream, [&](std::vector<double>& load) -> absl::Status {
    ASSIGN_OR_RETURN(comm::Work sum, groups.dp->AllReduce(load.data(), load.data(), load.size(), DType::kF64,
                                                          comm::ReduceOp::kSum));
    return sum.Wait();
  }));
  return total / schedule.global_micro_batches;
}

std::map<std::string, std::vector<float>> LocalValues(const Model& model) {
  std::map<std::string, std::vector<float>> values;
  for (parallel::Parameter* p : model.parameters()) values[p->name] = ToVector(p->value);
  for (parallel::Parameter* p : model.buffers()) values[p->name] = ToVector(p->value);
  return values;
}

}  // namespace moe::model::testing
