#include "comm/args_check.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "runtime/core/status.h"

namespace moe::comm {
namespace {

absl::Status Bad(const OpDesc& op, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(OpKindName(op.kind), ": ", what));
}

bool ValidDType(DType t) { return static_cast<uint8_t>(t) <= static_cast<uint8_t>(DType::kF64); }

absl::Status CheckDType(const OpDesc& op, DType t, const char* arg) {
  if (!ValidDType(t)) {
    return Bad(
        op, absl::StrCat(arg, " = ", static_cast<int>(t), " is not a DType (f32, bf16, i32, i64, u8, f64)"));
  }
  return absl::OkStatus();
}

// count * element size, failing when it does not fit in size_t.
absl::Status Bytes(const OpDesc& op, size_t count, size_t esize, const char* arg, size_t* bytes) {
  if (esize != 0 && count > std::numeric_limits<size_t>::max() / esize) {
    return Bad(op, absl::StrCat(arg, " = ", count, " elements overflows the byte count"));
  }
  *bytes = count * esize;
  return absl::OkStatus();
}

absl::Status CheckBuffer(const OpDesc& op, const void* ptr, size_t bytes, const char* arg, Device device,
                         const char* backend) {
  if (bytes == 0) return absl::OkStatus();
  if (ptr == nullptr) {
    return Bad(op, absl::StrCat(arg, " is null but ", bytes, " bytes are to be ",
                                "transferred; pass a buffer that holds them"));
  }
  Device where = PointerDevice(ptr);
  if (!(where == device)) {
    return Bad(op, absl::StrCat(arg, " is in ", where.ToString(), " memory but the ", backend,
                                " communicator takes ", device.ToString(), " buffers"));
  }
  return absl::OkStatus();
}

absl::Status CheckRank(const OpDesc& op, int r, int size, const char* arg) {
  if (r < 0 || r >= size) {
    return Bad(op, absl::StrCat(arg, " = ", r, " is out of range; the group has ", size, " ranks (0..",
                                size - 1, ")"));
  }
  return absl::OkStatus();
}

absl::Status CheckVector(const OpDesc& op, const std::vector<size_t>& v, int size, const char* arg) {
  if (v.size() != static_cast<size_t>(size)) {
    return Bad(op, absl::StrCat(arg, " has ", v.size(), " entries; it needs one per rank (", size, ")"));
  }
  return absl::OkStatus();
}

// Extent in elements of regions [displs[i], displs[i] + counts[i]); fails on
// overflow. Checks that non-empty regions do not overlap each other when
// `disjoint` (two peers writing the same elements is a race).
absl::Status Extent(const OpDesc& op, const std::vector<size_t>& counts, const std::vector<size_t>& displs,
                    const char* counts_arg, const char* displs_arg, bool disjoint, size_t* extent) {
  *extent = 0;
  std::vector<std::pair<size_t, size_t>> regions;
  for (size_t i = 0; i < counts.size(); ++i) {
    if (displs[i] > std::numeric_limits<size_t>::max() - counts[i]) {
      return Bad(op, absl::StrCat(displs_arg, "[", i, "] + ", counts_arg, "[", i, "] overflows"));
    }
    if (counts[i] == 0) continue;
    *extent = std::max(*extent, displs[i] + counts[i]);
    regions.emplace_back(displs[i], i);
  }
  if (!disjoint) return absl::OkStatus();
  std::sort(regions.begin(), regions.end());
  for (size_t j = 1; j < regions.size(); ++j) {
    size_t prev = regions[j - 1].second, cur = regions[j].second;
    if (displs[prev] + counts[prev] > displs[cur]) {
      return Bad(op, absl::StrCat("regions of ranks ", prev, " and ", cur, " overlap (", displs_arg, " ",
                                  displs[prev], " + ", counts_arg, " ", counts[prev], " > ", displs[cur],
                                  "); each rank's data needs its own region"));
    }
  }
  return absl::OkStatus();
}

bool Overlap(const void* a, size_t a_bytes, const void* b, size_t b_bytes) {
  if (a_bytes == 0 || b_bytes == 0 || a == nullptr || b == nullptr) return false;
  auto x = reinterpret_cast<uintptr_t>(a), y = reinterpret_cast<uintptr_t>(b);
  return x < y + b_bytes && y < x + a_bytes;
}

}  // namespace

