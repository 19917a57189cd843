#include "optim/optimizer.h"

#include <algorithm>
#include <cmath>
#include <set>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "runtime/core/config.pb.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"

namespace moe::optim {
namespace {

// Elements [begin, end) of `t` in row-major order, as a 1-D view.
Tensor FlatRange(const Tensor& t, int64_t begin, int64_t end) {
  return t.Reshape(Shape{t.numel()}).Slice(begin, end);
}

// The same range of the parameter's compute copy (Parameter::compute: the
// bf16 copy the layers read), or an undefined tensor when it has none.
Tensor ComputeRange(const parallel::Parameter& p, int64_t begin, int64_t end) {
  return p.compute.defined() ? FlatRange(p.compute, begin, end) : Tensor();
}

}  // namespace

absl::StatusOr<OptimizerOptions> OptimizerOptionsFromConfig(const config::OptimConfig& c) {
  OptimizerOptions o;
  const std::string type = c.has_type() ? c.type() : "adamw";
  if (type == "adamw") {
    o.type = OptimizerType::kAdamW;
  } else if (type == "sgd") {
    o.type = OptimizerType::kSgd;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("optim.type = \"", type, "\" must be \"adamw\" or \"sgd\""));
  }
  if (c.has_beta1()) o.beta1 = c.beta1();
  if (c.has_beta2()) o.beta2 = c.beta2();
  if (c.has_eps()) o.eps = c.eps();
  o.momentum = c.momentum();
  o.weight_decay = c.weight_decay();
  o.decay_all = c.decay_norms_and_embeddings();
  o.shard_state = c.shard_state();
  if (!(o.beta1 >= 0 && o.beta1 < 1)) {
    return absl::InvalidArgumentError(absl::StrCat("optim.beta1 = ", o.beta1, " must be in [0, 1)"));
  }
  if (!(o.beta2 >= 0 && o.beta2 < 1)) {
    return absl::InvalidArgumentError(absl::StrCat("optim.beta2 = ", o.beta2, " must be in [0, 1)"));
  }
  if (!(o.eps > 0))
    return absl::InvalidArgumentError(absl::StrCat("optim.eps = ", o.eps, " must be positive"));
  if (!(o.weight_decay >= 0)) {
    return absl::InvalidArgumentError(absl::StrCat("optim.weight_decay = ", o.weight_decay, " must be >= 0"));
  }
  if (!(o.momentum >= 0 && o.momentum < 1)) {
    return absl::InvalidArgumentError(absl::StrCat("optim.momentum = ", o.momentum, " must be in [0, 1)"));
  }
  return o;
}

const Tensor* ParamState::Find(absl::string_view state_name) const {
  for (const auto& [name, t] : tensors) {
    if (name == state_name) return &t;
  }
  return nullptr;
}

Optimizer::Optimizer(const OptimizerOptions& options, Backend* backend)
    : options_(options), backend_(backend) {
  if (options_.type == OptimizerType::kAdamW) {
    state_names_ = {"exp_avg", "exp_avg_sq"};
  } else if (options_.momentum > 0) {
    state_names_ = {"momentum_buffer"};
  }
}

Optimizer::~Optimizer() = default;

const char* Optimizer::type_name() const { return options_.type == OptimizerType::kAdamW ? "adamw" : "sgd"; }

double Optimizer::WeightDecayOf(const parallel::Parameter& p) const {
  return (p.weight_decay || options_.decay_all) ? options_.weight_decay : 0.0;
}

int64_t Optimizer::StateBytes() const {
  int64_t bytes = 0;
  for (const ParamState& s : states_) {
    for (const auto& [name, t] : s.tensors) bytes += static_cast<int64_t>(t.nbytes());
  }
  return bytes;
}

