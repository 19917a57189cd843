// Stop requests from the scheduler: Slurm (and most schedulers) send SIGTERM
// or SIGUSR1 before preemption. The trainer finishes the current step, saves a
// checkpoint and exits 0:
//
//   RETURN_IF_ERROR(InstallStopSignalHandlers());          // once, at start-up
//   for (...) {
//     RETURN_IF_ERROR(TrainStep(...));
//     ASSIGN_OR_RETURN(bool stop, AgreeOnStop(*groups.world));  // every rank, every step
//     if (stop) { save; return OK; }                              // all ranks at the same step
//   }
//
// The handler only sets an atomic flag (async-signal-safe); nothing else runs
// in signal context.
#ifndef MOE_RUNTIME_CHECKPOINT_SIGNAL_H_
#define MOE_RUNTIME_CHECKPOINT_SIGNAL_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/communicator.h"

namespace moe {

// Installs handlers of SIGTERM and SIGUSR1 that set this process's stop flag
// (SA_RESTART, so interrupted system calls resume). Idempotent.
absl::Status InstallStopSignalHandlers();

// True once this process got SIGTERM/SIGUSR1 (or RequestStop was called).
bool StopRequested();
// The signal number that set the flag; 0 when none (or set by RequestStop).
int StopSignal();
// Sets the flag as a signal would (tests, or a trainer's own reasons).
void RequestStop();
void ClearStopRequest();

// Collective over `world` (every rank calls it at the same point, e.g. after
// each step): true on every rank when any rank's flag is set, so all ranks stop
// at the same step. One AllReduce(max) of one int; waits for it.
absl::StatusOr<bool> AgreeOnStop(comm::Communicator& world);

}  // namespace moe

#endif  // MOE_RUNTIME_CHECKPOINT_SIGNAL_H_
