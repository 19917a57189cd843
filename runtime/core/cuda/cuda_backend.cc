#include "runtime/core/cuda/cuda_backend.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <vector>

#include "absl/strings/str_cat.h"
#include "runtime/core/bf16_staging.h"
#include "runtime/core/check.h"
#include "runtime/core/cuda/cuda_check.h"
#include "runtime/core/cuda/cuda_handles.h"
#include "runtime/core/kernels.h"
#include "runtime/core/logging.h"
#include "runtime/core/status.h"

namespace moe::cuda {
namespace {

constexpr size_t kAlignment = 256;

class CudaBackend;

// Errors of host functions and of kernels (DeviceError), per stream, and its
// host gates. Shared by the stream, its events, the streams that waited on
// them and the callbacks of its open gates.
struct StreamErrors {
  std::mutex mu;
  absl::Status host_error;         // first failed LaunchHostFunc or non-OK host gate
  StreamRecord* record = nullptr;  // mapped host memory; device pointer == host pointer (UVA)
  std::vector<std::weak_ptr<StreamErrors>> upstream;  // streams this one waited on
  // Host gates: tickets handed out (WaitHostGate) and opened. record->gates_open
  // is the largest n with gates 1..n all open (a gate's kernel passes once all
  // the stream's earlier gates have too); `opened_early` holds the others.
  uint64_t gates_enqueued = 0;
  uint64_t gates_open = 0;
  std::set<uint64_t> opened_early;

  // Opens gate `ticket` (keeps a non-OK status as the stream's error).
  void OpenGate(uint64_t ticket, const absl::Status& status) {
    std::lock_guard<std::mutex> lock(mu);
    if (!status.ok() && host_error.ok()) host_error = status;
    opened_early.insert(ticket);
    while (!opened_early.empty() && *opened_early.begin() == gates_open + 1) {
      opened_early.erase(opened_early.begin());
      ++gates_open;
    }
    if (record != nullptr) __atomic_store_n(&record->gates_open, gates_open, __ATOMIC_RELEASE);
  }

  // This stream's own first error (cleared when `clear`).
  absl::Status Own(bool clear) {
    std::lock_guard<std::mutex> lock(mu);
    absl::Status st = host_error;
    if (st.ok() && record != nullptr && (record->error.code == 1 || record->error.code == 2)) {
      const DeviceError& e = record->error;
      const char* op = OpKindName(static_cast<OpKind>(e.op));
      st = e.code == 2
               ? ByRowMismatch(op, e.position, e.value)
               : absl::InvalidArgumentError(absl::StrCat("ops::", op, ": index[", e.position, "] = ", e.value,
                                                         " is outside [0, ", e.limit, ")"));
      if (clear) record->error.code = 0;
    }
    if (clear) host_error = absl::OkStatus();
    return st;
  }
  // The first error of this stream, else of a stream it waited on (one level:
  // streams wait on each other in both directions, so no recursion and no
  // two locks held at once).
  absl::Status Take(bool clear) {
    absl::Status st = Own(clear);
    if (!st.ok()) return st;
    std::vector<std::shared_ptr<StreamErrors>> ups;
    {
      std::lock_guard<std::mutex> lock(mu);
      for (auto& w : upstream)
        if (auto up = w.lock(); up != nullptr && up.get() != this) ups.push_back(std::move(up));
    }
    for (auto& up : ups) {
      st = up->Own(false);
      if (!st.ok()) return st;
    }
    return absl::OkStatus();
  }
};

class CudaStreamImpl;

// The size of each stream's upload ring (CopyFromHost; SetUploadRingBytesForTesting).
std::atomic<size_t> g_upload_ring_bytes{size_t{1} << 20};

class CudaEventImpl : public Event {
 public:
  CudaEventImpl(CudaEvent event) : event_(std::move(event)) {}
  absl::Status Synchronize() const override {
    RETURN_IF_ERROR(RefuseWaitInHostFunction("Event::Synchronize"));
    CountHostSync();
    std::shared_ptr<StreamErrors> errors;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!recorded_) return absl::OkStatus();
      errors = errors_;
    }
    CUDA_RETURN_IF_ERROR(cudaEventSynchronize(event_.get()));
    return errors != nullptr ? errors->Take(false) : absl::OkStatus();
  }
  bool Query() const override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!recorded_) return true;
    }
    absl::StatusOr<bool> done = event_.Query();
    return !done.ok() || *done;  // a device error counts as done: Synchronize reports it
  }
  absl::StatusOr<double> ElapsedMsSince(const Event& start) const override {
    auto* s = dynamic_cast<const CudaEventImpl*>(&start);
    if (s == nullptr) return absl::InvalidArgumentError("Event::ElapsedMsSince: start is not a CUDA event");
    if (!s->recorded() || !recorded() || !s->Query() || !Query())
      return absl::FailedPreconditionError(
          "Event::ElapsedMsSince: both events must be recorded and complete (Query() true) first");
    float ms = 0;
    CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, s->event_.get(), event_.get()));
    return static_cast<double>(ms);
  }
  absl::Status RecordOn(cudaStream_t stream, std::shared_ptr<StreamErrors> errors) {
    CUDA_RETURN_IF_ERROR(cudaEventRecord(event_.get(), stream));
    std::lock_guard<std::mutex> lock(mu_);
    recorded_ = true;
    errors_ = std::move(errors);
    return absl::OkStatus();
  }
  bool recorded() const {
    std::lock_guard<std::mutex> lock(mu_);
    return recorded_;
  }
  std::shared_ptr<StreamErrors> errors() const {
    std::lock_guard<std::mutex> lock(mu_);
    return errors_;
  }
  cudaEvent_t get() const { return event_.get(); }

 private:
  CudaEvent event_;
  mutable std::mutex mu_;
  bool recorded_ = false;
  std::shared_ptr<StreamErrors> errors_;
};

