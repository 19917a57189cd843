// Router: the top-k softmax router of a MoE layer (docs/model.md), with capacity,
// the load-balancing (Switch) loss and the router z-loss.
//
//   z = x Wr^T [T, E] (device GEMM), p = softmax(z), S_t = top-k of p_t (ties to
//   the lower expert index), w_t,e = p_t,e / sum_{S_t} p (norm_topk_prob) or p_t,e;
//   capacity cap = ceil(c T k / E) per expert when c > 0, keeping the highest
//   w (ties: lower t; drop_policy "probs") or the lowest t ("position").
//   aux = aux_loss_coeff * E * sum_e f_e P_e, zl = z_loss_coeff * mean_t lse(z_t)^2.
//
// The [T, E] tail after the GEMM runs on the host: the routing decisions have to
// reach the host anyway (the dispatcher's counts and the grouped GEMM's offsets
// are host values), and T x E is small next to the GEMMs.
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

// Pure host routing (exposed for tests): top-k, weights and capacity from the
// probabilities p [T, E] (row-major). `selection` [T * k], when not empty,
// replaces the top-k choice (forced routing).
RoutingPlan ComputeRoutingPlan(absl::Span<const double> probs, int64_t num_tokens, int64_t num_experts,
                               int top_k, bool norm_topk_prob, double capacity_factor, bool drop_by_position,
                               absl::Span<const int32_t> selection = {});

class Router {
 public:
  // Creates `prefix` + "router.weight" [E, d] ~ Normal(0, init_std), replicated
  // on every rank (a dense parameter).
  absl::Status Init(Stream& stream, const std::string& prefix, const config::ModelConfig& cfg, float init_std,
                    uint64_t seed);
  // x [T, d] -> the routing plan (valid until the next Forward); computes the
  // aux and z losses. Keeps x and host copies of p and lse.
  absl::StatusOr<const RoutingPlan*> Forward(Stream& stream, const Tensor& x);
  double aux_loss() const { return aux_loss_; }
  double z_loss() const { return z_loss_; }
  const RoutingPlan& plan() const { return plan_; }

  // dweights [T * k]: d loss / d w_t,e (0 for dropped assignments); aux_scale and
  // z_scale: d loss / d aux and d loss / d zl. Accumulates router.weight.grad
  // and returns dx [T, d].
  absl::StatusOr<Tensor> Backward(Stream& stream, absl::Span<const float> dweights, float aux_scale,
                                  float z_scale);

  parallel::Parameter& weight() { return weight_; }

 private:
  parallel::Parameter weight_;
  config::MoeConfig moe_;
  int64_t num_experts_ = 0;
  Tensor x_;
  std::vector<double> probs_, lse_;  // [T, E], [T]
  RoutingPlan plan_;
  double aux_loss_ = 0, z_loss_ = 0;
};

}  // namespace moe::model

#endif  // MOE_MODEL_ROUTER_H_
