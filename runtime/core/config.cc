#include "runtime/core/config.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"
#include "runtime/core/status.h"

namespace moe {
namespace {

namespace pb = google::protobuf;

class CollectingErrors : public pb::io::ErrorCollector {
 public:
  explicit CollectingErrors(absl::string_view source) : source_(source) {}
  void AddError(int line, pb::io::ColumnNumber column, const std::string& message) override {
    errors_.push_back(absl::StrCat(source_, ":", line + 1, ":", column + 1, ": ", message));
  }
  void AddWarning(int line, pb::io::ColumnNumber column, const std::string& message) override {
    AddError(line, column, message);
  }
  const std::vector<std::string>& errors() const { return errors_; }

 private:
  std::string source_;
  std::vector<std::string> errors_;
};

}  // namespace

absl::StatusOr<JobConfig> ParseConfigText(absl::string_view text, absl::string_view source) {
  JobConfig config;
  CollectingErrors errors(source);
  pb::TextFormat::Parser parser;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(std::string(text), &config)) {
    std::string message = errors.errors().empty() ? absl::StrCat(source, ": cannot parse the config")
                                                  : absl::StrJoin(errors.errors(), "\n");
    return absl::InvalidArgumentError(message);
  }
  return config;
}

absl::StatusOr<JobConfig> LoadConfigFile(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--config='", path,
                     "' is a directory; give the job's .textproto file (e.g. configs/demo.textproto)"));
  }
  std::ifstream in(path);
  if (!in) {
    return absl::NotFoundError(
        absl::StrCat("cannot open config file '", path, "': check the path given to --config"));
  }
  std::stringstream buffer;
  buffer << in.rdbuf();
  if (in.bad()) {
    return absl::DataLossError(absl::StrCat("cannot read config file '", path, "'"));
  }
  const std::string text = buffer.str();
  if (absl::StripAsciiWhitespace(text).empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("config file '", path,
                     "' is empty; a job needs at least data.train_path (see configs/demo.textproto)"));
  }
  return ParseConfigText(text, path);
}

absl::Status ApplyOverride(absl::string_view assignment, JobConfig* config) {
  size_t eq = assignment.find('=');
  if (eq == absl::string_view::npos || eq == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "override '", assignment, "' is not of the form field.path=value (e.g. train.steps=10)"));
  }
  std::string path(absl::StripAsciiWhitespace(assignment.substr(0, eq)));
  std::string value(absl::StripAsciiWhitespace(assignment.substr(eq + 1)));
  std::vector<std::string> parts = absl::StrSplit(path, '.');

  pb::Message* message = config;
  std::string walked;
  for (size_t i = 0; i < parts.size(); ++i) {
    const pb::Descriptor* desc = message->GetDescriptor();
    const pb::FieldDescriptor* field = desc->FindFieldByName(parts[i]);
    std::string here = walked.empty() ? parts[i] : absl::StrCat(walked, ".", parts[i]);
    if (field == nullptr) {
      std::vector<std::string> names;
      for (int f = 0; f < desc->field_count(); ++f) names.push_back(desc->field(f)->name());
      return absl::InvalidArgumentError(
          absl::StrCat("override '", assignment, "': ", walked.empty() ? "the config" : walked,
                       " has no field '", parts[i], "' (fields: ", absl::StrJoin(names, ", "), ")"));
    }
    const pb::Reflection* refl = message->GetReflection();
    bool last = i + 1 == parts.size();
    if (field->type() == pb::FieldDescriptor::TYPE_MESSAGE) {
      if (last) {
        return absl::InvalidArgumentError(absl::StrCat("override '", assignment, "': ", here,
                                                       " is a message, not a scalar; set one of its fields (",
                                                       here, ".NAME=value)"));
      }
      message = refl->MutableMessage(message, field);
      walked = here;
      continue;
    }
    if (!last) {
      return absl::InvalidArgumentError(
          absl::StrCat("override '", assignment, "': ", here, " is a scalar and has no fields"));
    }
    auto bad_value = [&](absl::string_view type) {
      return absl::InvalidArgumentError(
          absl::StrCat("override '", assignment, "': ", here, " takes ", type, ", not '", value, "'"));
    };
    switch (field->cpp_type()) {
      case pb::FieldDescriptor::CPPTYPE_INT32: {
        int32_t v;
        if (!absl::SimpleAtoi(value, &v)) return bad_value("an integer");
        refl->SetInt32(message, field, v);
        break;
      }
      case pb::FieldDescriptor::CPPTYPE_INT64: {
        int64_t v;
        if (!absl::SimpleAtoi(value, &v)) return bad_value("an integer");
        refl->SetInt64(message, field, v);
        break;
      }
      case pb::FieldDescriptor::CPPTYPE_UINT32: {
        uint32_t v;
        if (!absl::SimpleAtoi(value, &v)) return bad_value("a non-negative integer");
        refl->SetUInt32(message, field, v);
        break;
      }
      case pb::FieldDescriptor::CPPTYPE_UINT64: {
        uint64_t v;
        if (!absl::SimpleAtoi(value, &v)) return bad_value("a non-negative integer");
        refl->SetUInt64(message, field, v);
        break;
      }
      case pb::FieldDescriptor::CPPTYPE_DOUBLE: {
        double v;
        if (!absl::SimpleAtod(value, &v)) return bad_value("a number");
        refl->SetDouble(message, field, v);
        break;
      }
      case pb::FieldDescriptor::CPPTYPE_FLOAT: {
        float v;
        if (!absl::SimpleAtof(value, &v)) return bad_value("a number");
        refl->SetFloat(message, field, v);
        break;
      }
      case pb::FieldDescriptor::CPPTYPE_BOOL: {
        bool v;
        if (!absl::SimpleAtob(value, &v)) return bad_value("true or false");
        refl->SetBool(message, field, v);
        break;
      }
      case pb::FieldDescriptor::CPPTYPE_STRING: {
        if (value.size() >= 2 && (value.front() == '"' || value.front() == '\'') &&
            value.back() == value.front()) {
          value = value.substr(1, value.size() - 2);
        }
        refl->SetString(message, field, value);
        break;
      }
      default:
        return absl::InvalidArgumentError(
            absl::StrCat("override '", assignment, "': ", here, " cannot be set from the command line"));
    }
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat("override '", assignment, "': empty field path"));
}

