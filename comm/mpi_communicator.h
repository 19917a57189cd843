// The MPI backend of Communicator (host buffers).
//
// Each communicator owns a duplicate of its MPI communicator and one progress
// thread. Calls enqueue; the thread takes operations in order, starts them
// with nonblocking MPI (MPI_Iallreduce, MPI_Ibcast, MPI_Iallgather,
// MPI_Ireduce_scatter_block, MPI_Ibarrier; AllToAll(V), AllGatherV and P2P as
// MPI_Irecv/MPI_Isend to every peer) and polls them with MPI_Testall until
// done, so transfers progress while the caller computes. Element counts or
// displacements above MpiCountLimit() (INT_MAX, the most one MPI call takes)
// are split into several calls of at most that many elements.
#ifndef MOE_COMM_MPI_COMMUNICATOR_H_
#define MOE_COMM_MPI_COMMUNICATOR_H_

#include <cstddef>
#include <memory>

#include "absl/status/statusor.h"
#include "comm/communicator.h"

namespace moe::comm {

// A communicator over MPI_COMM_WORLD (duplicated). Collective over the world.
absl::StatusOr<std::unique_ptr<Communicator>> CreateMpiWorldCommunicator(const CommOptions& options);

// The largest element count or displacement passed to one MPI call.
size_t MpiCountLimit();
// Tests lower it to exercise the splitting with small buffers. Every rank must
// set the same value while no operation is running. 0 restores INT_MAX.
void SetMpiCountLimitForTesting(size_t limit);

}  // namespace moe::comm

#endif  // MOE_COMM_MPI_COMMUNICATOR_H_
