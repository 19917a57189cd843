// Process groups built by Split agree with the pure layout function, and a
// collective over each group reaches exactly the ranks docs/design.md names.
#include "parallel/process_groups.h"

#include <catch2/catch.hpp>
#include <numeric>

#include "comm/mpi_env.h"

namespace moe::parallel {
namespace {

// Sum of the world ranks of the group's members, by AllReduce over the group.
int64_t GroupRankSum(comm::Communicator& c, int world_rank) {
  int64_t mine = world_rank, sum = 0;
  auto work = c.AllReduce(&mine, &sum, 1, DType::kI64, comm::ReduceOp::kSum);
  REQUIRE(work.ok());
  REQUIRE(work->Wait().ok());
  return sum;
}

void CheckGroups(int tp, int ep) {
  comm::CommOptions options;
  options.timeout_s = 60;
  auto world = comm::CreateWorldCommunicator(options);
  REQUIRE(world.ok());
  const int rank = (*world)->rank();
  auto groups = CreateProcessGroups(std::move(world).value(), tp, ep);
  REQUIRE(groups.ok());
  const RankLayout& l = groups->layout;
  auto sum = [](const std::vector<int>& g) { return std::accumulate(g.begin(), g.end(), int64_t{0}); };
  CAPTURE(tp, ep, rank);
  CHECK(groups->tp->group_ranks() == l.tp_group);
  CHECK(groups->dp->group_ranks() == l.dp_group);
  CHECK(groups->ep->group_ranks() == l.ep_group);
  CHECK(groups->edp->group_ranks() == l.edp_group);
  CHECK(groups->ep_p2p->group_ranks() == l.ep_group);
  CHECK(GroupRankSum(*groups->tp, rank) == sum(l.tp_group));
  CHECK(GroupRankSum(*groups->dp, rank) == sum(l.dp_group));
  CHECK(GroupRankSum(*groups->ep, rank) == sum(l.ep_group));
  CHECK(GroupRankSum(*groups->edp, rank) == sum(l.edp_group));
  CHECK(&groups->ReduceGroup(true) == groups->edp.get());
  CHECK(&groups->ReduceGroup(false) == groups->dp.get());
}

TEST_CASE("process groups of every layout of the world") {
  const int world = comm::MpiEnv::world_size();
  for (int tp = 1; tp <= world; ++tp) {
    if (world % tp) continue;
    for (int ep = 1; ep <= world / tp; ++ep) {
      if ((world / tp) % ep) continue;
      CheckGroups(tp, ep);
    }
  }
}

}  // namespace
}  // namespace moe::parallel
