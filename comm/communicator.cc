#include "comm/communicator.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "comm/args_check.h"
#include "comm/mpi_communicator.h"
#include "comm/mpi_env.h"
#include "runtime/core/config.h"
#include "runtime/core/status.h"
#ifdef MOE_WITH_CUDA
#include "comm/cuda/nccl_communicator.h"
#endif

namespace moe::comm {

const char* ReduceOpName(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return "sum";
    case ReduceOp::kAvg:
      return "avg";
    case ReduceOp::kMax:
      return "max";
    case ReduceOp::kMin:
      return "min";
  }
  return "?";
}

Communicator::Communicator(int rank, int size, std::vector<int> group_ranks, CommOptions options)
    : rank_(rank),
      size_(size),
      group_ranks_(std::move(group_ranks)),
      options_(std::move(options)),
      timeout_s_(options_.timeout_s) {}

absl::Status Communicator::set_timeout_s(double seconds) {
  if (!(seconds > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("communicator '", name(), "': timeout_s = ", seconds, " must be > 0 seconds"));
  }
  timeout_s_ = seconds;
  return absl::OkStatus();
}

absl::StatusOr<Work> Communicator::CheckAndSubmit(OpDesc op) {
  RETURN_IF_ERROR(CheckArgs(&op, rank_, size_, device(), backend_name()));
  op.sequence = next_sequence_++;
  op.timeout_s = timeout_s_.load();
  op.enqueued = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(Work work, Submit(std::move(op)));
  last_ = work;
  return work;
}

absl::Status Communicator::Synchronize() {
  Work last = last_;
  return last.Wait();
}

absl::StatusOr<std::unique_ptr<Communicator>> Communicator::Split(int color, int key, std::string name) {
  OpDesc op;
  op.kind = OpKind::kSplit;
  op.split_color = color;
  op.split_key = key;
  RETURN_IF_ERROR(CheckArgs(&op, rank_, size_, device(), backend_name()));
  op.sequence = next_sequence_++;
  op.timeout_s = timeout_s_.load();
  op.enqueued = std::chrono::steady_clock::now();
  CommOptions child = options_;
  child.timeout_s = timeout_s_.load();
  child.name = name.empty() ? absl::StrCat(options_.name, "/", color) : std::move(name);
  return SplitImpl(std::move(op), std::move(child));
}

absl::StatusOr<Work> Communicator::AllReduce(const void* send, void* recv, size_t count, DType dtype,
                                             ReduceOp op) {
  OpDesc d;
  d.kind = OpKind::kAllReduce;
  d.send = send;
  d.recv = recv;
  d.count = count;
  d.dtype = dtype;
  d.op = op;
  return CheckAndSubmit(std::move(d));
}

absl::StatusOr<Work> Communicator::Broadcast(const void* send, void* recv, size_t count, DType dtype,
                                             int root) {
  OpDesc d;
  d.kind = OpKind::kBroadcast;
  d.send = send;
  d.recv = recv;
  d.count = count;
  d.dtype = dtype;
  d.root = root;
  return CheckAndSubmit(std::move(d));
}

absl::StatusOr<Work> Communicator::AllGather(const void* send, void* recv, size_t count, DType dtype) {
  OpDesc d;
  d.kind = OpKind::kAllGather;
  d.send = send;
  d.recv = recv;
  d.count = count;
  d.dtype = dtype;
  return CheckAndSubmit(std::move(d));
}

absl::StatusOr<Work> Communicator::AllGatherV(const void* send, size_t send_count, void* recv,
                                              absl::Span<const size_t> recv_counts,
                                              absl::Span<const size_t> recv_displs, DType dtype) {
  OpDesc d;
  d.kind = OpKind::kAllGatherV;
  d.send = send;
  d.recv = recv;
  d.count = send_count;
  d.dtype = dtype;
  d.recv_counts.assign(recv_counts.begin(), recv_counts.end());
  d.recv_displs.assign(recv_displs.begin(), recv_displs.end());
  return CheckAndSubmit(std::move(d));
}

absl::StatusOr<Work> Communicator::ReduceScatter(const void* send, void* recv, size_t count, DType dtype,
                                                 ReduceOp op) {
  OpDesc d;
  d.kind = OpKind::kReduceScatter;
  d.send = send;
  d.recv = recv;
  d.count = count;
  d.dtype = dtype;
  d.op = op;
  return CheckAndSubmit(std::move(d));
}

