#include "model/router.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>

#include "runtime/core/backend.h"
#include "runtime/core/kernel_math.h"
#include "runtime/core/op_profile.h"
#include "runtime/core/ops.h"
#include "runtime/core/rng.h"
#include "runtime/core/status.h"

namespace moe::model {

int64_t RoutingPlan::num_dropped() const {
  int64_t n = 0;
  for (uint8_t k : kept) n += k ? 0 : 1;
  return n;
}

RoutingPlan PlanFromChoice(absl::Span<const int32_t> experts, absl::Span<const float> selected,
                           int64_t num_tokens, int64_t num_experts, const RoutingOptions& options) {
  const int64_t T = num_tokens, E = num_experts;
  const int k = options.top_k;
  RoutingPlan plan;
  plan.num_tokens = T;
  plan.num_experts = E;
  plan.top_k = k;
  plan.experts.assign(experts.begin(), experts.end());
  plan.weights.resize(T * k);
  plan.kept.assign(T * k, 1);
  plan.selected_per_expert.assign(E, 0);
  plan.tokens_per_expert.assign(E, 0);
  for (int64_t t = 0; t < T; ++t) {
    const float* p = selected.data() + t * k;
    double sum = 0;
    for (int j = 0; j < k; ++j) sum += p[j];
    for (int j = 0; j < k; ++j)
      plan.weights[t * k + j] = static_cast<float>(options.norm_topk_prob ? p[j] / sum : p[j]);
  }
  for (int64_t a = 0; a < T * k; ++a) ++plan.selected_per_expert[plan.experts[a]];
  if (options.capacity_factor > 0) {
    plan.capacity = static_cast<int64_t>(
        std::ceil(options.capacity_factor * static_cast<double>(T) * k / static_cast<double>(E)));
    std::vector<std::vector<int64_t>> by_expert(E);  // assignments, ascending t
    for (int64_t a = 0; a < T * k; ++a) by_expert[plan.experts[a]].push_back(a);
    for (int64_t e = 0; e < E; ++e) {
      std::vector<int64_t>& list = by_expert[e];
      if (static_cast<int64_t>(list.size()) <= plan.capacity) continue;
      if (!options.drop_by_position) {
        // Highest weight first, ties to the lower token (a / k orders tokens).
        std::stable_sort(list.begin(), list.end(),
                         [&](int64_t a, int64_t b) { return plan.weights[a] > plan.weights[b]; });
      }
      for (size_t i = plan.capacity; i < list.size(); ++i) plan.kept[list[i]] = 0;
    }
  }
  for (int64_t a = 0; a < T * k; ++a)
    if (plan.kept[a]) ++plan.tokens_per_expert[plan.experts[a]];
  return plan;
}

RoutingPlan ComputeRoutingPlan(absl::Span<const double> probs, int64_t num_tokens, int64_t num_experts,
                               int top_k, bool norm_topk_prob, double capacity_factor, bool drop_by_position,
                               absl::Span<const int32_t> selection) {
  RoutingOptions options;
  options.top_k = top_k;
  options.norm_topk_prob = norm_topk_prob;
  options.capacity_factor = capacity_factor;
  options.drop_by_position = drop_by_position;
  return ComputeRoutingPlan(probs, {}, num_tokens, num_experts, options, selection);
}

RoutingPlan ComputeRoutingPlan(absl::Span<const double> scores, absl::Span<const float> bias,
                               int64_t num_tokens, int64_t num_experts, const RoutingOptions& options,
                               absl::Span<const int32_t> selection) {
  const int64_t T = num_tokens, E = num_experts;
  const int k = options.top_k;
  std::vector<int32_t> experts(T * k);
  std::vector<float> selected(T * k), row(E);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t e = 0; e < E; ++e) row[e] = static_cast<float>(scores[t * E + e]);
    if (selection.empty()) {
      kmath::RouterChooseRow(row.data(), bias.empty() ? nullptr : bias.data(), E, k, options.num_groups,
                             options.group_topk, experts.data() + t * k, selected.data() + t * k);
      continue;
    }
    for (int j = 0; j < k; ++j) {
      experts[t * k + j] = selection[t * k + j];
      selected[t * k + j] = row[selection[t * k + j]];
    }
  }
  return PlanFromChoice(experts, selected, T, E, options);
}

