// Errors across module boundaries: absl::Status / absl::StatusOr<T>.
//
// The Debian 12 Abseil (20220623) has no RETURN_IF_ERROR / ASSIGN_OR_RETURN, so
// they are defined here, once. Foreign error codes (MPI, NCCL, CUDA, cuBLAS,
// HDF5) are converted to Status in exactly one place per library, in the layer
// that owns that library; each conversion names the call and its file:line.
#ifndef MOE_RUNTIME_CORE_STATUS_H_
#define MOE_RUNTIME_CORE_STATUS_H_

#include <string>
#include "absl/strings/string_view.h"

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

#define MOE_STATUS_CONCAT_INNER_(a, b) a##b
#define MOE_STATUS_CONCAT_(a, b) MOE_STATUS_CONCAT_INNER_(a, b)

// Returns from the enclosing function when `expr` (a Status) is not OK.
#define RETURN_IF_ERROR(expr)                                    \
  do {                                                           \
    ::absl::Status moe_status_ = (expr);                         \
    if (!moe_status_.ok()) return moe_status_;                   \
  } while (0)

// ASSIGN_OR_RETURN(auto x, MakeX()); returns the error status when not OK.
#define ASSIGN_OR_RETURN(lhs, expr)                                            \
  MOE_ASSIGN_OR_RETURN_IMPL_(MOE_STATUS_CONCAT_(moe_statusor_, __LINE__), lhs, \
                             expr)
#define MOE_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                               \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()

namespace moe {

// Prefixes `context` to the message of a non-OK status, keeping its code.
absl::Status Annotate(const absl::Status& status, absl::string_view context);

// "file.cc:123" for error messages that name where a foreign call failed.
std::string SourceLocation(const char* file, int line);

}  // namespace moe

#endif  // MOE_RUNTIME_CORE_STATUS_H_