// ---- Caching allocator ------------------------------------------------------------

// Freed blocks wait in `pending_` until a fence (one event per live stream,
// recorded after the free) completes, then go to `free_` by size. Sizes are
// rounded to 512 bytes (small) or 2 MiB (from 1 MiB), so activations of a
// repeated step reuse their blocks.
class DeviceAllocator {
 public:
  DeviceAllocator(int device, CudaBackend* backend) : device_(device), backend_(backend) {}

  static size_t Round(size_t bytes) {
    if (bytes < (size_t{1} << 20)) return std::max<size_t>(512, (bytes + 511) / 512 * 512);
    constexpr size_t k2M = size_t{2} << 20;
    return (bytes + k2M - 1) / k2M * k2M;
  }

  absl::StatusOr<void*> Take(size_t rounded);
  void Give(void* p, size_t rounded) {
    std::lock_guard<std::mutex> lock(mu_);
    pending_.push_back({p, rounded});
  }
  size_t cached_bytes() const {
    std::lock_guard<std::mutex> lock(mu_);
    return cached_;
  }

 private:
  struct Block {
    void* p;
    size_t size;
  };
  struct Fenced {
    std::vector<Block> blocks;
    std::vector<CudaEvent> events;
  };
  // Moves completed fences' blocks to free_; fences the pending blocks. Holds mu_.
  void Advance();
  void ReleaseAll();  // waits for every fence, returns every cached block to CUDA. Holds mu_.

  int device_;
  CudaBackend* backend_;
  mutable std::mutex mu_;
  std::vector<Block> pending_;
  std::deque<Fenced> fenced_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
};

class CudaBuffer : public Buffer {
 public:
  CudaBuffer(void* data, size_t size, size_t rounded, MemoryCategory category, int device,
             MemoryTracker* tracker, DeviceAllocator* allocator)
      : data_(data),
        size_(size),
        rounded_(rounded),
        category_(category),
        device_(device),
        tracker_(tracker),
        allocator_(allocator) {}
  ~CudaBuffer() override {
    allocator_->Give(data_, rounded_);
    tracker_->OnFree(category_, static_cast<int64_t>(size_));
  }
  void* data() const override { return data_; }
  size_t size() const override { return size_; }
  MemoryCategory category() const override { return category_; }
  Device device() const override { return Device::Cuda(device_); }
  bool host_visible() const override { return false; }

 private:
  void* data_;
  size_t size_, rounded_;
  MemoryCategory category_;
  int device_;
  MemoryTracker* tracker_;
  DeviceAllocator* allocator_;
};