absl::Status Router::Init(Stream& stream, const std::string& prefix, const config::ModelConfig& cfg,
                          float init_std, uint64_t seed) {
  moe_ = cfg.moe();
  num_experts_ = moe_.num_experts();
  sigmoid_ = moe_.score_function() == "sigmoid";
  pending_load_.assign(num_experts_, 0);
  if (moe_.expert_bias_update_rate() > 0) {
    expert_bias_.name = prefix + "router.expert_bias";
    expert_bias_.global_shape = Shape{num_experts_};
    expert_bias_.kind = parallel::ParamKind::kDense;
    expert_bias_.weight_decay = false;
    ASSIGN_OR_RETURN(expert_bias_.value, Tensor::Empty(stream.backend(), expert_bias_.global_shape,
                                                       DType::kF32, MemoryCategory::kParameters));
    RETURN_IF_ERROR(ops::Fill(stream, expert_bias_.value, 0.0));
  }
  return CreateParameter(stream, prefix + "router.weight", Shape{num_experts_, cfg.hidden_size()},
                         parallel::ParamKind::kDense, parallel::ShardSpec{}, InitSpec::Normal(init_std), seed,
                         &weight_);
}

absl::Status Router::UpdateExpertBias(Stream& stream, absl::Span<const double> load) {
  const int64_t E = num_experts_;
  if (!has_expert_bias()) {
    return absl::FailedPreconditionError(
        absl::StrCat("Router::UpdateExpertBias: ", weight_.name,
                     " has no expert bias (model.moe.expert_bias_update_rate = 0)"));
  }
  if (static_cast<int64_t>(load.size()) != E) {
    return absl::InvalidArgumentError(
        absl::StrCat("Router::UpdateExpertBias: ", load.size(), " loads for ", E, " experts"));
  }
  double mean = 0;
  for (double l : load) mean += l;
  mean /= static_cast<double>(E);
  // The step rate * sign is known on the host: uploaded and added on the
  // stream (one f32 add, as the host would make it), so nothing waits.
  const float rate = static_cast<float>(moe_.expert_bias_update_rate());
  std::vector<float> step(E);
  for (int64_t e = 0; e < E; ++e) {
    const float sign = load[e] < mean ? 1.0f : (load[e] > mean ? -1.0f : 0.0f);
    step[e] = rate * sign;
  }
  ASSIGN_OR_RETURN(Tensor staged, FromHostFloats(stream, step, expert_bias_.global_shape));
  RETURN_IF_ERROR(ops::Add(stream, expert_bias_.value, staged, expert_bias_.value));
  std::fill(pending_load_.begin(), pending_load_.end(), 0);
  return absl::OkStatus();
}

