// Tensor-parallel region helpers over the TP group (Megatron's mappings.py),
// on f32 or bf16 tensors of the stream's device.
//
//   Row-parallel linear, forward:      y_partial -> AllReduceSum (y on every TP rank)
//   Column-parallel linear, backward:  dx_partial -> AllReduceSum
//   MoE with duplicate-token dropping (DeepSpeed-TED): the TP ranks hold the
//   same T tokens; TP rank r dispatches rows RowSlice(T, tp, r) only, and
//   AllGatherRows restores [T, d] after the combine. Its backward is
//   SplitRows when the gradient of the gathered tensor is the same on every TP
//   rank (the residual stream's gradient is), ReduceScatterRows when each
//   rank holds a partial sum of it.
//
// All calls are collective over `tp` (every rank of the group calls them in
// the same order with matching shapes) and stream-ordered on `stream`: the
// collective runs after the stream's earlier work and before its later work,
// with no host wait (communicator.h). With a group of one rank they are
// copies or no-ops.
#ifndef MOE_PARALLEL_TENSOR_PARALLEL_H_
#define MOE_PARALLEL_TENSOR_PARALLEL_H_

#include <cstdint>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/communicator.h"
#include "runtime/core/backend.h"
#include "runtime/core/tensor.h"

namespace moe::parallel {

// The rows [begin, end) of `num_rows` that rank `rank` of `size` owns: an
// even split, the first num_rows % size ranks one row longer.
std::pair<int64_t, int64_t> RowSlice(int64_t num_rows, int size, int rank);

// t = sum over the TP ranks of t, in place (any shape, f32 or bf16).
absl::Status AllReduceSum(comm::Communicator& tp, Stream& stream, const Tensor& t);

// local [rows of RowSlice(num_rows, tp.size(), tp.rank()), ...] -> a new
// [num_rows, ...] tensor: the ranks' slices concatenated in rank order.
absl::StatusOr<Tensor> AllGatherRows(comm::Communicator& tp, Stream& stream, const Tensor& local,
                                     int64_t num_rows);

// full [num_rows, ...] -> this rank's rows (a view, no copy, no communication).
Tensor SplitRows(const Tensor& full, int size, int rank);

// full [num_rows, ...] (a partial sum on each rank) -> a new tensor with this
// rank's rows of the sum over the TP ranks.
absl::StatusOr<Tensor> ReduceScatterRows(comm::Communicator& tp, Stream& stream, const Tensor& full);

}  // namespace moe::parallel

#endif  // MOE_PARALLEL_TENSOR_PARALLEL_H_
