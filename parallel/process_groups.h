// ProcessGroups: the communicators of one rank's groups, passed explicitly
// (like Megatron's ProcessGroupCollection), never held in globals.
//
//   ASSIGN_OR_RETURN(auto world, comm::CreateWorldCommunicator(options));
//   ASSIGN_OR_RETURN(ProcessGroups groups, CreateProcessGroups(std::move(world), tp, ep));
//   groups.ep->AllToAllV(...);      // token exchange among the EP group
//   groups.edp->AllReduce(...);     // expert gradients
//
//   groups.host.world->AllReduce(&stop, &stop, 1, DType::kI32, ReduceOp::kMax);  // control plane
//
// Collective: every rank of the world calls CreateProcessGroups with the same
// (tp, ep). Group ranks follow parallel/layout.h: groups.tp->rank() ==
// layout.tp_rank, and so on.
#ifndef MOE_PARALLEL_PROCESS_GROUPS_H_
#define MOE_PARALLEL_PROCESS_GROUPS_H_

#include <memory>

#include "absl/status/statusor.h"
#include "comm/communicator.h"
#include "parallel/layout.h"

namespace moe::parallel {

struct ProcessGroups {
  RankLayout layout;
  std::unique_ptr<comm::Communicator> world;
  std::unique_ptr<comm::Communicator> tp;   // tensor-parallel group
  std::unique_ptr<comm::Communicator> dp;   // data-parallel group (dense gradients)
  std::unique_ptr<comm::Communicator> ep;   // expert-parallel group (token exchange)
  std::unique_ptr<comm::Communicator> edp;  // expert-data-parallel group (expert gradients)
  // A second communicator over the EP group, so that expert weights move
  // peer-to-peer (LLEP) concurrently with the token all-to-all.
  std::unique_ptr<comm::Communicator> ep_p2p;

  // The control plane: MPI communicators on host buffers over the same
  // groups, for small host-side agreements (metrics sums, stop agreement,
  // checkpoint metadata, error agreement). Apart from the data plane (the
  // device's communicator above: NCCL for cuda, MPI for cpu), so host
  // collectives never queue behind, or wait on, device transfers, and work
  // where NCCL takes device buffers only.
  struct Host {
    std::unique_ptr<comm::Communicator> world, dp, ep;
  } host;

  // The group that reduces gradients of `kind` parameters (DP or EDP).
  comm::Communicator& ReduceGroup(bool expert) const { return expert ? *edp : *dp; }
};

absl::StatusOr<ProcessGroups> CreateProcessGroups(std::unique_ptr<comm::Communicator> world, int tp, int ep);

}  // namespace moe::parallel

#endif  // MOE_PARALLEL_PROCESS_GROUPS_H_
