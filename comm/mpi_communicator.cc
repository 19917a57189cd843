#include "comm/mpi_communicator.h"

#include <mpi.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "comm/host_staging.h"
#include "comm/mpi_env.h"
#include "comm/watchdog.h"
#include "runtime/core/backend.h"
#include "runtime/core/kernel_math.h"
#include "runtime/core/logging.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"
#include "runtime/core/tensor.h"

namespace moe::comm {
namespace {

using Clock = std::chrono::steady_clock;

std::atomic<size_t> g_count_limit{static_cast<size_t>(INT_MAX)};

// Tags of the point-to-point messages of each kind of operation. Operations of
// one communicator never overlap in time, so one tag per kind suffices.
constexpr int kP2PTag = 1;
constexpr int kCollectiveTag = 2;

// ---- bf16 ------------------------------------------------------------------

// bf16 <-> f32 (round to nearest even), the kernels' conversion (kernel_math.h).
using kmath::BF16ToF32;
using kmath::F32ToBF16;

template <int kOp>  // 0 sum, 1 max, 2 min
void Bf16Reduce(void* in, void* inout, int* len, MPI_Datatype*) {
  auto* a = static_cast<const uint16_t*>(in);
  auto* b = static_cast<uint16_t*>(inout);
  for (int i = 0; i < *len; ++i) {
    float x = BF16ToF32(a[i]), y = BF16ToF32(b[i]);
    float r = kOp == 0 ? x + y : kOp == 1 ? std::max(x, y) : std::min(x, y);
    b[i] = F32ToBF16(r);
  }
}

MPI_Datatype MpiType(DType t) {
  switch (t) {
    case DType::kF32:
      return MPI_FLOAT;
    case DType::kF64:
      return MPI_DOUBLE;
    case DType::kI32:
      return MPI_INT32_T;
    case DType::kI64:
      return MPI_INT64_T;
    case DType::kU8:
      return MPI_UINT8_T;
    case DType::kBF16:
      return MPI_UINT16_T;  // reduced with the user ops below
  }
  return MPI_DATATYPE_NULL;
}

MPI_Op MpiOp(ReduceOp op, DType t) {
  if (t == DType::kBF16) {
    static MPI_Op ops[3];
    static std::once_flag once;
    std::call_once(once, [] {
      MPI_Op_create(&Bf16Reduce<0>, 1, &ops[0]);
      MPI_Op_create(&Bf16Reduce<1>, 1, &ops[1]);
      MPI_Op_create(&Bf16Reduce<2>, 1, &ops[2]);
    });
    return op == ReduceOp::kMax ? ops[1] : op == ReduceOp::kMin ? ops[2] : ops[0];
  }
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      return MPI_SUM;  // divided afterwards
    case ReduceOp::kMax:
      return MPI_MAX;
    case ReduceOp::kMin:
      return MPI_MIN;
  }
  return MPI_OP_NULL;
}

// buf[i] /= d: the second half of kAvg. Integers divide with truncation.
void DivideBy(void* buf, size_t n, DType t, int d) {
  switch (t) {
    case DType::kF32:
      for (size_t i = 0; i < n; ++i) static_cast<float*>(buf)[i] /= d;
      break;
    case DType::kF64:
      for (size_t i = 0; i < n; ++i) static_cast<double*>(buf)[i] /= d;
      break;
    case DType::kI32:
      for (size_t i = 0; i < n; ++i) static_cast<int32_t*>(buf)[i] /= d;
      break;
    case DType::kI64:
      for (size_t i = 0; i < n; ++i) static_cast<int64_t*>(buf)[i] /= d;
      break;
    case DType::kU8:
      for (size_t i = 0; i < n; ++i) static_cast<uint8_t*>(buf)[i] /= d;
      break;
    case DType::kBF16: {
      auto* p = static_cast<uint16_t*>(buf);
      for (size_t i = 0; i < n; ++i) p[i] = F32ToBF16(BF16ToF32(p[i]) / d);
      break;
    }
  }
}

// ---- polling ---------------------------------------------------------------

// Between two polls of a transfer: spinning first, then yielding the core,
// then pausing briefly, so a long wait does not starve ranks that share cores
// while a short one keeps its latency. A progress thread's wait that has
// lasted kPollYieldS is a peer that has not arrived yet (it is still
// computing the chunk whose rows it sends back), not a transfer in progress:
// a poller that keeps yielding still takes its fair share of a core that the
// rank's compute thread shares, so from then on it pauses 50 us between tests.
// Point-to-point exchanges (the token all-to-alls) complete within a few tests
// once the peer posts (shared memory, single copy), and the nonblocking
// collectives here take a few rounds, so a pause adds at most a few 50 us
// steps to an operation that already waited kPollYieldS.
constexpr double kPollYieldS = 2e-3;

void PausePoll(int polls, Clock::time_point begin) {
  if (polls < 256) return;
  const double waited = std::chrono::duration<double>(Clock::now() - begin).count();
  if (waited < 50e-6) return;  // a small transfer's round trip: keep spinning
  if (waited < kPollYieldS) {
    sched_yield();
  } else {
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

// ---- work ------------------------------------------------------------------

class MpiWork : public CompletionState {
 public:
  absl::Status Wait() override {
    if (!direct_) return CompletionState::Wait();
    RETURN_IF_ERROR(RefuseWaitInHostFunction("comm::Work::Wait"));
    // Started on the enqueuing thread: whoever waits completes it.
    const Clock::time_point begin = Clock::now();
    for (int polls = 0; !Poll(); ++polls) PausePoll(polls, begin);
    return final_status();
  }
  bool Test() override { return direct_ ? Poll() : done(); }

  // A direct operation (started by Submit on the caller's thread): `poll`
  // tests its requests once and concludes it when they completed, returning
  // true then. Set before the Work is handed out.
  void SetDirect(std::function<bool()> poll) {
    direct_ = true;
    poll_ = std::move(poll);
  }
  // One test of a direct operation; only one thread tests at a time (MPI
  // forbids testing one request from two threads). True once done.
  bool Poll() {
    if (done()) return true;
    std::unique_lock<std::mutex> lock(poll_mu_, std::try_to_lock);
    if (!lock.owns_lock()) return done();
    if (poll_ && poll_()) poll_ = nullptr;  // concluded: drop the captures
    return done();
  }
  MPI_Comm split_result = MPI_COMM_NULL;

 private:
  bool direct_ = false;
  std::mutex poll_mu_;
  std::function<bool()> poll_;  // guarded by poll_mu_
};

struct Pending {
  OpDesc op;
  std::shared_ptr<MpiWork> work;
};

// Requests of one operation, split into calls of at most MpiCountLimit() elements.
class Requests {
 public:
  // `kind` and `world_ranks` (group rank -> world rank) name the sends for
  // the wire byte counter (instrumentation.h).
  Requests(MPI_Comm comm, OpKind kind, const std::vector<int>& world_ranks)
      : comm_(comm), limit_(g_count_limit.load()), kind_(kind), world_ranks_(world_ranks) {}
  size_t limit() const { return limit_; }
  MPI_Request* Add() {
    reqs_.push_back(MPI_REQUEST_NULL);
    receives_.push_back({-1, 0, MPI_BYTE});
    return &reqs_.back();
  }
  absl::Status Isend(const void* buf, size_t count, DType t, int peer, int tag) {
    const size_t es = DTypeSize(t);
    WireBytesAdd(kind_, world_ranks_[peer], count * es);
    for (size_t off = 0; off < count; off += limit_) {
      int n = static_cast<int>(std::min(limit_, count - off));
      MPI_RETURN_IF_ERROR(
          MPI_Isend(static_cast<const char*>(buf) + off * es, n, MpiType(t), peer, tag, comm_, Add()));
    }
    return absl::OkStatus();
  }
  absl::Status Irecv(void* buf, size_t count, DType t, int peer, int tag) {
    const size_t es = DTypeSize(t);
    for (size_t off = 0; off < count; off += limit_) {
      int n = static_cast<int>(std::min(limit_, count - off));
      MPI_RETURN_IF_ERROR(
          MPI_Irecv(static_cast<char*>(buf) + off * es, n, MpiType(t), peer, tag, comm_, Add()));
      receives_.back() = {peer, n, MpiType(t)};
    }
    return absl::OkStatus();
  }
  // One MPI_Testall: *done is true once every request completed.
  absl::Status Test(bool* done) {
    int flag = 1;
    if (!reqs_.empty()) {
      statuses_.resize(reqs_.size());
      MPI_RETURN_IF_ERROR(MPI_Testall(static_cast<int>(reqs_.size()), reqs_.data(), &flag, statuses_.data()));
    }
    *done = flag != 0;
    return *done && !reqs_.empty() ? CheckReceivedCounts() : absl::OkStatus();
  }
  // Polls until every request completed (PausePoll between polls).
  absl::Status WaitAll() {
    const Clock::time_point begin = Clock::now();
    for (int polls = 0;; ++polls) {
      bool done = false;
      RETURN_IF_ERROR(Test(&done));
      if (done) return absl::OkStatus();
      PausePoll(polls, begin);
    }
  }

 private:
  struct Receive {
    int peer;  // -1: the request is a send
    int count;
    MPI_Datatype type;
  };
  // Every receive got exactly the elements its count announced (the peers'
  // plan): a peer that sends fewer (a rank running another configuration) is
  // an error here instead of rows of garbage, and one that sends more already
  // failed in MPI (truncation), which never writes past the posted buffer.
  absl::Status CheckReceivedCounts() {
    for (size_t i = 0; i < reqs_.size(); ++i) {
      const Receive& r = receives_[i];
      if (r.peer < 0) continue;
      int got = 0;
      MPI_RETURN_IF_ERROR(MPI_Get_count(&statuses_[i], r.type, &got));
      if (got != r.count) {
        return absl::DataLossError(absl::StrCat("received ", got, " elements from group rank ", r.peer,
                                                " where ", r.count,
                                                " were announced; do all ranks run the same configuration?"));
      }
    }
    return absl::OkStatus();
  }

  MPI_Comm comm_;
  size_t limit_;
  OpKind kind_;
  const std::vector<int>& world_ranks_;
  std::vector<MPI_Request> reqs_;
  std::vector<Receive> receives_;  // one per request
  std::vector<MPI_Status> statuses_;
};

// An operation between its start (nonblocking calls posted) and its end.
struct Started {
  Started(MPI_Comm comm, OpKind kind, const std::vector<int>& world_ranks) : reqs(comm, kind, world_ranks) {}
  Requests reqs;
  // In-place ReduceScatter: the result before it is copied into its block; a
  // gathered AllReduce: every rank's buffer, in rank order.
  std::vector<char> temp;
  bool gathered = false;  // an AllReduce posted as an all-gather (SmallAllReduce)
  CommRecord record;
  // A staged operation (host_staging.h): its device ranges and their host copies.
  std::vector<StagedRange> staged;
  std::vector<Tensor> staged_host;
};

// A Buffer over memory the caller owns (the device side of a staged range), so
// that ops::Copy can move it; it allocates and frees nothing.
class BorrowedBuffer : public Buffer {
 public:
  BorrowedBuffer(void* data, size_t size, Device device) : data_(data), size_(size), device_(device) {}
  void* data() const override { return data_; }
  size_t size() const override { return size_; }
  MemoryCategory category() const override { return MemoryCategory::kCommunication; }
  Device device() const override { return device_; }
  bool host_visible() const override { return device_.is_cpu(); }

 private:
  void* data_;
  size_t size_;
  Device device_;
};

absl::StatusOr<Tensor> BorrowedBytes(void* data, size_t bytes, Device device) {
  return Tensor::FromBuffer(std::make_shared<BorrowedBuffer>(data, bytes, device), 0,
                            Shape{static_cast<int64_t>(bytes)}, DType::kU8);
}

// Operations up to this many bytes sent or received per rank may start on the
// enqueuing thread (MpiCommunicator::Submit); larger ones always run on the
// progress thread, which polls them while the caller computes.
constexpr size_t kDirectMaxBytes = 64 << 10;

std::atomic<uint64_t> g_direct_ops{0};

// An AllReduce that sends at most this many bytes per rank as an all-gather
// (every rank's whole buffer to every peer, one round of sends and receives)
// is gathered and reduced locally in rank order: one round trip, where
// MPI_Iallreduce's schedule takes several tested steps. At 1 KiB and 2 ranks
// (load average 13 on 2 cores) that took latency_x from about 2.0 to about
// 1.5. Every rank reduces the same buffers in the same order, so all ranks
// hold the same bits.
constexpr size_t kGatheredAllReduceMaxBytes = 16 << 10;

// ---- the communicator ------------------------------------------------------

class MpiCommunicator : public Communicator, public Watched {
 public:
  static absl::StatusOr<std::unique_ptr<Communicator>> Create(MPI_Comm comm, CommOptions options) {
    MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
    int rank = 0, size = 0;
    MPI_RETURN_IF_ERROR(MPI_Comm_rank(comm, &rank));
    MPI_RETURN_IF_ERROR(MPI_Comm_size(comm, &size));
    MPI_Group group, world_group;
    MPI_RETURN_IF_ERROR(MPI_Comm_group(comm, &group));
    MPI_RETURN_IF_ERROR(MPI_Comm_group(MPI_COMM_WORLD, &world_group));
    std::vector<int> ranks(size), world_ranks(size);
    for (int i = 0; i < size; ++i) ranks[i] = i;
    MPI_RETURN_IF_ERROR(
        MPI_Group_translate_ranks(group, size, ranks.data(), world_group, world_ranks.data()));
    MPI_Group_free(&group);
    MPI_Group_free(&world_group);
    return std::unique_ptr<Communicator>(
        new MpiCommunicator(comm, rank, size, std::move(world_ranks), std::move(options)));
  }

  ~MpiCommunicator() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();  // runs what was enqueued first
    WatchdogUnregister(this);
    if (MpiEnv::initialized()) MPI_Comm_free(&comm_);
  }

  Device device() const override { return Device::Cpu(); }
  const char* backend_name() const override { return "mpi"; }

  void Collect(std::vector<InFlight::Snapshot>* running) override { running->push_back(in_flight_.Get()); }
  std::string Describe() const override { return describe_; }
  std::string GroupName() const override { return name(); }
  std::vector<int> PeerWorldRanks() const override { return group_ranks(); }

 protected:
  // An idle communicator starts a small operation here, on the caller's
  // thread (its nonblocking calls posted, one test), and whoever waits on or
  // tests its Work polls it to the end: no hand-off to the progress thread
  // and back, which is most of a small collective's latency. Everything else
  // is queued for the progress thread. Either way the call returns once the
  // operation is enqueued or started, never waiting for the peers.
  absl::StatusOr<Work> Submit(OpDesc op) override {
    if (op.staged) RETURN_IF_ERROR(ReserveStaging(op));
    auto work = std::make_shared<MpiWork>();
    const uint64_t sequence = op.sequence;
    bool direct = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_.ok()) return error_;
      if (queue_.empty() && !busy_ && MayStartDirect(op)) {
        busy_ = true;  // later operations queue behind this one
        direct_ = work;
        direct = true;
      } else {
        queue_.push_back(Pending{std::move(op), work});
      }
    }
    if (!direct) {
      cv_.notify_one();
      return Work(work, sequence);
    }
    g_direct_ops.fetch_add(1, std::memory_order_relaxed);
    auto pending = std::make_shared<Pending>(Pending{std::move(op), work});
    auto started = std::make_shared<Started>(comm_, pending->op.kind, group_ranks());
    absl::Status status = Start(*pending, absl::OkStatus(), started.get());
    bool done = false;
    if (status.ok()) status = started->reqs.Test(&done);
    if (!status.ok() || done) {
      if (status.ok()) status = Finish(pending->op, started.get());
      Conclude(*pending, std::move(status), started.get());
      return Work(work, sequence);
    }
    work->SetDirect([this, pending, started] {
      bool done = false;
      absl::Status status = started->reqs.Test(&done);
      if (status.ok() && !done) return false;
      if (status.ok()) status = Finish(pending->op, started.get());
      Conclude(*pending, std::move(status), started.get());
      return true;
    });
    return Work(work, sequence);
  }

