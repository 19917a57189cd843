#include "comm/cuda/nccl_communicator.h"

#include <mpi.h>
#include <nccl.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "comm/cuda/nccl_check.h"
#include "comm/mpi_env.h"
#include "comm/watchdog.h"
#include "runtime/core/backend.h"
#include "runtime/core/cuda/cuda_check.h"
#include "runtime/core/cuda/cuda_handles.h"
#include "runtime/core/status.h"

namespace moe::comm {
namespace {

using cuda::CudaEvent;
using cuda::CudaStream;
using cuda::UseDevice;

using Clock = std::chrono::steady_clock;

ncclDataType_t NcclType(DType t) {
  switch (t) {
    case DType::kF32:
      return ncclFloat32;
    case DType::kBF16:
      return ncclBfloat16;
    case DType::kI32:
      return ncclInt32;
    case DType::kI64:
      return ncclInt64;
    case DType::kU8:
      return ncclUint8;
    case DType::kF64:
      return ncclFloat64;
  }
  return ncclFloat32;
}

ncclRedOp_t NcclOp(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return ncclSum;
    case ReduceOp::kAvg:
      return ncclAvg;
    case ReduceOp::kMax:
      return ncclMax;
    case ReduceOp::kMin:
      return ncclMin;
  }
  return ncclSum;
}

class NcclWork : public CompletionState {};

// An operation on the stream, between its two events.
struct Issued {
  OpDesc op;
  CudaEvent start, end;
  bool started = false;
  Clock::time_point started_at;
  std::shared_ptr<NcclWork> work;
};

// Communicators are non-blocking (ncclConfig_t.blocking = 0): NCCL calls
// return ncclInProgress while their host-side work goes on, and this waits
// for the communicator to be ready by polling ncclCommGetAsyncError, so a
// stuck initialisation, split or enqueue returns an error naming the call
// after `timeout_s` (the caller then aborts the communicator with
// ncclCommAbort) instead of hanging the rank.
absl::Status WaitNcclReady(ncclComm_t comm, double timeout_s, const char* what) {
  const auto deadline =
      Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s));
  for (;;) {
    ncclResult_t state = ncclSuccess;
    NCCL_RETURN_IF_ERROR(ncclCommGetAsyncError(comm, &state));
    if (state == ncclSuccess) return absl::OkStatus();
    if (state != ncclInProgress) return NcclStatus(state, what, __FILE__, __LINE__);
    if (Clock::now() > deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          what, " did not complete within comm.timeout_s = ", timeout_s, " s; communicator aborted"));
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

ncclConfig_t NonBlockingConfig() {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  return config;
}

class NcclCommunicator : public Communicator, public Watched, public CudaStreamOrdering {
 public:
  static absl::StatusOr<std::unique_ptr<Communicator>> Create(ncclComm_t nccl, MPI_Comm mpi, int device,
                                                              CommOptions options) {
    int rank = 0, size = 0;
    MPI_RETURN_IF_ERROR(MPI_Comm_rank(mpi, &rank));
    MPI_RETURN_IF_ERROR(MPI_Comm_size(mpi, &size));
    int nccl_rank = -1;
    NCCL_RETURN_IF_ERROR(ncclCommUserRank(nccl, &nccl_rank));
    if (nccl_rank != rank) {
      return absl::InternalError(
          absl::StrCat("NCCL rank ", nccl_rank, " differs from the MPI rank ", rank, " of the same group"));
    }
    std::vector<int> world_ranks(size);
    int me = MpiEnv::world_rank();
    MPI_RETURN_IF_ERROR(MPI_Allgather(&me, 1, MPI_INT, world_ranks.data(), 1, MPI_INT, mpi));
    ASSIGN_OR_RETURN(CudaStream stream, CudaStream::Create(device));
    void* scratch = nullptr;
    {
      UseDevice(device);
      CUDA_RETURN_IF_ERROR(cudaMalloc(&scratch, sizeof(int32_t)));
    }
    return std::unique_ptr<Communicator>(new NcclCommunicator(nccl, mpi, device, std::move(stream), scratch,
                                                              rank, size, std::move(world_ranks),
                                                              std::move(options)));
  }

