#include "runtime/core/backend.h"

#include <atomic>
#include <cstdlib>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "runtime/core/cpu/cpu_backend.h"
#if MOE_WITH_CUDA
#include "runtime/core/cuda/cuda_backend.h"
#endif

namespace moe {

const char* OpKindName(OpKind op) {
  static const char* const kNames[] = {"Copy",
                                       "Cast",
                                       "Fill",
                                       "Gemm",
                                       "BatchedGemm",
                                       "GroupedGemm",
                                       "GroupedGemmWeightGrad",
                                       "Add",
                                       "Axpby",
                                       "Mul",
                                       "Scale",
                                       "Silu",
                                       "SiluBackward",
                                       "SwiGLU",
                                       "SwiGLUBackward",
                                       "ReduceSum",
                                       "ReduceSumSquares",
                                       "ReduceMax",
                                       "SumRows",
                                       "RmsNorm",
                                       "RmsNormBackward",
                                       "AddRmsNorm",
                                       "Rope",
                                       "RopeBackward",
                                       "CausalAttention",
                                       "CausalAttentionBackward",
                                       "Softmax",
                                       "SoftmaxBackward",
                                       "LogSumExp",
                                       "CrossEntropy",
                                       "CrossEntropyBackward",
                                       "TopK",
                                       "RouterScores",
                                       "RouterScoresBackward",
                                       "GatherRows",
                                       "ScatterAddRows",
                                       "GatherRowDot",
                                       "InitNormal",
                                       "AdamW"};
  static_assert(sizeof(kNames) / sizeof(kNames[0]) == static_cast<int>(OpKind::kNumOpKinds));
  int i = static_cast<int>(op);
  return i < static_cast<int>(OpKind::kNumOpKinds) ? kNames[i] : "?";
}

namespace {
std::atomic<uint64_t> g_host_syncs{0};
thread_local bool t_device_thread = false;
}  // namespace

uint64_t HostSyncCount() { return g_host_syncs.load(std::memory_order_relaxed); }
void CountHostSync() {
  if (!t_device_thread) g_host_syncs.fetch_add(1, std::memory_order_relaxed);
}
void MarkDeviceThread() { t_device_thread = true; }
bool IsDeviceThread() { return t_device_thread; }

namespace {
thread_local bool t_in_host_function = false;
}  // namespace
bool InHostFunction() { return t_in_host_function; }
void SetInHostFunction(bool in) { t_in_host_function = in; }
absl::Status RefuseWaitInHostFunction(const char* what) {
  if (!t_in_host_function) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat(what, " called inside a CUDA host function (cudaLaunchHostFunc), which must not wait ",
                   "for other work; make the stream wait with Stream::WaitHostGate instead"));
}

void HostGate::Open(absl::Status status) {
  std::vector<std::function<void(const absl::Status&)>> run;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (open_.load(std::memory_order_relaxed)) return;
    status_ = std::move(status);
    open_.store(true, std::memory_order_release);
    run.swap(on_open_);
  }
  cv_.notify_all();
  for (auto& fn : run) fn(status_);  // status_ no longer changes
}

void HostGate::OnOpen(std::function<void(const absl::Status&)> fn) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!open_.load(std::memory_order_relaxed)) {
      on_open_.push_back(std::move(fn));
      return;
    }
  }
  fn(status_);
}

absl::Status HostGate::Wait() const {
  if (is_open()) return status_;
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return open_.load(std::memory_order_relaxed); });
  return status_;
}

absl::StatusOr<std::shared_ptr<Buffer>> Backend::AllocatePinnedHost(size_t bytes, MemoryCategory category) {
  if (IsDeviceThread() || InHostFunction())
    return absl::FailedPreconditionError(absl::StrCat(
        name(), ": page-locked host memory (", bytes, " bytes for ", MemoryCategoryName(category),
        ") requested on a device-side thread or in a host function; allocating it may wait for the whole ",
        "device, which may be waiting for this thread: allocate it on the thread that enqueues the work"));
  return AllocatePinnedHostImpl(bytes, category);
}

absl::StatusOr<std::shared_ptr<Buffer>> Backend::AllocatePinnedHostImpl(size_t bytes,
                                                                        MemoryCategory category) {
  return cpu::CpuBackendInstance().default_buffer_type().Allocate(bytes, category);
}

absl::StatusOr<Backend*> GetBackend(Device device) {
  if (device.is_cpu()) return &cpu::CpuBackendInstance();
#if MOE_WITH_CUDA
  return cuda::GetCudaBackend(device.index);
#else
  return absl::FailedPreconditionError(
      absl::StrCat("device ", device.ToString(),
                   ": this build has no CUDA backend (use train.device = \"cpu\", or build on a machine "
                   "with the CUDA toolkit and -DMOE_WITH_CUDA=ON)"));
#endif
}

absl::StatusOr<Device> ParseDevice(const std::string& text) {
  if (text == "cpu") return Device::Cpu();
  if (text == "cuda") return Device::Cuda(0);
  int index = 0;
  if (absl::StartsWith(text, "cuda:") && absl::SimpleAtoi(text.substr(5), &index) && index >= 0)
    return Device::Cuda(index);
  return absl::InvalidArgumentError(
      absl::StrCat("device \"", text, "\" is not one of \"cpu\", \"cuda\", \"cuda:N\""));
}

}  // namespace moe
