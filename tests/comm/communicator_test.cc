// Every collective of the MPI communicator against world-size arithmetic, run
// under mpirun at 2, 3 and 4 ranks.
#include "comm/communicator.h"

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "comm/instrumentation.h"
#include "comm/mpi_communicator.h"
#include "comm/mpi_env.h"
#include "parallel/layout.h"

namespace moe::comm {
namespace {

// MOE_TEST_STAGE_THROUGH_HOST=1 (ctest's comm_communicator_test_staged_np*)
// runs every test with the buffers staged through host copies, the path of
// device buffers on the MPI backend (comm/host_staging.h).
bool Staged() {
  const char* v = std::getenv("MOE_TEST_STAGE_THROUGH_HOST");
  return v != nullptr && std::string(v) == "1";
}

std::unique_ptr<Communicator> World(std::shared_ptr<CommSink> sink = nullptr) {
  CommOptions options;
  options.backend = "mpi";
  options.timeout_s = 60;
  options.sink = std::move(sink);
  options.stage_through_host = Staged();
  auto world = CreateWorldCommunicator(options);
  REQUIRE(world.ok());
  return std::move(world).value();
}

void Done(const absl::StatusOr<Work>& w) {
  INFO(w.status().ToString());
  REQUIRE(w.ok());
  absl::Status s = w->Wait();
  INFO(s.ToString());
  REQUIRE(s.ok());
}

// Value rank r contributes at index i: small integers, exact in every dtype.
double Contribution(int r, size_t i) { return static_cast<double>((r * 7 + i * 3) % 11) - 3; }

uint16_t ToBf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return static_cast<uint16_t>(b >> 16);  // exact for the small integers used here
}
float FromBf16(uint16_t h) {
  uint32_t b = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// A typed buffer for the dtype-generic tests.
struct Buffer {
  DType dtype;
  std::vector<char> bytes;
  Buffer(DType t, size_t n) : dtype(t), bytes(n * DTypeSize(t)) {}
  size_t size() const { return bytes.size() / DTypeSize(dtype); }
  void* data() { return bytes.data(); }
  void Set(size_t i, double v) {
    switch (dtype) {
      case DType::kF32:
        reinterpret_cast<float*>(data())[i] = static_cast<float>(v);
        break;
      case DType::kF64:
        reinterpret_cast<double*>(data())[i] = v;
        break;
      case DType::kI32:
        reinterpret_cast<int32_t*>(data())[i] = static_cast<int32_t>(v);
        break;
      case DType::kI64:
        reinterpret_cast<int64_t*>(data())[i] = static_cast<int64_t>(v);
        break;
      case DType::kU8:
        reinterpret_cast<uint8_t*>(data())[i] = static_cast<uint8_t>(v);
        break;
      case DType::kBF16:
        reinterpret_cast<uint16_t*>(data())[i] = ToBf16(static_cast<float>(v));
        break;
    }
  }
  double Get(size_t i) const {
    const void* p = bytes.data();
    switch (dtype) {
      case DType::kF32:
        return reinterpret_cast<const float*>(p)[i];
      case DType::kF64:
        return reinterpret_cast<const double*>(p)[i];
      case DType::kI32:
        return reinterpret_cast<const int32_t*>(p)[i];
      case DType::kI64:
        return static_cast<double>(reinterpret_cast<const int64_t*>(p)[i]);
      case DType::kU8:
        return reinterpret_cast<const uint8_t*>(p)[i];
      case DType::kBF16:
        return FromBf16(reinterpret_cast<const uint16_t*>(p)[i]);
    }
    return 0;
  }
};

double Expected(ReduceOp op, DType t, int size, size_t i) {
  double acc = op == ReduceOp::kMax ? -1e300 : op == ReduceOp::kMin ? 1e300 : 0;
  for (int r = 0; r < size; ++r) {
    double v = Contribution(r, i);
    if (op == ReduceOp::kMax)
      acc = std::max(acc, v);
    else if (op == ReduceOp::kMin)
      acc = std::min(acc, v);
    else
      acc += v;
  }
  if (op == ReduceOp::kAvg) {
    bool integer = t == DType::kI32 || t == DType::kI64;
    acc = integer ? std::trunc(acc / size) : acc / size;
  }
  if (t == DType::kF32) acc = static_cast<float>(acc);  // what the dtype can hold
  return acc;
}

const DType kReduceTypes[] = {DType::kF32, DType::kF64, DType::kI32, DType::kI64, DType::kBF16};
const ReduceOp kOps[] = {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax, ReduceOp::kMin};

TEST_CASE("world communicator matches MPI world") {
  auto world = World();
  CHECK(world->rank() == MpiEnv::world_rank());
  CHECK(world->size() == MpiEnv::world_size());
  std::vector<int> all(world->size());
  std::iota(all.begin(), all.end(), 0);
  CHECK(world->group_ranks() == all);
  CHECK(world->device() == Device::Cpu());
  Done(world->Barrier());
}

TEST_CASE("AllReduce of every dtype and op equals world-size arithmetic, in and out of place") {
  auto world = World();
  const int n = world->size();
  const size_t count = 37;
  for (DType t : kReduceTypes) {
    for (ReduceOp op : kOps) {
      for (bool in_place : {false, true}) {
        Buffer send(t, count), recv(t, count);
        for (size_t i = 0; i < count; ++i) send.Set(i, Contribution(world->rank(), i));
        Buffer& out = in_place ? send : recv;
        Done(world->AllReduce(send.data(), out.data(), count, t, op));
        for (size_t i = 0; i < count; ++i) {
          double want = Expected(op, t, n, i);
          if (t == DType::kBF16 && op == ReduceOp::kAvg) {
            REQUIRE(std::fabs(out.Get(i) - want) <= std::fabs(want) / 64 + 1e-6);
          } else {
            INFO(DTypeName(t) << " " << ReduceOpName(op) << " in_place " << in_place << " i " << i);
            REQUIRE(out.Get(i) == want);
          }
        }
      }
    }
  }
}

// Small AllReduces are gathered and reduced locally in rank order, larger ones
// run MPI_Iallreduce (mpi_communicator.cc): on both sides of the threshold
// every rank holds the same bits, and the sum is right to float rounding.
TEST_CASE("AllReduce of inexact floats: every rank the same bits, small and large") {
  auto world = World();
  const int n = world->size();
  for (size_t count : {size_t{5}, size_t{3000}, size_t{20000}}) {
    std::vector<float> x(count);
    for (size_t i = 0; i < count; ++i) x[i] = 0.1f * static_cast<float>(world->rank() + 1) / (i % 7 + 3);
    Done(world->AllReduce(x.data(), x.data(), count, DType::kF32, ReduceOp::kSum));
    std::vector<float> all(count * n);
    Done(world->AllGather(x.data(), all.data(), count, DType::kF32));
    for (size_t i = 0; i < count; ++i) {
      const double want = 0.1 * n * (n + 1) / 2.0 / (i % 7 + 3);
      INFO("count " << count << " i " << i);
      REQUIRE(std::fabs(x[i] - want) <= 1e-6 * std::fabs(want));
      for (int r = 1; r < n; ++r) REQUIRE(std::memcmp(&all[i], &all[r * count + i], 4) == 0);
    }
  }
}

TEST_CASE("Broadcast from every root, in and out of place") {
  auto world = World();
  const size_t count = 1000;
  for (int root = 0; root < world->size(); ++root) {
    for (bool in_place : {false, true}) {
      std::vector<int64_t> send(count, -1), recv(count, -2);
      if (world->rank() == root) {
        for (size_t i = 0; i < count; ++i) send[i] = root * 100000 + i;
      }
      int64_t* out = in_place ? send.data() : recv.data();
      Done(world->Broadcast(send.data(), out, count, DType::kI64, root));
      for (size_t i = 0; i < count; ++i) REQUIRE(out[i] == static_cast<int64_t>(root * 100000 + i));
    }
  }
}

TEST_CASE("AllGather and AllGatherV, in and out of place, with zero counts") {
  auto world = World();
  const int n = world->size(), me = world->rank();
  for (bool in_place : {false, true}) {
    const size_t count = 5;
    std::vector<float> send(count), recv(count * n, -1);
    for (size_t i = 0; i < count; ++i) send[i] = me * 10 + i;
    const float* src = send.data();
    if (in_place) {
      std::copy(send.begin(), send.end(), recv.begin() + me * count);
      src = recv.data() + me * count;
    }
    Done(world->AllGather(src, recv.data(), count, DType::kF32));
    for (int r = 0; r < n; ++r) {
      for (size_t i = 0; i < count; ++i) REQUIRE(recv[r * count + i] == r * 10 + i);
    }
  }
  // Rank r contributes (r * 3) % 4 elements (rank 0 none); regions in reverse
  // rank order with gaps, so displacements matter.
  std::vector<size_t> counts(n), displs(n);
  size_t total = 0;
  for (int r = n - 1; r >= 0; --r) {
    counts[r] = (r * 3) % 4;
    displs[r] = total + 1;
    total += counts[r] + 1;
  }
  for (bool in_place : {false, true}) {
    std::vector<int32_t> recv(total, -7), send(counts[me]);
    for (size_t i = 0; i < counts[me]; ++i) send[i] = me * 1000 + i;
    const int32_t* src = send.data();
    if (in_place) {
      std::copy(send.begin(), send.end(), recv.begin() + displs[me]);
      src = recv.data() + displs[me];
    }
    Done(world->AllGatherV(src, counts[me], recv.data(), counts, displs, DType::kI32));
    std::vector<int32_t> want(total, -7);
    for (int r = 0; r < n; ++r) {
      for (size_t i = 0; i < counts[r]; ++i) want[displs[r] + i] = r * 1000 + i;
    }
    REQUIRE(recv == want);
  }
}

TEST_CASE("ReduceScatter of every op, in and out of place") {
  auto world = World();
  const int n = world->size(), me = world->rank();
  const size_t count = 9;
  for (DType t : {DType::kF32, DType::kI64}) {
    for (ReduceOp op : kOps) {
      for (bool in_place : {false, true}) {
        Buffer send(t, count * n), recv(t, count);
        for (size_t i = 0; i < count * n; ++i) send.Set(i, Contribution(me, i));
        void* out = in_place ? send.bytes.data() + me * count * DTypeSize(t) : recv.data();
        Done(world->ReduceScatter(send.data(), out, count, t, op));
        const Buffer& got = in_place ? send : recv;
        const size_t base = in_place ? me * count : 0;
        for (size_t i = 0; i < count; ++i) {
          INFO(DTypeName(t) << " " << ReduceOpName(op) << " in_place " << in_place);
          REQUIRE(got.Get(base + i) == Expected(op, t, n, me * count + i));
        }
        if (in_place) {  // the other blocks are left as they were
          for (size_t i = 0; i < count * n; ++i) {
            if (i / count != static_cast<size_t>(me)) REQUIRE(send.Get(i) == Contribution(me, i));
          }
        }
      }
    }
  }
}

TEST_CASE("AllToAll") {
  auto world = World();
  const int n = world->size(), me = world->rank();
  const size_t count = 6;
  std::vector<int64_t> send(count * n), recv(count * n, -1);
  for (int d = 0; d < n; ++d) {
    for (size_t i = 0; i < count; ++i) send[d * count + i] = me * 10000 + d * 100 + i;
  }
  Done(world->AllToAll(send.data(), recv.data(), count, DType::kI64));
  for (int s = 0; s < n; ++s) {
    for (size_t i = 0; i < count; ++i) REQUIRE(recv[s * count + i] == s * 10000 + me * 100 + i);
  }
}

// counts[s][d]: elements rank s sends to rank d; every rank knows the matrix.
void CheckAllToAllV(Communicator& comm, const std::vector<std::vector<size_t>>& counts) {
  const int n = comm.size(), me = comm.rank();
  std::vector<size_t> send_counts(n), send_displs(n), recv_counts(n), recv_displs(n);
  size_t send_total = 0, recv_total = 0;
  for (int d = 0; d < n; ++d) {  // send blocks in reverse order: displacements matter
    int dd = n - 1 - d;
    send_counts[dd] = counts[me][dd];
    send_displs[dd] = send_total;
    send_total += send_counts[dd];
  }
  for (int s = 0; s < n; ++s) {
    recv_counts[s] = counts[s][me];
    recv_displs[s] = recv_total + 2;  // with gaps
    recv_total += recv_counts[s] + 2;
  }
  std::vector<uint32_t> send(send_total), recv(recv_total, 0xdeadbeef);
  for (int d = 0; d < n; ++d) {
    for (size_t i = 0; i < send_counts[d]; ++i)
      send[send_displs[d] + i] = (me << 28) | (d << 24) | (i & 0xffffff);
  }
  Done(comm.AllToAllV(send.data(), send_counts, send_displs, recv.data(), recv_counts, recv_displs,
                      DType::kI32));
  std::vector<uint32_t> want(recv_total, 0xdeadbeef);
  for (int s = 0; s < n; ++s) {
    for (size_t i = 0; i < recv_counts[s]; ++i)
      want[recv_displs[s] + i] = (s << 28) | (me << 24) | (i & 0xffffff);
  }
  REQUIRE(recv == want);
}

TEST_CASE("AllToAllV with random, zero and very uneven counts") {
  auto world = World();
  const int n = world->size();
  std::mt19937 rng(1234);  // the same on every rank
  for (int trial = 0; trial < 20; ++trial) {
    std::vector<std::vector<size_t>> counts(n, std::vector<size_t>(n));
    for (auto& row : counts) {
      for (auto& c : row) c = rng() % 3 == 0 ? 0 : rng() % 200;
    }
    CheckAllToAllV(*world, counts);
  }
  std::vector<std::vector<size_t>> zero(n, std::vector<size_t>(n, 0));
  CheckAllToAllV(*world, zero);
  // Everyone sends a lot to rank 0 and one element elsewhere; rank 0 sends nothing.
  std::vector<std::vector<size_t>> uneven(n, std::vector<size_t>(n, 1));
  for (int s = 0; s < n; ++s) uneven[s][0] = 300000 + s;
  for (int d = 0; d < n; ++d) uneven[0][d] = 0;
  CheckAllToAllV(*world, uneven);
}

TEST_CASE("Send/Recv ring and grouped P2P exchange including self") {
  auto world = World();
  const int n = world->size(), me = world->rank();
  if (n >= 2) {
    std::vector<double> out(100), in(100, -1);
    for (size_t i = 0; i < out.size(); ++i) out[i] = me + i * 0.5;
    const int next = (me + 1) % n, prev = (me - 1 + n) % n;
    // Even ranks send first, odd ranks receive first: ordered lone operations.
    if (me % 2 == 0) {
      Done(world->Send(out.data(), out.size(), DType::kF64, next));
      if (!(n % 2 == 1 && me == 0)) Done(world->Recv(in.data(), in.size(), DType::kF64, prev));
    } else {
      Done(world->Recv(in.data(), in.size(), DType::kF64, prev));
      Done(world->Send(out.data(), out.size(), DType::kF64, next));
    }
    if (n % 2 == 1 && me == 0) Done(world->Recv(in.data(), in.size(), DType::kF64, prev));
    for (size_t i = 0; i < in.size(); ++i) REQUIRE(in[i] == prev + i * 0.5);
  }
  // Everyone exchanges with everyone (and itself) in one group.
  std::vector<std::vector<int32_t>> out(n), in(n);
  std::vector<P2POp> ops;
  for (int p = 0; p < n; ++p) {
    out[p].assign(10 + p, me * 100 + p);
    in[p].assign(10 + me, -1);
    ops.push_back(P2POp::Recv(in[p].data(), in[p].size(), DType::kI32, p));
    ops.push_back(P2POp::Send(out[p].data(), out[p].size(), DType::kI32, p));
  }
  Done(world->GroupP2P(ops));
  for (int p = 0; p < n; ++p) REQUIRE(in[p] == std::vector<int32_t>(10 + me, p * 100 + me));
  Done(world->GroupP2P({}));  // an empty group is a no-op
}

TEST_CASE("Split into docs/design.md's groups (via parallel::ComputeLayout)") {
  auto world = World();
  const int n = world->size(), me = world->rank();
  for (int tp = 1; tp <= n; ++tp) {
    if (n % tp) continue;
    for (int ep = 1; ep <= n / tp; ++ep) {
      if ((n / tp) % ep) continue;
      auto layout = parallel::ComputeLayout(n, tp, ep, me);
      REQUIRE(layout.ok());
      struct G {
        int color, rank;
        std::vector<int> members;
      };
      const G groups[] = {{layout->tp_group_id, layout->tp_rank, layout->tp_group},
                          {layout->dp_group_id, layout->dp_rank, layout->dp_group},
                          {layout->ep_group_id, layout->ep_rank, layout->ep_group},
                          {layout->edp_group_id, layout->edp_rank, layout->edp_group}};
      for (const G& g : groups) {
        auto sub = world->Split(g.color, g.rank, "g");
        REQUIRE(sub.ok());
        REQUIRE(*sub != nullptr);
        Communicator& c = **sub;
        INFO("tp " << tp << " ep " << ep);
        REQUIRE(c.rank() == g.rank);
        REQUIRE(c.size() == static_cast<int>(g.members.size()));
        REQUIRE(c.group_ranks() == g.members);
        int64_t mine = me + 1, sum = 0;
        Done(c.AllReduce(&mine, &sum, 1, DType::kI64, ReduceOp::kSum));
        int64_t want = 0;
        for (int m : g.members) want += m + 1;
        REQUIRE(sum == want);
      }
    }
  }
  // Ranks with kNoColor get no communicator; the others get one.
  auto odd = world->Split(me % 2 ? 1 : kNoColor, 0, "odd");
  REQUIRE(odd.ok());
  REQUIRE((*odd != nullptr) == (me % 2 == 1));
  if (*odd) {
    REQUIRE((*odd)->name() == "odd");
    Done((*odd)->Barrier());
  }
}

// Records sequence numbers in the order operations finish.
struct OrderSink : CommSink {
  std::mutex mu;
  std::vector<uint64_t> sequences;
  void Record(const CommRecord& r) override {
    std::lock_guard<std::mutex> lock(mu);
    sequences.push_back(r.sequence);
  }
};

TEST_CASE("1000 queued async operations complete in enqueue order") {
  auto sink = std::make_shared<OrderSink>();
  auto world = World(sink);
  const int n = world->size(), me = world->rank();
  constexpr int kOps = 1000;
  // Operation k is an AllToAll from slot k into slot k+1: each reads what the
  // previous one wrote, so running out of order would spread the -1 sentinel.
  std::vector<std::vector<int32_t>> slots(kOps + 1, std::vector<int32_t>(n, -1));
  for (int d = 0; d < n; ++d) slots[0][d] = 1000 * me + d;
  std::vector<Work> works;
  for (int k = 0; k < kOps; ++k) {
    auto w = world->AllToAll(slots[k].data(), slots[k + 1].data(), 1, DType::kI32);
    REQUIRE(w.ok());
    works.push_back(*w);
  }
  // A later operation done implies every earlier one: wait for a few (so the
  // check always runs) and poll all before each.
  for (int j : {kOps / 3, kOps / 2, kOps - 1}) {
    REQUIRE(works[j].Wait().ok());
    for (int i = 0; i < j; ++i) REQUIRE(works[i].Test());
  }
  REQUIRE(world->Synchronize().ok());
  for (int k = 0; k < kOps; ++k) REQUIRE(works[k].Test());
  for (int k = 0; k <= kOps; ++k) {
    for (int d = 0; d < n; ++d) {
      int want = k % 2 == 0 ? 1000 * me + d : 1000 * d + me;
      REQUIRE(slots[k][d] == want);
    }
  }
  std::lock_guard<std::mutex> lock(sink->mu);
  REQUIRE(sink->sequences.size() == kOps);
  for (int k = 0; k < kOps; ++k) REQUIRE(sink->sequences[k] == static_cast<uint64_t>(k));
}

TEST_CASE("two communicators interleaved in different orders on different ranks") {
  auto world = World();
  auto dup = world->Split(0, world->rank(), "dup");
  REQUIRE(dup.ok());
  const int me = world->rank(), n = world->size();
  constexpr int kRounds = 50;
  std::vector<int64_t> xa(kRounds), xb(kRounds), ya(kRounds), yb(kRounds);
  std::vector<Work> works;
  for (int k = 0; k < kRounds; ++k) {
    xa[k] = me + k;
    xb[k] = 2 * me + k;
    for (int which : {me % 2, 1 - me % 2}) {  // odd ranks enqueue on the other one first
      auto w = which == 0 ? world->AllReduce(&xa[k], &ya[k], 1, DType::kI64, ReduceOp::kSum)
                          : (*dup)->AllReduce(&xb[k], &yb[k], 1, DType::kI64, ReduceOp::kSum);
      REQUIRE(w.ok());
      works.push_back(*w);
    }
  }
  for (const Work& w : works) REQUIRE(w.Wait().ok());
  const int64_t ranks = n * (n - 1) / 2;
  for (int k = 0; k < kRounds; ++k) {
    REQUIRE(ya[k] == ranks + n * k);
    REQUIRE(yb[k] == 2 * ranks + n * k);
  }
}

TEST_CASE("large messages: 64 MiB AllReduce and AllToAll") {
  auto world = World();
  const int n = world->size(), me = world->rank();
  const size_t count = (64u << 20) / sizeof(float);
  std::vector<float> x(count);
  for (size_t i = 0; i < count; ++i) x[i] = static_cast<float>((i + me) % 1024);
  Done(world->AllReduce(x.data(), x.data(), count, DType::kF32, ReduceOp::kSum));
  for (size_t i = 0; i < count; i += 4099) {
    float want = 0;
    for (int r = 0; r < n; ++r) want += (i + r) % 1024;
    REQUIRE(x[i] == want);
  }
  const size_t per_peer = (64u << 20) / n / sizeof(int32_t);
  std::vector<int32_t> send(per_peer * n), recv(per_peer * n);
  for (int d = 0; d < n; ++d) {
    for (size_t i = 0; i < per_peer; ++i)
      send[d * per_peer + i] = static_cast<int32_t>((me * 131 + d * 7 + i) & 0x7fffffff);
  }
  Done(world->AllToAll(send.data(), recv.data(), per_peer, DType::kI32));
  for (int s = 0; s < n; ++s) {
    for (size_t i = 0; i < per_peer; i += 1031) {
      REQUIRE(recv[s * per_peer + i] == static_cast<int32_t>((s * 131 + me * 7 + i) & 0x7fffffff));
    }
  }
}

TEST_CASE("a transfer progresses while the caller does not call into the communicator") {
  auto world = World();
  const int me = world->rank(), n = world->size();
  if (n < 2 || me > 1) {
    Done(world->Barrier());
    return;
  }
  std::vector<char> buf(16 << 20, static_cast<char>(me + 1));
  auto w = me == 0 ? world->Send(buf.data(), buf.size(), DType::kU8, 1)
                   : world->Recv(buf.data(), buf.size(), DType::kU8, 0);
  REQUIRE(w.ok());
  // Only Test(), which reads a flag: the progress thread moves the data. A
  // stall would trip the watchdog (60 s) and fail the job.
  uint64_t spins = 0;
  while (!w->Test()) spins = spins + 1;
  INFO("polled " << spins << " times");
  REQUIRE(w->Wait().ok());
  if (me == 1) REQUIRE(std::all_of(buf.begin(), buf.end(), [](char c) { return c == 1; }));
  Done(world->Barrier());
}

TEST_CASE("counts above the per-call limit are split (limit lowered to 7)") {
  auto world = World();
  const int n = world->size(), me = world->rank();
  SetMpiCountLimitForTesting(7);
  {
    std::vector<int32_t> x(100);
    for (size_t i = 0; i < x.size(); ++i) x[i] = me + i;
    Done(world->AllReduce(x.data(), x.data(), x.size(), DType::kI32, ReduceOp::kSum));
    for (size_t i = 0; i < x.size(); ++i) REQUIRE(x[i] == n * (n - 1) / 2 + n * static_cast<int>(i));

    std::vector<int32_t> b(50, me == 1 % n ? 5 : 0);
    Done(world->Broadcast(b.data(), b.data(), b.size(), DType::kI32, 1 % n));
    REQUIRE(b == std::vector<int32_t>(50, 5));

    const size_t count = 10;  // count * size > 7: the point-to-point path
    std::vector<int32_t> mine(count, me), all(count * n, -1);
    Done(world->AllGather(mine.data(), all.data(), count, DType::kI32));
    for (int r = 0; r < n; ++r)
      REQUIRE(std::count(all.begin() + r * count, all.begin() + (r + 1) * count, r) == count);

    for (size_t rs_count :
         {size_t{3}, size_t{10}}) {  // native when count * size <= 7, else one Ireduce per block
      std::vector<int64_t> s(rs_count * n), r(rs_count);
      for (size_t i = 0; i < s.size(); ++i) s[i] = me * 1000 + i;
      Done(world->ReduceScatter(s.data(), r.data(), rs_count, DType::kI64, ReduceOp::kMax));
      for (size_t i = 0; i < rs_count; ++i) REQUIRE(r[i] == (n - 1) * 1000 + me * rs_count + i);
    }

    std::mt19937 rng(99);
    std::vector<std::vector<size_t>> counts(n, std::vector<size_t>(n));
    for (auto& row : counts) {
      for (auto& c : row) c = rng() % 40;
    }
    CheckAllToAllV(*world, counts);

    std::vector<P2POp> ops;
    std::vector<std::vector<int16_t>> out(n), in(n);
    for (int p = 0; p < n; ++p) {
      out[p].assign(23, static_cast<int16_t>(me * 10 + p));
      in[p].assign(23, -1);
      ops.push_back(P2POp::Send(out[p].data(), 23, DType::kBF16, p));
      ops.push_back(P2POp::Recv(in[p].data(), 23, DType::kBF16, p));
    }
    Done(world->GroupP2P(ops));
    for (int p = 0; p < n; ++p) REQUIRE(in[p] == std::vector<int16_t>(23, static_cast<int16_t>(p * 10 + me)));
  }
  SetMpiCountLimitForTesting(0);
  REQUIRE(MpiCountLimit() == 2147483647u);
}

TEST_CASE("instrumentation: totals per kind with bytes and times") {
  auto sink = std::make_shared<TotalsSink>();
  auto world = World(sink);
  const int n = world->size();
  std::vector<float> x(256, 1.0f);
  Done(world->AllReduce(x.data(), x.data(), x.size(), DType::kF32, ReduceOp::kSum));
  Done(world->AllReduce(x.data(), x.data(), x.size(), DType::kF32, ReduceOp::kSum));
  std::vector<float> send(16 * n), recv(16 * n);
  Done(world->AllToAll(send.data(), recv.data(), 16, DType::kF32));
  auto totals = sink->Snapshot();
  REQUIRE(totals[OpKind::kAllReduce].count == 2);
  REQUIRE(totals[OpKind::kAllReduce].bytes_sent == 2 * 256 * 4);
  REQUIRE(totals[OpKind::kAllToAll].count == 1);
  REQUIRE(totals[OpKind::kAllToAll].bytes_received == 16 * 4 * (n - 1));
  // Measured, not left at zero (the wall-clock of a real all-to-all is > 0).
  REQUIRE(totals[OpKind::kAllToAll].seconds > 0);
  REQUIRE(totals[OpKind::kAllReduce].seconds > 0);
  REQUIRE(sink->Format().find("AllToAll") != std::string::npos);
}

}  // namespace
}  // namespace moe::comm
