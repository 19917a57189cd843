#include "comm/cuda/nccl_check.h"

#include "absl/strings/str_cat.h"

namespace moe::comm {

absl::Status NcclStatus(ncclResult_t code, const char* call, const char* file, int line) {
  if (code == ncclSuccess || code == ncclInProgress) return absl::OkStatus();
  const char* last = ncclGetLastError(nullptr);
  return absl::InternalError(absl::StrCat("NCCL error ", static_cast<int>(code), " (",
                                          ncclGetErrorString(code),
                                          last && *last ? absl::StrCat("; ", last) : std::string(), ") in ",
                                          call, " at ", SourceLocation(file, line)));
}

}  // namespace moe::comm
