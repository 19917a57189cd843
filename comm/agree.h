// One outcome for every rank of a group, on the control plane (host buffers):
// after a step that can fail on some ranks only (a read of a file that another
// process truncated, a checkpoint write), every rank calls
//
//   absl::Status agreed;
//   RETURN_IF_ERROR(comm::AgreeOnStatus(*groups.host.world, local, &agreed));
//   if (!agreed.ok()) ...  // every rank of the group is here with the same status
//
// and gets in *agreed OK when every rank's `local` was OK, else the status of
// the lowest failing rank ("rank 1: <its message>" when the group has several
// ranks) with its code. The returned status is the agreement's own failure (a
// communicator error), which the ranks have not agreed on. So every rank stops at the same point with the
// same message instead of one rank returning while the others wait in the next collective. Cost: one 4-byte
// AllReduce (one host wait); two Broadcasts only on failure.
#ifndef MOE_COMM_AGREE_H_
#define MOE_COMM_AGREE_H_

#include "absl/status/status.h"
#include "comm/communicator.h"

namespace moe::comm {

// `comm` must be a host (control-plane) communicator; every rank of it calls
// this collectively. A group of one rank returns `local` without communicating.
// Messages longer than 4095 bytes are cut.
absl::Status AgreeOnStatus(Communicator& comm, const absl::Status& local, absl::Status* agreed);

}  // namespace moe::comm

#endif  // MOE_COMM_AGREE_H_
