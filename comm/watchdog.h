// The process-wide watchdog: one thread that looks at every live
// communicator's running operation a few times a second and, when one is past
// its deadline, prints from this rank what it was waiting for and aborts the
// whole job. This is what makes a missing rank or a mismatched collective end
// the job instead of hanging it. Shortly before the deadline it probes the
// group's other ranks (peer_probe.h), and the message names the peers that
// did not answer (unreachable or stopped) and what the others were running.
#ifndef MOE_COMM_WATCHDOG_H_
#define MOE_COMM_WATCHDOG_H_

#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "comm/instrumentation.h"

namespace moe::comm {

// Exit code of a job the watchdog aborts.
inline constexpr int kWatchdogExitCode = 124;

// What a communicator is running now. Thread-safe: the backend updates it,
// the watchdog reads it.
class InFlight {
 public:
  struct Snapshot {
    bool active = false;
    OpKind kind = OpKind::kBarrier;
    uint64_t sequence = 0;
    size_t bytes_sent = 0, bytes_received = 0;
    double timeout_s = 0;
    std::chrono::steady_clock::time_point started;
    const char* timeout_field = "comm.timeout_s";  // the setting that chose timeout_s
  };
  void Begin(OpKind kind, uint64_t sequence, size_t bytes_sent, size_t bytes_received, double timeout_s,
             std::chrono::steady_clock::time_point started, const char* timeout_field = "comm.timeout_s");
  void End();
  Snapshot Get() const;

 private:
  mutable std::mutex mu_;
  Snapshot s_;
};

// Implemented by each backend's communicator.
class Watched {
 public:
  virtual ~Watched() = default;
  // The operations to check, with who is waiting (for the message).
  virtual void Collect(std::vector<InFlight::Snapshot>* running) = 0;
  virtual std::string Describe() const = 0;   // "rank 1 of group 'ep' (world ranks 1,3), backend mpi"
  virtual std::string GroupName() const = 0;  // "ep0"
  // The world ranks of the group: the peers the watchdog probes (peer_probe.h)
  // before naming the ones that do not answer.
  virtual std::vector<int> PeerWorldRanks() const = 0;
  // Called before the job is aborted (ncclCommAbort); must not block.
  virtual void AbortBackend() {}
};

// Registers `w` with the watchdog (starting its thread on first use).
void WatchdogRegister(Watched* w);
// Unregisters; after it returns the watchdog no longer touches `w`.
void WatchdogUnregister(Watched* w);
// Stops the watchdog's thread and waits for it (a probe it is running ends
// first, at most a second): no watchdog MPI call, probe answer or abort can
// happen after it returns. Called by MpiEnv::Finalize before the probe
// communicator goes and MPI_Finalize runs; the watchdog stays stopped.
void WatchdogShutdown();

// The message printed for an overdue operation (exposed for tests). `peers`
// is what the probe of the group's other ranks found (DescribePeerAnswers),
// empty when it found nothing to say.
std::string OverdueMessage(const std::string& who, const InFlight::Snapshot& op, double waited_s,
                           const std::string& peers);

}  // namespace moe::comm

#endif  // MOE_COMM_WATCHDOG_H_
