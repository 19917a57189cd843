// Checks a job makes before any work, each returning the problem as a message
// that names the field, the value and the fix (empty / OK when there is none).
// moe-train runs them after the config resolves and before the communicator
// exists, gathers every rank's verdict over the control plane and stops every
// rank with exit code 2 when any rank has a problem.
#ifndef MOE_RUNTIME_STARTUP_CHECKS_H_
#define MOE_RUNTIME_STARTUP_CHECKS_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "runtime/core/config.h"

namespace moe {

// Bytes this process may still allocate: the smaller of /proc/meminfo's
// MemAvailable and the cgroup's memory.max - memory.current (when limited).
// -1 when neither can be read.
int64_t AvailableMemoryBytes();

// Compares PredictPeakMemory (runtime/core/memory_model.h) of one rank times
// `ranks_on_node` with `available_bytes` (AvailableMemoryBytes when < 0 is not
// passed). ResourceExhausted with the estimate, the memory available and the
// largest terms when the job cannot fit.
absl::Status CheckMemoryFits(const JobConfig& config, int ranks_on_node, int64_t available_bytes);

// Creates `dir` (and parents) when missing, then creates, writes and removes a
// probe file in it: a directory that is not writable, not a directory or has
// a name too long is found now instead of at the first save.
// `field` names the config field in the message ("checkpoint.dir").
absl::Status ProbeWritableDirectory(const std::string& dir, const char* field);

// An exclusive lock on a directory for the life of the job, so that two jobs
// never share one checkpoint.dir (one would delete the other's in-progress
// save as "left by an unfinished save"). An flock(2) on DIR/.lock: the kernel
// drops it when the holder dies however it dies, so a lock left by a dead job
// is taken over (and logged); the file names the holder's host and pid for the
// message a second job gets. Move-only; the destructor releases it.
class DirectoryLock {
 public:
  // FailedPrecondition naming `field`, the directory and the holder when
  // another live process holds it.
  static absl::StatusOr<DirectoryLock> Acquire(const std::string& dir, const char* field);
  DirectoryLock(DirectoryLock&& other) noexcept : fd_(other.fd_) { other.fd_ = -1; }
  DirectoryLock& operator=(DirectoryLock&& other) noexcept;
  DirectoryLock(const DirectoryLock&) = delete;
  DirectoryLock& operator=(const DirectoryLock&) = delete;
  ~DirectoryLock();

 private:
  explicit DirectoryLock(int fd) : fd_(fd) {}
  int fd_ = -1;
};

}  // namespace moe

#endif  // MOE_RUNTIME_STARTUP_CHECKS_H_
