#include "model/common.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "runtime/core/kernel_math.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"

namespace moe::model {

parallel::ShardSpec ColumnParallelShard(int64_t out_features, const ShardPlan& plan) {
  parallel::ShardSpec s;
  if (plan.tp_size > 1) {
    s.tp_dim = 0;
    s.tp_begin = out_features * plan.tp_rank / plan.tp_size;
    s.tp_end = out_features * (plan.tp_rank + 1) / plan.tp_size;
  }
  return s;
}

comm::Communicator* ExpertTpGroup(const ShardPlan& plan) {
  return plan.expert_tp && plan.tp_size > 1 ? plan.tp_group : nullptr;
}

comm::Communicator* TedGroup(const ShardPlan& plan) {
  return !plan.expert_tp && plan.tp_size > 1 ? plan.tp_group : nullptr;
}

parallel::ShardSpec RowParallelShard(int64_t in_features, const ShardPlan& plan) {
  parallel::ShardSpec s;
  if (plan.tp_size > 1) {
    s.tp_dim = 1;
    s.tp_begin = in_features * plan.tp_rank / plan.tp_size;
    s.tp_end = in_features * (plan.tp_rank + 1) / plan.tp_size;
  }
  return s;
}

absl::Status CreateParameter(Stream& stream, std::string name, Shape global_shape, parallel::ParamKind kind,
                             const parallel::ShardSpec& shard, InitSpec init, uint64_t seed,
                             parallel::Parameter* p) {
  RETURN_IF_ERROR(parallel::ValidateShard(name, kind, global_shape, shard));
  p->name = std::move(name);
  p->global_shape = global_shape;
  p->kind = kind;
  p->shard = shard;
  p->weight_decay = parallel::DefaultWeightDecay(p->name);
  const Shape local = parallel::LocalShape(global_shape, shard);
  Backend& backend = stream.backend();
  ASSIGN_OR_RETURN(p->value, Tensor::Empty(backend, local, DType::kF32, MemoryCategory::kParameters));
  ASSIGN_OR_RETURN(p->grad, Tensor::Empty(backend, local, DType::kF32, MemoryCategory::kGradients));
  RETURN_IF_ERROR(ops::Fill(stream, p->grad, 0.0));
  if (init.kind == InitSpec::kOnes) return ops::Fill(stream, p->value, 1.0);
  const std::vector<int64_t> offsets = parallel::ShardOffsets(global_shape, shard);
  return ops::InitNormal(stream, p->value, seed, p->name, global_shape, offsets, init.std);
}

absl::StatusOr<Tensor> NewActivation(Stream& stream, Shape shape, DType dtype) {
  return Tensor::Empty(stream.backend(), shape, dtype, MemoryCategory::kActivations);
}

absl::StatusOr<Tensor> CastActivation(Stream& stream, const Tensor& t, DType dtype) {
  if (t.dtype() == dtype) return t;
  ASSIGN_OR_RETURN(Tensor out, NewActivation(stream, t.shape(), dtype));
  RETURN_IF_ERROR(ops::Cast(stream, t, out));
  return out;
}

absl::Status SetComputeCopies(Stream& stream, const parallel::ParameterList& params, DType dtype) {
  if (dtype != DType::kF32 && dtype != DType::kBF16) {
    return absl::InvalidArgumentError(
        absl::StrCat("compute copies of dtype ", DTypeName(dtype), ": only f32 and bf16 exist"));
  }
  for (parallel::Parameter* p : params) {
    if (dtype == DType::kF32) {
      p->compute = Tensor();
      continue;
    }
    ASSIGN_OR_RETURN(p->compute,
                     Tensor::Empty(stream.backend(), p->value.shape(), dtype, MemoryCategory::kParameters));
  }
  return RefreshComputeCopies(stream, params);
}

absl::Status RefreshComputeCopies(Stream& stream, const parallel::ParameterList& params) {
  for (parallel::Parameter* p : params) {
    if (p->compute.defined()) RETURN_IF_ERROR(ops::Cast(stream, p->value, p->compute));
  }
  return absl::OkStatus();
}

namespace {

absl::StatusOr<Backend*> HostBackend() { return GetBackend(Device::Cpu()); }

}  // namespace

absl::StatusOr<std::vector<float>> ToHostFloats(Stream& stream, const Tensor& t) {
  std::vector<float> out(t.numel());
  if (t.numel() == 0) return out;
  if (t.dtype() != DType::kF32) {
    return absl::InvalidArgumentError(absl::StrCat("ToHostFloats: ", t.ToString(), " is not f32"));
  }
  ASSIGN_OR_RETURN(Backend * host, HostBackend());
  ASSIGN_OR_RETURN(Tensor staging, Tensor::Empty(*host, t.shape(), DType::kF32, MemoryCategory::kOther));
  RETURN_IF_ERROR(ops::Copy(stream, t, staging));
  RETURN_IF_ERROR(stream.Synchronize());
  std::memcpy(out.data(), staging.data<float>(), out.size() * sizeof(float));
  return out;
}

size_t HostReadback::Add(const Tensor& t) {
  tensors_.push_back(t);
  return tensors_.size() - 1;
}

absl::Status HostReadback::Start(Stream& stream) {
  if (started_) {
    return absl::FailedPreconditionError("HostReadback::Start: the previous read was not waited for (Wait)");
  }
  constexpr size_t kAlignFloats = 64;  // 256 bytes
  offsets_.clear();
  counts_.clear();
  dtypes_.clear();
  size_t floats = 0;
  for (const Tensor& t : tensors_) {
    if (!t.defined() || (t.dtype() != DType::kF32 && t.dtype() != DType::kI32)) {
      return absl::InvalidArgumentError(
          absl::StrCat("HostReadback: ", t.defined() ? t.ToString() : "an undefined tensor",
                       " is not an f32 or i32 tensor"));
    }
    floats = (floats + kAlignFloats - 1) / kAlignFloats * kAlignFloats;
    offsets_.push_back(floats);
    counts_.push_back(static_cast<size_t>(t.numel()));
    dtypes_.push_back(t.dtype());
    floats += counts_.back();
  }
  const size_t bytes = std::max<size_t>(floats, 1) * sizeof(float);
  Backend& backend = stream.backend();
  if (staging_ == nullptr || staging_->size() < bytes) {
    // Grown by half again, so that a slowly growing read reallocates rarely.
    ASSIGN_OR_RETURN(staging_, backend.AllocatePinnedHost(bytes + bytes / 2, MemoryCategory::kOther));
  }
  if (landed_ == nullptr) {
    ASSIGN_OR_RETURN(landed_, backend.CreateEvent());
  }
  for (size_t i = 0; i < tensors_.size(); ++i) {
    if (tensors_[i].numel() == 0) continue;
    ASSIGN_OR_RETURN(Tensor view, Tensor::FromBuffer(staging_, offsets_[i] * sizeof(float),
                                                     tensors_[i].shape(), tensors_[i].dtype()));
    RETURN_IF_ERROR(ops::Copy(stream, tensors_[i], view));
  }
  RETURN_IF_ERROR(stream.Record(*landed_));
  started_ = true;
  ready_ = false;
  return absl::OkStatus();
}

absl::Status HostReadback::Wait() {
  if (!started_) return absl::FailedPreconditionError("HostReadback::Wait: no read was started (Start)");
  started_ = false;
  RETURN_IF_ERROR(landed_->Synchronize());
  Landed();
  return absl::OkStatus();
}

void HostReadback::Landed() {
  // The values are on the host: the device tensors may go (their sizes stay).
  for (Tensor& t : tensors_) t = Tensor();
  ready_ = true;
}

absl::Status HostReadback::Collect() {
  if (!started_) return absl::FailedPreconditionError("HostReadback::Collect: no read was started (Start)");
  if (!landed_->Query()) {
    return absl::FailedPreconditionError(
        "HostReadback::Collect: the copies have not landed; wait for the stream after Start (or call Wait)");
  }
  started_ = false;
  Landed();
  return absl::OkStatus();
}

absl::Span<const float> HostReadback::values(size_t i) const {
  if (!ready_ || i >= counts_.size() || dtypes_[i] != DType::kF32) return {};
  return absl::Span<const float>(static_cast<const float*>(staging_->data()) + offsets_[i], counts_[i]);
}

absl::Span<const int32_t> HostReadback::int_values(size_t i) const {
  if (!ready_ || i >= counts_.size() || dtypes_[i] != DType::kI32) return {};
  return absl::Span<const int32_t>(static_cast<const int32_t*>(staging_->data()) + offsets_[i], counts_[i]);
}

void HostReadback::Reset() {
  tensors_.clear();
  offsets_.clear();
  counts_.clear();
  dtypes_.clear();
  ready_ = false;
}

absl::StatusOr<Tensor> FromHostFloats(Stream& stream, absl::Span<const float> values, Shape shape,
                                      MemoryCategory category) {
  return Tensor::FromHostOn(stream, shape, DType::kF32, values.data(), values.size() * sizeof(float),
                            category);
}

size_t HostUploads::Add(const void* data, size_t count, DType dtype, Shape shape) {
  constexpr size_t kAlign = 256;
  const size_t offset = (bytes_.size() + kAlign - 1) / kAlign * kAlign;
  const size_t bytes = count * DTypeSize(dtype);
  bytes_.resize(offset + bytes);
  if (bytes > 0) std::memcpy(bytes_.data() + offset, data, bytes);
  entries_.push_back(Entry{offset, count, dtype, std::move(shape)});
  return entries_.size() - 1;
}

size_t HostUploads::AddFloats(absl::Span<const float> values, Shape shape) {
  return Add(values.data(), values.size(), DType::kF32, std::move(shape));
}

size_t HostUploads::AddInts(absl::Span<const int32_t> values, Shape shape) {
  return Add(values.data(), values.size(), DType::kI32, std::move(shape));
}

absl::StatusOr<std::vector<Tensor>> HostUploads::Upload(Stream& stream, MemoryCategory category) {
  for (size_t i = 0; i < entries_.size(); ++i) {
    const Entry& e = entries_[i];
    if (static_cast<int64_t>(e.count) != e.shape.numel()) {
      return absl::InvalidArgumentError(
          absl::StrCat("HostUploads: array ", i, " has ", e.count, " values for shape ", e.shape.ToString()));
    }
  }
  if (bytes_.empty()) bytes_.resize(1);  // every array empty: a one-byte buffer for the views
  const int64_t total = static_cast<int64_t>(bytes_.size());
  ASSIGN_OR_RETURN(Tensor buffer, Tensor::FromHostOn(stream, Shape{total}, DType::kU8, bytes_.data(),
                                                     bytes_.size(), category));
  std::vector<Tensor> out;
  out.reserve(entries_.size());
  for (const Entry& e : entries_) {
    ASSIGN_OR_RETURN(Tensor view,
                     Tensor::FromBuffer(buffer.buffer(), buffer.byte_offset() + e.offset, e.shape, e.dtype));
    out.push_back(std::move(view));
  }
  return out;
}

absl::StatusOr<Tensor> FromHostInts(Stream& stream, absl::Span<const int32_t> values, Shape shape,
                                    MemoryCategory category) {
  return Tensor::FromHostOn(stream, shape, DType::kI32, values.data(), values.size() * sizeof(int32_t),
                            category);
}

absl::StatusOr<double> ReadScalar(Stream& stream, const Tensor& t) {
  ASSIGN_OR_RETURN(std::vector<float> v, ToHostFloats(stream, t));
  if (v.size() != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("ReadScalar: ", t.ToString(), " does not have one element"));
  }
  return v[0];
}