absl::StatusOr<std::unique_ptr<Optimizer>> Optimizer::Create(const OptimizerOptions& options,
                                                             parallel::ParameterList& params,
                                                             const parallel::ProcessGroups* groups) {
  if (options.gather_bucket_elements <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("gather_bucket_elements = ", options.gather_bucket_elements, " must be positive"));
  }
  // Every parameter: f32 value and grad of the same shape, all on one device.
  bool have_device = false;
  Device device = Device::Cpu();
  std::set<std::string> names;
  for (const parallel::Parameter* p : params) {
    if (!p->value.defined() || !p->grad.defined()) {
      return absl::InvalidArgumentError(absl::StrCat("optimizer: parameter ", p->name, " has no ",
                                                     p->value.defined() ? "grad" : "value",
                                                     " tensor; allocate both before creating the optimizer"));
    }
    if (p->value.dtype() != DType::kF32 || p->grad.dtype() != DType::kF32) {
      return absl::InvalidArgumentError(absl::StrCat("optimizer: parameter ", p->name, " is ",
                                                     p->value.ToString(), " with grad ", p->grad.ToString(),
                                                     "; both must be f32"));
    }
    if (p->value.shape() != p->grad.shape()) {
      return absl::InvalidArgumentError(absl::StrCat("optimizer: parameter ", p->name, " value ",
                                                     p->value.ToString(), " and grad ", p->grad.ToString(),
                                                     " differ in shape"));
    }
    if (!have_device) {
      device = p->value.device();
      have_device = true;
    }
    if (!(p->value.device() == device) || !(p->grad.device() == device)) {
      return absl::InvalidArgumentError(
          absl::StrCat("optimizer: parameter ", p->name, " lives on ", p->value.device().ToString(), "/",
                       p->grad.device().ToString(), ", others on ", device.ToString(), "; use one device"));
    }
    if (!names.insert(p->name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("optimizer: parameter name ", p->name, " appears twice"));
    }
  }
  if (options.shard_state && (groups == nullptr || !groups->dp || !groups->edp)) {
    return absl::InvalidArgumentError("optim.shard_state = true needs the process groups (dp and edp)");
  }
  ASSIGN_OR_RETURN(Backend * backend, GetBackend(device));
  std::unique_ptr<Optimizer> opt(new Optimizer(options, backend));
  RETURN_IF_ERROR(opt->Partition(params, groups));
  return opt;
}

int64_t Optimizer::FlatGroup::OwnedBegin(int rank) const {
  // Balanced by elements: sizes differ by at most one.
  return total() * rank / comm->size();
}

absl::Status Optimizer::Partition(parallel::ParameterList& params, const parallel::ProcessGroups* groups) {
  // (param, begin, end) this rank keeps state for, in list order.
  std::vector<std::tuple<parallel::Parameter*, int64_t, int64_t>> ranges;
  if (!options_.shard_state) {
    for (parallel::Parameter* p : params) ranges.emplace_back(p, 0, p->value.numel());
  } else {
    for (bool expert : {false, true}) {
      FlatGroup g;
      g.comm = &groups->ReduceGroup(expert);
      g.offsets.push_back(0);
      for (parallel::Parameter* p : params) {
        if ((p->kind == parallel::ParamKind::kExpert) != expert) continue;
        g.params.push_back(p);
        g.offsets.push_back(g.offsets.back() + p->value.numel());
      }
      g.owned_begin = g.OwnedBegin(g.comm->rank());
      g.owned_end = g.OwnedBegin(g.comm->rank() + 1);
      for (size_t i = 0; i < g.params.size(); ++i) {
        const int64_t b = std::max(g.offsets[i], g.owned_begin), e = std::min(g.offsets[i + 1], g.owned_end);
        if (b < e) ranges.emplace_back(g.params[i], b - g.offsets[i], e - g.offsets[i]);
      }
      if (!g.params.empty()) groups_.push_back(std::move(g));
    }
    // Back to parameter-list order (dense and expert parameters may interleave).
    std::vector<std::tuple<parallel::Parameter*, int64_t, int64_t>> ordered;
    for (parallel::Parameter* p : params) {
      for (const auto& r : ranges) {
        if (std::get<0>(r) == p) ordered.push_back(r);
      }
    }
    ranges = std::move(ordered);
  }
  for (const auto& [p, begin, end] : ranges) {
    ParamState s;
    s.param = p;
    s.begin = begin;
    s.end = end;
    const Shape shape = s.whole() ? p->value.shape() : Shape{end - begin};
    for (const std::string& name : state_names_) {
      ASSIGN_OR_RETURN(Tensor t, Tensor::Zeros(*backend_, shape, DType::kF32, MemoryCategory::kOptimizer));
      s.tensors.emplace_back(name, std::move(t));
    }
    states_.push_back(std::move(s));
  }
  return absl::OkStatus();
}