  ~NcclCommunicator() override {
    {
      std::unique_lock<std::mutex> lock(mu_);
      drained_.wait(lock, [&] { return issued_.empty(); });
      stop_ = true;
    }
    cv_.notify_all();
    poller_.join();
    WatchdogUnregister(this);
    UseDevice(device_);
    if (!aborted_.load()) {
      // Non-blocking: finalize (flushes NCCL's outstanding work), wait, destroy.
      ncclCommFinalize(nccl_);
      if (WaitNcclReady(nccl_, timeout_s(), "ncclCommFinalize").ok())
        ncclCommDestroy(nccl_);
      else
        ncclCommAbort(nccl_);
    }
    cudaFree(scratch_);
    if (MpiEnv::initialized()) MPI_Comm_free(&mpi_);
  }

  Device device() const override { return Device::Cuda(device_); }
  const char* backend_name() const override { return "nccl"; }
  cudaStream_t stream() const override { return stream_.get(); }

  absl::Status WaitForStream(cudaStream_t compute) override {
    UseDevice(device_);
    ASSIGN_OR_RETURN(CudaEvent e, CudaEvent::Create(device_));
    RETURN_IF_ERROR(e.Record(compute));
    CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream_.get(), e.get(), 0));
    return absl::OkStatus();  // destroying a recorded event is allowed; the wait stays
  }

  absl::Status MakeStreamWait(cudaStream_t compute) override {
    UseDevice(device_);
    ASSIGN_OR_RETURN(CudaEvent e, CudaEvent::Create(device_));
    RETURN_IF_ERROR(e.Record(stream_.get()));
    CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(compute, e.get(), 0));
    return absl::OkStatus();
  }

  void Collect(std::vector<InFlight::Snapshot>* running) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (issued_.empty() || !issued_.front()->started) return;
    const OpDesc& op = issued_.front()->op;
    running->push_back({true, op.kind, op.sequence, op.bytes_sent, op.bytes_received, op.timeout_s,
                        issued_.front()->started_at, op.timeout_field});
  }
  std::string Describe() const override { return describe_; }
  std::string GroupName() const override { return name(); }
  std::vector<int> PeerWorldRanks() const override { return group_ranks(); }
  void AbortBackend() override {
    if (!aborted_.exchange(true)) ncclCommAbort(nccl_);
  }

 protected:
  // The stream-ordered form: the communicator's stream waits for `stream`'s
  // work so far, runs the operation, and `stream` waits for it (both
  // cudaStreamWaitEvent: no host wait). Buffers are device memory.
  absl::StatusOr<Work> SubmitOnStream(OpDesc op, Stream& stream) override {
    cudaStream_t s = static_cast<cudaStream_t>(stream.native_handle());
    if (s == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(OpKindName(op.kind), " on communicator '", name(),
                                                     "' (nccl): the stream has no CUDA stream; pass a stream "
                                                     "of the CUDA backend of ",
                                                     device().ToString()));
    }
    RETURN_IF_ERROR(WaitForStream(s));
    ASSIGN_OR_RETURN(Work work, Submit(std::move(op)));
    RETURN_IF_ERROR(MakeStreamWait(s));
    return work;
  }

  absl::StatusOr<Work> Submit(OpDesc op) override {
    if (op.inject) {
      return absl::InvalidArgumentError(
          "CommWrapper link shaping and faults wrap host-executing backends (mpi), not nccl");
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_.ok()) return error_;
    }
    UseDevice(device_);
    auto issued = std::make_unique<Issued>();
    ASSIGN_OR_RETURN(issued->start, CudaEvent::Create(device_));
    ASSIGN_OR_RETURN(issued->end, CudaEvent::Create(device_));
    RETURN_IF_ERROR(issued->start.Record(stream_.get()));
    RETURN_IF_ERROR(Launch(op));
    if (absl::Status ready = WaitNcclReady(nccl_, timeout_s(), OpKindName(op.kind)); !ready.ok()) {
      AbortBackend();  // the enqueue (not the transfer) failed or hung
      return ready;
    }
    RETURN_IF_ERROR(issued->end.Record(stream_.get()));
    issued->work = std::make_shared<NcclWork>();
    issued->op = std::move(op);
    Work work(issued->work, issued->op.sequence);
    {
      std::lock_guard<std::mutex> lock(mu_);
      issued_.push_back(std::move(issued));
    }
    cv_.notify_one();
    return work;
  }

  absl::StatusOr<std::unique_ptr<Communicator>> SplitImpl(OpDesc op, CommOptions child) override {
    const int color = op.split_color == kNoColor ? NCCL_SPLIT_NOCOLOR : op.split_color;
    MPI_Comm mpi_child = MPI_COMM_NULL;
    MPI_RETURN_IF_ERROR(
        MPI_Comm_split(mpi_, color == NCCL_SPLIT_NOCOLOR ? MPI_UNDEFINED : color, op.split_key, &mpi_child));
    ncclComm_t nccl_child = nullptr;
    {
      UseDevice(device_);
      ncclConfig_t config = NonBlockingConfig();
      NCCL_RETURN_IF_ERROR(ncclCommSplit(nccl_, color, op.split_key, &nccl_child, &config));
      absl::Status ready = WaitNcclReady(nccl_, timeout_s(), "ncclCommSplit");
      if (ready.ok() && nccl_child != nullptr)
        ready = WaitNcclReady(nccl_child, timeout_s(), "ncclCommSplit (child)");
      if (!ready.ok()) {
        if (nccl_child != nullptr) ncclCommAbort(nccl_child);
        AbortBackend();
        return ready;
      }
    }
    if (mpi_child == MPI_COMM_NULL) return std::unique_ptr<Communicator>();
    return Create(nccl_child, mpi_child, device_, std::move(child));
  }

 private:
  NcclCommunicator(ncclComm_t nccl, MPI_Comm mpi, int device, CudaStream stream, void* scratch, int rank,
                   int size, std::vector<int> world_ranks, CommOptions options)
      : Communicator(rank, size, std::move(world_ranks), std::move(options)),
        nccl_(nccl),
        mpi_(mpi),
        device_(device),
        stream_(std::move(stream)),
        scratch_(scratch) {
    describe_ = absl::StrCat("world rank ", MpiEnv::world_rank(), ", rank ", rank, " of group '", name(),
                             "' (", this->size(), " ranks; world ranks ", absl::StrJoin(group_ranks(), ","),
                             "), backend nccl on cuda:", device);
    WatchdogRegister(this);
    poller_ = std::thread([this] { Poll(); });
  }

  // Enqueues the NCCL calls of one validated operation on the stream.
  absl::Status Launch(const OpDesc& op) {
    cudaStream_t s = stream_.get();
    const ncclDataType_t type = NcclType(op.dtype);
    const int n = size();
    switch (op.kind) {
      case OpKind::kAllReduce:
        NCCL_RETURN_IF_ERROR(ncclAllReduce(op.send, op.recv, op.count, type, NcclOp(op.op), nccl_, s));
        return absl::OkStatus();
      case OpKind::kBroadcast:
        NCCL_RETURN_IF_ERROR(ncclBroadcast(op.send, op.recv, op.count, type, op.root, nccl_, s));
        return absl::OkStatus();
      case OpKind::kAllGather:
        NCCL_RETURN_IF_ERROR(ncclAllGather(op.send, op.recv, op.count, type, nccl_, s));
        return absl::OkStatus();
      case OpKind::kReduceScatter:
        NCCL_RETURN_IF_ERROR(ncclReduceScatter(op.send, op.recv, op.count, type, NcclOp(op.op), nccl_, s));
        return absl::OkStatus();
      case OpKind::kAllGatherV: {
        std::vector<size_t> send_counts(n, op.count), send_displs(n, 0);
        return ExchangeV(op.send, send_counts, send_displs, op.recv, op.recv_counts, op.recv_displs, op.dtype,
                         op.in_place);
      }
      case OpKind::kAllToAll: {
        std::vector<size_t> counts(n, op.count), displs(n);
        for (int r = 0; r < n; ++r) displs[r] = r * op.count;
        return ExchangeV(op.send, counts, displs, op.recv, counts, displs, op.dtype, false);
      }
      case OpKind::kAllToAllV:
        return ExchangeV(op.send, op.send_counts, op.send_displs, op.recv, op.recv_counts, op.recv_displs,
                         op.dtype, false);
      case OpKind::kSend:
      case OpKind::kRecv:
      case OpKind::kGroupP2P: {
        NCCL_RETURN_IF_ERROR(ncclGroupStart());
        absl::Status st;
        for (const P2POp& p : op.p2p) {
          if (p.count == 0) continue;
          st = p.type == P2PType::kSend
                   ? NcclStatus(ncclSend(p.buf, p.count, NcclType(p.dtype), p.peer, nccl_, s), "ncclSend",
                                __FILE__, __LINE__)
                   : NcclStatus(ncclRecv(p.buf, p.count, NcclType(p.dtype), p.peer, nccl_, s), "ncclRecv",
                                __FILE__, __LINE__);
          if (!st.ok()) break;
        }
        NCCL_RETURN_IF_ERROR(ncclGroupEnd());
        return st;
      }
      case OpKind::kBarrier:
        NCCL_RETURN_IF_ERROR(ncclAllReduce(scratch_, scratch_, 1, ncclInt32, ncclSum, nccl_, s));
        return absl::OkStatus();
      case OpKind::kSplit:
        break;
    }
    return absl::InternalError("NCCL communicator: unexpected operation kind");
  }

  // Grouped ncclSend/ncclRecv to every peer; the own block is a device copy.
  absl::Status ExchangeV(const void* send, const std::vector<size_t>& send_counts,
                         const std::vector<size_t>& send_displs, void* recv,
                         const std::vector<size_t>& recv_counts, const std::vector<size_t>& recv_displs,
                         DType t, bool in_place) {
    const size_t es = DTypeSize(t);
    const ncclDataType_t type = NcclType(t);
    const int me = rank(), n = size();
    const char* sp = static_cast<const char*>(send);
    char* rp = static_cast<char*>(recv);
    if (!in_place && recv_counts[me] > 0) {
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(rp + recv_displs[me] * es, sp + send_displs[me] * es,
                                           std::min(send_counts[me], recv_counts[me]) * es,
                                           cudaMemcpyDeviceToDevice, stream_.get()));
    }
    NCCL_RETURN_IF_ERROR(ncclGroupStart());
    absl::Status st;
    for (int k = 1; k < n && st.ok(); ++k) {
      const int to = (me + k) % n, from = (me - k + n) % n;
      if (send_counts[to] > 0) {
        st = NcclStatus(ncclSend(sp + send_displs[to] * es, send_counts[to], type, to, nccl_, stream_.get()),
                        "ncclSend", __FILE__, __LINE__);
      }
      if (st.ok() && recv_counts[from] > 0) {
        st = NcclStatus(
            ncclRecv(rp + recv_displs[from] * es, recv_counts[from], type, from, nccl_, stream_.get()),
            "ncclRecv", __FILE__, __LINE__);
      }
    }
    NCCL_RETURN_IF_ERROR(ncclGroupEnd());
    return st;
  }

  // Marks operations done in order, feeds the sink, and watches for NCCL's
  // asynchronous errors.
  void Poll() {
    cudaSetDevice(device_);
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait_for(lock, std::chrono::milliseconds(100), [&] { return stop_ || !issued_.empty(); });
      if (issued_.empty()) {
        if (stop_) return;
        continue;
      }
      Issued& head = *issued_.front();
      absl::Status status = error_;
      bool done = !status.ok();
      if (!done) {
        ncclResult_t async = ncclSuccess;
        if (!aborted_.load()) ncclCommGetAsyncError(nccl_, &async);
        if (async != ncclSuccess && async != ncclInProgress) {
          status = NcclStatus(async, "ncclCommGetAsyncError", __FILE__, __LINE__);
          AbortBackend();
          done = true;
        } else {
          if (!head.started) {
            absl::StatusOr<bool> s = head.start.Query();
            if (!s.ok())
              status = s.status(), done = true;
            else if (*s)
              head.started = true, head.started_at = Clock::now();
          }
          if (head.started && !done) {
            absl::StatusOr<bool> e = head.end.Query();
            if (!e.ok())
              status = e.status(), done = true;
            else
              done = *e;
          }
        }
        if (!status.ok()) {
          error_ = absl::Status(status.code(),
                                absl::StrCat("communicator '", name(),
                                             "' is unusable after an earlier failure: ", status.message()));
        }
      }
      if (!done) {
        lock.unlock();
        std::this_thread::sleep_for(std::chrono::microseconds(20));
        lock.lock();
        continue;
      }
      std::unique_ptr<Issued> finished = std::move(issued_.front());
      issued_.pop_front();
      if (issued_.empty()) drained_.notify_all();
      lock.unlock();
      Finish(*finished, std::move(status));
      lock.lock();
    }
  }

  void Finish(Issued& issued, absl::Status status) {
    if (options().sink) {
      CommRecord r;
      r.group = name();
      r.group_size = size();
      r.rank = rank();
      r.group_ranks = group_ranks();
      DescribeOp(issued.op, rank(), size(), &r);
      r.started = issued.started ? issued.started_at : issued.op.enqueued;
      r.finished = Clock::now();
      r.ok = status.ok();
      options().sink->Record(r);
    }
    issued.work->Complete(std::move(status));
  }

  ncclComm_t nccl_;
  MPI_Comm mpi_;
  int device_;
  CudaStream stream_;
  void* scratch_;
  std::string describe_;
  std::atomic<bool> aborted_{false};
  std::mutex mu_;
  std::condition_variable cv_, drained_;
  std::deque<std::unique_ptr<Issued>> issued_;
  absl::Status error_;
  bool stop_ = false;
  std::thread poller_;
};

}  // namespace

