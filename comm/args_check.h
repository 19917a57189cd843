// Argument validation for every Communicator call, in one place (like NCCL's
// ArgsCheck): counts, dtypes, reduce ops, null buffers, peers and roots in
// range, per-peer vectors of the right length, overlapping buffers, and the
// device each buffer lives on against the backend's. An error names the
// operation and the argument and says what would be accepted; nothing is
// enqueued or sent.
#ifndef MOE_COMM_ARGS_CHECK_H_
#define MOE_COMM_ARGS_CHECK_H_

#include "absl/status/status.h"
#include "comm/op.h"
#include "runtime/core/dtype.h"

namespace moe::comm {

// Validates `op` for a communicator of `size` ranks where this is `rank`,
// whose buffers must live on `device`. On success sets op->in_place,
// op->bytes_sent and op->bytes_received.
absl::Status CheckArgs(OpDesc* op, int rank, int size, Device device, const char* backend);

// The device a pointer refers to: cuda:i for CUDA device or managed memory
// (when built with CUDA), cpu otherwise.
Device PointerDevice(const void* ptr);

}  // namespace moe::comm

#endif  // MOE_COMM_ARGS_CHECK_H_
