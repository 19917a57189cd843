#include "comm/instrumentation.h"

#include "absl/strings/str_format.h"
#include "comm/op.h"

namespace moe::comm {

const char* OpKindName(OpKind kind) {
  switch (kind) {
    case OpKind::kAllReduce:
      return "AllReduce";
    case OpKind::kBroadcast:
      return "Broadcast";
    case OpKind::kAllGather:
      return "AllGather";
    case OpKind::kAllGatherV:
      return "AllGatherV";
    case OpKind::kReduceScatter:
      return "ReduceScatter";
    case OpKind::kAllToAll:
      return "AllToAll";
    case OpKind::kAllToAllV:
      return "AllToAllV";
    case OpKind::kSend:
      return "Send";
    case OpKind::kRecv:
      return "Recv";
    case OpKind::kGroupP2P:
      return "GroupP2P";
    case OpKind::kBarrier:
      return "Barrier";
    case OpKind::kSplit:
      return "Split";
  }
  return "?";
}

void TotalsSink::Record(const CommRecord& record) {
  std::lock_guard<std::mutex> lock(mu_);
  Totals& t = totals_[record.kind];
  ++t.count;
  if (!record.ok) ++t.failed;
  t.bytes_sent += record.bytes_sent;
  t.bytes_received += record.bytes_received;
  t.seconds += record.seconds();
}

std::map<OpKind, TotalsSink::Totals> TotalsSink::Snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  return totals_;
}

std::string TotalsSink::Format() const {
  std::string out;
  for (const auto& [kind, t] : Snapshot()) {
    double moved = static_cast<double>(t.bytes_sent + t.bytes_received) / 2;
    absl::StrAppendFormat(
        &out, "%-14s count %-7u failed %-3u sent %10.3f MiB  recv %10.3f MiB  %9.4f s  %8.3f GB/s\n",
        OpKindName(kind), t.count, t.failed, t.bytes_sent / 1048576.0, t.bytes_received / 1048576.0,
        t.seconds, t.seconds > 0 ? moved / t.seconds / 1e9 : 0.0);
  }
  return out;
}

void DescribeOp(const OpDesc& op, int rank, int size, CommRecord* record) {
  record->kind = op.kind;
  record->sequence = op.sequence;
  record->bytes_sent = op.bytes_sent;
  record->bytes_received = op.bytes_received;
  record->enqueued = op.enqueued;
  record->phase = op.phase;
  record->layer = op.layer;
  auto& sent = record->peer_bytes_sent;
  auto& received = record->peer_bytes_received;
  const size_t es = DTypeSize(op.dtype);
  switch (op.kind) {
    case OpKind::kAllToAll:
    case OpKind::kAllToAllV:
      sent.assign(size, 0);
      received.assign(size, 0);
      for (int r = 0; r < size; ++r) {
        if (r == rank) continue;
        const bool v = op.kind == OpKind::kAllToAllV;
        sent[r] = (v ? op.send_counts[r] : op.count) * es;
        received[r] = (v ? op.recv_counts[r] : op.count) * es;
      }
      break;
    case OpKind::kSend:
    case OpKind::kRecv:
    case OpKind::kGroupP2P:
      sent.assign(size, 0);
      received.assign(size, 0);
      for (const P2POp& p : op.p2p) {
        if (p.peer == rank || p.peer < 0 || p.peer >= size) continue;
        (p.type == P2PType::kSend ? sent : received)[p.peer] += p.count * DTypeSize(p.dtype);
      }
      break;
    default:
      break;
  }
}

namespace {
std::mutex g_wire_mu;
std::map<std::pair<OpKind, int>, uint64_t>* g_wire = new std::map<std::pair<OpKind, int>, uint64_t>;
}  // namespace

void WireBytesAdd(OpKind kind, int world_peer, uint64_t bytes) {
  std::lock_guard<std::mutex> lock(g_wire_mu);
  (*g_wire)[{kind, world_peer}] += bytes;
}

std::map<std::pair<OpKind, int>, uint64_t> WireBytesSnapshot() {
  std::lock_guard<std::mutex> lock(g_wire_mu);
  return *g_wire;
}

}  // namespace moe::comm
