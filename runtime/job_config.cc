#include "runtime/job_config.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "comm/communicator.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/text_format.h"
#include "model/common.h"
#include "runtime/core/backend.h"
#include "runtime/core/device_select.h"
#include "runtime/core/status.h"

namespace moe {
namespace {

namespace pb = google::protobuf;

// Every set floating-point field of `message` (recursively) that is NaN or
// infinite: no setting of this config means anything when it is not finite,
// and a NaN slips through every range check (NaN > 0 and NaN <= 0 are false).
void NonFiniteFields(const pb::Message& message, const std::string& prefix, std::vector<std::string>* e) {
  const pb::Descriptor* desc = message.GetDescriptor();
  const pb::Reflection* refl = message.GetReflection();
  for (int i = 0; i < desc->field_count(); ++i) {
    const pb::FieldDescriptor* f = desc->field(i);
    if (f->is_repeated() || !refl->HasField(message, f)) continue;
    const std::string name = prefix.empty() ? f->name() : absl::StrCat(prefix, ".", f->name());
    double v = 0;
    switch (f->cpp_type()) {
      case pb::FieldDescriptor::CPPTYPE_MESSAGE:
        NonFiniteFields(refl->GetMessage(message, f), name, e);
        continue;
      case pb::FieldDescriptor::CPPTYPE_DOUBLE:
        v = refl->GetDouble(message, f);
        break;
      case pb::FieldDescriptor::CPPTYPE_FLOAT:
        v = refl->GetFloat(message, f);
        break;
      default:
        continue;
    }
    if (!std::isfinite(v)) {
      e->push_back(absl::StrCat(name, " = ", v, " must be a finite number; remove it to get the default"));
    }
  }
}

void Flatten(const pb::Message& message, const std::string& prefix, std::vector<std::string>* out) {
  const pb::Descriptor* desc = message.GetDescriptor();
  const pb::Reflection* refl = message.GetReflection();
  for (int i = 0; i < desc->field_count(); ++i) {
    const pb::FieldDescriptor* f = desc->field(i);
    const std::string name = prefix.empty() ? f->name() : absl::StrCat(prefix, ".", f->name());
    if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE && !f->is_repeated()) {
      Flatten(refl->GetMessage(message, f), name, out);
      continue;
    }
    std::string value;
    if (f->is_repeated()) {
      const int n = refl->FieldSize(message, f);
      for (int j = 0; j < n; ++j) {
        std::string one;
        pb::TextFormat::PrintFieldValueToString(message, f, j, &one);
        absl::StrAppend(&value, j > 0 ? ", " : "", one);
      }
      value = absl::StrCat("[", value, "]");
    } else if (refl->HasField(message, f)) {
      pb::TextFormat::PrintFieldValueToString(message, f, -1, &value);
    } else {
      value = "(unset)";
    }
    out->push_back(absl::StrCat(name, ": ", value));
  }
}

// "rank 3", "ranks 0-2", "ranks 0, 2, 5-7".
std::string FormatRanks(const std::vector<int>& ranks) {
  std::vector<std::string> parts;
  for (size_t i = 0; i < ranks.size();) {
    size_t j = i;
    while (j + 1 < ranks.size() && ranks[j + 1] == ranks[j] + 1) ++j;
    parts.push_back(j == i ? absl::StrCat(ranks[i]) : absl::StrCat(ranks[i], "-", ranks[j]));
    i = j + 1;
  }
  return absl::StrCat(ranks.size() == 1 ? "rank " : "ranks ", absl::StrJoin(parts, ", "));
}

}  // namespace

std::vector<std::string> FlattenConfig(const JobConfig& config) {
  std::vector<std::string> out;
  Flatten(config, "", &out);
  return out;
}

uint64_t ConfigHash(const std::vector<std::string>& flat) {
  uint64_t h = 14695981039346656037ull;
  for (const std::string& line : flat) {
    for (unsigned char ch : line) h = (h ^ ch) * 1099511628211ull;
    h = (h ^ '\n') * 1099511628211ull;
  }
  return h;
}

