// Helpers of the multi-rank tests that drive the whole Trainer: one place that
// builds the world communicator, the process groups and the trainer, and reads
// back what a run left in its parameters.
#ifndef MOE_TESTS_RUNTIME_TRAINER_TEST_UTIL_H_
#define MOE_TESTS_RUNTIME_TRAINER_TEST_UTIL_H_

#include <catch2/catch.hpp>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "data/indexed_dataset.h"
#include "parallel/parameter.h"
#include "parallel/process_groups.h"
#include "runtime/job_config.h"
#include "runtime/trainer.h"

namespace moe::testing {

// Process groups of layout (tp, ep) over a fresh world communicator with a
// 120 s deadline (collective over every rank).
inline parallel::ProcessGroups WorldGroups(int tp, int ep) {
  comm::CommOptions options;
  options.timeout_s = 120;
  auto world = comm::CreateWorldCommunicator(options);
  INFO(world.status().ToString());
  REQUIRE(world.ok());
  auto groups = parallel::CreateProcessGroups(std::move(*world), tp, ep);
  INFO(groups.status().ToString());
  REQUIRE(groups.ok());
  return std::move(*groups);
}

// A corpus of 200 documents of 12 short English sentences each, byte tokens
// plus the end-of-document token 256 (vocabulary 257), at dir/corpus; returns
// that prefix.
inline std::string WriteSentenceCorpus(const std::string& dir) {
  std::filesystem::create_directories(dir);
  const std::string prefix = dir + "/corpus";
  auto writer = data::IndexedDatasetWriter::Create(prefix, 257);
  REQUIRE(writer.ok());
  const char* sentences[] = {"the cat sat on the mat. ", "a dog ran in the park. ",
                             "we like to read good books. ", "the sun is warm today. "};
  for (int doc = 0; doc < 200; ++doc) {
    std::string text;
    for (int i = 0; i < 12; ++i) text += sentences[(doc + i * 3) % 4];
    std::vector<int32_t> tokens(text.begin(), text.end());
    tokens.push_back(256);
    REQUIRE((*writer)->AddDocument(tokens.data(), tokens.size()).ok());
  }
  REQUIRE((*writer)->Finish().ok());
  return prefix;
}

// configs/demo.textproto for a few steps in `dir`: trained on the sentence
// corpus (written there), no evaluation, no checkpoints.
inline JobConfig DemoStepConfig(const std::string& dir) {
  auto config = LoadConfigFile(std::string(MOE_SOURCE_DIR) + "/configs/demo.textproto");
  REQUIRE(config.ok());
  config->mutable_data()->set_train_path(WriteSentenceCorpus(dir));
  config->mutable_train()->set_run_dir(dir + "/run");
  config->mutable_train()->set_eval_every(0);
  config->mutable_checkpoint()->set_dir("");
  config->mutable_checkpoint()->set_save_every(0);
  return *config;
}

// Every rank waits for every other (collective over every rank).
inline void WorldBarrier() {
  auto world = comm::CreateWorldCommunicator(comm::CommOptions());
  REQUIRE(world.ok());
  auto barrier = (*world)->Barrier();
  REQUIRE(barrier.ok());
  REQUIRE(barrier->Wait().ok());
}

// A trainer and the process groups it borrows (Trainer::Create keeps a pointer
// to them), kept together on the heap so neither moves; the trainer goes first.
struct TrainerRun {
  parallel::ProcessGroups groups;
  std::unique_ptr<Trainer> trainer;
};

// Builds the trainer of `config` on layout (tp, ep); fails the test with
// Trainer::Create's message when it refuses.
inline std::unique_ptr<TrainerRun> CreateTrainer(const JobConfig& config, int tp, int ep) {
  auto run = std::make_unique<TrainerRun>();
  run->groups = WorldGroups(tp, ep);
  auto trainer = Trainer::Create(config, &run->groups);
  INFO(trainer.status().ToString());
  REQUIRE(trainer.ok());
  run->trainer = std::move(*trainer);
  return run;
}

// The layout the config names (parallel.tensor, parallel.expert).
inline std::unique_ptr<TrainerRun> CreateTrainer(const JobConfig& config) {
  return CreateTrainer(config, config.parallel().tensor(), config.parallel().expert());
}

// Creates the trainer and runs it to train.steps; fails the test with Run's message.
inline std::unique_ptr<TrainerRun> TrainToEnd(const JobConfig& config) {
  auto run = CreateTrainer(config);
  absl::Status status = run->trainer->Run();
  INFO(status.ToString());
  REQUIRE(status.ok());
  return run;
}

// This rank's f32 values of `params`, by canonical name.
inline std::map<std::string, std::vector<float>> LocalValues(const parallel::ParameterList& params) {
  std::map<std::string, std::vector<float>> values;
  for (const parallel::Parameter* p : params) {
    const float* v = p->value.data<float>();
    values[p->name].assign(v, v + p->value.numel());
  }
  return values;
}

}  // namespace moe::testing

#endif  // MOE_TESTS_RUNTIME_TRAINER_TEST_UTIL_H_
