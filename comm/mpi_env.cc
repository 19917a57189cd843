#include "comm/mpi_env.h"

#include <mpi.h>

#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "runtime/core/logging.h"
#include "runtime/core/status.h"

namespace moe::comm {
namespace {
int g_local_rank = 0;
int g_local_size = 1;
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
    MPI_Comm local;
    MPI_RETURN_IF_ERROR(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &local));
    MPI_Comm_rank(local, &g_local_rank);
    MPI_Comm_size(local, &g_local_size);
    MPI_Comm_free(&local);
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

void MpiEnv::Abort(int code) {
  if (initialized()) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

void MpiEnv::Finalize() {
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
