#include "runtime/hf_interop.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <map>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "google/protobuf/text_format.h"
#include "runtime/checkpoint.h"
#include "runtime/checkpoint_format.h"
#include "runtime/checkpoint_fs.h"
#include "runtime/core/config.h"
#include "runtime/core/json.h"
#include "runtime/core/status.h"
#include "runtime/safetensors.h"

namespace moe {
namespace {

using Dims = std::vector<int64_t>;

int64_t Numel(const Dims& d) {
  int64_t n = 1;
  for (int64_t v : d) n *= v;
  return n;
}

std::string DimsText(const Dims& d) { return absl::StrCat("[", absl::StrJoin(d, ", "), "]"); }

bool HasBias(const config::ModelConfig& m) { return m.moe().expert_bias_update_rate() > 0; }

absl::StatusOr<std::string> ReadText(const std::string& path) {
  absl::StatusOr<std::string> s = CheckpointFs::Default()->ReadFile(path);
  if (!s.ok()) return absl::NotFoundError(absl::StrCat(path, ": cannot read: ", s.status().message()));
  return s;
}

// ---- config.json ---------------------------------------------------------------

// A small ordered JSON object writer (values already encoded).
class JsonObject {
 public:
  JsonObject& Raw(const std::string& key, const std::string& value) {
    items_.emplace_back(key, value);
    return *this;
  }
  JsonObject& Str(const std::string& key, const std::string& v) {
    return Raw(key, absl::StrCat("\"", JsonEscape(v), "\""));
  }
  JsonObject& Int(const std::string& key, int64_t v) { return Raw(key, absl::StrCat(v)); }
  JsonObject& Num(const std::string& key, double v) { return Raw(key, absl::StrFormat("%.17g", v)); }
  JsonObject& Bool(const std::string& key, bool v) { return Raw(key, v ? "true" : "false"); }
  std::string Text(int indent = 2) const {
    std::string pad(indent, ' ');
    std::string s = "{\n";
    for (size_t i = 0; i < items_.size(); ++i) {
      absl::StrAppend(&s, pad, "\"", JsonEscape(items_[i].first), "\": ", items_[i].second,
                      i + 1 < items_.size() ? ",\n" : "\n");
    }
    return s + "}\n";
  }

 private:
  std::vector<std::pair<std::string, std::string>> items_;
};

std::string HfConfigJson(const config::ModelConfig& m, HfFamily family, const std::string& dtype,
                         const std::string& job_config_text) {
  const config::MoeConfig& moe = m.moe();
  JsonObject j;
  const char* arch = family == HfFamily::kMixtral    ? "MixtralForCausalLM"
                     : family == HfFamily::kQwen2Moe ? "Qwen2MoeForCausalLM"
                                                     : "DeepseekV3ForCausalLM";
  j.Raw("architectures", absl::StrCat("[\"", arch, "\"]")).Str("model_type", HfFamilyName(family));
  j.Int("vocab_size", m.vocab_size()).Int("hidden_size", m.hidden_size());
  j.Int("num_hidden_layers", m.num_layers()).Int("num_attention_heads", m.num_heads());
  j.Int("num_key_value_heads", m.num_kv_heads()).Int("head_dim", m.hidden_size() / m.num_heads());
  j.Str("hidden_act", "silu").Int("max_position_embeddings", m.seq_len());
  j.Num("rms_norm_eps", m.norm_eps()).Num("rope_theta", m.rope_theta());
  j.Num("initializer_range", m.init_std()).Bool("tie_word_embeddings", m.tie_word_embeddings());
  j.Bool("attention_bias", false).Num("attention_dropout", 0.0);
  j.Str("torch_dtype", dtype == "BF16" ? "bfloat16" : "float32");
  j.Int("num_experts_per_tok", moe.top_k()).Num("router_aux_loss_coef", moe.aux_loss_coeff());
  switch (family) {
    case HfFamily::kMixtral:
      j.Int("intermediate_size", moe.expert_ffn_hidden_size()).Int("num_local_experts", moe.num_experts());
      j.Bool("output_router_logits", false).Raw("sliding_window", "null");
      break;
    case HfFamily::kQwen2Moe:
      j.Int("intermediate_size", m.ffn_hidden_size())
          .Int("moe_intermediate_size", moe.expert_ffn_hidden_size());
      j.Int("shared_expert_intermediate_size", moe.shared_expert_ffn_hidden_size());
      j.Int("num_experts", moe.num_experts()).Int("decoder_sparse_step", moe.moe_layer_freq());
      j.Raw("mlp_only_layers", "[]").Bool("norm_topk_prob", moe.norm_topk_prob());
      j.Bool("use_sliding_window", false).Bool("qkv_bias", true).Bool("output_router_logits", false);
      break;
    case HfFamily::kDeepseekV3: {
      const int64_t fs = moe.shared_expert_ffn_hidden_size(), fe = moe.expert_ffn_hidden_size();
      j.Int("intermediate_size", m.ffn_hidden_size()).Int("moe_intermediate_size", fe);
      j.Int("n_routed_experts", moe.num_experts()).Int("n_shared_experts", fs / fe);
      j.Int("first_k_dense_replace", 0).Int("moe_layer_freq", 1);
      j.Str("scoring_func", moe.score_function());
      j.Str("topk_method", HasBias(m)             ? "noaux_tc"
                           : moe.group_topk() > 0 ? "group_limited_greedy"
                                                  : "greedy");
      j.Int("n_group", moe.group_topk() > 0 ? moe.num_expert_groups() : 1);
      j.Int("topk_group", moe.group_topk() > 0 ? moe.group_topk() : 1);
      j.Bool("norm_topk_prob", moe.norm_topk_prob()).Num("routed_scaling_factor", 1.0);
      j.Num("aux_loss_alpha", moe.aux_loss_coeff()).Bool("seq_aux", moe.aux_loss_type() == "sequence");
      break;
    }
  }
  j.Str("moe_runtime_config", job_config_text);
  return j.Text();
}

// The model config an export's config.json describes: the runtime's own
// ("moe_runtime_config"), checked against the Hugging Face fields, or built
// from those fields alone.
struct FieldCheck {
  const char* hf;
  int64_t want;
};

absl::StatusOr<JsonValue> ReadJsonFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadText(path));
  absl::StatusOr<JsonValue> v = ParseJson(text);
  if (!v.ok()) return absl::DataLossError(absl::StrCat(path, ": not valid JSON: ", v.status().message()));
  if (v->kind != JsonValue::Kind::kObject)
    return absl::DataLossError(absl::StrCat(path, ": not a JSON object"));
  return v;
}