class CudaBufferType : public BufferType {
 public:
  CudaBufferType(int device, MemoryTracker* tracker, DeviceAllocator* allocator)
      : device_(device), tracker_(tracker), allocator_(allocator) {}
  std::string name() const override { return absl::StrCat("cuda:", device_); }
  size_t alignment() const override { return kAlignment; }
  Device device() const override { return Device::Cuda(device_); }
  absl::StatusOr<std::shared_ptr<Buffer>> Allocate(size_t bytes, MemoryCategory category) override {
    const size_t rounded = DeviceAllocator::Round(bytes);
    absl::StatusOr<void*> p = allocator_->Take(rounded);
    if (!p.ok())
      return absl::ResourceExhaustedError(
          absl::StrCat(name(), ": cannot allocate ", bytes, " bytes for ", MemoryCategoryName(category), " (",
                       tracker_->Total().live_bytes, " bytes live): ", p.status().message()));
    tracker_->OnAllocate(category, static_cast<int64_t>(bytes));
    return std::shared_ptr<Buffer>(
        std::make_shared<CudaBuffer>(*p, bytes, rounded, category, device_, tracker_, allocator_));
  }

 private:
  int device_;
  MemoryTracker* tracker_;
  DeviceAllocator* allocator_;
};

// ---- Page-locked host memory -----------------------------------------------------

// cudaFreeHost waits for the device, so a buffer released on a device-side
// thread or in a host function (backend.h AllocatePinnedHost) is freed at the
// next allocation on an ordinary thread instead. Process-wide: the memory is
// portable, so any device's backend may free it.
std::mutex g_deferred_pinned_mu;
std::vector<void*>& DeferredPinnedFrees() {
  static auto* frees = new std::vector<void*>();  // never destroyed
  return *frees;
}

void FreeDeferredPinned() {
  std::vector<void*> frees;
  {
    std::lock_guard<std::mutex> lock(g_deferred_pinned_mu);
    frees.swap(DeferredPinnedFrees());
  }
  for (void* p : frees) cudaFreeHost(p);
}

class PinnedHostBuffer : public Buffer {
 public:
  PinnedHostBuffer(void* data, size_t size, MemoryCategory category, MemoryTracker* tracker)
      : data_(data), size_(size), category_(category), tracker_(tracker) {}
  ~PinnedHostBuffer() override {
    tracker_->OnFree(category_, static_cast<int64_t>(size_));
    if (IsDeviceThread() || InHostFunction()) {
      std::lock_guard<std::mutex> lock(g_deferred_pinned_mu);
      DeferredPinnedFrees().push_back(data_);
      return;
    }
    cudaFreeHost(data_);
  }
  void* data() const override { return data_; }
  size_t size() const override { return size_; }
  MemoryCategory category() const override { return category_; }
  Device device() const override { return Device::Cpu(); }
  bool host_visible() const override { return true; }

 private:
  void* data_;
  size_t size_;
  MemoryCategory category_;
  MemoryTracker* tracker_;  // the CPU backend's
};

// ---- Streams --------------------------------------------------------------------

