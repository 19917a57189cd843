#include "model/experts.h"

#include "absl/strings/str_cat.h"
#include "model/swiglu.h"
#include "parallel/tensor_parallel.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"
#include "runtime/core/trace.h"

namespace moe::model {

absl::Status Experts::Init(Stream& stream, const std::string& prefix, int64_t hidden_size,
                           int64_t expert_ffn_hidden_size, int64_t num_experts, int64_t expert_begin,
                           int64_t expert_end, float init_std, float down_std, uint64_t seed, int ffn_tp_size,
                           int ffn_tp_rank) {
  using parallel::ParamKind;
  expert_begin_ = expert_begin;
  expert_end_ = expert_end;
  parallel::ShardSpec in_shard, out_shard;
  in_shard.expert_begin = out_shard.expert_begin = expert_begin_;
  in_shard.expert_end = out_shard.expert_end = expert_end_;
  ffn_ = expert_ffn_hidden_size;
  if (ffn_tp_size > 1) {
    // gate/up [E, Fe, d] column-sliced on dim 1, down [E, d, Fe] row-sliced on dim 2.
    const int64_t b = expert_ffn_hidden_size * ffn_tp_rank / ffn_tp_size;
    const int64_t e = expert_ffn_hidden_size * (ffn_tp_rank + 1) / ffn_tp_size;
    in_shard.tp_dim = 1;
    out_shard.tp_dim = 2;
    in_shard.tp_begin = out_shard.tp_begin = b;
    in_shard.tp_end = out_shard.tp_end = e;
    ffn_ = e - b;
  }
  const Shape w_in{num_experts, expert_ffn_hidden_size, hidden_size};
  const Shape w_out{num_experts, hidden_size, expert_ffn_hidden_size};
  RETURN_IF_ERROR(CreateParameter(stream, prefix + "gate_proj", w_in, ParamKind::kExpert, in_shard,
                                  InitSpec::Normal(init_std), seed, &gate_));
  RETURN_IF_ERROR(CreateParameter(stream, prefix + "up_proj", w_in, ParamKind::kExpert, in_shard,
                                  InitSpec::Normal(init_std), seed, &up_));
  return CreateParameter(stream, prefix + "down_proj", w_out, ParamKind::kExpert, out_shard,
                         InitSpec::Normal(down_std), seed, &down_);
}

absl::Status Experts::CheckInput(const Tensor& x, absl::Span<const int64_t> offsets) const {
  const int64_t e_local = num_local_experts();
  if (static_cast<int64_t>(offsets.size()) != e_local + 1 || offsets[0] != 0 ||
      offsets[e_local] != x.size(0)) {
    return absl::InvalidArgumentError(absl::StrCat("Experts::Forward: offsets must be ", e_local + 1,
                                                   " values from 0 to the ", x.size(0), " rows of x; got ",
                                                   offsets.size(), " values"));
  }
  for (int64_t i = 0; i < e_local; ++i) {
    if (offsets[i + 1] < offsets[i]) {
      return absl::InvalidArgumentError(absl::StrCat("Experts::Forward: offsets decrease at expert ", i));
    }
  }
  if (x.rank() != 2 || x.size(1) != gate_.value.size(2)) {
    return absl::InvalidArgumentError(
        absl::StrCat("Experts::Forward: x ", x.ToString(), " is not [N, ", gate_.value.size(2), "]"));
  }
  return absl::OkStatus();
}

absl::Status Experts::Keep(Stream& stream, const Tensor& x, absl::Span<const int64_t> offsets) {
  RETURN_IF_ERROR(CheckInput(x, offsets));
  const int64_t n = x.size(0);
  x_ = x;
  offsets_.assign(offsets.begin(), offsets.end());
  ASSIGN_OR_RETURN(g_, NewActivation(stream, Shape{n, ffn_}, x.dtype()));
  ASSIGN_OR_RETURN(u_, NewActivation(stream, Shape{n, ffn_}, x.dtype()));
  ASSIGN_OR_RETURN(act_, NewActivation(stream, Shape{n, ffn_}, x.dtype()));
  return absl::OkStatus();
}

void Experts::Release() { x_ = g_ = u_ = act_ = Tensor(); }

Experts::Saved Experts::TakeSaved() {
  Saved s{x_, g_, u_, act_, std::move(offsets_)};
  Release();
  offsets_.clear();
  return s;
}

void Experts::RestoreSaved(Saved saved) {
  x_ = saved.x;
  g_ = saved.g;
  u_ = saved.u;
  act_ = saved.act;
  offsets_ = std::move(saved.offsets);
}

absl::Status SumExpertPartials(comm::Communicator* expert_tp, Stream& stream, const Tensor& rows) {
  if (expert_tp == nullptr || expert_tp->size() == 1) return absl::OkStatus();
  trace::Span span(stream, "expert TP all-reduce", trace::Kind::kComm);
  return parallel::AllReduceSum(*expert_tp, stream, rows);
}

absl::StatusOr<std::unique_ptr<Experts>> MakeExperts(const std::string& impl) {
  if (impl.empty() || impl == "grouped") return std::make_unique<GroupedExperts>();
  if (impl == "sequential") return std::make_unique<SequentialExperts>();
  return absl::InvalidArgumentError(
      absl::StrCat("model.moe.experts_impl = \"", impl, "\" must be \"grouped\" or \"sequential\""));
}

// ---- SequentialExperts: one SwiGLU per expert on its rows ----------------------

absl::StatusOr<Tensor> SequentialExperts::Forward(Stream& stream, const Tensor& x,
                                                  absl::Span<const int64_t> offsets) {
  RETURN_IF_ERROR(Keep(stream, x, offsets));
  ASSIGN_OR_RETURN(Tensor y, NewActivation(stream, x.shape(), x.dtype()));
  for (int64_t i = 0; i < num_local_experts(); ++i) {
    const int64_t b = offsets_[i], e = offsets_[i + 1];
    if (b == e) continue;
    RETURN_IF_ERROR(SwiGLUForward(stream, x.Slice(b, e), gate_.compute_value().Select(i),
                                  up_.compute_value().Select(i), down_.compute_value().Select(i),
                                  g_.Slice(b, e), u_.Slice(b, e), act_.Slice(b, e), y.Slice(b, e)));
  }
  return y;
}

absl::StatusOr<Tensor> SequentialExperts::Backward(Stream& stream, const Tensor& dy) {
  ASSIGN_OR_RETURN(Tensor dx, NewActivation(stream, x_.shape(), x_.dtype()));
  ASSIGN_OR_RETURN(Tensor dact, NewActivation(stream, act_.shape(), act_.dtype()));
  for (int64_t i = 0; i < num_local_experts(); ++i) {
    const int64_t b = offsets_[i], e = offsets_[i + 1];
    if (b == e) continue;
    RETURN_IF_ERROR(SwiGLUBackward(
        stream, x_.Slice(b, e), gate_.compute_value().Select(i), up_.compute_value().Select(i),
        down_.compute_value().Select(i), g_.Slice(b, e), u_.Slice(b, e), act_.Slice(b, e), dact.Slice(b, e),
        dy.Slice(b, e), gate_.grad.Select(i), up_.grad.Select(i), down_.grad.Select(i), dx.Slice(b, e)));
  }
  Release();
  return dx;
}

// ---- GroupedExperts: one grouped GEMM per projection ----------------------------

absl::StatusOr<Tensor> GroupedExperts::Forward(Stream& stream, const Tensor& x,
                                               absl::Span<const int64_t> offsets) {
  RETURN_IF_ERROR(Keep(stream, x, offsets));
  ASSIGN_OR_RETURN(Tensor y, NewActivation(stream, x.shape(), x.dtype()));
  RETURN_IF_ERROR(GroupedSwiGLUForward(stream, x, gate_.compute_value(), up_.compute_value(),
                                       down_.compute_value(), offsets_, g_, u_, act_, y));
  return y;
}

absl::StatusOr<Tensor> GroupedExperts::Backward(Stream& stream, const Tensor& dy) {
  ASSIGN_OR_RETURN(Tensor dx, NewActivation(stream, x_.shape(), x_.dtype()));
  ASSIGN_OR_RETURN(Tensor dact, NewActivation(stream, act_.shape(), act_.dtype()));
  RETURN_IF_ERROR(GroupedSwiGLUBackward(stream, x_, gate_.compute_value(), up_.compute_value(),
                                        down_.compute_value(), offsets_, g_, u_, act_, dact, dy, gate_.grad,
                                        up_.grad, down_.grad, dx));
  Release();
  return dx;
}

}  // namespace moe::model
