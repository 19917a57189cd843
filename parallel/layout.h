// The rank layout: a pure function of (world, tp, ep) and a rank.
//
// world = TP x DP. TP is innermost (adjacent ranks, same node). EP groups are
// contiguous slices of the DP dimension of size EP; expert-data-parallel (EDP,
// size DP / EP) groups join the ranks that hold the same experts.
//
// Worked example, world 8, TP 2, EP 2 (so DP 4, EDP 2):
//
//   rank        0  1  2  3  4  5  6  7
//   tp_rank     0  1  0  1  0  1  0  1
//   dp_rank     0  0  1  1  2  2  3  3
//   ep_rank     0  0  1  1  0  0  1  1
//   edp_rank    0  0  0  0  1  1  1  1
//
//   TP groups  {0,1} {2,3} {4,5} {6,7}
//   DP groups  {0,2,4,6} {1,3,5,7}
//   EP groups  {0,2} {4,6} {1,3} {5,7}
//   EDP groups {0,4} {2,6} {1,5} {3,7}
//
// Dense parameters are sharded over TP and their gradients reduced over DP.
// Expert parameters: E/EP experts per EP rank, gradients reduced over EDP.
#ifndef MOE_PARALLEL_LAYOUT_H_
#define MOE_PARALLEL_LAYOUT_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace moe::parallel {

struct RankLayout {
  int world = 1, tp = 1, dp = 1, ep = 1, edp = 1;
  int rank = 0;
  int tp_rank = 0, dp_rank = 0, ep_rank = 0, edp_rank = 0;
  // Members of this rank's groups, in group-rank order (world ranks).
  std::vector<int> tp_group, dp_group, ep_group, edp_group;
  // Index of this rank's group among the groups of its kind (a Split color).
  int tp_group_id = 0, dp_group_id = 0, ep_group_id = 0, edp_group_id = 0;
};

// Layout of `rank` in a world of `world` ranks with tensor size `tp` and
// expert size `ep`. Errors when tp does not divide world or ep does not divide
// dp = world / tp, naming the numbers.
absl::StatusOr<RankLayout> ComputeLayout(int world, int tp, int ep, int rank);

// The experts EP rank `ep_rank` of `ep_size` owns: the contiguous block
// [E r / P, E (r + 1) / P) of num_experts E. The one definition of expert
// ownership: expert shards, the token dispatcher, LLEP and checkpoints use it.
std::pair<int64_t, int64_t> OwnedExperts(int64_t num_experts, int ep_size, int ep_rank);
// The EP rank whose OwnedExperts block holds `expert`.
int ExpertOwner(int64_t expert, int64_t num_experts, int ep_size);

// A table of every rank's coordinates and the groups, as printed at start-up.
absl::StatusOr<std::string> FormatLayoutTable(int world, int tp, int ep);

}  // namespace moe::parallel

#endif  // MOE_PARALLEL_LAYOUT_H_