class CudaStreamImpl : public Stream {
 public:
  static absl::StatusOr<std::unique_ptr<CudaStreamImpl>> Create(CudaBackend& backend, int device,
                                                                StreamMode mode);
  ~CudaStreamImpl() override;
  Backend& backend() const override;
  StreamMode mode() const override { return mode_; }
  absl::Status Synchronize() override {
    RETURN_IF_ERROR(RefuseWaitInHostFunction("Stream::Synchronize"));
    CountHostSync();
    UseDevice(device_);
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_.get()));
    return errors_->Take(true);
  }
  absl::Status Record(Event& event) override {
    auto* e = dynamic_cast<CudaEventImpl*>(&event);
    if (e == nullptr) return absl::InvalidArgumentError("Stream::Record: event is not a CUDA event");
    return e->RecordOn(stream_.get(), errors_);
  }
  absl::Status Wait(const Event& event) override {
    auto* e = dynamic_cast<const CudaEventImpl*>(&event);
    if (e == nullptr) return absl::InvalidArgumentError("Stream::Wait: event is not a CUDA event");
    if (!e->recorded()) return absl::OkStatus();
    CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream_.get(), e->get(), 0));
    if (auto up = e->errors(); up != nullptr && up != errors_) {
      std::lock_guard<std::mutex> lock(errors_->mu);
      auto& ups = errors_->upstream;
      ups.erase(std::remove_if(ups.begin(), ups.end(), [](const auto& w) { return w.expired(); }), ups.end());
      bool known = false;
      for (auto& w : ups) known = known || w.lock() == up;
      if (!known) ups.push_back(up);
    }
    return absl::OkStatus();
  }
  absl::Status LaunchHostFunc(std::function<absl::Status()> fn) override {
    auto* payload = new HostFunc{std::move(fn), errors_};
    cudaError_t e = cudaLaunchHostFunc(stream_.get(), &RunHostFunc, payload);
    if (e != cudaSuccess) {
      delete payload;
      return CudaStatus(e, "cudaLaunchHostFunc", __FILE__, __LINE__);
    }
    return absl::OkStatus();
  }
  absl::Status WaitHostGate(std::shared_ptr<HostGate> gate) override {
    if (gate == nullptr) return absl::InvalidArgumentError("Stream::WaitHostGate: null gate");
    UseDevice(device_);
    uint64_t ticket = 0;
    {
      // Tickets are launched in their order on the stream (the lock spans the launch).
      std::lock_guard<std::mutex> lock(errors_->mu);
      ticket = errors_->gates_enqueued + 1;
      CUDA_RETURN_IF_ERROR(LaunchWaitHostGate(&errors_->record->gates_open, ticket, stream_.get()));
      errors_->gates_enqueued = ticket;
    }
    gate->OnOpen([errors = errors_, ticket](const absl::Status& st) { errors->OpenGate(ticket, st); });
    return absl::OkStatus();
  }
  void* native_handle() const override { return stream_.get(); }

  // Through the stream's page-locked upload ring (cuda_backend.h).
  absl::Status CopyFromHost(void* dst, const void* src, size_t bytes) override;

  cudaStream_t get() const { return stream_.get(); }
  int device() const { return device_; }
  DeviceError* record() const { return &errors_->record->error; }
  // Side lanes (cuda_backend.h ForkLanes / JoinLanes).
  absl::StatusOr<std::vector<cublasHandle_t>> ForkLanes(int n) {
    UseDevice(device_);
    if (fork_.get() == nullptr) {
      ASSIGN_OR_RETURN(fork_, CudaEvent::Create(device_));
    }
    while (static_cast<int>(lanes_.size()) < n) {
      Lane lane;
      ASSIGN_OR_RETURN(lane.stream, CudaStream::Create(device_));
      ASSIGN_OR_RETURN(lane.done, CudaEvent::Create(device_));
      CUBLAS_RETURN_IF_ERROR(cublasCreate(&lane.cublas));
      lanes_.push_back(std::move(lane));
      CUBLAS_RETURN_IF_ERROR(cublasSetStream(lanes_.back().cublas, lanes_.back().stream.get()));
      CUBLAS_RETURN_IF_ERROR(cublasSetMathMode(lanes_.back().cublas, CUBLAS_DEFAULT_MATH));
    }
    RETURN_IF_ERROR(fork_.Record(stream_.get()));
    std::vector<cublasHandle_t> handles;
    for (int i = 0; i < n; ++i) {
      CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(lanes_[i].stream.get(), fork_.get(), 0));
      handles.push_back(lanes_[i].cublas);
    }
    return handles;
  }
  absl::Status JoinLanes(int n) {
    UseDevice(device_);
    for (int i = 0; i < n && i < static_cast<int>(lanes_.size()); ++i) {
      RETURN_IF_ERROR(lanes_[i].done.Record(lanes_[i].stream.get()));
      CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream_.get(), lanes_[i].done.get(), 0));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<cublasHandle_t> cublas() {
    if (cublas_ == nullptr) {
      UseDevice(device_);
      CUBLAS_RETURN_IF_ERROR(cublasCreate(&cublas_));
      CUBLAS_RETURN_IF_ERROR(cublasSetStream(cublas_, stream_.get()));
      // fp32 GEMMs stay fp32 (no TF32): results match the CPU backend to 1e-5.
      CUBLAS_RETURN_IF_ERROR(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH));
    }
    return cublas_;
  }

 private:
  struct HostFunc {
    std::function<absl::Status()> fn;
    std::shared_ptr<StreamErrors> errors;
  };
  static void CUDART_CB RunHostFunc(void* arg) {
    MarkDeviceThread();
    SetInHostFunction(true);  // until the payload (and what it holds) is gone
    {
      std::unique_ptr<HostFunc> f(static_cast<HostFunc*>(arg));
      absl::Status st = f->fn();
      if (!st.ok()) {
        std::lock_guard<std::mutex> lock(f->errors->mu);
        if (f->errors->host_error.ok()) f->errors->host_error = st;
      }
    }
    SetInHostFunction(false);
  }

  CudaStreamImpl(CudaBackend& backend, int device, StreamMode mode, CudaStream stream)
      : backend_(backend), device_(device), mode_(mode), stream_(std::move(stream)) {}

  CudaBackend& backend_;
  int device_;
  StreamMode mode_;
  CudaStream stream_;
  std::shared_ptr<StreamErrors> errors_ = std::make_shared<StreamErrors>();
  cublasHandle_t cublas_ = nullptr;
  struct Lane {
    CudaStream stream;
    CudaEvent done;
    cublasHandle_t cublas = nullptr;
  };
  std::vector<Lane> lanes_;  // created by ForkLanes; handles destroyed in the destructor
  CudaEvent fork_;
  // CopyFromHost's ring of page-locked memory: the uploads in flight (in
  // stream order, so their events complete in order) and spare events.
  struct InFlightUpload {
    size_t begin, end;
    CudaEvent done;
  };
  std::mutex upload_mu_;
  std::shared_ptr<Buffer> upload_ring_;
  bool upload_ring_refused_ = false;  // page-locked memory could not be had: pageable copies
  size_t upload_head_ = 0;
  std::deque<InFlightUpload> uploads_;
  std::vector<CudaEvent> spare_upload_events_;
};

