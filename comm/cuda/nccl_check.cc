#include "comm/cuda/nccl_check.h"

#include <cuda_runtime_api.h>

#include "absl/strings/str_cat.h"
#include "comm/args_check.h"

namespace moe::comm {

absl::Status NcclStatus(ncclResult_t code, const char* call, const char* file, int line) {
  if (code == ncclSuccess || code == ncclInProgress) return absl::OkStatus();
  const char* last = ncclGetLastError(nullptr);
  return absl::InternalError(absl::StrCat("NCCL error ", static_cast<int>(code), " (",
                                          ncclGetErrorString(code),
                                          last && *last ? absl::StrCat("; ", last) : std::string(), ") in ",
                                          call, " at ", SourceLocation(file, line)));
}

// With CUDA built in, pointers are classified by the runtime. Without a
// visible device every pointer is host memory.
Device PointerDevice(const void* ptr) {
  static const bool has_device = [] {
    int n = 0;
    bool ok = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
    cudaGetLastError();
    return ok;
  }();
  if (!has_device || ptr == nullptr) return Device::Cpu();
  cudaPointerAttributes attr;
  if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
    cudaGetLastError();
    return Device::Cpu();
  }
  if (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged)
    return Device::Cuda(attr.device);
  return Device::Cpu();
}

}  // namespace moe::comm
