// The device work of a CUDA training step, counted by the emulated CUDA
// runtime's census (tests/core/cuda_emulation.h WorkCensus: every kernel
// launch by name, cuBLAS call, copy, fill and host function, as enqueued).
// A GPU pays a fixed cost for each (microseconds of launch, whatever the
// size), so the count is a cost of its own, measurable without a GPU:
//   - a step's work is the same every step, and does not grow with the
//     tokens (a micro-batch twice the size launches the same work);
//   - it grows by the same work for every layer added (nothing per layer
//     pair, nothing quadratic), and a layer's work stays within the
//     documented figure (docs/design.md, "Device work per step"); the
//     GEMMs, whose count depends on the routing (an expert without tokens
//     makes none), within their bounds;
//   - the optimizer side (zeroing the gradients, the clipping norm, the
//     AdamW update) is a few list launches (ops.h list forms, at most
//     kMaxListTensors tensors each), never a launch per parameter.
// The demo model on one rank (configs/demo.textproto, expert parallelism
// 1), trained on the emulated CUDA backend over the MPI communicator.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "comm/mpi_env.h"
#include "model/common.h"
#include "model/moe_layer.h"
#include "runtime/core/backend.h"
#include "runtime/core/config.h"
#include "runtime/core/cuda/cuda_kernels.h"
#include "runtime/trainer.h"
#include "tests/core/cuda_emulation.h"
#include "tests/runtime/trainer_test_util.h"

