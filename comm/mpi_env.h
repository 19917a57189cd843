// The MPI process environment: initialisation with the thread level the
// communicators need, the world's rank and size, and job-wide abort.
//
// Only comm/ talks to MPI; layers above ask this class for the world and use
// Communicator (comm/communicator.h) for data.
#ifndef MOE_COMM_MPI_ENV_H_
#define MOE_COMM_MPI_ENV_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace moe::comm {

class MpiEnv {
 public:
  // Calls MPI_Init_thread asking for MPI_THREAD_MULTIPLE (progress threads
  // call MPI while the caller computes). Fails with a clear message when the
  // library provides less. Sets the log rank. Idempotent.
  static absl::Status Init(int* argc, char*** argv);
  static bool initialized();
  static int world_rank();
  static int world_size();
  // Ranks of this job on the same node, and this rank's index among them.
  // The launcher's variables name the local rank and the node when present
  // (srun: SLURM_LOCALID, SLURM_NODEID; mpirun: OMPI_COMM_WORLD_LOCAL_RANK);
  // otherwise they come from splitting the world by shared memory. A launcher
  // value that disagrees with the split is logged.
  static int local_size();
  static int local_rank();
  // This rank's node, 0 .. num_nodes() - 1.
  static int node_id();
  static int num_nodes();
  // Where local rank and node came from: "slurm", "openmpi" or "mpi".
  static const char* placement_source();
  // Collective over the world, on the host (the control plane; works before
  // any Communicator exists): every rank's `mine`, indexed by world rank.
  // For small start-up messages (config hashes), not for data.
  static absl::StatusOr<std::vector<std::string>> AllGatherBytes(const std::string& mine);
  // Stops every rank of the job with `code`; never returns.
  [[noreturn]] static void Abort(int code);
  // Collective over the world: stops the watchdog thread (comm/watchdog.h)
  // and the peer probe, then finalizes MPI (a no-op when not initialised).
  // Every communicator should be destroyed before it.
  static void Finalize();
};

// Converts an MPI return code to Status naming the call and where it was made.
absl::Status MpiStatus(int code, const char* call, const char* file, int line);

}  // namespace moe::comm

// MPI_RETURN_IF_ERROR(MPI_Barrier(comm));
#define MPI_RETURN_IF_ERROR(call) RETURN_IF_ERROR(::moe::comm::MpiStatus((call), #call, __FILE__, __LINE__))

#endif  // MOE_COMM_MPI_ENV_H_
