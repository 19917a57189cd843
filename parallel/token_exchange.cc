#include "parallel/token_exchange.h"

#include <numeric>
#include <utility>

#include "absl/strings/str_cat.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"

namespace moe::parallel {
namespace {

absl::Status CheckRows(const char* what, const Tensor& rows, int64_t expected) {
  if (!rows.defined() || rows.rank() != 2 || (rows.dtype() != DType::kF32 && rows.dtype() != DType::kBF16)) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": rows ", rows.defined() ? rows.ToString() : "undefined", " must be f32 or bf16 [n, d]"));
  }
  if (rows.size(0) != expected) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": rows ", rows.ToString(), " has ", rows.size(0),
                                                   " rows but the exchange plan says ", expected));
  }
  return absl::OkStatus();
}

absl::Status CheckChunk(const char* what, const ExchangePlan& plan, int chunk) {
  if (chunk < 0 || chunk >= plan.num_chunks()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": chunk ", chunk, " is outside the plan's ", plan.num_chunks(), " chunks"));
  }
  return absl::OkStatus();
}

std::vector<size_t> Displs(const std::vector<size_t>& counts) {
  std::vector<size_t> d(counts.size(), 0);
  for (size_t i = 1; i < counts.size(); ++i) d[i] = d[i - 1] + counts[i - 1];
  return d;
}

std::vector<size_t> Elements(const std::vector<int64_t>& rows, int64_t hidden) {
  std::vector<size_t> out(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) out[i] = static_cast<size_t>(rows[i] * hidden);
  return out;
}

// dst[i] = src[index[i]] on the stream; index is a host permutation.
absl::StatusOr<Tensor> Permute(Stream& stream, const Tensor& src, const std::vector<int32_t>& index) {
  const int64_t n = static_cast<int64_t>(index.size());
  ASSIGN_OR_RETURN(Tensor dst, Tensor::Empty(stream.backend(), Shape{n, src.size(1)}, src.dtype(),
                                             MemoryCategory::kCommunication));
  if (n == 0) return dst;
  ASSIGN_OR_RETURN(Tensor idx,
                   Tensor::FromHostOn(stream, Shape{n}, DType::kI32, index.data(),
                                      index.size() * sizeof(int32_t), MemoryCategory::kCommunication));
  RETURN_IF_ERROR(ops::GatherRows(stream, src, idx, dst));
  return dst;
}

// Is the permutation the identity (one peer, or everything from one source)?
bool IsIdentity(const std::vector<int32_t>& index) {
  for (size_t i = 0; i < index.size(); ++i) {
    if (index[i] != static_cast<int32_t>(i)) return false;
  }
  return true;
}

absl::StatusOr<InFlight> StartTransfer(comm::Communicator& ep, Stream& stream, ExchangeDirection direction,
                                       int chunk, const Tensor& send, const std::vector<int64_t>& send_rows,
                                       const std::vector<int64_t>& recv_rows) {
  const int64_t hidden = send.size(1);
  const int64_t total_recv = std::accumulate(recv_rows.begin(), recv_rows.end(), int64_t{0});
  InFlight f;
  f.direction = direction;
  f.chunk = chunk;
  f.hidden = hidden;
  f.send = send;
  ASSIGN_OR_RETURN(f.recv, Tensor::Empty(stream.backend(), Shape{total_recv, hidden}, send.dtype(),
                                         MemoryCategory::kCommunication));
  const std::vector<size_t> sc = Elements(send_rows, hidden), rc = Elements(recv_rows, hidden);
  auto enqueue = [&](Stream& side) {
    return ep.AllToAllV(send.raw_data(), sc, Displs(sc), f.recv.raw_data(), rc, Displs(rc), send.dtype(),
                        side);
  };
  ASSIGN_OR_RETURN(std::shared_ptr<Event> done, EnqueueOnSideStream(ep, stream, enqueue, {send, f.recv}));
  f.done = std::move(done);
  return f;
}

}  // namespace

