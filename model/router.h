// Router: the top-k router of a MoE layer (docs/model.md), with capacity, the
// load-balancing (Switch) loss and the router z-loss, and the DeepSeek-V3
// options (each off by default):
//
//   z = x Wr^T [T, E] (device GEMM); scores s = softmax(z) (score_function
//   "softmax") or sigmoid(z) ("sigmoid"); selection scores u = s + b with the
//   expert bias b (expert_bias_update_rate > 0, else b = 0); with group_topk > 0
//   only the group_topk best of num_expert_groups groups (by the sum of each
//   group's top_k / group_topk best u) are eligible; S_t = top-k of u_t (ties
//   to the lower expert index); w_t,e = s_t,e / sum_{S_t} s (norm_topk_prob)
//   or s_t,e; capacity cap = ceil(c T k / E) per expert when c > 0, keeping
//   the highest w (ties: lower t; drop_policy "probs") or the lowest t
//   ("position"). aux = aux_loss_coeff * E * sum_e f_e P_e over the micro-batch
//   ("batch") or averaged over its sequences ("sequence"), with P from s
//   (softmax) or s / sum_e s (sigmoid); zl = z_loss_coeff * mean_t lse(z_t)^2.
//
// The per-token work runs on the stream, in f32 (ops::RouterScores, one
// thread a token on CUDA): the scores, lse(z), the choice (bias, groups) and
// the chosen experts' scores; then the sums over tokens the losses need (the
// aux scores' column sums per sequence, sum_t lse_t^2). The host reads only
// those: the experts and their scores [T, k], the sums [B, E] and one float,
// never the [T, E] logits. It then makes the plan (weights, in double; the
// counts and the capacity, in token order) and the losses: the routing
// decisions have to reach the host (the dispatcher's counts and the grouped
// GEMM's offsets are host values). A MoE layer splits Forward (EnqueueLogits,
// Route) to read its shared expert's gate with the choice and to enqueue its
// shared expert before the host waits, so that a GPU computes it meanwhile
// (model/moe_layer.h). The backward needs no host read: the aux loss's
// gradient per sequence and expert comes from the plan's counts, the rest
// runs on the stream (ops::RouterScoresBackward).
//
// Forced routing (benchmarks, config ForcedRouting): a fraction of all
// (token, slot) assignments go to the hot_experts experts from first_hot_expert
// on, the rest
// uniformly over all experts, drawn by Philox from (seed, router name, t, slot).
// When hot_experts < top_k a token that already holds every hot expert may list
// one in a second slot (the paper's benchmark routing; without it "95% into 1
// expert" could not exceed 1 / top_k). Weights still come from p, summed over
// the slots (a repeated expert counts once per slot), so gradients flow as usual.
#ifndef MOE_MODEL_ROUTER_H_
#define MOE_MODEL_ROUTER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "model/common.h"

namespace moe::model {

// The routing of one micro-batch: host arrays indexed by assignment a = t * k + j.
struct RoutingPlan {
  int64_t num_tokens = 0, num_experts = 0;
  int top_k = 0;
  int64_t capacity = -1;                     // per expert; -1 = dropless
  std::vector<int32_t> experts;              // [T * k] expert of slot j of token t
  std::vector<float> weights;                // [T * k] combine weight w_t,e
  std::vector<uint8_t> kept;                 // [T * k] 0 when dropped by capacity
  std::vector<int64_t> selected_per_expert;  // [E] assignments before capacity
  std::vector<int64_t> tokens_per_expert;    // [E] kept assignments
  int64_t num_dropped() const;
};

struct RoutingOptions {
  int top_k = 1;
  bool norm_topk_prob = true;
  double capacity_factor = 0;  // <= 0: dropless
  bool drop_by_position = false;
  // Group-limited routing when group_topk > 0: num_groups groups of E /
  // num_groups consecutive experts, of which each token may use group_topk.
  int64_t num_groups = 1;
  int group_topk = 0;
};

// The plan from each token's choice: experts [T * k] and their scores s
// (selected [T * k]) give the weights (s / sum of the token's s in double with
// norm_topk_prob, else s), the counts and the capacity (in token order).
RoutingPlan PlanFromChoice(absl::Span<const int32_t> experts, absl::Span<const float> selected,
                           int64_t num_tokens, int64_t num_experts, const RoutingOptions& options);

// Host routing (tests and references): the choice of ops::RouterScores
// (kmath::RouterChooseRow) on the scores s [T, E] (row-major; rounded to f32),
// then PlanFromChoice. `bias` [E], when not empty, is added to the scores for
// the choice of groups and experts only (the weights come from s).
// `selection` [T * k], when not empty, replaces the choice (forced routing).
RoutingPlan ComputeRoutingPlan(absl::Span<const double> scores, absl::Span<const float> bias,
                               int64_t num_tokens, int64_t num_experts, const RoutingOptions& options,
                               absl::Span<const int32_t> selection = {});
// The softmax router's plan without bias or groups.
RoutingPlan ComputeRoutingPlan(absl::Span<const double> probs, int64_t num_tokens, int64_t num_experts,
                               int top_k, bool norm_topk_prob, double capacity_factor, bool drop_by_position,
                               absl::Span<const int32_t> selection = {});

class Router {
 public:
  // Creates `prefix` + "router.weight" [E, d] ~ Normal(0, init_std), replicated
  // on every rank (a dense parameter), and with expert_bias_update_rate > 0 the
  // state `prefix` + "router.expert_bias" [E] (zeros; not trained by the
  // optimizer, kept by checkpoints).
  absl::Status Init(Stream& stream, const std::string& prefix, const config::ModelConfig& cfg, float init_std,
                    uint64_t seed);
  // x [T, d] -> the routing plan (valid until the next Forward); computes the
  // aux and z losses. Keeps x, the scores s and lse on the device (and the
  // sigmoid router's logits), and the chosen scores on the host. `seq_len`: the
  // tokens of one sequence (x holds T / seq_len whole sequences), used by the
  // sequence-level aux loss; 0 = the micro-batch is one sequence.
  // EnqueueLogits, then `read`'s Start and Wait, then Route, with a read of
  // the router's own.
  absl::StatusOr<const RoutingPlan*> Forward(Stream& stream, const Tensor& x, int64_t seq_len = 0);
  // Forward in two halves, so that a MoE layer can enqueue work that does not
  // need the routing between them (its shared expert) and read other values
  // with the same host wait (its shared-expert gate). EnqueueLogits enqueues
  // the logits GEMM, ops::RouterScores and the losses' sums, and adds the
  // choice and the sums to `read` (model/common.h); after read.Wait(), Route
  // makes the plan and the losses on the host.
  absl::Status EnqueueLogits(Stream& stream, const Tensor& x, int64_t seq_len, HostReadback* read);
  absl::StatusOr<const RoutingPlan*> Route(const HostReadback& read);
  double aux_loss() const { return aux_loss_; }
  double z_loss() const { return z_loss_; }
  const RoutingPlan& plan() const { return plan_; }

