// The EP token exchange under mpirun: rows arrive grouped by expert, combine
// returns every row to its place (values), Combine is the adjoint of Dispatch
// (gradients), with zero-token experts, skewed counts, rows sent to ranks that
// do not own the expert (LLEP plans), empty chunks and pipelined chunks.
#include "parallel/token_exchange.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "comm/mpi_env.h"
#include "parallel/process_groups.h"
#include "runtime/core/backend.h"
#include "tests/parallel/parallel_test_util.h"

namespace moe::parallel {
namespace {

using testing::Cpu;
using testing::HostTensor;
using testing::ToVector;
using testing::ValueOrDie;

constexpr int64_t kExperts = 6;
constexpr int64_t kHidden = 5;

// Rows that EP rank `src` sends in chunk c to rank dst for expert e: expert 0
// is hot, expert 1 never gets a row (zero-token expert), rank 1 sends nothing
// in chunk 1 (an empty chunk for that sender). Any dst may get any expert.
int64_t Count(int src, int c, int dst, int64_t e) {
  if (e == 1) return 0;
  if (src == 1 && c == 1) return 0;
  const uint32_t h = static_cast<uint32_t>((src * 131 + c * 31 + dst * 17 + e * 7) * 2654435761u) >> 24;
  return e == 0 ? 20 + h % 5 : h % 4;
}

std::vector<int64_t> SendTable(int src, int P, int C) {
  std::vector<int64_t> t;
  for (int c = 0; c < C; ++c)
    for (int d = 0; d < P; ++d)
      for (int64_t e = 0; e < kExperts; ++e) t.push_back(Count(src, c, d, e));
  return t;
}

// Row id of row i of chunk c of sender s (exact in f32).
float RowValue(int s, int c, int64_t i, int64_t j) {
  return static_cast<float>(s * 10000 + c * 1000 + i) + 0.25f * j;
}

// First row of block (dst, e) in sender s's chunk c.
int64_t BlockStart(int s, int c, int dst, int64_t e, int P) {
  int64_t pos = 0;
  for (int d = 0; d < P; ++d)
    for (int64_t x = 0; x < kExperts; ++x) {
      if (d == dst && x == e) return pos;
      pos += Count(s, c, d, x);
    }
  return pos;
}

// Runs dispatch -> f(x) = 2 x + e -> combine over `ep` for C chunks, with the
// exchange of chunk c + 1 started before chunk c is finished.
void CheckRoundTrip(comm::Communicator& ep, int C) {
  Stream& stream = Cpu().default_stream();
  const int P = ep.size(), me = ep.rank();
  // Host waits: the plan's count read is the only one (token_exchange.h);
  // the row transfers and their reorders add none, for any number of chunks.
  const uint64_t syncs_before_plan = HostSyncCount();
  ExchangePlan plan = ValueOrDie(ExchangePlan::Create(ep, stream, C, kExperts, SendTable(me, P, C)));
  REQUIRE(HostSyncCount() - syncs_before_plan == (P > 1 ? 1u : 0u));
  uint64_t exchange_syncs = 0;
  auto counted = [&](auto call) {
    const uint64_t before = HostSyncCount();
    auto result = call();
    exchange_syncs += HostSyncCount() - before;
    return result;
  };
  for (int c = 0; c < C; ++c)
    for (int p = 0; p < P; ++p)
      for (int64_t e = 0; e < kExperts; ++e) {
        REQUIRE(plan.send(c, p, e) == Count(me, c, p, e));
        REQUIRE(plan.recv(c, p, e) == Count(p, c, me, e));
      }

  std::vector<Tensor> send(C);
  std::vector<std::vector<int64_t>> expert_of_row(C);
  for (int c = 0; c < C; ++c) {
    const int64_t n = plan.num_send_rows(c);
    std::vector<float> v(n * kHidden);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < kHidden; ++j) v[i * kHidden + j] = RowValue(me, c, i, j);
    for (int d = 0; d < P; ++d)
      for (int64_t e = 0; e < kExperts; ++e)
        for (int64_t k = 0; k < Count(me, c, d, e); ++k) expert_of_row[c].push_back(e);
    send[c] = HostTensor(v, Shape{n, kHidden});
  }

  // Pipelined dispatch: chunk c + 1 is on the wire while chunk c is "computed".
  std::vector<InFlight> back(C);
  InFlight next = ValueOrDie(counted([&] { return StartDispatch(ep, stream, plan, 0, send[0]); }));
  for (int c = 0; c < C; ++c) {
    InFlight cur = std::move(next);
    if (c + 1 < C)
      next = ValueOrDie(counted([&] { return StartDispatch(ep, stream, plan, c + 1, send[c + 1]); }));
    Tensor grouped = ValueOrDie(counted([&] { return FinishDispatch(stream, plan, cur); }));
    REQUIRE(grouped.size(0) == plan.num_recv_rows(c));
    const std::vector<int64_t> offsets = plan.ExpertOffsets(c);
    std::vector<float> g = ToVector(grouped);
    // Expert e's rows: from each source in rank order, in the source's order.
    for (int64_t e = 0; e < kExperts; ++e) {
      int64_t row = offsets[e];
      for (int s = 0; s < P; ++s) {
        const int64_t start = BlockStart(s, c, me, e, P);
        for (int64_t k = 0; k < Count(s, c, me, e); ++k, ++row)
          for (int64_t j = 0; j < kHidden; ++j) {
            INFO("chunk " << c << " expert " << e << " source " << s << " row " << k);
            REQUIRE(g[row * kHidden + j] == RowValue(s, c, start + k, j));
          }
      }
      REQUIRE(row == offsets[e + 1]);
    }
    REQUIRE(offsets[2] - offsets[1] == 0);  // the zero-token expert
    for (int64_t e = 0; e < kExperts; ++e)
      for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r)
        for (int64_t j = 0; j < kHidden; ++j) g[r * kHidden + j] = 2 * g[r * kHidden + j] + e;
    const Tensor expert_out = HostTensor(g, Shape{grouped.size(0), kHidden});
    back[c] = ValueOrDie(counted([&] { return StartCombine(ep, stream, plan, c, expert_out); }));
  }
  for (int c = 0; c < C; ++c) {
    Tensor out = ValueOrDie(counted([&] { return FinishCombine(stream, plan, back[c]); }));
    REQUIRE(out.size(0) == plan.num_send_rows(c));
    std::vector<float> o = ToVector(out);
    for (int64_t i = 0; i < out.size(0); ++i)
      for (int64_t j = 0; j < kHidden; ++j) {
        INFO("chunk " << c << " row " << i);
        REQUIRE(o[i * kHidden + j] == 2 * RowValue(me, c, i, j) + expert_of_row[c][i]);
      }
  }
  REQUIRE(exchange_syncs == 0);
}