absl::StatusOr<int64_t> IntField(const JsonValue& j, const char* key, const std::string& path) {
  const JsonValue* v = j.Find(key);
  if (v == nullptr || v->kind != JsonValue::Kind::kNumber || v->number != static_cast<int64_t>(v->number) ||
      v->number < 0 || v->number > 1e12) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": field \"", key, "\" is missing or not a count"));
  }
  return static_cast<int64_t>(v->number);
}

double NumField(const JsonValue& j, const char* key, double fallback) {
  const JsonValue* v = j.Find(key);
  return v != nullptr && v->kind == JsonValue::Kind::kNumber ? v->number : fallback;
}

bool BoolField(const JsonValue& j, const char* key, bool fallback) {
  const JsonValue* v = j.Find(key);
  return v != nullptr && v->kind == JsonValue::Kind::kBool ? v->boolean : fallback;
}

std::string StrField(const JsonValue& j, const char* key) {
  const JsonValue* v = j.Find(key);
  return v != nullptr && v->kind == JsonValue::Kind::kString ? v->string : "";
}

// The count fields `keys` of config.json, each required.
absl::StatusOr<std::map<std::string, int64_t>> Counts(const JsonValue& j, const std::string& path,
                                                      std::initializer_list<const char*> keys) {
  std::map<std::string, int64_t> out;
  for (const char* k : keys) {
    ASSIGN_OR_RETURN(out[k], IntField(j, k, path));
  }
  return out;
}

