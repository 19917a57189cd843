#include "comm/communicator.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "comm/args_check.h"
#include "comm/comm_wrapper.h"
#include "comm/mpi_communicator.h"
#include "comm/mpi_env.h"
#include "runtime/core/backend.h"
#include "runtime/core/config.h"
#include "runtime/core/status.h"
#include "runtime/core/trace.h"
#ifdef MOE_WITH_NCCL  // comm/cuda, in every build with CUDA (comm/CMakeLists.txt)
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

// The side stream dies here, after the backend's destructor ran every
// enqueued operation (their stream items wait only for those).
Communicator::~Communicator() = default;

// An MPI communicator of a job whose tensors are on a GPU stages their
// buffers (host_staging.h): its side stream is one of that GPU.
absl::StatusOr<Stream*> Communicator::side_stream() {
  if (side_stream_ == nullptr) {
    ASSIGN_OR_RETURN(Backend * backend, GetBackend(StagesDeviceBuffers() ? options_.device : device()));
    ASSIGN_OR_RETURN(side_stream_, backend->CreateStream(StreamMode::kWorker));
  }
  return side_stream_.get();
}

absl::Status Communicator::set_timeout_s(double seconds, const char* field) {
  if (!(seconds > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("communicator '", name(), "': timeout_s = ", seconds, " must be > 0 seconds"));
  }
  timeout_s_ = seconds;
  timeout_field_ = field;
  return absl::OkStatus();
}

bool Communicator::StagesDeviceBuffers() const {
  return device().is_cpu() && absl::string_view(backend_name()) == "mpi";
}

absl::StatusOr<Work> Communicator::CheckAndSubmit(OpDesc op) {
  RETURN_IF_ERROR(CheckArgs(&op, rank_, size_, device(), backend_name()));
  if (options_.stage_through_host && StagesDeviceBuffers()) {
    op.staged = true;
    op.staged_device = device();
  }
  op.sequence = next_sequence_++;
  op.timeout_s = timeout_s_.load();
  op.timeout_field = timeout_field_.load();
  op.enqueued = std::chrono::steady_clock::now();
  const trace::Label label = trace::CurrentLabel();
  op.phase = label.phase;
  op.layer = label.layer;
  ASSIGN_OR_RETURN(Work work, Submit(std::move(op)));
  last_ = work;
  return work;
}

absl::Status CompletionState::Wait() {
  RETURN_IF_ERROR(RefuseWaitInHostFunction("comm::Work::Wait"));
  return done_.Wait();
}

absl::Status Work::Wait() const {
  if (!state_) return absl::OkStatus();
  CountHostSync();
  return state_->Wait();
}

absl::Status Communicator::CheckAndEnqueue(OpDesc op, Stream& stream) {
  // A host-executing communicator given a stream of another device takes that
  // device's buffers and stages them through host memory.
  const Device stream_device = stream.backend().device();
  const bool stage = StagesDeviceBuffers() && (!(stream_device == device()) || options_.stage_through_host);
  RETURN_IF_ERROR(CheckArgs(&op, rank_, size_, stage ? stream_device : device(), backend_name()));
  if (stage) {
    op.staged = true;
    op.staged_device = stream_device;
  } else if (!(stream_device == device())) {
    return absl::InvalidArgumentError(
        absl::StrCat(OpKindName(op.kind), " on communicator '", name(), "' (", backend_name(),
                     ", buffers on ", device().ToString(), "): the stream is on ",
                     stream.backend().device().ToString(), "; pass a stream of ", device().ToString()));
  }
  op.sequence = next_sequence_++;
  op.timeout_s = timeout_s_.load();
  op.timeout_field = timeout_field_.load();
  op.enqueued = std::chrono::steady_clock::now();
  const trace::Label label = trace::CurrentLabel();
  op.phase = label.phase;
  op.layer = label.layer;
  ASSIGN_OR_RETURN(Work work, SubmitOnStream(std::move(op), stream));
  last_ = work;
  return absl::OkStatus();
}

absl::StatusOr<Work> Communicator::SubmitOnStream(OpDesc op, Stream& stream) {
  ASSIGN_OR_RETURN(std::unique_ptr<Event> marker, stream.backend().CreateEvent());
  RETURN_IF_ERROR(stream.Record(*marker));
  op.after = std::shared_ptr<const Event>(std::move(marker));
  ASSIGN_OR_RETURN(Work work, Submit(std::move(op)));
  // The stream's later work waits on a host gate that the operation's
  // completion opens (on CPU the stream's device, its worker or for an inline
  // stream the calling thread, waits for it; on CUDA a kernel does). Not a
  // host function that waits: CUDA forbids those (it may run every stream's
  // host functions on one thread, and the operation may be queued behind
  // another stream's).
  std::shared_ptr<WorkState> state = work.shared_state();
  if (state == nullptr) return work;
  auto gate = std::make_shared<HostGate>();
  state->OnDone(
      [gate](const absl::Status& status) { gate->Open(status); });  // first: an inline stream waits now
  RETURN_IF_ERROR(stream.WaitHostGate(gate));
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
  op.timeout_field = timeout_field_.load();
  op.enqueued = std::chrono::steady_clock::now();
  CommOptions child = options_;
  child.timeout_s = timeout_s_.load();
  child.name = name.empty() ? absl::StrCat(options_.name, "/", color) : std::move(name);
  return SplitImpl(std::move(op), std::move(child));
}