namespace {

// Forced routing: slot j of token t goes to a hot expert with probability
// `fraction`, else to a uniform expert. A draw the token already holds is
// redrawn, except a hot draw once the token holds every hot expert (possible
// only when hot_experts < top_k): that slot repeats the hot expert, as the LLEP
// paper's benchmark routing does, so that the fraction of all assignments asked
// for really lands in the hot experts (95% into 1 expert with top_k = 2 needs
// most tokens to send both slots there).
// The sequences the aux loss averages over in a micro-batch of T tokens: T /
// seq_len with aux_loss_type "sequence", else 1 (the whole micro-batch).
int64_t AuxSequences(const config::MoeConfig& moe, int64_t T, int64_t seq_len) {
  return moe.aux_loss_type() == "sequence" ? T / seq_len : 1;
}

std::vector<int32_t> ForcedSelection(const config::ForcedRouting& fr, const std::string& name, int64_t T,
                                     int64_t E, int k) {
  std::vector<int32_t> sel(T * k);
  const PhiloxKey key = PhiloxKeyFromName(name);
  const uint64_t seed = fr.seed();
  const int64_t hot = std::clamp<int64_t>(fr.hot_experts(), 1, E);
  const int32_t first_hot = static_cast<int32_t>(std::clamp<int64_t>(fr.first_hot_expert(), 0, E - hot));
  for (int64_t t = 0; t < T; ++t) {
    const auto first = sel.begin() + t * k;
    for (int j = 0; j < k; ++j) {
      const auto held = [&](int32_t e) { return std::find(first, first + j, e) != first + j; };
      int64_t hot_held = 0;
      for (int32_t h = 0; h < hot; ++h) hot_held += held(first_hot + h) ? 1 : 0;
      int32_t e = -1;
      for (uint32_t attempt = 0; attempt < 64 && e < 0; ++attempt) {
        const PhiloxCounter c =
            Philox4x32_10({static_cast<uint32_t>(t), static_cast<uint32_t>(j) | (attempt << 16),
                           static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)},
                          key);
        const double u = (c[0] + 0.5) / 4294967296.0;
        const bool hot_draw = u < fr.fraction();
        const int32_t cand = static_cast<int32_t>(hot_draw ? first_hot + c[1] % hot : c[1] % E);
        if (!held(cand) || (hot_draw && hot_held == hot)) e = cand;
      }
      for (int32_t cand = 0; cand < E && e < 0; ++cand) {  // pathological draws: the lowest unused expert
        if (!held(cand)) e = cand;
      }
      sel[t * k + j] = e;
    }
  }
  return sel;
}

}  // namespace

absl::StatusOr<const RoutingPlan*> Router::Forward(Stream& stream, const Tensor& x, int64_t seq_len) {
  own_read_.Reset();
  RETURN_IF_ERROR(EnqueueLogits(stream, x, seq_len, &own_read_));
  RETURN_IF_ERROR(own_read_.Start(stream));
  RETURN_IF_ERROR(own_read_.Wait());
  return Route(own_read_);
}

