#include "parallel/process_groups.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "runtime/core/status.h"

namespace moe::parallel {

absl::StatusOr<ProcessGroups> CreateProcessGroups(std::unique_ptr<comm::Communicator> world, int tp, int ep) {
  ProcessGroups g;
  ASSIGN_OR_RETURN(g.layout, ComputeLayout(world->size(), tp, ep, world->rank()));
  const RankLayout& l = g.layout;
  // Keys are the ranks' positions in their groups, so group rank == layout rank.
  ASSIGN_OR_RETURN(g.tp, world->Split(l.tp_group_id, l.tp_rank, absl::StrCat("tp", l.tp_group_id)));
  ASSIGN_OR_RETURN(g.dp, world->Split(l.dp_group_id, l.dp_rank, absl::StrCat("dp", l.dp_group_id)));
  ASSIGN_OR_RETURN(g.ep, world->Split(l.ep_group_id, l.ep_rank, absl::StrCat("ep", l.ep_group_id)));
  ASSIGN_OR_RETURN(g.edp, world->Split(l.edp_group_id, l.edp_rank, absl::StrCat("edp", l.edp_group_id)));
  ASSIGN_OR_RETURN(g.ep_p2p, world->Split(l.ep_group_id, l.ep_rank, absl::StrCat("ep_p2p", l.ep_group_id)));
  // Control plane: an MPI world of its own (a split when the data plane is
  // MPI, so a wrapped world's link shaping and faults apply to it too).
  if (std::string(world->backend_name()) == "mpi") {
    ASSIGN_OR_RETURN(g.host.world, world->Split(0, l.rank, "host"));
  } else {
    comm::CommOptions host = world->options();
    host.name = "host";
    host.backend = "mpi";
    host.device = Device::Cpu();
    ASSIGN_OR_RETURN(g.host.world, comm::CreateWorldCommunicator(host));
  }
  ASSIGN_OR_RETURN(g.host.dp,
                   g.host.world->Split(l.dp_group_id, l.dp_rank, absl::StrCat("host_dp", l.dp_group_id)));
  ASSIGN_OR_RETURN(g.host.ep,
                   g.host.world->Split(l.ep_group_id, l.ep_rank, absl::StrCat("host_ep", l.ep_group_id)));
  g.world = std::move(world);
  if (g.tp->rank() != l.tp_rank || g.dp->rank() != l.dp_rank || g.ep->rank() != l.ep_rank ||
      g.edp->rank() != l.edp_rank) {
    return absl::InternalError(
        absl::StrCat("process groups disagree with the layout on world rank ", l.rank));
  }
  return g;
}

}  // namespace moe::parallel
