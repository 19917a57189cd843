// Finite-difference gradient checks of every layer of model/ (float32 layers,
// central differences; tolerance in tests/model/model_test_util.h: 3% of the
// element's gradient + 0.2% of the tensor's largest gradient + 1e-4, which the
// float32 rounding of a loss of O(1) divided by a 2e-2 wide difference
// (~1e-5) and the O(h^2) truncation stay far below, while a wrong term of a
// backward is off by O(100%)).
#include <catch2/catch.hpp>
#include <cmath>
#include <random>

#include "model/attention.h"
#include "model/dense_mlp.h"
#include "model/embedding.h"
#include "model/moe_layer.h"
#include "model/rms_norm.h"
#include "model/router.h"
#include "model/transformer_block.h"
#include "runtime/core/ops.h"
#include "tests/model/model_test_util.h"

namespace moe::model {
namespace {

using testing::CheckGradients;
using testing::CpuStream;
using testing::Dot;
using testing::GradTarget;
using testing::RandomTensor;
using testing::TinyConfig;
using testing::ToVec;

// Replaces a parameter's value with random numbers of `std` (larger than the
// training init so every path has a visible gradient) and zeroes its grad.
void Randomize(parallel::Parameter& p, std::mt19937& rng, float std, float mean = 0.0f) {
  std::normal_distribution<float> n(mean, std);
  std::vector<float> v(p.value.numel());
  for (float& x : v) x = n(rng);
  testing::FromVec(p.value, v);
  if (p.grad.defined()) REQUIRE(ops::Fill(CpuStream(), p.grad, 0.0).ok());  // state has no grad
}

// The checker itself: a correct gradient passes; a NaN or Inf loss, or a NaN
// or Inf analytic gradient, fails (err > tol would be false for NaN).
TEST_CASE("Gradient checker fails on NaN and Inf") {
  std::mt19937 rng(3);
  Tensor x = RandomTensor({6}, rng), grad = RandomTensor({6}, rng);
  std::vector<float> dy = ToVec(RandomTensor({6}, rng));
  testing::FromVec(grad, dy);  // loss = dy . x has gradient dy
  const std::vector<GradTarget> targets = {{"x", x, grad}};
  auto dot_loss = [&] { return Dot(x, dy); };
  const testing::GradCheckResult good = testing::RunGradientCheck(targets, dot_loss, nullptr);
  INFO(good.report);
  CHECK(good.ok());
  CHECK(good.checked == 6);
  for (double bad : {std::nan(""), HUGE_VAL, -HUGE_VAL}) {
    INFO("bad value " << bad);
    const testing::GradCheckResult r = testing::RunGradientCheck(
        targets, [&] { return bad; }, nullptr);
    INFO(r.report);
    CHECK_FALSE(r.ok());
    CHECK(r.bad == 6);
    std::vector<float> g = dy;
    g[2] = static_cast<float>(bad);
    testing::FromVec(grad, g);
    const testing::GradCheckResult rg = testing::RunGradientCheck(targets, dot_loss, nullptr);
    INFO(rg.report);
    CHECK_FALSE(rg.ok());
    CHECK(rg.bad >= 1);
    testing::FromVec(grad, dy);
  }
}

TEST_CASE("RMSNorm gradients") {
  Stream& s = CpuStream();
  std::mt19937 rng(1);
  RMSNorm norm;
  REQUIRE(norm.Init(s, "model.norm.weight", 12, 1e-5f, 1).ok());
  Randomize(norm.weight(), rng, 0.3f, 1.0f);
  Tensor x = RandomTensor(Shape{7, 12}, rng);
  std::vector<float> r = ToVec(RandomTensor(Shape{7, 12}, rng));
  auto loss = [&] {
    auto y = norm.Forward(s, x);
    REQUIRE(y.ok());
    return Dot(*y, r);
  };
  loss();
  Tensor dx = testing::NewTensor(Shape{7, 12}, std::vector<float>(84, 0.5f));
  REQUIRE(norm.Backward(s, testing::NewTensor(Shape{7, 12}, r), dx, false).ok());
  CheckGradients({{"weight", norm.weight().value, norm.weight().grad}, {"x", x, dx}}, loss, {});

  SECTION("accumulate_dx adds to dx") {
    loss();
    std::vector<float> before = ToVec(dx);
    Tensor dx2 = testing::NewTensor(Shape{7, 12}, std::vector<float>(84, 1.0f));
    REQUIRE(norm.Backward(s, testing::NewTensor(Shape{7, 12}, r), dx2, true).ok());
    std::vector<float> after = ToVec(dx2);
    for (size_t i = 0; i < after.size(); ++i) CHECK(after[i] == Approx(before[i] + 1.0f).margin(1e-6));
  }
}

TEST_CASE("Embedding gradients") {
  Stream& s = CpuStream();
  std::mt19937 rng(2);
  Embedding emb;
  REQUIRE(emb.Init(s, 11, 6, 1.0f, 3).ok());
  std::vector<int32_t> ids = {3, 0, 3, 10, 7};
  auto ids_t = FromHostInts(s, ids, Shape{5});
  REQUIRE(ids_t.ok());
  std::vector<float> r = ToVec(RandomTensor(Shape{5, 6}, rng));
  auto loss = [&] {
    auto y = emb.Forward(s, *ids_t);
    REQUIRE(y.ok());
    return Dot(*y, r);
  };
  loss();
  REQUIRE(emb.Backward(s, testing::NewTensor(Shape{5, 6}, r)).ok());
  CheckGradients({{"embed", emb.weight().value, emb.weight().grad}}, loss, {}, {.max_per_tensor = 66});
}

TEST_CASE("Attention gradients (GQA, RoPE, causal)") {
  Stream& s = CpuStream();
  std::mt19937 rng(3);
  for (int kv : {1, 2, 4}) {
    DYNAMIC_SECTION("num_kv_heads " << kv) {
      config::ModelConfig cfg =
          TinyConfig("hidden_size: 16 num_heads: 4 num_kv_heads: " + std::to_string(kv));
      Attention attn;
      REQUIRE(attn.Init(s, "model.layers.0.self_attn.", cfg, 0.02f, 0.01f, {}, 5).ok());
      for (auto* p : {&attn.q_proj(), &attn.k_proj(), &attn.v_proj(), &attn.o_proj()})
        Randomize(*p, rng, 0.4f);
      const int64_t B = 2, S = 5;
      Tensor a = RandomTensor(Shape{B * S, 16}, rng);
      std::vector<float> r = ToVec(RandomTensor(Shape{B * S, 16}, rng));
      auto loss = [&] {
        auto y = attn.Forward(s, a, B, S);
        REQUIRE(y.ok());
        return Dot(*y, r);
      };
      loss();
      auto da = attn.Backward(s, testing::NewTensor(Shape{B * S, 16}, r));
      REQUIRE(da.ok());
      CheckGradients({{"q_proj", attn.q_proj().value, attn.q_proj().grad},
                      {"k_proj", attn.k_proj().value, attn.k_proj().grad},
                      {"v_proj", attn.v_proj().value, attn.v_proj().grad},
                      {"o_proj", attn.o_proj().value, attn.o_proj().grad},
                      {"a", a, *da}},
                     loss, {});
    }
  }
}

TEST_CASE("Attention is causal: later tokens do not change earlier outputs") {
  Stream& s = CpuStream();
  std::mt19937 rng(4);
  config::ModelConfig cfg = TinyConfig("hidden_size: 8 num_heads: 2 num_kv_heads: 1");
  Attention attn;
  REQUIRE(attn.Init(s, "model.layers.0.self_attn.", cfg, 0.5f, 0.5f, {}, 5).ok());
  Tensor a = RandomTensor(Shape{6, 8}, rng);
  auto y1 = attn.Forward(s, a, 1, 6);
  REQUIRE(y1.ok());
  std::vector<float> before = ToVec(*y1);
  std::vector<float> av = ToVec(a);
  for (int i = 5 * 8; i < 6 * 8; ++i) av[i] += 1.0f;  // change the last token only
  testing::FromVec(a, av);
  auto y2 = attn.Forward(s, a, 1, 6);
  REQUIRE(y2.ok());
  std::vector<float> after = ToVec(*y2);
  for (int i = 0; i < 5 * 8; ++i) CHECK(after[i] == before[i]);
  bool last_changed = false;
  for (int i = 5 * 8; i < 6 * 8; ++i) last_changed |= after[i] != before[i];
  CHECK(last_changed);
}

TEST_CASE("DenseMLP gradients") {
  Stream& s = CpuStream();
  std::mt19937 rng(5);
  DenseMLP mlp;
  REQUIRE(mlp.Init(s, "model.layers.0.mlp.", 10, 14, 0.02f, 0.01f, {}, 9).ok());
  for (auto* p : {&mlp.gate_proj(), &mlp.up_proj(), &mlp.down_proj()}) Randomize(*p, rng, 0.4f);
  Tensor x = RandomTensor(Shape{9, 10}, rng);
  std::vector<float> r = ToVec(RandomTensor(Shape{9, 10}, rng));
  auto loss = [&] {
    auto y = mlp.Forward(s, x);
    REQUIRE(y.ok());
    return Dot(*y, r);
  };
  loss();
  auto dx = mlp.Backward(s, testing::NewTensor(Shape{9, 10}, r));
  REQUIRE(dx.ok());
  CheckGradients({{"gate_proj", mlp.gate_proj().value, mlp.gate_proj().grad},
                  {"up_proj", mlp.up_proj().value, mlp.up_proj().grad},
                  {"down_proj", mlp.down_proj().value, mlp.down_proj().grad},
                  {"x", x, *dx}},
                 loss, {});
}

std::string RoutingKey(const RoutingPlan& plan) {
  std::string key;
  for (size_t a = 0; a < plan.experts.size(); ++a) {
    key += std::to_string(plan.experts[a]) + (plan.kept[a] ? "k" : "d") + ",";
  }
  return key;
}

// Which hinges of the coupling loss are active (M_ij > alpha M_ii, M_ji > alpha M_ii):
// a perturbation that flips one is skipped like a routing change.
std::string ErcKey(const ErcLoss& erc) {
  const std::vector<float>& m = erc.activation_norms();
  const size_t E = static_cast<size_t>(std::sqrt(static_cast<double>(m.size())) + 0.5);
  std::string key = "|";
  for (size_t i = 0; i < E; ++i) {
    for (size_t j = 0; j < E; ++j) {
      key += m[i * E + j] > erc.alpha() * m[i * E + i] ? '1' : '0';
      key += m[j * E + i] > erc.alpha() * m[i * E + i] ? '1' : '0';
    }
  }
  return key;
}

TEST_CASE("Router gradients: combine weights, aux and z losses") {
  Stream& s = CpuStream();
  struct Case {
    std::string name, text;
  };
  for (const Case& c : {Case{"dropless normalised", "top_k: 2 capacity_factor: 0"},
                        Case{"capacity probs", "top_k: 2 capacity_factor: 1.0 drop_policy: \"probs\""},
                        Case{"capacity position, no renormalisation",
                             "top_k: 2 capacity_factor: 0.6 drop_policy: \"position\" norm_topk_prob: false"},
                        Case{"k = E", "top_k: 4 capacity_factor: 0.8"},
                        Case{"sigmoid, bias, groups, capacity",
                             "top_k: 2 capacity_factor: 1.0 score_function: \"sigmoid\" "
                             "expert_bias_update_rate: 0.1 num_expert_groups: 2 group_topk: 1"},
                        Case{"sigmoid, sequence aux, no renormalisation",
                             "top_k: 2 score_function: \"sigmoid\" aux_loss_type: \"sequence\" "
                             "norm_topk_prob: false"},
                        Case{"softmax, sequence aux, bias",
                             "top_k: 2 aux_loss_type: \"sequence\" "
                             "expert_bias_update_rate: 0.1"}}) {
    DYNAMIC_SECTION(c.name) {
      std::mt19937 rng(6);
      config::ModelConfig cfg = TinyConfig(
          "hidden_size: 8 moe { num_experts: 4 aux_loss_coeff: 0.3 z_loss_coeff: 0.05 " + c.text + " }");
      Router router;
      REQUIRE(router.Init(s, "model.layers.0.mlp.", cfg, 0.02f, 1).ok());
      Randomize(router.weight(), rng, 0.6f);
      if (router.has_expert_bias()) Randomize(router.expert_bias(), rng, 0.1f);
      // Sequences of 4 tokens for the sequence-level aux loss (12 tokens: 3 sequences).
      const int64_t T = cfg.moe().aux_loss_type() == "sequence" ? 12 : 11;
      const int k = cfg.moe().top_k();
      Tensor x = RandomTensor(Shape{T, 8}, rng);
      std::vector<float> cw = ToVec(RandomTensor(Shape{T * k}, rng));
      auto loss = [&] {
        auto plan = router.Forward(s, x, cfg.moe().aux_loss_type() == "sequence" ? 4 : 0);
        REQUIRE(plan.ok());
        double l = 0.7 * router.aux_loss() + 1.3 * router.z_loss();
        for (int64_t a = 0; a < T * k; ++a)
          if ((*plan)->kept[a]) l += static_cast<double>(cw[a]) * (*plan)->weights[a];
        return l;
      };
      loss();
      std::vector<float> dw(T * k);
      for (int64_t a = 0; a < T * k; ++a) dw[a] = router.plan().kept[a] ? cw[a] : 0.0f;
      auto dx = router.Backward(s, testing::NewTensor(Shape{T * k}, dw), 0.7f, 1.3f);
      REQUIRE(dx.ok());
      CheckGradients({{"router", router.weight().value, router.weight().grad}, {"x", x, *dx}}, loss,
                     [&] { return RoutingKey(router.plan()); }, {.step = 3e-3});
    }
  }
}

TEST_CASE("MoELayer gradients (grouped and sequential experts, drops, aux, z)") {
  Stream& s = CpuStream();
  struct Case {
    std::string name, text;
    bool drops;
  };
  for (const std::string impl : {"grouped", "sequential"}) {
    for (const Case& c :
         {Case{"dropless", "top_k: 2 capacity_factor: 0", false},
          Case{"capacity probs", "top_k: 2 capacity_factor: 1.0 drop_policy: \"probs\"", true},
          Case{"capacity position k=E",
               "top_k: 3 capacity_factor: 0.7 drop_policy: \"position\" norm_topk_prob: false", true},
          // Forced routing with one hot expert: most tokens list expert 0 in both slots.
          Case{"forced, repeated expert in a token",
               "top_k: 2 capacity_factor: 0 forced_routing { fraction: 0.9 hot_experts: 1 }", false},
          Case{"sigmoid, bias, 3 groups (2 kept), capacity",
               "top_k: 2 capacity_factor: 1.0 score_function: \"sigmoid\" expert_bias_update_rate: 0.1 "
               "num_expert_groups: 3 group_topk: 2",
               true},
          Case{"shared expert", "top_k: 2 capacity_factor: 0 shared_expert_ffn_hidden_size: 5", false},
          Case{"gated shared expert, capacity",
               "top_k: 2 capacity_factor: 1.0 shared_expert_ffn_hidden_size: 4 shared_expert_gate: true",
               true},
          Case{"expert-router coupling loss, alpha 0.8",
               "top_k: 2 capacity_factor: 0 erc_loss_coeff: 0.6 erc_alpha: 0.8", false}}) {
      DYNAMIC_SECTION(impl << " " << c.name) {
        std::mt19937 rng(7);
        config::ModelConfig cfg = TinyConfig(
            "hidden_size: 8 num_layers: 2 moe { num_experts: 3 "
            "expert_ffn_hidden_size: 6 aux_loss_coeff: 0.2 z_loss_coeff: 0.05 experts_impl: \"" +
            impl + "\" " + c.text + " }");
        MoELayer layer;
        REQUIRE(layer.Init(s, "model.layers.1.mlp.", cfg, 0.02f, 0.01f, {}, 11).ok());
        Randomize(layer.router().weight(), rng, 0.6f);
        if (layer.router().has_expert_bias()) Randomize(layer.router().expert_bias(), rng, 0.1f);
        for (auto* p :
             {&layer.experts().gate_proj(), &layer.experts().up_proj(), &layer.experts().down_proj()})
          Randomize(*p, rng, 0.5f);
        if (DenseMLP* sh = layer.shared_expert()) {
          for (auto* p : {&sh->gate_proj(), &sh->up_proj(), &sh->down_proj()}) Randomize(*p, rng, 0.5f);
        }
        if (parallel::Parameter* g = layer.shared_expert_gate()) Randomize(*g, rng, 0.5f);
        const int64_t T = 10;
        Tensor x = RandomTensor(Shape{T, 8}, rng);
        std::vector<float> r = ToVec(RandomTensor(Shape{T, 8}, rng));
        auto loss = [&] {
          auto y = layer.Forward(s, x);
          REQUIRE(y.ok());
          return Dot(*y, r) + 0.9 * layer.aux_loss() + 1.1 * layer.z_loss() + 0.7 * layer.erc_loss();
        };
        loss();
        CHECK((layer.routing().num_dropped() > 0) == c.drops);
        CHECK((layer.erc_loss() > 0) == (cfg.moe().erc_loss_coeff() > 0));
        if (c.name.rfind("forced", 0) == 0) {
          int repeats = 0;
          for (int64_t t = 0; t < T; ++t)
            repeats += layer.routing().experts[t * 2] == layer.routing().experts[t * 2 + 1] ? 1 : 0;
          CHECK(repeats >= 3);
        }
        auto dx = layer.Backward(s, testing::NewTensor(Shape{T, 8}, r), 0.9f, 1.1f, 0.7f);
        REQUIRE(dx.ok());
        // Every parameter of the layer (router, experts, shared expert and its gate) and x.
        parallel::ParameterList params;
        REQUIRE(layer.CollectParameters(&params).ok());
        CHECK(params.size() ==
              4u + (layer.shared_expert() ? 3u : 0u) + (layer.shared_expert_gate() ? 1u : 0u));
        std::vector<testing::GradTarget> targets = {{"x", x, *dx}};
        for (parallel::Parameter* p : params) targets.push_back({p->name, p->value, p->grad});
        CheckGradients(targets, loss, [&] { return RoutingKey(layer.routing()) + ErcKey(layer.erc()); },
                       {.step = 3e-3});
      }
    }
  }
}

TEST_CASE("TransformerBlock gradients (dense and MoE)") {
  Stream& s = CpuStream();
  for (int layer_index : {0, 1}) {
    DYNAMIC_SECTION("layer " << layer_index) {
      std::mt19937 rng(8);
      config::ModelConfig cfg = TinyConfig(
          "hidden_size: 8 num_heads: 2 num_kv_heads: 1 num_layers: 2 ffn_hidden_size: 12 "
          "moe { num_experts: 3 top_k: 2 expert_ffn_hidden_size: 6 moe_layer_freq: 2 "
          "aux_loss_coeff: 0.2 z_loss_coeff: 0.05 }");
      TransformerBlock block;
      REQUIRE(block.Init(s, cfg, layer_index, {}, 13).ok());
      CHECK(block.is_moe() == (layer_index == 1));
      parallel::ParameterList params;
      REQUIRE(block.CollectParameters(&params).ok());
      for (parallel::Parameter* p : params) {
        const bool norm = p->name.find("norm") != std::string::npos;
        Randomize(*p, rng, norm ? 0.2f : 0.5f, norm ? 1.0f : 0.0f);
      }
      const int64_t B = 2, S = 4;
      Tensor h = RandomTensor(Shape{B * S, 8}, rng);
      std::vector<float> r = ToVec(RandomTensor(Shape{B * S, 8}, rng));
      auto loss = [&] {
        auto y = block.Forward(s, Residual{h, Tensor()}, B, S);  // output = y->h + y->branch
        REQUIRE(y.ok());
        return Dot(y->h, r) + Dot(y->branch, r) + 0.9 * block.aux_loss() + 1.1 * block.z_loss();
      };
      loss();
      Tensor dh = testing::NewTensor(Shape{B * S, 8}, r);
      REQUIRE(block.Backward(s, dh, 0.9f, 1.1f, 0.7f).ok());
      std::vector<GradTarget> targets;
      for (parallel::Parameter* p : params) targets.push_back({p->name, p->value, p->grad});
      targets.push_back({"h", h, dh});
      CheckGradients(targets, loss,
                     [&] { return block.is_moe() ? RoutingKey(block.moe()->routing()) : std::string(); },
                     {.step = 3e-3});
    }
  }
}

}  // namespace
}  // namespace moe::model
