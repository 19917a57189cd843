#include "model/token_dispatcher.h"

#include "absl/strings/str_cat.h"
#include "runtime/core/op_profile.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"

namespace moe::model {

absl::StatusOr<ExpertInput> LocalTokenDispatcher::Dispatch(Stream& stream, const Tensor& x,
                                                           const RoutingPlan& plan) {
  ProfileScope profile(ProfileCategory::kPermute);
  const int64_t T = plan.num_tokens, E = plan.num_experts;
  const int k = plan.top_k;
  if (x.rank() != 2 || x.size(0) != T) {
    return absl::InvalidArgumentError(
        absl::StrCat("LocalTokenDispatcher::Dispatch: x ", x.ToString(), " is not [T = ", T, ", d]"));
  }
  if (expert_begin_ < 0 || expert_end_ > E || expert_begin_ >= expert_end_) {
    return absl::InvalidArgumentError(absl::StrCat("LocalTokenDispatcher: experts [", expert_begin_, ", ",
                                                   expert_end_, ") are not a range of the ", E, " experts"));
  }
  num_tokens_ = T;
  hidden_ = x.size(1);
  num_assignments_ = T * k;
  const int64_t num_local = expert_end_ - expert_begin_;
  ExpertInput in;
  in.offsets.assign(num_local + 1, 0);
  for (int64_t i = 0; i < num_local; ++i) {
    in.offsets[i + 1] = in.offsets[i] + plan.tokens_per_expert[expert_begin_ + i];
  }
  const int64_t n = in.offsets[num_local];
  // Rows in expert order, tokens ascending within an expert (a counting sort).
  std::vector<int64_t> fill(in.offsets.begin(), in.offsets.end() - 1);
  std::vector<int32_t> tok(n), assignment(n);
  std::vector<float> w(n);
  for (int64_t a = 0; a < T * k; ++a) {
    const int64_t e = plan.experts[a];
    if (!plan.kept[a] || e < expert_begin_ || e >= expert_end_) continue;
    const int64_t r = fill[e - expert_begin_]++;
    assignment[r] = static_cast<int32_t>(a);
    tok[r] = static_cast<int32_t>(a / k);
    w[r] = plan.weights[a];
  }
  // The rows of each token and of each assignment, so that the scatter-adds
  // back to them need not sort on the device.
  ASSIGN_OR_RETURN(const std::vector<int32_t> by_token, ops::ScatterRowOrder(tok, T));
  ASSIGN_OR_RETURN(const std::vector<int32_t> by_assignment, ops::ScatterRowOrder(assignment, T * k));
  HostUploads up;  // the five tables in one copy
  up.AddInts(tok, Shape{n});
  up.AddInts(assignment, Shape{n});
  up.AddFloats(w, Shape{n});
  up.AddInts(by_token, Shape{static_cast<int64_t>(by_token.size())});
  up.AddInts(by_assignment, Shape{static_cast<int64_t>(by_assignment.size())});
  ASSIGN_OR_RETURN(std::vector<Tensor> tables, up.Upload(stream));
  token_index_ = tables[0];
  assignment_index_ = tables[1];
  weights_ = tables[2];
  by_token_ = tables[3];
  by_assignment_ = tables[4];
  ASSIGN_OR_RETURN(in.tokens, NewActivation(stream, Shape{n, hidden_}, x.dtype()));
  if (n > 0) RETURN_IF_ERROR(ops::GatherRows(stream, x, token_index_, in.tokens));
  return in;
}

absl::StatusOr<Tensor> LocalTokenDispatcher::Combine(Stream& stream, const Tensor& expert_out) {
  ProfileScope profile(ProfileCategory::kPermute);
  ASSIGN_OR_RETURN(Tensor y, NewActivation(stream, Shape{num_tokens_, hidden_}, expert_out.dtype()));
  // y = 0, then every row adds its weighted output to its token (one kernel).
  RETURN_IF_ERROR(
      ops::ScatterAddRows(stream, expert_out, token_index_, y, weights_, ScatterMode::kOverwrite, by_token_));
  expert_out_ = expert_out;
  return y;
}

absl::StatusOr<Tensor> LocalTokenDispatcher::CombineBackward(Stream& stream, const Tensor& dy,
                                                             Tensor* dweights) {
  ProfileScope profile(ProfileCategory::kPermute);
  const int64_t n = expert_out_.size(0);
  ASSIGN_OR_RETURN(*dweights, NewActivation(stream, Shape{num_assignments_}));
  ASSIGN_OR_RETURN(Tensor d_out, NewActivation(stream, Shape{n, hidden_}, dy.dtype()));
  // d w of row r = dy[t_r] . out_r, placed at its assignment (each row is
  // one); the assignments no row has (dropped) get 0, all of them with no rows.
  ASSIGN_OR_RETURN(Tensor dw, NewActivation(stream, Shape{n}));
  RETURN_IF_ERROR(ops::GatherRowDot(stream, dy, token_index_, expert_out_, dw));
  RETURN_IF_ERROR(ops::ScatterAddRows(stream, dw.Reshape(Shape{n, 1}), assignment_index_,
                                      dweights->Reshape(Shape{num_assignments_, 1}), Tensor(),
                                      ScatterMode::kOverwrite, by_assignment_));
  // d out_r = w_r dy[t_r]: a weighted gather.
  RETURN_IF_ERROR(ops::GatherRows(stream, dy, token_index_, d_out, weights_));
  expert_out_ = Tensor();
  return d_out;
}

absl::Status LocalTokenDispatcher::DispatchBackward(Stream& stream, const Tensor& d_expert_in,
                                                    const Tensor& dx) {
  ProfileScope profile(ProfileCategory::kPermute);
  // dx = 0, then every row adds its gradient to its token (one kernel).
  RETURN_IF_ERROR(ops::ScatterAddRows(stream, d_expert_in, token_index_, dx, Tensor(),
                                      ScatterMode::kOverwrite, by_token_));
  token_index_ = weights_ = assignment_index_ = by_token_ = by_assignment_ = Tensor();
  return absl::OkStatus();
}

absl::StatusOr<Tensor> LocalTokenDispatcher::ForwardPipelined(Stream& stream, const Tensor& x,
                                                              const RoutingPlan& plan,
                                                              const ExpertFn& expert_forward,
                                                              const Reroute* reroute) {
  if (reroute != nullptr) {
    return absl::FailedPreconditionError(
        "LocalTokenDispatcher: LLEP reroutes rows to other EP ranks; it needs the all-to-all dispatcher "
        "(parallel.expert > 1)");
  }
  ASSIGN_OR_RETURN(ExpertInput in, Dispatch(stream, x, plan));
  // Global offsets: no rows for the experts of other ranks.
  const int64_t E = plan.num_experts, n = in.tokens.size(0);
  offsets_.assign(E + 1, 0);
  for (int64_t e = 0; e <= E; ++e) {
    offsets_[e] = e <= expert_begin_ ? 0 : e >= expert_end_ ? n : in.offsets[e - expert_begin_];
  }
  ASSIGN_OR_RETURN(Tensor out, expert_forward(0, in.tokens, offsets_));
  return Combine(stream, out);
}

absl::Status LocalTokenDispatcher::BackwardPipelined(Stream& stream, const Tensor& dy,
                                                     const ExpertFn& expert_backward, Tensor* dweights,
                                                     const Tensor& dx) {
  if (offsets_.empty()) {
    return absl::FailedPreconditionError("LocalTokenDispatcher::BackwardPipelined without ForwardPipelined");
  }
  ASSIGN_OR_RETURN(Tensor d_out, CombineBackward(stream, dy, dweights));
  ASSIGN_OR_RETURN(Tensor d_in, expert_backward(0, d_out, offsets_));
  offsets_.clear();
  return DispatchBackward(stream, d_in, dx);
}

}  // namespace moe::model
