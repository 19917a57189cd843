// The whole model: parameter list, initialisation rule, finite-difference
// gradients of the full loss (ce + aux + z) with MoE layers, capacity drops and
// tied / untied heads.
#include "model/model.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <random>

#include "runtime/core/ops.h"
#include "runtime/core/rng.h"
#include "tests/model/model_test_util.h"

namespace moe::model {
namespace {

using testing::CpuStream;
using testing::TinyConfig;
using testing::ToVec;

std::unique_ptr<Model> Build(const config::ModelConfig& cfg, uint64_t seed, const ShardPlan& plan = {}) {
  auto m = Model::Create(cfg, CpuStream(), seed, plan);
  INFO(m.status().ToString());
  REQUIRE(m.ok());
  return std::move(*m);
}

std::vector<int32_t> RandomTokens(int64_t B, int64_t S, int64_t V, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(B * (S + 1));
  for (int32_t& x : t) x = static_cast<int32_t>(rng() % V);
  return t;
}

const char* kUntied =
    "vocab_size: 23 hidden_size: 8 num_layers: 2 num_heads: 2 num_kv_heads: 1 "
    "ffn_hidden_size: 12 seq_len: 6 init_std: 0.3 "
    "moe { num_experts: 4 top_k: 2 expert_ffn_hidden_size: 6 moe_layer_freq: 2 "
    "aux_loss_coeff: 0.2 z_loss_coeff: 0.05 }";

TEST_CASE("Parameters have docs/model.md's names, global shapes and order") {
  config::ModelConfig cfg = TinyConfig(kUntied);
  auto model = Build(cfg, 1);
  std::vector<std::string> names;
  for (parallel::Parameter* p : model->parameters()) {
    names.push_back(p->name + " " + p->global_shape.ToString());
    CHECK(p->value.shape() == p->global_shape);
    CHECK(p->grad.shape() == p->global_shape);
  }
  const std::vector<std::string> expected = {
      "model.embed_tokens.weight [23,8]",
      "model.layers.0.input_layernorm.weight [8]",
      "model.layers.0.self_attn.q_proj.weight [8,8]",
      "model.layers.0.self_attn.k_proj.weight [4,8]",
      "model.layers.0.self_attn.v_proj.weight [4,8]",
      "model.layers.0.self_attn.o_proj.weight [8,8]",
      "model.layers.0.post_attention_layernorm.weight [8]",
      "model.layers.0.mlp.gate_proj.weight [12,8]",
      "model.layers.0.mlp.up_proj.weight [12,8]",
      "model.layers.0.mlp.down_proj.weight [8,12]",
      "model.layers.1.input_layernorm.weight [8]",
      "model.layers.1.self_attn.q_proj.weight [8,8]",
      "model.layers.1.self_attn.k_proj.weight [4,8]",
      "model.layers.1.self_attn.v_proj.weight [4,8]",
      "model.layers.1.self_attn.o_proj.weight [8,8]",
      "model.layers.1.post_attention_layernorm.weight [8]",
      "model.layers.1.mlp.router.weight [4,8]",
      "model.layers.1.mlp.experts.gate_proj [4,6,8]",
      "model.layers.1.mlp.experts.up_proj [4,6,8]",
      "model.layers.1.mlp.experts.down_proj [4,8,6]",
      "model.norm.weight [8]",
      "lm_head.weight [23,8]",
  };
  CHECK(names == expected);
  auto* experts = model->parameters().Find("model.layers.1.mlp.experts.up_proj");
  REQUIRE(experts != nullptr);
  CHECK(experts->kind == parallel::ParamKind::kExpert);
  CHECK(experts->reduce_group() == parallel::GradReduceGroup::kExpertDataParallel);
  CHECK(model->parameters().Find("model.layers.1.mlp.router.weight")->kind == parallel::ParamKind::kDense);
  CHECK(!model->parameters().Find("model.norm.weight")->weight_decay);
  CHECK(model->parameters().Find("lm_head.weight")->weight_decay);

  config::ModelConfig tied = cfg;
  tied.set_tie_word_embeddings(true);
  auto tied_model = Build(tied, 1);
  CHECK(tied_model->parameters().Find("lm_head.weight") == nullptr);
  CHECK(tied_model->parameters().size() == expected.size() - 1);
}

TEST_CASE("Initialisation follows docs/model.md and depends only on (seed, name, index)") {
  config::ModelConfig cfg = TinyConfig(
      "vocab_size: 50 hidden_size: 64 num_layers: 2 num_heads: 4 ffn_hidden_size: 128 "
      "init_std: 0.02 moe { num_experts: 4 top_k: 2 expert_ffn_hidden_size: 32 "
      "moe_layer_freq: 2 }");
  auto a = Build(cfg, 1234);
  auto b = Build(cfg, 1234);
  auto c = Build(cfg, 99);
  for (size_t i = 0; i < a->parameters().size(); ++i) {
    parallel::Parameter* pa = a->parameters()[i];
    CHECK(ToVec(pa->value) == ToVec(b->parameters()[i]->value));
    CHECK(ToVec(pa->grad) == std::vector<float>(pa->value.numel(), 0.0f));
    const std::vector<float> v = ToVec(pa->value);
    if (pa->name.find("norm") != std::string::npos) {
      CHECK(v == std::vector<float>(v.size(), 1.0f));
      continue;
    }
    CHECK(v != ToVec(c->parameters()[i]->value));
    // Sample std against the rule: 5% plus 3 standard errors of the estimate.
    double sum = 0, sq = 0;
    for (float x : v) sum += x, sq += static_cast<double>(x) * x;
    const double mean = sum / v.size(), sd = std::sqrt(sq / v.size() - mean * mean);
    const bool out =
        pa->name.find("o_proj") != std::string::npos || pa->name.find("down_proj") != std::string::npos;
    const double expect = out ? 0.02 / std::sqrt(2.0 * 2) : 0.02;
    INFO(pa->name << " std " << sd << " expected " << expect);
    CHECK(std::fabs(sd - expect) < 0.05 * expect + 3 * expect / std::sqrt(v.size()));
    CHECK(std::fabs(mean) < 4 * expect / std::sqrt(v.size()));
    // Element i is PhiloxNormal(seed, name, i) * std.
    const PhiloxKey key = PhiloxKeyFromName(pa->name);
    for (int64_t i : {int64_t{0}, static_cast<int64_t>(v.size()) - 1}) {
      CHECK(v[i] == Approx(PhiloxNormal(1234, key, i) * expect).epsilon(1e-6));
    }
  }
}

TEST_CASE("A shard initialises to the same values as the slice of the whole tensor") {
  Stream& s = CpuStream();
  config::ModelConfig cfg = TinyConfig(
      "hidden_size: 16 num_heads: 4 num_kv_heads: 2 num_layers: 2 ffn_hidden_size: 24 "
      "moe { num_experts: 6 expert_ffn_hidden_size: 10 }");
  // Experts [2, 5) of 6 against the whole [6, 10, 16].
  SequentialExperts full, part;
  REQUIRE(full.Init(s, "model.layers.0.mlp.experts.", 16, 10, 6, 0, 6, 0.02f, 0.01f, 77).ok());
  REQUIRE(part.Init(s, "model.layers.0.mlp.experts.", 16, 10, 6, 2, 5, 0.02f, 0.01f, 77).ok());
  for (auto [f, p] :
       {std::pair{&full.gate_proj(), &part.gate_proj()}, std::pair{&full.down_proj(), &part.down_proj()}}) {
    CHECK(p->value.shape() == Shape{3, p->global_shape[1], p->global_shape[2]});
    CHECK(ToVec(p->value) == ToVec(f->value.Slice(2, 5)));
  }
  // Tensor-parallel shards (rank 1 of 2): column-parallel rows, row-parallel columns.
  DenseMLP whole, half;
  REQUIRE(whole.Init(s, "model.layers.1.mlp.", 16, 24, 0.02f, 0.01f, {}, 77).ok());
  ShardPlan tp{.tp_size = 2, .tp_rank = 1};
  REQUIRE(half.Init(s, "model.layers.1.mlp.", 16, 24, 0.02f, 0.01f, tp, 77).ok());
  CHECK(half.gate_proj().value.shape() == Shape{12, 16});
  CHECK(ToVec(half.gate_proj().value) == ToVec(whole.gate_proj().value.Slice(12, 24)));
  CHECK(half.down_proj().value.shape() == Shape{16, 12});
  const std::vector<float> w = ToVec(whole.down_proj().value), h = ToVec(half.down_proj().value);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 12; ++c) CHECK(h[r * 12 + c] == w[r * 24 + 12 + c]);
  CHECK(half.down_proj().shard.tp_dim == 1);
}

std::string RoutingKey(Model& m) {
  std::string key;
  for (int l = 0; l < m.num_layers(); ++l) {
    if (!m.block(l).is_moe()) continue;
    const RoutingPlan& plan = m.block(l).moe()->routing();
    for (size_t a = 0; a < plan.experts.size(); ++a)
      key += std::to_string(plan.experts[a]) + (plan.kept[a] ? "k" : "d") + ",";
    key += "|";
  }
  return key;
}

int64_t Dropped(Model& m) {
  int64_t n = 0;
  for (int l = 0; l < m.num_layers(); ++l)
    if (m.block(l).is_moe()) n += m.block(l).moe()->routing().num_dropped();
  return n;
}

TEST_CASE("Whole-model gradients match finite differences") {
  Stream& s = CpuStream();
  struct Case {
    std::string name, extra;
    bool drops;
  };
  for (const Case& c :
       {Case{"untied, MoE every 2nd layer, dropless", "", false},
        Case{"tied, every layer MoE, capacity probs",
             "tie_word_embeddings: true moe { moe_layer_freq: 1 capacity_factor: 1.0 }", true},
        Case{"untied, capacity position, no renormalisation, k = E",
             "moe { moe_layer_freq: 1 top_k: 4 capacity_factor: 0.8 drop_policy: \"position\" "
             "norm_topk_prob: false }",
             true},
        Case{"untied, sigmoid scores, expert bias, 2 groups (1 kept), sequence aux, capacity",
             "moe { moe_layer_freq: 1 capacity_factor: 1.0 score_function: \"sigmoid\" "
             "expert_bias_update_rate: 0.01 num_expert_groups: 2 group_topk: 1 aux_loss_type: \"sequence\" }",
             true},
        Case{"tied, gated shared expert (Qwen2-MoE), every layer MoE",
             "tie_word_embeddings: true moe { moe_layer_freq: 1 shared_expert_ffn_hidden_size: 6 "
             "shared_expert_gate: true }",
             false}}) {
    DYNAMIC_SECTION(c.name) {
      config::ModelConfig cfg = TinyConfig(std::string(kUntied));
      // Overlay only the fields the case sets.
      auto job_extra = ParseConfigText("model { " + c.extra + " }", "case");
      REQUIRE(job_extra.ok());
      cfg.MergeFrom(job_extra->model());
      auto model = Build(cfg, 5);
      for (parallel::Parameter* b : model->buffers()) {  // a bias that changes choices
        std::vector<float> v(b->value.numel());
        for (size_t i = 0; i < v.size(); ++i) v[i] = 0.05f * (static_cast<float>(i) - 1.5f);
        testing::FromVec(b->value, v);
      }
      const std::vector<int32_t> tokens = RandomTokens(2, 6, cfg.vocab_size(), 3);
      auto loss = [&] {
        auto l = model->Forward(s, tokens, 2);
        REQUIRE(l.ok());
        return l->total();
      };
      REQUIRE(model->ZeroGrads(s).ok());
      loss();
      CHECK((Dropped(*model) > 0) == c.drops);
      REQUIRE(model->Backward(s).ok());
      std::vector<testing::GradTarget> targets;
      for (parallel::Parameter* p : model->parameters()) targets.push_back({p->name, p->value, p->grad});
      testing::CheckGradients(targets, loss, [&] { return RoutingKey(*model); },
                              {.step = 3e-3, .max_per_tensor = 10});
    }
  }
}

TEST_CASE("Backward accumulates, and loss_scale scales the gradients") {
  Stream& s = CpuStream();
  config::ModelConfig cfg = TinyConfig(kUntied);
  auto model = Build(cfg, 5);
  const std::vector<int32_t> tokens = RandomTokens(2, 6, cfg.vocab_size(), 4);
  REQUIRE(model->Forward(s, tokens, 2).ok());
  REQUIRE(model->Backward(s, 1.0f).ok());
  std::vector<std::vector<float>> once;
  for (auto* p : model->parameters()) once.push_back(ToVec(p->grad));
  REQUIRE(model->Forward(s, tokens, 2).ok());
  REQUIRE(model->Backward(s, 0.5f).ok());
  for (size_t i = 0; i < once.size(); ++i) {
    const std::vector<float> g = ToVec(model->parameters()[i]->grad);
    for (size_t j = 0; j < g.size(); ++j) {
      CHECK(g[j] == Approx(1.5f * once[i][j]).margin(1e-6));
    }
  }
}

TEST_CASE("Loss and gradients do not depend on the thread count (bit for bit)") {
  // Large enough that the element-wise and row ops split into several chunks and
  // attention into several 64-row tiles.
  Backend& cpu = CpuStream().backend();
  const int before = cpu.num_threads();
  config::ModelConfig cfg = TinyConfig(
      "vocab_size: 61 hidden_size: 96 num_layers: 2 num_heads: 4 num_kv_heads: 2 "
      "ffn_hidden_size: 128 seq_len: 80 "
      "moe { num_experts: 4 top_k: 2 expert_ffn_hidden_size: 96 moe_layer_freq: 2 "
      "aux_loss_coeff: 0.01 z_loss_coeff: 0.001 }");
  const std::vector<int32_t> tokens = RandomTokens(3, 80, cfg.vocab_size(), 9);
  auto run = [&](int threads) {
    cpu.SetNumThreads(threads);
    auto model = Build(cfg, 3);
    auto loss = model->Forward(CpuStream(), tokens, 3);
    REQUIRE(loss.ok());
    REQUIRE(model->Backward(CpuStream(), 1.0f).ok());
    std::vector<float> all = {static_cast<float>(loss->total())};
    for (auto* p : model->parameters()) {
      const std::vector<float> g = ToVec(p->grad);
      all.insert(all.end(), g.begin(), g.end());
    }
    return all;
  };
  const std::vector<float> one = run(1), three = run(3);
  cpu.SetNumThreads(before);
  REQUIRE(one.size() == three.size());
  size_t differ = 0;
  for (size_t i = 0; i < one.size(); ++i) differ += std::memcmp(&one[i], &three[i], 4) != 0 ? 1 : 0;
  INFO("loss " << one[0] << " vs " << three[0]);
  CHECK(std::isfinite(one[0]));
  CHECK(differ == 0);
}

TEST_CASE("Bad tokens and configs are rejected with the value and the field") {
  Stream& s = CpuStream();
  config::ModelConfig cfg = TinyConfig(kUntied);
  auto model = Build(cfg, 5);
  std::vector<int32_t> tokens = RandomTokens(2, 6, cfg.vocab_size(), 4);
  tokens[5] = 23;
  auto l = model->Forward(s, tokens, 2);
  REQUIRE(!l.ok());
  CHECK(std::string(l.status().message()).find("token 5 = 23") != std::string::npos);
  CHECK(!model->Forward(s, std::vector<int32_t>(13, 1), 2).ok());
  CHECK(!model->Forward(s, std::vector<int32_t>(2 * 9, 1), 2).ok());  // S = 8 > seq_len 6

  config::ModelConfig bad = cfg;
  bad.set_num_kv_heads(3);
  auto m = Model::Create(bad, s, 1);
  REQUIRE(!m.ok());
  CHECK(std::string(m.status().message()).find("model.num_kv_heads = 3") != std::string::npos);
  bad = cfg;
  bad.mutable_moe()->set_top_k(5);
  CHECK(!Model::Create(bad, s, 1).ok());
  // The DeepSeek-V3 routing options name the field, the value and the fix.
  struct Bad {
    std::string text, message;
  };
  for (const Bad& b :
       {Bad{"score_function: \"relu\"", "model.moe.score_function = \"relu\""},
        Bad{"aux_loss_type: \"token\"", "model.moe.aux_loss_type = \"token\""},
        Bad{"expert_bias_update_rate: -1", "model.moe.expert_bias_update_rate = -1"},
        Bad{"group_topk: -1", "model.moe.group_topk = -1"},
        Bad{"num_expert_groups: 3 group_topk: 1", "model.moe.num_expert_groups = 3 must"},
        Bad{"num_expert_groups: 2 group_topk: 3", "at most model.moe.num_expert_groups = 2"},
        Bad{"num_expert_groups: 4 group_topk: 1", "hold fewer than model.moe.top_k = 2"},
        Bad{"shared_expert_ffn_hidden_size: -2", "model.moe.shared_expert_ffn_hidden_size = -2"},
        Bad{"shared_expert_gate: true", "model.moe.shared_expert_gate = true needs a shared expert"},
        Bad{"erc_loss_coeff: -0.5", "model.moe.erc_loss_coeff = -0.5 must be a finite value >= 0"},
        Bad{"erc_loss_coeff: 0.1 num_experts: 1 top_k: 1", "needs model.moe.num_experts >= 2"},
        Bad{"erc_alpha: 1.5", "model.moe.erc_alpha = 1.5 must be in [0, 1]"}}) {
    bad = cfg;
    auto extra = ParseConfigText("model { moe { " + b.text + " } }", "case");
    REQUIRE(extra.ok());
    bad.MergeFrom(extra->model());
    auto created = Model::Create(bad, s, 1);
    INFO(b.text << " -> " << created.status().ToString());
    REQUIRE(!created.ok());
    CHECK(std::string(created.status().message()).find(b.message) != std::string::npos);
  }
  bad = cfg;
  bad.mutable_moe()->set_drop_policy("random");
  CHECK(!Model::Create(bad, s, 1).ok());
  CHECK(!Model::Create(cfg, s, 1, ShardPlan{.tp_size = 2, .tp_rank = 0}).ok());
  CHECK(!Model::Create(cfg, s, 1, ShardPlan{.ep_size = 2, .ep_rank = 0}).ok());
}

TEST_CASE("Forced routing sends the configured fraction to the hot experts") {
  Stream& s = CpuStream();
  config::ModelConfig cfg = TinyConfig(
      "vocab_size: 31 hidden_size: 16 num_layers: 1 num_heads: 2 seq_len: 64 "
      "moe { num_experts: 8 top_k: 2 forced_routing { fraction: 0.8 hot_experts: 2 } }");
  auto model = Build(cfg, 5);
  REQUIRE(model->Forward(s, RandomTokens(4, 64, 31, 1), 4).ok());
  const RoutingPlan& plan = model->block(0).moe()->routing();
  const int64_t total = plan.num_tokens * plan.top_k;
  const double hot = static_cast<double>(plan.selected_per_expert[0] + plan.selected_per_expert[1]);
  // k = 2 distinct experts per token with 2 hot ones: hot slots are nearly every
  // first slot and most second slots; the fraction must be far above uniform (2/8).
  INFO("hot fraction " << hot / total);
  CHECK(hot / total > 0.6);
  for (int64_t t = 0; t < plan.num_tokens; ++t) CHECK(plan.experts[t * 2] != plan.experts[t * 2 + 1]);
}

TEST_CASE("Forced routing into fewer hot experts than top_k meets the fraction by repeating a hot expert") {
  Stream& s = CpuStream();
  for (const double fraction : {0.5, 0.95}) {
    DYNAMIC_SECTION("fraction " << fraction) {
      config::ModelConfig cfg = TinyConfig(
          "vocab_size: 31 hidden_size: 16 num_layers: 1 num_heads: 2 seq_len: 256 "
          "moe { num_experts: 8 top_k: 2 forced_routing { fraction: " +
          std::to_string(fraction) + " hot_experts: 1 } }");
      auto model = Build(cfg, 5);
      REQUIRE(model->Forward(s, RandomTokens(8, 256, 31, 1), 8).ok());
      const RoutingPlan& plan = model->block(0).moe()->routing();
      const int64_t total = plan.num_tokens * plan.top_k;
      // Hot draws with probability `fraction`, plus the uniform draws that land on expert 0.
      const double expected = fraction + (1 - fraction) / 8;
      const double hot = static_cast<double>(plan.selected_per_expert[0]) / total;
      INFO("hot fraction " << hot << " expected " << expected);
      CHECK(std::abs(hot - expected) < 0.02);
      int64_t repeats = 0;
      for (int64_t t = 0; t < plan.num_tokens; ++t) {
        const int32_t a = plan.experts[t * 2], b = plan.experts[t * 2 + 1];
        if (a == b) {
          ++repeats;
          CHECK(a == 0);  // only the hot expert ever repeats
          CHECK(plan.weights[t * 2] == Approx(0.5f));
        }
      }
      CHECK(repeats > 0);
    }
  }
}

}  // namespace
}  // namespace moe::model
