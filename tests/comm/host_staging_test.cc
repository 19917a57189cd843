// The ranges a staged operation copies through host memory (host_staging.h):
// extents per operation kind, in-place buffers merged into one range, zero
// counts skipped, and buffers rebased into the host copies at their offsets.
#include "comm/host_staging.h"

#include <catch2/catch.hpp>
#include <vector>

namespace moe::comm {
namespace {

TEST_CASE("staged ranges: extents per kind, written flags, in place merged") {
  std::vector<char> a(1000), b(1000);
  OpDesc op;
  op.kind = OpKind::kAllReduce;
  op.dtype = DType::kF32;
  op.count = 10;
  op.send = a.data();
  op.recv = b.data();
  auto r = StagedRanges(op, 4);
  REQUIRE(r.size() == 2);
  const bool a_first = r[0].device == a.data();
  CHECK(r[a_first ? 0 : 1].bytes == 40);
  CHECK(!r[a_first ? 0 : 1].written);
  CHECK(r[a_first ? 1 : 0].written);

  op.recv = a.data();  // in place: one range, read and written
  r = StagedRanges(op, 4);
  REQUIRE(r.size() == 1);
  CHECK(r[0].bytes == 40);
  CHECK(r[0].written);

  // In-place AllGather: send is rank 2's block of recv.
  op.kind = OpKind::kAllGather;
  op.dtype = DType::kBF16;
  op.count = 5;
  op.recv = a.data();
  op.send = a.data() + 2 * 5 * 2;
  r = StagedRanges(op, 4);
  REQUIRE(r.size() == 1);
  CHECK(r[0].device == a.data());
  CHECK(r[0].bytes == 4 * 5 * 2);

  // AllToAllV: the extent is the farthest block, gaps included; zero counts
  // do not extend it.
  op.kind = OpKind::kAllToAllV;
  op.dtype = DType::kI32;
  op.send = a.data();
  op.recv = b.data();
  op.send_counts = {1, 0, 2};
  op.send_displs = {0, 50, 3};
  op.recv_counts = {0, 4, 0};
  op.recv_displs = {90, 10, 0};
  r = StagedRanges(op, 3);
  REQUIRE(r.size() == 2);
  for (const StagedRange& x : r) CHECK(x.bytes == (x.device == a.data() ? 5 * 4 : 14 * 4));

  // Grouped P2P: one range per buffer, receives written; zero counts skipped.
  op.kind = OpKind::kGroupP2P;
  op.send = op.recv = nullptr;
  op.p2p = {P2POp::Send(a.data(), 3, DType::kF64, 1), P2POp::Recv(b.data() + 8, 2, DType::kF64, 1),
            P2POp::Recv(b.data() + 500, 0, DType::kF64, 2)};
  r = StagedRanges(op, 3);
  REQUIRE(r.size() == 2);
  for (const StagedRange& x : r) {
    CHECK(x.bytes == (x.device == a.data() ? 24 : 16));
    CHECK(x.written == (x.device != a.data()));
  }

  op.kind = OpKind::kBarrier;
  CHECK(StagedRanges(op, 3).empty());
}

TEST_CASE("rebased buffers keep their offsets in the host copies") {
  std::vector<char> dev(256), host(256), p2p_dev(64), p2p_host(64);
  OpDesc op;
  op.kind = OpKind::kAllGather;
  op.dtype = DType::kF32;
  op.count = 4;
  op.recv = dev.data();
  op.send = dev.data() + 16;  // in place, rank 1 of 3
  std::vector<StagedRange> r = StagedRanges(op, 3);
  REQUIRE(r.size() == 1);
  RebaseBuffers(r, {host.data()}, &op);
  CHECK(op.recv == host.data());
  CHECK(op.send == host.data() + 16);

  OpDesc p;
  p.kind = OpKind::kGroupP2P;
  p.p2p = {P2POp::Recv(p2p_dev.data() + 8, 2, DType::kF32, 0), P2POp::Send(dev.data(), 0, DType::kF32, 0)};
  r = StagedRanges(p, 2);
  REQUIRE(r.size() == 1);
  RebaseBuffers(r, {p2p_host.data()}, &p);
  CHECK(p.p2p[0].buf == p2p_host.data());
  CHECK(p.p2p[1].buf == dev.data());  // zero bytes: left as it was
}

}  // namespace
}  // namespace moe::comm
