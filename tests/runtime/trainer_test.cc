// The trainer on real MPI ranks: a short run whose loss falls, the metrics
// file, evaluation, and the non-finite stop.
#include "runtime/trainer.h"

#include <unistd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "comm/mpi_env.h"
#include "data/indexed_dataset.h"
#include "runtime/core/json.h"
#include "tests/runtime/trainer_test_util.h"

namespace moe {
namespace {

// A learnable corpus: a few sentences repeated with variations, byte tokens.
std::string WriteCorpus(const std::string& dir) {
  std::filesystem::create_directories(dir);
  std::string prefix = dir + "/corpus";
  auto writer = data::IndexedDatasetWriter::Create(prefix, 257).value();
  const char* sentences[] = {"the cat sat on the mat. ", "a dog ran in the park. ",
                             "we like to read good books. ", "the sun is warm today. "};
  for (int doc = 0; doc < 400; ++doc) {
    std::string text;
    for (int i = 0; i < 3; ++i) text += sentences[(doc + i) % 4];
    std::vector<int32_t> tokens(text.begin(), text.end());
    tokens.push_back(256);
    REQUIRE(writer->AddDocument(tokens.data(), tokens.size()).ok());
  }
  REQUIRE(writer->Finish().ok());
  return prefix;
}

JobConfig TinyConfig(const std::string& data_prefix, const std::string& run_dir, int world) {
  JobConfig c =
      ParseConfigText(R"pb(
                        model {
                          hidden_size: 32
                          num_layers: 2
                          num_heads: 4
                          num_kv_heads: 2
                          ffn_hidden_size: 64
                          seq_len: 32
                          moe { num_experts: 4 top_k: 2 expert_ffn_hidden_size: 32 moe_layer_freq: 2 }
                        }
                        optim { lr: 1e-2 min_lr: 1e-3 warmup_steps: 2 weight_decay: 0.0 }
                        train { steps: 30 micro_batch: 4 grad_accum: 2 eval_batches: 2 log_every: 10 }
                        data { valid_fraction: 0.1 }
                      )pb",
                      "tiny")
          .value();
  c.mutable_data()->set_train_path(data_prefix);
  c.mutable_train()->set_run_dir(run_dir);
  ApplyDefaults(world, &c);
  return c;
}

std::string TestDir() {
  return (std::filesystem::temp_directory_path() / ("moe_trainer_test_" + std::to_string(::getppid()) + "_" +
                                                    std::to_string(comm::MpiEnv::world_rank())))
      .string();
}

TEST_CASE("a short data-parallel run: loss falls, metrics and evaluation are written") {
  const std::string dir = TestDir();
  std::filesystem::remove_all(dir);
  const std::string prefix = WriteCorpus(dir);
  JobConfig config = TinyConfig(prefix, dir + "/run", comm::MpiEnv::world_size());
  parallel::ProcessGroups groups = testing::WorldGroups(1, 1);
  auto trainer = Trainer::Create(config, &groups);
  REQUIRE(trainer.ok());
  auto first_valid = (*trainer)->Evaluate();
  REQUIRE(first_valid.ok());
  REQUIRE((*trainer)->Run().ok());
  const auto& history = (*trainer)->history();
  REQUIRE(history.size() == 30);
  double first = history.front().loss;
  double last = 0;
  for (size_t i = history.size() - 5; i < history.size(); ++i) last += history[i].loss / 5;
  CAPTURE(first, last);
  CHECK(last < 0.6 * first);
  for (const StepStats& s : history) {
    CHECK(std::isfinite(s.grad_norm));
    CHECK(s.tokens_per_s > 0);
    REQUIRE(s.moe_layers.size() == 1);  // moe_layer_freq 2 of 2 layers
    int64_t kept = 0;
    for (int64_t c : s.moe_layers[0].tokens_per_expert) kept += c;
    // dropless: every (token, slot) of the global batch is kept.
    CHECK(kept == int64_t{2} * 4 * 2 * comm::MpiEnv::world_size() * 32);
  }
  auto valid = (*trainer)->Evaluate();
  REQUIRE(valid.ok());
  REQUIRE(valid->has_value());
  CHECK(**valid < **first_valid);

  if (comm::MpiEnv::world_rank() == 0) {
    std::ifstream in(dir + "/run/metrics.jsonl");
    std::string line;
    int train_lines = 0, eval_lines = 0;
    while (std::getline(in, line)) {
      JsonValue v = ParseJson(line).value();
      if (v.Find("event")->string == "train") {
        ++train_lines;
        for (const char* key : {"step", "loss", "ce", "aux", "z", "lr", "grad_norm", "tokens_per_s",
                                "step_time_s", "mem_peak_bytes", "expert_load_max_over_mean", "moe_layers"}) {
          CHECK(v.Find(key) != nullptr);
        }
        const JsonValue& layer = v.Find("moe_layers")->array[0];
        CHECK(layer.Find("tokens_per_expert")->array.size() == 4);
        // Dropless: the counts cover every (token, slot) of the global batch.
        double kept = 0;
        for (const JsonValue& c : layer.Find("tokens_per_expert")->array) kept += c.number;
        CHECK(kept == 2.0 * 4 * 2 * comm::MpiEnv::world_size() * 32);
        CHECK(layer.Find("dropped")->number == 0);
        CHECK(v.Find("step")->number == train_lines);
        CHECK(std::isfinite(v.Find("loss")->number));
        CHECK(v.Find("erc") == nullptr);  // the coupling loss is off by default
      } else {
        ++eval_lines;
        CHECK(v.Find("event")->string == "eval");
        CHECK(v.Find("step")->number == 30);  // the evaluation at the end
        CHECK(std::isfinite(v.Find("valid_loss")->number));
      }
    }
    CHECK(train_lines == 30);
    CHECK(eval_lines == 1);
  }
}

TEST_CASE("auxiliary-loss-free balancing: metrics.jsonl records each MoE layer's expert bias") {
  const std::string dir = TestDir();
  std::filesystem::remove_all(dir);
  const std::string prefix = WriteCorpus(dir);
  JobConfig config = TinyConfig(prefix, dir + "/run", comm::MpiEnv::world_size());
  config.mutable_train()->set_steps(4);
  config.mutable_model()->mutable_moe()->set_expert_bias_update_rate(0.01);
  parallel::ProcessGroups groups = testing::WorldGroups(1, 1);
  auto trainer = Trainer::Create(config, &groups);
  REQUIRE(trainer.ok());
  REQUIRE((*trainer)->Run().ok());
  const std::vector<double>& last = (*trainer)->history().back().moe_layers[0].expert_bias;
  REQUIRE(last.size() == 4);
  // Each step moves each bias by -0.01, 0 or +0.01: after 4 steps a multiple of 0.01 within 0.04.
  double moved = 0;
  for (double b : last) {
    CHECK(std::abs(b) <= 0.04 + 1e-6);
    CHECK(std::abs(b * 100 - std::round(b * 100)) < 1e-3);
    moved += std::abs(b);
  }
  CHECK(moved > 0);
  if (comm::MpiEnv::world_rank() == 0) {
    std::ifstream in(dir + "/run/metrics.jsonl");
    std::string line;
    int with_bias = 0;
    while (std::getline(in, line)) {
      JsonValue v = ParseJson(line).value();
      if (v.Find("event")->string != "train") continue;
      const JsonValue* bias = v.Find("moe_layers")->array[0].Find("expert_bias");
      REQUIRE(bias != nullptr);
      CHECK(bias->array.size() == 4);
      ++with_bias;
    }
    CHECK(with_bias == 4);
  }
}

// metrics.jsonl values, not only keys (2 ranks, EP 2, capacity 1.0, 90% of the
// assignments forced into expert 0, LLEP firing on any imbalance): per step and
// MoE layer, the kept counts plus the dropped ones are the global batch's
// tokens x top_k and some are dropped; LLEP fired, moved tokens, lowered the
// imbalance and moved whole experts' weights; the eval lines carry the step
// they ran after.
TEST_CASE("metrics.jsonl values: expert counts, drops, LLEP fields, the eval step") {
  const std::string dir = TestDir();
  std::filesystem::remove_all(dir);
  const std::string prefix = WriteCorpus(dir);
  const int world = comm::MpiEnv::world_size();
  JobConfig config = TinyConfig(prefix, dir + "/run_values", world);
  config.mutable_train()->set_steps(4);
  config.mutable_train()->set_eval_every(2);
  config.mutable_parallel()->set_expert(world);
  auto* moe = config.mutable_model()->mutable_moe();
  moe->set_capacity_factor(1.0);
  moe->mutable_forced_routing()->set_fraction(0.9);
  auto* llep = config.mutable_llep();
  llep->set_enabled(true);
  llep->set_trigger_ratio(1.0);
  llep->set_min_tokens_per_gemm(1);
  llep->set_cost_model(false);
  parallel::ProcessGroups groups = testing::WorldGroups(1, world);
  auto trainer = Trainer::Create(config, &groups);
  INFO(trainer.status().ToString());
  REQUIRE(trainer.ok());
  REQUIRE((*trainer)->Run().ok());
  if (comm::MpiEnv::world_rank() != 0) return;
  const double assignments = 2.0 * 4 * 2 * world * 32;  // top_k x micro_batch x grad_accum x dp x seq_len
  const double expert_bytes = 3.0 * 32 * 32 * sizeof(float);  // gate, up, down of d 32, Fe 32
  std::ifstream in(dir + "/run_values/metrics.jsonl");
  std::string line;
  std::vector<double> train_steps, eval_steps;
  while (std::getline(in, line)) {
    JsonValue v = ParseJson(line).value();
    CAPTURE(line);
    if (v.Find("event")->string == "eval") {
      eval_steps.push_back(v.Find("step")->number);
      continue;
    }
    train_steps.push_back(v.Find("step")->number);
    const JsonValue& layer = v.Find("moe_layers")->array.at(0);
    double kept = 0;
    for (const JsonValue& c : layer.Find("tokens_per_expert")->array) kept += c.number;
    const double dropped = layer.Find("dropped")->number;
    CHECK(kept + dropped == assignments);
    CHECK(dropped > 0);
    CHECK(layer.Find("llep_fired")->number > 0);
    CHECK(layer.Find("llep_fired")->number <= 1);
    CHECK(layer.Find("llep_tokens_moved")->number > 0);
    CHECK(layer.Find("llep_imbalance_after")->number < layer.Find("llep_imbalance_before")->number);
    const double bytes = layer.Find("llep_weight_bytes_moved")->number;
    CHECK(bytes > 0);
    CHECK(std::fmod(bytes, expert_bytes) == 0);
  }
  CHECK(train_steps == std::vector<double>{1, 2, 3, 4});
  CHECK(eval_steps == std::vector<double>{2, 4});
}

// README: results do not depend on the thread count. Three steps of a model
// large enough that attention, the row ops and the element-wise ops split into
// several chunks, at train.threads_per_rank 1 and 2: the same losses, gradient
// norms and parameters, bit for bit.
TEST_CASE("3 training steps at 1 and 2 threads per rank give bit-identical results") {
  const std::string dir = TestDir();
  std::filesystem::remove_all(dir);
  const std::string prefix = WriteCorpus(dir);
  Backend& cpu = *GetBackend(Device::Cpu()).value();
  const int before = cpu.num_threads();
  struct Outcome {
    std::vector<double> numbers;  // per step: loss, grad norm
    std::vector<std::vector<float>> params;
  };
  auto run = [&](int threads) {
    JobConfig config = TinyConfig(prefix, dir + "/run_threads", comm::MpiEnv::world_size());
    config.mutable_model()->set_hidden_size(96);
    config.mutable_model()->set_ffn_hidden_size(128);
    config.mutable_model()->set_seq_len(80);
    config.mutable_model()->mutable_moe()->set_expert_ffn_hidden_size(96);
    config.mutable_train()->set_steps(3);
    config.mutable_train()->set_micro_batch(3);
    config.mutable_train()->set_threads_per_rank(threads);
    parallel::ProcessGroups groups = testing::WorldGroups(1, 1);
    auto trainer = Trainer::Create(config, &groups);
    INFO(trainer.status().ToString());
    REQUIRE(trainer.ok());
    CHECK(cpu.num_threads() == threads);  // the field takes effect
    REQUIRE((*trainer)->Run().ok());
    Outcome o;
    for (const StepStats& s : (*trainer)->history()) {
      o.numbers.push_back(s.loss);
      o.numbers.push_back(s.grad_norm);
    }
    for (const parallel::Parameter* p : (*trainer)->parameters()) {
      const float* v = p->value.data<float>();
      o.params.emplace_back(v, v + p->value.numel());
    }
    return o;
  };
  const Outcome one = run(1), two = run(2);
  cpu.SetNumThreads(before);
  REQUIRE(one.numbers.size() == 6);
  for (double v : one.numbers) CHECK(std::isfinite(v));
  CHECK(one.numbers == two.numbers);
  REQUIRE(one.params.size() == two.params.size());
  size_t differ = 0;
  for (size_t i = 0; i < one.params.size(); ++i) {
    REQUIRE(one.params[i].size() == two.params[i].size());
    differ +=
        std::memcmp(one.params[i].data(), two.params[i].data(), one.params[i].size() * sizeof(float)) != 0;
  }
  CHECK(differ == 0);
}

TEST_CASE("optim.clip_grad scales the step's update by the clipping coefficient") {
  // SGD without momentum or decay: the update is -lr * coefficient * grad, so
  // a clipped first step moves every parameter by the coefficient times the
  // unclipped one (the optimizer applies it as it reads the gradients).
  const std::string dir = TestDir();
  std::filesystem::remove_all(dir);
  const std::string prefix = WriteCorpus(dir);
  struct Outcome {
    double norm = 0;
    std::vector<std::vector<float>> before, after;
  };
  auto run = [&](double clip_grad) {
    JobConfig config = TinyConfig(prefix, dir + "/run_clip", comm::MpiEnv::world_size());
    config.mutable_optim()->set_type("sgd");
    config.mutable_optim()->set_warmup_steps(0);
    config.mutable_optim()->set_clip_grad(clip_grad);
    config.mutable_train()->set_steps(1);
    parallel::ProcessGroups groups = testing::WorldGroups(1, 1);
    auto trainer = Trainer::Create(config, &groups);
    INFO(trainer.status().ToString());
    REQUIRE(trainer.ok());
    Outcome o;
    for (const parallel::Parameter* p : (*trainer)->parameters()) {
      const float* v = p->value.data<float>();
      o.before.emplace_back(v, v + p->value.numel());
    }
    REQUIRE((*trainer)->Run().ok());
    REQUIRE((*trainer)->history().size() == 1);
    o.norm = (*trainer)->history()[0].grad_norm;
    for (const parallel::Parameter* p : (*trainer)->parameters()) {
      const float* v = p->value.data<float>();
      o.after.emplace_back(v, v + p->value.numel());
    }
    return o;
  };
  const Outcome free = run(0);  // clipping off
  REQUIRE(std::isfinite(free.norm));
  REQUIRE(free.norm > 0);
  const double max_norm = free.norm / 4;
  const Outcome clipped = run(max_norm);
  CHECK(clipped.norm == free.norm);  // the norm is reported before clipping
  const double coefficient = max_norm / (free.norm + 1e-6);
  REQUIRE(free.before == clipped.before);
  double worst = 0, largest = 0;
  for (size_t i = 0; i < free.before.size(); ++i) {
    for (size_t j = 0; j < free.before[i].size(); ++j) {
      const double full = static_cast<double>(free.after[i][j]) - free.before[i][j];
      const double cut = static_cast<double>(clipped.after[i][j]) - clipped.before[i][j];
      worst = std::max(worst, std::fabs(cut - coefficient * full));
      largest = std::max(largest, std::fabs(full));
    }
  }
  INFO("coefficient " << coefficient << ", largest unclipped step " << largest << ", worst error " << worst);
  REQUIRE(largest > 1e-4);
  // f32 parameters of |p| up to ~0.1: two rounded subtractions per element.
  CHECK(worst <= 1e-7 + 1e-4 * largest);
}

TEST_CASE("expert-router coupling loss: part of the loss, reported as erc in metrics.jsonl") {
  const std::string dir = TestDir();
  std::filesystem::remove_all(dir);
  const std::string prefix = WriteCorpus(dir);
  JobConfig config = TinyConfig(prefix, dir + "/run", comm::MpiEnv::world_size());
  config.mutable_train()->set_steps(3);
  config.mutable_model()->mutable_moe()->set_erc_loss_coeff(0.5);
  parallel::ProcessGroups groups = testing::WorldGroups(1, 1);
  auto trainer = Trainer::Create(config, &groups);
  REQUIRE(trainer.ok());
  REQUIRE((*trainer)->Run().ok());
  // The hinges are active at initialisation and training pushes them down
  // (measured: 8e-4 at step 1, 0 from step 2 with this learning rate).
  const auto& history = (*trainer)->history();
  CHECK(history.front().erc > 0);
  CHECK(history.back().erc < history.front().erc);
  for (const StepStats& s : history) CHECK(s.loss == s.ce + s.aux + s.z + s.erc);
  if (comm::MpiEnv::world_rank() == 0) {
    std::ifstream in(dir + "/run/metrics.jsonl");
    std::string line;
    int with_erc = 0;
    while (std::getline(in, line)) {
      JsonValue v = ParseJson(line).value();
      if (v.Find("event")->string != "train") continue;
      REQUIRE(v.Find("erc") != nullptr);
      if (with_erc == 0) CHECK(v.Find("erc")->number > 0);
      ++with_erc;
    }
    CHECK(with_erc == 3);
  }
}

TEST_CASE("a non-finite loss or gradient stops the run naming the step") {
  const std::string dir = TestDir();
  const std::string prefix = dir + "/corpus";
  JobConfig config = TinyConfig(prefix, dir + "/run_nan", comm::MpiEnv::world_size());
  config.mutable_optim()->set_lr(1e30);
  config.mutable_optim()->set_min_lr(1e29);
  config.mutable_optim()->set_warmup_steps(0);
  config.mutable_optim()->set_clip_grad(0);
  parallel::ProcessGroups groups = testing::WorldGroups(1, 1);
  auto trainer = Trainer::Create(config, &groups).value();
  absl::Status status = trainer->Run();
  REQUIRE_FALSE(status.ok());
  std::string message(status.message());
  CAPTURE(message);
  // The step that failed (the trainer stopped before counting it), what was not
  // finite (the loss, or a named parameter's gradient), and that no update ran.
  const int64_t failed = trainer->step() + 1;
  CHECK(message.rfind(absl::StrCat("step ", failed, ": "), 0) == 0);
  const bool loss = message.find("the loss is not finite") != std::string::npos;
  const bool grad = message.find("the gradient of model.") != std::string::npos &&
                    message.find(" is not finite") != std::string::npos;
  CHECK(loss != grad);
  CHECK(message.find("stopping before the update") != std::string::npos);
  CHECK(trainer->step() < 30);
  // Every rank stopped at the same step.
  int64_t step = trainer->step(), max_step = 0;
  auto w = groups.world->AllReduce(&step, &max_step, 1, DType::kI64, comm::ReduceOp::kMax).value();
  REQUIRE(w.Wait().ok());
  CHECK(max_step == step);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace moe
