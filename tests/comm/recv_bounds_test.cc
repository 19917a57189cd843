// Receives are checked against the counts announced for them (issue 18): a
// peer that sends fewer elements than this rank was told to expect is a
// DataLoss error, and one that sends more fails without writing past the
// receive buffer. Runs at 2 ranks; rank 0 sends 3 floats to rank 1.
#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "comm/mpi_env.h"

namespace moe::comm {
namespace {

std::unique_ptr<Communicator> World() {
  CommOptions options;
  options.backend = "mpi";
  options.timeout_s = 60;
  return CreateWorldCommunicator(options).value();
}

// Rank 1 expects `expect` floats from rank 0, which sends 3. Returns rank 1's
// status and checks that nothing past the announced region was written.
absl::Status Exchange(size_t expect) {
  auto world = World();
  const int me = world->rank();
  std::vector<float> send(3, 1.5f);
  std::vector<float> recv(8, -7.0f);  // guard values past the announced region
  const std::vector<size_t> send_counts = me == 0 ? std::vector<size_t>{0, 3} : std::vector<size_t>{0, 0};
  const std::vector<size_t> recv_counts =
      me == 1 ? std::vector<size_t>{expect, 0} : std::vector<size_t>{0, 0};
  const std::vector<size_t> displs{0, 0};
  absl::StatusOr<Work> w =
      world->AllToAllV(send.data(), send_counts, displs, recv.data(), recv_counts, displs, DType::kF32);
  absl::Status s = w.ok() ? w->Wait() : w.status();
  for (size_t i = expect; i < recv.size(); ++i) CHECK(recv[i] == -7.0f);
  return s;
}

TEST_CASE("fewer elements than announced: DataLoss naming the peer and both counts") {
  REQUIRE(MpiEnv::world_size() == 2);
  absl::Status s = Exchange(4);
  if (MpiEnv::world_rank() == 1) {
    CAPTURE(s.ToString());
    CHECK(s.code() == absl::StatusCode::kDataLoss);
    CHECK(std::string(s.message()).find("received 3 elements from group rank 0 where 4 were announced") !=
          std::string::npos);
  } else {
    CHECK(s.ok());
  }
}

TEST_CASE("more elements than announced: an error, the buffer past the count untouched") {
  absl::Status s = Exchange(2);
  if (MpiEnv::world_rank() == 1) {
    CAPTURE(s.ToString());
    CHECK_FALSE(s.ok());
  }
}

}  // namespace
}  // namespace moe::comm
