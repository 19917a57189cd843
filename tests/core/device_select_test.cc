#include "runtime/core/device_select.h"

#include <catch2/catch.hpp>
#include <cstdlib>
#include <string>

namespace moe {
namespace {

bool Contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

TEST_CASE("LocalRankDevice maps the launcher's local rank to a GPU") {
  for (const char* v : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID"}) unsetenv(v);
  DevicePlacement none = LocalRankDevice(8);
  CHECK(none.device == 0);
  CHECK(Contains(none.source, "no local rank variable"));
  setenv("SLURM_LOCALID", "5", 1);
  CHECK(LocalRankDevice(8).device == 5);
  CHECK(LocalRankDevice(4).device == 1);  // more ranks than GPUs: ranks share them round-robin
  CHECK(LocalRankDevice(4).source == "SLURM_LOCALID=5 -> cuda:1 of 4");
  setenv("OMPI_COMM_WORLD_LOCAL_RANK", "3", 1);  // Open MPI's variable comes first
  CHECK(LocalRankDevice(8).device == 3);
  CHECK(Contains(LocalRankDevice(8).source, "OMPI_COMM_WORLD_LOCAL_RANK=3"));
  setenv("OMPI_COMM_WORLD_LOCAL_RANK", "x", 1);  // not a number: the next variable
  CHECK(LocalRankDevice(8).device == 5);
  for (const char* v : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"}) unsetenv(v);
}

TEST_CASE("ResolveDevice: cpu, and cuda only where this build and machine have it") {
  std::string how;
  auto cpu = ResolveDevice("cpu", &how);
  REQUIRE(cpu.ok());
  CHECK(cpu->is_cpu());
  CHECK(how == "cpu");
  CHECK(!ResolveDevice("gpu", &how).ok());
  auto cuda = ResolveDevice("cuda", &how);
  if (!cuda.ok()) {
    // A CPU-only build names the build option; a CUDA build without a usable GPU names why.
    CHECK(cuda.status().code() == absl::StatusCode::kFailedPrecondition);
    CHECK((BuiltWithCuda() ? Contains(std::string(cuda.status().message()), "CUDA device")
                           : Contains(std::string(cuda.status().message()), "-DMOE_WITH_CUDA=ON")));
  } else {
    CHECK(BuiltWithCuda());
    CHECK(Contains(how, "cuda:"));
  }
}

}  // namespace
}  // namespace moe
