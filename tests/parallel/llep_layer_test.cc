// LLEP on one MoE layer (issue 7), at 2 and 4 ranks:
//   - forced routing puts `fraction` of the assignments into the first
//     hot_experts experts and spreads the rest uniformly (with fewer hot experts
//     than top_k, a token repeats a hot expert so the fraction is still met);
//   - the weight moves and gradient returns pair up: every move of the plan is
//     one borrowed expert on its helper (held from forward to the end of
//     backward, then freed), max_borrowed_experts bounds what a rank holds,
//     ranks without moves post nothing and nothing hangs;
//   - the layer's output y, input gradient dx, routing-weight gradients and
//     expert weight gradients (owner's local part plus the returned helper
//     parts) equal standard EP's to 1e-5 relative.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <utility>
#include <vector>

#include "comm/mpi_env.h"
#include "model/alltoall_dispatcher.h"
#include "model/llep.h"
#include "model/moe_layer.h"
#include "model/router.h"
#include "runtime/core/config.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"
#include "tests/compare.h"
#include "tests/parallel/parallel_test_util.h"

namespace moe::model {
namespace {

using parallel::testing::Cpu;
using parallel::testing::ToVector;
using parallel::testing::ValueOrDie;

config::ModelConfig LayerConfig(double fraction, int hot, int first_hot = 0) {
  JobConfig job;
  auto* m = job.mutable_model();
  m->set_hidden_size(16);
  m->set_num_layers(1);
  m->set_num_heads(4);
  m->set_seq_len(64);
  auto* moe = m->mutable_moe();
  moe->set_num_experts(8);
  moe->set_top_k(2);
  moe->set_expert_ffn_hidden_size(12);
  moe->set_capacity_factor(0.0);
  moe->mutable_forced_routing()->set_fraction(fraction);
  moe->mutable_forced_routing()->set_hot_experts(hot);
  moe->mutable_forced_routing()->set_first_hot_expert(first_hot);
  ApplyDefaults(1, &job);
  return job.model();
}

double HotShare(double fraction, int hot, int64_t tokens) {
  Stream& stream = Cpu().default_stream();
  const config::ModelConfig cfg = LayerConfig(fraction, hot);
  Router router;
  MOE_REQUIRE_OK(router.Init(stream, "model.layers.0.mlp.", cfg, 0.02f, 1));
  std::vector<float> xs(tokens * cfg.hidden_size(), 0.1f);
  Tensor x = parallel::testing::HostTensor(xs, Shape{tokens, cfg.hidden_size()});
  const RoutingPlan* plan = ValueOrDie(router.Forward(stream, x));
  int64_t h = 0;
  for (int e = 0; e < hot; ++e) h += plan->selected_per_expert[e];
  // Tokens have top_k distinct experts whenever there are as many hot ones.
  if (hot >= 2) {
    for (int64_t t = 0; t < tokens; ++t) REQUIRE(plan->experts[t * 2] != plan->experts[t * 2 + 1]);
  }
  return static_cast<double>(h) / (tokens * 2);
}

TEST_CASE("forced routing: fraction into the hot experts, the rest uniform", "[llep]") {
  // Expected share in the hot experts: fraction + (1 - fraction) h / E.
  CHECK(std::abs(HotShare(0.5, 4, 8192) - (0.5 + 0.5 * 4 / 8.0)) < 0.03);
  CHECK(std::abs(HotShare(0.3, 4, 8192) - (0.3 + 0.7 * 4 / 8.0)) < 0.03);
  CHECK(std::abs(HotShare(0.0001, 4, 8192) - 0.5) < 0.03);  // ~uniform
  // One hot expert with top_k = 2: both slots of most tokens go there.
  CHECK(std::abs(HotShare(0.95, 1, 8192) - (0.95 + 0.05 / 8.0)) < 0.02);
  CHECK(std::abs(HotShare(0.8, 1, 8192) - (0.8 + 0.2 / 8.0)) < 0.02);
}

struct LayerRun {
  std::vector<float> y, dx, dweights, gate_grad, up_grad, down_grad;
  int moves = 0, borrowed_after_forward = 0, borrowed_after_backward = -1;
  bool fired = false;
  int64_t weight_bytes = 0;
};

LayerRun RunLayer(comm::Communicator& ep, comm::Communicator& ep_p2p, comm::Communicator& host_ep, bool llep,
                  int max_borrowed, int first_hot) {
  Stream& stream = Cpu().default_stream();
  const config::ModelConfig cfg = LayerConfig(0.95, 1, first_hot);
  ShardPlan plan;
  plan.ep_size = ep.size();
  plan.ep_rank = ep.rank();
  MoELayer layer;
  MOE_REQUIRE_OK(layer.Init(stream, "model.layers.0.mlp.", cfg, 0.3f, 0.3f, plan, 77,
                            std::make_unique<AllToAllTokenDispatcher>(&ep, nullptr, 8, 1)));
  if (llep) {
    parallel::LlepOptions o;
    o.trigger_ratio = 1.0;
    o.min_tokens_per_gemm = 1;
    o.max_borrowed_experts = max_borrowed;
    layer.SetLlep(std::make_unique<LlepRunner>(&host_ep, &ep_p2p, nullptr, 8, o));
  }
  const int64_t T = 96, d = cfg.hidden_size();
  std::mt19937 rng(5 + ep.rank());
  std::normal_distribution<float> normal;
  std::vector<float> xs(T * d), dys(T * d);
  for (float& v : xs) v = normal(rng);
  for (float& v : dys) v = normal(rng);
  Tensor x = parallel::testing::HostTensor(xs, Shape{T, d});
  Tensor dy = parallel::testing::HostTensor(dys, Shape{T, d});
  MOE_REQUIRE_OK(ops::Fill(stream, layer.experts().gate_proj().grad, 0.0));
  MOE_REQUIRE_OK(ops::Fill(stream, layer.experts().up_proj().grad, 0.0));
  MOE_REQUIRE_OK(ops::Fill(stream, layer.experts().down_proj().grad, 0.0));
  LayerRun r;
  Tensor y = ValueOrDie(layer.Forward(stream, x));
  if (llep) {
    const LlepRunner& runner = *layer.llep();
    r.fired = runner.stats().fired;
    r.moves = static_cast<int>(runner.plan().weight_moves.size());
    r.borrowed_after_forward = runner.num_borrowed_held();
    r.weight_bytes = runner.stats().weight_bytes_moved;
    int expected = 0;
    for (const auto& m : runner.plan().weight_moves) expected += m.dst == ep.rank();
    REQUIRE(r.borrowed_after_forward == expected);
    REQUIRE(runner.stats().borrowed_experts == expected);
  }
  Tensor dx = ValueOrDie(layer.Backward(stream, dy, 1.0f, 1.0f, 1.0f));
  if (llep) r.borrowed_after_backward = layer.llep()->num_borrowed_held();
  r.y = ToVector(y);
  r.dx = ToVector(dx);
  r.gate_grad = ToVector(layer.experts().gate_proj().grad);
  r.up_grad = ToVector(layer.experts().up_proj().grad);
  r.down_grad = ToVector(layer.experts().down_proj().grad);
  r.dweights = ToVector(layer.router().weight().grad);
  return r;
}

void RequireClose(const std::vector<float>& got, const std::vector<float>& want, const char* what) {
  REQUIRE(got.size() == want.size());
  const moe::testing::Closeness c = moe::testing::Compare(got, want, {.scale_rtol = 1e-5}, what);
  INFO(c.message);
  REQUIRE(c.scale > 0);
  REQUIRE(c.ok);
}

TEST_CASE("LLEP layer: moves pair up, borrowed weights freed, results equal standard EP", "[llep]") {
  parallel::ProcessGroups groups = parallel::testing::Groups(1, parallel::testing::World()->size());
  comm::Communicator& ep = *groups.ep;
  // Hot expert 0 (helpers borrow from below their own experts) or 7 (from above).
  for (auto [max_borrowed, first_hot] : {std::pair{0, 0}, std::pair{1, 0}, std::pair{0, 7}}) {
    INFO("EP " << ep.size() << " max_borrowed_experts " << max_borrowed << " hot expert " << first_hot);
    const LayerRun off = RunLayer(ep, *groups.ep_p2p, *groups.host.ep, false, 0, first_hot);
    const LayerRun on = RunLayer(ep, *groups.ep_p2p, *groups.host.ep, true, max_borrowed, first_hot);
    REQUIRE(on.fired);
    REQUIRE(on.moves > 0);
    REQUIRE(on.borrowed_after_backward == 0);
    if (max_borrowed > 0) REQUIRE(on.borrowed_after_forward <= max_borrowed);
    REQUIRE(on.weight_bytes == static_cast<int64_t>(on.moves) * 3 * 16 * 12 * 4);
    // Borrowed experts summed over ranks = moves in the plan (one receiver each).
    int64_t held = on.borrowed_after_forward;
    comm::Work w = ValueOrDie(ep.AllReduce(&held, &held, 1, DType::kI64, comm::ReduceOp::kSum));
    MOE_REQUIRE_OK(w.Wait());
    REQUIRE(held == on.moves);
    RequireClose(on.y, off.y, "y");
    RequireClose(on.dx, off.dx, "dx");
    RequireClose(on.dweights, off.dweights, "router grad");
    RequireClose(on.gate_grad, off.gate_grad, "gate_proj grad");
    RequireClose(on.up_grad, off.up_grad, "up_proj grad");
    RequireClose(on.down_grad, off.down_grad, "down_proj grad");
  }
}

}  // namespace
}  // namespace moe::model