absl::Status Router::EnqueueLogits(Stream& stream, const Tensor& x, int64_t seq_len, HostReadback* read) {
  ProfileScope profile(ProfileCategory::kRouter);
  const int64_t T = x.size(0), E = num_experts_;
  const int k = moe_.top_k();
  if (seq_len < 0 || (seq_len > 0 && T % seq_len != 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("Router::Forward: ", T, " tokens are not whole sequences of seq_len = ", seq_len));
  }
  seq_len_ = seq_len > 0 ? seq_len : T;
  ASSIGN_OR_RETURN(Tensor logits, NewActivation(stream, Shape{T, E}));
  RETURN_IF_ERROR(ops::Gemm(stream, x, false, weight_.compute_value(), true, logits));
  // Forced routing (benchmarks): the choice depends on (seed, name, T) only,
  // so it is drawn and uploaded once per micro-batch size and kept.
  if (moe_.forced_routing().fraction() > 0 && (!forced_.defined() || forced_.size(0) != T)) {
    const std::vector<int32_t> forced = ForcedSelection(moe_.forced_routing(), weight_.name, T, E, k);
    ASSIGN_OR_RETURN(forced_, Tensor::FromHostOn(stream, Shape{T, k}, DType::kI32, forced.data(),
                                                 forced.size() * sizeof(int32_t), MemoryCategory::kOther));
  }
  // Scores, lse and the choice on the stream (kept for the backward: the
  // scores and lse, and the sigmoid router's logits and aux scores).
  ASSIGN_OR_RETURN(scores_, NewActivation(stream, Shape{T, E}));
  ASSIGN_OR_RETURN(lse_, NewActivation(stream, Shape{T}));
  ASSIGN_OR_RETURN(Tensor experts, NewActivation(stream, Shape{T, k}, DType::kI32));
  ASSIGN_OR_RETURN(Tensor selected, NewActivation(stream, Shape{T, k}));
  Tensor aux_scores = scores_;
  logits_ = Tensor();
  if (sigmoid_) {
    ASSIGN_OR_RETURN(aux_scores, NewActivation(stream, Shape{T, E}));
    logits_ = logits;
  }
  RouterChoice choice;
  choice.sigmoid = sigmoid_;
  choice.top_k = k;
  choice.num_groups = std::max(1, moe_.num_expert_groups());
  choice.group_topk = moe_.group_topk();
  RETURN_IF_ERROR(ops::RouterScores(stream, logits, has_expert_bias() ? expert_bias_.value : Tensor(),
                                    forced_, choice, scores_, sigmoid_ ? aux_scores : Tensor(), lse_, experts,
                                    selected));
  // The losses' sums over tokens, in one tensor (one copy): the aux scores'
  // column sums per sequence ([B, E]; B = 1, the whole micro-batch, unless
  // aux_loss_type is "sequence"), then sum_t lse_t^2 (the z loss). B > 1: one
  // batched product with a column of ones (sums_b = q_b^T 1), so the launches
  // do not grow with the sequences of a micro-batch.
  const int64_t B = AuxSequences(moe_, T, seq_len_), S = T / B;
  ASSIGN_OR_RETURN(Tensor sums, NewActivation(stream, Shape{B * E + 1}));
  if (B == 1) {
    RETURN_IF_ERROR(ops::SumRows(stream, aux_scores, sums.Slice(0, E)));
  } else {
    ASSIGN_OR_RETURN(Tensor ones, NewActivation(stream, Shape{1, S, 1}));
    RETURN_IF_ERROR(ops::Fill(stream, ones, 1.0));
    RETURN_IF_ERROR(ops::BatchedGemm(stream, aux_scores.Reshape(Shape{B, S, E}), true, ones, false,
                                     sums.Slice(0, B * E).Reshape(Shape{B, E, 1})));
  }
  RETURN_IF_ERROR(ops::ReduceSumSquares(stream, lse_, sums.Slice(B * E, B * E + 1)));
  experts_read_ = read->Add(experts);
  selected_read_ = read->Add(selected);
  sums_read_ = read->Add(sums);
  x_ = x;
  return absl::OkStatus();
}

absl::StatusOr<const RoutingPlan*> Router::Route(const HostReadback& read) {
  ProfileScope profile(ProfileCategory::kRouter);
  const int64_t T = x_.size(0), E = num_experts_;
  const int k = moe_.top_k();
  const absl::Span<const int32_t> experts = read.int_values(experts_read_);
  const absl::Span<const float> selected = read.values(selected_read_);
  const absl::Span<const float> sums = read.values(sums_read_);
  if (static_cast<int64_t>(experts.size()) != T * k || static_cast<int64_t>(selected.size()) != T * k ||
      sums.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "Router::Route: ", weight_.name, "'s choice was not read (EnqueueLogits, then the read's Wait)"));
  }
  for (int64_t a = 0; a < T * k; ++a) {
    if (experts[a] < 0 || experts[a] >= E) {
      return absl::InternalError(absl::StrCat("Router::Route: ", weight_.name, " chose expert ", experts[a],
                                              " for token ", a / k, " (outside [0, ", E, "))"));
    }
  }
  RoutingOptions options;
  options.top_k = k;
  options.norm_topk_prob = moe_.norm_topk_prob();
  options.capacity_factor = moe_.capacity_factor();
  options.drop_by_position = moe_.drop_policy() == "position";
  options.num_groups = std::max(1, moe_.num_expert_groups());
  options.group_topk = moe_.group_topk();
  plan_ = PlanFromChoice(experts, selected, T, E, options);
  selected_.assign(selected.begin(), selected.end());
  ComputeAuxLoss(sums.first(sums.size() - 1));
  z_loss_ = moe_.z_loss_coeff() * static_cast<double>(sums.back()) / T;
  return &plan_;
}

