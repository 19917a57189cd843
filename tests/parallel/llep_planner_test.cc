#include "parallel/llep_planner.h"

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <numeric>
#include <random>

namespace moe::parallel {
namespace {

using Table = std::vector<std::vector<int64_t>>;

// Every (token, expert) pair is computed exactly once, the native rank takes
// the first range, and the loads add up.
void CheckPlanCovers(const LlepPlan& plan, const Table& counts, double capacity_factor = 1.0) {
  const int P = counts.size(), E = counts[0].size();
  int64_t total = 0;
  for (auto& row : counts) total += std::accumulate(row.begin(), row.end(), int64_t{0});
  const int64_t cap = static_cast<int64_t>(std::ceil(capacity_factor * total / P));
  std::vector<int64_t> load_after(P, 0);
  for (int e = 0; e < E; ++e) {
    int64_t load = 0;
    for (int r = 0; r < P; ++r) load += counts[r][e];
    int64_t next = 0;
    for (size_t i = 0; i < plan.ranges[e].size(); ++i) {
      const LlepRange& range = plan.ranges[e][i];
      CAPTURE(e, i, range.rank, range.begin, range.end);
      CHECK(range.begin == next);  // contiguous, no gap or overlap
      CHECK(range.end > range.begin);
      // The native rank keeps the first range, unless it was already full.
      if (i == 0 && range.rank != plan.native_rank(e)) CHECK(plan.load_after[plan.native_rank(e)] >= cap);
      load_after[range.rank] += range.end - range.begin;
      next = range.end;
    }
    CHECK(next == load);
  }
  CHECK(load_after == plan.load_after);
  // Each source rank's split of its tokens adds up to its counts.
  for (int r = 0; r < P; ++r) {
    auto splits = SourceSplits(plan, counts, r);
    for (int e = 0; e < E; ++e) {
      int64_t sum = 0;
      for (auto& [dst, n] : splits[e]) sum += n;
      CHECK(sum == counts[r][e]);
    }
  }
  // A weight move for every (expert, helper) pair that computes tokens.
  for (int e = 0; e < E; ++e) {
    for (const LlepRange& range : plan.ranges[e]) {
      if (range.rank == plan.native_rank(e)) continue;
      bool found = std::any_of(plan.weight_moves.begin(), plan.weight_moves.end(),
                               [&](const LlepWeightMove& m) { return m.expert == e && m.dst == range.rank; });
      CHECK(found);
    }
  }
}

TEST_CASE("all tokens into one expert spill to the helper") {
  Table counts = {{1000, 0, 0, 0}, {1000, 0, 0, 0}};  // expert 0 is native to rank 0
  LlepOptions o;
  LlepPlan plan = PlanLlep(counts, o).value();
  REQUIRE(plan.active);
  CheckPlanCovers(plan, counts);
  REQUIRE(plan.ranges[0].size() == 2);
  CHECK(plan.ranges[0][0].rank == 0);
  CHECK(plan.ranges[0][0].end == 1000);
  CHECK(plan.ranges[0][1].rank == 1);
  CHECK(plan.load_after == std::vector<int64_t>{1000, 1000});
  CHECK(plan.weight_moves.size() == 1);
  CHECK(plan.weight_moves[0].src == 0);
  CHECK(plan.weight_moves[0].dst == 1);
  CHECK(plan.tokens_moved == 1000);
  CHECK(plan.imbalance_before == Approx(2.0));
  CHECK(plan.imbalance_after == Approx(1.0));
  // Rank 1's tokens (global positions 1000..1999) stay on rank 1.
  auto splits1 = SourceSplits(plan, counts, 1);
  REQUIRE(splits1[0].size() == 1);
  CHECK(splits1[0][0] == std::pair<int, int64_t>{1, 1000});
}

TEST_CASE("balanced loads keep standard EP") {
  Table counts = {{100, 100, 100, 100}, {100, 100, 100, 100}};
  LlepPlan plan = PlanLlep(counts, LlepOptions{}).value();
  CHECK_FALSE(plan.active);
  CHECK(plan.weight_moves.empty());
  CheckPlanCovers(plan, counts);
  CHECK(plan.reason.find("below trigger_ratio") != std::string::npos);
}

TEST_CASE("hand-made 4-rank table: caps respected, native keeps the first range") {
  // 8 experts, 2 per rank. Rank 0 holds experts 0,1 with 6000 tokens; others light.
  Table counts = {{2000, 1000, 100, 100, 100, 100, 100, 100},
                  {2000, 1000, 100, 100, 100, 100, 100, 100},
                  {0, 0, 100, 100, 100, 100, 100, 100},
                  {0, 0, 100, 100, 100, 100, 100, 100}};
  LlepOptions o;
  o.min_tokens_per_gemm = 256;
  LlepPlan plan = PlanLlep(counts, o).value();
  REQUIRE(plan.active);
  CheckPlanCovers(plan, counts);
  int64_t sum = std::accumulate(plan.load_after.begin(), plan.load_after.end(), int64_t{0});
  CHECK(sum == 8400);
  const int64_t cap = 2100;  // ceil(1.0 * 8400 / 4)
  for (int64_t l : plan.load_after) CHECK(l <= cap);
  CHECK(plan.ranges[0][0].rank == 0);
  CHECK(plan.ranges[0][0].end - plan.ranges[0][0].begin == cap);
}

TEST_CASE("min_tokens_per_gemm avoids small ranges while more remains") {
  Table counts = {{3000, 0, 0, 0, 0, 0, 0, 0},
                  {0, 0, 0, 0, 0, 0, 0, 0},
                  {0, 0, 0, 0, 0, 0, 0, 0},
                  {0, 0, 0, 0, 0, 0, 0, 0}};
  LlepOptions o;
  o.min_tokens_per_gemm = 1024;
  LlepPlan plan = PlanLlep(counts, o).value();
  CheckPlanCovers(plan, counts);
  // cap 750: native 750, the 2250 left cannot be cut in ranges >= 1024 under
  // the caps of 750, so the last one takes the rest rather than three small ones.
  // Exactly: the native 750 on rank 0 and one helper range of the 2250 left
  // (three ranges of 750 would each be under 1024).
  REQUIRE(plan.ranges[0].size() == 2);
  CHECK(plan.ranges[0][0].rank == 0);
  CHECK(plan.ranges[0][0].end - plan.ranges[0][0].begin == 750);
  CHECK(plan.ranges[0][1].rank != 0);
  CHECK(plan.ranges[0][1].end - plan.ranges[0][1].begin == 2250);
  int64_t max_after = *std::max_element(plan.load_after.begin(), plan.load_after.end());
  CHECK(max_after < 3000);
}

TEST_CASE("max_borrowed_experts bounds the foreign experts per helper") {
  Table counts = {{900, 900, 900, 900, 0, 0, 0, 0}, {0, 0, 0, 0, 0, 0, 0, 0}};
  LlepOptions o;
  o.min_tokens_per_gemm = 1;
  o.max_borrowed_experts = 1;
  LlepPlan plan = PlanLlep(counts, o).value();
  CheckPlanCovers(plan, counts);
  std::vector<int> borrowed(2, 0);
  for (auto& m : plan.weight_moves) borrowed[m.dst]++;
  CHECK(borrowed[1] <= 1);
  o.max_borrowed_experts = 0;
  LlepPlan unlimited = PlanLlep(counts, o).value();
  CHECK(unlimited.weight_moves.size() > plan.weight_moves.size());
}

TEST_CASE("the cost model refuses moves that cost more than they save") {
  Table counts = {{1000, 0, 0, 0}, {1000, 0, 0, 0}};
  LlepOptions o;
  o.flops_per_token = 18.0 * 512 * 1024;
  o.weight_bytes = 3.0 * 512 * 1024 * 4;
  o.gemm_flops_per_s = 50e9;
  o.p2p_bytes_per_s = 0.01e9;  // a very slow link: 1.2 s for the weights
  LlepPlan slow = PlanLlep(counts, o).value();
  CHECK_FALSE(slow.active);
  CheckPlanCovers(slow, counts);
  o.p2p_bytes_per_s = 10e9;  // fast link: worth it
  LlepPlan fast = PlanLlep(counts, o).value();
  CHECK(fast.active);
  CheckPlanCovers(fast, counts);
}

TEST_CASE("random tables: exact cover, deterministic, never worse than standard EP") {
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 300; ++trial) {
    int P = 1 << (rng() % 4);  // 1, 2, 4, 8
    int E = P * (1 + rng() % 4);
    Table counts(P, std::vector<int64_t>(E));
    int hot = rng() % E;
    for (int r = 0; r < P; ++r)
      for (int e = 0; e < E; ++e) counts[r][e] = (rng() % 200) + (e == hot ? rng() % 5000 : 0);
    if (trial % 7 == 0) counts[0].assign(E, 0);
    LlepOptions o;
    o.min_tokens_per_gemm = 1 + rng() % 512;
    o.capacity_factor = 1.0 + (rng() % 3) * 0.1;
    o.max_borrowed_experts = rng() % 3;
    LlepPlan a = PlanLlep(counts, o).value();
    LlepPlan b = PlanLlep(counts, o).value();
    CAPTURE(trial, P, E);
    CheckPlanCovers(a, counts, o.capacity_factor);
    CHECK(PlanToJson(a) == PlanToJson(b));
    LlepPlan standard = StandardPlan(counts);
    int64_t max_a = *std::max_element(a.load_after.begin(), a.load_after.end());
    int64_t max_s = *std::max_element(standard.load_after.begin(), standard.load_after.end());
    CHECK(max_a <= max_s);
    if (a.active) CHECK(max_a < max_s);
  }
}

// What each rank's dispatcher would send, row by row: a source walks its rows
// in token order (chunk by chunk), hands each row of expert e to the
// computing rank of its next SourceSplits entry (as LlepRunner::Plan assigns
// them) and counts it in (chunk, dst, e). The receive table of rank `me` is
// then the column of those sends: what ChunkReceiveCounts derives without
// walking rows or exchanging anything.
std::vector<int64_t> SimulatedReceives(const LlepPlan& plan, const Table& counts, const Table& chunk_counts,
                                       int C, int me) {
  const int P = counts.size(), E = counts[0].size();
  std::vector<int64_t> recv(static_cast<size_t>(C) * P * E, 0);
  for (int src = 0; src < P; ++src) {
    const auto splits = SourceSplits(plan, counts, src);
    std::vector<size_t> split(E, 0);
    std::vector<int64_t> used(E, 0);
    for (int c = 0; c < C; ++c) {
      for (int e = 0; e < E; ++e) {
        for (int64_t row = 0; row < chunk_counts[src][c * E + e]; ++row) {
          while (used[e] == splits[e][split[e]].second) {
            ++split[e];
            used[e] = 0;
          }
          ++used[e];
          if (splits[e][split[e]].first == me) ++recv[(static_cast<size_t>(c) * P + src) * E + e];
        }
      }
    }
  }
  return recv;
}

TEST_CASE("per-chunk receive counts from the gathered table equal what the sources send") {
  std::mt19937_64 rng(11);
  int fired = 0;
  for (int trial = 0; trial < 200; ++trial) {
    const int P = 1 << (1 + rng() % 3);  // 2, 4, 8
    const int E = P * (1 + rng() % 3);
    const int C = 1 + rng() % 4;
    Table chunk_counts(P, std::vector<int64_t>(static_cast<size_t>(C) * E)),
        counts(P, std::vector<int64_t>(E));
    const int hot = rng() % E;
    for (int r = 0; r < P; ++r) {
      for (int c = 0; c < C; ++c) {
        for (int e = 0; e < E; ++e) {
          // Skewed, with empty chunks and experts now and then.
          int64_t n = rng() % 4 == 0 ? 0 : (rng() % 60) + (e == hot ? rng() % 900 : 0);
          chunk_counts[r][c * E + e] = n;
          counts[r][e] += n;
        }
      }
    }
    LlepOptions o;
    o.min_tokens_per_gemm = 1 + rng() % 64;
    const LlepPlan plan = trial % 5 == 0 ? StandardPlan(counts) : PlanLlep(counts, o).value();
    fired += plan.active ? 1 : 0;
    CAPTURE(trial, P, E, C, plan.active);
    std::vector<int64_t> total(static_cast<size_t>(C) * P * E, 0);
    for (int me = 0; me < P; ++me) {
      CAPTURE(me);
      const std::vector<int64_t> derived = ChunkReceiveCounts(plan, counts, chunk_counts, C, me).value();
      REQUIRE(derived == SimulatedReceives(plan, counts, chunk_counts, C, me));
      for (size_t i = 0; i < derived.size(); ++i) total[i] += derived[i];
    }
    // Every row lands on exactly one rank.
    for (int c = 0; c < C; ++c)
      for (int src = 0; src < P; ++src)
        for (int e = 0; e < E; ++e)
          CHECK(total[(static_cast<size_t>(c) * P + src) * E + e] == chunk_counts[src][c * E + e]);
  }
  CHECK(fired > 50);  // the splits that cross chunk boundaries were exercised
  // A table whose chunks do not add up to the planner's counts is refused by name.
  const Table counts = {{4, 0}, {0, 4}};
  const auto bad = ChunkReceiveCounts(StandardPlan(counts), counts, {{3, 0}, {0, 4}}, 1, 0);
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.status().message().find("EP rank 0's chunks hold 3 rows of expert 0, its count is 4") !=
        std::string::npos);
  CHECK(ChunkReceiveCounts(StandardPlan(counts), counts, {{4, 0}}, 1, 0)
            .status()
            .message()
            .find("count rows for 2 ranks") != std::string::npos);
  // A plan that leaves rows unplaced (not one of these counts) is refused too.
  const Table more = {{5, 0}, {0, 4}};
  const auto unplaced = ChunkReceiveCounts(StandardPlan(counts), more, {{5, 0}, {0, 4}}, 1, 0);
  REQUIRE_FALSE(unplaced.ok());
  CHECK(unplaced.status().message().find("the plan places 4 of EP rank 0's 5 rows of expert 0") !=
        std::string::npos);
}

