#include "comm/host_staging.h"

#include <algorithm>
#include <cstdint>

namespace moe::comm {
namespace {

// Elements spanned by a V-collective's buffer: max(displs[r] + counts[r]).
size_t Extent(const std::vector<size_t>& counts, const std::vector<size_t>& displs) {
  size_t extent = 0;
  for (size_t r = 0; r < counts.size() && r < displs.size(); ++r)
    if (counts[r] > 0) extent = std::max(extent, displs[r] + counts[r]);
  return extent;
}

}  // namespace

std::vector<StagedRange> StagedRanges(const OpDesc& op, int size) {
  const size_t es = DTypeSize(op.dtype), n = static_cast<size_t>(size);
  std::vector<StagedRange> ranges;
  auto add = [&](const void* p, size_t bytes, bool written) {
    if (p != nullptr && bytes > 0)
      ranges.push_back({static_cast<char*>(const_cast<void*>(p)), bytes, written});
  };
  switch (op.kind) {
    case OpKind::kAllReduce:
    case OpKind::kBroadcast:  // send: read on the root only; null or == recv elsewhere
      add(op.send, op.count * es, false);
      add(op.recv, op.count * es, true);
      break;
    case OpKind::kAllGather:
      add(op.send, op.count * es, false);
      add(op.recv, op.count * n * es, true);
      break;
    case OpKind::kAllGatherV:
      add(op.send, op.count * es, false);
      add(op.recv, Extent(op.recv_counts, op.recv_displs) * es, true);
      break;
    case OpKind::kReduceScatter:
      add(op.send, op.count * n * es, false);
      add(op.recv, op.count * es, true);
      break;
    case OpKind::kAllToAll:
      add(op.send, op.count * n * es, false);
      add(op.recv, op.count * n * es, true);
      break;
    case OpKind::kAllToAllV:
      add(op.send, Extent(op.send_counts, op.send_displs) * es, false);
      add(op.recv, Extent(op.recv_counts, op.recv_displs) * es, true);
      break;
    case OpKind::kSend:
    case OpKind::kRecv:
    case OpKind::kGroupP2P:
      for (const P2POp& p : op.p2p) add(p.buf, p.count * DTypeSize(p.dtype), p.type == P2PType::kRecv);
      break;
    case OpKind::kBarrier:
    case OpKind::kSplit:
      break;
  }
  std::sort(ranges.begin(), ranges.end(),
            [](const StagedRange& a, const StagedRange& b) { return a.device < b.device; });
  std::vector<StagedRange> merged;
  for (const StagedRange& r : ranges) {
    if (!merged.empty() && r.device < merged.back().device + merged.back().bytes) {
      StagedRange& m = merged.back();
      m.bytes = std::max<size_t>(m.bytes, static_cast<size_t>(r.device - m.device) + r.bytes);
      m.written = m.written || r.written;
    } else {
      merged.push_back(r);
    }
  }
  return merged;
}

void RebaseBuffers(const std::vector<StagedRange>& ranges, const std::vector<char*>& host, OpDesc* op) {
  auto rebase = [&](const void* p) -> char* {
    const char* c = static_cast<const char*>(p);
    for (size_t i = 0; i < ranges.size(); ++i) {
      if (c >= ranges[i].device && c < ranges[i].device + ranges[i].bytes)
        return host[i] + (c - ranges[i].device);
    }
    return const_cast<char*>(c);  // a zero-byte buffer (or null): never dereferenced
  };
  op->send = rebase(op->send);
  op->recv = rebase(op->recv);
  for (P2POp& p : op->p2p) p.buf = rebase(p.buf);
}

}  // namespace moe::comm