absl::Status CheckArgs(OpDesc* op_ptr, int rank, int size, Device device, const char* backend) {
  OpDesc& op = *op_ptr;
  op.in_place = false;
  op.bytes_sent = op.bytes_received = 0;
  const bool reduces = op.kind == OpKind::kAllReduce || op.kind == OpKind::kReduceScatter;
  const bool typed = op.kind != OpKind::kGroupP2P && op.kind != OpKind::kBarrier && op.kind != OpKind::kSplit;
  if (typed) RETURN_IF_ERROR(CheckDType(op, op.dtype, "dtype"));
  if (reduces && static_cast<uint8_t>(op.op) > static_cast<uint8_t>(ReduceOp::kMin)) {
    return Bad(op, absl::StrCat("op = ", static_cast<int>(op.op), " is not a ReduceOp (sum, avg, max, min)"));
  }
  const size_t es = typed ? DTypeSize(op.dtype) : 0;
  size_t send_bytes = 0, recv_bytes = 0;  // extents of the buffers
  switch (op.kind) {
    case OpKind::kAllReduce: {
      RETURN_IF_ERROR(Bytes(op, op.count, es, "count", &send_bytes));
      recv_bytes = send_bytes;
      op.in_place = op.send == op.recv;
      op.bytes_sent = op.bytes_received = send_bytes;
      break;
    }
    case OpKind::kBroadcast: {
      RETURN_IF_ERROR(CheckRank(op, op.root, size, "root"));
      RETURN_IF_ERROR(Bytes(op, op.count, es, "count", &recv_bytes));
      send_bytes = rank == op.root ? recv_bytes : 0;  // send is read on the root only
      op.in_place = op.send == op.recv;
      op.bytes_sent = send_bytes;
      op.bytes_received = rank == op.root ? 0 : recv_bytes;
      break;
    }
    case OpKind::kAllGather: {
      RETURN_IF_ERROR(Bytes(op, op.count, es, "count", &send_bytes));
      RETURN_IF_ERROR(Bytes(op, send_bytes, size, "count * size", &recv_bytes));
      op.in_place = op.recv != nullptr && op.send == static_cast<const char*>(op.recv) + rank * send_bytes;
      op.bytes_sent = send_bytes;
      op.bytes_received = recv_bytes;
      break;
    }
    case OpKind::kAllGatherV: {
      RETURN_IF_ERROR(CheckVector(op, op.recv_counts, size, "recv_counts"));
      RETURN_IF_ERROR(CheckVector(op, op.recv_displs, size, "recv_displs"));
      if (op.count != op.recv_counts[rank]) {
        return Bad(op, absl::StrCat("send_count = ", op.count, " differs from recv_counts[", rank, "] = ",
                                    op.recv_counts[rank], " (this rank's own entry); make them equal"));
      }
      size_t extent = 0;
      RETURN_IF_ERROR(
          Extent(op, op.recv_counts, op.recv_displs, "recv_counts", "recv_displs", true, &extent));
      RETURN_IF_ERROR(Bytes(op, extent, es, "recv extent", &recv_bytes));
      RETURN_IF_ERROR(Bytes(op, op.count, es, "send_count", &send_bytes));
      op.in_place =
          op.recv != nullptr && op.send == static_cast<const char*>(op.recv) + op.recv_displs[rank] * es;
      op.bytes_sent = send_bytes;
      for (size_t c : op.recv_counts) op.bytes_received += c * es;
      break;
    }
    case OpKind::kReduceScatter: {
      RETURN_IF_ERROR(Bytes(op, op.count, es, "count", &recv_bytes));
      RETURN_IF_ERROR(Bytes(op, recv_bytes, size, "count * size", &send_bytes));
      op.in_place = op.send != nullptr && op.recv == static_cast<const char*>(op.send) + rank * recv_bytes;
      op.bytes_sent = send_bytes;
      op.bytes_received = recv_bytes;
      break;
    }
    case OpKind::kAllToAll: {
      size_t block = 0;
      RETURN_IF_ERROR(Bytes(op, op.count, es, "count", &block));
      RETURN_IF_ERROR(Bytes(op, block, size, "count * size", &send_bytes));
      recv_bytes = send_bytes;
      op.bytes_sent = op.bytes_received = block * (size - 1);
      break;
    }
    case OpKind::kAllToAllV: {
      RETURN_IF_ERROR(CheckVector(op, op.send_counts, size, "send_counts"));
      RETURN_IF_ERROR(CheckVector(op, op.send_displs, size, "send_displs"));
      RETURN_IF_ERROR(CheckVector(op, op.recv_counts, size, "recv_counts"));
      RETURN_IF_ERROR(CheckVector(op, op.recv_displs, size, "recv_displs"));
      size_t send_extent = 0, recv_extent = 0;
      RETURN_IF_ERROR(
          Extent(op, op.send_counts, op.send_displs, "send_counts", "send_displs", false, &send_extent));
      RETURN_IF_ERROR(
          Extent(op, op.recv_counts, op.recv_displs, "recv_counts", "recv_displs", true, &recv_extent));
      RETURN_IF_ERROR(Bytes(op, send_extent, es, "send extent", &send_bytes));
      RETURN_IF_ERROR(Bytes(op, recv_extent, es, "recv extent", &recv_bytes));
      for (int r = 0; r < size; ++r) {
        if (r == rank) continue;
        op.bytes_sent += op.send_counts[r] * es;
        op.bytes_received += op.recv_counts[r] * es;
      }
      break;
    }
    case OpKind::kSend:
    case OpKind::kRecv: {
      RETURN_IF_ERROR(CheckRank(op, op.root, size, "peer"));
      if (op.root == rank) {
        return Bad(op,
                   absl::StrCat("peer = ", op.root, " is this rank; a lone ", OpKindName(op.kind),
                                " to itself never matches, use GroupP2P with both the send and the recv"));
      }
      size_t bytes = 0;
      RETURN_IF_ERROR(Bytes(op, op.count, es, "count", &bytes));
      if (op.kind == OpKind::kSend) {
        RETURN_IF_ERROR(CheckBuffer(op, op.send, bytes, "buf", device, backend));
        op.bytes_sent = bytes;
      } else {
        RETURN_IF_ERROR(CheckBuffer(op, op.recv, bytes, "buf", device, backend));
        op.bytes_received = bytes;
      }
      return absl::OkStatus();
    }
    case OpKind::kGroupP2P: {
      for (size_t i = 0; i < op.p2p.size(); ++i) {
        const P2POp& p = op.p2p[i];
        const std::string arg = absl::StrCat("ops[", i, "]");
        if (p.type != P2PType::kSend && p.type != P2PType::kRecv) {
          return Bad(op,
                     absl::StrCat(arg, ".type = ", static_cast<int>(p.type), " is neither send nor recv"));
        }
        RETURN_IF_ERROR(CheckDType(op, p.dtype, (arg + ".dtype").c_str()));
        RETURN_IF_ERROR(CheckRank(op, p.peer, size, (arg + ".peer").c_str()));
        size_t bytes = 0;
        RETURN_IF_ERROR(Bytes(op, p.count, DTypeSize(p.dtype), (arg + ".count").c_str(), &bytes));
        RETURN_IF_ERROR(CheckBuffer(op, p.buf, bytes, (arg + ".buf").c_str(), device, backend));
        if (p.peer == rank) continue;
        (p.type == P2PType::kSend ? op.bytes_sent : op.bytes_received) += bytes;
      }
      return absl::OkStatus();
    }
    case OpKind::kBarrier:
      return absl::OkStatus();
    case OpKind::kSplit:
      if (op.split_color < -1) {
        return Bad(op, absl::StrCat("color = ", op.split_color,
                                    " must be >= 0, or kNoColor (-1) for a rank that joins no group"));
      }
      return absl::OkStatus();
  }
  RETURN_IF_ERROR(CheckBuffer(op, op.send, send_bytes, "send buffer", device, backend));
  RETURN_IF_ERROR(CheckBuffer(op, op.recv, recv_bytes, "recv buffer", device, backend));
  if (!op.in_place && Overlap(op.send, send_bytes, op.recv, recv_bytes)) {
    std::string allowed;
    switch (op.kind) {
      case OpKind::kAllReduce:
        allowed = "; for in place pass send == recv";
        break;
      case OpKind::kBroadcast:
        allowed = "; for in place pass send == recv";
        break;
      case OpKind::kAllGather:
        allowed = "; for in place pass send == recv + rank * count";
        break;
      case OpKind::kAllGatherV:
        allowed = "; for in place pass send == recv + recv_displs[rank]";
        break;
      case OpKind::kReduceScatter:
        allowed = "; for in place pass recv == send + rank * count";
        break;
      default:
        allowed = "; this operation cannot run in place";
        break;
    }
    return Bad(op, absl::StrFormat("send buffer [%p, +%u bytes) and recv buffer [%p, +%u bytes) overlap%s",
                                   op.send, send_bytes, op.recv, recv_bytes, allowed));
  }
  return absl::OkStatus();
}

#ifndef MOE_WITH_CUDA
Device PointerDevice(const void*) { return Device::Cpu(); }
#endif

}  // namespace moe::comm
