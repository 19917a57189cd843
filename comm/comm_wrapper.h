// CommWrapper: a Communicator that forwards every operation to a real one
// (as leveldb's EnvWrapper forwards to an Env), shaping the link and injecting
// faults on the way. Not a mock: the data still moves through the wrapped
// communicator (MPI), and groups split from a wrapper are wrapped the same way.
//
// Link shaping (to make overlap measurable on one machine): each operation,
// once started on the progress thread, first waits latency_us plus
// max(bytes sent, bytes received) / bandwidth, inside its deadline, so an
// operation occupies the "link" for at least its modelled time.
//
// Faults: an operation of a given kind and sequence number (per communicator,
// as the watchdog prints it), on a given world rank and optionally only in
// groups whose name starts with a prefix, fails (its Work and stream get an
// Unavailable error naming it), is delayed by delay_s, or hangs until the
// watchdog aborts the job (exit 124, naming the operation).
//
// Driven by the environment, read by CreateWorldCommunicator (so tests and
// benchmarks need no code change), or by WrapCommunicator directly:
//   MOE_COMM_LINK="bandwidth_gbps=2,latency_us=50"
//   MOE_COMM_FAULT="rank=1,kind=AllToAllV,seq=3,action=hang[,group=ep][,delay_s=2]"
//     (several faults separated by ';'; kind is OpKindName; rank -1 = every rank)
// Only host-executing backends (mpi) run the injected waits; the NCCL backend
// refuses wrapped operations.
#ifndef MOE_COMM_COMM_WRAPPER_H_
#define MOE_COMM_COMM_WRAPPER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "comm/communicator.h"

namespace moe::comm {

struct LinkShape {
  double bandwidth_gbps = 0;  // gigabytes per second; 0 = not throttled
  double latency_us = 0;      // added to every operation
  bool active() const { return bandwidth_gbps > 0 || latency_us > 0; }
};

struct FaultSpec {
  enum class Action : uint8_t { kFail, kDelay, kHang };
  Action action = Action::kFail;
  OpKind kind = OpKind::kAllReduce;
  uint64_t sequence = 0;
  int world_rank = -1;       // -1: every rank
  std::string group_prefix;  // empty: every group
  double delay_s = 0;        // kDelay
};

struct WrapperOptions {
  LinkShape link;
  std::vector<FaultSpec> faults;
  bool active() const { return link.active() || !faults.empty(); }
};

// Parses MOE_COMM_LINK and MOE_COMM_FAULT (unset: inactive options); a bad
// value is an error naming the variable, the field and the accepted forms.
absl::StatusOr<WrapperOptions> WrapperOptionsFromEnv();
absl::StatusOr<LinkShape> ParseLinkShape(const std::string& text);
absl::StatusOr<std::vector<FaultSpec>> ParseFaults(const std::string& text);

// `target` wrapped; its rank, size, group, device and backend name are the target's.
std::unique_ptr<Communicator> WrapCommunicator(std::unique_ptr<Communicator> target, WrapperOptions options);

}  // namespace moe::comm

#endif  // MOE_COMM_COMM_WRAPPER_H_
