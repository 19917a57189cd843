// Tensor views, memory accounting, streams and events of the CPU backend.
#include <atomic>
#include <chrono>
#include <memory>
#include <thread>

#include "runtime/core/backend.h"
#include "runtime/core/device_select.h"
#include "runtime/core/memory.h"
#include "runtime/core/status.h"
#include "tests/core/test_util.h"

namespace moe {
namespace {
using testing::Cpu;
using testing::FromVec;
using testing::S;
using testing::Vec;

TEST_CASE("Shape basics") {
  Shape s({2, 3, 4});
  CHECK(s.rank() == 3);
  CHECK(s.numel() == 24);
  CHECK(s[-1] == 4);
  CHECK(s.ToString() == "[2,3,4]");
  CHECK(Shape().numel() == 1);
  CHECK(Shape({5, 0}).numel() == 0);
}

TEST_CASE("Tensor views share storage without copies") {
  std::vector<float> v(24);
  for (int i = 0; i < 24; ++i) v[i] = i;
  Tensor t = FromVec({4, 3, 2}, v);
  CHECK(t.numel() == 24);
  CHECK(t.nbytes() == 96);
  CHECK(t.ToString() == "f32[4,3,2]@cpu");

  Tensor rows = t.Slice(1, 3);
  CHECK(rows.shape() == Shape({2, 3, 2}));
  CHECK(rows.data<float>() == t.data<float>() + 6);
  CHECK(rows.data<float>()[0] == 6.0f);
  CHECK(rows.buffer() == t.buffer());

  Tensor one = t.Select(3);
  CHECK(one.shape() == Shape({3, 2}));
  CHECK(one.data<float>()[0] == 18.0f);

  auto view = rows.View({-1, 2});
  REQUIRE(view.ok());
  CHECK(view->shape() == Shape({6, 2}));
  CHECK(!t.View({5, 5}).ok());
  CHECK(!t.View({-1, 5}).ok());

  Tensor flat = t.Flatten2D();
  CHECK(flat.shape() == Shape({12, 2}));
  CHECK(Tensor(t.Slice(0, 0)).numel() == 0);

  // Writes through a view are visible in the parent.
  rows.data<float>()[0] = -1.0f;
  CHECK(t.data<float>()[6] == -1.0f);

  CHECK(t.Overlaps(rows));
  CHECK(!t.Slice(0, 1).Overlaps(t.Slice(1, 2)));
  CHECK(t.Slice(0, 2).Overlaps(t.Slice(1, 3)));

  // Copies of the handle keep the buffer alive.
  Tensor keep;
  {
    Tensor tmp = FromVec({2}, {7.0f, 8.0f});
    keep = tmp.Slice(1, 2);
  }
  CHECK(keep.data<float>()[0] == 8.0f);
}

TEST_CASE("Tensor factories validate") {
  CHECK(!Tensor::Empty(Cpu(), {2, -1}, DType::kF32, MemoryCategory::kOther).ok());
  float x[3] = {1, 2, 3};
  auto bad = Tensor::FromHost(Cpu(), {2}, DType::kF32, x, 12, MemoryCategory::kOther);
  CHECK(!bad.ok());
  auto t = Tensor::Zeros(Cpu(), {3}, DType::kI64, MemoryCategory::kOther);
  REQUIRE(t.ok());
  CHECK(t->data<int64_t>()[2] == 0);
  auto from = Tensor::FromBuffer(t->buffer(), 8, {3}, DType::kI64);
  CHECK(!from.ok());  // 8 + 24 > 24 bytes
  // Without the CUDA backend, or without a usable GPU, cuda:0 is FailedPrecondition.
  auto cuda = GetBackend(Device::Cuda(0));
  CHECK((cuda.ok() ? BuiltWithCuda() : cuda.status().code() == absl::StatusCode::kFailedPrecondition));
  CHECK(GetBackend(Device::Cuda(4096)).status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(ParseDevice("cuda:3")->index == 3);
  CHECK(!ParseDevice("gpu").ok());
}

TEST_CASE("Memory accounting by category: live, peak, reset") {
  MemoryTracker& mem = Cpu().memory();
  MemoryStats p0 = mem.Stats(MemoryCategory::kOptimizer);
  MemoryStats c0 = mem.Stats(MemoryCategory::kCommunication);
  int64_t total0 = mem.Total().live_bytes;
  {
    auto a = Tensor::Empty(Cpu(), {100}, DType::kF32, MemoryCategory::kOptimizer);
    auto b = Tensor::Empty(Cpu(), {10, 10}, DType::kBF16, MemoryCategory::kCommunication);
    REQUIRE(a.ok());
    REQUIRE(b.ok());
    CHECK(mem.Stats(MemoryCategory::kOptimizer).live_bytes == p0.live_bytes + 400);
    CHECK(mem.Stats(MemoryCategory::kCommunication).live_bytes == c0.live_bytes + 200);
    CHECK(mem.Stats(MemoryCategory::kOptimizer).num_allocations == p0.num_allocations + 1);
    CHECK(mem.Total().live_bytes == total0 + 600);
    Tensor view = a->Slice(0, 10);  // views allocate nothing
    CHECK(mem.Total().live_bytes == total0 + 600);
  }
  CHECK(mem.Stats(MemoryCategory::kOptimizer).live_bytes == p0.live_bytes);
  CHECK(mem.Stats(MemoryCategory::kOptimizer).peak_bytes >= p0.live_bytes + 400);
  CHECK(mem.Total().peak_bytes >= total0 + 600);
  mem.ResetPeak();
  CHECK(mem.Stats(MemoryCategory::kOptimizer).peak_bytes == p0.live_bytes);
  CHECK(mem.Total().peak_bytes == mem.Total().live_bytes);
  {
    auto a = Tensor::Empty(Cpu(), {1000}, DType::kF32, MemoryCategory::kOptimizer);
    REQUIRE(a.ok());
  }
  CHECK(mem.Stats(MemoryCategory::kOptimizer).peak_bytes == p0.live_bytes + 4000);
  CHECK(mem.Total().peak_bytes == mem.Total().live_bytes + 4000);
  CHECK(mem.Report().find("optimizer") != std::string::npos);
}

TEST_CASE("Worker stream runs work in enqueue order") {
  auto stream = Cpu().CreateStream(StreamMode::kWorker);
  REQUIRE(stream.ok());
  std::vector<int> order;
  for (int i = 0; i < 1000; ++i)
    REQUIRE((*stream)
                ->LaunchHostFunc([&order, i] {
                  order.push_back(i);
                  return absl::OkStatus();
                })
                .ok());
  REQUIRE((*stream)->Synchronize().ok());
  REQUIRE(order.size() == 1000);
  for (int i = 0; i < 1000; ++i) CHECK(order[i] == i);
}

TEST_CASE("Ops on a worker stream are asynchronous and ordered") {
  auto stream = Cpu().CreateStream(StreamMode::kWorker);
  REQUIRE(stream.ok());
  Stream& s = **stream;
  Tensor x = testing::NewF32({1000});
  std::atomic<bool> release{false};
  REQUIRE(s.LaunchHostFunc([&] {
             while (!release) std::this_thread::yield();
             return absl::OkStatus();
           }).ok());
  REQUIRE(ops::Fill(s, x, 2.0).ok());
  REQUIRE(ops::Scale(s, x, 3.0f, x).ok());
  CHECK(x.data<float>()[0] == 0.0f);  // blocked behind the host function
  release = true;
  REQUIRE(s.Synchronize().ok());
  CHECK(x.data<float>()[999] == 6.0f);
}

TEST_CASE("Events order streams") {
  auto a = Cpu().CreateStream(StreamMode::kWorker);
  auto b = Cpu().CreateStream(StreamMode::kWorker);
  auto ev = Cpu().CreateEvent();
  REQUIRE((a.ok() && b.ok() && ev.ok()));
  CHECK((*ev)->Query());  // never recorded
  REQUIRE((*ev)->Synchronize().ok());
  for (int trial = 0; trial < 20; ++trial) {
    std::atomic<int> stage{0};
    std::atomic<bool> release{false};
    REQUIRE((*a)->LaunchHostFunc([&] {
                  while (!release) std::this_thread::yield();
                  stage = 1;
                  return absl::OkStatus();
                })
                .ok());
    REQUIRE((*a)->Record(**ev).ok());
    CHECK(!(*ev)->Query());
    REQUIRE((*b)->Wait(**ev).ok());
    int seen = -1;
    REQUIRE((*b)->LaunchHostFunc([&] {
                  seen = stage.load();
                  return absl::OkStatus();
                })
                .ok());
    release = true;
    REQUIRE((*b)->Synchronize().ok());
    CHECK(seen == 1);
    CHECK((*ev)->Query());
  }
  // The inline default stream waits on the host.
  std::atomic<bool> release{false};
  std::atomic<int> done{0};
  REQUIRE((*a)->LaunchHostFunc([&] {
                while (!release) std::this_thread::yield();
                done = 1;
                return absl::OkStatus();
              })
              .ok());
  REQUIRE((*a)->Record(**ev).ok());
  std::thread releaser([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    release = true;
  });
  REQUIRE(S().Wait(**ev).ok());
  CHECK(done == 1);
  releaser.join();
}

TEST_CASE("A host gate holds a CPU worker stream until it opens, and its error surfaces at Synchronize") {
  auto stream = Cpu().CreateStream(StreamMode::kWorker);
  REQUIRE(stream.ok());
  Stream& s = **stream;
  auto gate = std::make_shared<HostGate>();
  std::atomic<int> ran{0};
  REQUIRE(s.WaitHostGate(gate).ok());
  REQUIRE(s.LaunchHostFunc([&] {
             ran = 1;
             return absl::OkStatus();
           }).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  CHECK(ran == 0);
  CHECK_FALSE(gate->is_open());
  int callbacks = 0;
  gate->OnOpen([&](const absl::Status& st) { callbacks += st.ok() ? 1 : 100; });
  gate->Open(absl::OkStatus());
  gate->Open(absl::InternalError("ignored: a gate opens once"));
  gate->OnOpen([&](const absl::Status& st) { callbacks += st.ok() ? 1 : 100; });  // runs at once
  CHECK(callbacks == 2);
  REQUIRE(s.Synchronize().ok());
  CHECK(ran == 1);
  auto failed = std::make_shared<HostGate>();
  REQUIRE(s.WaitHostGate(failed).ok());
  failed->Open(absl::AbortedError("peer failed"));
  CHECK(s.Synchronize().code() == absl::StatusCode::kAborted);
  CHECK(s.Synchronize().ok());
  // Only a CUDA backend marks host functions; a CPU stream's may wait.
  CHECK_FALSE(InHostFunction());
  CHECK(RefuseWaitInHostFunction("test").ok());
}

TEST_CASE("Page-locked host memory: ordinary CPU memory here, counted, refused on device-side threads") {
  const MemoryStats before = Cpu().memory().Stats(MemoryCategory::kCommunication);
  {
    auto buffer = Cpu().AllocatePinnedHost(1000, MemoryCategory::kCommunication);
    REQUIRE(buffer.ok());
    CHECK((*buffer)->device().is_cpu());
    CHECK((*buffer)->host_visible());
    CHECK((*buffer)->size() == 1000);
    static_cast<char*>((*buffer)->data())[999] = 7;
    const MemoryStats during = Cpu().memory().Stats(MemoryCategory::kCommunication);
    CHECK(during.live_bytes == before.live_bytes + 1000);
    CHECK(during.num_allocations == before.num_allocations + 1);
  }
  CHECK(Cpu().memory().Stats(MemoryCategory::kCommunication).live_bytes == before.live_bytes);
  // A worker stream's thread is device-side (a stream may be waiting for it):
  // refused there on every backend, as page-locking may wait for the device.
  auto stream = Cpu().CreateStream(StreamMode::kWorker);
  REQUIRE(stream.ok());
  absl::Status on_worker;
  REQUIRE((*stream)
              ->LaunchHostFunc([&] {
                on_worker = Cpu().AllocatePinnedHost(64, MemoryCategory::kOther).status();
                return absl::OkStatus();
              })
              .ok());
  REQUIRE((*stream)->Synchronize().ok());
  INFO(on_worker.message());
  CHECK(on_worker.code() == absl::StatusCode::kFailedPrecondition);
  CHECK(std::string(on_worker.message()).find("device-side thread") != std::string::npos);
}

TEST_CASE(
    "Uploads in stream order: CopyFromHost takes the bytes at the call, FromHostOn and ZerosOn do not wait") {
  auto stream = Cpu().CreateStream(StreamMode::kWorker);
  REQUIRE(stream.ok());
  Stream& s = **stream;
  auto gate = std::make_shared<HostGate>();
  REQUIRE(s.WaitHostGate(gate).ok());
  std::vector<float> src = {1, 2, 3, 4};
  std::vector<float> dst(4, -1.0f);
  REQUIRE(s.CopyFromHost(dst.data(), src.data(), 4 * sizeof(float)).ok());  // returns behind the gate
  src.assign(4, 99.0f);                                                     // reused at once
  auto t =
      Tensor::FromHostOn(s, Shape{4}, DType::kF32, src.data(), 4 * sizeof(float), MemoryCategory::kOther);
  REQUIRE(t.ok());
  auto z = Tensor::ZerosOn(s, Shape{3}, DType::kF32, MemoryCategory::kOther);
  REQUIRE(z.ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(dst[0] == -1.0f);  // still behind the gate
  gate->Open(absl::OkStatus());
  REQUIRE(s.Synchronize().ok());
  CHECK(dst == std::vector<float>({1, 2, 3, 4}));
  CHECK(Vec(*t) == std::vector<float>({99, 99, 99, 99}));
  CHECK(Vec(*z) == std::vector<float>({0, 0, 0}));
  CHECK_FALSE(Tensor::FromHostOn(s, Shape{4}, DType::kF32, src.data(), 8, MemoryCategory::kOther).ok());
}

TEST_CASE("Asynchronous errors surface at Synchronize") {
  auto stream = Cpu().CreateStream(StreamMode::kWorker);
  auto ev = Cpu().CreateEvent();
  REQUIRE((stream.ok() && ev.ok()));
  Stream& s = **stream;
  REQUIRE(s.LaunchHostFunc([] { return absl::DataLossError("boom"); }).ok());
  REQUIRE(s.LaunchHostFunc([] { return absl::InternalError("second"); }).ok());
  REQUIRE(s.Record(**ev).ok());
  CHECK((*ev)->Synchronize().code() == absl::StatusCode::kDataLoss);
  absl::Status st = s.Synchronize();
  CHECK(st.code() == absl::StatusCode::kDataLoss);  // the first error
  CHECK(s.Synchronize().ok());                      // reported once
  // An out-of-range index found by a kernel on a worker stream.
  Tensor src = testing::NewF32({4, 3});
  Tensor dst = testing::NewF32({2, 3});
  Tensor idx = testing::FromVecI32({2}, {0, 9});
  REQUIRE(ops::GatherRows(s, src, idx, dst).ok());
  CHECK(s.Synchronize().code() == absl::StatusCode::kInvalidArgument);
  // The same on the inline stream is returned by the call.
  CHECK(ops::GatherRows(S(), src, idx, dst).code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("Thread count setting") {
  Backend& cpu = Cpu();
  int before = cpu.num_threads();
  cpu.SetNumThreads(2);
  CHECK(cpu.num_threads() == 2);
  Tensor x = testing::Random({300, 257}, 5);
  Tensor out = testing::NewF32({1});
  REQUIRE(ops::ReduceSum(S(), x, out).ok());
  float two = out.data<float>()[0];
  cpu.SetNumThreads(1);
  REQUIRE(ops::ReduceSum(S(), x, out).ok());
  CHECK(out.data<float>()[0] == two);  // deterministic whatever the thread count
  cpu.SetNumThreads(before);
  CHECK(OpKindName(OpKind::kAdamW) == std::string("AdamW"));
  CHECK(cpu.SupportsOp(OpKind::kGroupedGemm));
}

}  // namespace
}  // namespace moe
