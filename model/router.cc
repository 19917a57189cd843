#include "model/router.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>

#include "runtime/core/backend.h"
#include "runtime/core/op_profile.h"
#include "runtime/core/ops.h"
#include "runtime/core/rng.h"
#include "runtime/core/status.h"

namespace moe::model {
namespace {

// Tokens per chunk of the host's routing loops (~100 ns a token at 8 experts).
constexpr int64_t kRoutingGrain = 512;

// One token's k experts, best first, from its selection scores u = s + b (the
// bias only steers the choice): descending u, ties to the lower expert index;
// with group-limited routing, only among the experts of the token's
// group_topk best groups. Holds the scratch of one thread's chunk of tokens.
class ExpertChooser {
 public:
  ExpertChooser(int64_t num_experts, absl::Span<const float> bias, const RoutingOptions& options)
      : E_(num_experts), k_(options.top_k), bias_(bias), options_(options) {
    const int64_t G = options.num_groups;
    grouped_ = options.group_topk > 0 && options.group_topk < G;
    if (!bias.empty()) biased_.resize(E_);
    if (grouped_) {
      per_group_ = E_ / G;
      // A group's score: the sum of its top_k / group_topk best selection scores.
      group_best_ = std::clamp<int64_t>(k_ / options.group_topk, 1, per_group_);
      candidates_.resize(E_);
      group_order_.resize(G);
      group_score_.resize(G);
      in_group_.resize(per_group_);
    }
  }

  // Writes the choice for the scores s[0, E) into sel[0, k).
  void Choose(const double* s, int32_t* sel) {
    const double* u = s;
    if (!bias_.empty()) {
      for (int64_t e = 0; e < E_; ++e) biased_[e] = s[e] + static_cast<double>(bias_[e]);
      u = biased_.data();
    }
    if (grouped_) {
      const int64_t n = GroupCandidates(u);
      InsertBest(u, n, candidates_.data(), sel);
    } else {
      InsertBest(u, E_, nullptr, sel);
    }
  }

 private:
  // The experts of the group_topk best groups, in ascending index; returns how many.
  int64_t GroupCandidates(const double* u) {
    const int64_t G = options_.num_groups;
    for (int64_t g = 0; g < G; ++g) {
      std::copy_n(u + g * per_group_, per_group_, in_group_.begin());
      std::partial_sort(in_group_.begin(), in_group_.begin() + group_best_, in_group_.end(),
                        std::greater<>());
      group_score_[g] = std::accumulate(in_group_.begin(), in_group_.begin() + group_best_, 0.0);
    }
    std::iota(group_order_.begin(), group_order_.end(), 0);
    const auto better = [this](int32_t a, int32_t b) {
      return group_score_[a] > group_score_[b] || (group_score_[a] == group_score_[b] && a < b);
    };
    std::partial_sort(group_order_.begin(), group_order_.begin() + options_.group_topk, group_order_.end(),
                      better);
    std::sort(group_order_.begin(), group_order_.begin() + options_.group_topk);
    int64_t n = 0;
    for (int g = 0; g < options_.group_topk; ++g) {
      for (int64_t i = 0; i < per_group_; ++i)
        candidates_[n++] = static_cast<int32_t>(group_order_[g] * per_group_ + i);
    }
    return n;
  }

  // The k best of n candidates (candidates[i], or i where candidates is null),
  // which come in ascending index: an insertion that moves only past strictly
  // lower entries keeps equal ones first.
  void InsertBest(const double* u, int64_t n, const int32_t* candidates, int32_t* sel) const {
    const auto higher = [u](int32_t a, int32_t b) { return u[a] > u[b] || (u[a] == u[b] && a < b); };
    int filled = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int32_t c = candidates != nullptr ? candidates[i] : static_cast<int32_t>(i);
      if (filled == k_ && !higher(c, sel[k_ - 1])) continue;
      int pos = filled < k_ ? filled++ : k_ - 1;
      for (; pos > 0 && higher(c, sel[pos - 1]); --pos) sel[pos] = sel[pos - 1];
      sel[pos] = c;
    }
  }

  const int64_t E_;
  const int k_;
  const absl::Span<const float> bias_;
  const RoutingOptions& options_;
  bool grouped_ = false;
  int64_t per_group_ = 0, group_best_ = 0;
  std::vector<double> biased_, group_score_, in_group_;
  std::vector<int32_t> candidates_, group_order_;
};

}  // namespace

