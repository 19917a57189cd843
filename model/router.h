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
// The forward's [T, E] tail after the GEMM runs on the host: the routing
// decisions have to reach the host anyway (the dispatcher's counts and the
// grouped GEMM's offsets are host values), and T x E is small next to the
// GEMMs. But the stream has little to run meanwhile (a GPU idles), so the
// per-token work (scores, choice, weights) runs on the host's threads
// (HostParallelFor), each exponential once; the sums over tokens (z loss,
// counts, capacity) stay in token order, so the plan and the losses are the
// same on any thread count (moe-bench router times it). A MoE layer splits
// Forward (EnqueueLogits, Route) to read its shared expert's gate with the
// logits and to enqueue its shared expert before the host waits, so that a
// GPU computes it meanwhile (model/moe_layer.h). The backward needs no host
// read: it is ordered on the stream (Backward).
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

// Pure host routing (exposed for tests): top-k, weights and capacity from the
// scores s [T, E] (row-major). `bias` [E], when not empty, is added to the
// scores for the choice of groups and experts only (the weights come from s).
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
  // aux and z losses. Keeps x and host copies of z, s and lse. `seq_len`: the
  // tokens of one sequence (x holds T / seq_len whole sequences), used by the
  // sequence-level aux loss; 0 = the micro-batch is one sequence.
  // EnqueueLogits, then `read`'s Start and Wait, then Route, with a read of
  // the router's own.
  absl::StatusOr<const RoutingPlan*> Forward(Stream& stream, const Tensor& x, int64_t seq_len = 0);
  // Forward in two halves, so that a MoE layer can enqueue work that does not
  // need the routing between them (its shared expert) and read other values
  // with the same host wait (its shared-expert gate). EnqueueLogits enqueues
  // the logits GEMM and adds the logits (and the expert bias) to `read`
  // (model/common.h); after read.Wait(), Route computes the plan on the host.
  absl::Status EnqueueLogits(Stream& stream, const Tensor& x, int64_t seq_len, HostReadback* read);
  absl::StatusOr<const RoutingPlan*> Route(const HostReadback& read);
  double aux_loss() const { return aux_loss_; }
  double z_loss() const { return z_loss_; }
  const RoutingPlan& plan() const { return plan_; }

  // dweights f32 [T * k] on the stream's device: d loss / d w_t,e (0 for
  // dropped assignments); aux_scale and z_scale: d loss / d aux and d loss /
  // d zl. Accumulates router.weight.grad and returns dx [T, d]. Stream-ordered
  // (no host read: the loss terms that do not depend on dweights come from the
  // forward's host copies, the rest runs as ops), so a MoE layer's backward
  // enqueues without waiting for its chunks.
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
  // Scores s from the logits z (one token's row); returns lse(z).
  double Scores(const float* z, double* s) const;
  void ComputeAuxLoss(int64_t seq_len);

  parallel::Parameter weight_;
  parallel::Parameter expert_bias_;  // value only, when has_expert_bias()
  config::MoeConfig moe_;
  bool sigmoid_ = false;
  int64_t num_experts_ = 0;
  int64_t seq_len_ = 0;  // tokens per sequence of the last Forward (sequence aux)
  Tensor x_;
  size_t logits_read_ = 0, bias_read_ = 0;  // EnqueueLogits's entries in the read
  HostReadback own_read_;                   // Forward's
  std::vector<float> z_;                    // [T, E] logits
  std::vector<double> probs_, lse_;         // [T, E] scores s, [T]
  std::vector<int64_t> pending_load_;
  RoutingPlan plan_;
  double aux_loss_ = 0, z_loss_ = 0;
};

}  // namespace moe::model

#endif  // MOE_MODEL_ROUTER_H_
