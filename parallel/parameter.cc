#include "parallel/parameter.h"

#include <array>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace moe::parallel {

const char* ParamKindName(ParamKind k) {
  switch (k) {
    case ParamKind::kDense:
      return "dense";
    case ParamKind::kExpert:
      return "expert";
  }
  return "?";
}

bool Parameter::is_sharded() const { return LocalShape(global_shape, shard).numel() != global_shape.numel(); }

ShardSpec FullShard(ParamKind kind, const Shape& global_shape) {
  ShardSpec s;
  if (kind == ParamKind::kExpert && global_shape.rank() > 0) s.expert_end = global_shape[0];
  return s;
}

namespace {

// Per-dimension [begin, end) of the box a shard holds.
void ShardBox(const Shape& g, const ShardSpec& s, std::array<int64_t, kMaxTensorDims>& begin,
              std::array<int64_t, kMaxTensorDims>& end) {
  for (int i = 0; i < g.rank(); ++i) {
    begin[i] = 0;
    end[i] = g[i];
  }
  if (s.expert_end > s.expert_begin && g.rank() > 0) {
    begin[0] = s.expert_begin;
    end[0] = s.expert_end;
  }
  if (s.tp_dim >= 0 && s.tp_dim < g.rank()) {
    begin[s.tp_dim] = s.tp_begin;
    end[s.tp_dim] = s.tp_end;
  }
}

}  // namespace

Shape LocalShape(const Shape& global_shape, const ShardSpec& shard) {
  std::array<int64_t, kMaxTensorDims> b{}, e{};
  ShardBox(global_shape, shard, b, e);
  Shape out = global_shape;
  for (int i = 0; i < global_shape.rank(); ++i) out[i] = e[i] - b[i];
  return out;
}

std::vector<int64_t> ShardOffsets(const Shape& global_shape, const ShardSpec& shard) {
  std::array<int64_t, kMaxTensorDims> b{}, e{};
  ShardBox(global_shape, shard, b, e);
  return std::vector<int64_t>(b.begin(), b.begin() + global_shape.rank());
}

absl::Status ValidateShard(absl::string_view name, ParamKind kind, const Shape& g, const ShardSpec& s) {
  if (s.tp_dim >= 0) {
    if (s.tp_dim >= g.rank()) {
      return absl::InvalidArgumentError(
          absl::StrCat("parameter ", name, ": tp_dim ", s.tp_dim, " is not a dimension of ", g.ToString()));
    }
    if (kind == ParamKind::kExpert && s.tp_dim == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("parameter ", name, ": tp_dim 0 is the expert dimension; split dim 1 or 2 over TP"));
    }
    if (s.tp_begin < 0 || s.tp_end > g[s.tp_dim] || s.tp_begin >= s.tp_end) {
      return absl::InvalidArgumentError(absl::StrCat("parameter ", name, ": TP range [", s.tp_begin, ", ",
                                                     s.tp_end, ") is not a non-empty range of dim ", s.tp_dim,
                                                     " of ", g.ToString()));
    }
  }
  if (kind == ParamKind::kExpert) {
    if (g.rank() < 1 || s.expert_begin < 0 || s.expert_end > g[0] || s.expert_begin >= s.expert_end) {
      return absl::InvalidArgumentError(absl::StrCat("parameter ", name, ": expert range [", s.expert_begin,
                                                     ", ", s.expert_end, ") is not a non-empty range of the ",
                                                     g.rank() ? g[0] : 0, " experts of ", g.ToString()));
    }
  } else if (s.expert_begin != 0 || s.expert_end != 0) {
    return absl::InvalidArgumentError(absl::StrCat("parameter ", name,
                                                   ": a dense parameter has no expert range (got [",
                                                   s.expert_begin, ", ", s.expert_end, "))"));
  }
  return absl::OkStatus();
}

void ForEachLocalRun(const Shape& g, const ShardSpec& s,
                     const std::function<void(int64_t, int64_t, int64_t)>& fn) {
  const int r = g.rank();
  if (r == 0) {
    fn(0, 0, 1);
    return;
  }
  std::array<int64_t, kMaxTensorDims> b{}, e{};
  ShardBox(g, s, b, e);
  for (int i = 0; i < r; ++i)
    if (e[i] <= b[i]) return;  // empty
  // Innermost dimensions that the shard holds whole merge into one run.
  int inner = r;  // dims [inner, r) are full
  int64_t run = 1;
  while (inner > 0 && b[inner - 1] == 0 && e[inner - 1] == g[inner - 1]) {
    --inner;
    run *= g[inner];
  }
  if (inner == 0) {
    fn(0, 0, run);
    return;
  }
  // The run extends over the partial dimension inner - 1.
  const int pd = inner - 1;
  const int64_t len = (e[pd] - b[pd]) * run;
  std::array<int64_t, kMaxTensorDims> gstride{};
  int64_t st = 1;
  for (int i = r - 1; i >= 0; --i) {
    gstride[i] = st;
    st *= g[i];
  }
  // Iterate the outer index (dims [0, pd)) over the box.
  std::array<int64_t, kMaxTensorDims> idx{};
  for (int i = 0; i < pd; ++i) idx[i] = b[i];
  int64_t local = 0;
  while (true) {
    int64_t goff = b[pd] * gstride[pd];
    for (int i = 0; i < pd; ++i) goff += idx[i] * gstride[i];
    fn(goff, local, len);
    local += len;
    int i = pd - 1;
    while (i >= 0) {
      if (++idx[i] < e[i]) break;
      idx[i] = b[i];
      --i;
    }
    if (i < 0) break;
  }
}

bool DefaultWeightDecay(absl::string_view name) {
  if (absl::EndsWith(name, "norm.weight")) return false;  // layernorms and model.norm
  if (name == "model.embed_tokens.weight") return false;
  return true;
}

absl::Status ParameterList::Add(Parameter* p) {
  if (p == nullptr) return absl::InvalidArgumentError("ParameterList::Add: null parameter");
  if (p->name.empty()) return absl::InvalidArgumentError("ParameterList::Add: empty name");
  if (Find(p->name) != nullptr) {
    return absl::AlreadyExistsError(absl::StrCat("parameter ", p->name, " registered twice"));
  }
  if (absl::Status st = ValidateShard(p->name, p->kind, p->global_shape, p->shard); !st.ok()) {
    return st;
  }
  const Shape local = LocalShape(p->global_shape, p->shard);
  for (const Tensor* t : {&p->value, &p->grad}) {
    if (t->defined() && t->shape() != local) {
      return absl::InvalidArgumentError(absl::StrCat("parameter ", p->name, ": tensor ", t->ToString(),
                                                     " does not have the local shape ", local.ToString(),
                                                     " of global ", p->global_shape.ToString()));
    }
  }
  params_.push_back(p);
  return absl::OkStatus();
}

Parameter* ParameterList::Find(absl::string_view name) const {
  for (Parameter* p : params_)
    if (p->name == name) return p;
  return nullptr;
}

int64_t ParameterList::LocalNumel() const {
  int64_t n = 0;
  for (const Parameter* p : params_) n += LocalShape(p->global_shape, p->shard).numel();
  return n;
}

int64_t ParameterList::LocalNumel(ParamKind kind) const {
  int64_t n = 0;
  for (const Parameter* p : params_)
    if (p->kind == kind) n += LocalShape(p->global_shape, p->shard).numel();
  return n;
}

int64_t ParameterList::GlobalNumel() const {
  int64_t n = 0;
  for (const Parameter* p : params_) n += p->global_shape.numel();
  return n;
}

}  // namespace moe::parallel
