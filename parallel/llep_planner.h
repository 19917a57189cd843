// Least-Loaded Expert Parallelism (LLEP, Nguyen et al., arXiv 2601.17111):
// the planner that decides which rank computes which (token, expert) pairs.
//
// Routing never changes; the plan only moves work. Every rank of an EP group
// computes the same plan from the same global count table, with integer
// arithmetic only, so plans agree bit for bit without communication.
//
// Inputs: counts[r][e] = tokens that EP rank r routes to expert e (P ranks,
// E experts, E % P == 0, expert e native to rank e / (E / P)).
// A plan gives, for every expert, the ranges of its tokens in GLOBAL order
// (rank 0's tokens for e first, then rank 1's, ...) and the rank computing
// each range. The native rank always takes the first range.
//
// Algorithm (paper Alg. 2-4, with this runtime's additions marked +):
//   - per-rank native load N_g = sum of the loads of g's experts;
//     if max(N)/mean(N) < trigger_ratio: standard EP (no moves).
//   - cap = ceil(capacity_factor * total / P).
//   - experts in descending load (ties: lower index first). A rank's
//     effective load = tokens assigned so far + loads of its native experts
//     not yet planned.
//   - the native rank keeps what fits under cap; the excess goes, range by
//     range, to the helper with the least effective load that has room;
//     a range smaller than min_tokens_per_gemm is avoided while more remains;
//     when no helper has room, the rest goes to the least-loaded helper.
//   + a helper already holding max_borrowed_experts foreign experts is skipped.
//   + cost model: a range moves only when the compute it takes off the
//     native rank outlasts sending the expert's weights there and its
//     gradient back (tokens * flops_per_token / gemm_flops_per_s versus
//     2 * weight_bytes / p2p_bytes_per_s).
//   + the plan is kept only when its maximum rank load is below standard EP's.
#ifndef MOE_PARALLEL_LLEP_PLANNER_H_
#define MOE_PARALLEL_LLEP_PLANNER_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "parallel/layout.h"

namespace moe::parallel {

struct LlepOptions {
  double trigger_ratio = 1.3;          // lambda
  double capacity_factor = 1.0;        // alpha
  int64_t min_tokens_per_gemm = 1024;  // m
  int max_borrowed_experts = 0;        // 0: no limit
  // Cost model; off when any of these is <= 0.
  double flops_per_token = 0;  // forward+backward FLOPs one token costs one expert
  double weight_bytes = 0;     // bytes of one expert's weights
  double gemm_flops_per_s = 0;
  double p2p_bytes_per_s = 0;
};

struct LlepRange {
  int rank = 0;       // EP rank computing the range
  int64_t begin = 0;  // [begin, end) over the expert's tokens in global order
  int64_t end = 0;
};

struct LlepWeightMove {
  int expert = 0;
  int src = 0;  // native EP rank
  int dst = 0;  // helper EP rank
};

struct LlepPlan {
  int num_ranks = 0, num_experts = 0;
  bool active = false;                                   // false: standard EP
  std::string reason;                                    // why it fired or not
  std::vector<std::vector<LlepRange>> ranges;            // [E] ranges, native first
  std::vector<LlepWeightMove> weight_moves;              // sorted by (expert, dst)
  std::vector<int64_t> load_before, load_after;          // per rank tokens computed
  double imbalance_before = 1.0, imbalance_after = 1.0;  // max / mean
  int64_t tokens_moved = 0;                              // tokens computed away from their native rank

  int native_rank(int expert) const { return ExpertOwner(expert, num_experts, num_ranks); }
};

// Plans one MoE layer. Errors for malformed tables (ragged, negative counts,
// E not divisible by P, counts summing past 2^62) and options out of range
// (capacity_factor or trigger_ratio below 1 or not finite, min_tokens_per_gemm
// below 1, a non-finite cost-model rate), naming what is wrong.
absl::StatusOr<LlepPlan> PlanLlep(const std::vector<std::vector<int64_t>>& counts,
                                  const LlepOptions& options);

// A standard-EP plan (every expert on its native rank).
LlepPlan StandardPlan(const std::vector<std::vector<int64_t>>& counts);

// For source rank `src`: how its tokens for expert e split over computing ranks,
// in order: {dst rank, token count} pairs whose counts sum to counts[src][e].
std::vector<std::vector<std::pair<int, int64_t>>> SourceSplits(
    const LlepPlan& plan, const std::vector<std::vector<int64_t>>& counts, int src);

// The rows EP rank `me` receives, per chunk of the token exchange, when every
// source sends its rows of expert e in token order split as SourceSplits says
// (the standard plan: all to the owner). chunk_counts[src][c * E + e]: source
// src's rows of expert e in chunk c (its chunks are consecutive token ranges,
// so chunk c holds rows [sum_{c' < c}, + chunk_counts) of the source's e rows);
// summed over c they must equal plan's counts[src][e]. Returns the receive
// table [C * P * E], index (c * P + src) * E + e, as ExchangePlan::FromCounts
// takes it: with the counts gathered for the planner, no rank needs the count
// exchange. Errors name a ragged or inconsistent table.
absl::StatusOr<std::vector<int64_t>> ChunkReceiveCounts(const LlepPlan& plan,
                                                        const std::vector<std::vector<int64_t>>& counts,
                                                        const std::vector<std::vector<int64_t>>& chunk_counts,
                                                        int num_chunks, int me);

// The plan as JSON (ranges, moves, loads), for moe-bench llep-plan and logs.
std::string PlanToJson(const LlepPlan& plan);

// A count table as moe-bench llep-plan reads it from a file:
//   {"counts": [[c_00, c_01, ...], ...], "trigger_ratio": 1.3, ...}
// counts[rank][expert]; every other top-level number is a knob by name.
// Errors (InvalidArgument, prefixed with `source`) name the entry: a missing
// or non-array "counts", a row that is not an array, an entry that is not an
// integer in [0, 2^53].
struct LlepCountTable {
  std::vector<std::vector<int64_t>> counts;
  std::vector<std::pair<std::string, double>> knobs;
  // The knob `name`, or `fallback` when the table does not set it.
  double Knob(const std::string& name, double fallback) const;
};
absl::StatusOr<LlepCountTable> ParseLlepCountTable(const std::string& text, const std::string& source);

// The planner's options from knobs by name (a count table's Knob, overridden
// by moe-bench llep-plan's arguments): trigger_ratio, capacity_factor,
// min_tokens_per_gemm, max_borrowed_experts, and the cost model's hidden,
// expert_ffn, gemm_gflops and p2p_gbps (off unless hidden and expert_ffn are
// > 0). `knob(name, fallback)` returns the value or the fallback. Errors name
// the knob: a value that is not finite, an integer knob that is fractional,
// negative or too large. PlanLlep checks the ranges.
absl::StatusOr<LlepOptions> LlepOptionsFromKnobs(
    absl::FunctionRef<double(const char* name, double fallback)> knob);

}  // namespace moe::parallel

#endif  // MOE_PARALLEL_LLEP_PLANNER_H_