// The model config from the Hugging Face fields alone (a checkpoint that did
// not come from this runtime), resolved with this runtime's defaults.
absl::StatusOr<JobConfig> JobFromHfFields(const JsonValue& j, HfFamily family, const std::string& path) {
  JobConfig job;
  config::ModelConfig* m = job.mutable_model();
  config::MoeConfig* moe = m->mutable_moe();
  ASSIGN_OR_RETURN(auto c, Counts(j, path,
                                  {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "num_experts_per_tok"}));
  m->set_vocab_size(c["vocab_size"]);
  m->set_hidden_size(c["hidden_size"]);
  m->set_num_layers(c["num_hidden_layers"]);
  m->set_num_heads(c["num_attention_heads"]);
  moe->set_top_k(c["num_experts_per_tok"]);
  for (const char* optional : {"num_key_value_heads", "head_dim", "max_position_embeddings"}) {
    if (j.Find(optional) == nullptr) continue;
    ASSIGN_OR_RETURN(c[optional], IntField(j, optional, path));
  }
  m->set_num_kv_heads(c.count("num_key_value_heads") ? c["num_key_value_heads"] : m->num_heads());
  if (c.count("head_dim") && (m->num_heads() == 0 || c["head_dim"] * m->num_heads() != m->hidden_size())) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": head_dim ", c["head_dim"], " x num_attention_heads ", m->num_heads(), " != hidden_size ",
        m->hidden_size(), "; this runtime needs head_dim = hidden_size / heads"));
  }
  if (c.count("max_position_embeddings"))
    m->set_seq_len(std::min<int64_t>(c["max_position_embeddings"], 4096));
  m->set_norm_eps(NumField(j, "rms_norm_eps", 1e-5));
  m->set_rope_theta(NumField(j, "rope_theta", 10000));
  m->set_init_std(NumField(j, "initializer_range", 0.02));
  m->set_tie_word_embeddings(BoolField(j, "tie_word_embeddings", false));
  moe->set_aux_loss_coeff(NumField(j, "router_aux_loss_coef", NumField(j, "aux_loss_alpha", 0.01)));
  switch (family) {
    case HfFamily::kMixtral: {
      ASSIGN_OR_RETURN(auto f, Counts(j, path, {"intermediate_size", "num_local_experts"}));
      moe->set_expert_ffn_hidden_size(f["intermediate_size"]);
      m->set_ffn_hidden_size(f["intermediate_size"]);
      moe->set_num_experts(f["num_local_experts"]);
      break;
    }
    case HfFamily::kQwen2Moe: {
      ASSIGN_OR_RETURN(
          auto f, Counts(j, path,
                         {"intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
                          "num_experts", "decoder_sparse_step"}));
      m->set_ffn_hidden_size(f["intermediate_size"]);
      moe->set_expert_ffn_hidden_size(f["moe_intermediate_size"]);
      moe->set_shared_expert_ffn_hidden_size(f["shared_expert_intermediate_size"]);
      moe->set_shared_expert_gate(f["shared_expert_intermediate_size"] > 0);
      moe->set_num_experts(f["num_experts"]);
      moe->set_moe_layer_freq(f["decoder_sparse_step"]);
      if (const JsonValue* o = j.Find("mlp_only_layers"); o != nullptr && !o->array.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat(path,
                         ": mlp_only_layers is not empty; this runtime places MoE layers by "
                         "decoder_sparse_step only"));
      }
      moe->set_norm_topk_prob(BoolField(j, "norm_topk_prob", false));
      break;
    }
    case HfFamily::kDeepseekV3: {
      ASSIGN_OR_RETURN(auto f, Counts(j, path,
                                      {"intermediate_size", "moe_intermediate_size", "n_routed_experts",
                                       "n_shared_experts", "first_k_dense_replace", "moe_layer_freq"}));
      m->set_ffn_hidden_size(f["intermediate_size"]);
      moe->set_expert_ffn_hidden_size(f["moe_intermediate_size"]);
      moe->set_num_experts(f["n_routed_experts"]);
      moe->set_shared_expert_ffn_hidden_size(f["n_shared_experts"] * f["moe_intermediate_size"]);
      if (f["first_k_dense_replace"] != 0 || f["moe_layer_freq"] != 1) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": first_k_dense_replace ", f["first_k_dense_replace"], ", moe_layer_freq ",
                         f["moe_layer_freq"],
                         ": this runtime imports DeepSeek-V3 models with every layer MoE (0 and 1) only"));
      }
      moe->set_score_function(StrField(j, "scoring_func").empty() ? "softmax" : StrField(j, "scoring_func"));
      moe->set_norm_topk_prob(BoolField(j, "norm_topk_prob", true));
      const int64_t groups = static_cast<int64_t>(NumField(j, "n_group", 1));
      if (groups > 1) {
        moe->set_num_expert_groups(groups);
        moe->set_group_topk(static_cast<int64_t>(NumField(j, "topk_group", 1)));
      }
      if (StrField(j, "topk_method") == "noaux_tc") moe->set_expert_bias_update_rate(0.001);
      if (BoolField(j, "seq_aux", false)) moe->set_aux_loss_type("sequence");
      break;
    }
  }
  ApplyDefaults(1, &job);
  return job;
}

// Every Hugging Face field the family's config.json has must agree with `m`.
absl::Status CheckHfFields(const JsonValue& j, const config::ModelConfig& m, HfFamily family,
                           const std::string& path) {
  const config::MoeConfig& moe = m.moe();
  std::vector<FieldCheck> checks = {{"vocab_size", m.vocab_size()},
                                    {"hidden_size", m.hidden_size()},
                                    {"num_hidden_layers", m.num_layers()},
                                    {"num_attention_heads", m.num_heads()},
                                    {"num_key_value_heads", m.num_kv_heads()},
                                    {"num_experts_per_tok", moe.top_k()}};
  switch (family) {
    case HfFamily::kMixtral:
      checks.push_back({"intermediate_size", moe.expert_ffn_hidden_size()});
      checks.push_back({"num_local_experts", moe.num_experts()});
      break;
    case HfFamily::kQwen2Moe:
      checks.push_back({"intermediate_size", m.ffn_hidden_size()});
      checks.push_back({"moe_intermediate_size", moe.expert_ffn_hidden_size()});
      checks.push_back({"shared_expert_intermediate_size", moe.shared_expert_ffn_hidden_size()});
      checks.push_back({"num_experts", moe.num_experts()});
      checks.push_back({"decoder_sparse_step", moe.moe_layer_freq()});
      break;
    case HfFamily::kDeepseekV3:
      checks.push_back({"intermediate_size", m.ffn_hidden_size()});
      checks.push_back({"moe_intermediate_size", moe.expert_ffn_hidden_size()});
      checks.push_back({"n_routed_experts", moe.num_experts()});
      break;
  }
  for (const FieldCheck& c : checks) {
    ASSIGN_OR_RETURN(int64_t v, IntField(j, c.hf, path));
    if (v != c.want) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": field \"", c.hf, "\" is ", v,
                                                     " but moe_runtime_config says ", c.want,
                                                     " (edit both, or remove moe_runtime_config)"));
    }
  }
  if (BoolField(j, "tie_word_embeddings", false) != m.tie_word_embeddings()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": field \"tie_word_embeddings\" disagrees with moe_runtime_config"));
  }
  return absl::OkStatus();
}

// ---- Reading a checkpoint's tensors whole ------------------------------------------