absl::StatusOr<std::shared_ptr<Event>> EnqueueOnSideStream(
    comm::Communicator& comm, Stream& stream, const std::function<absl::Status(Stream&)>& enqueue,
    std::vector<Tensor> keep) {
  // The input was produced on `stream`: the side stream waits for it there.
  ASSIGN_OR_RETURN(Stream * side, comm.side_stream());
  ASSIGN_OR_RETURN(std::unique_ptr<Event> produced, stream.backend().CreateEvent());
  ASSIGN_OR_RETURN(std::unique_ptr<Event> done, stream.backend().CreateEvent());
  RETURN_IF_ERROR(stream.Record(*produced));
  RETURN_IF_ERROR(side->Wait(*produced));
  RETURN_IF_ERROR(enqueue(*side));
  // The buffers stay alive until the side stream has passed the operation,
  // whatever the caller frees meanwhile (a caching allocator's recordStream).
  RETURN_IF_ERROR(side->LaunchHostFunc([keep = std::move(keep)] { return absl::OkStatus(); }));
  RETURN_IF_ERROR(side->Record(*done));
  return std::shared_ptr<Event>(std::move(done));
}

absl::StatusOr<ExchangePlan> ExchangePlan::FromCounts(int num_ranks, int num_chunks, int64_t num_experts,
                                                      std::vector<int64_t> send_counts,
                                                      std::vector<int64_t> recv_counts) {
  if (num_ranks < 1 || num_chunks < 1 || num_experts < 1) {
    return absl::InvalidArgumentError(absl::StrCat("ExchangePlan: num_ranks = ", num_ranks,
                                                   ", num_chunks = ", num_chunks,
                                                   ", num_experts = ", num_experts, " must all be >= 1"));
  }
  const size_t n = static_cast<size_t>(num_chunks) * num_ranks * num_experts;
  if (send_counts.size() != n || recv_counts.size() != n) {
    return absl::InvalidArgumentError(absl::StrCat("ExchangePlan: count tables have ", send_counts.size(),
                                                   " (send) and ", recv_counts.size(),
                                                   " (recv) entries; chunks x ranks x experts = ", n));
  }
  for (size_t i = 0; i < n; ++i) {
    if (send_counts[i] < 0 || recv_counts[i] < 0) {
      return absl::InvalidArgumentError(absl::StrCat("ExchangePlan: negative count at entry ", i, " (send ",
                                                     send_counts[i], ", recv ", recv_counts[i], ")"));
    }
  }
  ExchangePlan p;
  p.num_ranks_ = num_ranks;
  p.num_chunks_ = num_chunks;
  p.num_experts_ = num_experts;
  p.send_ = std::move(send_counts);
  p.recv_ = std::move(recv_counts);
  return p;
}

absl::StatusOr<ExchangePlan> ExchangePlan::Create(comm::Communicator& ep, Stream& stream, int num_chunks,
                                                  int64_t num_experts,
                                                  absl::Span<const int64_t> send_counts) {
  const int P = ep.size();
  const size_t n = static_cast<size_t>(num_chunks) * P * num_experts;
  if (num_chunks < 1 || num_experts < 1 || send_counts.size() != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("ExchangePlan::Create: send_counts has ", send_counts.size(), " entries; num_chunks (",
                     num_chunks, ") x EP size (", P, ") x num_experts (", num_experts, ") = ", n));
  }
  // On the wire the block for peer p must be contiguous: [dst][chunk][e].
  const size_t block = static_cast<size_t>(num_chunks) * num_experts;
  std::vector<int64_t> wire(n);
  for (int c = 0; c < num_chunks; ++c) {
    for (int p = 0; p < P; ++p) {
      for (int64_t e = 0; e < num_experts; ++e) {
        wire[p * block + c * num_experts + e] =
            send_counts[(static_cast<size_t>(c) * P + p) * num_experts + e];
      }
    }
  }
  std::vector<int64_t> arrived(n);
  if (P == 1) {
    arrived = wire;
  } else {
    // Counts travel through tensors of the communicator's device (device
    // buffers under NCCL); the copy back below is the one host copy of counts
    // in a layer.
    Backend& backend = stream.backend();
    ASSIGN_OR_RETURN(Tensor send_t,
                     Tensor::FromHostOn(stream, Shape{static_cast<int64_t>(n)}, DType::kI64, wire.data(),
                                        n * sizeof(int64_t), MemoryCategory::kCommunication));
    ASSIGN_OR_RETURN(Tensor recv_t, Tensor::Empty(backend, Shape{static_cast<int64_t>(n)}, DType::kI64,
                                                  MemoryCategory::kCommunication));
    // Stream-ordered exchange, copy to host memory on the stream, then the
    // layer's one host wait.
    RETURN_IF_ERROR(ep.AllToAll(send_t.raw_data(), recv_t.raw_data(), block, DType::kI64, stream));
    Tensor host = recv_t;
    if (!recv_t.device().is_cpu()) {
      ASSIGN_OR_RETURN(Backend * cpu, GetBackend(Device::Cpu()));
      ASSIGN_OR_RETURN(host, Tensor::Empty(*cpu, Shape{static_cast<int64_t>(n)}, DType::kI64,
                                           MemoryCategory::kCommunication));
      RETURN_IF_ERROR(ops::Copy(stream, recv_t, host));
    }
    RETURN_IF_ERROR(stream.Synchronize());
    const int64_t* r = host.data<int64_t>();
    arrived.assign(r, r + n);
  }
  std::vector<int64_t> recv(n);
  for (int p = 0; p < P; ++p) {
    for (int c = 0; c < num_chunks; ++c) {
      for (int64_t e = 0; e < num_experts; ++e) {
        recv[(static_cast<size_t>(c) * P + p) * num_experts + e] = arrived[p * block + c * num_experts + e];
      }
    }
  }
  return FromCounts(P, num_chunks, num_experts, std::vector<int64_t>(send_counts.begin(), send_counts.end()),
                    std::move(recv));
}