absl::Status ValidateModelConfig(const config::ModelConfig& cfg, const ShardPlan& plan) {
  auto positive = [](const char* field, int64_t v) -> absl::Status {
    if (v > 0) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat("model.", field, " = ", v, " must be positive"));
  };
  RETURN_IF_ERROR(positive("vocab_size", cfg.vocab_size()));
  RETURN_IF_ERROR(positive("hidden_size", cfg.hidden_size()));
  RETURN_IF_ERROR(positive("num_layers", cfg.num_layers()));
  RETURN_IF_ERROR(positive("num_heads", cfg.num_heads()));
  RETURN_IF_ERROR(positive("num_kv_heads", cfg.num_kv_heads()));
  RETURN_IF_ERROR(positive("ffn_hidden_size", cfg.ffn_hidden_size()));
  RETURN_IF_ERROR(positive("seq_len", cfg.seq_len()));
  RETURN_IF_ERROR(positive("moe.num_experts", cfg.moe().num_experts()));
  RETURN_IF_ERROR(positive("moe.top_k", cfg.moe().top_k()));
  RETURN_IF_ERROR(positive("moe.expert_ffn_hidden_size", cfg.moe().expert_ffn_hidden_size()));
  RETURN_IF_ERROR(positive("moe.moe_layer_freq", cfg.moe().moe_layer_freq()));
  if (cfg.hidden_size() % cfg.num_heads() != 0) {
    return absl::InvalidArgumentError(absl::StrCat("model.num_heads = ", cfg.num_heads(),
                                                   " must divide model.hidden_size = ", cfg.hidden_size()));
  }
  if ((cfg.hidden_size() / cfg.num_heads()) % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("head_dim = model.hidden_size / model.num_heads = ", cfg.hidden_size() / cfg.num_heads(),
                     " must be even for RoPE; change hidden_size or num_heads"));
  }
  if (cfg.num_heads() % cfg.num_kv_heads() != 0) {
    return absl::InvalidArgumentError(absl::StrCat("model.num_kv_heads = ", cfg.num_kv_heads(),
                                                   " must divide model.num_heads = ", cfg.num_heads()));
  }
  if (cfg.moe().top_k() > cfg.moe().num_experts()) {
    return absl::InvalidArgumentError(
        absl::StrCat("model.moe.top_k = ", cfg.moe().top_k(),
                     " must be at most model.moe.num_experts = ", cfg.moe().num_experts()));
  }
  const std::string& policy = cfg.moe().drop_policy();
  if (!policy.empty() && policy != "probs" && policy != "position") {
    return absl::InvalidArgumentError(
        absl::StrCat("model.moe.drop_policy = \"", policy, "\" must be \"probs\" or \"position\""));
  }
  const std::string& impl = cfg.moe().experts_impl();
  if (!impl.empty() && impl != "grouped" && impl != "sequential") {
    return absl::InvalidArgumentError(
        absl::StrCat("model.moe.experts_impl = \"", impl, "\" must be \"grouped\" or \"sequential\""));
  }
  if (std::vector<std::string> problems = MoeRoutingProblems(cfg.moe()); !problems.empty()) {
    return absl::InvalidArgumentError(problems.front());
  }
  if (plan.tp_size < 1 || plan.tp_rank < 0 || plan.tp_rank >= plan.tp_size || plan.ep_size < 1 ||
      plan.ep_rank < 0 || plan.ep_rank >= plan.ep_size) {
    return absl::InvalidArgumentError(absl::StrCat("shard plan tp ", plan.tp_rank, "/", plan.tp_size, " ep ",
                                                   plan.ep_rank, "/", plan.ep_size,
                                                   " is not a valid rank/size"));
  }
  if (plan.expert_tp && plan.tp_size < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("parallel.expert_tensor_parallel = true needs parallel.tensor > 1 "
                     "(parallel.tensor = ",
                     plan.tp_size, ")"));
  }
  if (cfg.num_kv_heads() % plan.tp_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat("parallel.tensor = ", plan.tp_size,
                                                   " must divide model.num_kv_heads = ", cfg.num_kv_heads()));
  }
  if (cfg.ffn_hidden_size() % plan.tp_size != 0 || cfg.moe().expert_ffn_hidden_size() % plan.tp_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "parallel.tensor = ", plan.tp_size, " must divide model.ffn_hidden_size = ", cfg.ffn_hidden_size(),
        " and model.moe.expert_ffn_hidden_size = ", cfg.moe().expert_ffn_hidden_size()));
  }
  if (cfg.moe().shared_expert_ffn_hidden_size() % plan.tp_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat("parallel.tensor = ", plan.tp_size,
                                                   " must divide model.moe.shared_expert_ffn_hidden_size = ",
                                                   cfg.moe().shared_expert_ffn_hidden_size()));
  }
  if (cfg.moe().num_experts() % plan.ep_size != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("parallel.expert = ", plan.ep_size,
                     " must divide model.moe.num_experts = ", cfg.moe().num_experts()));
  }
  return absl::OkStatus();
}

