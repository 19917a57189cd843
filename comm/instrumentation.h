// Per-operation records of the communicators, and sinks that consume them.
//
// Every operation a Communicator runs (collective, P2P batch, barrier, split)
// produces one CommRecord when it finishes, successfully or not, handed to the
// communicator's CommSink on the thread that completed it (the MPI progress
// thread, or the NCCL watchdog thread), before the operation's Work reports
// done. Sinks must therefore be thread-safe and quick; the profiler consumes
// them, TotalsSink below aggregates per kind.
#ifndef MOE_COMM_INSTRUMENTATION_H_
#define MOE_COMM_INSTRUMENTATION_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"

namespace moe::comm {

enum class OpKind : uint8_t {
  kAllReduce,
  kBroadcast,
  kAllGather,
  kAllGatherV,
  kReduceScatter,
  kAllToAll,
  kAllToAllV,
  kSend,
  kRecv,
  kGroupP2P,
  kBarrier,
  kSplit,
};
const char* OpKindName(OpKind kind);  // "AllReduce", "AllToAllV", ...

struct CommRecord {
  std::string group;  // the communicator's name ("world", or the name given to Split)
  int group_size = 0;
  int rank = 0;  // this rank within the group
  OpKind kind = OpKind::kBarrier;
  uint64_t sequence = 0;  // per communicator, from 0, in enqueue order
  // Payload bytes: for AllToAll(V) and P2P what goes to / comes from other
  // ranks (self excluded); for the other collectives the sizes of this rank's
  // input and output buffers.
  size_t bytes_sent = 0;
  size_t bytes_received = 0;
  std::chrono::steady_clock::time_point enqueued, started, finished;
  bool ok = true;
  // The world ranks of the group's members (group rank i is world rank group_ranks[i]).
  std::vector<int> group_ranks;
  // Payload bytes to and from each group rank (size group_size, self 0) for
  // AllToAll(V), Send, Recv and GroupP2P; empty for the other collectives,
  // whose per-peer traffic is the algorithm's choice.
  std::vector<uint64_t> peer_bytes_sent, peer_bytes_received;
  // The innermost trace span of the thread that enqueued the op (trace.h):
  // its phase ("dispatch a2a", "grad sync", ...) or nullptr, and its layer or -1.
  const char* phase = nullptr;
  int layer = -1;
  double seconds() const { return std::chrono::duration<double>(finished - started).count(); }
};

class CommSink {
 public:
  virtual ~CommSink() = default;
  // Called once per finished operation, from a communication thread.
  virtual void Record(const CommRecord& record) = 0;
};

// Totals per operation kind: count, bytes and busy seconds (start to finish).
class TotalsSink : public CommSink {
 public:
  struct Totals {
    uint64_t count = 0;
    uint64_t failed = 0;
    uint64_t bytes_sent = 0;
    uint64_t bytes_received = 0;
    double seconds = 0;
  };
  void Record(const CommRecord& record) override;
  std::map<OpKind, Totals> Snapshot() const;
  // One line per kind: "AllToAllV  count 12  sent 1.5 MiB  recv 1.5 MiB  0.012 s  0.13 GB/s".
  std::string Format() const;

 private:
  mutable std::mutex mu_;
  std::map<OpKind, Totals> totals_;
};

// Bytes a backend handed to the transport for sending (MPI_Isend), per
// operation kind and destination world rank, counted where each send is
// posted. Process-wide, from start-up. It is independent of the CommRecord
// accounting (computed from an op's arguments): the profiler writes its
// difference over the trace window next to the trace, so a test can check
// the trace's bytes per peer against what actually went out. Collectives that
// MPI runs itself (MPI_Iallreduce, ...) are not counted here.
void WireBytesAdd(OpKind kind, int world_peer, uint64_t bytes);
std::map<std::pair<OpKind, int>, uint64_t> WireBytesSnapshot();

}  // namespace moe::comm

#endif  // MOE_COMM_INSTRUMENTATION_H_
