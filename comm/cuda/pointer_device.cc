// comm/args_check.h's PointerDevice for a build with CUDA (a build without it
// has every pointer in host memory: args_check.cc). Kept apart from the NCCL
// code so that the CPU suite's emulation of the CUDA runtime
// (tests/core/cuda_emulation.h) compiles it too.
#include <cuda_runtime_api.h>

#include "comm/args_check.h"

namespace moe::comm {

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
