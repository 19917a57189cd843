#include "parallel/llep_planner.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "runtime/core/json.h"
#include "runtime/core/status.h"

namespace moe::parallel {
namespace {

double Imbalance(const std::vector<int64_t>& loads) {
  if (loads.empty()) return 1.0;
  int64_t total = std::accumulate(loads.begin(), loads.end(), int64_t{0});
  if (total == 0) return 1.0;
  int64_t max = *std::max_element(loads.begin(), loads.end());
  return static_cast<double>(max) * static_cast<double>(loads.size()) / static_cast<double>(total);
}

std::vector<int64_t> ExpertLoads(const std::vector<std::vector<int64_t>>& counts) {
  std::vector<int64_t> loads(counts.empty() ? 0 : counts[0].size(), 0);
  for (const auto& row : counts)
    for (size_t e = 0; e < row.size(); ++e) loads[e] += row[e];
  return loads;
}

void FinishLoads(LlepPlan* plan) {
  plan->load_after.assign(plan->num_ranks, 0);
  plan->tokens_moved = 0;
  for (int e = 0; e < plan->num_experts; ++e) {
    for (const LlepRange& r : plan->ranges[e]) {
      plan->load_after[r.rank] += r.end - r.begin;
      if (r.rank != plan->native_rank(e)) plan->tokens_moved += r.end - r.begin;
    }
  }
  plan->imbalance_after = Imbalance(plan->load_after);
}

}  // namespace

LlepPlan StandardPlan(const std::vector<std::vector<int64_t>>& counts) {
  LlepPlan plan;
  plan.num_ranks = static_cast<int>(counts.size());
  plan.num_experts = counts.empty() ? 0 : static_cast<int>(counts[0].size());
  std::vector<int64_t> loads = ExpertLoads(counts);
  plan.ranges.resize(plan.num_experts);
  plan.load_before.assign(plan.num_ranks, 0);
  for (int e = 0; e < plan.num_experts; ++e) {
    plan.load_before[plan.native_rank(e)] += loads[e];
    if (loads[e] > 0) plan.ranges[e].push_back({plan.native_rank(e), 0, loads[e]});
  }
  plan.imbalance_before = Imbalance(plan.load_before);
  FinishLoads(&plan);
  return plan;
}

absl::StatusOr<LlepPlan> PlanLlep(const std::vector<std::vector<int64_t>>& counts,
                                  const LlepOptions& options) {
  const int P = static_cast<int>(counts.size());
  if (P == 0) return absl::InvalidArgumentError("LLEP plan: the count table has no ranks");
  const int E = static_cast<int>(counts[0].size());
  if (E == 0 || E % P != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("LLEP plan: ", E, " experts cannot be split evenly over ", P, " ranks"));
  }
  for (int r = 0; r < P; ++r) {
    if (static_cast<int>(counts[r].size()) != E) {
      return absl::InvalidArgumentError(
          absl::StrCat("LLEP plan: rank ", r, " has ", counts[r].size(), " expert counts, rank 0 has ", E));
    }
    for (int e = 0; e < E; ++e) {
      if (counts[r][e] < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("LLEP plan: counts[", r, "][", e, "] = ", counts[r][e], " is negative"));
      }
    }
  }
  // Every token count is summed into int64 loads: the table's total must fit
  // with room to spare (2^62), or the sums below would overflow.
  constexpr int64_t kMaxTotal = int64_t{1} << 62;
  int64_t table_total = 0;
  for (int r = 0; r < P; ++r) {
    for (int e = 0; e < E; ++e) {
      if (counts[r][e] > kMaxTotal - table_total) {
        return absl::InvalidArgumentError(
            absl::StrCat("LLEP plan: the counts sum to more than 2^62 tokens (at counts[", r, "][", e,
                         "] = ", counts[r][e], ")"));
      }
      table_total += counts[r][e];
    }
  }
  if (!(options.capacity_factor >= 1.0) || !(options.trigger_ratio >= 1.0) ||
      options.min_tokens_per_gemm < 1 || !std::isfinite(options.capacity_factor) ||
      !std::isfinite(options.trigger_ratio)) {
    return absl::InvalidArgumentError(
        absl::StrCat("LLEP plan: need finite capacity_factor >= 1 (got ", options.capacity_factor,
                     "), finite trigger_ratio >= 1 (got ", options.trigger_ratio,
                     ") and min_tokens_per_gemm >= 1 (got ", options.min_tokens_per_gemm, ")"));
  }
  for (const auto& [name, value] :
       {std::pair<const char*, double>{"flops_per_token", options.flops_per_token},
        {"weight_bytes", options.weight_bytes},
        {"gemm_flops_per_s", options.gemm_flops_per_s},
        {"p2p_bytes_per_s", options.p2p_bytes_per_s}}) {
    if (!std::isfinite(value)) {
      return absl::InvalidArgumentError(
          absl::StrCat("LLEP plan: cost model ", name, " = ", value, " is not finite"));
    }
  }

  LlepPlan standard = StandardPlan(counts);
  const std::vector<int64_t> loads = ExpertLoads(counts);
  const int64_t total = std::accumulate(loads.begin(), loads.end(), int64_t{0});
  if (total == 0) {
    standard.reason = "no tokens";
    return standard;
  }
  if (standard.imbalance_before < options.trigger_ratio) {
    standard.reason = absl::StrFormat("imbalance %.3f below trigger_ratio %.3f", standard.imbalance_before,
                                      options.trigger_ratio);
    return standard;
  }

  LlepPlan plan;
  plan.num_ranks = P;
  plan.num_experts = E;
  plan.ranges.resize(E);
  plan.load_before = standard.load_before;
  plan.imbalance_before = standard.imbalance_before;
  // Capacity per rank; beyond the whole load it changes nothing (and a huge
  // capacity_factor must not overflow the conversion).
  const double cap_tokens = std::ceil(options.capacity_factor * static_cast<double>(total) / P);
  const int64_t cap = cap_tokens < static_cast<double>(total) ? static_cast<int64_t>(cap_tokens) : total;
  const bool cost_model = options.flops_per_token > 0 && options.weight_bytes > 0 &&
                          options.gemm_flops_per_s > 0 && options.p2p_bytes_per_s > 0;
  // Tokens worth moving to a helper that does not hold the expert yet: the
  // compute they take off the native rank must outlast sending the weights and
  // returning their gradient.
  int64_t min_worthwhile = 1;
  if (cost_model) {
    double transfer_s = 2.0 * options.weight_bytes / options.p2p_bytes_per_s;
    double per_token_s = options.flops_per_token / options.gemm_flops_per_s;
    // More than the whole load (or inf/NaN from extreme rates): no move pays.
    const double breakeven = std::floor(transfer_s / per_token_s);
    min_worthwhile = breakeven < static_cast<double>(total) ? static_cast<int64_t>(breakeven) + 1 : total + 1;
  }

  std::vector<int> order(E);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return loads[a] > loads[b]; });

  std::vector<int64_t> assigned(P, 0);
  std::vector<int64_t> pending = standard.load_before;  // native loads not yet planned
  std::vector<int> borrowed(P, 0);
  auto effective = [&](int g) { return assigned[g] + pending[g]; };

  for (int e : order) {
    const int native = plan.native_rank(e);
    const int64_t load = loads[e];
    pending[native] -= load;
    if (load == 0) continue;
    int64_t keep = std::clamp<int64_t>(cap - assigned[native], 0, load);
    int64_t next = 0;
    if (keep > 0) {
      plan.ranges[e].push_back({native, 0, keep});
      assigned[native] += keep;
      next = keep;
    }
    int64_t remaining = load - keep;
    std::vector<bool> used(P, false);
    used[native] = true;
    while (remaining > 0) {
      // Helpers by effective load, then rank: deterministic.
      std::vector<int> helpers;
      for (int g = 0; g < P; ++g) {
        if (used[g]) continue;
        if (options.max_borrowed_experts > 0 && borrowed[g] >= options.max_borrowed_experts) continue;
        helpers.push_back(g);
      }
      std::stable_sort(helpers.begin(), helpers.end(),
                       [&](int a, int b) { return effective(a) < effective(b); });
      int chosen = -1;
      int64_t chunk = 0;
      for (int g : helpers) {
        int64_t room = cap - effective(g);
        if (room <= 0) continue;
        int64_t c = std::min(room, remaining);
        if (c < options.min_tokens_per_gemm && remaining > c) continue;  // avoid a tiny GEMM
        chosen = g;
        chunk = c;
        break;
      }
      if (chosen < 0 && !helpers.empty()) {  // no helper has room: least loaded takes the rest
        chosen = helpers.front();
        chunk = remaining;
        // Forcing onto a helper that would end above the native rank helps nobody.
        if (effective(chosen) + chunk >= assigned[native] + remaining) chosen = -1;
      }
      if (chosen >= 0 && chunk < min_worthwhile) chosen = -1;  // not worth the weight transfer
      if (chosen < 0) {                                        // the native rank computes the rest
        plan.ranges[e].push_back({native, next, next + remaining});
        assigned[native] += remaining;
        break;
      }
      plan.ranges[e].push_back({chosen, next, next + chunk});
      plan.weight_moves.push_back({e, native, chosen});
      assigned[chosen] += chunk;
      borrowed[chosen] += 1;
      used[chosen] = true;
      next += chunk;
      remaining -= chunk;
    }
  }
  // Merge adjacent ranges of one rank (the native's tail after a rejected spill).
  for (auto& ranges : plan.ranges) {
    std::vector<LlepRange> merged;
    for (const LlepRange& r : ranges) {
      if (!merged.empty() && merged.back().rank == r.rank && merged.back().end == r.begin) {
        merged.back().end = r.end;
      } else {
        merged.push_back(r);
      }
    }
    ranges = std::move(merged);
  }
  std::sort(plan.weight_moves.begin(), plan.weight_moves.end(), [](const auto& a, const auto& b) {
    return a.expert != b.expert ? a.expert < b.expert : a.dst < b.dst;
  });
  FinishLoads(&plan);
  const int64_t max_after = *std::max_element(plan.load_after.begin(), plan.load_after.end());
  const int64_t max_before = *std::max_element(plan.load_before.begin(), plan.load_before.end());
  if (plan.weight_moves.empty() || max_after >= max_before) {
    standard.reason = plan.weight_moves.empty()
                          ? "no move is worth its weight transfer"
                          : absl::StrCat("plan max load ", max_after, " not below standard ", max_before);
    return standard;
  }
  plan.active = true;
  plan.reason =
      absl::StrFormat("imbalance %.3f >= trigger_ratio %.3f", plan.imbalance_before, options.trigger_ratio);
  return plan;
}