int64_t ExchangePlan::num_send_rows(int chunk) const {
  int64_t s = 0;
  for (int p = 0; p < num_ranks_; ++p) {
    for (int64_t e = 0; e < num_experts_; ++e) s += send(chunk, p, e);
  }
  return s;
}

int64_t ExchangePlan::num_recv_rows(int chunk) const {
  int64_t s = 0;
  for (int p = 0; p < num_ranks_; ++p) {
    for (int64_t e = 0; e < num_experts_; ++e) s += recv(chunk, p, e);
  }
  return s;
}

std::vector<int64_t> ExchangePlan::ExpertOffsets(int chunk) const {
  std::vector<int64_t> o(num_experts_ + 1, 0);
  for (int64_t e = 0; e < num_experts_; ++e) {
    int64_t n = 0;
    for (int p = 0; p < num_ranks_; ++p) n += recv(chunk, p, e);
    o[e + 1] = o[e] + n;
  }
  return o;
}

std::vector<int64_t> ExchangePlan::SendRowsPerRank(int chunk) const {
  std::vector<int64_t> r(num_ranks_, 0);
  for (int p = 0; p < num_ranks_; ++p) {
    for (int64_t e = 0; e < num_experts_; ++e) r[p] += send(chunk, p, e);
  }
  return r;
}

std::vector<int64_t> ExchangePlan::RecvRowsPerRank(int chunk) const {
  std::vector<int64_t> r(num_ranks_, 0);
  for (int p = 0; p < num_ranks_; ++p) {
    for (int64_t e = 0; e < num_experts_; ++e) r[p] += recv(chunk, p, e);
  }
  return r;
}

std::vector<int32_t> GroupedFromArrival(const ExchangePlan& plan, int chunk) {
  const int P = plan.num_ranks();
  const int64_t E = plan.num_experts();
  // Start of block (src, e) in the arrival order.
  std::vector<int64_t> start(static_cast<size_t>(P) * E);
  int64_t pos = 0;
  for (int p = 0; p < P; ++p) {
    for (int64_t e = 0; e < E; ++e) {
      start[p * E + e] = pos;
      pos += plan.recv(chunk, p, e);
    }
  }
  std::vector<int32_t> index;
  index.reserve(pos);
  for (int64_t e = 0; e < E; ++e) {
    for (int p = 0; p < P; ++p) {
      const int64_t n = plan.recv(chunk, p, e);
      for (int64_t i = 0; i < n; ++i) index.push_back(static_cast<int32_t>(start[p * E + e] + i));
    }
  }
  return index;
}

absl::StatusOr<InFlight> StartDispatch(comm::Communicator& ep, Stream& stream, const ExchangePlan& plan,
                                       int chunk, const Tensor& rows) {
  RETURN_IF_ERROR(CheckChunk("StartDispatch", plan, chunk));
  RETURN_IF_ERROR(CheckRows("StartDispatch", rows, plan.num_send_rows(chunk)));
  if (ep.size() != plan.num_ranks()) {
    return absl::InvalidArgumentError(absl::StrCat("StartDispatch: communicator '", ep.name(), "' has ",
                                                   ep.size(), " ranks but the plan ", plan.num_ranks()));
  }
  return StartTransfer(ep, stream, ExchangeDirection::kDispatch, chunk, rows, plan.SendRowsPerRank(chunk),
                       plan.RecvRowsPerRank(chunk));
}

