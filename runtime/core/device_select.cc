#include "runtime/core/device_select.h"

#include "absl/strings/str_cat.h"
#include "runtime/core/backend.h"
#include "runtime/core/status.h"
#if MOE_WITH_CUDA
#include "runtime/core/cuda/cuda_backend.h"
#include "runtime/core/cuda/cuda_check.h"
#endif

namespace moe {

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
    cuda::DevicePlacement p = cuda::LocalRankDevice(count);
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
