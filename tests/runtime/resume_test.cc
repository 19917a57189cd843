// Resume through the trainer: a run stopped and resumed from its checkpoint
// continues bit-identically on the same layout (docs/design.md invariant 4), and
// within 1e-5 on another layout with the same global batch.
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>

#include "absl/strings/str_join.h"
#include "comm/mpi_env.h"
#include "data/indexed_dataset.h"
#include "runtime/job_config.h"
#include "runtime/trainer.h"
#include "tests/compare.h"
#include "tests/runtime/trainer_test_util.h"

namespace moe {
namespace {

// One folder per job: the ranks of one mpirun share its pid as their parent,
// so concurrent runs of this test (other build trees) do not collide.
std::string Dir() {
  return (std::filesystem::temp_directory_path() / ("moe_resume_test_" + std::to_string(::getppid())))
      .string();
}

// Rank 0 writes the corpus; the others wait at the next testing::WorldBarrier().
std::string CorpusPrefix() { return Dir() + "/corpus"; }

void WriteCorpus() {
  std::filesystem::create_directories(Dir());
  auto writer = data::IndexedDatasetWriter::Create(CorpusPrefix(), 257).value();
  for (int doc = 0; doc < 300; ++doc) {
    std::string text = "document " + std::to_string(doc) + ": the quick brown fox jumps over the lazy dog. ";
    std::vector<int32_t> tokens(text.begin(), text.end());
    REQUIRE(writer->AddDocument(tokens.data(), tokens.size()).ok());
  }
  REQUIRE(writer->Finish().ok());
}

struct Layout {
  int tp = 1, ep = 1, grad_accum = 1;
  bool expert_tp = false;  // parallel.expert_tensor_parallel
};

JobConfig Config(const Layout& layout, int world, int steps, const std::string& ckpt_dir,
                 const std::string& optim) {
  JobConfig c = ParseConfigText(R"pb(
                                  model {
                                    hidden_size: 32
                                    num_layers: 2
                                    num_heads: 4
                                    num_kv_heads: 2
                                    ffn_hidden_size: 64
                                    seq_len: 16
                                    moe { num_experts: 4 top_k: 2 expert_ffn_hidden_size: 32 }
                                  }
                                  optim { lr: 5e-3 min_lr: 5e-4 warmup_steps: 1 decay_steps: 12 }
                                  train { micro_batch: 2 eval_batches: 1 log_every: 100 }
                                  data { valid_fraction: 0.1 }
                                )pb",
                                "resume")
                    .value();
  c.mutable_data()->set_train_path(CorpusPrefix());
  c.mutable_train()->set_steps(steps);
  c.mutable_train()->set_run_dir(Dir() + "/run");
  c.mutable_train()->set_grad_accum(layout.grad_accum);
  c.mutable_train()->set_resume(ckpt_dir.empty() ? "none" : "auto");
  c.mutable_parallel()->set_tensor(layout.tp);
  c.mutable_parallel()->set_expert(layout.ep);
  c.mutable_parallel()->set_expert_tensor_parallel(layout.expert_tp);
  c.mutable_optim()->set_type(optim);
  if (optim == "sgd") c.mutable_optim()->set_momentum(0.9);
  c.mutable_checkpoint()->set_dir(ckpt_dir);
  ApplyDefaults(world, &c);
  return c;
}

struct Outcome {
  std::vector<double> losses;                        // per step
  std::map<std::string, std::vector<float>> params;  // local values
  model::LlepRates llep_rates;                       // the rates LLEP planned with (0: none measured)
  double llep_fired = 0;                             // summed over steps and MoE layers
  int64_t dropped = 0;                               // assignments dropped by capacity, all steps
};

Outcome Train(const JobConfig& config) {
  auto run = testing::TrainToEnd(config);
  Outcome o;
  for (const StepStats& s : run->trainer->history()) {
    o.losses.push_back(s.loss);
    for (const MoeLayerStats& m : s.moe_layers) {
      o.llep_fired += m.llep_fired;
      o.dropped += m.dropped;
    }
  }
  o.llep_rates = run->trainer->llep_rates();
  o.params = testing::LocalValues(run->trainer->parameters());
  o.params.merge(testing::LocalValues(run->trainer->model().buffers()));  // expert biases
  return o;
}

// Layouts (tensor, expert, grad_accum) of this world size.
std::vector<Layout> SameLayouts(int world) {
  if (world == 2) return {{1, 1, 1}, {1, 2, 1}};  // (tp, ep, dp) = (1,1,2), (1,2,2)
  return {{2, 2, 1}};                             // (2,2,2)
}

TEST_CASE("same layout: a resumed run continues bit-identically") {
  const int world = comm::MpiEnv::world_size();
  if (comm::MpiEnv::world_rank() == 0) {
    std::filesystem::remove_all(Dir());
    WriteCorpus();
  }
  testing::WorldBarrier();
  for (const Layout& layout : SameLayouts(world)) {
    for (const std::string optim : {"adamw", "sgd"}) {
      for (bool shard : {false, true}) {
        CAPTURE(layout.tp, layout.ep, optim, shard);
        const std::string ckpt = Dir() + "/ckpt_" + std::to_string(layout.tp) + std::to_string(layout.ep) +
                                 optim + (shard ? "_zero" : "");
        JobConfig full = Config(layout, world, 6, "", optim);
        full.mutable_optim()->set_shard_state(shard);
        Outcome reference = Train(full);

        JobConfig first = Config(layout, world, 3, ckpt, optim);
        first.mutable_optim()->set_shard_state(shard);
        Outcome a = Train(first);
        JobConfig second = Config(layout, world, 6, ckpt, optim);
        second.mutable_optim()->set_shard_state(shard);
        Outcome b = Train(second);

        REQUIRE(a.losses.size() == 3);
        REQUIRE(b.losses.size() == 3);  // steps 4..6 only
        for (int i = 0; i < 3; ++i) {
          CHECK(a.losses[i] == reference.losses[i]);
          CHECK(b.losses[i] == reference.losses[3 + i]);
        }
        for (const auto& [name, values] : reference.params) {
          CAPTURE(name);
          REQUIRE(b.params.at(name).size() == values.size());
          CHECK(std::memcmp(b.params.at(name).data(), values.data(), values.size() * sizeof(float)) == 0);
        }
      }
    }
  }
}

// Resume on another layout with the same global batch: losses continue within
// 1e-5 of the uninterrupted run.
TEST_CASE("another layout: losses continue within 1e-5") {
  const int world = comm::MpiEnv::world_size();
  // (from, to): 2 ranks (1,2,2) -> (2,1,1) + accum 2; 4 ranks (1,1,4) -> (1,4,4).
  const Layout from = world == 2 ? Layout{1, 2, 1} : Layout{1, 1, 1};
  const Layout to = world == 2 ? Layout{2, 1, 2} : Layout{1, 4, 1};
  for (const std::string optim : {"adamw", "sgd"}) {
    CAPTURE(optim);
    const std::string ckpt = Dir() + "/ckpt_cross_" + optim;
    Outcome reference = Train(Config(from, world, 6, "", optim));
    Train(Config(from, world, 3, ckpt, optim));
    Outcome b = Train(Config(to, world, 6, ckpt, optim));
    REQUIRE(b.losses.size() == 3);
    for (int i = 0; i < 3; ++i) {
      CAPTURE(i, b.losses[i], reference.losses[3 + i]);
      CHECK(std::abs(b.losses[i] - reference.losses[3 + i]) <= 1e-5 * std::abs(reference.losses[3 + i]));
    }
  }
}

// Expert tensor parallelism keeps the canonical full expert tensors in the
// checkpoint: a run saved with experts sharded over TP resumes bit-identically
// with them, and within 1e-5 with them replicated over TP (and back); the
// uninterrupted runs agree within 1e-5 too. 2 ranks: tp 2, grad_accum 2;
// 4 ranks: tp 2 x ep 2.
TEST_CASE("expert tensor parallelism: bit-identical resume, and cross-resume with experts replicated") {
  const int world = comm::MpiEnv::world_size();
  Layout etp = world == 2 ? Layout{2, 1, 2, true} : Layout{2, 2, 1, true};
  Layout rep = etp;
  rep.expert_tp = false;
  Outcome ref_etp = Train(Config(etp, world, 6, "", "adamw"));
  Outcome ref_rep = Train(Config(rep, world, 6, "", "adamw"));
  for (int i = 0; i < 6; ++i) {
    CAPTURE(i, ref_etp.losses[i], ref_rep.losses[i]);
    CHECK(std::abs(ref_etp.losses[i] - ref_rep.losses[i]) <= 1e-5 * std::abs(ref_rep.losses[i]));
  }
  // Expert TP on -> on: bit-identical.
  const std::string ckpt = Dir() + "/ckpt_etp";
  Train(Config(etp, world, 3, ckpt, "adamw"));
  Outcome same = Train(Config(etp, world, 6, ckpt, "adamw"));
  REQUIRE(same.losses.size() == 3);
  for (int i = 0; i < 3; ++i) CHECK(same.losses[i] == ref_etp.losses[3 + i]);
  for (const auto& [name, values] : ref_etp.params) {
    CAPTURE(name);
    REQUIRE(same.params.at(name).size() == values.size());
    CHECK(std::memcmp(same.params.at(name).data(), values.data(), values.size() * sizeof(float)) == 0);
  }
  // On -> off and off -> on: the checkpoint is resharded on load.
  for (bool from_etp : {true, false}) {
    CAPTURE(from_etp);
    const Layout from = from_etp ? etp : rep, to = from_etp ? rep : etp;
    const Outcome& reference = from_etp ? ref_etp : ref_rep;
    const std::string cross = Dir() + "/ckpt_etp_cross" + std::to_string(from_etp);
    Train(Config(from, world, 3, cross, "adamw"));
    Outcome b = Train(Config(to, world, 6, cross, "adamw"));
    REQUIRE(b.losses.size() == 3);
    for (int i = 0; i < 3; ++i) {
      CAPTURE(i, b.losses[i], reference.losses[3 + i]);
      CHECK(std::abs(b.losses[i] - reference.losses[3 + i]) <= 1e-5 * std::abs(reference.losses[3 + i]));
    }
  }
}

// DeepSeek-V3 routing: sigmoid scores, groups, sequence aux, and the expert
// bias, which is state the checkpoint must carry (a resume that restarted it
// from zero would route differently and diverge at once), and a gated shared
// expert, and the expert-router coupling loss (its noise is keyed by the step
// number, which a resume must continue). 6 steps of adamw.
Outcome TrainDeepSeek(const Layout& layout, int world, int steps, const std::string& ckpt_dir) {
  JobConfig c = Config(layout, world, steps, ckpt_dir, "adamw");
  auto* moe = c.mutable_model()->mutable_moe();
  moe->set_score_function("sigmoid");
  moe->set_expert_bias_update_rate(0.01);
  moe->set_num_experts(8);  // 4 groups of 2, 2 kept per token
  moe->set_num_expert_groups(4);
  moe->set_group_topk(2);
  moe->set_aux_loss_type("sequence");
  moe->set_shared_expert_ffn_hidden_size(16);
  moe->set_shared_expert_gate(true);
  moe->set_erc_loss_coeff(0.2);
  return Train(c);
}

TEST_CASE("DeepSeek-V3 routing with expert bias: bit-identical resume, and within 1e-5 on another layout") {
  const int world = comm::MpiEnv::world_size();
  const Layout layout = SameLayouts(world).back();
  Outcome reference = TrainDeepSeek(layout, world, 6, "");
  const std::vector<float>& bias = reference.params.at("model.layers.1.mlp.router.expert_bias");
  CHECK(*std::max_element(bias.begin(), bias.end()) > 0.0f);  // the bias moved
  const std::string ckpt = Dir() + "/ckpt_deepseek";
  TrainDeepSeek(layout, world, 3, ckpt);
  Outcome b = TrainDeepSeek(layout, world, 6, ckpt);
  REQUIRE(b.losses.size() == 3);
  for (int i = 0; i < 3; ++i) CHECK(b.losses[i] == reference.losses[3 + i]);
  for (const auto& [name, values] : reference.params) {
    CAPTURE(name);
    REQUIRE(b.params.at(name).size() == values.size());
    CHECK(std::memcmp(b.params.at(name).data(), values.data(), values.size() * sizeof(float)) == 0);
  }
  // Another layout with the same global batch: 2 ranks (tp 1, ep 2, dp 2) -> (tp 2, dp 1,
  // accumulation 2); 4 ranks (tp 2, ep 2, dp 2) -> (tp 2, ep 1, dp 2).
  const Layout to = world == 2 ? Layout{2, 1, 2} : Layout{2, 1, 1};
  const std::string cross = Dir() + "/ckpt_deepseek_cross";
  TrainDeepSeek(layout, world, 3, cross);
  Outcome c = TrainDeepSeek(to, world, 6, cross);
  REQUIRE(c.losses.size() == 3);
  for (int i = 0; i < 3; ++i) {
    CAPTURE(i, c.losses[i], reference.losses[3 + i]);
    CHECK(std::abs(c.losses[i] - reference.losses[3 + i]) <= 1e-5 * std::abs(reference.losses[3 + i]));
  }
}

// LLEP as the demo runs it: the cost model on with a rate measured at start-up,
// overlap chunks, and here capacity drops as well, with 95% of the assignments
// forced into one expert so that LLEP has work to move. Re-measured rates could
// change the plans (and so the summation order), so the rates are checkpointed
// and a resumed run plans with them. Every run starts from one step-0
// checkpoint so that the uninterrupted run and the resumed one plan with the
// same rates; each run must report exactly those rates, bit for bit.
JobConfig LlepConfig(const Layout& layout, int world, int steps, const std::string& ckpt_dir,
                     const std::string& resume) {
  JobConfig c = Config(layout, world, steps, ckpt_dir, "adamw");
  auto* moe = c.mutable_model()->mutable_moe();
  moe->set_capacity_factor(2.0);
  moe->mutable_forced_routing()->set_fraction(0.95);
  moe->mutable_forced_routing()->set_hot_experts(1);
  c.mutable_parallel()->set_overlap_chunks(2);
  c.mutable_train()->set_micro_batch(4);
  c.mutable_train()->set_resume(resume);
  auto* llep = c.mutable_llep();
  llep->set_enabled(true);
  // The cost model on with the link rate measured (p2p_gbps 0). The GEMM rate is
  // set low so that moving work pays at any measured link speed (the plan moves
  // ~60 tokens; the cost model lets a range move when tokens > 1.33 GEMM rate /
  // link rate, 27 tokens at 0.05 GB/s); measured, it made LLEP fire or not from
  // one run to the next (14 to 96 GFLOP/s on a loaded machine).
  llep->set_cost_model(true);
  llep->set_gemm_gflops(1.0);
  llep->set_min_tokens_per_gemm(1);
  ApplyDefaults(world, &c);
  return c;
}

TEST_CASE("LLEP with measured rates, overlap chunks and capacity drops: bit-identical resume") {
  const int world = comm::MpiEnv::world_size();
  const Layout layout = SameLayouts(world).back();  // EP 2
  const std::string init = Dir() + "/ckpt_llep_init", ckpt = Dir() + "/ckpt_llep";
  if (comm::MpiEnv::world_rank() == 0 && !std::filesystem::exists(CorpusPrefix() + ".idx")) WriteCorpus();
  testing::WorldBarrier();
  Outcome zero = Train(LlepConfig(layout, world, 0, init, "none"));
  const model::LlepRates rates = zero.llep_rates;
  REQUIRE(rates.gemm_flops_per_s > 0);
  REQUIRE(rates.p2p_bytes_per_s > 0);
  const std::string step0 = init + "/step_00000000";
  Outcome reference = Train(LlepConfig(layout, world, 6, "", step0));
  Train(LlepConfig(layout, world, 3, ckpt, step0));
  Outcome b = Train(LlepConfig(layout, world, 6, ckpt, "auto"));
  // Every run planned with the step-0 run's rates (not ones measured again).
  for (const Outcome* o : {&reference, &b}) {
    CHECK(o->llep_rates.gemm_flops_per_s == rates.gemm_flops_per_s);
    CHECK(o->llep_rates.p2p_bytes_per_s == rates.p2p_bytes_per_s);
  }
  CHECK(reference.llep_fired > 0);  // LLEP moved work (the cost model let it)
  CHECK(reference.dropped > 0);     // and capacity dropped assignments
  REQUIRE(b.losses.size() == 3);
  for (int i = 0; i < 3; ++i) CHECK(b.losses[i] == reference.losses[3 + i]);
  for (const auto& [name, values] : reference.params) {
    CAPTURE(name);
    REQUIRE(b.params.at(name).size() == values.size());
    CHECK(std::memcmp(b.params.at(name).data(), values.data(), values.size() * sizeof(float)) == 0);
  }
}

// Parameters (and buffers) of a trainer built from `config` without running
// it: the initial model, or the checkpoint's when train.resume finds one.
std::map<std::string, std::vector<float>> CreatedParams(const JobConfig& config) {
  auto run = testing::CreateTrainer(config);
  return testing::LocalValues(run->trainer->parameters());
}

// The validation loss of the initial model on `layout` (micro_batch sequences per rank).
double InitialValidLoss(const Layout& layout, int world, int micro_batch) {
  JobConfig config = Config(layout, world, 1, "", "adamw");
  config.mutable_train()->set_micro_batch(micro_batch);
  config.mutable_train()->set_eval_batches(2);
  auto run = testing::CreateTrainer(config, layout.tp, layout.ep);
  auto loss = run->trainer->Evaluate();
  INFO(loss.status().ToString());
  REQUIRE(loss.ok());
  REQUIRE(loss->has_value());
  return **loss;
}

// The evaluation set is the first eval_batches x global_batch validation
// sequences on every layout (README), so the validation loss of the same model
// does not depend on dp, grad_accum or how the global batch is split.
TEST_CASE("validation loss is the same on every layout with the same global batch") {
  const int world = comm::MpiEnv::world_size();
  struct Case {
    Layout layout;
    int micro_batch;
  };
  // Global batch 8: dp * grad_accum * micro_batch, dp = world / (tp * ep) ... ep divides dp.
  std::vector<Case> cases;
  if (world == 2) {
    cases = {{{1, 1, 1}, 4}, {{1, 2, 2}, 2}, {{2, 1, 2}, 4}, {{2, 1, 4}, 2}, {{1, 1, 4}, 1}};
  } else {
    cases = {{{1, 1, 1}, 2}, {{1, 4, 2}, 1}, {{2, 1, 1}, 4}, {{2, 2, 2}, 2}, {{2, 1, 4}, 1}};
  }
  if (comm::MpiEnv::world_rank() == 0 && !std::filesystem::exists(CorpusPrefix() + ".idx")) WriteCorpus();
  testing::WorldBarrier();
  const double reference = InitialValidLoss(cases[0].layout, world, cases[0].micro_batch);
  for (const Case& c : cases) {
    const double loss = InitialValidLoss(c.layout, world, c.micro_batch);
    CAPTURE(c.layout.tp, c.layout.ep, c.layout.grad_accum, c.micro_batch, loss, reference);
    CHECK(moe::testing::ScalarClose(loss, reference, 1e-6, 0));
  }
}

// README: "train.steps: 0 saves the initial model as step 0", with every
// optim field at its default (cosine schedule, decay_steps from train.steps).
TEST_CASE("train.steps = 0 with default optim settings writes the initial model as step 0") {
  const int world = comm::MpiEnv::world_size();
  const std::string ckpt = Dir() + "/ckpt_init";
  JobConfig init = Config({}, world, 0, ckpt, "adamw");
  init.clear_optim();  // every optimizer and schedule default
  ApplyDefaults(world, &init);
  CHECK(init.optim().lr_schedule() == "cosine");
  const std::vector<std::string> problems = ValidateJobConfig(init, world);
  INFO(absl::StrJoin(problems, "\n"));
  REQUIRE(problems.empty());
  Outcome initial = Train(init);
  CHECK(initial.losses.empty());
  auto list = Checkpointer::List(ckpt).value();
  REQUIRE(list.size() == 1);
  CHECK(list[0].first == 0);

  // What step 0 holds: a job with another seed that resumes from it has the
  // first job's initial parameters, bit for bit; without resuming it differs.
  JobConfig other = init;
  other.mutable_train()->set_seed(init.train().seed() + 1);
  other.mutable_train()->set_resume("none");
  const std::map<std::string, std::vector<float>> fresh = CreatedParams(other);
  other.mutable_train()->set_resume("auto");
  const std::map<std::string, std::vector<float>> resumed = CreatedParams(other);
  REQUIRE(!resumed.empty());
  int differs = 0;
  for (const auto& [name, values] : resumed) {
    CAPTURE(name);
    REQUIRE(initial.params.count(name) == 1);
    CHECK(values == initial.params.at(name));
    if (fresh.at(name) != values) ++differs;
  }
  CHECK(differs > 0);
  testing::WorldBarrier();  // the last test: leave nothing behind in the temporary directory
  if (comm::MpiEnv::world_rank() == 0) std::filesystem::remove_all(Dir());
}

}  // namespace
}  // namespace moe