namespace {

// The descriptions of the operations, shared by the host and stream forms.
OpDesc Typed(OpKind kind, const void* send, void* recv, size_t count, DType dtype) {
  OpDesc d;
  d.kind = kind;
  d.send = send;
  d.recv = recv;
  d.count = count;
  d.dtype = dtype;
  return d;
}
OpDesc Reduce(OpKind kind, const void* send, void* recv, size_t count, DType dtype, ReduceOp op) {
  OpDesc d = Typed(kind, send, recv, count, dtype);
  d.op = op;
  return d;
}
OpDesc Bcast(const void* send, void* recv, size_t count, DType dtype, int root) {
  OpDesc d = Typed(OpKind::kBroadcast, send, recv, count, dtype);
  d.root = root;
  return d;
}
OpDesc GatherV(const void* send, size_t send_count, void* recv, absl::Span<const size_t> recv_counts,
               absl::Span<const size_t> recv_displs, DType dtype) {
  OpDesc d = Typed(OpKind::kAllGatherV, send, recv, send_count, dtype);
  d.recv_counts.assign(recv_counts.begin(), recv_counts.end());
  d.recv_displs.assign(recv_displs.begin(), recv_displs.end());
  return d;
}
OpDesc ToAllV(const void* send, absl::Span<const size_t> send_counts, absl::Span<const size_t> send_displs,
              void* recv, absl::Span<const size_t> recv_counts, absl::Span<const size_t> recv_displs,
              DType dtype) {
  OpDesc d = Typed(OpKind::kAllToAllV, send, recv, 0, dtype);
  d.send_counts.assign(send_counts.begin(), send_counts.end());
  d.send_displs.assign(send_displs.begin(), send_displs.end());
  d.recv_counts.assign(recv_counts.begin(), recv_counts.end());
  d.recv_displs.assign(recv_displs.begin(), recv_displs.end());
  return d;
}
OpDesc P2P(absl::Span<const P2POp> ops) {
  OpDesc d;
  d.kind = OpKind::kGroupP2P;
  d.p2p.assign(ops.begin(), ops.end());
  return d;
}

}  // namespace

absl::StatusOr<Work> Communicator::AllReduce(const void* send, void* recv, size_t count, DType dtype,
                                             ReduceOp op) {
  return CheckAndSubmit(Reduce(OpKind::kAllReduce, send, recv, count, dtype, op));
}

absl::StatusOr<Work> Communicator::Broadcast(const void* send, void* recv, size_t count, DType dtype,
                                             int root) {
  return CheckAndSubmit(Bcast(send, recv, count, dtype, root));
}

absl::StatusOr<Work> Communicator::AllGather(const void* send, void* recv, size_t count, DType dtype) {
  return CheckAndSubmit(Typed(OpKind::kAllGather, send, recv, count, dtype));
}

absl::StatusOr<Work> Communicator::AllGatherV(const void* send, size_t send_count, void* recv,
                                              absl::Span<const size_t> recv_counts,
                                              absl::Span<const size_t> recv_displs, DType dtype) {
  return CheckAndSubmit(GatherV(send, send_count, recv, recv_counts, recv_displs, dtype));
}

absl::StatusOr<Work> Communicator::ReduceScatter(const void* send, void* recv, size_t count, DType dtype,
                                                 ReduceOp op) {
  return CheckAndSubmit(Reduce(OpKind::kReduceScatter, send, recv, count, dtype, op));
}

absl::StatusOr<Work> Communicator::AllToAll(const void* send, void* recv, size_t count, DType dtype) {
  return CheckAndSubmit(Typed(OpKind::kAllToAll, send, recv, count, dtype));
}

absl::StatusOr<Work> Communicator::AllToAllV(const void* send, absl::Span<const size_t> send_counts,
                                             absl::Span<const size_t> send_displs, void* recv,
                                             absl::Span<const size_t> recv_counts,
                                             absl::Span<const size_t> recv_displs, DType dtype) {
  return CheckAndSubmit(ToAllV(send, send_counts, send_displs, recv, recv_counts, recv_displs, dtype));
}

absl::StatusOr<Work> Communicator::Send(const void* buf, size_t count, DType dtype, int peer) {
  OpDesc d = Typed(OpKind::kSend, buf, nullptr, count, dtype);
  d.root = peer;
  d.p2p.push_back(P2POp::Send(buf, count, dtype, peer));
  return CheckAndSubmit(std::move(d));
}

