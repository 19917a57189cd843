// Checkpoint damage that the shard checksums alone do not catch (issue 18):
// model.h5 flipped or missing (verify and resume both refuse it), NaN values
// (verify reports them), a plain file given as a checkpoint, and a checkpoint
// holding tensors the model does not. Every refusal leaves the files as they
// were. Runs at 2 ranks (tp 2).
#include <catch2/catch.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "checkpoint_test_util.h"
#include "runtime/checkpoint_format.h"
#include "runtime/job_config.h"

namespace moe {
namespace {

using testing::BuildModel;
using testing::FillModel;
using testing::FlipByte;
using testing::GroupsOver;
using testing::MakeCheckpointer;
using testing::SharedTempDir;
using testing::SynthModel;
using testing::World;
using testing::WorldBarrier;

TEST_CASE("model.h5 damaged or missing: verify and resume refuse it, naming the file") {
  const std::string root = SharedTempDir("damage_master");
  const int n = World().size();
  parallel::ProcessGroups g = GroupsOver(n, n >= 2 ? 2 : 1, 1);
  SynthModel m;
  BuildModel(m, g, /*zero=*/false);
  auto ckpt = MakeCheckpointer(g, root);
  for (int64_t step : {10, 20, 30}) {
    FillModel(m, static_cast<int>(step));
    REQUIRE(ckpt->Save(testing::SampleTrainState(step), m.Tensors(), "").ok());
  }
  const std::string flipped = JoinPath(root, StepDirName(20)), missing = JoinPath(root, StepDirName(30));
  VerifyReport report;
  if (World().rank() == 0) {
    REQUIRE(VerifyCheckpoint(flipped, &report).ok());
    // A byte in the middle of the HDF5 metadata (any byte counts).
    const auto size = std::filesystem::file_size(JoinPath(flipped, kMasterFileName));
    FlipByte(JoinPath(flipped, kMasterFileName), size / 2);
    std::filesystem::remove(JoinPath(missing, kMasterFileName));
    absl::Status v = VerifyCheckpoint(flipped, &report);
    CHECK_THAT(std::string(v.message()), Catch::Contains("model.h5 is damaged"));
    v = VerifyCheckpoint(missing, &report);
    CHECK_THAT(std::string(v.message()), Catch::Contains("model.h5 is missing"));
  }
  WorldBarrier();
  for (const std::string& bad : {flipped, missing}) {
    absl::StatusOr<LoadedCheckpoint> loaded = ckpt->Load(bad, m.Tensors());
    REQUIRE_FALSE(loaded.ok());
    CHECK(loaded.status().code() == absl::StatusCode::kDataLoss);
    CHECK_THAT(std::string(loaded.status().message()), Catch::Contains("model.h5 is"));
  }
  // resume=auto passes over both to step 10, which is intact.
  auto resumed = ckpt->Resume("auto", m.Tensors());
  REQUIRE(resumed.ok());
  REQUIRE(resumed->has_value());
  CHECK((*resumed)->state.step == 10);
  CHECK(std::filesystem::exists(JoinPath(flipped, kManifestFileName)));  // nothing deleted
  WorldBarrier();
  if (World().rank() == 0) std::filesystem::remove_all(root);
}

TEST_CASE("verify reports NaN values; a plain file is not a checkpoint directory") {
  const std::string root = SharedTempDir("damage_nan");
  const int n = World().size();
  parallel::ProcessGroups g = GroupsOver(n, n >= 2 ? 2 : 1, 1);
  SynthModel m;
  BuildModel(m, g, /*zero=*/false);
  FillModel(m, 1);
  const parallel::Parameter& p = *m.list[0];
  const_cast<float*>(p.value.data<float>())[0] = std::numeric_limits<float>::quiet_NaN();
  auto ckpt = MakeCheckpointer(g, root);
  REQUIRE(ckpt->Save(testing::SampleTrainState(1), m.Tensors(), "").ok());
  if (World().rank() == 0) {
    VerifyReport report;
    absl::Status v = VerifyCheckpoint(JoinPath(root, StepDirName(1)), &report);
    CHECK_THAT(std::string(v.message()), Catch::Contains(p.name) && Catch::Contains("NaN or Inf value(s)"));
    const std::string file = JoinPath(root, "plain");
    { std::ofstream(file) << "x"; }
    absl::StatusOr<ckpt::Manifest> manifest = ReadManifest(file);
    CHECK_THAT(std::string(manifest.status().message()), Catch::Contains("is not a checkpoint directory"));
  }
  WorldBarrier();
  if (World().rank() == 0) std::filesystem::remove_all(root);
}

TEST_CASE("a checkpoint with tensors the model lacks is refused, naming them") {
  const std::string root = SharedTempDir("damage_extra");
  const int n = World().size();
  parallel::ProcessGroups g = GroupsOver(n, n >= 2 ? 2 : 1, 1);
  SynthModel m;
  BuildModel(m, g, /*zero=*/false);
  FillModel(m, 3);
  auto ckpt = MakeCheckpointer(g, root);
  std::vector<ShardedTensor> all = m.Tensors();
  REQUIRE(ckpt->Save(testing::SampleTrainState(3), all, "").ok());
  const std::string dropped = all.back().name;
  all.pop_back();
  absl::StatusOr<LoadedCheckpoint> loaded = ckpt->Load(JoinPath(root, StepDirName(3)), all);
  REQUIRE_FALSE(loaded.ok());
  CHECK_THAT(std::string(loaded.status().message()),
             Catch::Contains("has 1 tensor(s) this model does not: " + dropped));
  WorldBarrier();
  if (World().rank() == 0) std::filesystem::remove_all(root);
}

std::map<std::string, std::vector<float>> Values(const std::vector<ShardedTensor>& tensors) {
  std::map<std::string, std::vector<float>> out;
  for (const ShardedTensor& t : tensors) {
    const float* v = t.tensor.numel() > 0 ? t.tensor.data<float>() : nullptr;
    out[t.name] = std::vector<float>(v, v + t.tensor.numel());
  }
  return out;
}

TEST_CASE("checkpoint.partial_load loads what both have and names every tensor skipped") {
  const std::string root = SharedTempDir("damage_partial");
  const int n = World().size();
  parallel::ProcessGroups g = GroupsOver(n, n >= 2 ? 2 : 1, 1);
  SynthModel m;
  BuildModel(m, g, /*zero=*/false);
  const std::vector<ShardedTensor> all = m.Tensors();
  // Saved: every tensor but the last. Loaded into: every tensor but the first.
  const std::vector<ShardedTensor> saved(all.begin(), all.end() - 1), model(all.begin() + 1, all.end());
  FillModel(m, 3);
  const auto at_save = Values(all);
  REQUIRE(MakeCheckpointer(g, root)->Save(testing::SampleTrainState(3), saved, "").ok());
  FillModel(m, 5);
  const auto before_load = Values(all);
  const std::string path = JoinPath(root, StepDirName(3));

  // Without the flag: refused naming the tensor, nothing loaded.
  absl::StatusOr<LoadedCheckpoint> strict = MakeCheckpointer(g, root)->Load(path, model);
  REQUIRE_FALSE(strict.ok());
  CHECK(strict.status().code() == absl::StatusCode::kNotFound);
  CHECK_THAT(std::string(strict.status().message()), Catch::Contains("has no tensor " + all.back().name) &&
                                                         Catch::Contains("checkpoint.partial_load"));
  CHECK(Values(all) == before_load);

  CheckpointOptions partial;
  partial.partial_load = true;
  absl::StatusOr<LoadedCheckpoint> loaded = MakeCheckpointer(g, root, partial)->Load(path, model);
  REQUIRE(loaded.ok());
  REQUIRE(loaded->tensors_skipped.size() == 2);
  CHECK_THAT(loaded->tensors_skipped[0],
             Catch::StartsWith(all.back().name + " ") &&
                 Catch::Contains("not in the checkpoint, keeps its initial values"));
  CHECK_THAT(loaded->tensors_skipped[1],
             Catch::StartsWith(all.front().name + " ") && Catch::Contains("not in this model, ignored"));
  const auto after = Values(all);
  for (const ShardedTensor& t : model) {
    CAPTURE(t.name);
    CHECK(after.at(t.name) == (t.name == all.back().name ? before_load : at_save).at(t.name));
  }
  CHECK(after.at(all.front().name) == before_load.at(all.front().name));  // not in the model's list
  WorldBarrier();
  if (World().rank() == 0) std::filesystem::remove_all(root);
}

TEST_CASE("a manifest shape too large for int64 is refused without overflow") {
  ckpt::Manifest m;
  ckpt::TensorEntry* t = m.add_tensors();
  t->set_name("w");
  t->set_dtype("f32");
  for (int64_t d : {int64_t{1} << 40, int64_t{1} << 40, int64_t{3}}) t->add_global_shape(d);
  absl::Status s = ValidateManifest(m, "ckpt/step_1");
  CHECK(s.code() == absl::StatusCode::kDataLoss);
  CHECK_THAT(
      std::string(s.message()),
      Catch::Contains("tensor w: its global shape [1099511627776,1099511627776,3] holds more than 2^60"));
  // A shard whose offset + count would overflow.
  t->clear_global_shape();
  t->add_global_shape(int64_t{1} << 40);
  ckpt::Shard* sh = t->add_shards();
  sh->add_offset(std::numeric_limits<int64_t>::max() - 1);
  sh->add_count(4);
  s = ValidateManifest(m, "ckpt/step_1");
  CHECK_THAT(std::string(s.message()), Catch::Contains("lies outside the global shape"));
}

TEST_CASE("the checkpoint deadline scales with the bytes unless checkpoint.timeout_s is set") {
  CHECK(CheckpointDeadline(600, 0) == 600);
  CHECK(CheckpointDeadline(600, 5'000'000'000) == Approx(700));
  JobConfig c = ParseConfigText("checkpoint { timeout_s: 42 dir: \"x\" }", "t").value();
  CHECK(CheckpointOptionsFromConfig(c.checkpoint()).timeout_s == 42);
  c.mutable_checkpoint()->clear_timeout_s();
  CHECK(CheckpointOptionsFromConfig(c.checkpoint()).timeout_s == 0);  // scaled per save
}

}  // namespace
}  // namespace moe