  // dweights f32 [T * k] on the stream's device: d loss / d w_t,e (0 for
  // dropped assignments); aux_scale and z_scale: d loss / d aux and d loss /
  // d zl. Accumulates router.weight.grad and returns dx [T, d]. Stream-ordered
  // (no host read: the aux loss's d loss / d q per sequence and expert comes
  // from the plan, the rest runs as ops), so a MoE layer's backward enqueues
  // without waiting for its chunks.
  absl::StatusOr<Tensor> Backward(Stream& stream, const Tensor& dweights, float aux_scale, float z_scale);

  parallel::Parameter& weight() { return weight_; }

  // Auxiliary-loss-free balancing. has_expert_bias(): expert_bias_update_rate > 0.
  // expert_bias(): the bias as a state tensor (value [E] f32; no grad).
  // Every Backward adds its plan's selected_per_expert to pending_load() (the
  // training micro-batches of the step; forward-only evaluation adds nothing).
  // UpdateExpertBias(load): load [E] = the pending loads summed over the whole
  // global batch (the caller sums pending_load() over the data-parallel group);
  // b_e += rate * sign(mean_e load - load_e) in f32 (on the stream: no host
  // wait), then pending_load() = 0. Same load on every rank => same bias on
  // every rank.
  bool has_expert_bias() const { return expert_bias_.value.defined(); }
  parallel::Parameter& expert_bias() { return expert_bias_; }
  const std::vector<int64_t>& pending_load() const { return pending_load_; }
  absl::Status UpdateExpertBias(Stream& stream, absl::Span<const double> load);

 private:
  // The plan's assignments (before capacity) per sequence of T / B tokens
  // and expert: count [B * E].
  void SequenceCounts(int64_t B, std::vector<double>* count) const;
  // aux_loss_ from the aux scores' column sums [B * E] and the plan.
  void ComputeAuxLoss(absl::Span<const float> column_sums);

  parallel::Parameter weight_;
  parallel::Parameter expert_bias_;  // value only, when has_expert_bias()
  config::MoeConfig moe_;
  bool sigmoid_ = false;
  int64_t num_experts_ = 0;
  int64_t seq_len_ = 0;  // tokens per sequence of the last Forward (sequence aux)
  Tensor x_;
  Tensor scores_, lse_, logits_;  // [T, E], [T]; [T, E] (sigmoid only): kept for Backward
  Tensor forced_;                 // i32 [T, k]: forced routing's selection, kept per T
  // EnqueueLogits's entries in the read.
  size_t experts_read_ = 0, selected_read_ = 0, sums_read_ = 0;
  HostReadback own_read_;        // Forward's
  std::vector<float> selected_;  // [T * k] the chosen experts' scores
  std::vector<int64_t> pending_load_;
  RoutingPlan plan_;
  double aux_loss_ = 0, z_loss_ = 0;
};

}  // namespace moe::model

#endif  // MOE_MODEL_ROUTER_H_