int64_t RoutingPlan::num_dropped() const {
  int64_t n = 0;
  for (uint8_t k : kept) n += k ? 0 : 1;
  return n;
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
  const double capacity_factor = options.capacity_factor;
  const bool drop_by_position = options.drop_by_position;
  RoutingPlan plan;
  plan.num_tokens = T;
  plan.num_experts = E;
  plan.top_k = k;
  plan.experts.resize(T * k);
  plan.weights.resize(T * k);
  plan.kept.assign(T * k, 1);
  plan.selected_per_expert.assign(E, 0);
  plan.tokens_per_expert.assign(E, 0);
  // Each token's choice and weights alone, on the host's threads (a chooser's
  // scratch per chunk); the counts and the capacity below run in token order.
  HostParallelFor(T, kRoutingGrain, [&](int64_t t0, int64_t t1) {
    ExpertChooser chooser(E, bias, options);
    for (int64_t t = t0; t < t1; ++t) {
      const double* p = scores.data() + t * E;
      int32_t* sel = plan.experts.data() + t * k;
      if (selection.empty())
        chooser.Choose(p, sel);
      else
        std::copy_n(selection.data() + t * k, k, sel);
      double sum = 0;
      for (int j = 0; j < k; ++j) sum += p[sel[j]];
      for (int j = 0; j < k; ++j)
        plan.weights[t * k + j] = static_cast<float>(options.norm_topk_prob ? p[sel[j]] / sum : p[sel[j]]);
    }
  });
  for (int64_t a = 0; a < T * k; ++a) ++plan.selected_per_expert[plan.experts[a]];
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

double Router::Scores(const float* zt, double* s) const {
  const int64_t E = num_experts_;
  const double m = *std::max_element(zt, zt + E);
  double sum = 0;
  if (sigmoid_) {
    for (int64_t e = 0; e < E; ++e) sum += std::exp(zt[e] - m);
    for (int64_t e = 0; e < E; ++e) s[e] = 1.0 / (1.0 + std::exp(-static_cast<double>(zt[e])));
  } else {
    // Each exponential once: kept in s, then normalised.
    for (int64_t e = 0; e < E; ++e) {
      s[e] = std::exp(zt[e] - m);
      sum += s[e];
    }
    for (int64_t e = 0; e < E; ++e) s[e] /= sum;
  }
  return m + std::log(sum);
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
  if (seq_len < 0 || (seq_len > 0 && T % seq_len != 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("Router::Forward: ", T, " tokens are not whole sequences of seq_len = ", seq_len));
  }
  seq_len_ = seq_len > 0 ? seq_len : T;
  ASSIGN_OR_RETURN(Tensor logits, NewActivation(stream, Shape{T, E}));
  RETURN_IF_ERROR(ops::Gemm(stream, x, false, weight_.compute_value(), true, logits));
  logits_read_ = read->Add(logits);
  // The bias steers the choice: read with the logits (no wait of its own).
  if (has_expert_bias()) bias_read_ = read->Add(expert_bias_.value);
  x_ = x;
  return absl::OkStatus();
}

absl::StatusOr<const RoutingPlan*> Router::Route(const HostReadback& read) {
  ProfileScope profile(ProfileCategory::kRouter);
  const int64_t T = x_.size(0), E = num_experts_;
  const int k = moe_.top_k();
  const absl::Span<const float> z = read.values(logits_read_);
  if (static_cast<int64_t>(z.size()) != T * E) {
    return absl::FailedPreconditionError(absl::StrCat(
        "Router::Route: ", weight_.name, "'s logits were not read (EnqueueLogits, then the read's Wait)"));
  }
  z_.assign(z.begin(), z.end());
  probs_.assign(T * E, 0.0);
  lse_.assign(T, 0.0);
  // Per token on the host's threads (the stream waits for the plan: on a GPU
  // it runs only what was enqueued before the wait, such as the shared
  // expert); the z-loss sum stays in token order.
  HostParallelFor(T, kRoutingGrain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) lse_[t] = Scores(z_.data() + t * E, probs_.data() + t * E);
  });
  double z_sum = 0;
  for (int64_t t = 0; t < T; ++t) z_sum += lse_[t] * lse_[t];
  std::vector<int32_t> forced;
  if (moe_.forced_routing().fraction() > 0) {
    forced = ForcedSelection(moe_.forced_routing(), weight_.name, T, E, k);
  }
  absl::Span<const float> bias;
  if (has_expert_bias()) bias = read.values(bias_read_);
  RoutingOptions options;
  options.top_k = k;
  options.norm_topk_prob = moe_.norm_topk_prob();
  options.capacity_factor = moe_.capacity_factor();
  options.drop_by_position = moe_.drop_policy() == "position";
  options.num_groups = std::max(1, moe_.num_expert_groups());
  options.group_topk = moe_.group_topk();
  plan_ = ComputeRoutingPlan(probs_, bias, T, E, options, forced);
  ComputeAuxLoss(seq_len_);
  z_loss_ = moe_.z_loss_coeff() * z_sum / T;
  return &plan_;
}