absl::StatusOr<Work> Communicator::AllToAll(const void* send, void* recv, size_t count, DType dtype) {
  OpDesc d;
  d.kind = OpKind::kAllToAll;
  d.send = send;
  d.recv = recv;
  d.count = count;
  d.dtype = dtype;
  return CheckAndSubmit(std::move(d));
}

absl::StatusOr<Work> Communicator::AllToAllV(const void* send, absl::Span<const size_t> send_counts,
                                             absl::Span<const size_t> send_displs, void* recv,
                                             absl::Span<const size_t> recv_counts,
                                             absl::Span<const size_t> recv_displs, DType dtype) {
  OpDesc d;
  d.kind = OpKind::kAllToAllV;
  d.send = send;
  d.recv = recv;
  d.dtype = dtype;
  d.send_counts.assign(send_counts.begin(), send_counts.end());
  d.send_displs.assign(send_displs.begin(), send_displs.end());
  d.recv_counts.assign(recv_counts.begin(), recv_counts.end());
  d.recv_displs.assign(recv_displs.begin(), recv_displs.end());
  return CheckAndSubmit(std::move(d));
}

absl::StatusOr<Work> Communicator::Send(const void* buf, size_t count, DType dtype, int peer) {
  OpDesc d;
  d.kind = OpKind::kSend;
  d.send = buf;
  d.count = count;
  d.dtype = dtype;
  d.root = peer;
  d.p2p.push_back(P2POp::Send(buf, count, dtype, peer));
  return CheckAndSubmit(std::move(d));
}

absl::StatusOr<Work> Communicator::Recv(void* buf, size_t count, DType dtype, int peer) {
  OpDesc d;
  d.kind = OpKind::kRecv;
  d.recv = buf;
  d.count = count;
  d.dtype = dtype;
  d.root = peer;
  d.p2p.push_back(P2POp::Recv(buf, count, dtype, peer));
  return CheckAndSubmit(std::move(d));
}

absl::StatusOr<Work> Communicator::GroupP2P(absl::Span<const P2POp> ops) {
  OpDesc d;
  d.kind = OpKind::kGroupP2P;
  d.p2p.assign(ops.begin(), ops.end());
  return CheckAndSubmit(std::move(d));
}

absl::StatusOr<Work> Communicator::Barrier() {
  OpDesc d;
  d.kind = OpKind::kBarrier;
  return CheckAndSubmit(std::move(d));
}

absl::StatusOr<CommOptions> CommOptionsFromConfig(const config::CommConfig& config) {
  CommOptions options;
  if (config.has_timeout_s()) options.timeout_s = config.timeout_s();
  if (config.has_backend()) options.backend = config.backend();
  if (!(options.timeout_s > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("comm.timeout_s = ", options.timeout_s, " must be > 0 seconds (default 600)"));
  }
  if (options.backend != "auto" && options.backend != "mpi" && options.backend != "nccl") {
    return absl::InvalidArgumentError(
        absl::StrCat("comm.backend = '", options.backend, "' must be one of auto, mpi, nccl"));
  }
  return options;
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateWorldCommunicator(const CommOptions& options) {
  if (!MpiEnv::initialized()) {
    return absl::FailedPreconditionError(
        "CreateWorldCommunicator: MPI is not initialised; call MpiEnv::Init first");
  }
  if (!(options.timeout_s > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("CreateWorldCommunicator: timeout_s = ", options.timeout_s, " must be > 0 seconds"));
  }
  std::string backend = options.backend;
  if (backend == "auto") {
#ifdef MOE_WITH_CUDA
    backend = NcclAvailable() ? "nccl" : "mpi";
#else
    backend = "mpi";
#endif
  }
  if (backend == "mpi") return CreateMpiWorldCommunicator(options);
  if (backend == "nccl") {
#ifdef MOE_WITH_CUDA
    return CreateNcclWorldCommunicator(options);
#else
    return absl::FailedPreconditionError(
        "comm.backend = 'nccl' but this build has no CUDA; configure with -DMOE_WITH_CUDA=ON or use 'mpi'");
#endif
  }
  return absl::InvalidArgumentError(
      absl::StrCat("comm.backend = '", backend, "' must be one of auto, mpi, nccl"));
}

}  // namespace moe::comm