absl::StatusOr<Work> Communicator::Recv(void* buf, size_t count, DType dtype, int peer) {
  OpDesc d = Typed(OpKind::kRecv, nullptr, buf, count, dtype);
  d.root = peer;
  d.p2p.push_back(P2POp::Recv(buf, count, dtype, peer));
  return CheckAndSubmit(std::move(d));
}

absl::StatusOr<Work> Communicator::GroupP2P(absl::Span<const P2POp> ops) { return CheckAndSubmit(P2P(ops)); }

absl::StatusOr<Work> Communicator::Barrier() {
  OpDesc d;
  d.kind = OpKind::kBarrier;
  return CheckAndSubmit(std::move(d));
}

absl::Status Communicator::AllReduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op,
                                     Stream& stream) {
  return CheckAndEnqueue(Reduce(OpKind::kAllReduce, send, recv, count, dtype, op), stream);
}

absl::Status Communicator::Broadcast(const void* send, void* recv, size_t count, DType dtype, int root,
                                     Stream& stream) {
  return CheckAndEnqueue(Bcast(send, recv, count, dtype, root), stream);
}

absl::Status Communicator::AllGather(const void* send, void* recv, size_t count, DType dtype,
                                     Stream& stream) {
  return CheckAndEnqueue(Typed(OpKind::kAllGather, send, recv, count, dtype), stream);
}

absl::Status Communicator::AllGatherV(const void* send, size_t send_count, void* recv,
                                      absl::Span<const size_t> recv_counts,
                                      absl::Span<const size_t> recv_displs, DType dtype, Stream& stream) {
  return CheckAndEnqueue(GatherV(send, send_count, recv, recv_counts, recv_displs, dtype), stream);
}

absl::Status Communicator::ReduceScatter(const void* send, void* recv, size_t count, DType dtype, ReduceOp op,
                                         Stream& stream) {
  return CheckAndEnqueue(Reduce(OpKind::kReduceScatter, send, recv, count, dtype, op), stream);
}

absl::Status Communicator::AllToAll(const void* send, void* recv, size_t count, DType dtype, Stream& stream) {
  return CheckAndEnqueue(Typed(OpKind::kAllToAll, send, recv, count, dtype), stream);
}

absl::Status Communicator::AllToAllV(const void* send, absl::Span<const size_t> send_counts,
                                     absl::Span<const size_t> send_displs, void* recv,
                                     absl::Span<const size_t> recv_counts,
                                     absl::Span<const size_t> recv_displs, DType dtype, Stream& stream) {
  return CheckAndEnqueue(ToAllV(send, send_counts, send_displs, recv, recv_counts, recv_displs, dtype),
                         stream);
}

absl::Status Communicator::GroupP2P(absl::Span<const P2POp> ops, Stream& stream) {
  return CheckAndEnqueue(P2P(ops), stream);
}

std::string NcclNeedsCudaMessage(const std::string& device) {
  return absl::StrCat("comm.backend = \"nccl\" moves device buffers, but train.device = \"", device,
                      "\" keeps tensors on the host; set comm.backend = \"mpi\" or \"auto\" (auto = nccl for "
                      "cuda, mpi for cpu), or train.device = \"cuda\"");
}

absl::StatusOr<CommOptions> CommOptionsFromConfig(const config::CommConfig& config,
                                                  const std::string& device) {
  CommOptions options;
  ASSIGN_OR_RETURN(options.device, ParseDevice(device));
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
  if (options.backend == "nccl" && options.device.is_cpu()) {
    return absl::InvalidArgumentError(NcclNeedsCudaMessage(device));
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
  if (backend == "auto") backend = options.device.is_cpu() ? "mpi" : "nccl";
  if (backend == "nccl" && options.device.is_cpu()) {
    return absl::InvalidArgumentError(NcclNeedsCudaMessage(options.device.ToString()));
  }
  if (backend == "mpi") {
    // MOE_COMM_LINK / MOE_COMM_FAULT wrap the world (comm_wrapper.h); its splits inherit it.
    ASSIGN_OR_RETURN(WrapperOptions wrap, WrapperOptionsFromEnv());
    ASSIGN_OR_RETURN(std::unique_ptr<Communicator> world, CreateMpiWorldCommunicator(options));
    if (!wrap.active()) return world;
    return WrapCommunicator(std::move(world), std::move(wrap));
  }
  if (backend == "nccl") {
#ifdef MOE_WITH_NCCL
    return CreateNcclWorldCommunicator(options);
#else
    return absl::FailedPreconditionError(
        "comm.backend = 'nccl' but this build has no NCCL; configure with -DMOE_WITH_CUDA=ON or use 'mpi'");
#endif
  }
  return absl::InvalidArgumentError(
      absl::StrCat("comm.backend = '", backend, "' must be one of auto, mpi, nccl"));
}

}  // namespace moe::comm