void Router::SequenceCounts(int64_t B, std::vector<double>* count) const {
  const int64_t E = num_experts_, k = plan_.top_k, S = plan_.num_tokens / B;
  count->assign(B * E, 0.0);
  for (int64_t a = 0; a < plan_.num_tokens * k; ++a) (*count)[(a / k / S) * E + plan_.experts[a]] += 1.0;
}

void Router::ComputeAuxLoss(absl::Span<const float> column_sums) {
  // aux = coeff E / B sum_b sum_e (count_b,e / (S k)) (sum_{t in b} q_t,e / S)
  // over B sequences of S tokens (B = 1: the micro-batch), counts before capacity.
  const int64_t T = plan_.num_tokens, E = num_experts_, k = plan_.top_k;
  const int64_t B = static_cast<int64_t>(column_sums.size()) / E, S = T / B;
  std::vector<double> count;
  SequenceCounts(B, &count);
  double aux = 0;
  for (int64_t i = 0; i < B * E; ++i)
    aux += (count[i] / static_cast<double>(S * k)) * (static_cast<double>(column_sums[i]) / S);
  aux_loss_ = moe_.aux_loss_coeff() * E * aux / B;
}

absl::StatusOr<Tensor> Router::Backward(Stream& stream, const Tensor& dweights, float aux_scale,
                                        float z_scale) {
  ProfileScope profile(ProfileCategory::kRouter);
  const int64_t T = plan_.num_tokens, E = num_experts_;
  const int k = plan_.top_k;
  if (!dweights.defined() || dweights.dtype() != DType::kF32 || dweights.numel() != T * k) {
    return absl::InvalidArgumentError(absl::StrCat("Router::Backward: dweights ",
                                                   dweights.defined() ? dweights.ToString() : "undefined",
                                                   " must be f32 with T * k = ", T * k, " values"));
  }
  if (!scores_.defined()) {
    return absl::FailedPreconditionError(
        absl::StrCat("Router::Backward: ", weight_.name, " has no forward to differentiate"));
  }
  // d loss / d q of the aux loss (q: the aux scores) is, per sequence b and
  // expert e, aux_col * count_b,e: the host knows it from the plan. The rest
  // (through the scores, lse and the combine weights) runs on the stream.
  const int64_t B = AuxSequences(moe_, T, seq_len_), S = T / B;
  const double aux_col = aux_scale * moe_.aux_loss_coeff() * E / (static_cast<double>(B) * S * S * k);
  std::vector<double> count;
  SequenceCounts(B, &count);
  std::vector<float> daux(B * E);
  for (int64_t i = 0; i < B * E; ++i) daux[i] = static_cast<float>(aux_col * count[i]);
  const float z_coef = static_cast<float>(z_scale * moe_.z_loss_coeff() * 2.0 / T);  // times lse_t
  for (int64_t e = 0; e < E; ++e) pending_load_[e] += plan_.selected_per_expert[e];
  // d loss / d s through the combine weights, dsw [T, E]: d s_t,e of the
  // selected e = sel_t,j, from dw_t,j:
  //   norm_topk_prob (w_j = s_j / sum_i s_i): (dw_j - sum_i dw_i w_i) / sum_i s_i;
  //   else dw_j;
  // summed over the slots (a repeated expert once per slot).
  std::vector<int32_t> cell(T * k);  // t * E + sel_t,j
  for (int64_t a = 0; a < T * k; ++a) cell[a] = static_cast<int32_t>((a / k) * E + plan_.experts[a]);
  const bool norm_topk = moe_.norm_topk_prob();
  std::vector<int32_t> tokens(norm_topk ? T : 0), token_of(norm_topk ? T * k : 0);
  std::vector<float> inv_sum(norm_topk ? T * k : 0);
  for (int64_t t = 0; norm_topk && t < T; ++t) {
    tokens[t] = static_cast<int32_t>(t);
    double sum = 0;
    for (int j = 0; j < k; ++j) sum += selected_[t * k + j];
    for (int j = 0; j < k; ++j) {
      token_of[t * k + j] = static_cast<int32_t>(t);
      inv_sum[t * k + j] = static_cast<float>(1.0 / sum);
    }
  }
  // The slots of each cell, so that the device need not sort them.
  ASSIGN_OR_RETURN(const std::vector<int32_t> slots_by_cell, ops::ScatterRowOrder(cell, T * E));
  // Every host table of the backward in one copy.
  HostUploads up;
  const size_t daux_i = up.AddFloats(daux, Shape{B, E}), cell_i = up.AddInts(cell, Shape{T * k});
  const size_t by_cell_i = up.AddInts(slots_by_cell, Shape{static_cast<int64_t>(slots_by_cell.size())});
  const size_t tokens_i = up.AddInts(tokens, Shape{static_cast<int64_t>(tokens.size())});
  const size_t token_of_i = up.AddInts(token_of, Shape{static_cast<int64_t>(token_of.size())});
  const size_t weights_i =
      up.AddFloats(norm_topk ? absl::Span<const float>(plan_.weights) : absl::Span<const float>(),
                   Shape{norm_topk ? T : 0, k});
  const size_t inv_sum_i = up.AddFloats(inv_sum, Shape{static_cast<int64_t>(inv_sum.size())});
  ASSIGN_OR_RETURN(std::vector<Tensor> tables, up.Upload(stream));
  Tensor slot_grads = dweights.Reshape(Shape{T * k, 1}), slot_scale;
  if (norm_topk) {
    const Tensor token_index = tables[tokens_i], token_of_slot = tables[token_of_i];
    const Tensor weights = tables[weights_i];
    slot_scale = tables[inv_sum_i];
    // dot_t = sum_j dw_t,j w_t,j; slot_grads = dw - dot_t (per slot).
    ASSIGN_OR_RETURN(Tensor dot, NewActivation(stream, Shape{T}));
    RETURN_IF_ERROR(ops::GatherRowDot(stream, dweights.Reshape(Shape{T, k}), token_index, weights, dot));
    ASSIGN_OR_RETURN(slot_grads, NewActivation(stream, Shape{T * k, 1}));
    RETURN_IF_ERROR(ops::GatherRows(stream, dot.Reshape(Shape{T, 1}), token_of_slot, slot_grads));
    RETURN_IF_ERROR(ops::Axpby(stream, 1.0f, dweights.Reshape(Shape{T * k, 1}), -1.0f, slot_grads));
  }
  ASSIGN_OR_RETURN(Tensor dz_f32, NewActivation(stream, Shape{T, E}));
  RETURN_IF_ERROR(ops::ScatterAddRows(stream, slot_grads, tables[cell_i], dz_f32.Reshape(Shape{T * E, 1}),
                                      slot_scale, ScatterMode::kOverwrite,
                                      tables[by_cell_i]));  // cells no slot chose: 0
  // dz = the aux, z and combine-weight gradients through the scores (in place over dsw).
  RETURN_IF_ERROR(ops::RouterScoresBackward(stream, scores_, logits_, lse_, tables[daux_i], dz_f32, sigmoid_,
                                            z_coef, dz_f32));
  // Router logits and their gradient are f32; the GEMMs take them in x's dtype
  // (bf16 operands, f32 accumulation into the f32 weight gradient).
  ASSIGN_OR_RETURN(Tensor dz_dev, CastActivation(stream, dz_f32, x_.dtype()));
  RETURN_IF_ERROR(ops::Gemm(stream, dz_dev, true, x_, false, weight_.grad, 1.0f, 1.0f));
  ASSIGN_OR_RETURN(Tensor dx, NewActivation(stream, x_.shape(), x_.dtype()));
  RETURN_IF_ERROR(ops::Gemm(stream, dz_dev, false, weight_.compute_value(), false, dx));
  x_ = Tensor();
  scores_ = Tensor();
  lse_ = Tensor();
  logits_ = Tensor();
  return dx;
}

}  // namespace moe::model
