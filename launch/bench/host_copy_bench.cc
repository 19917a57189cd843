// moe-bench host-copy: device-to-host and host-to-device copies through
// page-locked host memory (Backend::AllocatePinnedHost: the MPI
// communicator's staging region and the checkpoint bucket) against ordinary
// pageable memory, in one run.
//
//   build/bin/moe-bench host-copy [device=cuda] [mb=64] [iters=10] [--json]
//
// One iteration copies `mb` MiB from the device into the host buffer and back,
// then waits for the stream (what a staged MPI operation does around the
// transfer). Wall-clock medians of interleaved runs; GB/s counts both
// directions. Ratio pinned_vs_pageable = pageable time / pinned time. On
// device=cpu both buffers are ordinary memory (the ratio is about 1).
#include <algorithm>
#include <chrono>
#include <vector>

#include "absl/strings/str_cat.h"
#include "launch/bench/bench.h"
#include "runtime/core/backend.h"
#include "runtime/core/device_select.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"
#include "runtime/core/tensor.h"

namespace moe::bench {
namespace {

absl::Status RunHostCopy(const Args& args, Reporter& rep) {
  std::string how;
  ASSIGN_OR_RETURN(Device device, ResolveDevice(args.Str("device", "cuda"), &how));
  ASSIGN_OR_RETURN(Backend * dev, GetBackend(device));
  ASSIGN_OR_RETURN(Backend * cpu, GetBackend(Device::Cpu()));
  const int64_t mb = args.Int("mb", 64), iters = args.Int("iters", 10);
  if (mb <= 0 || iters <= 0) return absl::InvalidArgumentError("host-copy: mb and iters must be > 0");
  const int64_t bytes = mb << 20;
  Stream& s = dev->default_stream();
  ASSIGN_OR_RETURN(Tensor src, Tensor::Empty(*dev, Shape{bytes / 4}, DType::kF32, MemoryCategory::kOther));
  RETURN_IF_ERROR(ops::Fill(s, src, 1.5));
  ASSIGN_OR_RETURN(Tensor pageable,
                   Tensor::Empty(*cpu, Shape{bytes / 4}, DType::kF32, MemoryCategory::kOther));
  ASSIGN_OR_RETURN(std::shared_ptr<Buffer> pinned_buffer,
                   dev->AllocatePinnedHost(static_cast<size_t>(bytes), MemoryCategory::kOther));
  ASSIGN_OR_RETURN(Tensor pinned, Tensor::FromBuffer(pinned_buffer, 0, Shape{bytes / 4}, DType::kF32));
  auto round_trip = [&](const Tensor& host) -> absl::StatusOr<double> {
    const auto start = std::chrono::steady_clock::now();
    RETURN_IF_ERROR(ops::Copy(s, src, host));
    RETURN_IF_ERROR(ops::Copy(s, host, src));
    RETURN_IF_ERROR(s.Synchronize());
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  };
  RETURN_IF_ERROR(round_trip(pageable).status());  // warm-up: first touch of the pages
  RETURN_IF_ERROR(round_trip(pinned).status());
  std::vector<double> tp, tl;
  for (int64_t i = 0; i < iters; ++i) {  // interleaved
    ASSIGN_OR_RETURN(double p, round_trip(pageable));
    ASSIGN_OR_RETURN(double l, round_trip(pinned));
    tp.push_back(p);
    tl.push_back(l);
  }
  if (pinned.data<float>()[bytes / 4 - 1] != 1.5f)
    return absl::InternalError("host-copy: the copies did not arrive (last element is not 1.5)");
  std::sort(tp.begin(), tp.end());
  std::sort(tl.begin(), tl.end());
  const double mp = tp[tp.size() / 2], ml = tl[tl.size() / 2];
  Measurement m;
  m.params = {{"device", how}, {"mb", absl::StrCat(mb)}, {"iters", absl::StrCat(iters)}};
  m.figures = {{"pageable_ms", mp, "ms"},
               {"pinned_ms", ml, "ms"},
               {"pageable_gbps", 2.0 * static_cast<double>(bytes) / mp / 1e6, "GB/s"},
               {"pinned_gbps", 2.0 * static_cast<double>(bytes) / ml / 1e6, "GB/s"}};
  m.ratio_name = "pinned_vs_pageable";
  m.ratio = mp / ml;
  rep.Add(m);
  rep.Note(
      "a round trip device -> host -> device and a stream sync; pinned_vs_pageable = pageable time / pinned");
  return absl::OkStatus();
}

Registrar reg("host-copy", "device<->host copies through page-locked vs pageable host memory", RunHostCopy);

}  // namespace
}  // namespace moe::bench