std::vector<std::string> MoeRoutingProblems(const config::MoeConfig& moe) {
  std::vector<std::string> e;
  const std::string& score = moe.score_function();
  if (!score.empty() && score != "softmax" && score != "sigmoid") {
    e.push_back(
        absl::StrCat("model.moe.score_function = \"", score, "\" must be \"softmax\" or \"sigmoid\""));
  }
  const std::string& aux = moe.aux_loss_type();
  if (!aux.empty() && aux != "batch" && aux != "sequence") {
    e.push_back(absl::StrCat("model.moe.aux_loss_type = \"", aux, "\" must be \"batch\" or \"sequence\""));
  }
  const double rate = moe.expert_bias_update_rate();
  if (!(rate >= 0) || !std::isfinite(rate)) {
    e.push_back(absl::StrCat("model.moe.expert_bias_update_rate = ", rate,
                             " must be a finite value >= 0 (0: no bias; DeepSeek-V3 used 0.001)"));
  }
  if (moe.shared_expert_ffn_hidden_size() < 0) {
    e.push_back(absl::StrCat("model.moe.shared_expert_ffn_hidden_size = ",
                             moe.shared_expert_ffn_hidden_size(), " must be >= 0 (0: no shared expert)"));
  }
  if (moe.shared_expert_gate() && moe.shared_expert_ffn_hidden_size() <= 0) {
    e.push_back(
        "model.moe.shared_expert_gate = true needs a shared expert: set "
        "model.moe.shared_expert_ffn_hidden_size > 0");
  }
  const int64_t E = moe.num_experts(), k = moe.top_k();
  const double erc = moe.erc_loss_coeff(), alpha = moe.erc_alpha();
  if (!(erc >= 0) || !std::isfinite(erc)) {
    e.push_back(absl::StrCat("model.moe.erc_loss_coeff = ", erc,
                             " must be a finite value >= 0 (0: no expert-router coupling loss)"));
  } else if (erc > 0 && E < 2) {
    e.push_back(absl::StrCat("model.moe.erc_loss_coeff = ", erc, " needs model.moe.num_experts >= 2 (it is ",
                             E, "): the coupling loss compares experts; set erc_loss_coeff to 0"));
  }
  if (!(alpha >= 0 && alpha <= 1)) {
    e.push_back(absl::StrCat("model.moe.erc_alpha = ", alpha, " must be in [0, 1] (default 1)"));
  }
  const int64_t groups = moe.num_expert_groups() > 0 ? moe.num_expert_groups() : 1;
  if (moe.group_topk() < 0) {
    e.push_back(absl::StrCat("model.moe.group_topk = ", moe.group_topk(),
                             " must be >= 0 (0: no group-limited routing)"));
  } else if (moe.group_topk() > 0) {
    if (moe.num_expert_groups() < 1 || E % groups != 0) {
      e.push_back(absl::StrCat("model.moe.num_expert_groups = ", moe.num_expert_groups(),
                               " must be positive and divide model.moe.num_experts = ", E,
                               " (default: parallel.expert)"));
    } else if (moe.group_topk() > groups) {
      e.push_back(absl::StrCat("model.moe.group_topk = ", moe.group_topk(),
                               " must be at most model.moe.num_expert_groups = ", groups));
    } else if (moe.group_topk() < groups && groups > kmath::kRouterMaxGroups) {
      e.push_back(absl::StrCat("model.moe.num_expert_groups = ", groups, " is more than the router's ",
                               kmath::kRouterMaxGroups,
                               " groups (a token's groups are a 64-bit mask); use fewer, larger groups"));
    } else if (moe.group_topk() * (E / groups) < k) {
      e.push_back(absl::StrCat("model.moe.group_topk = ", moe.group_topk(), " groups of ", E / groups,
                               " experts hold fewer than model.moe.top_k = ", k,
                               " experts; raise group_topk or lower num_expert_groups"));
    }
  }
  return e;
}

}  // namespace moe::model