// sum over ranks <Dispatch(x), g> == sum over ranks <x, Combine(g)>: Combine
// is Dispatch's transpose, i.e. the backward of each is the other.
void CheckAdjoint(comm::Communicator& ep, comm::Communicator& world, int C) {
  Stream& stream = Cpu().default_stream();
  const int P = ep.size(), me = ep.rank();
  ExchangePlan plan = ValueOrDie(ExchangePlan::Create(ep, stream, C, kExperts, SendTable(me, P, C)));
  std::mt19937 rng(1234 + world.rank());
  std::normal_distribution<float> normal;
  double dots[2] = {0, 0};
  for (int c = 0; c < C; ++c) {
    std::vector<float> x(plan.num_send_rows(c) * kHidden), g(plan.num_recv_rows(c) * kHidden);
    for (float& v : x) v = normal(rng);
    for (float& v : g) v = normal(rng);
    std::vector<float> dx = ToVector(
        ValueOrDie(Dispatch(ep, stream, plan, c, HostTensor(x, Shape{plan.num_send_rows(c), kHidden}))));
    std::vector<float> cg = ToVector(
        ValueOrDie(Combine(ep, stream, plan, c, HostTensor(g, Shape{plan.num_recv_rows(c), kHidden}))));
    for (size_t i = 0; i < g.size(); ++i) dots[0] += static_cast<double>(dx[i]) * g[i];
    for (size_t i = 0; i < x.size(); ++i) dots[1] += static_cast<double>(x[i]) * cg[i];
  }
  comm::Work w = ValueOrDie(world.AllReduce(dots, dots, 2, DType::kF64, comm::ReduceOp::kSum));
  REQUIRE(w.Wait().ok());
  REQUIRE(dots[0] == Approx(dots[1]).epsilon(1e-9));
  REQUIRE(std::abs(dots[0]) > 0);
}

TEST_CASE("dispatch groups rows by expert and combine returns them (EP = world)", "[token_exchange]") {
  ProcessGroups groups = testing::Groups(1, comm::MpiEnv::world_size());
  for (int C : {1, 3}) {
    INFO("chunks " << C);
    CheckRoundTrip(*groups.ep, C);
  }
}

TEST_CASE("combine is the adjoint of dispatch (their backwards)", "[token_exchange]") {
  ProcessGroups groups = testing::Groups(1, comm::MpiEnv::world_size());
  for (int C : {1, 2}) CheckAdjoint(*groups.ep, *groups.world, C);
}

TEST_CASE("exchange within EP subgroups (tp 2, ep 2)", "[token_exchange]") {
  if (comm::MpiEnv::world_size() != 4) return;
  ProcessGroups groups = testing::Groups(2, 2);
  REQUIRE(groups.ep->size() == 2);
  CheckRoundTrip(*groups.ep, 2);
  CheckAdjoint(*groups.ep, *groups.world, 1);
}

TEST_CASE("exchange rejects bad arguments", "[token_exchange]") {
  ProcessGroups groups = testing::Groups(1, comm::MpiEnv::world_size());
  Stream& stream = Cpu().default_stream();
  const int P = groups.ep->size();
  REQUIRE_FALSE(ExchangePlan::Create(*groups.ep, stream, 1, kExperts, std::vector<int64_t>(3, 0)).ok());
  REQUIRE_FALSE(ExchangePlan::FromCounts(P, 1, kExperts, std::vector<int64_t>(P * kExperts, -1),
                                         std::vector<int64_t>(P * kExperts, 0))
                    .ok());
  ExchangePlan plan =
      ValueOrDie(ExchangePlan::Create(*groups.ep, stream, 1, kExperts, SendTable(groups.ep->rank(), P, 1)));
  // One row too many: rejected before anything is sent (no rank enters the collective).
  Tensor wrong = HostTensor(std::vector<float>((plan.num_send_rows(0) + 1) * kHidden, 0.f),
                            Shape{plan.num_send_rows(0) + 1, kHidden});
  auto f = StartDispatch(*groups.ep, stream, plan, 0, wrong);
  REQUIRE_FALSE(f.ok());
  REQUIRE(f.status().message().find("rows") != absl::string_view::npos);
  REQUIRE_FALSE(StartDispatch(*groups.ep, stream, plan, 5, wrong).ok());
  InFlight none;
  REQUIRE_FALSE(FinishCombine(stream, plan, none).ok());
}

}  // namespace
}  // namespace moe::parallel
