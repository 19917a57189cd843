// NCCL return codes to Status, naming the call and where it was made:
//
//   NCCL_RETURN_IF_ERROR(ncclAllReduce(...));
//
// CUDA's own checks and RAII handles are runtime/core/cuda's (cuda_check.h,
// cuda_handles.h). Compiled only with MOE_WITH_CUDA.
#ifndef MOE_COMM_CUDA_NCCL_CHECK_H_
#define MOE_COMM_CUDA_NCCL_CHECK_H_

#include <nccl.h>

#include "absl/status/status.h"
#include "runtime/core/status.h"

namespace moe::comm {

absl::Status NcclStatus(ncclResult_t code, const char* call, const char* file, int line);

}  // namespace moe::comm

#define NCCL_RETURN_IF_ERROR(call) RETURN_IF_ERROR(::moe::comm::NcclStatus((call), #call, __FILE__, __LINE__))

#endif  // MOE_COMM_CUDA_NCCL_CHECK_H_