std::vector<std::vector<std::pair<int, int64_t>>> SourceSplits(
    const LlepPlan& plan, const std::vector<std::vector<int64_t>>& counts, int src) {
  std::vector<std::vector<std::pair<int, int64_t>>> out(plan.num_experts);
  for (int e = 0; e < plan.num_experts; ++e) {
    int64_t begin = 0;
    for (int r = 0; r < src; ++r) begin += counts[r][e];
    const int64_t end = begin + counts[src][e];
    for (const LlepRange& range : plan.ranges[e]) {
      int64_t lo = std::max(begin, range.begin), hi = std::min(end, range.end);
      if (hi > lo) out[e].push_back({range.rank, hi - lo});
    }
  }
  return out;
}

absl::StatusOr<std::vector<int64_t>> ChunkReceiveCounts(const LlepPlan& plan,
                                                        const std::vector<std::vector<int64_t>>& counts,
                                                        const std::vector<std::vector<int64_t>>& chunk_counts,
                                                        int num_chunks, int me) {
  const int P = plan.num_ranks;
  const int64_t E = plan.num_experts;
  const size_t CE = static_cast<size_t>(num_chunks) * E;
  if (num_chunks < 1 || me < 0 || me >= P || static_cast<int>(counts.size()) != P ||
      static_cast<int>(chunk_counts.size()) != P) {
    return absl::InvalidArgumentError(absl::StrCat("ChunkReceiveCounts: ", chunk_counts.size(), " and ",
                                                   counts.size(), " count rows for ", P, " ranks, ",
                                                   num_chunks, " chunks, rank ", me));
  }
  std::vector<int64_t> recv(static_cast<size_t>(num_chunks) * P * E, 0);
  for (int src = 0; src < P; ++src) {
    if (chunk_counts[src].size() != CE) {
      return absl::InvalidArgumentError(absl::StrCat("ChunkReceiveCounts: EP rank ", src, " has ",
                                                     chunk_counts[src].size(),
                                                     " chunk counts, not C * E = ", CE));
    }
    const auto splits = SourceSplits(plan, counts, src);
    for (int64_t e = 0; e < E; ++e) {
      // The source's rows of e in token order: split i covers [split_begin, + n).
      int64_t chunk_begin = 0, split_begin = 0;
      size_t i = 0;
      for (int c = 0; c < num_chunks; ++c) {
        const int64_t chunk_end = chunk_begin + chunk_counts[src][static_cast<size_t>(c) * E + e];
        for (; i < splits[e].size(); ++i) {
          const auto [dst, n] = splits[e][i];
          const int64_t lo = std::max(chunk_begin, split_begin), hi = std::min(chunk_end, split_begin + n);
          if (dst == me && hi > lo) recv[(static_cast<size_t>(c) * P + src) * E + e] += hi - lo;
          if (split_begin + n > chunk_end) break;  // the split goes on in the next chunk
          split_begin += n;
        }
        chunk_begin = chunk_end;
      }
      if (chunk_begin != counts[src][e]) {
        return absl::InvalidArgumentError(absl::StrCat("ChunkReceiveCounts: EP rank ", src, "'s chunks hold ",
                                                       chunk_begin, " rows of expert ", e, ", its count is ",
                                                       counts[src][e]));
      }
      int64_t covered = 0;
      for (const auto& [dst, n] : splits[e]) covered += n;
      if (covered != counts[src][e]) {  // every row must go somewhere, or the exchange would hang
        return absl::InvalidArgumentError(absl::StrCat("ChunkReceiveCounts: the plan places ", covered,
                                                       " of EP rank ", src, "'s ", counts[src][e],
                                                       " rows of expert ", e));
      }
    }
  }
  return recv;
}

