// RAII, move-only handles for a CUDA stream and a CUDA event of one device
// (the CUDA plumbing of runtime/core; the backend and comm/cuda use them).
#ifndef MOE_RUNTIME_CORE_CUDA_CUDA_HANDLES_H_
#define MOE_RUNTIME_CORE_CUDA_CUDA_HANDLES_H_

#include <cuda_runtime_api.h>

#include "absl/status/statusor.h"

namespace moe::cuda {

// Makes `device` current for the calling thread and leaves it so (each
// process drives one GPU, its local rank's). Not a scoped guard: restoring the
// device a thread had before would make a thread that never chose one
// initialise a context on GPU 0, every rank of a node alike. The backend's
// entry points that launch work (NativeStream, CublasHandle, ForkLanes) call
// it, since a kernel launched into a stream of another device fails.
void UseDevice(int device);

class CudaStream {
 public:
  CudaStream() = default;
  // A non-blocking stream (does not synchronise with the legacy default stream).
  static absl::StatusOr<CudaStream> Create(int device);
  ~CudaStream();
  CudaStream(CudaStream&& o) noexcept : stream_(o.stream_), device_(o.device_) { o.stream_ = nullptr; }
  CudaStream& operator=(CudaStream&& o) noexcept;
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  cudaStream_t get() const { return stream_; }
  int device() const { return device_; }

 private:
  cudaStream_t stream_ = nullptr;
  int device_ = -1;
};

class CudaEvent {
 public:
  CudaEvent() = default;
  // Timing disabled by default: the events order streams and mark completion;
  // `timing` enables cudaEventElapsedTime (the backend's Event).
  static absl::StatusOr<CudaEvent> Create(int device, bool timing = false);
  ~CudaEvent();
  CudaEvent(CudaEvent&& o) noexcept : event_(o.event_) { o.event_ = nullptr; }
  CudaEvent& operator=(CudaEvent&& o) noexcept;
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  cudaEvent_t get() const { return event_; }
  absl::Status Record(cudaStream_t stream);
  // True once the work recorded before it finished; an error of the device otherwise.
  absl::StatusOr<bool> Query() const;

 private:
  cudaEvent_t event_ = nullptr;
};

}  // namespace moe::cuda

#endif  // MOE_RUNTIME_CORE_CUDA_CUDA_HANDLES_H_
