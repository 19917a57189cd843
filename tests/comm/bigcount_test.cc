// One real operation above INT_MAX elements: a 2^31 + 100 byte Broadcast
// (2 GiB per rank), split by the MPI backend into calls MPI can take.
#include <catch2/catch.hpp>
#include <cstdint>
#include <vector>

#include "comm/communicator.h"

namespace moe::comm {
namespace {

TEST_CASE("Broadcast of more than INT_MAX elements") {
  CommOptions options;
  options.backend = "mpi";
  options.timeout_s = 120;
  auto world = CreateWorldCommunicator(options);
  REQUIRE(world.ok());
  const size_t count = (size_t{1} << 31) + 100;
  std::vector<uint8_t> buf(count, 0);
  if ((*world)->rank() == 0) {
    for (size_t i = 0; i < count; ++i) buf[i] = static_cast<uint8_t>(i * 2654435761u >> 24);
  }
  auto w = (*world)->Broadcast(buf.data(), buf.data(), count, DType::kU8, 0);
  REQUIRE(w.ok());
  REQUIRE(w->Wait().ok());
  size_t bad = 0;
  for (size_t i = 0; i < count; ++i) bad += buf[i] != static_cast<uint8_t>(i * 2654435761u >> 24);
  REQUIRE(bad == 0);
}

}  // namespace
}  // namespace moe::comm
