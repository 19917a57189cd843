#include "runtime/checkpoint_signal.h"

#include <signal.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "runtime/core/status.h"

namespace moe {
namespace {

// Lock-free atomics are async-signal-safe.
std::atomic<int> g_stop_signal{0};
std::atomic<bool> g_stop{false};
static_assert(std::atomic<int>::is_always_lock_free && std::atomic<bool>::is_always_lock_free);

extern "C" void OnStopSignal(int signo) {
  g_stop_signal.store(signo, std::memory_order_relaxed);
  g_stop.store(true, std::memory_order_release);
}

}  // namespace

absl::Status InstallStopSignalHandlers() {
  struct sigaction action;
  std::memset(&action, 0, sizeof(action));
  action.sa_handler = OnStopSignal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  for (int signo : {SIGTERM, SIGUSR1}) {
    if (sigaction(signo, &action, nullptr) != 0) {
      return absl::InternalError(absl::StrCat("sigaction(", signo, ") failed: ", std::strerror(errno)));
    }
  }
  return absl::OkStatus();
}

bool StopRequested() { return g_stop.load(std::memory_order_acquire); }

int StopSignal() { return g_stop_signal.load(std::memory_order_relaxed); }

void RequestStop() { g_stop.store(true, std::memory_order_release); }

void ClearStopRequest() {
  g_stop.store(false, std::memory_order_release);
  g_stop_signal.store(0, std::memory_order_relaxed);
}

absl::StatusOr<bool> AgreeOnStop(comm::Communicator& world) {
  int32_t flag = StopRequested() ? 1 : 0;
  ASSIGN_OR_RETURN(comm::Work work, world.AllReduce(&flag, &flag, 1, DType::kI32, comm::ReduceOp::kMax));
  RETURN_IF_ERROR(work.Wait());
  return flag != 0;
}

}  // namespace moe
