// CUDA and NCCL return codes to Status, one conversion point each (like
// NCCL's checks.h), naming the call and where it was made:
//
//   CUDA_RETURN_IF_ERROR(cudaStreamCreate(&s));
//   NCCL_RETURN_IF_ERROR(ncclAllReduce(...));
//
// Compiled only with MOE_WITH_CUDA.
#ifndef MOE_COMM_CUDA_CUDA_CHECK_H_
#define MOE_COMM_CUDA_CUDA_CHECK_H_

#include <cuda_runtime_api.h>
#include <nccl.h>

#include "absl/status/status.h"
#include "runtime/core/status.h"

namespace moe::comm {

absl::Status CudaStatus(cudaError_t code, const char* call, const char* file, int line);
absl::Status NcclStatus(ncclResult_t code, const char* call, const char* file, int line);

}  // namespace moe::comm

#define CUDA_RETURN_IF_ERROR(call) RETURN_IF_ERROR(::moe::comm::CudaStatus((call), #call, __FILE__, __LINE__))
#define NCCL_RETURN_IF_ERROR(call) RETURN_IF_ERROR(::moe::comm::NcclStatus((call), #call, __FILE__, __LINE__))

#endif  // MOE_COMM_CUDA_CUDA_CHECK_H_