AdamWTarget Optimizer::AdamWTargetOf(const ParamState& s) const {
  const int64_t n = s.end - s.begin;
  AdamWTarget t;
  t.param = FlatRange(s.param->value, s.begin, s.end);
  t.grad = FlatRange(s.param->grad, s.begin, s.end);
  t.exp_avg = s.tensors[0].second.Reshape(Shape{n});
  t.exp_avg_sq = s.tensors[1].second.Reshape(Shape{n});
  // One pass: the kernel writes the compute copy from the updated value.
  t.param_bf16 = ComputeRange(*s.param, s.begin, s.end);
  t.weight_decay = static_cast<float>(WeightDecayOf(*s.param));
  return t;
}

absl::Status Optimizer::SgdUpdate(const ParamState& s, double lr, double grad_scale) {
  Stream& stream = backend_->default_stream();
  const Tensor p = FlatRange(s.param->value, s.begin, s.end);
  const Tensor g = FlatRange(s.param->grad, s.begin, s.end);
  // The compute copy's elements of the range (undefined in fp32).
  const Tensor c = ComputeRange(*s.param, s.begin, s.end);
  const int64_t n = s.end - s.begin;
  const double wd = WeightDecayOf(*s.param);
  if (options_.momentum > 0) {
    // buf = momentum * buf + (scale g + wd * p); p -= lr * buf.
    const Tensor buf = s.tensors[0].second.Reshape(Shape{n});
    RETURN_IF_ERROR(
        ops::Axpby(stream, static_cast<float>(grad_scale), g, static_cast<float>(options_.momentum), buf));
    if (wd != 0) RETURN_IF_ERROR(ops::Axpby(stream, static_cast<float>(wd), p, 1.0f, buf));
    RETURN_IF_ERROR(ops::Axpby(stream, static_cast<float>(-lr), buf, 1.0f, p));
  } else {
    // p -= lr * (scale g + wd * p) = (1 - lr * wd) p - lr * scale * g.
    RETURN_IF_ERROR(
        ops::Axpby(stream, static_cast<float>(-lr * grad_scale), g, static_cast<float>(1.0 - lr * wd), p));
  }
  return c.defined() ? ops::Cast(stream, p, c) : absl::OkStatus();
}

absl::Status Optimizer::Step(double lr, double grad_scale) {
  if (!(std::isfinite(grad_scale) && grad_scale > 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "optimizer step ", step_ + 1, ": grad_scale = ", grad_scale, " must be finite and positive"));
  }
  ++step_;
  if (options_.type == OptimizerType::kAdamW) {
    // Every parameter in one list op: a few launches on a GPU, not one each.
    std::vector<AdamWTarget> targets;
    targets.reserve(states_.size());
    for (const ParamState& s : states_) targets.push_back(AdamWTargetOf(s));
    absl::Status st = ops::AdamW(backend_->default_stream(), targets, static_cast<float>(lr),
                                 static_cast<float>(options_.beta1), static_cast<float>(options_.beta2),
                                 static_cast<float>(options_.eps), step_, static_cast<float>(grad_scale));
    if (!st.ok()) {
      return Annotate(st, absl::StrCat("optimizer step ", step_, " (targets[i]: parameter i of ",
                                       states_.size(), " in the model's order)"));
    }
  } else {
    for (const ParamState& s : states_) {
      absl::Status st = SgdUpdate(s, lr, grad_scale);
      if (!st.ok())
        return Annotate(st, absl::StrCat("optimizer step ", step_, ", parameter ", s.param->name));
    }
  }
  // The gathers follow the updates on the same stream: no host wait.
  for (const FlatGroup& g : groups_) {
    if (g.comm->size() > 1) RETURN_IF_ERROR(Gather(g));
  }
  return absl::OkStatus();
}

