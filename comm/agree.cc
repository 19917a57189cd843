#include "comm/agree.h"

#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "runtime/core/status.h"

namespace moe::comm {
namespace {

constexpr size_t kMessageBytes = 4096;

absl::Status Await(absl::StatusOr<Work> work) {
  if (!work.ok()) return work.status();
  return work->Wait();
}

}  // namespace

absl::Status AgreeOnStatus(Communicator& comm, const absl::Status& local, absl::Status* agreed) {
  *agreed = local;
  if (comm.size() == 1) return absl::OkStatus();
  int32_t first = local.ok() ? comm.size() : comm.rank();
  RETURN_IF_ERROR(Await(comm.AllReduce(&first, &first, 1, DType::kI32, ReduceOp::kMin)));
  if (first == comm.size()) return absl::OkStatus();
  std::vector<char> message(kMessageBytes, 0);
  int32_t code = 0;
  if (comm.rank() == first) {
    const std::string m = std::string(local.message()).substr(0, kMessageBytes - 1);
    std::memcpy(message.data(), m.data(), m.size());
    code = static_cast<int32_t>(local.code());
  }
  RETURN_IF_ERROR(Await(comm.Broadcast(message.data(), message.data(), kMessageBytes, DType::kU8, first)));
  RETURN_IF_ERROR(Await(comm.Broadcast(&code, &code, 1, DType::kI32, first)));
  *agreed =
      absl::Status(static_cast<absl::StatusCode>(code), absl::StrCat("rank ", first, ": ", message.data()));
  return absl::OkStatus();
}

}  // namespace moe::comm
