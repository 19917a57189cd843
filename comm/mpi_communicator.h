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
//
// Small operations skip the hand-off. When the communicator is idle (nothing
// queued or running) and an operation moves at most 64 KiB per rank, is not
// waiting for a worker stream's marker and has no fault hook (comm_wrapper.h),
// Submit starts it on the calling thread: it posts the nonblocking calls,
// tests once and returns (it never waits for the peers). Whoever then waits on
// or tests its Work (the caller, the stream item that waits for it, or the
// progress thread when later operations are queued behind it or the
// communicator is destroyed) polls it to the end. Operations still run one at
// a time in enqueue order; a 1 KiB collective costs about one MPI call instead
// of two thread wake-ups. An operation on an inline stream needs no marker
// (everything before it has run) and takes the same path; on a worker stream
// it waits for the stream's marker on the progress thread as before.
#ifndef MOE_COMM_MPI_COMMUNICATOR_H_
#define MOE_COMM_MPI_COMMUNICATOR_H_

#include <cstddef>
#include <cstdint>
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

// How many operations this process started on the enqueuing thread (the
// direct path above), for tests and benchmarks.
uint64_t MpiDirectOpCount();

}  // namespace moe::comm

#endif  // MOE_COMM_MPI_COMMUNICATOR_H_
