// Helpers of the multi-rank parallel/ tests: communicators, process groups and
// host <-> CPU tensor staging.
#ifndef MOE_TESTS_PARALLEL_PARALLEL_TEST_UTIL_H_
#define MOE_TESTS_PARALLEL_PARALLEL_TEST_UTIL_H_

#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "comm/communicator.h"
#include "parallel/process_groups.h"
#include "runtime/core/backend.h"
#include "runtime/core/tensor.h"

namespace moe::parallel::testing {

#define MOE_REQUIRE_OK(expr)            \
  do {                                  \
    const absl::Status moe_s_ = (expr); \
    INFO(moe_s_.ToString());            \
    REQUIRE(moe_s_.ok());               \
  } while (0)

template <typename T>
T ValueOrDie(absl::StatusOr<T> v) {
  INFO(v.status().ToString());
  REQUIRE(v.ok());
  return std::move(v).value();
}

inline std::unique_ptr<comm::Communicator> World() {
  comm::CommOptions options;
  options.backend = "mpi";
  options.timeout_s = 120;
  return ValueOrDie(comm::CreateWorldCommunicator(options));
}

inline ProcessGroups Groups(int tp, int ep) { return ValueOrDie(CreateProcessGroups(World(), tp, ep)); }

inline Backend& Cpu() { return *ValueOrDie(GetBackend(Device::Cpu())); }

inline Tensor HostTensor(const std::vector<float>& v, Shape shape) {
  return ValueOrDie(Tensor::FromHost(Cpu(), shape, DType::kF32, v.data(), v.size() * sizeof(float),
                                     MemoryCategory::kActivations));
}

inline std::vector<float> ToVector(const Tensor& t) {
  REQUIRE(Cpu().default_stream().Synchronize().ok());
  const float* p = t.data<float>();
  return std::vector<float>(p, p + t.numel());
}

}  // namespace moe::parallel::testing

#endif  // MOE_TESTS_PARALLEL_PARALLEL_TEST_UTIL_H_
