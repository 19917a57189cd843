// The data path adds no host waits: a training step of the demo model
// (configs/demo.textproto's model, parallel, LLEP and optimizer sections on 2
// ranks: EP 2, 2 overlap chunks, LLEP on, clipping on) makes exactly the host
// waits that runtime/trainer.h documents (HostSyncsPerStep), counted by the
// CPU backend (HostSyncCount, runtime/core/backend.h). A new Synchronize or
// Work::Wait anywhere on the step's path fails this test. With
// MOE_TEST_DEVICE=cuda (runtime_host_sync_test_cuda_emulated: linked with the
// emulated CUDA backend) the same step trains on cuda over the MPI
// communicator (device buffers staged through host memory) and must make
// the same waits: uploads and fills of device memory wait for nothing. A
// second case adds the expert bias, a gated shared expert and the coupling
// loss, whose inputs are read with the router's logits, and a second
// micro-batch, whose loss is read with the first's.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "comm/mpi_env.h"
#include "runtime/core/backend.h"
#include "runtime/host_syncs.h"
#include "runtime/trainer.h"
#include "tests/runtime/trainer_test_util.h"

namespace moe {
namespace {

// Three steps of `config` on the 2 ranks (EP 2), each making exactly the
// waits HostSyncsPerStep documents; returns the budget.
HostSyncBudget CheckSteps(JobConfig config, const std::string& dir) {
  const int world = comm::MpiEnv::world_size();
  const char* device = std::getenv("MOE_TEST_DEVICE");
  const bool cuda = device != nullptr && std::string(device) == "cuda";
  if (cuda) {
    config.mutable_train()->set_device("cuda");
    config.mutable_comm()->set_backend("mpi");
  }
  ApplyDefaults(world, &config);
  REQUIRE(config.parallel().expert() == 2);
  REQUIRE(config.parallel().overlap_chunks() == 2);
  REQUIRE(config.llep().enabled());

  comm::CommOptions options;
  options.timeout_s = 120;
  if (cuda) {
    options.backend = "mpi";
    options.device = Device::Cuda(0);
  }
  auto groups = parallel::CreateProcessGroups(comm::CreateWorldCommunicator(options).value(), 1, 2).value();
  auto trainer = Trainer::Create(config, &groups).value();

  const HostSyncBudget budget = HostSyncsPerStep(config, world);
  INFO(budget.ToString());
  for (int step = 0; step < 3; ++step) {
    const uint64_t before = HostSyncCount();
    auto stats = trainer->TrainStep();
    REQUIRE(stats.ok());
    const uint64_t syncs = HostSyncCount() - before;
    INFO("step " << step + 1);
    CHECK(syncs == static_cast<uint64_t>(budget.total()));
  }
  std::filesystem::remove_all(dir);
  return budget;
}

std::string TestDir(const char* name) {
  const std::string dir =
      (std::filesystem::temp_directory_path() /
       (std::string(name) + std::to_string(::getppid()) + "_" + std::to_string(comm::MpiEnv::world_rank())))
          .string();
  std::filesystem::remove_all(dir);
  return dir;
}

TEST_CASE("a demo training step makes exactly the documented host waits") {
  REQUIRE(comm::MpiEnv::world_size() == 2);
  const std::string dir = TestDir("moe_host_sync_test_");
  const HostSyncBudget budget = CheckSteps(testing::DemoStepConfig(dir), dir);
  // The demo's documented figure (docs/design.md, "Host waits per step").
  CHECK(budget.total() == 13);
}

TEST_CASE("the expert bias, the shared expert's gate and the coupling loss's rows add no host wait") {
  // DeepSeek-V3's bias-steered choice and a Qwen-style gated shared expert:
  // the bias and the gate logits are read with the router's logits (one wait
  // a layer for the routing), the gate's backward runs on the stream.
  REQUIRE(comm::MpiEnv::world_size() == 2);
  const std::string dir = TestDir("moe_host_sync_test_shared_");
  JobConfig config = testing::DemoStepConfig(dir);
  config::MoeConfig* moe = config.mutable_model()->mutable_moe();
  moe->set_expert_bias_update_rate(0.001);
  moe->set_shared_expert_ffn_hidden_size(2 * config.model().hidden_size());
  moe->set_shared_expert_gate(true);
  // The coupling loss: its router rows come with the routing read; its
  // norms are gathered over EP on the stream and read once; its backward
  // waits for nothing.
  moe->set_erc_loss_coeff(0.01);
  // Two micro-batches a step: their losses land together, with the gradient norm.
  config.mutable_train()->set_grad_accum(2);
  const HostSyncBudget budget = CheckSteps(config, dir);
  // Per MoE layer and micro-batch: the routing read, LLEP's counts (which
  // stand in for the count exchange) and the coupling loss's norms (squared,
  // gathered over EP on the stream, read once). Per step the
  // demo's 5 and the bias update's load sum over DP (its read of the new
  // biases lands with the step end), whatever the number of MoE layers and
  // micro-batches (their losses land with the gradient norm).
  CHECK(budget.per_moe_layer == 2 + 1);
  CHECK(budget.per_step == 5 + 1);
  CHECK(budget.total() == 2 * 4 * 3 + 6);
}

}  // namespace
}  // namespace moe
