// The description of one operation as the Communicator front end hands it to
// a backend, after CheckArgs (args_check.h) has validated it. Backends read it;
// users never build one.
#ifndef MOE_COMM_OP_H_
#define MOE_COMM_OP_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "comm/instrumentation.h"
#include "runtime/core/dtype.h"

namespace moe {
class Event;
}

namespace moe::comm {

enum class ReduceOp : uint8_t { kSum = 0, kAvg = 1, kMax = 2, kMin = 3 };
const char* ReduceOpName(ReduceOp op);  // "sum", "avg", "max", "min"

enum class P2PType : uint8_t { kSend = 0, kRecv = 1 };

// One point-to-point transfer of a grouped batch (Communicator::GroupP2P).
// `buf` is read for kSend and written for kRecv; counts of a matching send and
// recv must be equal.
struct P2POp {
  P2PType type = P2PType::kSend;
  int peer = 0;
  void* buf = nullptr;
  size_t count = 0;
  DType dtype = DType::kF32;

  static P2POp Send(const void* buf, size_t count, DType dtype, int peer) {
    return {P2PType::kSend, peer, const_cast<void*>(buf), count, dtype};
  }
  static P2POp Recv(void* buf, size_t count, DType dtype, int peer) {
    return {P2PType::kRecv, peer, buf, count, dtype};
  }
};

struct OpDesc {
  OpKind kind = OpKind::kBarrier;
  const void* send = nullptr;
  void* recv = nullptr;
  // AllReduce, Broadcast: elements of each buffer. AllGather(V): elements this
  // rank sends. ReduceScatter: elements each rank receives. AllToAll: elements
  // per peer. Send/Recv: elements.
  size_t count = 0;
  DType dtype = DType::kF32;
  ReduceOp op = ReduceOp::kSum;
  int root = 0;  // Broadcast root, or Send/Recv peer
  // AllToAllV (all four) and AllGatherV (recv_*), in elements.
  std::vector<size_t> send_counts, send_displs, recv_counts, recv_displs;
  std::vector<P2POp> p2p;  // GroupP2P; Send/Recv are stored here too (one entry)
  int split_color = 0, split_key = 0;

  // Filled by the front end after validation.
  bool in_place = false;
  size_t bytes_sent = 0, bytes_received = 0;
  uint64_t sequence = 0;
  double timeout_s = 0;
  const char* timeout_field = "comm.timeout_s";  // the setting that chose timeout_s (for the watchdog)
  std::chrono::steady_clock::time_point enqueued;
  // Stream-ordered operations: the marker of the caller's stream the backend
  // waits for (without counting a host wait) before it starts the operation.
  std::shared_ptr<const Event> after;
  // Set by CommWrapper: run by a host-executing backend (MPI) on its progress
  // thread once the operation has started (inside its deadline) and before
  // it moves data; a non-OK status fails the operation.
  std::function<absl::Status(const OpDesc&)> inject;
  // The buffers live on `staged_device` and a host-executing backend (MPI)
  // copies them through host memory (host_staging.h): set for device buffers
  // given to an MPI communicator, or for every operation under
  // CommOptions::stage_through_host (tests).
  bool staged = false;
  Device staged_device = Device::Cpu();
  const char* phase = nullptr;  // trace::CurrentLabel() of the enqueuing thread
  int layer = -1;
};

// Fills a record's op fields (kind, sequence, bytes, per-peer bytes, enqueue
// time, phase) from a validated op of a group of `size` where this is `rank`.
void DescribeOp(const OpDesc& op, int rank, int size, CommRecord* record);

}  // namespace moe::comm

#endif  // MOE_COMM_OP_H_
