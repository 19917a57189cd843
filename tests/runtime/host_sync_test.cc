// The data path adds no host waits: a training step of the demo model
// (configs/demo.textproto's model, parallel, LLEP and optimizer sections on 2
// ranks: EP 2, 2 overlap chunks, LLEP on, clipping on) makes exactly the host
// waits that runtime/trainer.h documents (HostSyncsPerStep), counted by the
// CPU backend (HostSyncCount, runtime/core/backend.h). A new Synchronize or
// Work::Wait anywhere on the step's path fails this test. With
// MOE_TEST_DEVICE=cuda (runtime_host_sync_test_cuda_emulated: linked with the
// emulated CUDA backend) the same step trains on cuda over the MPI
// communicator (device buffers staged through host memory) and must make
// the same waits: uploads and fills of device memory wait for nothing.
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

TEST_CASE("a demo training step makes exactly the documented host waits") {
  const int world = comm::MpiEnv::world_size();
  REQUIRE(world == 2);
  const std::string dir =
      (std::filesystem::temp_directory_path() / ("moe_host_sync_test_" + std::to_string(::getppid()) + "_" +
                                                 std::to_string(comm::MpiEnv::world_rank())))
          .string();
  std::filesystem::remove_all(dir);
  JobConfig config = testing::DemoStepConfig(dir);
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
  // The demo's documented figure (docs/design.md, "Host waits per step").
  CHECK(budget.total() == 18);
  for (int step = 0; step < 3; ++step) {
    const uint64_t before = HostSyncCount();
    auto stats = trainer->TrainStep();
    REQUIRE(stats.ok());
    const uint64_t syncs = HostSyncCount() - before;
    INFO("step " << step + 1);
    CHECK(syncs == static_cast<uint64_t>(budget.total()));
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace moe
