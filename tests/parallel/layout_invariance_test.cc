// docs/design.md invariant 1 under mpirun -np 4: three SGD steps of a tiny MoE
// model give the same losses and the same updated parameters (1e-5 relative)
// for every (tp, ep, dp, grad_accum) with dp x grad_accum = 4, overlap chunks
// 1 and 3, dropless and capacity routing, and DeepSeek-V3 routing (sigmoid
// scores, group-limited, sequence aux loss, the expert bias updated after each
// step from the global load: the biases must come out equal on every layout),
// and shared experts (sharded over TP), gated or not, and the expert-router
// coupling loss (its per-step noise, its M gathered over EP, its gradient
// scaled for the EP and TP sums). And LLEP against the
// single-rank model (not only LLEP on against off): 95% of the assignments
// forced into one expert with top_k 2, so most tokens list it twice, LLEP on
// (firing on any imbalance) in every layout with EP > 1, dropless and with
// capacity drops; LLEP must fire and move tokens there. Every variant also
// runs with expert tensor parallelism (parallel.expert_tensor_parallel: each
// TP rank holds half of every expert's ffn, the outputs all-reduced over TP)
// at tp 2 x ep 1 and tp 2 x ep 2, against the same single-rank reference.
// In bf16 (bf16 weight copies and activations over f32 masters and
// gradients) every layout stays within kBf16Tolerance of the one-rank bf16
// run: TP sums partial products rounded to bf16, and DP / grad_accum sum the
// f32 gradients in another order.
//
// Each layout of world w = tp x dp runs on the 4 / w disjoint sub-worlds of
// the job (split off the world), so one 4-rank job runs every layout. The
// harness is docs/model.md's global batch rule: micro-batch a * dp + dp_rank of the
// step's global batch, loss scaled by 1 / (dp * grad_accum), GradSync (sum;
// buckets marked ready per block during the last micro-batch's backward),
// then p -= lr * g (tests/parallel/sgd_harness.h).
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "comm/mpi_env.h"
#include "model/alltoall_dispatcher.h"
#include "model/llep.h"
#include "model/model.h"
#include "parallel/grad_sync.h"
#include "runtime/core/config.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"
#include "tests/compare.h"
#include "tests/parallel/parallel_test_util.h"
#include "tests/parallel/sgd_harness.h"