class CudaBackend : public Backend {
 public:
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(int device) {
    auto b = std::unique_ptr<CudaBackend>(new CudaBackend(device));
    UseDevice(device);
    CUDA_RETURN_IF_ERROR(cudaFree(nullptr));  // creates the context now, errors here
    {
      std::lock_guard<std::mutex> lock(b->records_mu_);
      RETURN_IF_ERROR(b->GrowErrorRecords());
    }
    ASSIGN_OR_RETURN(b->default_stream_, CudaStreamImpl::Create(*b, device, StreamMode::kWorker));
    return b;
  }
  Device device() const override { return Device::Cuda(device_); }
  std::string name() const override { return absl::StrCat("cuda:", device_); }
  BufferType& default_buffer_type() override { return buffer_type_; }
  Stream& default_stream() override { return *default_stream_; }
  absl::StatusOr<std::unique_ptr<Stream>> CreateStream(StreamMode mode) override {
    ASSIGN_OR_RETURN(std::unique_ptr<CudaStreamImpl> s, CudaStreamImpl::Create(*this, device_, mode));
    return std::unique_ptr<Stream>(std::move(s));
  }
  absl::StatusOr<std::unique_ptr<Event>> CreateEvent() override {
    ASSIGN_OR_RETURN(CudaEvent e, CudaEvent::Create(device_, /*timing=*/true));
    return std::unique_ptr<Event>(std::make_unique<CudaEventImpl>(std::move(e)));
  }
  MemoryTracker& memory() override { return memory_; }
  bool SupportsOp(OpKind op) const override { return op < OpKind::kNumOpKinds; }
  // Kernels use the whole device; host threads are not this backend's to set.
  void SetNumThreads(int n) override {}
  int num_threads() const override { return 1; }
  Kernels& kernels() override { return *kernels_; }

  // Page-locked host memory (backend.h): the thread was checked by the caller.
  absl::StatusOr<std::shared_ptr<Buffer>> AllocatePinnedHostImpl(size_t bytes,
                                                                 MemoryCategory category) override {
    ASSIGN_OR_RETURN(Backend * cpu, GetBackend(Device::Cpu()));
    UseDevice(device_);
    FreeDeferredPinned();
    void* p = nullptr;
    const cudaError_t e = cudaHostAlloc(&p, std::max<size_t>(bytes, 1), cudaHostAllocPortable);
    if (e != cudaSuccess) {
      cudaGetLastError();
      return absl::ResourceExhaustedError(
          absl::StrCat(name(), ": cannot page-lock ", bytes, " bytes of host memory for ",
                       MemoryCategoryName(category), ": ", cudaGetErrorString(e)));
    }
    cpu->memory().OnAllocate(category, static_cast<int64_t>(bytes));
    return std::shared_ptr<Buffer>(std::make_shared<PinnedHostBuffer>(p, bytes, category, &cpu->memory()));
  }

