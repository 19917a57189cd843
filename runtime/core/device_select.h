// The device a rank trains on, from train.device:
//   "cpu"     the CPU backend
//   "cuda"    the GPU of this rank's local rank (Open MPI OMPI_COMM_WORLD_LOCAL_RANK,
//             Slurm SLURM_LOCALID, MPICH MPI_LOCALRANKID) modulo the visible devices
//   "cuda:N"  device N
// `how` receives one line for the start-up log ("cuda:1 (OMPI_COMM_WORLD_LOCAL_RANK=1 -> cuda:1 of 8)").
// A CUDA device in a build without CUDA, or on a machine without a usable GPU
// (none, or the driver too old), is FailedPrecondition naming the reason.
#ifndef MOE_RUNTIME_CORE_DEVICE_SELECT_H_
#define MOE_RUNTIME_CORE_DEVICE_SELECT_H_

#include <string>

#include "absl/status/statusor.h"
#include "runtime/core/dtype.h"

namespace moe {

absl::StatusOr<Device> ResolveDevice(const std::string& text, std::string* how);

struct DevicePlacement {
  int device = 0;
  std::string source;  // "OMPI_COMM_WORLD_LOCAL_RANK=3 -> cuda:3 of 8"
};
// This process's GPU among `device_count`: the launcher's local rank (the
// first set of OMPI_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID, MPI_LOCALRANKID)
// modulo device_count; cuda:0 when none is set. Pure: reads only the environment.
DevicePlacement LocalRankDevice(int device_count);

// Whether this build has the CUDA backend (MOE_WITH_CUDA).
bool BuiltWithCuda();

}  // namespace moe

#endif  // MOE_RUNTIME_CORE_DEVICE_SELECT_H_