absl::StatusOr<std::vector<float>> ReadWhole(ShardReader& reader, const ckpt::TensorEntry& e) {
  Box whole;
  whole.count.assign(e.global_shape().begin(), e.global_shape().end());
  whole.offset.assign(whole.count.size(), 0);
  std::vector<float> out(static_cast<size_t>(whole.numel()));
  std::vector<float> buf;
  for (const ckpt::Shard& s : e.shards()) {
    const Box box{{s.offset().begin(), s.offset().end()}, {s.count().begin(), s.count().end()}};
    buf.resize(static_cast<size_t>(box.numel()));
    RETURN_IF_ERROR(reader.Read(e, s, buf.data()));
    CopyRegion(buf.data(), box, out.data(), whole, box, sizeof(float));
  }
  return out;
}

absl::Status FsyncPath(const std::string& path) { return CheckpointFs::Default()->SyncDir(path); }

}  // namespace

const char* HfFamilyName(HfFamily family) {
  switch (family) {
    case HfFamily::kMixtral:
      return "mixtral";
    case HfFamily::kQwen2Moe:
      return "qwen2_moe";
    case HfFamily::kDeepseekV3:
      return "deepseek_v3";
  }
  return "?";
}

std::vector<CanonicalTensor> CanonicalModelTensors(const config::ModelConfig& m) {
  const int64_t V = m.vocab_size(), d = m.hidden_size(), H = m.num_heads(), Hkv = m.num_kv_heads();
  const int64_t hd = d / H, F = m.ffn_hidden_size();
  const config::MoeConfig& moe = m.moe();
  const int64_t E = moe.num_experts(), Fe = moe.expert_ffn_hidden_size(),
                Fs = moe.shared_expert_ffn_hidden_size();
  std::vector<CanonicalTensor> t;
  t.push_back({"model.embed_tokens.weight", {V, d}});
  for (int l = 0; l < m.num_layers(); ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    t.push_back({p + "input_layernorm.weight", {d}});
    t.push_back({p + "self_attn.q_proj.weight", {H * hd, d}});
    t.push_back({p + "self_attn.k_proj.weight", {Hkv * hd, d}});
    t.push_back({p + "self_attn.v_proj.weight", {Hkv * hd, d}});
    t.push_back({p + "self_attn.o_proj.weight", {d, H * hd}});
    t.push_back({p + "post_attention_layernorm.weight", {d}});
    if (!IsMoeLayer(m, l)) {
      t.push_back({p + "mlp.gate_proj.weight", {F, d}});
      t.push_back({p + "mlp.up_proj.weight", {F, d}});
      t.push_back({p + "mlp.down_proj.weight", {d, F}});
      continue;
    }
    t.push_back({p + "mlp.router.weight", {E, d}});
    t.push_back({p + "mlp.experts.gate_proj", {E, Fe, d}});
    t.push_back({p + "mlp.experts.up_proj", {E, Fe, d}});
    t.push_back({p + "mlp.experts.down_proj", {E, d, Fe}});
    if (Fs > 0) {
      t.push_back({p + "mlp.shared_expert.gate_proj.weight", {Fs, d}});
      t.push_back({p + "mlp.shared_expert.up_proj.weight", {Fs, d}});
      t.push_back({p + "mlp.shared_expert.down_proj.weight", {d, Fs}});
      if (moe.shared_expert_gate()) t.push_back({p + "mlp.shared_expert_gate.weight", {1, d}});
    }
    if (HasBias(m)) t.push_back({p + "mlp.router.expert_bias", {E}});
  }
  t.push_back({"model.norm.weight", {d}});
  if (!m.tie_word_embeddings()) t.push_back({"lm_head.weight", {V, d}});
  return t;
}

absl::StatusOr<HfFamily> ChooseHfFamily(const config::ModelConfig& m) {
  const config::MoeConfig& moe = m.moe();
  const bool shared = moe.shared_expert_ffn_hidden_size() > 0;
  const bool deepseek = moe.score_function() == "sigmoid" || HasBias(m) || moe.group_topk() > 0 ||
                        (shared && !moe.shared_expert_gate());
  if (deepseek) {
    if (moe.moe_layer_freq() != 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "model.moe.moe_layer_freq = ", moe.moe_layer_freq(),
          " with DeepSeek-V3 routing (sigmoid scores, expert bias, groups or an ungated shared expert): "
          "DeepSeek-V3's config places MoE layers from first_k_dense_replace on, not every n-th; no Hugging "
          "Face family has this model"));
    }
    if (shared && moe.shared_expert_gate()) {
      return absl::InvalidArgumentError(
          "model.moe.shared_expert_gate = true with DeepSeek-V3 routing: DeepSeek-V3's shared experts have "
          "no gate and Qwen2-MoE has no sigmoid routing, expert bias or groups");
    }
    if (shared && moe.shared_expert_ffn_hidden_size() % moe.expert_ffn_hidden_size() != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "model.moe.shared_expert_ffn_hidden_size = ", moe.shared_expert_ffn_hidden_size(),
          " is not a multiple of expert_ffn_hidden_size = ", moe.expert_ffn_hidden_size(),
          ": DeepSeek-V3 gives the shared experts' width as n_shared_experts x moe_intermediate_size"));
    }
    return HfFamily::kDeepseekV3;
  }
  if (shared || moe.moe_layer_freq() != 1 || !moe.norm_topk_prob()) return HfFamily::kQwen2Moe;
  return HfFamily::kMixtral;
}

