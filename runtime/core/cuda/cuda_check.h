// CUDA and cuBLAS return codes to Status, one conversion point each (like
// NCCL's checks.h), naming the call and where it was made:
//
//   CUDA_RETURN_IF_ERROR(cudaStreamCreate(&s));
//   CUBLAS_RETURN_IF_ERROR(cublasGemmEx(...));
//
// The CUDA plumbing of the runtime (this header, cuda_handles.h) lives in
// runtime/core/cuda; comm/cuda (NCCL) uses it from here. Compiled only with
// MOE_WITH_CUDA.
#ifndef MOE_RUNTIME_CORE_CUDA_CUDA_CHECK_H_
#define MOE_RUNTIME_CORE_CUDA_CUDA_CHECK_H_

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "runtime/core/status.h"

namespace moe::cuda {

absl::Status CudaStatus(cudaError_t code, const char* call, const char* file, int line);
absl::Status CublasStatus(cublasStatus_t code, const char* call, const char* file, int line);

// The number of visible CUDA devices, or FailedPrecondition saying why there is
// none: "no CUDA device" (count 0) or the driver's reason (e.g. "CUDA driver
// version is insufficient for CUDA runtime version": the driver is too old).
// The answer is computed once per process.
absl::StatusOr<int> DeviceCount();

}  // namespace moe::cuda

#define CUDA_RETURN_IF_ERROR(call) RETURN_IF_ERROR(::moe::cuda::CudaStatus((call), #call, __FILE__, __LINE__))
#define CUBLAS_RETURN_IF_ERROR(call) \
  RETURN_IF_ERROR(::moe::cuda::CublasStatus((call), #call, __FILE__, __LINE__))

#endif  // MOE_RUNTIME_CORE_CUDA_CUDA_CHECK_H_
