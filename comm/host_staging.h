// Host staging of an operation's buffers, for a host-executing communicator
// (MPI) given device buffers: comm.backend = "mpi" with train.device = "cuda",
// which lets several ranks share one GPU (Open MPI as packaged is not
// CUDA-aware). The MPI backend's progress thread, once the operation's stream
// reached its marker:
//   1. StagedRanges: the byte ranges of device memory the operation touches,
//      overlapping ones merged (in place: send and recv are one range);
//   2. copies every range into the communicator's host staging region (the
//      ranges written too, so that what a V-collective leaves untouched
//      stays as it was). The region is page-locked memory on a GPU
//      (Backend::AllocatePinnedHost), so the copies are DMA at full speed;
//      it is reserved on the submitting thread (allocating page-locked
//      memory may wait for the whole device, and a stream may be waiting
//      for the progress thread), grows to a power of two (at least 1 MiB)
//      and is reused by every staged operation, one at a time;
//   3. RebaseBuffers: points the operation's buffers into those copies, and
//      runs it on the host as usual;
//   4. copies the written ranges back, before the operation completes, so
//      work the stream enqueued after the call sees the result.
// The copies run on a stream of the buffers' device that only the progress
// thread uses, synchronised there (a device-side wait, not a host sync of
// the caller). Tests force the same path on the CPU with
// CommOptions::stage_through_host.
#ifndef MOE_COMM_HOST_STAGING_H_
#define MOE_COMM_HOST_STAGING_H_

#include <cstddef>
#include <vector>

#include "comm/op.h"

namespace moe::comm {

struct StagedRange {
  char* device = nullptr;  // start of the range in the buffers' memory
  size_t bytes = 0;
  bool written = false;  // the operation writes (part of) it: copied back
};

// The non-empty buffer ranges of a validated `op` on a group of `size` ranks,
// sorted by address, overlapping ones merged. Barrier and Split have none.
std::vector<StagedRange> StagedRanges(const OpDesc& op, int size);

// Points op's send, recv and P2P buffers that lie in ranges[i] at the same
// offset of host[i] (one host copy per range). Buffers of zero bytes keep
// their pointer (never dereferenced).
void RebaseBuffers(const std::vector<StagedRange>& ranges, const std::vector<char*>& host, OpDesc* op);

}  // namespace moe::comm

#endif  // MOE_COMM_HOST_STAGING_H_