std::string PlanToJson(const LlepPlan& plan) {
  auto ints = [](const std::vector<int64_t>& v) { return absl::StrCat("[", absl::StrJoin(v, ","), "]"); };
  std::string out = absl::StrFormat(
      "{\"active\":%s,\"reason\":\"%s\",\"num_ranks\":%d,\"num_experts\":%d,\"imbalance_before\":%.4f,"
      "\"imbalance_after\":%.4f,\"tokens_moved\":%d,\"load_before\":%s,\"load_after\":%s,\"ranges\":[",
      plan.active ? "true" : "false", JsonEscape(plan.reason), plan.num_ranks, plan.num_experts,
      plan.imbalance_before, plan.imbalance_after, plan.tokens_moved, ints(plan.load_before),
      ints(plan.load_after));
  for (int e = 0; e < plan.num_experts; ++e) {
    absl::StrAppend(&out, e ? "," : "", "[");
    for (size_t i = 0; i < plan.ranges[e].size(); ++i) {
      const LlepRange& r = plan.ranges[e][i];
      absl::StrAppendFormat(&out, "%s{\"rank\":%d,\"begin\":%d,\"end\":%d}", i ? "," : "", r.rank, r.begin,
                            r.end);
    }
    absl::StrAppend(&out, "]");
  }
  absl::StrAppend(&out, "],\"weight_moves\":[");
  for (size_t i = 0; i < plan.weight_moves.size(); ++i) {
    const LlepWeightMove& m = plan.weight_moves[i];
    absl::StrAppendFormat(&out, "%s{\"expert\":%d,\"src\":%d,\"dst\":%d}", i ? "," : "", m.expert, m.src,
                          m.dst);
  }
  absl::StrAppend(&out, "]}");
  return out;
}

