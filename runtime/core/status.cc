#include "runtime/core/status.h"

namespace moe {

absl::Status Annotate(const absl::Status& status, absl::string_view context) {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat(context, ": ", status.message()));
}

std::string SourceLocation(const char* file, int line) {
  absl::string_view path(file);
  // Keep the path from the repository's top folder on, not the build machine's.
  for (absl::string_view top : {"runtime/", "comm/", "parallel/", "model/", "optim/",
                               "data/", "launch/", "tests/"}) {
    size_t pos = path.rfind(top);
    if (pos != absl::string_view::npos &&
        (pos == 0 || path[pos - 1] == '/')) {
      path = path.substr(pos);
      break;
    }
  }
  return absl::StrCat(path, ":", line);
}

}  // namespace moe