std::vector<HfTensor> HfTensors(const config::ModelConfig& m, HfFamily family) {
  const int64_t d = m.hidden_size(), H = m.num_heads(), Hkv = m.num_kv_heads(), hd = d / H;
  const config::MoeConfig& moe = m.moe();
  const int64_t E = moe.num_experts();
  std::vector<HfTensor> out;
  for (const CanonicalTensor& c : CanonicalModelTensors(m)) {
    const std::string& n = c.name;
    const size_t mlp = n.find(".mlp.");
    if (mlp == std::string::npos ||
        (!absl::StrContains(n, ".mlp.router") && !absl::StrContains(n, ".mlp.experts.") &&
         !absl::StrContains(n, ".mlp.shared_expert"))) {
      out.push_back({n, c.shape, n, 0, false});  // embeddings, attention, norms, dense MLP, head
      if (family == HfFamily::kQwen2Moe && absl::EndsWith(n, "_proj.weight") &&
          absl::StrContains(n, ".self_attn.") && !absl::StrContains(n, "o_proj")) {
        const int64_t rows = absl::StrContains(n, "q_proj") ? H * hd : Hkv * hd;
        out.push_back({n.substr(0, n.size() - 6) + "bias", {rows}, "", 0, false});
      }
      continue;
    }
    const std::string layer = n.substr(0, mlp);  // "model.layers.L"
    const std::string part = n.substr(mlp + 5);  // "router.weight", "experts.gate_proj", ...
    const std::string block = layer + (family == HfFamily::kMixtral ? ".block_sparse_moe." : ".mlp.");
    if (part == "router.weight") {
      out.push_back({block + "gate.weight", c.shape, n, 0, false});
    } else if (part == "router.expert_bias") {
      out.push_back({block + "gate.e_score_correction_bias", c.shape, n, 0, true});
    } else if (absl::StartsWith(part, "experts.")) {
      const std::string proj = part.substr(8);  // gate_proj, up_proj, down_proj
      std::string hf = proj;
      if (family == HfFamily::kMixtral) hf = proj == "gate_proj" ? "w1" : proj == "up_proj" ? "w3" : "w2";
      const Dims shape(c.shape.begin() + 1, c.shape.end());
      for (int64_t e = 0; e < E; ++e) {
        out.push_back(
            {absl::StrCat(block, "experts.", e, ".", hf, ".weight"), shape, n, e * Numel(shape), false});
      }
    } else if (absl::StartsWith(part, "shared_expert.")) {
      const std::string rest = part.substr(14);
      out.push_back({block + (family == HfFamily::kDeepseekV3 ? "shared_experts." : "shared_expert.") + rest,
                     c.shape, n, 0, false});
    } else {  // shared_expert_gate.weight
      out.push_back({block + part, c.shape, n, 0, false});
    }
  }
  // Qwen2-MoE always has a shared expert and its gate: zero-sized / zero ones
  // for a model without.
  if (family == HfFamily::kQwen2Moe && moe.shared_expert_ffn_hidden_size() == 0) {
    for (int l = 0; l < m.num_layers(); ++l) {
      if (!IsMoeLayer(m, l)) continue;
      const std::string b = absl::StrCat("model.layers.", l, ".mlp.");
      out.push_back({b + "shared_expert.gate_proj.weight", {0, d}, "", 0, false});
      out.push_back({b + "shared_expert.up_proj.weight", {0, d}, "", 0, false});
      out.push_back({b + "shared_expert.down_proj.weight", {d, 0}, "", 0, false});
      out.push_back({b + "shared_expert_gate.weight", {1, d}, "", 0, false});
    }
  }
  return out;
}