std::string DescribeConfigDisagreement(const std::vector<std::vector<std::string>>& per_rank) {
  if (per_rank.empty()) return "";
  size_t lines = 0;
  for (const auto& r : per_rank) lines = std::max(lines, r.size());
  for (size_t i = 0; i < lines; ++i) {
    // Values of line i in order of the first rank holding each.
    std::vector<std::pair<std::string, std::vector<int>>> values;
    for (size_t rank = 0; rank < per_rank.size(); ++rank) {
      const std::string line = i < per_rank[rank].size() ? per_rank[rank][i] : "(missing)";
      auto it = std::find_if(values.begin(), values.end(), [&](const auto& v) { return v.first == line; });
      if (it == values.end()) {
        values.push_back({line, {static_cast<int>(rank)}});
      } else {
        it->second.push_back(static_cast<int>(rank));
      }
    }
    if (values.size() == 1) continue;
    const std::string& first = values.front().first;
    const size_t colon = first.find(": ");
    const std::string field = colon == std::string::npos ? first : first.substr(0, colon);
    std::vector<std::string> held;
    for (const auto& [line, ranks] : values) {
      const size_t c = line.find(": ");
      held.push_back(
          absl::StrCat(c == std::string::npos ? line : line.substr(c + 2), " on ", FormatRanks(ranks)));
    }
    return absl::StrCat(field, " is ", absl::StrJoin(held, " but "));
  }
  return "";
}

