#include "parallel/layout.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "runtime/core/status.h"

namespace moe::parallel {

absl::StatusOr<RankLayout> ComputeLayout(int world, int tp, int ep, int rank) {
  if (world <= 0 || tp <= 0 || ep <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("layout needs positive sizes, got world ", world, ", tensor ", tp, ", expert ", ep));
  }
  if (world % tp != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("parallel.tensor = ", tp, " must divide the world size ", world));
  }
  const int dp = world / tp;
  if (dp % ep != 0) {
    return absl::InvalidArgumentError(absl::StrCat("parallel.expert = ", ep,
                                                   " must divide the data-parallel size ", dp, " (world ",
                                                   world, " / tensor ", tp, ")"));
  }
  if (rank < 0 || rank >= world) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", rank, " is outside a world of ", world));
  }
  RankLayout l;
  l.world = world;
  l.tp = tp;
  l.dp = dp;
  l.ep = ep;
  l.edp = dp / ep;
  l.rank = rank;
  l.tp_rank = rank % tp;
  l.dp_rank = rank / tp;
  l.ep_rank = l.dp_rank % ep;
  l.edp_rank = l.dp_rank / ep;
  const int ep_slice = l.dp_rank / ep;  // which contiguous slice of DP

  for (int t = 0; t < tp; ++t) l.tp_group.push_back(l.dp_rank * tp + t);
  for (int d = 0; d < dp; ++d) l.dp_group.push_back(d * tp + l.tp_rank);
  for (int e = 0; e < ep; ++e) l.ep_group.push_back((ep_slice * ep + e) * tp + l.tp_rank);
  for (int s = 0; s < l.edp; ++s) l.edp_group.push_back((s * ep + l.ep_rank) * tp + l.tp_rank);

  l.tp_group_id = l.dp_rank;
  l.dp_group_id = l.tp_rank;
  // EP groups ordered as in docs/design.md: by tp_rank, then by slice.
  l.ep_group_id = l.tp_rank * l.edp + ep_slice;
  l.edp_group_id = l.tp_rank * ep + l.ep_rank;
  return l;
}

absl::StatusOr<std::string> FormatLayoutTable(int world, int tp, int ep) {
  std::vector<RankLayout> all;
  for (int r = 0; r < world; ++r) {
    ASSIGN_OR_RETURN(RankLayout l, ComputeLayout(world, tp, ep, r));
    all.push_back(std::move(l));
  }
  const RankLayout& f = all.front();
  std::string out =
      absl::StrFormat("rank layout: world %d = tensor %d x data %d; expert %d, expert-data %d\n", world, f.tp,
                      f.dp, f.ep, f.edp);
  absl::StrAppendFormat(&out, "  %-9s", "rank");
  for (const auto& l : all) absl::StrAppendFormat(&out, "%4d", l.rank);
  auto row = [&](const char* name, auto get) {
    absl::StrAppendFormat(&out, "\n  %-9s", name);
    for (const auto& l : all) absl::StrAppendFormat(&out, "%4d", get(l));
  };
  row("tp_rank", [](const RankLayout& l) { return l.tp_rank; });
  row("dp_rank", [](const RankLayout& l) { return l.dp_rank; });
  row("ep_rank", [](const RankLayout& l) { return l.ep_rank; });
  row("edp_rank", [](const RankLayout& l) { return l.edp_rank; });
  auto groups = [&](const char* name, auto get_group, auto get_id) {
    std::vector<std::string> seen(world);
    int count = 0;
    for (const auto& l : all) {
      int id = get_id(l);
      if (seen[id].empty()) {
        seen[id] = absl::StrCat("{", absl::StrJoin(get_group(l), ","), "}");
        ++count;
      }
    }
    absl::StrAppendFormat(&out, "\n  %-11s", absl::StrCat(name, " groups"));
    for (int i = 0; i < count; ++i) absl::StrAppend(&out, " ", seen[i]);
  };
  groups(
      "TP", [](const RankLayout& l) { return l.tp_group; },
      [](const RankLayout& l) { return l.tp_group_id; });
  groups(
      "DP", [](const RankLayout& l) { return l.dp_group; },
      [](const RankLayout& l) { return l.dp_group_id; });
  groups(
      "EP", [](const RankLayout& l) { return l.ep_group; },
      [](const RankLayout& l) { return l.ep_group_id; });
  groups(
      "EDP", [](const RankLayout& l) { return l.edp_group; },
      [](const RankLayout& l) { return l.edp_group_id; });
  out.push_back('\n');
  return out;
}

std::pair<int64_t, int64_t> OwnedExperts(int64_t num_experts, int ep_size, int ep_rank) {
  return {num_experts * ep_rank / ep_size, num_experts * (ep_rank + 1) / ep_size};
}

int ExpertOwner(int64_t expert, int64_t num_experts, int ep_size) {
  // The largest r with E r / P <= expert, i.e. E r < (expert + 1) P.
  return static_cast<int>(((expert + 1) * ep_size - 1) / num_experts);
}

}  // namespace moe::parallel