bool NcclAvailable() {
  int count = 0;
  int local = cudaGetDeviceCount(&count) == cudaSuccess && count > 0 ? 1 : 0;
  cudaGetLastError();
  int all = local;
  if (MpiEnv::initialized()) MPI_Allreduce(&local, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return all == 1;
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclWorldCommunicator(const CommOptions& options) {
  if (!MpiEnv::initialized()) {
    return absl::FailedPreconditionError(
        "CreateNcclWorldCommunicator: MPI is not initialised; call MpiEnv::Init");
  }
  int count = 0;
  CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&count));
  const int device = options.cuda_device >= 0 ? options.cuda_device : MpiEnv::local_rank() % count;
  if (device >= count) {
    return absl::InvalidArgumentError(absl::StrCat("cuda_device = ", device, " but this rank sees ", count,
                                                   " CUDA devices (0..", count - 1, ")"));
  }
  ncclUniqueId id;
  if (MpiEnv::world_rank() == 0) NCCL_RETURN_IF_ERROR(ncclGetUniqueId(&id));
  MPI_RETURN_IF_ERROR(MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD));
  ncclComm_t nccl = nullptr;
  {
    UseDevice(device);
    ncclConfig_t config = NonBlockingConfig();
    NCCL_RETURN_IF_ERROR(
        ncclCommInitRankConfig(&nccl, MpiEnv::world_size(), id, MpiEnv::world_rank(), &config));
    if (absl::Status ready = WaitNcclReady(nccl, options.timeout_s, "ncclCommInitRankConfig"); !ready.ok()) {
      ncclCommAbort(nccl);
      return ready;
    }
  }
  MPI_Comm mpi;
  MPI_RETURN_IF_ERROR(MPI_Comm_dup(MPI_COMM_WORLD, &mpi));
  return NcclCommunicator::Create(nccl, mpi, device, options);
}

}  // namespace moe::comm