std::vector<std::string> ValidateJobConfig(const JobConfig& c, int world_size) {
  std::vector<std::string> e;
  auto need = [&](bool ok, std::string message) {
    if (!ok) e.push_back(std::move(message));
  };
  const auto& m = c.model();
  const auto& moe = m.moe();
  const auto& p = c.parallel();
  const auto& t = c.train();
  const auto& o = c.optim();

  NonFiniteFields(c, "", &e);
  if (!e.empty()) return e;  // every comparison below is false for NaN

  auto positive = [&](const char* name, long long v, const char* fix) {
    need(v > 0, absl::StrCat(name, " = ", v, " must be positive; ", fix));
  };
  positive("model.vocab_size", m.vocab_size(), "set it to the tokenizer's vocabulary size (257 for bytes)");
  positive("model.hidden_size", m.hidden_size(), "e.g. 128");
  positive("model.num_layers", m.num_layers(), "e.g. 4");
  positive("model.num_heads", m.num_heads(), "e.g. 4");
  positive("model.num_kv_heads", m.num_kv_heads(), "e.g. model.num_heads");
  positive("model.ffn_hidden_size", m.ffn_hidden_size(), "e.g. 4 * hidden_size");
  positive("model.seq_len", m.seq_len(), "e.g. 128");
  positive("model.moe.num_experts", moe.num_experts(), "e.g. 8");
  positive("model.moe.top_k", moe.top_k(), "e.g. 2");
  positive("model.moe.expert_ffn_hidden_size", moe.expert_ffn_hidden_size(), "e.g. ffn_hidden_size");
  positive("train.micro_batch", t.micro_batch(), "sequences per rank per micro-batch, e.g. 4");
  positive("train.grad_accum", t.grad_accum(), "e.g. 1");
  positive("parallel.tensor", p.tensor(), "e.g. 1");
  positive("parallel.expert", p.expert(), "e.g. 1");
  positive("parallel.overlap_chunks", p.overlap_chunks(), "1 disables pipelining");
  need(t.steps() >= 0, absl::StrCat("train.steps = ", t.steps(), " must be >= 0"));
  need(t.log_every() > 0, absl::StrCat("train.log_every = ", t.log_every(), " must be positive"));
  positive("profile.trace_steps", c.profile().trace_steps(), "e.g. 5");
  need(c.profile().trace_start() >= 0, absl::StrCat("profile.trace_start = ", c.profile().trace_start(),
                                                    " must be >= 0 (steps before the traced ones, e.g. 1)"));
  need(t.eval_every() >= 0,
       absl::StrCat("train.eval_every = ", t.eval_every(), " must be >= 0 (0: only at the end)"));
  need(m.norm_eps() > 0, absl::StrCat("model.norm_eps = ", m.norm_eps(), " must be positive, e.g. 1e-5"));
  need(m.rope_theta() > 0,
       absl::StrCat("model.rope_theta = ", m.rope_theta(), " must be positive, e.g. 10000"));
  need(m.init_std() > 0, absl::StrCat("model.init_std = ", m.init_std(), " must be positive, e.g. 0.02"));
  positive("model.moe.moe_layer_freq", moe.moe_layer_freq(),
           "1 makes every layer MoE, n every n-th (a model without MoE layers is not an MoE model)");
  positive("train.eval_batches", t.eval_batches(), "validation micro-batches per evaluation, e.g. 4");
  need(t.threads_per_rank() >= 0, absl::StrCat("train.threads_per_rank = ", t.threads_per_rank(),
                                               " must be >= 0 (0: cores / ranks per node)"));
  need(moe.aux_loss_coeff() >= 0, absl::StrCat("model.moe.aux_loss_coeff = ", moe.aux_loss_coeff(),
                                               " must be >= 0 (0: off), e.g. 0.01"));
  need(moe.z_loss_coeff() >= 0,
       absl::StrCat("model.moe.z_loss_coeff = ", moe.z_loss_coeff(), " must be >= 0 (0: off), e.g. 0.001"));
  if (!e.empty()) return e;  // the divisibility checks below need positive sizes

  need(m.hidden_size() % m.num_heads() == 0,
       absl::StrCat("model.num_heads = ", m.num_heads(),
                    " must divide model.hidden_size = ", m.hidden_size()));
  need((m.hidden_size() / m.num_heads()) % 2 == 0,
       absl::StrCat("head size model.hidden_size / model.num_heads = ", m.hidden_size() / m.num_heads(),
                    " must be even for RoPE"));
  need(m.num_heads() % m.num_kv_heads() == 0, absl::StrCat("model.num_kv_heads = ", m.num_kv_heads(),
                                                           " must divide model.num_heads = ", m.num_heads()));
  need(moe.top_k() <= moe.num_experts(),
       absl::StrCat("model.moe.top_k = ", moe.top_k(),
                    " must be at most model.moe.num_experts = ", moe.num_experts()));
  need(moe.drop_policy() == "probs" || moe.drop_policy() == "position",
       absl::StrCat("model.moe.drop_policy = \"", moe.drop_policy(), "\" must be \"probs\" or \"position\""));
  need(moe.experts_impl() == "grouped" || moe.experts_impl() == "sequential",
       absl::StrCat("model.moe.experts_impl = \"", moe.experts_impl(),
                    "\" must be \"grouped\" or \"sequential\""));
  for (std::string& problem : model::MoeRoutingProblems(moe)) e.push_back(std::move(problem));
  const auto& fr = moe.forced_routing();
  need(fr.fraction() >= 0.0 && fr.fraction() <= 1.0,
       absl::StrCat("model.moe.forced_routing.fraction = ", fr.fraction(), " must be in [0, 1] (0: off)"));
  need(fr.hot_experts() >= 1 && fr.hot_experts() <= moe.num_experts(),
       absl::StrCat("model.moe.forced_routing.hot_experts = ", fr.hot_experts(), " must be in [1, ",
                    moe.num_experts(), "]"));
  need(fr.first_hot_expert() >= 0 && fr.first_hot_expert() + fr.hot_experts() <= moe.num_experts(),
       absl::StrCat("model.moe.forced_routing.first_hot_expert = ", fr.first_hot_expert(),
                    " with hot_experts = ", fr.hot_experts(), " must keep the hot experts within [0, ",
                    moe.num_experts(), "): lower first_hot_expert or hot_experts"));

  // Parallel layout.
  need(p.tensor() <= world_size && world_size % p.tensor() == 0,
       absl::StrCat("parallel.tensor = ", p.tensor(), " must divide the world size ", world_size,
                    " (ranks given to mpirun -np)"));
  need(
      p.data() == 0 || p.tensor() * p.data() == world_size,
      absl::StrCat("world size ", world_size, " is not parallel.tensor x parallel.data = ", p.tensor(), " x ",
                   p.data(), "; launch ", p.tensor() * p.data(), " ranks or leave parallel.data unset"));
  need(m.num_heads() % p.tensor() == 0,
       absl::StrCat("parallel.tensor = ", p.tensor(), " must divide model.num_heads = ", m.num_heads()));
  need(
      m.num_kv_heads() % p.tensor() == 0,
      absl::StrCat("parallel.tensor = ", p.tensor(), " must divide model.num_kv_heads = ", m.num_kv_heads()));
  need(m.ffn_hidden_size() % p.tensor() == 0,
       absl::StrCat("parallel.tensor = ", p.tensor(),
                    " must divide model.ffn_hidden_size = ", m.ffn_hidden_size()));
  need(moe.shared_expert_ffn_hidden_size() % p.tensor() == 0,
       absl::StrCat(
           "parallel.tensor = ", p.tensor(),
           " must divide model.moe.shared_expert_ffn_hidden_size = ", moe.shared_expert_ffn_hidden_size()));
  if (p.expert_tensor_parallel()) {
    need(p.tensor() > 1,
         absl::StrCat("parallel.expert_tensor_parallel = true needs parallel.tensor > 1 (it splits each "
                      "expert's ffn dimension over the TP group; parallel.tensor = ",
                      p.tensor(), "): raise parallel.tensor or set expert_tensor_parallel = false"));
    need(moe.expert_ffn_hidden_size() % p.tensor() == 0,
         absl::StrCat("parallel.expert_tensor_parallel = true: parallel.tensor = ", p.tensor(),
                      " must divide model.moe.expert_ffn_hidden_size = ", moe.expert_ffn_hidden_size(),
                      " (each TP rank holds an equal slice of every expert)"));
  }
  need(moe.num_experts() % p.expert() == 0,
       absl::StrCat("parallel.expert = ", p.expert(),
                    " must divide model.moe.num_experts = ", moe.num_experts()));
  if (p.data() > 0) {
    need(p.data() % p.expert() == 0,
         absl::StrCat("parallel.expert = ", p.expert(), " must divide parallel.data = ", p.data(),
                      " (expert groups are slices of the data-parallel dimension)"));
  }
  need(p.grad_bucket_mb() > 0,
       absl::StrCat("parallel.grad_bucket_mb = ", p.grad_bucket_mb(), " must be positive, e.g. 25"));

  // LLEP.
  const auto& l = c.llep();
  need(l.trigger_ratio() >= 1.0,
       absl::StrCat("llep.trigger_ratio = ", l.trigger_ratio(), " must be >= 1 (max/mean load; paper: 1.3)"));
  need(l.capacity_factor() >= 1.0,
       absl::StrCat("llep.capacity_factor = ", l.capacity_factor(), " must be >= 1 (paper: 1.0)"));
  need(l.min_tokens_per_gemm() >= 1,
       absl::StrCat("llep.min_tokens_per_gemm = ", l.min_tokens_per_gemm(), " must be >= 1 (paper: 1024)"));
  need(l.max_borrowed_experts() >= 0,
       absl::StrCat("llep.max_borrowed_experts = ", l.max_borrowed_experts(), " must be >= 0 (0: no limit)"));

  // Optimizer.
  need(o.type() == "adamw" || o.type() == "sgd",
       absl::StrCat("optim.type = \"", o.type(), "\" must be \"adamw\" or \"sgd\""));
  need(o.lr() > 0, absl::StrCat("optim.lr = ", o.lr(), " must be positive"));
  need(o.min_lr() >= 0 && o.min_lr() <= o.lr(),
       absl::StrCat("optim.min_lr = ", o.min_lr(), " must be in [0, optim.lr = ", o.lr(), "]"));
  need(o.beta1() >= 0 && o.beta1() < 1, absl::StrCat("optim.beta1 = ", o.beta1(), " must be in [0, 1)"));
  need(o.beta2() >= 0 && o.beta2() < 1, absl::StrCat("optim.beta2 = ", o.beta2(), " must be in [0, 1)"));
  need(o.eps() > 0, absl::StrCat("optim.eps = ", o.eps(), " must be positive"));
  need(o.momentum() >= 0 && o.momentum() < 1,
       absl::StrCat("optim.momentum = ", o.momentum(), " must be in [0, 1)"));
  need(o.weight_decay() >= 0, absl::StrCat("optim.weight_decay = ", o.weight_decay(), " must be >= 0"));
  need(o.warmup_steps() >= 0, absl::StrCat("optim.warmup_steps = ", o.warmup_steps(), " must be >= 0"));
  need(o.lr_schedule() == "cosine" || o.lr_schedule() == "linear" || o.lr_schedule() == "constant",
       absl::StrCat("optim.lr_schedule = \"", o.lr_schedule(),
                    "\" must be \"cosine\", \"linear\" or \"constant\""));

  if (o.lr_schedule() != "constant") {
    need(o.decay_steps() > o.warmup_steps(),
         absl::StrCat("optim.decay_steps = ", o.decay_steps(),
                      " must exceed optim.warmup_steps = ", o.warmup_steps(), " for the ", o.lr_schedule(),
                      " schedule; raise optim.decay_steps (default train.steps) or "
                      "lower the warmup"));
  }

  // Train, data, checkpoint, comm.
  // "cuda" needs a build with the CUDA backend: refused here, before any work,
  // rather than in the trainer. (Whether this machine has a usable GPU is
  // moe-train's start-up check, also before any work: launch/moe_train.cc.)
  need(t.device() == "cpu" || (BuiltWithCuda() && ParseDevice(t.device()).ok()),
       BuiltWithCuda()
           ? absl::StrCat("train.device = \"", t.device(), "\" is not one of \"cpu\", \"cuda\", \"cuda:N\"")
           : absl::StrCat("train.device = \"", t.device(),
                          "\": this build trains on \"cpu\" only (configure with "
                          "-DMOE_WITH_CUDA=ON where the CUDA toolkit and NCCL are installed); "
                          "set train.device = \"cpu\""));
  need(t.precision() == "fp32" || t.precision() == "bf16",
       absl::StrCat("train.precision = \"", t.precision(), "\" must be \"fp32\" or \"bf16\""));
  need(!t.run_dir().empty(), "train.run_dir is empty; name a directory for metrics, e.g. runs/demo");
  const auto& d = c.data();
  need(!d.train_path().empty(),
       "data.train_path is empty; set it to a Megatron prefix (PREFIX.bin/.idx, e.g. written by "
       "moe-preprocess) or an .h5 file with data.format = \"hdf5\"");
  need(d.format() == "megatron" || d.format() == "hdf5",
       absl::StrCat("data.format = \"", d.format(), "\" must be \"megatron\" or \"hdf5\""));
  need(d.valid_fraction() >= 0 && d.valid_fraction() < 1,
       absl::StrCat("data.valid_fraction = ", d.valid_fraction(), " must be in [0, 1)"));
  need(c.checkpoint().save_every() >= 0,
       absl::StrCat("checkpoint.save_every = ", c.checkpoint().save_every(), " must be >= 0"));
  need(c.checkpoint().keep_last() >= 0,
       absl::StrCat("checkpoint.keep_last = ", c.checkpoint().keep_last(), " must be >= 0 (0: keep all)"));
  need(!c.checkpoint().has_timeout_s() || c.checkpoint().timeout_s() > 0,
       absl::StrCat("checkpoint.timeout_s = ", c.checkpoint().timeout_s(),
                    " must be > 0 seconds (or unset: comm.timeout_s + the checkpoint's bytes / 50 MB/s)"));
  need(c.checkpoint().host_bucket_mb() > 0,
       absl::StrCat("checkpoint.host_bucket_mb = ", c.checkpoint().host_bucket_mb(),
                    " must be > 0 (MiB of host memory that device tensors move through on save "
                    "and load; default 256)"));
  need(c.comm().timeout_s() > 0,
       absl::StrCat("comm.timeout_s = ", c.comm().timeout_s(), " must be positive"));
  need(c.comm().backend() == "auto" || c.comm().backend() == "mpi" || c.comm().backend() == "nccl",
       absl::StrCat("comm.backend = \"", c.comm().backend(), "\" must be \"auto\", \"mpi\" or \"nccl\""));
  // The data plane's communicator follows the tensors' device: auto = nccl for
  // cuda, mpi for cpu; nccl cannot move host tensors. mpi with cuda is allowed
  // (config.proto, CommConfig.backend).
  need(!(c.comm().backend() == "nccl" && t.device() == "cpu"), comm::NcclNeedsCudaMessage(t.device()));
  return e;
}

absl::StatusOr<JobConfig> ResolveJobConfig(const std::string& path, const std::vector<std::string>& overrides,
                                           int world_size) {
  ASSIGN_OR_RETURN(JobConfig config, LoadConfigFile(path));
  RETURN_IF_ERROR(ApplyOverrides(overrides, &config));
  ApplyDefaults(world_size, &config);
  std::vector<std::string> problems = ValidateJobConfig(config, world_size);
  if (!problems.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid config ", path, ":\n  ", absl::StrJoin(problems, "\n  ")));
  }
  return config;
}

}  // namespace moe