absl::StatusOr<HfExportReport> ExportHf(const std::string& ckpt_dir, const std::string& out_dir,
                                        const HfExportOptions& options) {
  if (options.dtype != "F32" && options.dtype != "BF16") {
    return absl::InvalidArgumentError(absl::StrCat("--dtype ", options.dtype, ": use fp32 or bf16"));
  }
  ASSIGN_OR_RETURN(ckpt::Manifest manifest, ReadManifest(ckpt_dir));
  RETURN_IF_ERROR(ValidateManifest(manifest, ckpt_dir));
  ASSIGN_OR_RETURN(JobConfig job, ParseConfigText(manifest.config_text(), ckpt_dir + "/manifest.pb config"));
  const config::ModelConfig& model = job.model();
  ASSIGN_OR_RETURN(HfFamily family, ChooseHfFamily(model));
  const std::vector<HfTensor> hf = HfTensors(model, family);

  // Every checkpoint tensor: a model tensor (by the mapping), or optimizer
  // state (with train_state); anything else stops the export.
  std::map<std::string, const ckpt::TensorEntry*> entries;
  for (const ckpt::TensorEntry& e : manifest.tensors()) entries[e.name()] = &e;
  std::set<std::string> model_names;
  for (const CanonicalTensor& c : CanonicalModelTensors(model)) {
    auto it = entries.find(c.name);
    if (it == entries.end()) {
      return absl::DataLossError(
          absl::StrCat(ckpt_dir, ": tensor ", c.name, " of the model config is missing"));
    }
    const Dims shape(it->second->global_shape().begin(), it->second->global_shape().end());
    if (shape != c.shape) {
      return absl::DataLossError(absl::StrCat(ckpt_dir, ": tensor ", c.name, " has shape ", DimsText(shape),
                                              ", the model config gives ", DimsText(c.shape)));
    }
    model_names.insert(c.name);
  }
  std::vector<const ckpt::TensorEntry*> extra;
  for (const ckpt::TensorEntry& e : manifest.tensors()) {
    if (model_names.count(e.name())) continue;
    if (!absl::StartsWith(e.name(), "optimizer/")) {
      return absl::FailedPreconditionError(
          absl::StrCat(ckpt_dir, ": tensor ", e.name(), " has no Hugging Face name (not exported)"));
    }
    extra.push_back(&e);
  }

  // Output: a temporary sibling, renamed into place at the end.
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::exists(out_dir, ec) && !(fs::is_directory(out_dir, ec) && fs::is_empty(out_dir, ec))) {
    return absl::AlreadyExistsError(
        absl::StrCat(out_dir, " exists and is not an empty directory; give a new one"));
  }
  const std::string tmp = absl::StrCat(out_dir, ".tmp-", ::getpid());
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  if (ec) return absl::UnavailableError(absl::StrCat("cannot create ", tmp, ": ", ec.message()));
  auto cleanup = [&](absl::Status s) {
    std::error_code ignored;
    fs::remove_all(tmp, ignored);
    return s;
  };

  ShardReader reader(ckpt_dir);
  std::map<std::string, std::vector<float>> values;
  for (const std::string& name : model_names) {
    absl::StatusOr<std::vector<float>> v = ReadWhole(reader, *entries[name]);
    if (!v.ok()) return cleanup(v.status());
    values[name] = std::move(*v);
  }
  const std::vector<float> zeros_storage(
      [&] {
        size_t n = 0;
        for (const HfTensor& t : hf)
          if (t.canonical.empty()) n = std::max<size_t>(n, static_cast<size_t>(Numel(t.hf_shape)));
        return n;
      }(),
      0.0f);

  // Shards: in mapping order, a new file when the next tensor would pass the limit.
  std::vector<std::vector<SafetensorsTensorOut>> files(1);
  std::vector<uint64_t> file_bytes(1, 0);
  uint64_t total = 0;
  for (const HfTensor& t : hf) {
    SafetensorsTensorOut o;
    o.name = t.hf_name;
    o.dtype = t.always_f32 ? "F32" : options.dtype;
    o.shape = t.hf_shape;
    o.data = t.canonical.empty() ? zeros_storage.data() : values[t.canonical].data() + t.offset;
    const uint64_t bytes = SafetensorsDataBytes(o);
    if (!files.back().empty() && file_bytes.back() + bytes > options.max_shard_bytes) {
      files.emplace_back();
      file_bytes.push_back(0);
    }
    files.back().push_back(o);
    file_bytes.back() += bytes;
    total += bytes;
  }
  HfExportReport report;
  report.family = family;
  report.tensors = static_cast<int64_t>(hf.size());
  report.bytes = static_cast<int64_t>(total);
  const std::vector<std::pair<std::string, std::string>> meta = {{"format", "pt"}};
  const int n = static_cast<int>(files.size());
  std::string weight_map;
  for (int i = 0; i < n; ++i) {
    const std::string name =
        n == 1 ? std::string(kHfSingleFile) : absl::StrFormat("model-%05d-of-%05d.safetensors", i + 1, n);
    if (absl::Status s = WriteSafetensors(JoinPath(tmp, name), files[i], meta); !s.ok()) return cleanup(s);
    report.files.push_back(name);
    for (const SafetensorsTensorOut& o : files[i]) {
      absl::StrAppend(&weight_map, weight_map.empty() ? "" : ",\n", "    \"", JsonEscape(o.name), "\": \"",
                      name, "\"");
    }
  }
  CheckpointFs* cfs = CheckpointFs::Default();
  if (n > 1) {
    const std::string index = absl::StrCat("{\n  \"metadata\": {\"total_size\": ", total,
                                           "},\n  \"weight_map\": {\n", weight_map, "\n  }\n}\n");
    if (absl::Status s = cfs->WriteFile(JoinPath(tmp, kHfIndexFile), index); !s.ok()) return cleanup(s);
    report.files.push_back(kHfIndexFile);
  }
  if (absl::Status s = cfs->WriteFile(JoinPath(tmp, kHfConfigFile),
                                      HfConfigJson(model, family, options.dtype, manifest.config_text()));
      !s.ok()) {
    return cleanup(s);
  }
  report.files.push_back(kHfConfigFile);
  if (options.train_state) {
    std::vector<std::vector<float>> opt_values;
    std::vector<SafetensorsTensorOut> opt;
    for (const ckpt::TensorEntry* e : extra) {
      absl::StatusOr<std::vector<float>> v = ReadWhole(reader, *e);
      if (!v.ok()) return cleanup(v.status());
      opt_values.push_back(std::move(*v));
    }
    for (size_t i = 0; i < extra.size(); ++i) {
      opt.push_back({extra[i]->name(), "F32",
                     Dims(extra[i]->global_shape().begin(), extra[i]->global_shape().end()),
                     opt_values[i].data()});
    }
    std::string state_text;
    google::protobuf::TextFormat::PrintToString(manifest.train(), &state_text);
    const std::vector<std::pair<std::string, std::string>> tmeta = {
        {"format", "pt"},
        {"moe.step", absl::StrCat(manifest.step())},
        {"moe.train_state", state_text},
        {"moe.config", manifest.config_text()}};
    if (absl::Status s = WriteSafetensors(JoinPath(tmp, kHfTrainStateFile), opt, tmeta); !s.ok())
      return cleanup(s);
    report.files.push_back(kHfTrainStateFile);
  } else if (!extra.empty()) {
    // Optimizer state stays behind: said in the report, not an error.
  }
  if (absl::Status s = FsyncPath(tmp); !s.ok()) return cleanup(s);
  if (fs::exists(out_dir, ec)) fs::remove(out_dir, ec);  // empty (checked above)
  fs::rename(tmp, out_dir, ec);
  if (ec)
    return cleanup(
        absl::UnavailableError(absl::StrCat("cannot rename ", tmp, " to ", out_dir, ": ", ec.message())));
  const std::string parent = fs::path(out_dir).parent_path().string();
  FsyncPath(parent.empty() ? "." : parent).IgnoreError();
  return report;
}