namespace moe::model {
namespace {

TEST_CASE("LLEP start-up rates: positive and the same on every EP rank", "[llep]") {
  parallel::ProcessGroups groups = parallel::testing::Groups(1, parallel::testing::World()->size());
  const LlepRates rates =
      ValueOrDie(MeasureLlepRates(Cpu().default_stream(), *groups.host.ep, *groups.ep_p2p));
  REQUIRE(rates.gemm_flops_per_s > 0);
  REQUIRE(rates.p2p_bytes_per_s > 0);
  double v[2] = {rates.gemm_flops_per_s, rates.p2p_bytes_per_s}, mx[2];
  comm::Work w = ValueOrDie(groups.ep->AllReduce(v, mx, 2, DType::kF64, comm::ReduceOp::kMax));
  MOE_REQUIRE_OK(w.Wait());
  REQUIRE(mx[0] == v[0]);
  REQUIRE(mx[1] == v[1]);
  // Config rates win over measured ones; the cost model uses the SwiGLU expert's figures.
  config::LlepConfig cfg;
  cfg.set_trigger_ratio(1.3);
  cfg.set_capacity_factor(1.0);
  cfg.set_min_tokens_per_gemm(1024);
  cfg.set_max_borrowed_experts(2);
  cfg.set_cost_model(true);
  cfg.set_gemm_gflops(100);
  cfg.set_p2p_gbps(0);
  const parallel::LlepOptions o = LlepOptionsFromConfig(cfg, rates, 512, 1024);
  REQUIRE(o.gemm_flops_per_s == 100e9);
  REQUIRE(o.p2p_bytes_per_s == rates.p2p_bytes_per_s);
  REQUIRE(o.weight_bytes == 3.0 * 512 * 1024 * 4);
  REQUIRE(o.flops_per_token == 18.0 * 512 * 1024);
  REQUIRE(o.max_borrowed_experts == 2);
  cfg.set_cost_model(false);
  REQUIRE(LlepOptionsFromConfig(cfg, rates, 512, 1024).gemm_flops_per_s == 0);
}

}  // namespace
}  // namespace moe::model
