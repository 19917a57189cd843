#include "comm/watchdog.h"

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "comm/mpi_env.h"
#include "comm/peer_probe.h"

namespace moe::comm {

void InFlight::Begin(OpKind kind, uint64_t sequence, size_t bytes_sent, size_t bytes_received,
                     double timeout_s, std::chrono::steady_clock::time_point started,
                     const char* timeout_field) {
  std::lock_guard<std::mutex> lock(mu_);
  s_ = {true, kind, sequence, bytes_sent, bytes_received, timeout_s, started, timeout_field};
}

void InFlight::End() {
  std::lock_guard<std::mutex> lock(mu_);
  s_.active = false;
}

InFlight::Snapshot InFlight::Get() const {
  std::lock_guard<std::mutex> lock(mu_);
  return s_;
}

std::string OverdueMessage(const std::string& who, const InFlight::Snapshot& op, double waited_s,
                           const std::string& peers) {
  return absl::StrFormat(
      "[moe comm watchdog] %s: operation %s (sequence %u, %u bytes sent, %u bytes received) has waited %.1f "
      "s, past its deadline of %.1f s (%s); %s. Aborting the job.",
      who, OpKindName(op.kind), op.sequence, op.bytes_sent, op.bytes_received, waited_s, op.timeout_s,
      op.timeout_field,
      peers.empty() ? "a rank of the group is missing or called a different operation" : peers);
}

double ProbeWaitSeconds(double timeout_s) { return std::min(1.0, timeout_s / 2); }

namespace {

class Watchdog {
 public:
  void Register(Watched* w) {
    std::lock_guard<std::mutex> lock(mu_);
    watched_.push_back(w);
    if (!thread_.joinable() && !stopped_) thread_ = std::thread([this] { Run(); });
  }
  void Unregister(Watched* w) {
    std::lock_guard<std::mutex> lock(mu_);
    watched_.erase(std::remove(watched_.begin(), watched_.end(), w), watched_.end());
  }
  void Shutdown() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopped_ = true;
    }
    wake_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

 private:
  void Run() {
    std::vector<InFlight::Snapshot> running;
    for (;;) {
      std::unique_lock<std::mutex> lock(mu_);  // held while checking: Unregister waits for us
      if (wake_.wait_for(lock, std::chrono::milliseconds(100), [this] { return stopped_; })) return;
      PeerProbeServe(StateLocked());
      const auto now = std::chrono::steady_clock::now();
      for (Watched* w : watched_) {
        running.clear();
        w->Collect(&running);
        for (const InFlight::Snapshot& op : running) {
          if (!op.active) continue;
          const double probe_s = ProbeWaitSeconds(op.timeout_s);
          if (Waited(op, now) <= op.timeout_s - probe_s) continue;
          // Close to the deadline: ask the group's other ranks whether they
          // are alive and what they run, so the message can name the peer
          // (the probe takes up to probe_s, so the abort stays on time).
          std::string peers =
              DescribePeerAnswers(PeerProbeAsk(w->PeerWorldRanks(), probe_s, StateLocked()), probe_s);
          if (!AwaitDeadline(w, op)) continue;  // it finished meanwhile
          std::string message =
              OverdueMessage(w->Describe(), op, Waited(op, std::chrono::steady_clock::now()), peers);
          std::fprintf(stderr, "%s\n", message.c_str());
          std::fflush(stderr);
          w->AbortBackend();
          MpiEnv::Abort(kWatchdogExitCode);
        }
      }
    }
  }

  static double Waited(const InFlight::Snapshot& op, std::chrono::steady_clock::time_point now) {
    return std::chrono::duration<double>(now - op.started).count();
  }

  // Peers that answer at once leave the probe before `op`'s deadline: waits
  // (serving peers' probes, mu_ held as in the probe) until the deadline has
  // passed. True if `op` still runs then; false as soon as it finished.
  bool AwaitDeadline(Watched* w, const InFlight::Snapshot& op) {
    for (;;) {
      if (!StillOverdue(w, op)) return false;
      const double left = op.timeout_s - Waited(op, std::chrono::steady_clock::now());
      if (left < 0) return true;
      PeerProbeServe(StateLocked());
      std::this_thread::sleep_for(std::chrono::duration<double>(std::min(left + 1e-3, 0.02)));
    }
  }

  // Whether `op` of `w` is still running (not finished while we probed).
  static bool StillOverdue(Watched* w, const InFlight::Snapshot& op) {
    std::vector<InFlight::Snapshot> now;
    w->Collect(&now);
    for (const InFlight::Snapshot& s : now) {
      if (s.active && s.kind == op.kind && s.sequence == op.sequence && s.started == op.started) return true;
    }
    return false;
  }

  // What this rank runs, as its answer to other ranks' probes.
  std::string StateLocked() {
    const auto now = std::chrono::steady_clock::now();
    std::string out;
    std::vector<InFlight::Snapshot> running;
    for (Watched* w : watched_) {
      running.clear();
      w->Collect(&running);
      for (const InFlight::Snapshot& op : running) {
        if (!op.active) continue;
        absl::StrAppend(&out, out.empty() ? "" : ", ",
                        absl::StrFormat("%s (sequence %u) on group '%s' for %.1f s", OpKindName(op.kind),
                                        op.sequence, w->GroupName(), Waited(op, now)));
      }
    }
    return out.empty() ? "no communicator operation" : out;
  }

  std::mutex mu_;
  std::condition_variable wake_;
  std::vector<Watched*> watched_;
  bool stopped_ = false;  // by Shutdown, for good
  std::thread thread_;
};

Watchdog& TheWatchdog() {
  static Watchdog* w = new Watchdog;  // never destroyed: a process that never finalizes keeps its thread
  return *w;
}

}  // namespace

void WatchdogRegister(Watched* w) { TheWatchdog().Register(w); }
void WatchdogUnregister(Watched* w) { TheWatchdog().Unregister(w); }
void WatchdogShutdown() { TheWatchdog().Shutdown(); }

}  // namespace moe::comm
