// The per-category time breakdown (op_profile.h): host-timed ops on the inline
// stream and regions, stream-timed ops (events around each) on an asynchronous
// stream, here a CPU worker stream, which is timed as a CUDA stream is.
#include "runtime/core/op_profile.h"

#include <memory>
#include <string>
#include <thread>

#include "runtime/core/status.h"
#include "tests/core/test_util.h"

namespace moe {
namespace {
using namespace moe::testing;

constexpr int kGemm = static_cast<int>(ProfileCategory::kGemm);
constexpr int kInit = static_cast<int>(ProfileCategory::kInit);
constexpr int kRouter = static_cast<int>(ProfileCategory::kRouter);

TEST_CASE("op profile: nothing is counted while disabled") {
  OpProfiler::Enable(false);
  OpProfiler::Take();
  Tensor a = Random({64, 64}, 1), c = NewF32({64, 64});
  REQUIRE(ops::Gemm(S(), a, false, a, false, c).ok());
  OpProfile p = OpProfiler::Take();
  CHECK(p.calls[kGemm] == 0);
  CHECK(p.total_seconds() == 0);
  CHECK(p.total_stream_seconds() == 0);
}

TEST_CASE("op profile: inline ops and regions are host-timed, exclusively") {
  OpProfiler::Take();
  OpProfiler::Enable(true);
  Tensor a = Random({128, 128}, 1), c = NewF32({128, 128});
  {
    ProfileScope region(ProfileCategory::kRouter);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    REQUIRE(ops::Gemm(S(), a, false, a, false, c).ok());
  }
  OpProfiler::Enable(false);
  OpProfile p = OpProfiler::Take();
  CHECK(p.calls[kGemm] == 1);
  CHECK(p.calls[kRouter] == 1);
  CHECK(p.seconds[kRouter] >= 0.019);  // the sleep, not the GEMM inside the region
  CHECK(p.seconds[kGemm] > 0);
  CHECK(p.stream_calls[kGemm] == 0);
  CHECK(p.Report(1.0).find("asynchronous") == std::string::npos);
}

TEST_CASE("op profile: ops on an asynchronous stream are timed by events") {
  absl::StatusOr<std::unique_ptr<Stream>> worker = Cpu().CreateStream(StreamMode::kWorker);
  REQUIRE(worker.ok());
  Stream& w = **worker;
  Tensor a = Random({256, 256}, 1), c = NewF32({256, 256});
  OpProfiler::Take();
  OpProfiler::Enable(true);
  // The worker stream is held up for 200 ms before the GEMM: the GEMM's time runs
  // from when the stream reaches it, so the hold-up is not charged to it; the
  // InitNormal after it is charged to init.
  REQUIRE(w.LaunchHostFunc([] {
             std::this_thread::sleep_for(std::chrono::milliseconds(200));
             return absl::OkStatus();
           }).ok());
  REQUIRE(ops::Gemm(w, a, false, a, false, c).ok());
  REQUIRE(ops::Gemm(w, a, false, a, false, c).ok());
  REQUIRE(ops::InitNormal(w, c, 7, "x", 0.02f).ok());
  OpProfiler::Enable(false);
  OpProfile p = OpProfiler::Take();  // waits for the events
  CHECK(p.stream_calls[kGemm] == 2);
  CHECK(p.stream_calls[kInit] == 1);
  CHECK(p.stream_seconds[kGemm] > 0);
  CHECK(p.stream_seconds[kGemm] < 0.15);  // 2 GEMMs of 256^3 (a few ms): not the 200 ms hold-up
  CHECK(p.stream_seconds[kInit] > 0);
  CHECK(p.calls[kGemm] == 0);  // the host call measured nothing
  CHECK(p.seconds[kGemm] == 0);
  CHECK(p.stream_dropped == 0);
  const std::string report = p.Report(0.1);
  CHECK(report.find("ops on asynchronous streams") != std::string::npos);
  CHECK(report.find("gemm") != std::string::npos);
  REQUIRE(w.Synchronize().ok());
  // Per-step averages.
  p.DivideBy(2);
  CHECK(p.stream_calls[kGemm] == 1);
  // Taken: the next Take() is empty.
  OpProfile empty = OpProfiler::Take();
  CHECK(empty.stream_calls[kGemm] == 0);
  CHECK(empty.total_stream_seconds() == 0);
}

}  // namespace
}  // namespace moe