absl::Status ApplyOverrides(const std::vector<std::string>& assignments, JobConfig* config) {
  std::vector<std::string> errors;
  for (const std::string& a : assignments) {
    absl::Status s = ApplyOverride(a, config);
    if (!s.ok()) errors.push_back(std::string(s.message()));
  }
  if (errors.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrJoin(errors, "\n"));
}

#define MOE_DEFAULT(msg, field, value) \
  if (!(msg)->has_##field()) (msg)->set_##field(value)

void ApplyDefaults(int world_size, JobConfig* c) {
  config::ModelConfig* m = c->mutable_model();
  MOE_DEFAULT(m, vocab_size, 257);
  MOE_DEFAULT(m, hidden_size, 128);
  MOE_DEFAULT(m, num_layers, 4);
  MOE_DEFAULT(m, num_heads, 4);
  MOE_DEFAULT(m, num_kv_heads, m->num_heads());
  MOE_DEFAULT(m, ffn_hidden_size, 4 * m->hidden_size());
  MOE_DEFAULT(m, seq_len, 128);
  MOE_DEFAULT(m, norm_eps, 1e-5);
  MOE_DEFAULT(m, rope_theta, 10000.0);
  MOE_DEFAULT(m, init_std, 0.02);
  MOE_DEFAULT(m, tie_word_embeddings, false);
  config::MoeConfig* moe = m->mutable_moe();
  MOE_DEFAULT(moe, num_experts, 8);
  MOE_DEFAULT(moe, top_k, 2);
  MOE_DEFAULT(moe, expert_ffn_hidden_size, m->ffn_hidden_size());
  MOE_DEFAULT(moe, moe_layer_freq, 1);
  MOE_DEFAULT(moe, capacity_factor, 0.0);
  MOE_DEFAULT(moe, drop_policy, "probs");
  MOE_DEFAULT(moe, norm_topk_prob, true);
  MOE_DEFAULT(moe, aux_loss_coeff, 0.01);
  MOE_DEFAULT(moe, z_loss_coeff, 0.001);
  MOE_DEFAULT(moe, experts_impl, "grouped");
  MOE_DEFAULT(moe, score_function, "softmax");
  MOE_DEFAULT(moe, expert_bias_update_rate, 0.0);
  MOE_DEFAULT(moe, group_topk, 0);
  MOE_DEFAULT(moe, aux_loss_type, "batch");
  MOE_DEFAULT(moe, shared_expert_ffn_hidden_size, 0);
  MOE_DEFAULT(moe, shared_expert_gate, false);
  MOE_DEFAULT(moe, erc_loss_coeff, 0.0);
  MOE_DEFAULT(moe, erc_alpha, 1.0);
  config::ForcedRouting* fr = moe->mutable_forced_routing();
  MOE_DEFAULT(fr, fraction, 0.0);
  MOE_DEFAULT(fr, hot_experts, 1);
  MOE_DEFAULT(fr, seed, 1234);
  MOE_DEFAULT(fr, first_hot_expert, 0);

  config::ParallelConfig* p = c->mutable_parallel();
  MOE_DEFAULT(p, tensor, 1);
  MOE_DEFAULT(p, expert, 1);
  if (!p->has_data() || p->data() == 0) {
    p->set_data(p->tensor() > 0 && world_size % p->tensor() == 0 ? world_size / p->tensor() : 0);
  }
  MOE_DEFAULT(p, overlap_chunks, 1);
  // One expert group per EP rank unless set (only group-limited routing reads it).
  if (!moe->has_num_expert_groups() || moe->num_expert_groups() == 0) {
    moe->set_num_expert_groups(moe->group_topk() > 0 ? p->expert() : 1);
  }
  MOE_DEFAULT(p, grad_bucket_mb, 25.0);

  config::LlepConfig* l = c->mutable_llep();
  MOE_DEFAULT(l, enabled, false);
  MOE_DEFAULT(l, trigger_ratio, 1.3);
  MOE_DEFAULT(l, capacity_factor, 1.0);
  MOE_DEFAULT(l, min_tokens_per_gemm, 1024);
  MOE_DEFAULT(l, max_borrowed_experts, 0);
  MOE_DEFAULT(l, cost_model, true);
  MOE_DEFAULT(l, gemm_gflops, 0.0);
  MOE_DEFAULT(l, p2p_gbps, 0.0);

  config::TrainConfig* t = c->mutable_train();
  MOE_DEFAULT(t, seed, 1234);
  MOE_DEFAULT(t, steps, 100);
  MOE_DEFAULT(t, micro_batch, 4);
  MOE_DEFAULT(t, grad_accum, 1);
  MOE_DEFAULT(t, eval_every, 0);
  MOE_DEFAULT(t, eval_batches, 4);
  MOE_DEFAULT(t, log_every, 10);
  MOE_DEFAULT(t, run_dir, "runs/default");
  MOE_DEFAULT(t, device, "cpu");
  MOE_DEFAULT(t, precision, "fp32");
  MOE_DEFAULT(t, resume, "auto");
  MOE_DEFAULT(t, threads_per_rank, 0);

  config::OptimConfig* o = c->mutable_optim();
  MOE_DEFAULT(o, type, "adamw");
  MOE_DEFAULT(o, lr, 3e-4);
  MOE_DEFAULT(o, min_lr, 0.1 * o->lr());
  MOE_DEFAULT(o, beta1, 0.9);
  MOE_DEFAULT(o, beta2, 0.95);
  MOE_DEFAULT(o, eps, 1e-8);
  MOE_DEFAULT(o, weight_decay, 0.1);
  MOE_DEFAULT(o, decay_norms_and_embeddings, false);
  MOE_DEFAULT(o, momentum, 0.0);
  MOE_DEFAULT(o, clip_grad, 1.0);
  MOE_DEFAULT(o, warmup_steps, 0);
  MOE_DEFAULT(o, lr_schedule, "cosine");
  // train.steps = 0 trains nothing (it saves the initial model): the schedule
  // is never evaluated, so its default only has to be valid.
  MOE_DEFAULT(o, decay_steps, t->steps() > 0 ? t->steps() : o->warmup_steps() + 1);
  MOE_DEFAULT(o, shard_state, false);

  config::DataConfig* d = c->mutable_data();
  MOE_DEFAULT(d, train_path, "");
  MOE_DEFAULT(d, valid_path, "");
  MOE_DEFAULT(d, format, "megatron");
  MOE_DEFAULT(d, valid_fraction, 0.05);
  MOE_DEFAULT(d, shuffle, true);
  MOE_DEFAULT(d, hdf5_dataset, "tokens");

  config::CheckpointConfig* k = c->mutable_checkpoint();
  MOE_DEFAULT(k, dir, "");
  MOE_DEFAULT(k, save_every, 0);
  MOE_DEFAULT(k, keep_last, 0);
  MOE_DEFAULT(k, async, false);
  MOE_DEFAULT(k, host_bucket_mb, 256);

  config::CommConfig* cm = c->mutable_comm();
  MOE_DEFAULT(cm, timeout_s, 600.0);
  MOE_DEFAULT(cm, backend, "auto");

  config::ProfileConfig* pr = c->mutable_profile();
  MOE_DEFAULT(pr, trace, false);
  MOE_DEFAULT(pr, trace_dir, t->run_dir() + "/trace");
  MOE_DEFAULT(pr, trace_steps, 5);
  MOE_DEFAULT(pr, trace_start, 1);
}

#undef MOE_DEFAULT

std::string ConfigToText(const JobConfig& config) {
  std::string out;
  pb::TextFormat::Printer printer;
  printer.PrintToString(config, &out);
  return out;
}

bool IsMoeLayer(const config::ModelConfig& model, int layer) {
  int n = model.moe().moe_layer_freq();
  if (n <= 0) return false;
  return layer % n == n - 1;
}

}  // namespace moe
