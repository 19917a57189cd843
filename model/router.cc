#include "model/router.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "runtime/core/ops.h"
#include "runtime/core/rng.h"
#include "runtime/core/status.h"

namespace moe::model {

int64_t RoutingPlan::num_dropped() const {
  int64_t n = 0;
  for (uint8_t k : kept) n += k ? 0 : 1;
  return n;
}

RoutingPlan ComputeRoutingPlan(absl::Span<const double> probs, int64_t num_tokens, int64_t num_experts,
                               int top_k, bool norm_topk_prob, double capacity_factor, bool drop_by_position,
                               absl::Span<const int32_t> selection) {
  const int64_t T = num_tokens, E = num_experts;
  const int k = top_k;
  RoutingPlan plan;
  plan.num_tokens = T;
  plan.num_experts = E;
  plan.top_k = k;
  plan.experts.resize(T * k);
  plan.weights.resize(T * k);
  plan.kept.assign(T * k, 1);
  plan.selected_per_expert.assign(E, 0);
  plan.tokens_per_expert.assign(E, 0);
  std::vector<int32_t> order(E);
  for (int64_t t = 0; t < T; ++t) {
    const double* p = probs.data() + t * E;
    int32_t* sel = plan.experts.data() + t * k;
    if (!selection.empty()) {
      std::copy_n(selection.data() + t * k, k, sel);
    } else {
      std::iota(order.begin(), order.end(), 0);
      // Descending p, ties to the lower expert index.
      std::partial_sort(order.begin(), order.begin() + k, order.end(),
                        [p](int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
      std::copy_n(order.data(), k, sel);
    }
    double sum = 0;
    for (int j = 0; j < k; ++j) sum += p[sel[j]];
    for (int j = 0; j < k; ++j) {
      plan.weights[t * k + j] = static_cast<float>(norm_topk_prob ? p[sel[j]] / sum : p[sel[j]]);
      ++plan.selected_per_expert[sel[j]];
    }
  }
  if (capacity_factor > 0) {
    plan.capacity = static_cast<int64_t>(
        std::ceil(capacity_factor * static_cast<double>(T) * k / static_cast<double>(E)));
    std::vector<std::vector<int64_t>> by_expert(E);  // assignments, ascending t
    for (int64_t a = 0; a < T * k; ++a) by_expert[plan.experts[a]].push_back(a);
    for (int64_t e = 0; e < E; ++e) {
      std::vector<int64_t>& list = by_expert[e];
      if (static_cast<int64_t>(list.size()) <= plan.capacity) continue;
      if (!drop_by_position) {
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

absl::Status Router::Init(Stream& stream, const std::string& prefix, const config::ModelConfig& cfg,
                          float init_std, uint64_t seed) {
  moe_ = cfg.moe();
  num_experts_ = moe_.num_experts();
  return CreateParameter(stream, prefix + "router.weight", Shape{num_experts_, cfg.hidden_size()},
                         parallel::ParamKind::kDense, parallel::ShardSpec{}, InitSpec::Normal(init_std), seed,
                         &weight_);
}

namespace {

// Forced routing: slot j of token t goes to a hot expert with probability
// `fraction`, else to a uniform expert. A draw the token already holds is
// redrawn, except a hot draw once the token holds every hot expert (possible
// only when hot_experts < top_k): that slot repeats the hot expert, as the LLEP
// paper's benchmark routing does, so that the fraction of all assignments asked
// for really lands in the hot experts (95% into 1 expert with top_k = 2 needs
// most tokens to send both slots there).
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

absl::StatusOr<const RoutingPlan*> Router::Forward(Stream& stream, const Tensor& x) {
  const int64_t T = x.size(0), E = num_experts_;
  const int k = moe_.top_k();
  ASSIGN_OR_RETURN(Tensor logits, NewActivation(stream, Shape{T, E}));
  RETURN_IF_ERROR(ops::Gemm(stream, x, false, weight_.value, true, logits));
  ASSIGN_OR_RETURN(std::vector<float> z, ToHostFloats(stream, logits));
  probs_.assign(T * E, 0.0);
  lse_.assign(T, 0.0);
  double z_sum = 0;
  for (int64_t t = 0; t < T; ++t) {
    const float* zt = z.data() + t * E;
    const double m = *std::max_element(zt, zt + E);
    double s = 0;
    for (int64_t e = 0; e < E; ++e) s += std::exp(zt[e] - m);
    for (int64_t e = 0; e < E; ++e) probs_[t * E + e] = std::exp(zt[e] - m) / s;
    lse_[t] = m + std::log(s);
    z_sum += lse_[t] * lse_[t];
  }
  std::vector<int32_t> forced;
  if (moe_.forced_routing().fraction() > 0) {
    forced = ForcedSelection(moe_.forced_routing(), weight_.name, T, E, k);
  }
  plan_ = ComputeRoutingPlan(probs_, T, E, k, moe_.norm_topk_prob(), moe_.capacity_factor(),
                             moe_.drop_policy() == "position", forced);
  double aux = 0;
  for (int64_t e = 0; e < E; ++e) {
    double p_mean = 0;
    for (int64_t t = 0; t < T; ++t) p_mean += probs_[t * E + e];
    p_mean /= T;
    const double f = static_cast<double>(plan_.selected_per_expert[e]) / (T * k);
    aux += f * p_mean;
  }
  aux_loss_ = moe_.aux_loss_coeff() * E * aux;
  z_loss_ = moe_.z_loss_coeff() * z_sum / T;
  x_ = x;
  return &plan_;
}

absl::StatusOr<Tensor> Router::Backward(Stream& stream, absl::Span<const float> dweights, float aux_scale,
                                        float z_scale) {
  const int64_t T = plan_.num_tokens, E = num_experts_;
  const int k = plan_.top_k;
  if (static_cast<int64_t>(dweights.size()) != T * k) {
    return absl::InvalidArgumentError(absl::StrCat("Router::Backward: dweights has ", dweights.size(),
                                                   " values, expected T * k = ", T * k));
  }
  const double aux_col = aux_scale * moe_.aux_loss_coeff() * E / T;  // times f_e
  const double z_row = z_scale * moe_.z_loss_coeff() * 2.0 / T;      // times lse_t p_t,e
  std::vector<float> dz(T * E);
  std::vector<double> dp(E);
  for (int64_t t = 0; t < T; ++t) {
    const double* p = probs_.data() + t * E;
    for (int64_t e = 0; e < E; ++e) {
      dp[e] = aux_col * static_cast<double>(plan_.selected_per_expert[e]) / (T * k);
    }
    const int32_t* sel = plan_.experts.data() + t * k;
    const float* dw = dweights.data() + t * k;
    if (moe_.norm_topk_prob()) {
      // w_j = p_j / s: d p_j = (dw_j - sum_i dw_i w_i) / s.
      double s = 0, dot = 0;
      for (int j = 0; j < k; ++j) s += p[sel[j]];
      for (int j = 0; j < k; ++j) dot += dw[j] * (p[sel[j]] / s);
      for (int j = 0; j < k; ++j) dp[sel[j]] += (dw[j] - dot) / s;
    } else {
      for (int j = 0; j < k; ++j) dp[sel[j]] += dw[j];
    }
    double dot = 0;
    for (int64_t e = 0; e < E; ++e) dot += dp[e] * p[e];
    for (int64_t e = 0; e < E; ++e) {
      dz[t * E + e] = static_cast<float>(p[e] * (dp[e] - dot) + z_row * lse_[t] * p[e]);
    }
  }
  ASSIGN_OR_RETURN(Tensor dz_dev, FromHostFloats(stream, dz, Shape{T, E}));
  RETURN_IF_ERROR(ops::Gemm(stream, dz_dev, true, x_, false, weight_.grad, 1.0f, 1.0f));
  ASSIGN_OR_RETURN(Tensor dx, NewActivation(stream, x_.shape()));
  RETURN_IF_ERROR(ops::Gemm(stream, dz_dev, false, weight_.value, false, dx));
  x_ = Tensor();
  return dx;
}

}  // namespace moe::model
