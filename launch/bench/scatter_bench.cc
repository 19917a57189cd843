// moe-bench scatter: the MoE combine's row scatter-add (y[t] = sum of w_r
// out_r over the rows r of token t), as the dispatchers run it and as they
// ran it before, in one run:
//   fill_sort   a fill of y, then the scatter-add sorting its sources on the
//               device (on CUDA: a key pass, a CUB radix sort, the sorted add;
//               on the CPU, which needs no sort, column blocks in parallel,
//               each over all sources);
//   sort        the same with ScatterMode::kOverwrite (no fill);
//   by_row      kOverwrite with the sources' order made on the host
//               (ops::ScatterRowOrder, uploaded beforehand: the dispatchers
//               send it up with their routing tables, in the same copy); on
//               CUDA one launch, on the CPU destination rows in parallel.
// order_host_ms is ScatterRowOrder's own host time (the counting sort), which
// the dispatcher pays on the host while the device works.
//
//   build/bin/moe-bench scatter [device=cpu|cuda] [tokens=8192] [hidden=1024]
//                               [experts=8] [top_k=2] [iters=20] [--json]
//
// Rows go to experts t * 7 + j (mod experts), in expert order, tokens
// ascending within an expert: the dispatcher's layout. f32 rows. Wall-clock
// medians of interleaved runs, each ending with a stream sync. Ratio
// by_row_vs_sort = sort time / by_row time.
#include <algorithm>
#include <chrono>
#include <vector>

#include "absl/strings/str_cat.h"
#include "launch/bench/bench.h"
#include "runtime/core/backend.h"
#include "runtime/core/device_select.h"
#include "runtime/core/kernels.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"
#include "runtime/core/tensor.h"

namespace moe::bench {
namespace {

using Clock = std::chrono::steady_clock;

double Ms(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

absl::Status RunScatter(const Args& args, Reporter& rep) {
  std::string how;
  ASSIGN_OR_RETURN(Device device, ResolveDevice(args.Str("device", "cpu"), &how));
  ASSIGN_OR_RETURN(Backend * dev, GetBackend(device));
  const int64_t T = args.Int("tokens", 8192), d = args.Int("hidden", 1024), E = args.Int("experts", 8);
  const int64_t k = args.Int("top_k", 2), iters = args.Int("iters", 20);
  if (T <= 0 || d <= 0 || E <= 0 || iters <= 0 || k <= 0 || k > E)
    return absl::InvalidArgumentError(
        "scatter: tokens, hidden, experts, iters must be > 0 and 1 <= top_k <= experts");
  // The dispatcher's rows: expert order, tokens ascending within an expert.
  std::vector<std::vector<int32_t>> by_expert(E);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) by_expert[(t * 7 + j) % E].push_back(static_cast<int32_t>(t));
  std::vector<int32_t> token;
  for (const auto& rows : by_expert) token.insert(token.end(), rows.begin(), rows.end());
  const int64_t n = static_cast<int64_t>(token.size());
  std::vector<float> weight(n, 0.5f);
  const auto order_start = Clock::now();
  ASSIGN_OR_RETURN(const std::vector<int32_t> order, ops::ScatterRowOrder(token, T));
  const double order_ms = Ms(order_start);

  Stream& s = dev->default_stream();
  auto upload = [&](const void* p, size_t bytes, DType dtype, Shape shape) {
    return Tensor::FromHost(*dev, shape, dtype, p, bytes, MemoryCategory::kActivations);
  };
  ASSIGN_OR_RETURN(Tensor index, upload(token.data(), token.size() * 4, DType::kI32, Shape{n}));
  ASSIGN_OR_RETURN(Tensor w, upload(weight.data(), weight.size() * 4, DType::kF32, Shape{n}));
  ASSIGN_OR_RETURN(Tensor by_row, upload(order.data(), order.size() * 4, DType::kI32,
                                         Shape{static_cast<int64_t>(order.size())}));
  ASSIGN_OR_RETURN(Tensor rows, Tensor::Empty(*dev, Shape{n, d}, DType::kF32, MemoryCategory::kActivations));
  ASSIGN_OR_RETURN(Tensor y, Tensor::Empty(*dev, Shape{T, d}, DType::kF32, MemoryCategory::kActivations));
  RETURN_IF_ERROR(ops::InitNormal(s, rows, 1, "scatter_bench.rows", 1.0f));
  RETURN_IF_ERROR(s.Synchronize());

  // kind 0: fill + sort; 1: overwrite, sort; 2: overwrite, by_row.
  auto run = [&](int kind) -> absl::StatusOr<double> {
    const auto start = Clock::now();
    if (kind == 0) RETURN_IF_ERROR(ops::Fill(s, y, 0.0));
    const ScatterMode mode = kind == 0 ? ScatterMode::kAccumulate : ScatterMode::kOverwrite;
    RETURN_IF_ERROR(ops::ScatterAddRows(s, rows, index, y, w, mode, kind == 2 ? by_row : Tensor()));
    RETURN_IF_ERROR(s.Synchronize());
    return Ms(start);
  };
  ASSIGN_OR_RETURN(const std::vector<double> median, InterleavedMedians(3, iters, run));
  // Bytes a pass must move: read the rows, write y.
  const double gb = static_cast<double>(n * d + T * d) * 4 / 1e9;
  Measurement row;
  row.params = {{"device", how},
                {"tokens", absl::StrCat(T)},
                {"hidden", absl::StrCat(d)},
                {"experts", absl::StrCat(E)},
                {"top_k", absl::StrCat(k)},
                {"iters", absl::StrCat(iters)}};
  row.figures = {{"fill_sort_ms", median[0], "ms"},
                 {"sort_ms", median[1], "ms"},
                 {"by_row_ms", median[2], "ms"},
                 {"order_host_ms", order_ms, "ms"},
                 {"by_row_gbps", gb / (median[2] * 1e-3), "GB/s"},
                 {"sort_vs_fill_sort", median[0] / median[1], ""}};
  row.ratio_name = "by_row_vs_sort";
  row.ratio = median[1] / median[2];
  rep.Add(row);
  rep.Note(
      "the combine's scatter-add into y [tokens, hidden]: fill + scatter sorting on the device (fill_sort), "
      "overwriting instead of the fill (sort), and overwriting with the order made on the host (by_row, what "
      "the dispatchers run); by_row_vs_sort = sort / by_row");
  return absl::OkStatus();
}

Registrar reg("scatter", "MoE combine scatter-add: the order from the host (by_row) vs sorted on the device",
              RunScatter);

}  // namespace
}  // namespace moe::bench
