// Asking the other ranks' watchdogs whether they are alive, and what they run.
//
// When an operation is about to pass its deadline, the watchdog (watchdog.h)
// of the waiting rank sends a small probe to every other member of the
// operation's group over a communicator of its own (a duplicate of the world
// made at MpiEnv::Init, used by no data path) and waits up to a second for
// the answers. Every rank's watchdog thread answers probes on each tick with
// what it is running ("AllToAllV (sequence 7) on group 'ep0' for 4.2 s").
// A peer that does not answer is unreachable (its link or host is down) or
// stopped (SIGSTOP, swapped out, a debugger); one that answers but runs a
// different operation, or none, called the collectives in another order.
// The watchdog's message names both kinds of peer.
//
// Everything here is a no-op before MpiEnv::Init and after MpiEnv::Finalize.
#ifndef MOE_COMM_PEER_PROBE_H_
#define MOE_COMM_PEER_PROBE_H_

#include <optional>
#include <string>
#include <vector>

namespace moe::comm {

// Called by MpiEnv::Init (collective over the world): the probe communicator.
void PeerProbeInit();
// Called by MpiEnv::Finalize after the watchdog stopped (WatchdogShutdown,
// so no probe is running) and before MPI_Finalize: answers in flight are
// released, and no MPI call is made here after it.
void PeerProbeShutdown();

// Answers the probes that arrived; `state` describes what this rank runs.
// Never blocks.
void PeerProbeServe(const std::string& state);

struct PeerAnswer {
  int world_rank = 0;
  std::optional<std::string> state;  // empty when it did not answer in time
};
// Probes `world_ranks` (this rank is skipped) and waits up to `wait_s` for
// their answers, answering other ranks' probes meanwhile with `state`.
std::vector<PeerAnswer> PeerProbeAsk(const std::vector<int>& world_ranks, double wait_s,
                                     const std::string& state);

// One sentence naming the peers that did not answer and what the others run:
// "world rank 3 did not answer within 1.0 s (unreachable or stopped); world
// rank 1 answered: AllReduce (sequence 4) on group 'dp0' for 5.1 s".
std::string DescribePeerAnswers(const std::vector<PeerAnswer>& answers, double wait_s);

}  // namespace moe::comm

#endif  // MOE_COMM_PEER_PROBE_H_