namespace moe::model {
namespace {

using parallel::ProcessGroups;
using parallel::testing::Cpu;
using parallel::testing::ValueOrDie;

constexpr int kSteps = 3;
constexpr int kMicroBatch = 2;  // sequences
constexpr int kGlobalMicroBatches = 4;
constexpr int kSeqLen = 8;
constexpr double kLr = 0.5;
constexpr uint64_t kSeed = 1234;
// bf16 layouts against the one-rank bf16 run: relative on losses, of the
// tensor's largest |value| on parameters (bf16 has 8 bits of mantissa: 2^-8 = 3.9e-3).
constexpr double kBf16Tolerance = 2e-2;

// DeepSeek-V3-style routing with a shared expert, and the Qwen2-MoE shape (a
// gated shared expert), on top of the tiny config (docs/model.md).
constexpr char kDeepSeekRouting[] = "deepseek";
constexpr char kQwenShared[] = "qwen";
// Forced skew (95% of the assignments into the last expert, so a token sends
// both its slots there) with LLEP on wherever EP > 1.
constexpr char kForcedLlep[] = "forced_llep";
constexpr char kCoupling[] = "erc";  // the expert-router coupling loss

config::ModelConfig TinyConfig(double capacity_factor, const std::string& variant = "") {
  JobConfig job;
  auto* m = job.mutable_model();
  m->set_vocab_size(32);
  m->set_hidden_size(16);
  m->set_num_layers(2);
  m->set_num_heads(4);
  m->set_num_kv_heads(2);
  m->set_ffn_hidden_size(24);
  m->set_seq_len(kSeqLen);
  m->set_init_std(0.2);  // large enough for routing to matter
  auto* moe = m->mutable_moe();
  moe->set_num_experts(4);
  moe->set_top_k(2);
  moe->set_expert_ffn_hidden_size(8);
  moe->set_moe_layer_freq(2);  // layer 0 dense, layer 1 MoE
  moe->set_capacity_factor(capacity_factor);
  moe->set_aux_loss_coeff(0.01);
  moe->set_z_loss_coeff(0.001);
  if (variant == kDeepSeekRouting) {
    moe->set_score_function("sigmoid");
    moe->set_expert_bias_update_rate(0.05);
    moe->set_num_expert_groups(2);  // explicit: the same model on every EP size
    moe->set_group_topk(1);
    moe->set_aux_loss_type("sequence");
    moe->set_shared_expert_ffn_hidden_size(8);  // sharded over TP like the dense MLP
  }
  if (variant == kQwenShared) {
    moe->set_norm_topk_prob(false);
    moe->set_shared_expert_ffn_hidden_size(12);
    moe->set_shared_expert_gate(true);
  }
  if (variant == kForcedLlep) {
    moe->mutable_forced_routing()->set_fraction(0.95);
    moe->mutable_forced_routing()->set_hot_experts(1);
    moe->mutable_forced_routing()->set_first_hot_expert(3);  // on the last EP rank
  }
  if (variant == kCoupling) {
    moe->set_erc_loss_coeff(0.5);
    moe->set_erc_alpha(0.8);
  }
  ApplyDefaults(1, &job);
  return job.model();
}

struct Result {
  std::vector<double> losses;                        // per step, the mean over the global batch
  int64_t dropped = 0;                               // assignments dropped by capacity on this rank
  int64_t repeated = 0;                              // tokens listing one expert in two slots (this rank)
  int llep_fired = 0;                                // MoE layer micro-batches where LLEP fired
  int64_t llep_moved = 0;                            // (token, expert) pairs LLEP moved, summed over those
  double erc = 0;                                    // the coupling loss summed over steps and micro-batches
  std::map<std::string, std::vector<float>> params;  // local shards
  std::map<std::string, parallel::ShardSpec> shards;
  std::map<std::string, Shape> global_shapes;
};

Result Train(comm::Communicator& job_world, int tp, int ep, int grad_accum, int chunks,
             double capacity_factor, const std::string& variant, bool expert_tp = false,
             DType dtype = DType::kF32) {
  const int world = job_world.size();
  const int sub = tp * (kGlobalMicroBatches / grad_accum);  // the layout's world = tp * dp
  REQUIRE(world % sub == 0);
  auto sub_world = ValueOrDie(job_world.Split(job_world.rank() / sub, job_world.rank(), "layout"));
  ProcessGroups groups = ValueOrDie(parallel::CreateProcessGroups(std::move(sub_world), tp, ep));
  const parallel::RankLayout& l = groups.layout;
  REQUIRE(l.dp * grad_accum == kGlobalMicroBatches);
  Stream& stream = Cpu().default_stream();
  const config::ModelConfig cfg = TinyConfig(capacity_factor, variant);
  ShardPlan plan;
  plan.tp_size = tp;
  plan.tp_rank = l.tp_rank;
  plan.ep_size = ep;
  plan.ep_rank = l.ep_rank;
  plan.tp_group = tp > 1 ? groups.tp.get() : nullptr;
  plan.expert_tp = expert_tp;
  DispatcherFactory factory;
  if (chunks > 0) {
    factory = [&](int) -> std::unique_ptr<TokenDispatcher> {
      return std::make_unique<AllToAllTokenDispatcher>(groups.ep.get(), TedGroup(plan),
                                                       cfg.moe().num_experts(), chunks);
    };
  }
  auto model = ValueOrDie(Model::Create(cfg, stream, kSeed, plan, factory, dtype));
  if (variant == kForcedLlep && chunks > 0) {  // a no-op at EP 1
    MOE_REQUIRE_OK(EnableLlep(*model, cfg, testing::AlwaysLlep(), groups.host.ep.get(), groups.ep_p2p.get(),
                              tp > 1 ? groups.tp.get() : nullptr, stream));
  }
  parallel::GradSyncOptions gopt;
  gopt.bucket_mb = 0.002;  // a few buckets
  auto sync = ValueOrDie(parallel::GradSync::Create(groups, model->parameters(), stream, gopt));
  testing::SgdSchedule schedule;
  schedule.micro_batch = kMicroBatch;
  schedule.global_micro_batches = kGlobalMicroBatches;
  schedule.seq_len = kSeqLen;
  schedule.lr = kLr;
  schedule.mark_ready_per_block = true;
  Result r;
  testing::StepHooks hooks;
  hooks.after_forward = [&](const LossParts& loss) {
    r.erc += loss.erc;
    for (int b = 0; b < model->num_layers(); ++b) {
      if (!model->block(b).is_moe()) continue;
      const RoutingPlan& routing = model->block(b).moe()->routing();
      r.dropped += routing.num_dropped();
      for (int64_t t = 0; t < routing.num_tokens; ++t) {
        const int32_t* e = &routing.experts[t * routing.top_k];
        r.repeated += std::find(e + 1, e + routing.top_k, e[0]) != e + routing.top_k ? 1 : 0;
      }
      if (const LlepRunner* llep = model->block(b).moe()->llep(); llep != nullptr && llep->stats().fired) {
        ++r.llep_fired;
        r.llep_moved += llep->stats().tokens_moved;
      }
    }
  };
  for (int step = 0; step < kSteps; ++step) {
    r.losses.push_back(testing::SgdStep(*model, stream, groups, *sync, step, schedule, hooks));
  }
  for (parallel::Parameter* p : model->buffers()) {
    r.params[p->name] = parallel::testing::ToVector(p->value);
    r.shards[p->name] = p->shard;
    r.global_shapes[p->name] = p->global_shape;
  }
  for (parallel::Parameter* p : model->parameters()) {
    r.params[p->name] = parallel::testing::ToVector(p->value);
    r.shards[p->name] = p->shard;
    r.global_shapes[p->name] = p->global_shape;
  }
  return r;
}

void Compare(const Result& ref, const Result& got, double tol = 1e-5) {
  REQUIRE(got.losses.size() == ref.losses.size());
  for (size_t s = 0; s < ref.losses.size(); ++s) {
    INFO("step " << s << " loss " << got.losses[s] << " reference " << ref.losses[s]);
    REQUIRE(moe::testing::ScalarClose(got.losses[s], ref.losses[s], tol, 0));
  }
  REQUIRE(got.params.size() == ref.params.size());
  for (const auto& [name, local] : got.params) {
    const std::vector<float>& full = ref.params.at(name);
    // The full tensor's entries that this rank holds, in local order.
    std::vector<float> want(local.size());
    parallel::ForEachLocalRun(got.global_shapes.at(name), got.shards.at(name),
                              [&](int64_t g, int64_t lo, int64_t n) {
                                for (int64_t j = 0; j < n; ++j) want[lo + j] = full[g + j];
                              });
    double scale = 0;  // of the whole tensor, not only this rank's part
    for (float v : full)
      if (std::isfinite(v)) scale = std::max(scale, static_cast<double>(std::abs(v)));
    const moe::testing::Closeness c = moe::testing::Compare(local, want, {.atol = tol * scale}, name);
    INFO(c.message);
    REQUIRE(c.ok);
  }
}

struct Layout {
  int tp, ep, dp, grad_accum;
  bool expert_tp = false;
};

void RunAll(double capacity_factor, const std::string& variant = "", DType dtype = DType::kF32) {
  auto world = parallel::testing::World();
  REQUIRE(world->size() == 4);
  const double tol = dtype == DType::kBF16 ? kBf16Tolerance : 1e-5;
  // The reference: one rank, the model's own LocalTokenDispatcher.
  const Result ref = Train(*world, 1, 1, 4, 0, capacity_factor, variant, /*expert_tp=*/false, dtype);
  // Training moves the loss, and the capacity runs do drop assignments.
  REQUIRE(std::abs(ref.losses[kSteps - 1] - ref.losses[0]) > 1e-3 * std::abs(ref.losses[0]));
  if (capacity_factor > 0) {
    REQUIRE(ref.dropped > 0);
  } else {
    REQUIRE(ref.dropped == 0);
  }
  if (variant == kForcedLlep) {  // most tokens list the hot expert twice
    REQUIRE(ref.repeated > kSteps * kGlobalMicroBatches * kMicroBatch * kSeqLen / 2);
    REQUIRE(ref.llep_fired == 0);
  }
  if (variant == kDeepSeekRouting) {  // the biases moved (and must match on every layout)
    const std::vector<float>& bias = ref.params.at("model.layers.1.mlp.router.expert_bias");
    REQUIRE(*std::max_element(bias.begin(), bias.end()) > 0.04f);
  }
  REQUIRE((ref.erc > 0) == (variant == kCoupling));
  const std::vector<Layout> layouts = {{1, 1, 1, 4}, {1, 2, 2, 2},       {1, 4, 4, 1},      {2, 1, 1, 4},
                                       {2, 2, 2, 2}, {2, 1, 1, 4, true}, {2, 2, 2, 2, true}};
  for (const Layout& lay : layouts) {
    for (int chunks : {1, 3}) {
      INFO("tp " << lay.tp << " ep " << lay.ep << " dp " << lay.dp << " grad_accum " << lay.grad_accum
                 << " expert_tp " << lay.expert_tp << " overlap_chunks " << chunks << " capacity_factor "
                 << capacity_factor);
      const Result got = Train(*world, lay.tp, lay.ep, lay.grad_accum, chunks, capacity_factor, variant,
                               lay.expert_tp, dtype);
      if (lay.expert_tp) {  // the experts really are sliced: half of each expert's ffn here
        const parallel::ShardSpec& down = got.shards.at("model.layers.1.mlp.experts.down_proj");
        REQUIRE(down.tp_dim == 2);
        REQUIRE(down.tp_end - down.tp_begin == TinyConfig(0.0).moe().expert_ffn_hidden_size() / 2);
      }
      Compare(ref, got, tol);
      if (variant == kForcedLlep && lay.ep > 1) {  // LLEP fired in every micro-batch and moved tokens
        REQUIRE(got.llep_fired == kSteps * lay.grad_accum);
        REQUIRE(got.llep_moved > 0);
      }
    }
  }
}

TEST_CASE("layout invariance, dropless", "[layout_invariance]") { RunAll(0.0); }

TEST_CASE("layout invariance, capacity", "[layout_invariance]") { RunAll(1.0); }

TEST_CASE("layout invariance in bf16, dropless, shared expert", "[layout_invariance]") {
  RunAll(0.0, kQwenShared, DType::kBF16);
}

TEST_CASE(
    "layout invariance, sigmoid scores, expert bias updates, groups, sequence aux, shared expert, capacity",
    "[layout_invariance]") {
  RunAll(1.0, kDeepSeekRouting);
}

TEST_CASE("layout invariance, gated shared expert, no renormalisation, dropless", "[layout_invariance]") {
  RunAll(0.0, kQwenShared);
}

TEST_CASE("layout invariance, LLEP on, 95% forced into one expert, repeated experts, dropless",
          "[layout_invariance]") {
  RunAll(0.0, kForcedLlep);
}

TEST_CASE("layout invariance, LLEP on, 95% forced into one expert, repeated experts, capacity",
          "[layout_invariance]") {
  RunAll(1.0, kForcedLlep);
}

TEST_CASE("layout invariance, expert-router coupling loss, dropless", "[layout_invariance]") {
  RunAll(0.0, kCoupling);
}

}  // namespace
}  // namespace moe::model