namespace moe {
namespace {

using Census = std::map<std::string, uint64_t>;

// A layer's device work apart from its GEMMs, at the demo's shape (8
// experts, top-2, fp32): docs/design.md "Device work per step" says what it
// is made of. A change that adds work to every layer must update both.
constexpr uint64_t kWorkPerLayer = 38;
// The same in bf16: one more, the cast of the router's f32 logit gradient to
// bf16 for its two GEMMs. Attention reads and writes bf16 itself (the fused
// kernels), so nothing is staged through f32 around it.
constexpr uint64_t kWorkPerLayerBf16 = 39;
constexpr uint64_t kCastsPerLayerBf16 = 1;

Census Minus(const Census& a, const Census& b) {
  Census d;
  for (const auto& [name, n] : a) {
    const auto it = b.find(name);
    const uint64_t m = it == b.end() ? 0 : it->second;
    REQUIRE(n >= m);
    if (n > m) d[name] = n - m;
  }
  return d;
}

uint64_t Total(const Census& c) {
  uint64_t t = 0;
  for (const auto& [name, n] : c) t += n;
  return t;
}

uint64_t Count(const Census& c, const std::string& name) {
  const auto it = c.find(name);
  return it == c.end() ? 0 : it->second;
}

// Work counted apart from the rest: the optimizer side's list launches
// (their number steps with the parameter count in units of
// kMaxListTensors), and the GEMMs, whose number depends on the routing (the
// default per-expert path skips an expert without tokens).
bool CountedApart(const std::string& name) {
  return name == "FillListKernel" || name == "AdamWListKernel" || name == "SumSquaresListKernel" ||
         name == "SumListFinishKernel" || name == "cublasGemmEx";
}
Census Rest(Census c) {
  for (auto it = c.begin(); it != c.end();) it = CountedApart(it->first) ? c.erase(it) : std::next(it);
  return c;
}

struct Measured {
  Census step2, step3;  // the census of steps 2 and 3
  int64_t params = 0, layers = 0;
};

// Trains `layers` layers at `micro_batch` for three steps on cuda.
Measured Train(int layers, int micro_batch, const std::string& precision = "fp32") {
  const std::string dir =
      (std::filesystem::temp_directory_path() / ("moe_device_work_test_" + std::to_string(::getpid())))
          .string();
  std::filesystem::remove_all(dir);
  JobConfig config = testing::DemoStepConfig(dir);
  config.mutable_train()->set_device("cuda");
  config.mutable_comm()->set_backend("mpi");
  config.mutable_model()->set_num_layers(layers);
  config.mutable_train()->set_micro_batch(micro_batch);
  config.mutable_parallel()->set_expert(1);
  config.mutable_train()->set_precision(precision);
  ApplyDefaults(1, &config);
  comm::CommOptions options;
  options.timeout_s = 120;
  options.backend = "mpi";
  options.device = Device::Cuda(0);
  auto groups = parallel::CreateProcessGroups(comm::CreateWorldCommunicator(options).value(), 1, 1).value();
  auto trainer = Trainer::Create(config, &groups).value();
  Measured m;
  m.params = static_cast<int64_t>(trainer->parameters().size());
  m.layers = layers;
  for (int step = 1; step <= 3; ++step) {
    const Census before = cuda_emulation::WorkCensusSnapshot();
    REQUIRE(trainer->TrainStep().ok());
    const Census work = Minus(cuda_emulation::WorkCensusSnapshot(), before);
    if (step == 2) m.step2 = work;
    if (step == 3) m.step3 = work;
  }
  std::filesystem::remove_all(dir);
  return m;
}

// What differs between two censuses, for a failure's message.
std::string Diff(const Census& a, const Census& b) {
  std::string out;
  std::map<std::string, std::pair<uint64_t, uint64_t>> both;
  for (const auto& [name, n] : a) both[name].first = n;
  for (const auto& [name, n] : b) both[name].second = n;
  for (const auto& [name, ab] : both)
    if (ab.first != ab.second)
      out += name + ": " + std::to_string(ab.first) + " vs " + std::to_string(ab.second) + "; ";
  return out;
}

void Print(const std::string& title, const Census& c) {
  std::printf("%s: %llu\n", title.c_str(), static_cast<unsigned long long>(Total(c)));
  for (const auto& [name, n] : c)
    std::printf("  %6llu  %s\n", static_cast<unsigned long long>(n), name.c_str());
}

int64_t Launches(int64_t tensors) { return (tensors + cuda::kMaxListTensors - 1) / cuda::kMaxListTensors; }

TEST_CASE("a CUDA training step's device work: steady, independent of the tokens, linear in the layers") {
  REQUIRE(comm::MpiEnv::world_size() == 1);
  const Measured l2 = Train(2, 4), l3 = Train(3, 4), l4 = Train(4, 4), l4_small = Train(4, 2);
  Print("device work of a step, 4 layers", l4.step3);
  const Census per_layer = Rest(Minus(l3.step3, l2.step3));
  Print("device work per layer, GEMMs apart", per_layer);

  // The same every step.
  INFO("steps 2 and 3 at 4 layers: " << Diff(Rest(l4.step2), Rest(l4.step3)));
  CHECK(Rest(l4.step2) == Rest(l4.step3));
  CHECK(Rest(l2.step2) == Rest(l2.step3));
  // Half the tokens, the same work.
  INFO("half the tokens: " << Diff(Rest(l4_small.step3), Rest(l4.step3)));
  CHECK(Rest(l4_small.step3) == Rest(l4.step3));
  // Every layer adds the same work, within the documented figure.
  INFO("layer 4 vs layer 3: " << Diff(Rest(Minus(l4.step3, l3.step3)), per_layer));
  CHECK(Rest(Minus(l4.step3, l3.step3)) == per_layer);
  CHECK(Total(per_layer) <= kWorkPerLayer);
  // The layer's scatter-adds take their order from the host (no device sort)
  // and overwrite their fresh outputs (no fill).
  CHECK(Count(per_layer, "cub::DeviceRadixSort::SortPairs") == 0);
  CHECK(Count(per_layer, "ScatterKeysKernel") == 0);
  CHECK(Count(per_layer, "FillKernel") == 0);

  // The GEMMs: per layer the attention's 12 (Q, K, V and output projections,
  // forward and both gradients) and the router's 3, and 9 for each expert
  // with tokens (its three projections and their two gradients); the LM
  // head's 3.
  const int64_t experts = 8;
  for (const Measured* m : {&l2, &l3, &l4, &l4_small}) {
    for (const Census* c : {&m->step2, &m->step3}) {
      const uint64_t gemms = Count(*c, "cublasGemmEx");
      INFO(m->layers << " layers: " << gemms << " GEMMs");
      CHECK(gemms <= static_cast<uint64_t>(m->layers * (15 + 9 * experts) + 3));
      CHECK(gemms >= static_cast<uint64_t>(m->layers * (15 + 9) + 3));
    }
  }

  // The optimizer side: list launches, kMaxListTensors parameters each.
  for (const Measured* m : {&l2, &l3, &l4}) {
    INFO(m->params << " parameters");
    CHECK(Count(m->step3, "AdamWKernel") == 0);
    CHECK(Count(m->step3, "AdamWListKernel") == static_cast<uint64_t>(Launches(m->params)));
    // Model::ZeroGrads; one rank: every gradient counts in the clipping norm.
    CHECK(Count(m->step3, "FillListKernel") == static_cast<uint64_t>(Launches(m->params)));
    CHECK(Count(m->step3, "SumSquaresListKernel") == static_cast<uint64_t>(Launches(m->params)));
    CHECK(Count(m->step3, "SumListFinishKernel") == static_cast<uint64_t>(Launches(m->params)));
  }
}

TEST_CASE("in bf16, a layer's device work is fp32's plus one cast: no staging around attention") {
  REQUIRE(comm::MpiEnv::world_size() == 1);
  const Measured l2 = Train(2, 4, "bf16"), l3 = Train(3, 4, "bf16");
  const Census per_layer = Rest(Minus(l3.step3, l2.step3));
  Print("bf16 device work per layer, GEMMs apart", per_layer);
  INFO("steps 2 and 3 at 3 layers: " << Diff(Rest(l3.step2), Rest(l3.step3)));
  CHECK(Rest(l3.step2) == Rest(l3.step3));
  CHECK(Total(per_layer) <= kWorkPerLayerBf16);
  CHECK(Count(per_layer, "CastKernel") == kCastsPerLayerBf16);
  // Attention ran on its bf16 kernels.
  CHECK(Count(per_layer, "ForwardKernel<1>") == 1);
  CHECK(Count(per_layer, "DqKernel<1>") == 1);
  CHECK(Count(per_layer, "DkvKernel<1>") == 1);
}

// A MoE layer's forward waits on the host once, for the routing read; the
// shared expert needs no routing, so it is on the device before that wait
// (on a GPU it computes while the host routes). Its backward waits for
// nothing, gate included.
TEST_CASE("a MoE layer's shared expert is on the device before the host waits to route") {
  Backend* cuda = GetBackend(Device::Cuda(0)).value();
  std::unique_ptr<Stream> stream = cuda->CreateStream(StreamMode::kWorker).value();
  Stream& s = *stream;
  for (const bool gated : {false, true}) {
    DYNAMIC_SECTION((gated ? "gated" : "ungated") << " shared expert, expert bias") {
      auto job = ParseConfigText(
          std::string(
              "model { hidden_size: 32 num_layers: 1 num_heads: 2 num_kv_heads: 2 moe { num_experts: 4 "
              "top_k: 2 expert_ffn_hidden_size: 16 expert_bias_update_rate: 0.01 "
              "shared_expert_ffn_hidden_size: 24 shared_expert_gate: ") +
              (gated ? "true" : "false") + " } }",
          "test");
      REQUIRE(job.ok());
      ApplyDefaults(1, &*job);
      model::MoELayer layer;
      REQUIRE(layer.Init(s, "model.layers.0.mlp.", job->model(), 0.5f, 0.5f, {}, 3).ok());
      const int64_t T = 24;
      std::vector<float> xv(T * 32);
      for (size_t i = 0; i < xv.size(); ++i) xv[i] = std::sin(0.37f * static_cast<float>(i));
      const Tensor x = model::FromHostFloats(s, xv, Shape{T, 32}).value();
      REQUIRE(s.Synchronize().ok());

      // The GEMMs of the shared expert's forward alone.
      Census before = cuda_emulation::WorkCensusSnapshot();
      REQUIRE(layer.shared_expert()->Forward(s, x).ok());
      REQUIRE(s.Synchronize().ok());
      const uint64_t shared_gemms =
          Count(Minus(cuda_emulation::WorkCensusSnapshot(), before), "cublasGemmEx");
      REQUIRE(shared_gemms >= 3);

      before = cuda_emulation::WorkCensusSnapshot();
      cuda_emulation::RecordHostWaits(true);
      uint64_t waits = HostSyncCount();
      auto y = layer.Forward(s, x);
      const auto forward_waits = cuda_emulation::RecordedHostWaits();
      cuda_emulation::RecordHostWaits(false);
      REQUIRE(y.ok());
      // One wait: the router's choice (experts, their scores; chosen on the
      // device with the expert bias), its loss sums and the gate's logits in one read.
      CHECK(HostSyncCount() - waits == 1);
      REQUIRE(forward_waits.size() == 1);
      // Given to the device before it: the router's GEMM, the gate's and the shared expert's.
      const Census at_wait = Minus(forward_waits[0], before);
      CHECK(Count(at_wait, "cublasGemmEx") == 1 + (gated ? 1 : 0) + shared_gemms);
      CHECK(Count(at_wait, "RouterScoresKernel") == 1);
      CHECK(Count(at_wait, "cudaMemcpyAsync DtoH") == 3 + (gated ? 1 : 0));

      std::vector<float> dyv(T * 32);
      for (size_t i = 0; i < dyv.size(); ++i) dyv[i] = std::cos(0.11f * static_cast<float>(i));
      const Tensor dy = model::FromHostFloats(s, dyv, Shape{T, 32}).value();
      waits = HostSyncCount();
      REQUIRE(layer.Backward(s, dy, 1.0f, 1.0f, 0.0f).ok());
      CHECK(HostSyncCount() - waits == 0);
      REQUIRE(s.Synchronize().ok());
    }
  }
}

}  // namespace
}  // namespace moe
