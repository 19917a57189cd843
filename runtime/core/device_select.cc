#include "runtime/core/device_select.h"

#include <algorithm>
#include <cstdlib>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "runtime/core/backend.h"
#include "runtime/core/status.h"
#if MOE_WITH_CUDA
#include "runtime/core/cuda/cuda_backend.h"
#include "runtime/core/cuda/cuda_check.h"
#endif

namespace moe {

DevicePlacement LocalRankDevice(int device_count) {
  for (const char* var : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID"}) {
    const char* v = std::getenv(var);
    int local = 0;
    if (v == nullptr || !absl::SimpleAtoi(v, &local) || local < 0) continue;
    const int device = local % std::max(device_count, 1);
    return {device, absl::StrCat(var, "=", v, " -> cuda:", device, " of ", device_count)};
  }
  return {0, absl::StrCat("no local rank variable (OMPI_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID) -> cuda:0 of ",
                          device_count)};
}

bool BuiltWithCuda() {
#if MOE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

absl::StatusOr<Device> ResolveDevice(const std::string& text, std::string* how) {
  ASSIGN_OR_RETURN(Device device, ParseDevice(text));
  if (device.is_cpu()) {
    if (how != nullptr) *how = "cpu";
    return device;
  }
#if MOE_WITH_CUDA
  ASSIGN_OR_RETURN(int count, cuda::DeviceCount());
  if (text == "cuda") {
    DevicePlacement p = LocalRankDevice(count);
    device = Device::Cuda(p.device);
    if (how != nullptr) *how = absl::StrCat(device.ToString(), " (", p.source, ")");
  } else if (how != nullptr) {
    *how = absl::StrCat(device.ToString(), " (train.device; ", count, " visible)");
  }
  return device;
#else
  return absl::FailedPreconditionError(
      absl::StrCat("train.device = \"", text,
                   "\": this build has no CUDA backend (configure with -DMOE_WITH_CUDA=ON on a machine with "
                   "the CUDA toolkit and NCCL), or set train.device = \"cpu\""));
#endif
}

}  // namespace moe
