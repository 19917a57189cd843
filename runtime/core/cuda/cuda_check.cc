#include "runtime/core/cuda/cuda_check.h"

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace moe::cuda {
namespace {
std::string Where(const char* call, const char* file, int line) {
  return absl::StrCat(" in ", call, " at ", SourceLocation(file, line));
}
}  // namespace

absl::Status CudaStatus(cudaError_t code, const char* call, const char* file, int line) {
  if (code == cudaSuccess) return absl::OkStatus();
  cudaGetLastError();  // clear the sticky-until-read error of this thread
  return absl::InternalError(absl::StrCat("CUDA error ", static_cast<int>(code), " (", cudaGetErrorName(code),
                                          ": ", cudaGetErrorString(code), ")", Where(call, file, line)));
}

absl::Status CublasStatus(cublasStatus_t code, const char* call, const char* file, int line) {
  if (code == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("cuBLAS error ", static_cast<int>(code), " (",
                                          cublasGetStatusName(code), ": ", cublasGetStatusString(code), ")",
                                          Where(call, file, line)));
}

absl::StatusOr<int> DeviceCount() {
  static const absl::StatusOr<int> count = []() -> absl::StatusOr<int> {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
      cudaGetLastError();
      return absl::FailedPreconditionError(
          absl::StrCat("no usable CUDA device: ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")"));
    }
    if (n == 0) return absl::FailedPreconditionError("no CUDA device: cudaGetDeviceCount found none");
    return n;
  }();
  return count;
}

}  // namespace moe::cuda
