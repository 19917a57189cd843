// Multi-rank helpers: process groups for a layout over the MPI world, and the
// synthetic sharded "model" the clipping and ZeRO-1 tests use.
#ifndef MOE_TESTS_OPTIM_MPI_TEST_UTIL_H_
#define MOE_TESTS_OPTIM_MPI_TEST_UTIL_H_

#include <catch2/catch.hpp>
#include <memory>
#include <string>

#include "comm/communicator.h"
#include "optim_test_util.h"
#include "parallel/process_groups.h"

namespace moe::optim::testing {

inline parallel::ProcessGroups MakeGroups(int tp, int ep) {
  comm::CommOptions options;
  options.backend = "mpi";
  options.timeout_s = 120;
  auto world = comm::CreateWorldCommunicator(options);
  REQUIRE(world.ok());
  auto groups = parallel::CreateProcessGroups(std::move(*world), tp, ep);
  INFO(groups.status().ToString());
  REQUIRE(groups.ok());
  return std::move(*groups);
}

// TP split of `dim` of `global_shape` for this rank.
inline parallel::ShardSpec TpShard(const Shape& global_shape, int dim, const parallel::RankLayout& l,
                                   parallel::ShardSpec s = {}) {
  const int64_t n = global_shape[dim] / l.tp;
  s.tp_dim = dim;
  s.tp_begin = l.tp_rank * n;
  s.tp_end = (l.tp_rank + 1) * n;
  return s;
}

// Experts of this rank's EP slot.
inline parallel::ShardSpec ExpertShard(const Shape& global_shape, const parallel::RankLayout& l) {
  parallel::ShardSpec s;
  const int64_t n = global_shape[0] / l.ep;
  s.expert_begin = l.ep_rank * n;
  s.expert_end = (l.ep_rank + 1) * n;
  return s;
}

// A model with every kind of parameter: dense TP-column, TP-row and
// TP-replicated (norm, router, embedding) ones; expert ones TP-sharded and
// TP-replicated; dense and expert entries interleaved; odd sizes so that ZeRO-1
// slices cut parameters in the middle. Values from GlobalValue(salt 0).
inline void BuildModel(TestModel& m, const parallel::RankLayout& l) {
  using parallel::ParamKind;
  const Shape embed{11, 6}, col{10, 6}, row{6, 10}, norm{6}, router{4, 6}, up{4, 6, 5}, down{4, 5, 3},
      last{7};
  m.Add("embed", embed, ParamKind::kDense, {}, /*weight_decay=*/false);
  m.Add("col", col, ParamKind::kDense, TpShard(col, 0, l));
  m.Add("experts.up", up, ParamKind::kExpert, TpShard(up, 1, l, ExpertShard(up, l)));
  m.Add("norm", norm, ParamKind::kDense, {}, /*weight_decay=*/false);
  m.Add("row", row, ParamKind::kDense, TpShard(row, 1, l));
  m.Add("router", router, ParamKind::kDense, {});
  m.Add("experts.down", down, ParamKind::kExpert, ExpertShard(down, l));
  m.Add("last", last, ParamKind::kDense, {});
  for (auto& p : m.owned) FillShard(*p, p->value, 0);
}

}  // namespace moe::optim::testing

#endif  // MOE_TESTS_OPTIM_MPI_TEST_UTIL_H_
