// Expert tensor parallelism (parallel.expert_tensor_parallel) at mpirun -np 2,
// TP 2: each TP rank holds half of every expert's ffn dimension.
//
//   - finite differences of a MoE layer with expert TP (dropless routing, aux,
//     z and expert-router coupling losses): an expert weight element is
//     perturbed on the one TP rank that holds it, a router weight or an input
//     element on both (they are replicated); the loss, the same on both ranks
//     after the TP all-reduce of the experts' output, must move as the
//     analytic gradient of the rank that holds the element says;
//   - the layer's output and gradients equal those of the experts replicated
//     over TP (1e-5), the gathered slices equal the replicated grads;
//   - the parameter bytes: the experts' local bytes, counted and measured by
//     the memory tracker, are half of the replicated ones;
//   - GradSync reduces the slices' grads over EDP, not over TP;
//   - parallel.expert_tensor_parallel validation (tensor = 1, ffn not divisible).
// (Layout invariance of whole-model training with expert TP, LLEP and capacity
// is tests/parallel/layout_invariance_test.cc; resume across expert TP on/off
// is tests/runtime/resume_test.cc.)
#include <catch2/catch.hpp>
#include <cmath>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "comm/mpi_env.h"
#include "model/alltoall_dispatcher.h"
#include "model/moe_layer.h"
#include "parallel/grad_sync.h"
#include "runtime/core/config.h"
#include "runtime/core/memory.h"
#include "runtime/core/status.h"
#include "runtime/job_config.h"
#include "tests/compare.h"
#include "tests/model/model_test_util.h"
#include "tests/parallel/parallel_test_util.h"