  // Each stream's record (its DeviceError and host-gate count), in mapped host
  // memory. cudaHostAlloc synchronizes the device, so records come from slabs
  // allocated up front (Create) and are reused: a stream created while
  // another stream waits on a host gate for a communication that needs the
  // creating thread (the MPI progress thread makes its staging stream at its
  // first device buffer) would otherwise wait for that stream, and the
  // communication for it.
  absl::StatusOr<StreamRecord*> TakeErrorRecord() {
    std::lock_guard<std::mutex> lock(records_mu_);
    if (free_records_.empty()) RETURN_IF_ERROR(GrowErrorRecords());
    StreamRecord* r = free_records_.back();
    free_records_.pop_back();
    std::memset(r, 0, sizeof(StreamRecord));
    return r;
  }
  void ReturnErrorRecord(StreamRecord* r) {
    std::lock_guard<std::mutex> lock(records_mu_);
    free_records_.push_back(r);
  }

  // The live streams (the allocator fences on each).
  void AddStream(cudaStream_t s) {
    std::lock_guard<std::mutex> lock(streams_mu_);
    streams_.insert(s);
  }
  void RemoveStream(cudaStream_t s) {
    std::lock_guard<std::mutex> lock(streams_mu_);
    streams_.erase(s);
  }
  // An event recorded on each live stream, under the lock, so that none is
  // destroyed meanwhile (~CudaStreamImpl removes its stream before that).
  std::vector<CudaEvent> RecordOnStreams() {
    std::lock_guard<std::mutex> lock(streams_mu_);
    std::vector<CudaEvent> events;
    for (cudaStream_t s : streams_) {
      absl::StatusOr<CudaEvent> e = CudaEvent::Create(device_);
      if (!e.ok() || !e->Record(s).ok()) continue;  // a broken context fails every later call anyway
      events.push_back(std::move(*e));
    }
    return events;
  }

 private:
  explicit CudaBackend(int device)
      : device_(device),
        allocator_(device, this),
        buffer_type_(device, &memory_, &allocator_),
        // bf16: the GEMMs run on bf16 operands (cuBLAS, f32 accumulation); the
        // arithmetic element-wise, norm, RoPE, cross-entropy and row
        // scatter/dot kernels read and write bf16, and so does attention on the
        // fused and flash kernels; the gemm attention path and the reductions
        // stage bf16 through f32 around the f32 kernels.
        kernels_(MakeBf16StagingKernels(MakeCudaKernels(), {.stage_gemms = false,
                                                            .stage_elementwise = false,
                                                            .stage_rows = false,
                                                            .native_attention = NativeAttentionTakes})) {}

  // One slab of kRecordsPerSlab records (the backend, and so the slabs, live
  // for the process). Called with records_mu_ held.
  absl::Status GrowErrorRecords() {
    static constexpr int kRecordsPerSlab = 128;
    void* slab = nullptr;
    UseDevice(device_);
    CUDA_RETURN_IF_ERROR(cudaHostAlloc(&slab, kRecordsPerSlab * sizeof(StreamRecord), cudaHostAllocMapped));
    for (int i = kRecordsPerSlab - 1; i >= 0; --i)
      free_records_.push_back(static_cast<StreamRecord*>(slab) + i);
    return absl::OkStatus();
  }

  int device_;
  std::mutex records_mu_;
  std::vector<StreamRecord*> free_records_;
  MemoryTracker memory_;
  DeviceAllocator allocator_;
  CudaBufferType buffer_type_;
  std::unique_ptr<Kernels> kernels_;
  std::mutex streams_mu_;
  std::set<cudaStream_t> streams_;
  std::unique_ptr<CudaStreamImpl> default_stream_;
};

