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
#include "comm/mpi_env.h"
#include "runtime/core/backend.h"

namespace moe::comm {
namespace {

using Clock = std::chrono::steady_clock;

std::unique_ptr<Communicator> World() {
  CommOptions options;
  options.backend = "mpi";
  options.timeout_s = 60;
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