  // An inline stream has run everything enqueued on it before this call (and
  // returned its errors to the caller), so the operation needs no marker: it
  // is submitted as a host operation, and the stream's next item (run at once,
  // on this thread, which is the inline stream's device) waits for it.
  // Worker streams take the marker path of Communicator.
  absl::StatusOr<Work> SubmitOnStream(OpDesc op, Stream& stream) override {
    // (A CUDA stream is asynchronous whatever its mode: the marker path.)
    if (stream.mode() != StreamMode::kInline || !stream.backend().device().is_cpu())
      return Communicator::SubmitOnStream(std::move(op), stream);
    ASSIGN_OR_RETURN(Work work, Submit(std::move(op)));
    std::shared_ptr<WorkState> state = work.shared_state();
    RETURN_IF_ERROR(stream.LaunchHostFunc([state] { return state->Wait(); }));
    return work;
  }

  absl::StatusOr<std::unique_ptr<Communicator>> SplitImpl(OpDesc op, CommOptions child) override {
    ASSIGN_OR_RETURN(Work work, Submit(std::move(op)));
    RETURN_IF_ERROR(work.Wait());
    MPI_Comm comm = static_cast<MpiWork*>(work.state())->split_result;
    if (comm == MPI_COMM_NULL) return std::unique_ptr<Communicator>();
    return Create(comm, std::move(child));
  }

