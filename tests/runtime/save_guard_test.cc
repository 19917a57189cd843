// A checkpoint is never written from non-finite numbers (issue 18): a NaN in
// one parameter on one rank makes SaveCheckpoint fail on every rank naming the
// tensor, and the checkpoint already on disk stays as it was.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <filesystem>
#include <limits>
#include <set>
#include <string>

#include "comm/mpi_env.h"
#include "data/indexed_dataset.h"
#include "runtime/trainer.h"

namespace moe {
namespace {

std::set<std::string> Listing(const std::string& dir) {
  std::set<std::string> names;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir)) {
    names.insert(e.path().string() + ":" + std::to_string(e.is_regular_file() ? e.file_size() : 0));
  }
  return names;
}

TEST_CASE("a NaN parameter on one rank: no checkpoint is written, the previous one is kept") {
  const int rank = comm::MpiEnv::world_rank();
  const std::string dir =
      (std::filesystem::temp_directory_path() / ("moe_save_guard_" + std::to_string(::getppid()))).string();
  if (rank == 0) {
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
    auto writer = data::IndexedDatasetWriter::Create(dir + "/corpus", 257).value();
    for (int doc = 0; doc < 200; ++doc) {
      std::string text = "the cat sat on the mat " + std::to_string(doc);
      std::vector<int32_t> tokens(text.begin(), text.end());
      tokens.push_back(256);
      REQUIRE(writer->AddDocument(tokens.data(), tokens.size()).ok());
    }
    REQUIRE(writer->Finish().ok());
  }
  comm::CommOptions options;
  options.timeout_s = 120;
  auto world = comm::CreateWorldCommunicator(options).value();
  REQUIRE(world->Barrier().value().Wait().ok());
  parallel::ProcessGroups groups = parallel::CreateProcessGroups(std::move(world), 1, 1).value();

  JobConfig c = ParseConfigText(R"pb(
                                  model {
                                    hidden_size: 16
                                    num_layers: 1
                                    num_heads: 2
                                    ffn_hidden_size: 32
                                    seq_len: 16
                                    moe { num_experts: 2 top_k: 1 expert_ffn_hidden_size: 16 }
                                  }
                                  train { steps: 0 micro_batch: 2 }
                                  data { valid_fraction: 0 }
                                )pb",
                                "tiny")
                    .value();
  c.mutable_data()->set_train_path(dir + "/corpus");
  c.mutable_train()->set_run_dir(dir + "/run");
  c.mutable_checkpoint()->set_dir(dir + "/ckpt");
  ApplyDefaults(comm::MpiEnv::world_size(), &c);
  auto trainer = Trainer::Create(c, &groups).value();
  REQUIRE(trainer->SaveCheckpoint().ok());
  const std::set<std::string> before = Listing(dir + "/ckpt");

  // The last parameter on the last rank only.
  const parallel::Parameter& p = *trainer->parameters()[trainer->parameters().size() - 1];
  if (rank == comm::MpiEnv::world_size() - 1) {
    const_cast<float*>(p.value.data<float>())[0] = std::numeric_limits<float>::quiet_NaN();
  }
  absl::Status s = trainer->SaveCheckpoint();
  REQUIRE(s.code() == absl::StatusCode::kDataLoss);
  const std::string message(s.message());
  CAPTURE(message);
  CHECK(message.find(p.name + " holds NaN or Inf; refusing to save a checkpoint") != std::string::npos);
  CHECK(message.find("are kept") != std::string::npos);
  CHECK(Listing(dir + "/ckpt") == before);
  REQUIRE(groups.world->Barrier().value().Wait().ok());
  if (rank == 0) std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace moe