absl::Status Optimizer::Gather(const FlatGroup& g) {
  Stream& stream = backend_->default_stream();
  const int size = g.comm->size(), rank = g.comm->rank();
  const int64_t bucket = std::min(options_.gather_bucket_elements, g.total());
  if (!gather_buffer_.defined() || gather_buffer_.numel() < bucket) {
    gather_buffer_ = Tensor();
    ASSIGN_OR_RETURN(gather_buffer_,
                     Tensor::Empty(*backend_, Shape{bucket}, DType::kF32, MemoryCategory::kCommunication));
  }
  // Copies flat elements [lo, hi) of the group between the parameters and the
  // buffer (whose element 0 is flat element c0).
  auto copy = [&](int64_t c0, int64_t lo, int64_t hi, bool to_buffer) -> absl::Status {
    for (size_t i = 0; i < g.params.size(); ++i) {
      const int64_t b = std::max(g.offsets[i], lo), e = std::min(g.offsets[i + 1], hi);
      if (b >= e) continue;
      const Tensor param = FlatRange(g.params[i]->value, b - g.offsets[i], e - g.offsets[i]);
      const Tensor buf = gather_buffer_.Slice(b - c0, e - c0);
      if (to_buffer) {
        RETURN_IF_ERROR(ops::Copy(stream, param, buf));
        continue;
      }
      RETURN_IF_ERROR(ops::Copy(stream, buf, param));
      // Another rank's update: this rank's compute copy of it too.
      const Tensor compute = ComputeRange(*g.params[i], b - g.offsets[i], e - g.offsets[i]);
      if (compute.defined()) RETURN_IF_ERROR(ops::Cast(stream, buf, compute));
    }
    return absl::OkStatus();
  };
  std::vector<size_t> counts(size), displs(size);
  for (int64_t c0 = 0; c0 < g.total(); c0 += bucket) {
    const int64_t c1 = std::min(c0 + bucket, g.total());
    for (int r = 0; r < size; ++r) {
      const int64_t b = std::clamp(g.OwnedBegin(r), c0, c1), e = std::clamp(g.OwnedBegin(r + 1), c0, c1);
      counts[r] = static_cast<size_t>(e - b);
      displs[r] = static_cast<size_t>(b - c0);
    }
    RETURN_IF_ERROR(copy(c0, c0 + static_cast<int64_t>(displs[rank]),
                         c0 + static_cast<int64_t>(displs[rank] + counts[rank]), /*to_buffer=*/true));
    // Stream-ordered: the all-gather starts after the copy in and the copies
    // out start after it; the next bucket's copy in follows on the same
    // stream, so the one buffer is reused safely.
    float* base = static_cast<float*>(gather_buffer_.raw_data());
    absl::Status st =
        g.comm->AllGatherV(base + displs[rank], counts[rank], base, counts, displs, DType::kF32, stream);
    if (!st.ok()) return Annotate(st, absl::StrCat("ZeRO-1 parameter all-gather over ", g.comm->name()));
    for (int r = 0; r < size; ++r) {
      if (r == rank || counts[r] == 0) continue;
      RETURN_IF_ERROR(copy(c0, c0 + static_cast<int64_t>(displs[r]),
                           c0 + static_cast<int64_t>(displs[r] + counts[r]), /*to_buffer=*/false));
    }
  }
  return absl::OkStatus();
}

absl::Status Optimizer::LoadState(absl::string_view param_name, absl::string_view state_name,
                                  const Tensor& value) {
  for (ParamState& s : states_) {
    if (s.param->name != param_name) continue;
    const Tensor* dst = s.Find(state_name);
    if (dst == nullptr) break;
    if (!value.defined() || value.dtype() != DType::kF32 || value.numel() != s.end - s.begin) {
      return absl::InvalidArgumentError(absl::StrCat("optimizer state ", param_name, "/", state_name,
                                                     ": got ",
                                                     value.defined() ? value.ToString() : "undefined",
                                                     ", expected f32 with ", s.end - s.begin, " elements"));
    }
    Stream& stream = backend_->default_stream();
    RETURN_IF_ERROR(ops::Copy(stream, value.Reshape(dst->shape()), *dst));
    return stream.Synchronize();
  }
  return absl::NotFoundError(absl::StrCat("optimizer (", type_name(), ") holds no state \"", state_name,
                                          "\" for parameter ", param_name, " on this rank"));
}

absl::StatusOr<std::unique_ptr<Optimizer>> CreateOptimizer(const config::OptimConfig& config,
                                                           parallel::ParameterList& params,
                                                           const parallel::ProcessGroups& groups) {
  ASSIGN_OR_RETURN(OptimizerOptions options, OptimizerOptionsFromConfig(config));
  return Optimizer::Create(options, params, &groups);
}

}  // namespace moe::optim