 private:
  MpiCommunicator(MPI_Comm comm, int rank, int size, std::vector<int> world_ranks, CommOptions options)
      : Communicator(rank, size, std::move(world_ranks), std::move(options)), comm_(comm) {
    describe_ = absl::StrCat("world rank ", MpiEnv::world_rank(), ", rank ", rank, " of group '", name(),
                             "' (", this->size(), " ranks; world ranks ", absl::StrJoin(group_ranks(), ","),
                             "), backend mpi");
    WatchdogRegister(this);
    // Tensors on a GPU: the staging stream is made here, before any operation
    // is in flight. Made on the progress thread at its first device buffer,
    // its creation could wait for the device while a stream waits in a host
    // function for that very operation.
    if (!device().is_cpu()) {
      absl::StatusOr<Stream*> staging = StagingStream(device());
      if (!staging.ok())
        MOE_LOG(WARNING) << describe_ << ": no staging stream yet: " << staging.status().message();
    }
    thread_ = std::thread([this] { Run(); });
  }

  static bool MayStartDirect(const OpDesc& op) {
    return op.after == nullptr && !op.inject && !op.staged && op.kind != OpKind::kSplit &&
           std::max(op.bytes_sent, op.bytes_received) <= kDirectMaxBytes;
  }

  void Run() {
    MarkDeviceThread();  // its waits (stream markers, requests) are device-side
    for (;;) {
      Pending p;
      std::shared_ptr<MpiWork> direct;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (direct_ != nullptr) {
          direct = direct_;  // operations queued behind a direct one: finish it first
        } else if (queue_.empty()) {
          return;  // stopped and drained
        } else {
          p = std::move(queue_.front());
          queue_.pop_front();
          busy_ = true;
        }
      }
      if (direct != nullptr) {
        direct->Wait().IgnoreError();  // its status is its Work's
        continue;
      }
      Execute(p);
    }
  }

  void Execute(Pending& p) {
    const OpDesc& op = p.op;
    // A stream-ordered operation starts once its stream reached the marker
    // (the producer's work is done); its deadline runs from then.
    absl::Status producer = op.after != nullptr ? op.after->Synchronize() : absl::OkStatus();
    Started started(comm_, op.kind, group_ranks());
    absl::Status status = Start(p, std::move(producer), &started);
    if (status.ok()) status = started.reqs.WaitAll();
    if (status.ok()) status = Finish(op, &started);
    if (status.ok() && op.staged) status = StageOut(op, &started);
    Conclude(p, std::move(status), &started);
  }

  // The stream the progress thread copies staged buffers on: one of their
  // device, used by this thread only (inline on the CPU).
  absl::StatusOr<Stream*> StagingStream(Device device) {
    if (staging_stream_ == nullptr || !(staging_stream_->backend().device() == device)) {
      ASSIGN_OR_RETURN(Backend * backend, GetBackend(device));
      ASSIGN_OR_RETURN(staging_stream_, backend->CreateStream(StreamMode::kInline));
    }
    return staging_stream_.get();
  }

  // Makes the staging region hold `op`'s ranges (host_staging.h), on the
  // submitting thread: page-locked memory is allocated here, never on the
  // progress thread, whose operations a stream's host gate may be waiting for
  // while the allocation waits for the device. The region only grows (to a
  // power of two, at least 1 MiB); an outgrown one is kept until the
  // communicator dies, as an operation already queued may be using it.
  absl::Status ReserveStaging(const OpDesc& op) {
    const size_t need = StagingBytes(StagedRanges(op, size()));
    if (need == 0) return absl::OkStatus();
    std::lock_guard<std::mutex> lock(staging_mu_);
    if (staging_.defined() && staging_.nbytes() >= need && staging_device_ == op.staged_device)
      return absl::OkStatus();
    size_t bytes = size_t{1} << 20;
    while (bytes < need) bytes *= 2;
    ASSIGN_OR_RETURN(Backend * backend, GetBackend(op.staged_device));
    absl::StatusOr<std::shared_ptr<Buffer>> buffer =
        backend->AllocatePinnedHost(bytes, MemoryCategory::kCommunication);
    if (!buffer.ok())
      return Annotate(buffer.status(), absl::StrCat("communicator '", name(), "': its host staging region"));
    ASSIGN_OR_RETURN(Tensor region, Tensor::FromBuffer(std::move(*buffer), 0,
                                                       Shape{static_cast<int64_t>(bytes)}, DType::kU8));
    if (staging_.defined()) retired_staging_.push_back(std::move(staging_));
    staging_ = std::move(region);
    staging_device_ = op.staged_device;
    return absl::OkStatus();
  }

  // Bytes of the staging region that a range takes (each starts at a
  // 256-byte aligned offset), and that all of `ranges` take.
  static size_t StagingSlot(const StagedRange& r) { return (r.bytes + 255) / 256 * 256; }
  static size_t StagingBytes(const std::vector<StagedRange>& ranges) {
    size_t bytes = 0;
    for (const StagedRange& r : ranges) bytes += StagingSlot(r);
    return bytes;
  }

  // Copies the operation's buffers into the staging region (reserved at
  // submit; one operation at a time uses it) and points the operation there
  // (host_staging.h).
  absl::Status StageIn(OpDesc* op, Started* started) {
    started->staged = StagedRanges(*op, size());
    if (started->staged.empty()) return absl::OkStatus();
    ASSIGN_OR_RETURN(Stream * stream, StagingStream(op->staged_device));
    Tensor region;
    {
      std::lock_guard<std::mutex> lock(staging_mu_);
      region = staging_;
    }
    const size_t need = StagingBytes(started->staged);
    if (!region.defined() || region.nbytes() < need)
      return absl::InternalError(absl::StrCat("communicator '", name(), "': the host staging region holds ",
                                              region.defined() ? region.nbytes() : 0,
                                              " bytes, the operation needs ", need,
                                              " (ReserveStaging was not called at submit)"));
    std::vector<char*> host;
    int64_t at = 0;
    for (const StagedRange& r : started->staged) {
      Tensor h = region.Slice(at, at + static_cast<int64_t>(r.bytes));
      at += static_cast<int64_t>(StagingSlot(r));
      ASSIGN_OR_RETURN(Tensor d, BorrowedBytes(r.device, r.bytes, op->staged_device));
      RETURN_IF_ERROR(ops::Copy(*stream, d, h));
      host.push_back(static_cast<char*>(h.raw_data()));
      started->staged_host.push_back(std::move(h));
    }
    RETURN_IF_ERROR(Annotate(stream->Synchronize(), "staging its buffers into host memory"));
    RebaseBuffers(started->staged, host, op);
    return absl::OkStatus();
  }

  // Copies the written ranges back to the buffers' device.
  absl::Status StageOut(const OpDesc& op, Started* started) {
    if (started->staged.empty()) return absl::OkStatus();
    ASSIGN_OR_RETURN(Stream * stream, StagingStream(op.staged_device));
    for (size_t i = 0; i < started->staged.size(); ++i) {
      const StagedRange& r = started->staged[i];
      if (!r.written) continue;
      ASSIGN_OR_RETURN(Tensor d, BorrowedBytes(r.device, r.bytes, op.staged_device));
      RETURN_IF_ERROR(ops::Copy(*stream, started->staged_host[i], d));
    }
    return Annotate(stream->Synchronize(), "copying its staged results back");
  }

  // The first half of an operation: its deadline starts, earlier failures and
  // the fault hook are checked, and its nonblocking calls are posted.
  absl::Status Start(Pending& p, absl::Status producer, Started* started) {
    const OpDesc& op = p.op;
    started->record.started = Clock::now();
    in_flight_.Begin(op.kind, op.sequence, op.bytes_sent, op.bytes_received, op.timeout_s,
                     started->record.started, op.timeout_field);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_.ok()) return error_;
    }
    if (!producer.ok()) return Annotate(producer, "the stream that produced its input failed");
    if (op.staged) RETURN_IF_ERROR(StageIn(&p.op, started));
    if (op.inject) RETURN_IF_ERROR(op.inject(op));
    return Post(op, p.work.get(), started);
  }

  // The end of an operation: a failure makes the communicator unusable; the
  // record goes to the sink; the communicator is free for the next operation
  // (so one submitted once this Work is done may start directly); then the
  // Work completes.
  void Conclude(Pending& p, absl::Status status, Started* started) {
    const OpDesc& op = p.op;
    if (!status.ok()) {
      bool earlier = false;
      {
        std::lock_guard<std::mutex> lock(mu_);
        earlier = !error_.ok();
      }
      if (!earlier) {
        status = Annotate(status,
                          absl::StrCat(OpKindName(op.kind), " #", op.sequence, " on group '", name(), "'"));
        std::lock_guard<std::mutex> lock(mu_);
        error_ = absl::Status(status.code(),
                              absl::StrCat("communicator '", name(),
                                           "' is unusable after an earlier failure: ", status.message()));
      }
    }
    in_flight_.End();
    CommRecord& record = started->record;
    record.finished = Clock::now();
    if (options().sink) {
      record.group = name();
      record.group_size = size();
      record.rank = rank();
      record.group_ranks = group_ranks();
      DescribeOp(op, rank(), size(), &record);
      record.ok = status.ok();
      options().sink->Record(record);
    }
    bool notify = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (direct_ == p.work) {
        direct_ = nullptr;
        notify = !queue_.empty() || stop_;  // the progress thread may be waiting for it
      }
      busy_ = false;
    }
    if (notify) cv_.notify_one();
    p.work->Complete(std::move(status));
  }

  // Every rank of a V-collective or all-to-all posts one receive and one send
  // per peer (split by the count limit); its own block is copied locally.
  absl::Status ExchangeV(Requests& reqs, const char* send, const std::vector<size_t>& send_counts,
                         const std::vector<size_t>& send_displs, char* recv,
                         const std::vector<size_t>& recv_counts, const std::vector<size_t>& recv_displs,
                         DType t, bool in_place) {
    const size_t es = DTypeSize(t);
    const int me = rank(), n = size();
    for (int k = 1; k < n; ++k) {
      int peer = (me - k + n) % n;
      if (recv_counts[peer] > 0) {
        RETURN_IF_ERROR(
            reqs.Irecv(recv + recv_displs[peer] * es, recv_counts[peer], t, peer, kCollectiveTag));
      }
    }
    for (int k = 1; k < n; ++k) {
      int peer = (me + k) % n;
      if (send_counts[peer] > 0) {
        RETURN_IF_ERROR(
            reqs.Isend(send + send_displs[peer] * es, send_counts[peer], t, peer, kCollectiveTag));
      }
    }
    if (!in_place && recv_counts[me] > 0) {
      std::memmove(recv + recv_displs[me] * es, send + send_displs[me] * es,
                   std::min(send_counts[me], recv_counts[me]) * es);
    }
    return absl::OkStatus();
  }

  // Posts the operation's nonblocking calls into started->reqs (a split runs
  // whole here); Finish completes it once they are done.
  absl::Status Post(const OpDesc& op, MpiWork* work, Started* started) {
    Requests& reqs = started->reqs;
    const size_t limit = reqs.limit();
    const size_t es = typed(op) ? DTypeSize(op.dtype) : 0;
    const MPI_Datatype type = typed(op) ? MpiType(op.dtype) : MPI_DATATYPE_NULL;
    const int n = size();
    const char* send = static_cast<const char*>(op.send);
    char* recv = static_cast<char*>(op.recv);
    switch (op.kind) {
      case OpKind::kAllReduce: {
        if (n > 1 && op.count <= limit && op.count * es * (n - 1) <= kGatheredAllReduceMaxBytes) {
          // Small: gather every rank's buffer into temp; Finish reduces it.
          started->gathered = true;
          started->temp.resize(op.count * es * n);
          std::vector<size_t> counts(n, op.count), displs(n), send_displs(n, 0);
          for (int r = 0; r < n; ++r) displs[r] = r * op.count;
          return ExchangeV(reqs, op.in_place ? recv : send, counts, send_displs, started->temp.data(), counts,
                           displs, op.dtype, /*in_place=*/false);
        }
        const MPI_Op mop = MpiOp(op.op, op.dtype);
        for (size_t off = 0; off < op.count; off += limit) {
          int c = static_cast<int>(std::min(limit, op.count - off));
          MPI_RETURN_IF_ERROR(MPI_Iallreduce(op.in_place ? MPI_IN_PLACE : send + off * es, recv + off * es, c,
                                             type, mop, comm_, reqs.Add()));
        }
        return absl::OkStatus();
      }
      case OpKind::kBroadcast: {
        if (rank() == op.root && !op.in_place && op.count > 0) std::memcpy(recv, send, op.count * es);
        for (size_t off = 0; off < op.count; off += limit) {
          int c = static_cast<int>(std::min(limit, op.count - off));
          MPI_RETURN_IF_ERROR(MPI_Ibcast(recv + off * es, c, type, op.root, comm_, reqs.Add()));
        }
        return absl::OkStatus();
      }
      case OpKind::kAllGather: {
        if (op.count * n <= limit) {
          MPI_RETURN_IF_ERROR(MPI_Iallgather(op.in_place ? MPI_IN_PLACE : send, static_cast<int>(op.count),
                                             type, recv, static_cast<int>(op.count), type, comm_,
                                             reqs.Add()));
          return absl::OkStatus();
        }
        std::vector<size_t> counts(n, op.count), displs(n);
        for (int r = 0; r < n; ++r) displs[r] = r * op.count;
        std::vector<size_t> send_displs(n, 0);
        return ExchangeV(reqs, send, counts, send_displs, recv, counts, displs, op.dtype, op.in_place);
      }
      case OpKind::kAllGatherV: {
        std::vector<size_t> send_counts(n, op.count), send_displs(n, 0);
        return ExchangeV(reqs, send, send_counts, send_displs, recv, op.recv_counts, op.recv_displs, op.dtype,
                         op.in_place);
      }
      case OpKind::kReduceScatter: {
        const MPI_Op mop = MpiOp(op.op, op.dtype);
        // MPI's in-place reduce-scatter puts the result at the start of the
        // buffer; ours keeps it in its block, so reduce into a temporary.
        started->temp.resize(op.in_place ? op.count * es : 0);
        char* target = op.in_place ? started->temp.data() : recv;
        if (op.count * n <= limit) {
          MPI_RETURN_IF_ERROR(MPI_Ireduce_scatter_block(send, target, static_cast<int>(op.count), type, mop,
                                                        comm_, reqs.Add()));
        } else {
          for (int r = 0; r < n; ++r) {
            for (size_t off = 0; off < op.count; off += limit) {
              int c = static_cast<int>(std::min(limit, op.count - off));
              MPI_RETURN_IF_ERROR(MPI_Ireduce(send + (r * op.count + off) * es,
                                              r == rank() ? target + off * es : nullptr, c, type, mop, r,
                                              comm_, reqs.Add()));
            }
          }
        }
        return absl::OkStatus();
      }
      case OpKind::kAllToAll: {
        std::vector<size_t> counts(n, op.count), displs(n);
        for (int r = 0; r < n; ++r) displs[r] = r * op.count;
        return ExchangeV(reqs, send, counts, displs, recv, counts, displs, op.dtype, false);
      }
      case OpKind::kAllToAllV:
        return ExchangeV(reqs, send, op.send_counts, op.send_displs, recv, op.recv_counts, op.recv_displs,
                         op.dtype, false);
      case OpKind::kSend:
      case OpKind::kRecv:
      case OpKind::kGroupP2P: {
        for (const P2POp& p : op.p2p) {
          if (p.type == P2PType::kRecv && p.count > 0) {
            RETURN_IF_ERROR(reqs.Irecv(p.buf, p.count, p.dtype, p.peer, kP2PTag));
          }
        }
        for (const P2POp& p : op.p2p) {
          if (p.type == P2PType::kSend && p.count > 0) {
            RETURN_IF_ERROR(reqs.Isend(p.buf, p.count, p.dtype, p.peer, kP2PTag));
          }
        }
        return absl::OkStatus();
      }
      case OpKind::kBarrier:
        MPI_RETURN_IF_ERROR(MPI_Ibarrier(comm_, reqs.Add()));
        return absl::OkStatus();
      case OpKind::kSplit: {
        MPI_RETURN_IF_ERROR(MPI_Comm_split(comm_, op.split_color == kNoColor ? MPI_UNDEFINED : op.split_color,
                                           op.split_key, &work->split_result));
        return absl::OkStatus();
      }
    }
    return absl::InternalError("unknown operation kind");
  }

  // After the posted calls completed: what the operation does on this rank's
  // memory at the end (the average's division, the in-place result's copy).
  absl::Status Finish(const OpDesc& op, Started* started) {
    char* recv = static_cast<char*>(op.recv);
    if (started->gathered && op.count > 0) {
      // recv = x_0 op (x_1 op (... op x_{n-1})), the same order on every rank.
      const size_t bytes = op.count * DTypeSize(op.dtype);
      const char* all = started->temp.data();
      std::memcpy(recv, all + (size() - 1) * bytes, bytes);
      for (int r = size() - 2; r >= 0; --r) {
        MPI_RETURN_IF_ERROR(MPI_Reduce_local(all + r * bytes, recv, static_cast<int>(op.count),
                                             MpiType(op.dtype), MpiOp(op.op, op.dtype)));
      }
    }
    if (op.kind == OpKind::kReduceScatter && op.in_place && op.count > 0) {
      std::memcpy(recv, started->temp.data(), op.count * DTypeSize(op.dtype));
    }
    if ((op.kind == OpKind::kAllReduce || op.kind == OpKind::kReduceScatter) && op.op == ReduceOp::kAvg) {
      DivideBy(recv, op.count, op.dtype, size());
    }
    return absl::OkStatus();
  }

  static bool typed(const OpDesc& op) {
    return op.kind != OpKind::kGroupP2P && op.kind != OpKind::kBarrier && op.kind != OpKind::kSplit;
  }

  MPI_Comm comm_;
  std::string describe_;
  InFlight in_flight_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Pending> queue_;
  // True while an operation runs (on the progress thread or started directly);
  // Submit starts one directly only when false and the queue is empty.
  bool busy_ = false;
  std::shared_ptr<MpiWork> direct_;  // the operation started directly, until it concludes
  bool stop_ = false;
  absl::Status error_;
  std::unique_ptr<Stream> staging_stream_;  // progress thread only (StagingStream)
  // The host staging region (ReserveStaging) and the ones it outgrew.
  std::mutex staging_mu_;
  Tensor staging_;
  Device staging_device_ = Device::Cpu();
  std::vector<Tensor> retired_staging_;
  std::thread thread_;
};

}  // namespace

size_t MpiCountLimit() { return g_count_limit.load(); }

uint64_t MpiDirectOpCount() { return g_direct_ops.load(std::memory_order_relaxed); }

void SetMpiCountLimitForTesting(size_t limit) {
  g_count_limit = limit == 0 || limit > static_cast<size_t>(INT_MAX) ? static_cast<size_t>(INT_MAX) : limit;
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateMpiWorldCommunicator(const CommOptions& options) {
  if (!MpiEnv::initialized()) {
    return absl::FailedPreconditionError(
        "CreateMpiWorldCommunicator: MPI is not initialised; call MpiEnv::Init");
  }
  int provided = 0;
  MPI_Query_thread(&provided);
  if (provided < MPI_THREAD_MULTIPLE) {
    return absl::FailedPreconditionError(
        absl::StrCat("the MPI communicator needs MPI_THREAD_MULTIPLE (its progress thread calls MPI) but MPI "
                     "was initialised "
                     "with thread level ",
                     provided, "; initialise through MpiEnv::Init"));
  }
  MPI_Comm comm;
  MPI_RETURN_IF_ERROR(MPI_Comm_dup(MPI_COMM_WORLD, &comm));
  return MpiCommunicator::Create(comm, options);
}

}  // namespace moe::comm
