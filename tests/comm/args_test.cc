// Bad arguments: every call gets a message naming the operation and the
// argument, and nothing is sent (the next valid collective still matches).
#include <catch2/catch.hpp>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "comm/instrumentation.h"
#include "comm/mpi_env.h"
#include "runtime/core/config.h"

namespace moe::comm {
namespace {

void ExpectError(const absl::StatusOr<Work>& w, const std::vector<std::string>& parts) {
  REQUIRE_FALSE(w.ok());
  CHECK(w.status().code() == absl::StatusCode::kInvalidArgument);
  const std::string message(w.status().message());
  for (const std::string& p : parts) {
    INFO("message: " << message << "\nexpected to contain: " << p);
    CHECK(message.find(p) != std::string::npos);
  }
}

TEST_CASE("bad arguments are rejected with messages and send nothing") {
  auto sink = std::make_shared<TotalsSink>();
  CommOptions options;
  options.backend = "mpi";
  options.timeout_s = 30;
  options.sink = sink;
  auto made = CreateWorldCommunicator(options);
  REQUIRE(made.ok());
  Communicator& c = **made;
  const int n = c.size(), me = c.rank();
  std::vector<float> a(64 * n), b(64 * n);
  std::vector<size_t> ones(n, 1), displs(n);
  for (int r = 0; r < n; ++r) displs[r] = r;

  // Only rank 0 makes the bad calls: if any of them sent something, the
  // AllReduce below would mismatch on the other ranks.
  if (me == 0) {
    ExpectError(c.AllReduce(nullptr, b.data(), 4, DType::kF32, ReduceOp::kSum),
                {"AllReduce", "send buffer is null"});
    ExpectError(c.AllReduce(a.data(), nullptr, 4, DType::kF32, ReduceOp::kSum),
                {"AllReduce", "recv buffer is null"});
    ExpectError(c.AllReduce(a.data(), b.data(), 4, static_cast<DType>(42), ReduceOp::kSum),
                {"AllReduce", "dtype = 42"});
    ExpectError(c.AllReduce(a.data(), b.data(), 4, DType::kF32, static_cast<ReduceOp>(9)),
                {"AllReduce", "op = 9"});
    ExpectError(c.AllReduce(a.data(), a.data() + 2, 4, DType::kF32, ReduceOp::kSum),
                {"AllReduce", "overlap", "send == recv"});
    ExpectError(c.AllReduce(a.data(), b.data(), SIZE_MAX / 2, DType::kF32, ReduceOp::kSum),
                {"AllReduce", "overflows"});
    ExpectError(c.Broadcast(a.data(), b.data(), 4, DType::kF32, n), {"Broadcast", "root = ", "out of range"});
    ExpectError(c.Broadcast(a.data(), b.data(), 4, DType::kF32, -1), {"Broadcast", "root = -1"});
    ExpectError(c.Send(a.data(), 4, DType::kF32, n + 3), {"Send", "peer = "});
    ExpectError(c.Send(a.data(), 4, DType::kF32, me), {"Send", "is this rank", "GroupP2P"});
    ExpectError(c.Recv(nullptr, 4, DType::kF32, (me + 1) % n), {"Recv", "buf is null"});
    ExpectError(c.AllToAll(a.data(), a.data(), 4, DType::kF32), {"AllToAll", "cannot run in place"});
    ExpectError(
        c.AllToAllV(a.data(), std::vector<size_t>(n + 1, 1), displs, b.data(), ones, displs, DType::kF32),
        {"AllToAllV", "send_counts has"});
    ExpectError(c.AllToAllV(a.data(), ones, displs, b.data(), ones, std::vector<size_t>(n, 0), DType::kF32),
                {"AllToAllV", "overlap", "recv_displs"});
    ExpectError(c.AllGatherV(a.data(), 2, b.data(), ones, displs, DType::kF32),
                {"AllGatherV", "send_count = 2", "recv_counts[0] = 1"});
    ExpectError(
        c.GroupP2P({P2POp::Send(a.data(), 4, DType::kF32, 0), P2POp::Recv(b.data(), 4, DType::kF32, -2)}),
        {"GroupP2P", "ops[1].peer = -2"});
    ExpectError(c.GroupP2P({P2POp::Send(nullptr, 4, DType::kF32, 0)}), {"GroupP2P", "ops[0].buf is null"});
    ExpectError(c.ReduceScatter(a.data(), a.data() + 1, 4, DType::kF32, ReduceOp::kSum),
                {"ReduceScatter", "overlap", "recv == send + rank * count"});
    auto split = c.Split(-5, 0);
    REQUIRE_FALSE(split.ok());
    CHECK(std::string(split.status().message()).find("color = -5") != std::string::npos);
    CHECK_FALSE(c.set_timeout_s(0).ok());
    // Null buffers are fine when nothing is transferred.
    REQUIRE(c.Broadcast(nullptr, nullptr, 0, DType::kF32, 0).ok());
  } else {
    REQUIRE(c.Broadcast(nullptr, nullptr, 0, DType::kF32, 0).ok());
  }
  // The next valid collective matches on every rank.
  int64_t x = me + 1, sum = 0;
  auto w = c.AllReduce(&x, &sum, 1, DType::kI64, ReduceOp::kSum);
  REQUIRE(w.ok());
  REQUIRE(w->Wait().ok());
  REQUIRE(sum == n * (n + 1) / 2);
  REQUIRE(w->sequence() == 1);  // the rejected calls took no sequence number
  auto totals = sink->Snapshot();
  CHECK(totals[OpKind::kAllReduce].count == 1);
  CHECK(totals.count(OpKind::kSend) == 0);
  CHECK(totals.count(OpKind::kAllToAllV) == 0);
}

TEST_CASE("comm config: defaults and bad values") {
  config::CommConfig cfg;
  auto o = CommOptionsFromConfig(cfg, "cpu");
  REQUIRE(o.ok());
  CHECK(o->timeout_s == 600);
  CHECK(o->backend == "auto");
  CHECK(o->device == Device::Cpu());
  cfg.set_backend("gloo");
  auto bad = CommOptionsFromConfig(cfg, "cpu");
  REQUIRE_FALSE(bad.ok());
  CHECK(std::string(bad.status().message()).find("comm.backend = 'gloo'") != std::string::npos);
  // nccl cannot move host tensors: refused with the fix, from the config and at creation.
  cfg.set_backend("nccl");
  auto host_nccl = CommOptionsFromConfig(cfg, "cpu");
  REQUIRE_FALSE(host_nccl.ok());
  CHECK(std::string(host_nccl.status().message()).find("set comm.backend = \"mpi\" or \"auto\"") !=
        std::string::npos);
  CHECK(CommOptionsFromConfig(cfg, "cuda").ok());
  cfg.set_backend("mpi");
  CHECK(CommOptionsFromConfig(cfg, "cuda").ok());  // allowed: staged through host memory
  cfg.set_timeout_s(-1);
  CHECK_FALSE(CommOptionsFromConfig(cfg, "cpu").ok());
  CommOptions nccl;
  nccl.backend = "nccl";
  auto made = CreateWorldCommunicator(nccl);  // device cpu
  REQUIRE_FALSE(made.ok());
  CHECK(std::string(made.status().message()).find("train.device = \"cpu\"") != std::string::npos);
#ifndef MOE_WITH_CUDA
  nccl.device = Device::Cuda(0);
  made = CreateWorldCommunicator(nccl);
  REQUIRE_FALSE(made.ok());
  CHECK(std::string(made.status().message()).find("this build has no NCCL") != std::string::npos);
#endif
}

}  // namespace
}  // namespace moe::comm