absl::Status ExposedCommTimer::Wait(Stream& stream, const Event& done) {
  ASSIGN_OR_RETURN(std::unique_ptr<Event> before, stream.backend().CreateEvent());
  ASSIGN_OR_RETURN(std::unique_ptr<Event> after, stream.backend().CreateEvent());
  RETURN_IF_ERROR(stream.Record(*before));
  RETURN_IF_ERROR(stream.Wait(done));
  RETURN_IF_ERROR(stream.Record(*after));
  waits_.emplace_back(std::move(before), std::move(after));
  return absl::OkStatus();
}

absl::StatusOr<double> ExposedCommTimer::Collect() {
  double ms = 0;
  for (const auto& [before, after] : waits_) {
    ASSIGN_OR_RETURN(double d, after->ElapsedMsSince(*before));
    ms += d;
  }
  waits_.clear();
  return ms * 1e-3;
}

absl::StatusOr<Tensor> FinishDispatch(Stream& stream, const ExchangePlan& plan, InFlight& in_flight,
                                      ExposedCommTimer* timer) {
  if (!in_flight.started() || in_flight.direction != ExchangeDirection::kDispatch) {
    return absl::FailedPreconditionError("FinishDispatch: no dispatch in flight (call StartDispatch first)");
  }
  RETURN_IF_ERROR(timer != nullptr ? timer->Wait(stream, *in_flight.done) : stream.Wait(*in_flight.done));
  const std::vector<int32_t> index = GroupedFromArrival(plan, in_flight.chunk);
  Tensor out;
  if (IsIdentity(index)) {
    out = in_flight.recv;
  } else {
    ASSIGN_OR_RETURN(out, Permute(stream, in_flight.recv, index));
  }
  in_flight = InFlight();
  return out;
}

absl::StatusOr<InFlight> StartCombine(comm::Communicator& ep, Stream& stream, const ExchangePlan& plan,
                                      int chunk, const Tensor& rows) {
  RETURN_IF_ERROR(CheckChunk("StartCombine", plan, chunk));
  RETURN_IF_ERROR(CheckRows("StartCombine", rows, plan.num_recv_rows(chunk)));
  if (ep.size() != plan.num_ranks()) {
    return absl::InvalidArgumentError(absl::StrCat("StartCombine: communicator '", ep.name(), "' has ",
                                                   ep.size(), " ranks but the plan ", plan.num_ranks()));
  }
  // Back to the arrival order (src, e): the inverse of the dispatch reorder.
  const std::vector<int32_t> grouped_from_arrival = GroupedFromArrival(plan, chunk);
  Tensor send = rows;
  if (!IsIdentity(grouped_from_arrival)) {
    std::vector<int32_t> arrival_from_grouped(grouped_from_arrival.size());
    for (size_t g = 0; g < grouped_from_arrival.size(); ++g) {
      arrival_from_grouped[grouped_from_arrival[g]] = static_cast<int32_t>(g);
    }
    ASSIGN_OR_RETURN(send, Permute(stream, rows, arrival_from_grouped));
  }
  return StartTransfer(ep, stream, ExchangeDirection::kCombine, chunk, send, plan.RecvRowsPerRank(chunk),
                       plan.SendRowsPerRank(chunk));
}

absl::StatusOr<Tensor> FinishCombine(Stream& stream, const ExchangePlan& plan, InFlight& in_flight,
                                     ExposedCommTimer* timer) {
  (void)plan;
  if (!in_flight.started() || in_flight.direction != ExchangeDirection::kCombine) {
    return absl::FailedPreconditionError("FinishCombine: no combine in flight (call StartCombine first)");
  }
  RETURN_IF_ERROR(timer != nullptr ? timer->Wait(stream, *in_flight.done) : stream.Wait(*in_flight.done));
  Tensor out = in_flight.recv;
  in_flight = InFlight();
  return out;
}

absl::StatusOr<Tensor> Dispatch(comm::Communicator& ep, Stream& stream, const ExchangePlan& plan, int chunk,
                                const Tensor& rows) {
  ASSIGN_OR_RETURN(InFlight f, StartDispatch(ep, stream, plan, chunk, rows));
  return FinishDispatch(stream, plan, f);
}

absl::StatusOr<Tensor> Combine(comm::Communicator& ep, Stream& stream, const ExchangePlan& plan, int chunk,
                               const Tensor& rows) {
  ASSIGN_OR_RETURN(InFlight f, StartCombine(ep, stream, plan, chunk, rows));
  return FinishCombine(stream, plan, f);
}

}  // namespace moe::parallel
