// The NCCL communicator on real devices: collectives against the arithmetic
// computed on the host. Built only with CUDA; exits 77 (ctest: skipped) when
// this node has fewer CUDA devices than ranks on it.
#define CATCH_CONFIG_RUNNER
#include <cuda_runtime_api.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <numeric>
#include <vector>

#include "comm/communicator.h"
#include "comm/cuda/nccl_communicator.h"
#include "comm/instrumentation.h"
#include "comm/mpi_env.h"

namespace moe::comm {
namespace {

// A device copy of a host vector, freed at scope exit.
template <typename T>
struct DeviceVector {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceVector(const std::vector<T>& host) : n(host.size()) {
    REQUIRE(cudaMalloc(reinterpret_cast<void**>(&ptr), std::max<size_t>(n, 1) * sizeof(T)) == cudaSuccess);
    if (n) REQUIRE(cudaMemcpy(ptr, host.data(), n * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess);
  }
  ~DeviceVector() { cudaFree(ptr); }
  std::vector<T> Host() const {
    std::vector<T> out(n);
    if (n) REQUIRE(cudaMemcpy(out.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess);
    return out;
  }
};

std::unique_ptr<Communicator> World(std::shared_ptr<CommSink> sink = nullptr) {
  CommOptions options;
  options.backend = "nccl";
  int devices = 1;
  REQUIRE(cudaGetDeviceCount(&devices) == cudaSuccess);
  // NCCL moves device buffers: this rank's GPU, as train.device = "cuda" picks it.
  options.device = Device::Cuda(MpiEnv::local_rank() % devices);
  options.timeout_s = 120;
  options.sink = std::move(sink);
  auto world = CreateWorldCommunicator(options);
  INFO(world.status().ToString());
  REQUIRE(world.ok());
  return std::move(world).value();
}

void Done(const absl::StatusOr<Work>& w) {
  INFO(w.status().ToString());
  REQUIRE(w.ok());
  absl::Status s = w->Wait();
  INFO(s.ToString());
  REQUIRE(s.ok());
}

TEST_CASE("NCCL AllReduce sum and avg, in and out of place") {
  auto world = World();
  const int n = world->size(), me = world->rank();
  REQUIRE(world->device().kind == DeviceKind::kCuda);
  std::vector<float> x(1000);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(me + i);
  DeviceVector<float> send(x), recv(std::vector<float>(x.size(), -1));
  Done(world->AllReduce(send.ptr, recv.ptr, x.size(), DType::kF32, ReduceOp::kSum));
  auto got = recv.Host();
  for (size_t i = 0; i < x.size(); ++i) REQUIRE(got[i] == n * (n - 1) / 2.0f + n * static_cast<float>(i));
  Done(world->AllReduce(send.ptr, send.ptr, x.size(), DType::kF32, ReduceOp::kAvg));
  got = send.Host();
  for (size_t i = 0; i < x.size(); ++i) REQUIRE(got[i] == Approx((n - 1) / 2.0 + i));
}

TEST_CASE("NCCL AllToAllV with uneven and zero counts, Broadcast, AllGather, ReduceScatter") {
  auto world = World();
  const int n = world->size(), me = world->rank();
  // Rank s sends (s + d) % 3 * 100 elements to rank d (some zero).
  auto count = [](int s, int d) { return static_cast<size_t>((s + d) % 3) * 100; };
  std::vector<size_t> sc(n), sd(n), rc(n), rd(n);
  size_t st = 0, rt = 0;
  for (int p = 0; p < n; ++p) {
    sc[p] = count(me, p), sd[p] = st, st += sc[p];
    rc[p] = count(p, me), rd[p] = rt, rt += rc[p];
  }
  std::vector<int64_t> send_host(st);
  for (int d = 0; d < n; ++d) {
    for (size_t i = 0; i < sc[d]; ++i) send_host[sd[d] + i] = me * 1000000 + d * 1000 + i;
  }
  DeviceVector<int64_t> send(send_host), recv(std::vector<int64_t>(rt, -1));
  Done(world->AllToAllV(send.ptr, sc, sd, recv.ptr, rc, rd, DType::kI64));
  auto got = recv.Host();
  for (int s = 0; s < n; ++s) {
    for (size_t i = 0; i < rc[s]; ++i) REQUIRE(got[rd[s] + i] == s * 1000000 + me * 1000 + i);
  }

  DeviceVector<int32_t> b(std::vector<int32_t>(64, me == 0 ? 42 : 0));
  Done(world->Broadcast(b.ptr, b.ptr, 64, DType::kI32, 0));
  REQUIRE(b.Host() == std::vector<int32_t>(64, 42));

  DeviceVector<int32_t> mine(std::vector<int32_t>(8, me)), all(std::vector<int32_t>(8 * n, -1));
  Done(world->AllGather(mine.ptr, all.ptr, 8, DType::kI32));
  auto gathered = all.Host();
  for (int r = 0; r < n; ++r) REQUIRE(gathered[r * 8] == r);

  std::vector<float> rs(4 * n, 1.0f);
  DeviceVector<float> rs_send(rs), rs_recv(std::vector<float>(4, 0));
  Done(world->ReduceScatter(rs_send.ptr, rs_recv.ptr, 4, DType::kF32, ReduceOp::kSum));
  REQUIRE(rs_recv.Host() == std::vector<float>(4, static_cast<float>(n)));
}

TEST_CASE("NCCL Split, grouped P2P with self, barrier, records") {
  auto sink = std::make_shared<TotalsSink>();
  auto world = World(sink);
  const int n = world->size(), me = world->rank();
  auto half = world->Split(me % 2, me, "half");
  REQUIRE(half.ok());
  REQUIRE(*half != nullptr);
  std::vector<int> want;
  for (int r = me % 2; r < n; r += 2) want.push_back(r);
  REQUIRE((*half)->group_ranks() == want);
  DeviceVector<float> out(std::vector<float>(16, static_cast<float>(me))), in(std::vector<float>(16, -1));
  const int peer = (me + 1) % n;  // self when n == 1
  const int from = (me - 1 + n) % n;
  std::vector<P2POp> ops = {P2POp::Send(out.ptr, 16, DType::kF32, peer),
                            P2POp::Recv(in.ptr, 16, DType::kF32, from)};
  Done(world->GroupP2P(ops));
  REQUIRE(in.Host() == std::vector<float>(16, static_cast<float>(from)));
  Done(world->Barrier());
  auto* ordering = dynamic_cast<CudaStreamOrdering*>(world.get());
  REQUIRE(ordering != nullptr);
  REQUIRE(ordering->MakeStreamWait(nullptr).ok());
  REQUIRE(sink->Snapshot()[OpKind::kGroupP2P].count == 1);
}

TEST_CASE("NCCL rejects host buffers") {
  auto world = World();
  std::vector<float> host(8);
  auto w = world->AllReduce(host.data(), host.data(), 8, DType::kF32, ReduceOp::kSum);
  REQUIRE_FALSE(w.ok());
  REQUIRE(std::string(w.status().message()).find("cpu memory") != std::string::npos);
}

}  // namespace
}  // namespace moe::comm

int main(int argc, char** argv) {
  absl::Status status = moe::comm::MpiEnv::Init(&argc, &argv);
  if (!status.ok()) {
    std::fprintf(stderr, "%s\n", std::string(status.message()).c_str());
    return 1;
  }
  int devices = 0;
  std::string why;
  if (cudaError_t e = cudaGetDeviceCount(&devices); e != cudaSuccess) {
    devices = 0;
    why = std::string(" (") + cudaGetErrorName(e) + ": " + cudaGetErrorString(e) + ")";
  }
  int32_t enough = devices >= moe::comm::MpiEnv::local_size() ? 1 : 0, all = 0;
  {
    moe::comm::CommOptions options;
    options.backend = "mpi";
    auto host = moe::comm::CreateWorldCommunicator(options);
    auto w = host.ok() ? (*host)->AllReduce(&enough, &all, 1, moe::DType::kI32, moe::comm::ReduceOp::kMin)
                       : absl::StatusOr<moe::comm::Work>(host.status());
    if (!w.ok() || !w->Wait().ok()) moe::comm::MpiEnv::Abort(1);
  }
  if (!all) {
    if (moe::comm::MpiEnv::world_rank() == 0) {
      std::fprintf(stderr, "skipped: %d CUDA devices for %d ranks on this node%s\n", devices,
                   moe::comm::MpiEnv::local_size(), why.c_str());
    }
    moe::comm::MpiEnv::Finalize();
    return 77;
  }
  Catch::Session session;
  int code = session.applyCommandLine(argc, argv);
  if (code != 0) return code;
  int failed = session.run();
  if (failed != 0) moe::comm::MpiEnv::Abort(1);
  moe::comm::MpiEnv::Finalize();
  return 0;
}