TEST_CASE("malformed tables are refused with a reason") {
  CHECK(PlanLlep({}, LlepOptions{}).status().message().find("no ranks") != std::string::npos);
  CHECK(PlanLlep({{1, 2, 3}, {1, 2, 3}}, LlepOptions{}).status().message().find("cannot be split evenly") !=
        std::string::npos);
  CHECK(PlanLlep({{1, 2}, {1}}, LlepOptions{}).status().message().find("rank 1 has 1 expert counts") !=
        std::string::npos);
  CHECK(PlanLlep({{1, -2}, {1, 2}}, LlepOptions{}).status().message().find("negative") != std::string::npos);
}

// Extremes a hand-written count file can hold (found while writing tests/fuzz's
// llep_counts harness, undefined behaviour UBSan reports): a capacity_factor or cost-model rate so
// large that the double -> int64 conversions of the cap and the break-even
// token count overflowed, and counts whose sum overflowed int64.
TEST_CASE("extreme knobs and counts: refused by name or planned, never an overflow") {
  const Table counts = {{1000, 0, 0, 0}, {1000, 0, 0, 0}};
  LlepOptions o;
  o.capacity_factor = 1e300;  // a cap beyond the whole load: the native ranks keep everything
  LlepPlan plan = PlanLlep(counts, o).value();
  CheckPlanCovers(plan, counts, 1.0);
  CHECK(plan.tokens_moved == 0);
  o.capacity_factor = INFINITY;
  CHECK(PlanLlep(counts, o).status().message().find("finite capacity_factor >= 1 (got inf)") !=
        std::string::npos);
  o.capacity_factor = NAN;
  CHECK_FALSE(PlanLlep(counts, o).ok());
  o = LlepOptions{};
  o.trigger_ratio = NAN;
  CHECK_FALSE(PlanLlep(counts, o).ok());

  o = LlepOptions{};  // the break-even count beyond int64: no move pays, standard EP
  o.flops_per_token = 1e-300;
  o.weight_bytes = 1e300;
  o.gemm_flops_per_s = 1e300;
  o.p2p_bytes_per_s = 1e-300;
  plan = PlanLlep(counts, o).value();
  CHECK(plan.tokens_moved == 0);
  CheckPlanCovers(plan, counts);
  o.weight_bytes = INFINITY;
  CHECK(PlanLlep(counts, o).status().message().find("weight_bytes = inf is not finite") != std::string::npos);

  const int64_t big = int64_t{1} << 53;  // the largest count the file reader takes
  Table huge(2, std::vector<int64_t>(1024, big));
  CHECK(PlanLlep(huge, LlepOptions{}).status().message().find("sum to more than 2^62 tokens") !=
        std::string::npos);
}