namespace moe::model {
namespace {

using parallel::ProcessGroups;
using parallel::testing::ValueOrDie;

constexpr int64_t kTokens = 24, kHidden = 16, kFfn = 8, kExperts = 4;

config::ModelConfig MoeConfig() {
  return testing::TinyConfig(
      "hidden_size: 16 num_heads: 4 num_kv_heads: 2 moe { num_experts: 4 top_k: 2 "
      "expert_ffn_hidden_size: 8 capacity_factor: 0 aux_loss_coeff: 0.01 z_loss_coeff: 0.001 "
      "erc_loss_coeff: 0.5 erc_alpha: 0.8 }");
}

struct Layer {
  MoELayer moe;
  Tensor x, r;  // input [T, d] and the loss weights [T, d]: L = sum(y * r) + aux + z + erc
};

// expert_tp false: the single-rank layer (the reference; its parameters are
// those of experts replicated over TP).
ShardPlan Plan(ProcessGroups& groups, bool expert_tp) {
  ShardPlan plan;
  if (!expert_tp) return plan;
  plan.tp_size = groups.layout.tp;
  plan.tp_rank = groups.layout.tp_rank;
  plan.tp_group = groups.tp.get();
  plan.expert_tp = expert_tp;
  return plan;
}

void InitLayer(ProcessGroups& groups, bool expert_tp, Layer* layer) {
  Stream& s = testing::CpuStream();
  MOE_REQUIRE_OK(
      layer->moe.Init(s, "model.layers.0.mlp.", MoeConfig(), 0.3f, 0.2f, Plan(groups, expert_tp), 5));
  std::mt19937 rng(11);  // the same on both TP ranks: the TP group shares its tokens
  layer->x = testing::RandomTensor(Shape{kTokens, kHidden}, rng);
  layer->r = testing::RandomTensor(Shape{kTokens, kHidden}, rng);
}

double Loss(Layer& layer) {
  Stream& s = testing::CpuStream();
  layer.moe.set_step(1);
  Tensor y = ValueOrDie(layer.moe.Forward(s, layer.x, 0));
  return testing::Dot(y, testing::ToVec(layer.r)) + layer.moe.aux_loss() + layer.moe.z_loss() +
         layer.moe.erc_loss();
}

// Forward + backward once; returns dx.
std::vector<float> Gradients(Layer& layer) {
  Loss(layer);
  Tensor dx = ValueOrDie(layer.moe.Backward(testing::CpuStream(), layer.r, 1.0f, 1.0f, 1.0f));
  return testing::ToVec(dx);
}

std::string RoutingKey(Layer& layer) {
  const RoutingPlan& p = layer.moe.routing();
  std::ostringstream key;
  for (size_t a = 0; a < p.experts.size(); ++a) key << p.experts[a] << (p.kept[a] ? "k" : "d");
  return key.str();
}

TEST_CASE("MoE layer with expert TP: finite differences, replicated equality, parameter bytes") {
  REQUIRE(comm::MpiEnv::world_size() == 2);
  ProcessGroups groups = parallel::testing::Groups(2, 1);
  const int tp_rank = groups.layout.tp_rank;
  Stream& s = testing::CpuStream();
  MemoryTracker& mem = s.backend().memory();
  const int64_t params_before = mem.Stats(MemoryCategory::kParameters).live_bytes;
  Layer rep;
  InitLayer(groups, /*expert_tp=*/false, &rep);
  const int64_t rep_bytes = mem.Stats(MemoryCategory::kParameters).live_bytes - params_before;
  Layer etp;
  InitLayer(groups, /*expert_tp=*/true, &etp);
  const int64_t etp_bytes = mem.Stats(MemoryCategory::kParameters).live_bytes - params_before - rep_bytes;
  REQUIRE(etp.moe.expert_tp_group() == groups.tp.get());
  REQUIRE(rep.moe.expert_tp_group() == nullptr);

  // Parameter bytes: each expert tensor holds half its ffn here; router and
  // the rest unchanged.
  const int64_t expert_elems = 3 * kExperts * kFfn * kHidden;
  Experts& e = etp.moe.experts();
  CHECK(e.local_ffn() == kFfn / 2);
  CHECK(e.gate_proj().value.shape() == Shape{kExperts, kFfn / 2, kHidden});
  CHECK(e.down_proj().value.shape() == Shape{kExperts, kHidden, kFfn / 2});
  CHECK(e.gate_proj().shard.tp_dim == 1);
  CHECK(e.down_proj().shard.tp_dim == 2);
  CHECK(e.gate_proj().shard.tp_begin == tp_rank * kFfn / 2);
  CHECK(rep_bytes - etp_bytes == 4 * expert_elems / 2);
  INFO("expert parameter bytes per rank: replicated " << 4 * expert_elems << ", expert TP "
                                                      << 4 * expert_elems / 2);

  // Gradient sync: the slices' grads are summed over EDP only (here one rank:
  // nothing), never over the TP group that holds the other slices.
  {
    parallel::ParameterList list;
    MOE_REQUIRE_OK(etp.moe.CollectParameters(&list));
    auto sync = ValueOrDie(parallel::GradSync::Create(groups, list, s, {}));
    for (auto get : {&Experts::gate_proj, &Experts::up_proj, &Experts::down_proj}) {
      const comm::Communicator& g = sync->GroupOf((etp.moe.experts().*get)());
      CHECK(&g == groups.edp.get());
      CHECK(g.size() == 1);
    }
    CHECK(&sync->GroupOf(etp.moe.router().weight()) == groups.dp.get());
  }

  // The same layer as on one rank: loss, dx, and the gradients (the slices
  // of the single-rank ones).
  const double loss_rep = Loss(rep), loss_etp = Loss(etp);
  CHECK(moe::testing::ScalarClose(loss_etp, loss_rep, 1e-5, 0));
  CHECK(etp.moe.erc_loss() > 0);
  const std::vector<float> dx_rep = Gradients(rep), dx_etp = Gradients(etp);
  {
    const auto c = moe::testing::Compare(dx_etp, dx_rep, {.atol = 1e-5}, "dx");
    INFO(c.message);
    CHECK(c.ok);
  }
  for (auto get : {&Experts::gate_proj, &Experts::up_proj, &Experts::down_proj}) {
    const parallel::Parameter& sliced = (etp.moe.experts().*get)();
    const std::vector<float> full = testing::ToVec((rep.moe.experts().*get)().grad);
    std::vector<float> want(sliced.grad.numel());
    parallel::ForEachLocalRun(sliced.global_shape, sliced.shard, [&](int64_t g, int64_t lo, int64_t n) {
      for (int64_t j = 0; j < n; ++j) want[lo + j] = full[g + j];
    });
    const auto c = moe::testing::Compare(testing::ToVec(sliced.grad), want, {.atol = 1e-5}, sliced.name);
    INFO(c.message);
    CHECK(c.ok);
  }
  {
    const auto c =
        moe::testing::Compare(testing::ToVec(etp.moe.router().weight().grad),
                              testing::ToVec(rep.moe.router().weight().grad), {.atol = 1e-5}, "router");
    INFO(c.message);
    CHECK(c.ok);
  }

  // Finite differences. owner -1: perturbed on both ranks (replicated values).
  struct Probe {
    std::string name;
    Tensor value;
    std::vector<float> grad;
    int owner;
  };
  std::vector<Probe> probes;
  for (auto get : {&Experts::gate_proj, &Experts::up_proj, &Experts::down_proj}) {
    parallel::Parameter& p = (etp.moe.experts().*get)();
    for (int owner : {0, 1}) probes.push_back({p.name, p.value, testing::ToVec(p.grad), owner});
  }
  probes.push_back(
      {"router", etp.moe.router().weight().value, testing::ToVec(etp.moe.router().weight().grad), -1});
  probes.push_back({"x", etp.x, dx_etp, -1});
  std::mt19937 pick(3);
  int checked = 0, skipped = 0, bad = 0;
  std::ostringstream report;
  for (Probe& probe : probes) {
    for (int k = 0; k < 8; ++k) {
      const int64_t i = static_cast<int64_t>(pick() % static_cast<uint32_t>(probe.value.numel()));
      const bool mine = probe.owner < 0 || probe.owner == tp_rank;
      float* v = probe.value.data<float>();
      const float orig = v[i], h = 1e-2f;
      const std::string key = RoutingKey(etp);
      if (mine) v[i] = orig + h;
      const double lp = Loss(etp);
      const std::string kp = RoutingKey(etp);
      if (mine) v[i] = orig - h;
      const double lm = Loss(etp);
      const std::string km = RoutingKey(etp);
      if (mine) v[i] = orig;
      if (kp != key || km != key) {
        ++skipped;
        continue;
      }
      if (!mine) continue;
      const double fd = (lp - lm) / (2.0 * h), g = probe.grad[i];
      const double err = moe::testing::AbsDiff(fd, g);
      ++checked;
      if (!moe::testing::Within(err, 3e-2 * std::fabs(g) + 2e-3)) {
        ++bad;
        report << probe.name << "[" << i << "] (owner " << probe.owner << "): analytic " << g << " fd " << fd
               << "\n";
      }
    }
  }
  INFO("rank " << tp_rank << ": " << checked << " checked, " << skipped << " skipped, " << bad << " bad\n"
               << report.str());
  CHECK(bad == 0);
  CHECK(checked >= 30);
  CHECK(skipped <= checked / 4);
}

TEST_CASE("a MoE layer with expert TP refuses a dispatcher that splits tokens over TP") {
  ProcessGroups groups = parallel::testing::Groups(2, 1);
  MoELayer layer;
  const absl::Status st =
      layer.Init(testing::CpuStream(), "model.layers.0.mlp.", MoeConfig(), 0.3f, 0.2f, Plan(groups, true), 5,
                 std::make_unique<AllToAllTokenDispatcher>(groups.ep.get(), groups.tp.get(), kExperts, 1));
  INFO(st.ToString());
  CHECK(absl::IsInvalidArgument(st));
  CHECK(st.message().find("parallel.expert_tensor_parallel") != std::string::npos);
  MoELayer ok;
  MOE_REQUIRE_OK(ok.Init(
      testing::CpuStream(), "model.layers.0.mlp.", MoeConfig(), 0.3f, 0.2f, Plan(groups, true), 5,
      std::make_unique<AllToAllTokenDispatcher>(groups.ep.get(), TedGroup(Plan(groups, true)), kExperts, 1)));
}

TEST_CASE("parallel.expert_tensor_parallel is validated with the field named") {
  JobConfig c = ValueOrDie(
      ParseConfigText("model { hidden_size: 16 num_heads: 4 num_kv_heads: 2 ffn_hidden_size: 32 "
                      "moe { num_experts: 4 expert_ffn_hidden_size: 6 } } data { train_path: \"x\" } "
                      "parallel { tensor: 1 expert_tensor_parallel: true }",
                      "test"));
  ApplyDefaults(4, &c);
  std::string all;
  for (const std::string& p : ValidateJobConfig(c, 4)) all += p + "\n";
  INFO(all);
  CHECK(all.find("parallel.expert_tensor_parallel = true needs parallel.tensor > 1") != std::string::npos);
  c.mutable_parallel()->set_tensor(4);
  c.mutable_parallel()->set_data(0);
  ApplyDefaults(4, &c);
  all.clear();
  for (const std::string& p : ValidateJobConfig(c, 4)) all += p + "\n";
  INFO(all);
  CHECK(all.find("parallel.expert_tensor_parallel = true: parallel.tensor = 4 must divide "
                 "model.moe.expert_ffn_hidden_size = 6") != std::string::npos);
  c.mutable_model()->mutable_moe()->set_expert_ffn_hidden_size(8);
  all.clear();
  for (const std::string& p : ValidateJobConfig(c, 4)) all += p + "\n";
  CHECK(all.find("expert_tensor_parallel") == std::string::npos);
}

}  // namespace
}  // namespace moe::model