namespace {

// The scores the aux loss averages: s itself (softmax) or s / sum_e s (sigmoid).
void AuxScores(const double* s, int64_t E, bool sigmoid, double* q) {
  if (!sigmoid) {
    std::copy_n(s, E, q);
    return;
  }
  double sum = 0;
  for (int64_t e = 0; e < E; ++e) sum += s[e];
  for (int64_t e = 0; e < E; ++e) q[e] = s[e] / sum;
}

}  // namespace

void Router::ComputeAuxLoss(int64_t seq_len) {
  const int64_t T = plan_.num_tokens, E = num_experts_;
  const int k = plan_.top_k;
  if (moe_.aux_loss_type() != "sequence" && !sigmoid_) {
    double aux = 0;
    for (int64_t e = 0; e < E; ++e) {
      double p_mean = 0;
      for (int64_t t = 0; t < T; ++t) p_mean += probs_[t * E + e];
      p_mean /= T;
      const double f = static_cast<double>(plan_.selected_per_expert[e]) / (T * k);
      aux += f * p_mean;
    }
    aux_loss_ = moe_.aux_loss_coeff() * E * aux;
    return;
  }
  // Sequences of seq_len tokens ("batch": one sequence of T tokens).
  const int64_t S = moe_.aux_loss_type() == "sequence" ? seq_len : T;
  const int64_t B = T / S;
  std::vector<double> q(E), p_sum(E), count(E);
  double aux = 0;
  for (int64_t b = 0; b < B; ++b) {
    std::fill(p_sum.begin(), p_sum.end(), 0.0);
    std::fill(count.begin(), count.end(), 0.0);
    for (int64_t t = b * S; t < (b + 1) * S; ++t) {
      AuxScores(probs_.data() + t * E, E, sigmoid_, q.data());
      for (int64_t e = 0; e < E; ++e) p_sum[e] += q[e];
      for (int j = 0; j < k; ++j) count[plan_.experts[t * k + j]] += 1.0;
    }
    for (int64_t e = 0; e < E; ++e) aux += (count[e] / (S * k)) * (p_sum[e] / S);
  }
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
  const bool by_sequence = moe_.aux_loss_type() == "sequence";
  const int64_t S = by_sequence ? seq_len_ : T, B = T / S;
  // dz = dz_fixed + dz_w. dz_fixed (the aux and z losses' part) depends only
  // on the forward's routing, so the host computes it now, without waiting
  // for the stream; dz_w (through the combine weights) is linear in dweights,
  // which the stream produces, and is computed there by ops (below).
  // d loss / d q_t,e of the aux loss is aux_col * (count of e in t's sequence):
  // aux = coeff E / B sum_b sum_e (count_b,e / (S k)) (sum_{t in b} q_t,e / S).
  const double aux_col = aux_scale * moe_.aux_loss_coeff() * E / (static_cast<double>(B) * S * S * k);
  const double z_row = z_scale * moe_.z_loss_coeff() * 2.0 / T;  // times lse_t softmax(z_t)_e
  std::vector<float> dz(T * E), probs(sigmoid_ ? 0 : T * E), dsig(sigmoid_ ? T * E : 0);
  std::vector<double> dp(E), count(E);
  for (int64_t t = 0; t < T; ++t) {
    const double* p = probs_.data() + t * E;
    if (!by_sequence && !sigmoid_) {
      const double aux_f = aux_scale * moe_.aux_loss_coeff() * E / T;  // times f_e
      for (int64_t e = 0; e < E; ++e) {
        dp[e] = aux_f * static_cast<double>(plan_.selected_per_expert[e]) / (T * k);
      }
    } else {
      if (t % S == 0) {  // a new sequence: its selection counts
        std::fill(count.begin(), count.end(), 0.0);
        for (int64_t a = t * k; a < (t + S) * k; ++a) count[plan_.experts[a]] += 1.0;
      }
      for (int64_t e = 0; e < E; ++e) dp[e] = aux_col * count[e];
      if (sigmoid_) {  // q = s / sum s: d s_e = (d q_e - sum d q q) / sum s
        double sum = 0, dot = 0;
        for (int64_t e = 0; e < E; ++e) sum += p[e];
        for (int64_t e = 0; e < E; ++e) dot += dp[e] * p[e] / sum;
        for (int64_t e = 0; e < E; ++e) dp[e] = (dp[e] - dot) / sum;
      }
    }
    if (sigmoid_) {
      const float* zt = z_.data() + t * E;
      for (int64_t e = 0; e < E; ++e) {
        const double softmax = std::exp(zt[e] - lse_[t]);
        dz[t * E + e] = static_cast<float>(dp[e] * p[e] * (1.0 - p[e]) + z_row * lse_[t] * softmax);
        dsig[t * E + e] = static_cast<float>(p[e] * (1.0 - p[e]));
      }
      continue;
    }
    double dot = 0;
    for (int64_t e = 0; e < E; ++e) dot += dp[e] * p[e];
    for (int64_t e = 0; e < E; ++e) {
      dz[t * E + e] = static_cast<float>(p[e] * (dp[e] - dot) + z_row * lse_[t] * p[e]);
      probs[t * E + e] = static_cast<float>(p[e]);
    }
  }
  for (int64_t e = 0; e < E; ++e) pending_load_[e] += plan_.selected_per_expert[e];
  // dz_w on the stream. d s_t,e of the selected e = sel_t,j, from dw_t,j:
  //   norm_topk_prob (w_j = s_j / sum_i s_i): (dw_j - sum_i dw_i w_i) / sum_i s_i;
  //   else dw_j;
  // summed over the slots into dsw [T, E] (a repeated expert once per slot);
  // then dz_w = SoftmaxBackward(s, dsw) (softmax) or dsw s (1 - s) (sigmoid).
  std::vector<int32_t> cell(T * k);  // t * E + sel_t,j
  for (int64_t a = 0; a < T * k; ++a) cell[a] = static_cast<int32_t>((a / k) * E + plan_.experts[a]);
  const bool norm_topk = moe_.norm_topk_prob();
  std::vector<int32_t> tokens(norm_topk ? T : 0), token_of(norm_topk ? T * k : 0);
  std::vector<float> inv_sum(norm_topk ? T * k : 0);
  for (int64_t t = 0; norm_topk && t < T; ++t) {
    tokens[t] = static_cast<int32_t>(t);
    double sum = 0;
    for (int j = 0; j < k; ++j) sum += probs_[t * E + plan_.experts[t * k + j]];
    for (int j = 0; j < k; ++j) {
      token_of[t * k + j] = static_cast<int32_t>(t);
      inv_sum[t * k + j] = static_cast<float>(1.0 / sum);
    }
  }
  // The slots of each cell, so that the device need not sort them.
  ASSIGN_OR_RETURN(const std::vector<int32_t> slots_by_cell, ops::ScatterRowOrder(cell, T * E));
  // Every host table of the backward in one copy.
  HostUploads up;
  const size_t dz_i = up.AddFloats(dz, Shape{T, E}), cell_i = up.AddInts(cell, Shape{T * k});
  const size_t by_cell_i = up.AddInts(slots_by_cell, Shape{static_cast<int64_t>(slots_by_cell.size())});
  const size_t tokens_i = up.AddInts(tokens, Shape{static_cast<int64_t>(tokens.size())});
  const size_t token_of_i = up.AddInts(token_of, Shape{static_cast<int64_t>(token_of.size())});
  const size_t weights_i =
      up.AddFloats(norm_topk ? absl::Span<const float>(plan_.weights) : absl::Span<const float>(),
                   Shape{norm_topk ? T : 0, k});
  const size_t inv_sum_i = up.AddFloats(inv_sum, Shape{static_cast<int64_t>(inv_sum.size())});
  const size_t ds_i = up.AddFloats(sigmoid_ ? dsig : probs, Shape{T, E});
  ASSIGN_OR_RETURN(std::vector<Tensor> tables, up.Upload(stream));
  const Tensor dz_f32 = tables[dz_i], cells = tables[cell_i];
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
  ASSIGN_OR_RETURN(Tensor dsw, NewActivation(stream, Shape{T, E}));
  RETURN_IF_ERROR(ops::ScatterAddRows(stream, slot_grads, cells, dsw.Reshape(Shape{T * E, 1}), slot_scale,
                                      ScatterMode::kOverwrite, tables[by_cell_i]));  // cells no slot chose: 0
  if (sigmoid_) {
    const Tensor dsig_dev = tables[ds_i];
    RETURN_IF_ERROR(ops::Mul(stream, dsw, dsig_dev, dsw));
    RETURN_IF_ERROR(ops::Add(stream, dz_f32, dsw, dz_f32));
  } else {
    const Tensor probs_dev = tables[ds_i];
    RETURN_IF_ERROR(ops::SoftmaxBackward(stream, probs_dev, dsw, dz_f32, 1.0f, 1.0f));
  }
  // Router logits and their gradient are f32; the GEMMs take them in x's dtype
  // (bf16 operands, f32 accumulation into the f32 weight gradient).
  ASSIGN_OR_RETURN(Tensor dz_dev, CastActivation(stream, dz_f32, x_.dtype()));
  RETURN_IF_ERROR(ops::Gemm(stream, dz_dev, true, x_, false, weight_.grad, 1.0f, 1.0f));
  ASSIGN_OR_RETURN(Tensor dx, NewActivation(stream, x_.shape(), x_.dtype()));
  RETURN_IF_ERROR(ops::Gemm(stream, dz_dev, false, weight_.compute_value(), false, dx));
  x_ = Tensor();
  return dx;
}

}  // namespace moe::model
