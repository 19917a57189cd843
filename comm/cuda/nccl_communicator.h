// The NCCL backend of Communicator (device buffers of one CUDA device).
//
// Bootstrapped through MPI: rank 0 makes the ncclUniqueId and MPI_Bcast shares
// it. Operations are enqueued on the communicator's own CUDA stream (NCCL's
// asynchrony is the stream's): AllReduce, Broadcast, AllGather, ReduceScatter
// map to the NCCL collectives; AllGatherV, AllToAll(V) and P2P batches are
// grouped ncclSend/ncclRecv (ncclGroupStart/End) with the own block copied on
// the stream. Each operation is bracketed by two events; a poller thread per
// communicator marks Work done when the end event completes, feeds the sink and
// checks ncclCommGetAsyncError, aborting the communicator (ncclCommAbort) on
// an error; the watchdog aborts it and the job on a timeout. Split is
// ncclCommSplit, mirrored on an MPI communicator for the members' world ranks.
// Communicators are non-blocking (ncclConfig_t.blocking = 0): initialisation,
// split and every enqueue are polled with ncclCommGetAsyncError against
// comm.timeout_s, so a stuck NCCL call is aborted rather than hanging.
//
// Compiled only with MOE_WITH_CUDA.
#ifndef MOE_COMM_CUDA_NCCL_COMMUNICATOR_H_
#define MOE_COMM_CUDA_NCCL_COMMUNICATOR_H_

#include <cuda_runtime_api.h>

#include <memory>

#include "absl/status/statusor.h"
#include "comm/communicator.h"

namespace moe::comm {

// Collective over the world: true when every rank sees at least one CUDA device.
bool NcclAvailable();

// The world over NCCL on device options.cuda_device (or local rank mod the
// number of visible devices). Collective over the world.
absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclWorldCommunicator(const CommOptions& options);

// Stream ordering against compute streams, for communicators of the NCCL
// backend (dynamic_cast a Communicator to this interface).
class CudaStreamOrdering {
 public:
  virtual ~CudaStreamOrdering() = default;
  virtual cudaStream_t stream() const = 0;
  // Operations enqueued from now on start after the work enqueued so far on `compute`.
  virtual absl::Status WaitForStream(cudaStream_t compute) = 0;
  // Work enqueued from now on on `compute` starts after the operations enqueued so far.
  virtual absl::Status MakeStreamWait(cudaStream_t compute) = 0;
};

}  // namespace moe::comm

#endif  // MOE_COMM_CUDA_NCCL_COMMUNICATOR_H_