absl::StatusOr<LlepOptions> LlepOptionsFromKnobs(absl::FunctionRef<double(const char*, double)> knob) {
  LlepOptions o;
  // Integer knobs: finite whole numbers in [0, max] (a double beyond int64
  // would not convert).
  auto integer = [&](const char* name, double fallback, int64_t max, double* out) -> absl::Status {
    const double v = knob(name, fallback);
    if (!(v >= 0) || v > static_cast<double>(max) || v != std::floor(v)) {
      return absl::InvalidArgumentError(
          absl::StrCat("llep-plan: ", name, " = ", v, " is not an integer in [0, ", max, "]"));
    }
    *out = v;
    return absl::OkStatus();
  };
  auto real = [&](const char* name, double fallback, double* out) -> absl::Status {
    const double v = knob(name, fallback);
    if (!std::isfinite(v))
      return absl::InvalidArgumentError(absl::StrCat("llep-plan: ", name, " = ", v, " is not finite"));
    *out = v;
    return absl::OkStatus();
  };
  double min_tokens = 0, max_borrowed = 0, hidden = 0, ffn = 0, gflops = 0, gbps = 0;
  RETURN_IF_ERROR(real("trigger_ratio", o.trigger_ratio, &o.trigger_ratio));
  RETURN_IF_ERROR(real("capacity_factor", o.capacity_factor, &o.capacity_factor));
  RETURN_IF_ERROR(integer("min_tokens_per_gemm", static_cast<double>(o.min_tokens_per_gemm), int64_t{1} << 53,
                          &min_tokens));
  RETURN_IF_ERROR(integer("max_borrowed_experts", o.max_borrowed_experts, 1 << 30, &max_borrowed));
  RETURN_IF_ERROR(real("hidden", 0, &hidden));
  RETURN_IF_ERROR(real("expert_ffn", 0, &ffn));
  RETURN_IF_ERROR(real("gemm_gflops", 0, &gflops));
  RETURN_IF_ERROR(real("p2p_gbps", 0, &gbps));
  o.min_tokens_per_gemm = static_cast<int64_t>(min_tokens);
  o.max_borrowed_experts = static_cast<int>(max_borrowed);
  if (hidden > 0 && ffn > 0) {
    o.flops_per_token = 18.0 * hidden * ffn;  // SwiGLU: 3 GEMMs x 2 flops x (1 forward + 2 backward)
    o.weight_bytes = 3.0 * hidden * ffn * 4;
    o.gemm_flops_per_s = gflops * 1e9;
    o.p2p_bytes_per_s = gbps * 1e9;
  }
  return o;
}