absl::StatusOr<std::unique_ptr<CudaStreamImpl>> CudaStreamImpl::Create(CudaBackend& backend, int device,
                                                                       StreamMode mode) {
  ASSIGN_OR_RETURN(CudaStream stream, CudaStream::Create(device));
  // Every CUDA stream is asynchronous: kInline is treated as kWorker (backend.h).
  auto s = std::unique_ptr<CudaStreamImpl>(new CudaStreamImpl(backend, device, mode, std::move(stream)));
  ASSIGN_OR_RETURN(s->errors_->record, backend.TakeErrorRecord());
  backend.AddStream(s->get());
  return s;
}

CudaStreamImpl::~CudaStreamImpl() {
  UseDevice(device_);
  cudaStreamSynchronize(stream_.get());  // destroying a stream waits for its work (backend.h)
  backend_.RemoveStream(stream_.get());  // before cudaStreamDestroy (the member's destructor)
  if (cublas_ != nullptr) cublasDestroy(cublas_);
  for (Lane& lane : lanes_) {
    cudaStreamSynchronize(lane.stream.get());
    if (lane.cublas != nullptr) cublasDestroy(lane.cublas);
  }
  std::lock_guard<std::mutex> lock(errors_->mu);
  if (errors_->record != nullptr) backend_.ReturnErrorRecord(errors_->record);
  errors_->record = nullptr;
}

Backend& CudaStreamImpl::backend() const { return backend_; }

absl::Status CudaStreamImpl::CopyFromHost(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  UseDevice(device_);
  std::lock_guard<std::mutex> lock(upload_mu_);
  constexpr size_t kAlign = 256;
  const size_t need = (bytes + kAlign - 1) / kAlign * kAlign;
  if (upload_ring_ == nullptr && !upload_ring_refused_) {
    // On a thread that may not page-lock memory (backend.h), pageable copies
    // until a later call from an ordinary thread makes the ring.
    absl::StatusOr<std::shared_ptr<Buffer>> ring =
        backend_.AllocatePinnedHost(g_upload_ring_bytes.load(), MemoryCategory::kOther);
    if (ring.ok()) {
      upload_ring_ = std::move(*ring);
    } else if (ring.status().code() != absl::StatusCode::kFailedPrecondition) {
      MOE_LOG(WARNING) << "cuda:" << device_ << ": no page-locked upload ring (" << ring.status().message()
                       << "); host-to-device uploads stay pageable and may wait for their stream";
      upload_ring_refused_ = true;
    }
  }
  if (upload_ring_ == nullptr || need > upload_ring_->size()) {
    // From pageable memory: CUDA may wait for the stream before staging it.
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_.get()));
    return absl::OkStatus();
  }
  const size_t begin = upload_head_ + need <= upload_ring_->size() ? upload_head_ : 0, end = begin + need;
  // The uploads still reading [begin, end) must have run: wait for the newest
  // of them (the stream runs them in order, so the older ones are done too).
  int newest_overlap = -1;
  for (int i = 0; i < static_cast<int>(uploads_.size()); ++i)
    if (uploads_[i].begin < end && begin < uploads_[i].end) newest_overlap = i;
  if (newest_overlap >= 0) CUDA_RETURN_IF_ERROR(cudaEventSynchronize(uploads_[newest_overlap].done.get()));
  for (int i = 0; i <= newest_overlap; ++i) {
    spare_upload_events_.push_back(std::move(uploads_.front().done));
    uploads_.pop_front();
  }
  while (!uploads_.empty()) {  // and retire the finished ones
    absl::StatusOr<bool> done = uploads_.front().done.Query();
    if (!done.ok() || !*done) break;
    spare_upload_events_.push_back(std::move(uploads_.front().done));
    uploads_.pop_front();
  }
  char* slot = static_cast<char*>(upload_ring_->data()) + begin;
  std::memcpy(slot, src, bytes);
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, slot, bytes, cudaMemcpyHostToDevice, stream_.get()));
  CudaEvent done;
  if (!spare_upload_events_.empty()) {
    done = std::move(spare_upload_events_.back());
    spare_upload_events_.pop_back();
  } else {
    ASSIGN_OR_RETURN(done, CudaEvent::Create(device_));
  }
  RETURN_IF_ERROR(done.Record(stream_.get()));
  uploads_.push_back({begin, end, std::move(done)});
  upload_head_ = end;
  return absl::OkStatus();
}

