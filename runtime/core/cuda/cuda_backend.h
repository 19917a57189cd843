// The CUDA backend (internal to runtime/core: model code reaches it only
// through backend.h and ops.h; GetBackend(Device::Cuda(i)) creates it).
//
// Streams are non-blocking cudaStream_t's (the backend's default stream too:
// never the legacy stream 0, which would serialise with every other stream).
// Each stream owns a cuBLAS handle (handles are not shared between host
// threads). LaunchHostFunc is cudaLaunchHostFunc; its function runs on CUDA's
// callback thread (marked as a device thread, so its waits are not counted)
// and must neither call CUDA nor wait for other work (the waits of Stream,
// Event and comm::Work refuse there, RefuseWaitInHostFunction); a non-OK
// status it returns is kept by the stream and returned by the next
// Synchronize, as are index errors that kernels found (a DeviceErrorRecord in
// mapped host memory, written by the first failing thread). WaitHostGate
// holds the stream with a one-thread kernel that polls the stream's count of
// opened gates in that mapped memory (cuda_gate.cu), so a stream waits for a
// host-side communication without any host thread waiting. Events are timed
// cudaEvent_t's.
//
// Buffers come from a caching allocator: a freed block is reused only after
// every stream of the device has passed the point where it was freed (a fence
// of events recorded on all live streams), so a kernel still queued on any
// stream never sees its memory handed out again. Memory accounting is by
// MemoryCategory, as on CPU (live bytes of live buffers; the cache is not
// counted). An allocation that fails empties the cache (after the fences
// complete) and retries before returning ResourceExhausted.
//
// Page-locked host memory (Backend::AllocatePinnedHost) is cudaHostAlloc'ed
// portable memory, counted in the CPU backend's tracker; not cached (its
// users allocate once and reuse). Its buffers free with cudaFreeHost, which
// waits for the device; one released on a device-side thread or in a host
// function is freed at the next allocation instead.
//
// Rank to GPU: device_select.h (LocalRankDevice).
//
// Compiled only with MOE_WITH_CUDA.
#ifndef MOE_RUNTIME_CORE_CUDA_CUDA_BACKEND_H_
#define MOE_RUNTIME_CORE_CUDA_CUDA_BACKEND_H_

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "runtime/core/backend.h"
#include "runtime/core/cuda/cuda_kernels.h"
#include "runtime/core/tensor.h"

namespace moe::cuda {

// The backend of device `index`, created on first use (FailedPrecondition
// naming the reason when there is no such device, e.g. the driver is too old).
absl::StatusOr<Backend*> GetCudaBackend(int index);

// For kernels: the native stream, its cuBLAS handle (bound to the stream) and
// the device error record kernels write to (device-visible pointer).
cudaStream_t NativeStream(Stream& s);
absl::StatusOr<cublasHandle_t> CublasHandle(Stream& s);
DeviceError* DeviceErrorRecord(Stream& s);
int DeviceIndex(Stream& s);

// Side lanes of `s` for independent cuBLAS products (cuda_gemm.cc's "streams"
// path of the grouped GEMM): ForkLanes makes `n` lanes (each a non-blocking
// stream of its own with a cuBLAS handle bound to it, created at first use and
// kept by `s`) wait for the work enqueued on `s` so far and returns their
// handles; JoinLanes makes `s` wait for everything enqueued on those lanes
// since. Work on the lanes must only touch memory that `s` keeps alive past
// the join (the allocator fences `s`, not the lanes). Same host thread as `s`.
absl::StatusOr<std::vector<cublasHandle_t>> ForkLanes(Stream& s, int n);
absl::Status JoinLanes(Stream& s, int n);

// Stream::CopyFromHost on a CUDA stream goes through a ring of page-locked
// memory that the stream keeps (1 MiB, made at the first call, which may so
// wait for the device; a slot is reused once the copy that read it ran,
// waiting for it only when the ring is full), so the host does not wait for
// the stream. A copy larger than the ring, or one made before the ring could
// be page-locked (a device-side thread), is a pageable copy, which CUDA may
// make wait for the stream.
// The ring size of streams whose ring is made from now on (0: 1 MiB).
void SetUploadRingBytesForTesting(size_t bytes);

// Stream-ordered scratch memory (cudaMallocAsync / cudaFreeAsync on the stream):
// valid for work enqueued on `s` between the two calls.
absl::StatusOr<void*> ScratchAlloc(Stream& s, size_t bytes);
void ScratchFree(Stream& s, void* p);

// The kernels table (cuda_kernels.cc).
std::unique_ptr<Kernels> MakeCudaKernels();
// Whether the attention call over `tensors` (q, k, v first; then the other
// bf16 operands: out, or out, dout, dq, dk, dv) runs on the flash kernels:
// MOE_ATTENTION=flash, every tensor bf16 with 16-byte aligned rows, and a shape
// they take (FlashAttentionShapeOk).
bool FlashAttentionTakes(absl::Span<const Tensor* const> tensors);
// Whether the attention call reads and writes bf16 itself: on the flash
// kernels, or on the fused ones (every path but MOE_ATTENTION=gemm, whose
// f32 row passes and TF32 products take f32 operands). The bf16 staging
// decorator passes such calls through (Bf16StagingOptions::native_attention)
// and stages the rest.
bool NativeAttentionTakes(absl::Span<const Tensor* const> tensors);

}  // namespace moe::cuda

#endif  // MOE_RUNTIME_CORE_CUDA_CUDA_BACKEND_H_
