#include "parallel/tensor_parallel.h"

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"

namespace moe::parallel {
namespace {

// f32, or bf16 activations under train.precision bf16 (the MPI backend sums
// bf16 in f32 and rounds each partial sum, as NCCL does).
absl::Status CheckFloat(const char* what, const Tensor& t) {
  if (!t.defined() || (t.dtype() != DType::kF32 && t.dtype() != DType::kBF16) || t.rank() < 1) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": tensor ",
                                                   t.defined() ? t.ToString() : "undefined",
                                                   " must be an f32 or bf16 tensor of rank >= 1"));
  }
  return absl::OkStatus();
}

Shape WithRows(const Shape& s, int64_t rows) {
  Shape out = s;
  out[0] = rows;
  return out;
}

}  // namespace

std::pair<int64_t, int64_t> RowSlice(int64_t num_rows, int size, int rank) {
  const int64_t base = num_rows / size, extra = num_rows % size;
  const int64_t begin = rank * base + std::min<int64_t>(rank, extra);
  return {begin, begin + base + (rank < extra ? 1 : 0)};
}

absl::Status AllReduceSum(comm::Communicator& tp, Stream& stream, const Tensor& t) {
  RETURN_IF_ERROR(CheckFloat("AllReduceSum", t));
  if (tp.size() == 1 || t.numel() == 0) return absl::OkStatus();
  // Ordered on the compute stream (its later work needs the sum): no host wait.
  return tp.AllReduce(t.raw_data(), t.raw_data(), static_cast<size_t>(t.numel()), t.dtype(),
                      comm::ReduceOp::kSum, stream);
}

absl::StatusOr<Tensor> AllGatherRows(comm::Communicator& tp, Stream& stream, const Tensor& local,
                                     int64_t num_rows) {
  RETURN_IF_ERROR(CheckFloat("AllGatherRows", local));
  const int P = tp.size();
  const auto [begin, end] = RowSlice(num_rows, P, tp.rank());
  if (local.size(0) != end - begin) {
    return absl::InvalidArgumentError(absl::StrCat("AllGatherRows: local ", local.ToString(),
                                                   " should hold rows [", begin, ", ", end, ") of ", num_rows,
                                                   " (TP rank ", tp.rank(), " of ", P, ")"));
  }
  int64_t row_elems = 1;
  for (int i = 1; i < local.rank(); ++i) row_elems *= local.size(i);
  ASSIGN_OR_RETURN(Tensor full, Tensor::Empty(stream.backend(), WithRows(local.shape(), num_rows),
                                              local.dtype(), MemoryCategory::kActivations));
  if (P == 1) {
    if (num_rows > 0) RETURN_IF_ERROR(ops::Copy(stream, local, full));
    return full;
  }
  std::vector<size_t> counts(P), displs(P);
  for (int r = 0; r < P; ++r) {
    const auto [b, e] = RowSlice(num_rows, P, r);
    counts[r] = static_cast<size_t>((e - b) * row_elems);
    displs[r] = static_cast<size_t>(b * row_elems);
  }
  RETURN_IF_ERROR(tp.AllGatherV(local.raw_data(), counts[tp.rank()], full.raw_data(), counts, displs,
                                local.dtype(), stream));
  return full;
}

Tensor SplitRows(const Tensor& full, int size, int rank) {
  const auto [begin, end] = RowSlice(full.size(0), size, rank);
  return full.Slice(begin, end);
}

absl::StatusOr<Tensor> ReduceScatterRows(comm::Communicator& tp, Stream& stream, const Tensor& full) {
  RETURN_IF_ERROR(CheckFloat("ReduceScatterRows", full));
  const int P = tp.size();
  const int64_t num_rows = full.size(0);
  const auto [begin, end] = RowSlice(num_rows, P, tp.rank());
  ASSIGN_OR_RETURN(Tensor out, Tensor::Empty(stream.backend(), WithRows(full.shape(), end - begin),
                                             full.dtype(), MemoryCategory::kActivations));
  if (end > begin) RETURN_IF_ERROR(ops::Copy(stream, full.Slice(begin, end), out));
  if (P == 1) return out;
  if (num_rows % P == 0) {
    // Equal slices: one ReduceScatter.
    RETURN_IF_ERROR(tp.ReduceScatter(full.raw_data(), out.raw_data(), static_cast<size_t>(out.numel()),
                                     full.dtype(), comm::ReduceOp::kSum, stream));
    return out;
  }
  // Uneven slices: sum everything, keep this rank's rows (T x d is small next
  // to the exchange it follows; uneven splits only happen for odd batch sizes).
  ASSIGN_OR_RETURN(Tensor sum,
                   Tensor::Empty(stream.backend(), full.shape(), full.dtype(), MemoryCategory::kActivations));
  RETURN_IF_ERROR(ops::Copy(stream, full, sum));
  RETURN_IF_ERROR(AllReduceSum(tp, stream, sum));
  if (end > begin) RETURN_IF_ERROR(ops::Copy(stream, sum.Slice(begin, end), out));
  return out;
}

}  // namespace moe::parallel
