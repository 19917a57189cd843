#include "comm/watchdog.h"

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <thread>

#include "absl/strings/str_format.h"
#include "comm/mpi_env.h"

namespace moe::comm {

void InFlight::Begin(OpKind kind, uint64_t sequence, size_t bytes_sent, size_t bytes_received,
                     double timeout_s, std::chrono::steady_clock::time_point started) {
  std::lock_guard<std::mutex> lock(mu_);
  s_ = {true, kind, sequence, bytes_sent, bytes_received, timeout_s, started};
}

void InFlight::End() {
  std::lock_guard<std::mutex> lock(mu_);
  s_.active = false;
}

InFlight::Snapshot InFlight::Get() const {
  std::lock_guard<std::mutex> lock(mu_);
  return s_;
}

std::string OverdueMessage(const std::string& who, const InFlight::Snapshot& op, double waited_s) {
  return absl::StrFormat(
      "[moe comm watchdog] %s: operation %s (sequence %u, %u bytes sent, %u bytes received) has waited %.1f "
      "s, "
      "past its deadline of %.1f s (comm.timeout_s); a rank of the group is missing or called a different "
      "operation. Aborting the job.",
      who, OpKindName(op.kind), op.sequence, op.bytes_sent, op.bytes_received, waited_s, op.timeout_s);
}

namespace {

class Watchdog {
 public:
  void Register(Watched* w) {
    std::lock_guard<std::mutex> lock(mu_);
    watched_.push_back(w);
    if (!thread_started_) {
      thread_started_ = true;
      std::thread([this] { Run(); }).detach();  // lives as long as the process
    }
  }
  void Unregister(Watched* w) {
    std::lock_guard<std::mutex> lock(mu_);
    watched_.erase(std::remove(watched_.begin(), watched_.end(), w), watched_.end());
  }

 private:
  void Run() {
    std::vector<InFlight::Snapshot> running;
    for (;;) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      std::lock_guard<std::mutex> lock(mu_);  // held while checking: Unregister waits for us
      const auto now = std::chrono::steady_clock::now();
      for (Watched* w : watched_) {
        running.clear();
        w->Collect(&running);
        for (const InFlight::Snapshot& op : running) {
          if (!op.active) continue;
          double waited = std::chrono::duration<double>(now - op.started).count();
          if (waited <= op.timeout_s) continue;
          std::string message = OverdueMessage(w->Describe(), op, waited);
          std::fprintf(stderr, "%s\n", message.c_str());
          std::fflush(stderr);
          w->AbortBackend();
          MpiEnv::Abort(kWatchdogExitCode);
        }
      }
    }
  }

  std::mutex mu_;
  std::vector<Watched*> watched_;
  bool thread_started_ = false;
};

Watchdog& TheWatchdog() {
  static Watchdog* w = new Watchdog;  // never destroyed: its thread may outlive static destructors
  return *w;
}

}  // namespace

void WatchdogRegister(Watched* w) { TheWatchdog().Register(w); }
void WatchdogUnregister(Watched* w) { TheWatchdog().Unregister(w); }

}  // namespace moe::comm
