#include "runtime/startup_checks.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "runtime/core/logging.h"
#include "runtime/core/memory_model.h"

namespace moe {
namespace {

std::string Gib(double bytes) { return absl::StrFormat("%.2f GiB", bytes / double(int64_t{1} << 30)); }

// The first line of `path` as an integer; -1 when unreadable or "max".
int64_t ReadInt64File(const char* path) {
  std::ifstream in(path);
  std::string text;
  int64_t v = -1;
  if (!(in >> text) || !absl::SimpleAtoi(text, &v)) return -1;
  return v;
}

}  // namespace

int64_t AvailableMemoryBytes() {
  int64_t available = -1;
  std::ifstream meminfo("/proc/meminfo");
  std::string line;
  while (std::getline(meminfo, line)) {
    absl::string_view rest = line;
    if (absl::ConsumePrefix(&rest, "MemAvailable:")) {
      rest = absl::StripAsciiWhitespace(rest);
      absl::ConsumeSuffix(&rest, " kB");
      int64_t kb = 0;
      if (absl::SimpleAtoi(rest, &kb)) available = kb * 1024;
      break;
    }
  }
  // cgroup v2 limit of this container (a batch job's allocation).
  const int64_t max = ReadInt64File("/sys/fs/cgroup/memory.max");
  const int64_t current = ReadInt64File("/sys/fs/cgroup/memory.current");
  if (max > 0 && current >= 0) {
    const int64_t left = std::max<int64_t>(0, max - current);
    available = available < 0 ? left : std::min(available, left);
  }
  return available;
}

absl::Status CheckMemoryFits(const JobConfig& config, int ranks_on_node, int64_t available_bytes) {
  if (available_bytes < 0) return absl::OkStatus();  // nothing to compare with
  const auto& m = config.model();
  // The predictor counts in int64 bytes; a model whose weights alone exceed
  // 2^60 bytes is reported from a floating-point count instead.
  const double d = m.hidden_size(), L = m.num_layers(), V = m.vocab_size();
  const double weights =
      4.0 * (2 * V * d + L * (4 * d * d + 3.0 * m.moe().num_experts() * m.moe().expert_ffn_hidden_size() * d +
                              3.0 * m.ffn_hidden_size() * d));
  if (weights > double(int64_t{1} << 60)) {
    return absl::ResourceExhaustedError(absl::StrCat("the model does not fit: its weights alone need about ",
                                                     Gib(weights), " (model.hidden_size = ", m.hidden_size(),
                                                     ", model.num_layers = ", m.num_layers(),
                                                     ") and this node has ", Gib(available_bytes),
                                                     " available; lower model.hidden_size / model.num_layers "
                                                     "or add ranks (parallel.tensor, parallel.expert)"));
  }
  absl::StatusOr<MemoryPrediction> p = PredictPeakMemory(config);
  if (!p.ok()) return p.status();
  const double need = double(p->peak_bytes) * std::max(ranks_on_node, 1);
  if (need <= double(available_bytes)) return absl::OkStatus();
  std::vector<MemoryTerm> terms = p->terms;
  std::sort(terms.begin(), terms.end(),
            [](const MemoryTerm& a, const MemoryTerm& b) { return a.bytes > b.bytes; });
  std::string largest;
  for (size_t i = 0; i < terms.size() && i < 3; ++i) {
    absl::StrAppend(&largest, "\n    ", Gib(terms[i].bytes), "  ", terms[i].name);
  }
  return absl::ResourceExhaustedError(absl::StrCat(
      "the job does not fit in memory: predicted peak ", Gib(p->peak_bytes), " per rank x ", ranks_on_node,
      " ranks on this node = ", Gib(need), ", but ", Gib(available_bytes),
      " is available; lower train.micro_batch, model.seq_len or the model size, or raise parallel.tensor / "
      "parallel.expert (parallel.expert_tensor_parallel: true also divides the experts by parallel.tensor). "
      "Largest terms per rank:",
      largest));
}

absl::Status ProbeWritableDirectory(const std::string& dir, const char* field) {
  auto fail = [&](const std::string& why) {
    return absl::FailedPreconditionError(
        absl::StrCat(field, " = '", dir, "' is not usable: ", why,
                     "; name a writable directory (it is created when missing)"));
  };
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return fail(absl::StrCat("cannot create it (", ec.message(), ")"));
  if (!std::filesystem::is_directory(dir, ec)) return fail("it is not a directory");
  const std::string probe = absl::StrCat(dir, "/.moe-probe.", ::getpid());
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return fail(absl::StrCat("cannot create a file in it (", std::strerror(errno), ")"));
  const char byte = 0;
  const bool wrote = ::write(fd, &byte, 1) == 1;
  const int write_errno = errno;
  ::close(fd);
  ::unlink(probe.c_str());
  if (!wrote) return fail(absl::StrCat("cannot write a file in it (", std::strerror(write_errno), ")"));
  return absl::OkStatus();
}

absl::StatusOr<DirectoryLock> DirectoryLock::Acquire(const std::string& dir, const char* field) {
  const std::string path = dir + "/.lock";
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    return absl::FailedPreconditionError(absl::StrCat(field, " = '", dir, "': cannot open its lock file ",
                                                      path, " (", std::strerror(errno), ")"));
  }
  DirectoryLock lock(fd);
  // What the file says: the last holder's "host pid start-time".
  std::string holder(256, '\0');
  const ssize_t n = ::pread(fd, holder.data(), holder.size(), 0);
  holder.resize(n > 0 ? static_cast<size_t>(n) : 0);
  holder = std::string(absl::StripAsciiWhitespace(holder));
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    if (errno != EWOULDBLOCK) {
      return absl::FailedPreconditionError(
          absl::StrCat(field, " = '", dir, "': cannot lock ", path, " (", std::strerror(errno), ")"));
    }
    return absl::FailedPreconditionError(absl::StrCat(
        field, " = '", dir, "' is in use by another job (", holder.empty() ? "holder unknown" : holder,
        "); two jobs must not share a checkpoint directory: give this one another ", field,
        " or stop the other job"));
  }
  if (!holder.empty()) {
    MOE_LOG(INFO) << field << ": taking over the lock " << path << " left by a job that ended (" << holder
                  << ")";
  }
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  const std::string mine =
      absl::StrCat("host ", host, " pid ", ::getpid(), " since ",
                   absl::FormatTime("%Y-%m-%d %H:%M:%S UTC", absl::Now(), absl::UTCTimeZone()), "\n");
  if (::ftruncate(fd, 0) != 0 ||
      ::pwrite(fd, mine.data(), mine.size(), 0) != static_cast<ssize_t>(mine.size())) {
    return absl::FailedPreconditionError(absl::StrCat(field, " = '", dir, "': cannot write its lock file ",
                                                      path, " (", std::strerror(errno), ")"));
  }
  return lock;
}

DirectoryLock& DirectoryLock::operator=(DirectoryLock&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = other.fd_;
    other.fd_ = -1;
  }
  return *this;
}

DirectoryLock::~DirectoryLock() {
  if (fd_ >= 0) ::close(fd_);  // releases the flock
}

}  // namespace moe
