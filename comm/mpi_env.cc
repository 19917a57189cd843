#include "comm/mpi_env.h"

#include <mpi.h>

#include <cstdint>
#include <cstdlib>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "comm/peer_probe.h"
#include "comm/watchdog.h"
#include "runtime/core/logging.h"
#include "runtime/core/status.h"

namespace moe::comm {
namespace {
int g_local_rank = 0;
int g_local_size = 1;
int g_node_id = 0;
int g_num_nodes = 1;
const char* g_placement_source = "mpi";

// A launcher variable as a non-negative int; -1 when absent or malformed.
int EnvInt(const char* name) {
  const char* v = std::getenv(name);
  int out = -1;
  if (v == nullptr || !absl::SimpleAtoi(v, &out) || out < 0) return -1;
  return out;
}

// Local rank and node: the shared-memory split of the world, then the
// launcher's variables where it sets them.
absl::Status FindPlacement() {
  MPI_Comm local;
  MPI_RETURN_IF_ERROR(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &local));
  MPI_Comm_rank(local, &g_local_rank);
  MPI_Comm_size(local, &g_local_size);
  // Node index: the rank of each node's first rank among the first ranks.
  MPI_Comm leaders;
  MPI_RETURN_IF_ERROR(MPI_Comm_split(MPI_COMM_WORLD, g_local_rank == 0 ? 0 : MPI_UNDEFINED, 0, &leaders));
  int node[2] = {0, 1};
  if (leaders != MPI_COMM_NULL) {
    MPI_Comm_rank(leaders, &node[0]);
    MPI_Comm_size(leaders, &node[1]);
    MPI_Comm_free(&leaders);
  }
  MPI_RETURN_IF_ERROR(MPI_Bcast(node, 2, MPI_INT, 0, local));
  MPI_Comm_free(&local);
  g_node_id = node[0];
  g_num_nodes = node[1];
  int local_rank = EnvInt("SLURM_LOCALID"), node_id = EnvInt("SLURM_NODEID");
  g_placement_source = "slurm";
  if (local_rank < 0) {
    local_rank = EnvInt("OMPI_COMM_WORLD_LOCAL_RANK");
    node_id = -1;
    g_placement_source = "openmpi";
  }
  if (local_rank < 0) {
    g_placement_source = "mpi";
    return absl::OkStatus();
  }
  if (local_rank != g_local_rank || (node_id >= 0 && node_id != g_node_id)) {
    MOE_LOG(WARNING) << "the launcher places this rank on node " << node_id << " as local rank " << local_rank
                     << " (" << g_placement_source << "), shared memory on node " << g_node_id
                     << " as local rank " << g_local_rank << ": using the launcher's";
  }
  g_local_rank = local_rank;
  if (node_id >= 0) g_node_id = node_id;
  return absl::OkStatus();
}
}  // namespace

absl::Status MpiEnv::Init(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    MPI_RETURN_IF_ERROR(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided));
    // Errors come back as codes that MpiStatus turns into messages.
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    if (provided < MPI_THREAD_MULTIPLE) {
      return absl::FailedPreconditionError(
          absl::StrCat("the MPI library provides thread level ", provided,
                       " but moe-runtime needs MPI_THREAD_MULTIPLE (", MPI_THREAD_MULTIPLE,
                       ") for its communication threads; use an Open MPI built with thread support "
                       "(Debian's openmpi-bin is)"));
    }
    SetLogRank(world_rank(), world_size());
    RETURN_IF_ERROR(FindPlacement());
    PeerProbeInit();
  }
  SetLogRank(world_rank(), world_size());
  return absl::OkStatus();
}

bool MpiEnv::initialized() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

int MpiEnv::world_rank() {
  int rank = 0;
  if (initialized()) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

int MpiEnv::world_size() {
  int size = 1;
  if (initialized()) MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

int MpiEnv::local_rank() { return g_local_rank; }
int MpiEnv::local_size() { return g_local_size; }
int MpiEnv::node_id() { return g_node_id; }
int MpiEnv::num_nodes() { return g_num_nodes; }
const char* MpiEnv::placement_source() { return g_placement_source; }

absl::StatusOr<std::vector<std::string>> MpiEnv::AllGatherBytes(const std::string& mine) {
  if (!initialized()) return std::vector<std::string>{mine};
  const int size = world_size();
  int my_len = static_cast<int>(mine.size());
  std::vector<int> lens(size), displs(size);
  MPI_RETURN_IF_ERROR(MPI_Allgather(&my_len, 1, MPI_INT, lens.data(), 1, MPI_INT, MPI_COMM_WORLD));
  int64_t total = 0;
  for (int r = 0; r < size; ++r) {
    if (lens[r] < 0 || total + lens[r] > (int64_t{1} << 30)) {
      return absl::InvalidArgumentError(
          absl::StrCat("AllGatherBytes: rank ", r, " announced ", lens[r], " bytes (at most 1 GiB in all)"));
    }
    displs[r] = static_cast<int>(total);
    total += lens[r];
  }
  std::string all(static_cast<size_t>(total), '\0');
  MPI_RETURN_IF_ERROR(MPI_Allgatherv(mine.data(), my_len, MPI_CHAR, all.data(), lens.data(), displs.data(),
                                     MPI_CHAR, MPI_COMM_WORLD));
  std::vector<std::string> out(size);
  for (int r = 0; r < size; ++r) out[r] = all.substr(displs[r], lens[r]);
  return out;
}

void MpiEnv::Abort(int code) {
  if (initialized()) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

void MpiEnv::Finalize() {
  // In this order: the watchdog thread (which probes peers, answers their
  // probes and may abort) is stopped and joined, then the probe communicator
  // is retired, then MPI goes. Nothing of comm/ calls MPI during or after
  // MPI_Finalize.
  WatchdogShutdown();
  PeerProbeShutdown();
  if (initialized()) MPI_Finalize();
}

absl::Status MpiStatus(int code, const char* call, const char* file, int line) {
  if (code == MPI_SUCCESS) return absl::OkStatus();
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) len = 0;
  return absl::InternalError(absl::StrCat("MPI error ", code, " (", std::string(text, len), ") in ", call,
                                          " at ", SourceLocation(file, line)));
}

}  // namespace moe::comm