double LlepCountTable::Knob(const std::string& name, double fallback) const {
  for (const auto& [key, value] : knobs) {
    if (key == name) return value;
  }
  return fallback;
}

absl::StatusOr<LlepCountTable> ParseLlepCountTable(const std::string& text, const std::string& source) {
  absl::StatusOr<JsonValue> doc = ParseJson(text);
  if (!doc.ok()) return absl::InvalidArgumentError(absl::StrCat(source, ": ", doc.status().message()));
  const JsonValue* table = doc->Find("counts");
  if (doc->kind != JsonValue::Kind::kObject || table == nullptr || table->kind != JsonValue::Kind::kArray) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": needs a \"counts\" array of per-rank arrays"));
  }
  LlepCountTable out;
  for (const JsonValue& row : table->array) {
    const size_t r = out.counts.size();
    if (row.kind != JsonValue::Kind::kArray) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": counts[", r, "] is not an array"));
    }
    out.counts.emplace_back();
    for (const JsonValue& v : row.array) {
      // A double holds integers exactly up to 2^53; anything else (fractions,
      // NaN, huge values) would not convert to a count.
      if (v.kind != JsonValue::Kind::kNumber || !(v.number >= 0) || v.number > 9007199254740992.0 ||
          v.number != std::floor(v.number)) {
        return absl::InvalidArgumentError(absl::StrCat(source, ": counts[", r, "][", out.counts[r].size(),
                                                       "] is not a token count (an integer in [0, 2^53])"));
      }
      out.counts[r].push_back(static_cast<int64_t>(v.number));
    }
  }
  for (const auto& [key, value] : doc->object) {
    if (value.kind == JsonValue::Kind::kNumber) out.knobs.emplace_back(key, value.number);
  }
  return out;
}

}  // namespace moe::parallel