void DeviceAllocator::Advance() {
  while (!fenced_.empty()) {
    bool done = true;
    for (auto& e : fenced_.front().events) {
      absl::StatusOr<bool> q = e.Query();
      done = done && (!q.ok() || *q);
    }
    if (!done) break;
    for (auto& b : fenced_.front().blocks) {
      free_.emplace(b.size, b.p);
      cached_ += b.size;
    }
    fenced_.pop_front();
  }
  if (pending_.empty()) return;
  Fenced f;
  f.blocks = std::move(pending_);
  pending_.clear();
  f.events = backend_->RecordOnStreams();
  fenced_.push_back(std::move(f));
}

void DeviceAllocator::ReleaseAll() {
  for (auto& f : fenced_) {
    for (auto& e : f.events) cudaEventSynchronize(e.get());
    for (auto& b : f.blocks) cudaFree(b.p);
  }
  fenced_.clear();
  for (auto& [size, p] : free_) cudaFree(p);
  free_.clear();
  cached_ = 0;
}

absl::StatusOr<void*> DeviceAllocator::Take(size_t rounded) {
  std::lock_guard<std::mutex> lock(mu_);
  UseDevice(device_);
  Advance();
  if (auto it = free_.find(rounded); it != free_.end()) {
    void* p = it->second;
    free_.erase(it);
    cached_ -= rounded;
    return p;
  }
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, rounded);
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    ReleaseAll();
    e = cudaMalloc(&p, rounded);
  }
  if (e != cudaSuccess) return CudaStatus(e, "cudaMalloc", __FILE__, __LINE__);
  return p;
}

std::mutex g_backends_mu;
std::map<int, std::unique_ptr<CudaBackend>>& Backends() {
  static auto* backends = new std::map<int, std::unique_ptr<CudaBackend>>();  // never destroyed
  return *backends;
}

CudaStreamImpl& AsCuda(Stream& s) {
  auto* c = dynamic_cast<CudaStreamImpl*>(&s);
  MOE_CHECK(c != nullptr) << "a CUDA kernel was given a non-CUDA stream";
  return *c;
}

}  // namespace

absl::StatusOr<Backend*> GetCudaBackend(int index) {
  ASSIGN_OR_RETURN(int count, DeviceCount());
  if (index < 0 || index >= count)
    return absl::FailedPreconditionError(
        absl::StrCat("device cuda:", index, " does not exist (", count, " CUDA device(s) visible)"));
  std::lock_guard<std::mutex> lock(g_backends_mu);
  auto& slot = Backends()[index];
  if (slot == nullptr) {
    ASSIGN_OR_RETURN(slot, CudaBackend::Create(index));
  }
  return slot.get();
}

// The launchers get their stream and cuBLAS handle here, so this is where the
// calling thread is put on the stream's device.
cudaStream_t NativeStream(Stream& s) {
  CudaStreamImpl& c = AsCuda(s);
  UseDevice(c.device());
  return c.get();
}
absl::StatusOr<cublasHandle_t> CublasHandle(Stream& s) {
  UseDevice(AsCuda(s).device());
  return AsCuda(s).cublas();
}
absl::StatusOr<std::vector<cublasHandle_t>> ForkLanes(Stream& s, int n) { return AsCuda(s).ForkLanes(n); }
absl::Status JoinLanes(Stream& s, int n) { return AsCuda(s).JoinLanes(n); }
DeviceError* DeviceErrorRecord(Stream& s) { return AsCuda(s).record(); }
int DeviceIndex(Stream& s) { return AsCuda(s).device(); }

void SetUploadRingBytesForTesting(size_t bytes) {
  g_upload_ring_bytes = bytes == 0 ? size_t{1} << 20 : bytes;
}

absl::StatusOr<void*> ScratchAlloc(Stream& s, size_t bytes) {
  void* p = nullptr;
  UseDevice(DeviceIndex(s));
  CUDA_RETURN_IF_ERROR(cudaMallocAsync(&p, std::max<size_t>(bytes, 1), NativeStream(s)));
  return p;
}

void ScratchFree(Stream& s, void* p) {
  UseDevice(DeviceIndex(s));
  cudaFreeAsync(p, NativeStream(s));
}

}  // namespace moe::cuda