absl::StatusOr<HfImported> ReadHf(const std::string& dir) {
  const std::string config_path = JoinPath(dir, kHfConfigFile);
  ASSIGN_OR_RETURN(JsonValue cj, ReadJsonFile(config_path));
  const std::string model_type = StrField(cj, "model_type");
  HfImported out;
  if (model_type == "mixtral") {
    out.family = HfFamily::kMixtral;
  } else if (model_type == "qwen2_moe") {
    out.family = HfFamily::kQwen2Moe;
  } else if (model_type == "deepseek_v3") {
    out.family = HfFamily::kDeepseekV3;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": model_type \"", model_type,
                                                   "\" is not one this runtime imports (mixtral, qwen2_moe, "
                                                   "deepseek_v3)"));
  }
  JobConfig job;
  const std::string runtime_text = StrField(cj, "moe_runtime_config");
  if (!runtime_text.empty()) {
    absl::StatusOr<JobConfig> parsed = ParseConfigText(runtime_text, config_path + " moe_runtime_config");
    if (!parsed.ok()) return absl::InvalidArgumentError(parsed.status().message());
    job = std::move(*parsed);
    ApplyDefaults(1, &job);
    RETURN_IF_ERROR(CheckHfFields(cj, job.model(), out.family, config_path));
    out.config_text = runtime_text;
  } else {
    ASSIGN_OR_RETURN(job, JobFromHfFields(cj, out.family, config_path));
    out.config_text = ConfigToText(job);
  }
  const config::ModelConfig& model = job.model();
  if (model.num_heads() <= 0 || model.hidden_size() % model.num_heads() != 0 || model.num_kv_heads() <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": hidden_size ", model.hidden_size(),
                                                   " is not a multiple of num_attention_heads ",
                                                   model.num_heads()));
  }
  ASSIGN_OR_RETURN(HfFamily chosen, ChooseHfFamily(model));
  if ((chosen == HfFamily::kDeepseekV3 || out.family == HfFamily::kMixtral) && chosen != out.family) {
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": model_type ", model_type,
                                                   " does not fit the model's features (they need ",
                                                   HfFamilyName(chosen), ")"));
  }
  const std::vector<HfTensor> hf = HfTensors(model, out.family);
  std::map<std::string, const HfTensor*> by_name;
  for (const HfTensor& t : hf) by_name[t.hf_name] = &t;
  out.shapes = CanonicalModelTensors(model);
  std::map<std::string, size_t> canon_index;
  for (size_t i = 0; i < out.shapes.size(); ++i) {
    canon_index[out.shapes[i].name] = i;
    out.data.emplace_back(static_cast<size_t>(Numel(out.shapes[i].shape)), 0.0f);
  }

  // The files: the index's, or the single file.
  std::vector<std::string> files;
  std::map<std::string, std::string> index_file_of;  // tensor -> file the index names
  const std::string index_path = JoinPath(dir, kHfIndexFile);
  if (CheckpointFs::Default()->Exists(index_path)) {
    ASSIGN_OR_RETURN(JsonValue ij, ReadJsonFile(index_path));
    const JsonValue* wm = ij.Find("weight_map");
    if (wm == nullptr || wm->kind != JsonValue::Kind::kObject) {
      return absl::DataLossError(absl::StrCat(index_path, ": no \"weight_map\" object"));
    }
    std::set<std::string> seen;
    for (const auto& [tensor, file] : wm->object) {
      if (file.kind != JsonValue::Kind::kString || file.string.empty() ||
          file.string.find('/') != std::string::npos || file.string == "..") {
        return absl::DataLossError(
            absl::StrCat(index_path, ": tensor \"", tensor, "\": the file is not a plain file name"));
      }
      index_file_of[tensor] = file.string;
      if (seen.insert(file.string).second) files.push_back(file.string);
    }
  } else {
    files.push_back(kHfSingleFile);
  }
  std::set<std::string> found;
  for (const std::string& f : files) {
    const std::string path = JoinPath(dir, f);
    ASSIGN_OR_RETURN(SafetensorsReader r, SafetensorsReader::Open(path));
    out.files.push_back(f);
    for (const SafetensorsEntry& e : r.header().tensors) {
      auto it = by_name.find(e.name);
      if (it == by_name.end()) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": tensor \"", e.name, "\" is not part of a ",
                                                       HfFamilyName(out.family),
                                                       " model with this config.json"));
      }
      const HfTensor& t = *it->second;
      if (!index_file_of.empty() && index_file_of[e.name] != f) {
        return absl::DataLossError(
            absl::StrCat(path, ": tensor \"", e.name, "\" is in this file, the index says ",
                         index_file_of[e.name].empty() ? "nothing" : index_file_of[e.name]));
      }
      if (!found.insert(e.name).second) {
        return absl::DataLossError(absl::StrCat(path, ": tensor \"", e.name, "\" appears in two files"));
      }
      if (e.shape != t.hf_shape) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": tensor \"", e.name, "\" has shape ",
                                                       DimsText(e.shape), ", config.json gives ",
                                                       DimsText(t.hf_shape)));
      }
      ASSIGN_OR_RETURN(std::vector<float> v, r.ReadF32(e));
      if (t.canonical.empty()) {
        for (float x : v) {
          if (x != 0.0f) {
            return absl::InvalidArgumentError(absl::StrCat(
                path, ": tensor \"", e.name, "\" is not zero; this runtime's model has no such tensor ",
                "(no attention biases, no shared expert)"));
          }
        }
        continue;
      }
      std::vector<float>& dst = out.data[canon_index[t.canonical]];
      std::copy(v.begin(), v.end(), dst.begin() + t.offset);
    }
  }
  std::vector<std::string> missing;
  for (const HfTensor& t : hf) {
    if (!found.count(t.hf_name) && !t.canonical.empty()) missing.push_back(t.hf_name);
    if (missing.size() >= 5) break;
  }
  if (!missing.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(dir, ": tensors of the config's model are missing: ", absl::StrJoin(missing, ", "),
                     missing.size() >= 5 ? ", ..." : ""));
  }
  for (const auto& [tensor, file] : index_file_of) {
    if (!found.count(tensor)) {
      return absl::DataLossError(absl::StrCat(index_path, ": tensor \"", tensor, "\" is not in ", file));
    }
  }

  // The train state, when the export kept it.
  out.state.sampler_state = {0, 0};
  out.state.int_values["optimizer.step"] = 0;
  const std::string state_path = JoinPath(dir, kHfTrainStateFile);
  if (CheckpointFs::Default()->Exists(state_path)) {
    ASSIGN_OR_RETURN(SafetensorsReader r, SafetensorsReader::Open(state_path));
    out.files.push_back(kHfTrainStateFile);
    ckpt::TrainState proto;
    if (!google::protobuf::TextFormat::ParseFromString(r.header().Metadata("moe.train_state"), &proto)) {
      return absl::DataLossError(absl::StrCat(state_path, ": metadata moe.train_state does not parse"));
    }
    out.state = TrainStateFromProto(proto);
    const std::string step = r.header().Metadata("moe.step");
    if (!absl::SimpleAtoi(step, &out.state.step) || out.state.step < 0) {
      return absl::DataLossError(
          absl::StrCat(state_path, ": metadata moe.step \"", step, "\" is not a step"));
    }
    out.config_text = r.header().Metadata("moe.config");
    absl::StatusOr<JobConfig> saved = ParseConfigText(out.config_text, state_path + " moe.config");
    if (!saved.ok()) return absl::DataLossError(saved.status().message());
    std::map<std::string, Dims> param_shape;
    for (const CanonicalTensor& c : out.shapes) param_shape[c.name] = c.shape;
    for (const SafetensorsEntry& e : r.header().tensors) {
      // optimizer/<state>/<parameter>, with the parameter's shape.
      const size_t slash = e.name.find('/', 10);
      const std::string param = slash == std::string::npos ? "" : e.name.substr(slash + 1);
      auto it = param_shape.find(param);
      if (!absl::StartsWith(e.name, "optimizer/") || it == param_shape.end()) {
        return absl::InvalidArgumentError(absl::StrCat(
            state_path, ": tensor \"", e.name, "\" is not optimizer/<state>/<parameter of the model>"));
      }
      if (e.shape != it->second) {
        return absl::InvalidArgumentError(absl::StrCat(state_path, ": tensor \"", e.name, "\" has shape ",
                                                       DimsText(e.shape), ", its parameter ",
                                                       DimsText(it->second)));
      }
      ASSIGN_OR_RETURN(std::vector<float> v, r.ReadF32(e));
      out.shapes.push_back({e.name, e.shape});
      out.data.push_back(std::move(v));
    }
    out.with_train_state = true;
  } else {
    // A fresh optimizer for the config's optim.type: its state is all zeros
    // (AdamW's moments, SGD's momentum buffer), so the checkpoint is what a
    // run saves at step 0 and `train.resume` loads it as it is.
    std::vector<std::string> states;
    if (job.optim().type() == "adamw") {
      states = {"exp_avg", "exp_avg_sq"};
    } else if (job.optim().momentum() > 0) {
      states = {"momentum_buffer"};
    }
    const size_t num_model = out.shapes.size();
    for (const std::string& state : states) {
      for (size_t i = 0; i < num_model; ++i) {
        if (absl::EndsWith(out.shapes[i].name, ".expert_bias")) continue;  // state, not a parameter
        out.shapes.push_back({OptimizerStateName(state, out.shapes[i].name), out.shapes[i].shape});
        out.data.emplace_back(out.data[i].size(), 0.0f);
      }
    }
  }
  return out;
}

}  // namespace moe
