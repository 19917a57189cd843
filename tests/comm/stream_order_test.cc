// The stream-ordered contract of Communicator (communicator.h) on the CPU
// backend's streams and the MPI communicator, and event timing and host-wait
// accounting of the CPU backend (backend.h). Runs under mpirun at 2 and 3 ranks.
#include <catch2/catch.hpp>
#include <chrono>
#include <cmath>
#include <memory>
#include <thread>
#include <vector>

#include "comm/communicator.h"
#include "comm/mpi_communicator.h"
#include "comm/mpi_env.h"
#include "runtime/core/backend.h"

namespace moe::comm {
namespace {

using Clock = std::chrono::steady_clock;

// stage_through_host: buffers go through the MPI communicator's host staging
// (comm/host_staging.h), as device buffers do.
std::unique_ptr<Communicator> World(bool stage_through_host = false) {
  CommOptions options;
  options.backend = "mpi";
  options.timeout_s = 60;
  options.stage_through_host = stage_through_host;
  auto world = CreateWorldCommunicator(options);
  REQUIRE(world.ok());
  return std::move(world).value();
}

Backend& Cpu() { return *GetBackend(Device::Cpu()).value(); }
std::unique_ptr<Stream> Worker() { return Cpu().CreateStream(StreamMode::kWorker).value(); }
std::unique_ptr<Event> NewEvent() { return Cpu().CreateEvent().value(); }

void Ok(const absl::Status& s) {
  INFO(s.ToString());
  REQUIRE(s.ok());
}

absl::Status Sleep(int ms) {
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  return absl::OkStatus();
}

TEST_CASE("events time the stream between two markers") {
  auto stream = Worker();
  auto a = NewEvent(), b = NewEvent();
  Ok(stream->LaunchHostFunc([] { return Sleep(30); }));  // a is reached after this
  Ok(stream->Record(*a));
  Ok(stream->LaunchHostFunc([] { return Sleep(80); }));
  Ok(stream->Record(*b));
  // Not complete yet: like cudaEventElapsedTime, asking now is an error.
  CHECK(b->ElapsedMsSince(*a).status().code() == absl::StatusCode::kFailedPrecondition);
  Ok(b->Synchronize());
  auto ms = b->ElapsedMsSince(*a);
  Ok(ms.status());
  CHECK(*ms >= 80.0);
  CHECK(*ms < 80.0 + 200.0);  // generous: the machine is shared
  auto back = a->ElapsedMsSince(*b);
  Ok(back.status());
  CHECK(*back == -*ms);

  // Inline stream: the time is taken at Record (everything before has run).
  Stream& inline_stream = Cpu().default_stream();
  auto c = NewEvent(), d = NewEvent();
  Ok(inline_stream.Record(*c));
  Ok(inline_stream.LaunchHostFunc([] { return Sleep(20); }));
  Ok(inline_stream.Record(*d));
  auto inline_ms = d->ElapsedMsSince(*c);
  Ok(inline_ms.status());
  CHECK(*inline_ms >= 20.0);
}

TEST_CASE("host waits are counted; device-side waits are not") {
  auto stream = Worker();
  auto e = NewEvent();
  const uint64_t before = HostSyncCount();
  Ok(stream->Synchronize());
  Ok(stream->Record(*e));
  Ok(e->Synchronize());
  CHECK(HostSyncCount() == before + 2);
  // The worker waiting on another stream's event, and Stream::Wait, are device-side.
  auto other = Worker();
  Ok(other->LaunchHostFunc([&] { return e->Synchronize(); }));
  Ok(other->Wait(*e));
  Ok(Cpu().default_stream().Wait(*e));
  const uint64_t mid = HostSyncCount();
  CHECK(mid == before + 2);
  Ok(other->Synchronize());
  CHECK(HostSyncCount() == mid + 1);
}

TEST_CASE("a stream-ordered all-reduce runs after the stream's delayed producer, without a host wait") {
  auto world = World();
  auto compute = Worker();
  const int n = world->size(), me = world->rank();
  std::vector<float> buf(64, 0.0f);
  const uint64_t syncs = HostSyncCount();
  const Clock::time_point start = Clock::now();
  // The producer is slow: the collective must read what it writes.
  Ok(compute->LaunchHostFunc([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<float>(me + i);
    return absl::OkStatus();
  }));
  Ok(world->AllReduce(buf.data(), buf.data(), buf.size(), DType::kF32, ReduceOp::kSum, *compute));
  // A consumer enqueued after it sees the reduced values.
  std::vector<float> seen(buf.size(), -1.0f);
  Ok(compute->LaunchHostFunc([&] {
    seen = buf;
    return absl::OkStatus();
  }));
  const double enqueue_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  CHECK(enqueue_ms < 150.0);  // returned before the delayed producer ran
  CHECK(HostSyncCount() == syncs);
  Ok(compute->Synchronize());
  for (size_t i = 0; i < buf.size(); ++i) {
    const float want = static_cast<float>(n * (n - 1) / 2 + n * static_cast<int>(i));
    REQUIRE(seen[i] == want);
  }
}

// The MPI backend's host staging of device buffers (comm/host_staging.h),
// forced on host buffers: the copies run after the delayed producer and the
// results are back before the consumer; an AllToAllV leaves the gaps of its
// receive buffer as they were; an in-place AllReduce reduces in place.
TEST_CASE("staged through host copies, stream-ordered ops keep the stream's order and untouched bytes") {
  auto world = World(/*stage_through_host=*/true);
  auto compute = Worker();
  const int n = world->size(), me = world->rank();
  // Rank r sends r + 1 values to each peer p (value 100 r + p); receive
  // blocks sit 3 elements apart, and the gaps hold -7.
  std::vector<size_t> send_counts(n), send_displs(n), recv_counts(n), recv_displs(n);
  size_t at = 0;
  for (int p = 0; p < n; ++p) {
    send_counts[p] = static_cast<size_t>(me + 1);
    send_displs[p] = p * static_cast<size_t>(me + 1);
    recv_counts[p] = static_cast<size_t>(p + 1);
    recv_displs[p] = at;
    at += static_cast<size_t>(p + 1) + 3;
  }
  std::vector<int32_t> send(n * (me + 1), -1), recv(at, -7);
  std::vector<float> sum(33, 0.0f);
  Ok(compute->LaunchHostFunc([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    for (int p = 0; p < n; ++p)
      for (int k = 0; k <= me; ++k) send[send_displs[p] + k] = 100 * me + p;
    for (size_t i = 0; i < sum.size(); ++i) sum[i] = static_cast<float>(me + i);
    return absl::OkStatus();
  }));
  Ok(world->AllToAllV(send.data(), send_counts, send_displs, recv.data(), recv_counts, recv_displs,
                      DType::kI32, *compute));
  Ok(world->AllReduce(sum.data(), sum.data(), sum.size(), DType::kF32, ReduceOp::kSum, *compute));
  std::vector<int32_t> seen_recv;
  std::vector<float> seen_sum;
  Ok(compute->LaunchHostFunc([&] {
    seen_recv = recv;
    seen_sum = sum;
    return absl::OkStatus();
  }));
  Ok(compute->Synchronize());
  for (int p = 0; p < n; ++p) {
    for (size_t k = 0; k < recv_counts[p]; ++k) REQUIRE(seen_recv[recv_displs[p] + k] == 100 * p + me);
    for (size_t k = 0; k < 3; ++k) REQUIRE(seen_recv[recv_displs[p] + recv_counts[p] + k] == -7);
  }
  for (size_t i = 0; i < sum.size(); ++i)
    REQUIRE(seen_sum[i] == static_cast<float>(n * (n - 1) / 2 + n * static_cast<int>(i)));
}

// Staged operations share one host staging region per communicator, reserved
// on the submitting thread (Backend::AllocatePinnedHost: page-locked on a
// GPU) and grown to a power of two: it is allocated once for many operations,
// grows when one needs more, and is released with the communicator.
TEST_CASE("staged ops reuse one host staging region, grown at submit and freed with the communicator") {
  MemoryTracker& memory = Cpu().memory();
  const MemoryStats before = memory.Stats(MemoryCategory::kCommunication);
  constexpr int64_t kMiB = int64_t{1} << 20;
  {
    auto world = World(/*stage_through_host=*/true);
    auto compute = Worker();
    const int n = world->size();
    // 40 AllReduces of 1 to 40 KiB (send and recv one range: in place) and
    // AllGathers: every one fits the first 1 MiB region.
    std::vector<float> buf(10240), gathered(10240 * n);
    for (int i = 1; i <= 40; ++i) {
      const size_t count = static_cast<size_t>(256 * i);
      for (size_t k = 0; k < count; ++k) buf[k] = 1.0f;
      Ok(world->AllReduce(buf.data(), buf.data(), count, DType::kF32, ReduceOp::kSum, *compute));
      Ok(world->AllGather(buf.data(), gathered.data(), count, DType::kF32, *compute));
      Ok(compute->Synchronize());  // before the host writes buf again
      REQUIRE(buf[count - 1] == static_cast<float>(n));
      REQUIRE(gathered[count * n - 1] == static_cast<float>(n));
    }
    MemoryStats now = memory.Stats(MemoryCategory::kCommunication);
    CHECK(now.num_allocations - before.num_allocations == 1);
    CHECK(now.live_bytes - before.live_bytes == kMiB);
    // 3 MiB in place: the region grows to 4 MiB; the 1 MiB one is kept (an
    // operation queued before the growth may still use it).
    std::vector<float> big(3 * kMiB / 4, 2.0f);
    Ok(world->AllReduce(big.data(), big.data(), big.size(), DType::kF32, ReduceOp::kSum, *compute));
    Ok(compute->Synchronize());
    CHECK(big[12345] == static_cast<float>(2 * n));
    now = memory.Stats(MemoryCategory::kCommunication);
    CHECK(now.num_allocations - before.num_allocations == 2);
    CHECK(now.live_bytes - before.live_bytes == 5 * kMiB);
    // Smaller again: no new region.
    Ok(world->AllReduce(buf.data(), buf.data(), 16, DType::kF32, ReduceOp::kSum, *compute));
    Ok(compute->Synchronize());
    CHECK(memory.Stats(MemoryCategory::kCommunication).num_allocations - before.num_allocations == 2);
  }
  CHECK(memory.Stats(MemoryCategory::kCommunication).live_bytes == before.live_bytes);
}

TEST_CASE("a stream-ordered op fails when its stream's producer failed; the error reaches the stream") {
  auto world = World();
  auto compute = Worker();
  std::vector<float> buf(4, 1.0f);
  // Every rank fails the same way, so no rank is left waiting in the collective.
  Ok(compute->LaunchHostFunc([] { return absl::InternalError("producer kernel failed"); }));
  Ok(world->AllReduce(buf.data(), buf.data(), buf.size(), DType::kF32, ReduceOp::kSum, *compute));
  absl::Status s = compute->Synchronize();
  CHECK(!s.ok());
  CHECK(s.ToString().find("producer kernel failed") != std::string::npos);
}

TEST_CASE("1000 ops over two streams and two communicators complete in order") {
  auto world = World();
  auto dup_or = world->Split(0, world->rank(), "dup");
  Ok(dup_or.status());
  std::unique_ptr<Communicator> dup = std::move(dup_or).value();
  Communicator* comms[2] = {world.get(), dup.get()};
  std::unique_ptr<Stream> streams[2] = {Worker(), Worker()};
  const int n = world->size(), me = world->rank();
  constexpr int kOps = 1000;
  std::vector<float> value(kOps, 0.0f);
  std::vector<int> order[2];
  std::vector<std::unique_ptr<Event>> done(kOps);
  bool ok_values = true;
  for (int i = 0; i < kOps; ++i) {
    const int s = i % 2, c = (i / 2) % 2;
    Stream& stream = *streams[s];
    // Every 10th op of stream 1 takes its input from stream 0's latest result:
    // the cross-stream order is only the event.
    if (s == 1 && i % 10 == 1 && done[i - 1] != nullptr) Ok(stream.Wait(*done[i - 1]));
    const int from = (s == 1 && i % 10 == 1) ? i - 1 : -1;
    Ok(stream.LaunchHostFunc([&, i, from] {
      const float base = from >= 0 ? value[from] : 0.0f;
      value[i] = base + static_cast<float>(me + i % 7);
      return absl::OkStatus();
    }));
    Ok(comms[c]->AllReduce(&value[i], &value[i], 1, DType::kF32, ReduceOp::kSum, stream));
    Ok(stream.LaunchHostFunc([&, i, s, from] {
      // Runs after the all-reduce: the reduced value must be here already.
      const float base = from >= 0 ? value[from] : 0.0f;
      const float want = n * base + static_cast<float>(n * (n - 1) / 2 + n * (i % 7));
      if (value[i] != want) ok_values = false;
      order[s].push_back(i);
      return absl::OkStatus();
    }));
    done[i] = NewEvent();
    Ok(stream.Record(*done[i]));
  }
  Ok(streams[0]->Synchronize());
  Ok(streams[1]->Synchronize());
  CHECK(ok_values);
  for (int s = 0; s < 2; ++s) {
    REQUIRE(order[s].size() == kOps / 2);
    for (size_t k = 0; k < order[s].size(); ++k) REQUIRE(order[s][k] == static_cast<int>(2 * k) + s);
  }
  // Events of one stream completed in record order.
  for (int i = 2; i < kOps; ++i) {
    REQUIRE(done[i]->Query());
    auto ms = done[i]->ElapsedMsSince(*done[i - 2]);
    Ok(ms.status());
    REQUIRE(*ms >= 0.0);
  }
}

// The direct path (mpi_communicator.h): small operations on an idle
// communicator start on the caller's thread. Order must hold across it:
// every operation below reads what the one before it wrote, so running any of
// them early gives wrong values. Rank 0 arrives late at some of them, so the
// direct ones are still in flight when the next is enqueued.
TEST_CASE("small operations started on the caller's thread keep the communicator's and the stream's order") {
  auto world = World();
  auto worker = Worker();
  Stream& inline_stream = Cpu().default_stream();
  const int n = world->size(), me = world->rank();
  const auto late = [&] {
    if (me == 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  };
  constexpr size_t kSmall = 256;        // 1 KiB of floats: direct when idle
  constexpr size_t kLarge = 64 * 1024;  // 256 KiB: always the progress thread
  std::vector<float> a(kSmall, 0.0f), b(kSmall), c(kSmall), d(kSmall * n), e(kLarge), f(kSmall);
  const uint64_t direct_before = MpiDirectOpCount();

  // 1. Stream-ordered on a worker stream behind a slow producer (queued, marker).
  Ok(worker->LaunchHostFunc([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    for (size_t i = 0; i < kSmall; ++i) a[i] = static_cast<float>(me + i % 5);
    return absl::OkStatus();
  }));
  Ok(world->AllReduce(a.data(), a.data(), kSmall, DType::kF32, ReduceOp::kSum, *worker));
  // 2. Host form while 1 waits: small but the communicator is busy, so it
  // queues, and reads a after 1 reduced it.
  auto w2 = world->AllReduce(a.data(), b.data(), kSmall, DType::kF32, ReduceOp::kSum);
  Ok(w2.status());
  CHECK(MpiDirectOpCount() == direct_before);
  // 3. Inline stream: direct once 2 is done (the inline stream waits for it).
  Ok(w2->Wait());
  late();
  Ok(world->AllReduce(b.data(), c.data(), kSmall, DType::kF32, ReduceOp::kAvg, inline_stream));
  CHECK(MpiDirectOpCount() == direct_before + 1);
  for (size_t i = 0; i < kSmall; ++i) {
    const float reduced = static_cast<float>(n * (n - 1) / 2 + n * static_cast<int>(i % 5));
    REQUIRE(b[i] == n * reduced);
    REQUIRE(c[i] == n * reduced);  // the average of n equal values
  }
  // 4. Host form, direct, not waited on; 5. a large one queued behind it
  // reads its output (the progress thread finishes 4 first); 6. a worker
  // stream op behind 5 reads 5's output through the stream's order.
  late();
  std::vector<size_t> counts(n, kSmall), displs(n);
  for (int r = 0; r < n; ++r) displs[r] = r * kSmall;
  std::vector<float> d_send(kSmall * n);
  for (int r = 0; r < n; ++r) {
    for (size_t i = 0; i < kSmall; ++i) d_send[r * kSmall + i] = c[i] + static_cast<float>(100 * me + r);
  }
  auto w4 = world->AllToAllV(d_send.data(), counts, displs, d.data(), counts, displs, DType::kF32);
  Ok(w4.status());
  CHECK(MpiDirectOpCount() == direct_before + 2);
  for (size_t i = 0; i < kLarge; ++i) e[i] = 0.0f;
  // e[i] = sum over ranks of d[(i % n) * kSmall + i % kSmall]: valid only after 4.
  auto fill_e = [&] {
    for (size_t i = 0; i < kLarge; ++i) e[i] = d[(i % n) * kSmall + i % kSmall];
    return absl::OkStatus();
  };
  // The producer of 5 runs on the worker stream after 4's Work completed (a
  // host wait for 4 would hide the ordering under test, so the worker waits).
  std::shared_ptr<WorkState> w4_state = w4->shared_state();
  Ok(worker->LaunchHostFunc([w4_state] { return w4_state->Wait(); }));
  Ok(worker->LaunchHostFunc(fill_e));
  Ok(world->AllReduce(e.data(), e.data(), kLarge, DType::kF32, ReduceOp::kSum, *worker));
  Ok(world->AllReduce(e.data(), f.data(), kSmall, DType::kF32, ReduceOp::kMax, *worker));
  Ok(worker->Synchronize());
  CHECK(w4->Test());
  Ok(w4->Wait());
  for (int r = 0; r < n; ++r) {
    for (size_t i = 0; i < kSmall; ++i) REQUIRE(d[r * kSmall + i] == c[i] + static_cast<float>(100 * r + me));
  }
  for (size_t i = 0; i < kLarge; ++i) {
    // d on rank q at block (i % n) came from rank i % n with 100 * (i % n) + q.
    float want = 0.0f;
    for (int q = 0; q < n; ++q) want += c[i % kSmall] + static_cast<float>(100 * static_cast<int>(i % n) + q);
    REQUIRE(e[i] == want);
    if (i < kSmall) REQUIRE(f[i] == want);
  }
  // 7. A direct op completed by Test() alone, then an in-place ReduceScatter
  // (direct; its result moves into its block when it finishes).
  late();
  std::vector<float> g(kSmall, static_cast<float>(me + 1));
  auto w7 = world->AllReduce(g.data(), g.data(), kSmall, DType::kF32, ReduceOp::kSum);
  Ok(w7.status());
  while (!w7->Test()) std::this_thread::yield();
  Ok(w7->Wait());
  const float total = static_cast<float>(n * (n + 1) / 2);
  for (size_t i = 0; i < kSmall; ++i) REQUIRE(g[i] == total);
  std::vector<float> h(static_cast<size_t>(n) * 8);
  for (size_t i = 0; i < h.size(); ++i) h[i] = static_cast<float>(i + me);
  auto w8 = world->ReduceScatter(h.data(), h.data() + me * 8, 8, DType::kF32, ReduceOp::kSum);
  Ok(w8.status());
  Ok(w8->Wait());
  for (size_t i = 0; i < 8; ++i) {
    REQUIRE(h[me * 8 + i] == static_cast<float>(n * (me * 8 + i) + n * (n - 1) / 2));
  }
  CHECK(MpiDirectOpCount() == direct_before + 4);  // 3, 4, 7 and 8
  // 9. A direct op still in flight (rank 0 is late) when its communicator is
  // destroyed, its Work never waited on: the destructor finishes it.
  auto dup_or = world->Split(0, me, "dup");
  Ok(dup_or.status());
  std::unique_ptr<Communicator> dup = std::move(dup_or).value();
  late();
  std::vector<float> x(kSmall, 1.0f);
  auto w9 = dup->AllReduce(x.data(), x.data(), kSmall, DType::kF32, ReduceOp::kSum);
  Ok(w9.status());
  const Work kept = *w9;
  dup.reset();
  CHECK(kept.Test());
  Ok(kept.Wait());
  for (size_t i = 0; i < kSmall; ++i) REQUIRE(x[i] == static_cast<float>(n));
}

TEST_CASE("a bad stream-ordered call is refused at the call") {
  auto world = World();
  std::vector<float> buf(2, 0.0f);
  Ok(world->AllReduce(buf.data(), buf.data(), 2, DType::kF32, ReduceOp::kSum, Cpu().default_stream()));
  absl::Status bad =
      world->AllReduce(buf.data(), nullptr, 2, DType::kF32, ReduceOp::kSum, Cpu().default_stream());
  CHECK(!bad.ok());
}

}  // namespace
}  // namespace moe::comm