TEST_CASE("knobs from a count file: integers checked, non-finite refused by name") {
  auto from = [](std::vector<std::pair<std::string, double>> knobs) {
    LlepCountTable t;
    t.knobs = std::move(knobs);
    return LlepOptionsFromKnobs([&](const char* name, double fallback) { return t.Knob(name, fallback); });
  };
  LlepOptions o = from({}).value();
  CHECK(o.trigger_ratio == 1.3);
  CHECK(o.min_tokens_per_gemm == 1024);
  CHECK(o.flops_per_token == 0);
  o = from({{"min_tokens_per_gemm", 16},
            {"hidden", 512},
            {"expert_ffn", 1024},
            {"gemm_gflops", 50},
            {"p2p_gbps", 10}})
          .value();
  CHECK(o.min_tokens_per_gemm == 16);
  CHECK(o.flops_per_token == 18.0 * 512 * 1024);
  CHECK(o.p2p_bytes_per_s == 10e9);
  CHECK(from({{"min_tokens_per_gemm", 1e300}}).status().message() ==
        "llep-plan: min_tokens_per_gemm = 1e+300 is not an integer in [0, 9007199254740992]");
  CHECK(from({{"max_borrowed_experts", 2.5}})
            .status()
            .message()
            .find("max_borrowed_experts = 2.5 is not an integer") != std::string::npos);
  CHECK(from({{"capacity_factor", INFINITY}}).status().message() ==
        "llep-plan: capacity_factor = inf is not finite");
}

}  // namespace
}  // namespace moe::parallel
