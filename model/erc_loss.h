// ErcLoss: the expert-router coupling loss of one MoE layer (docs/model.md,
// "Expert-router coupling loss"; model.moe.erc_loss_coeff > 0).
//
//   R_i    = row i of the router weight [E, d]         (replicated on every rank)
//   eps_i  = min_{j != i} ||R_i - R_j|| / (2 ||R_i||)  (0 when R_i = 0; no gradient)
//   P_i,c  = R_i,c * (1 + eps_i (2 u_i,c - 1))         u in (0, 1): Philox4x32-10, key from
//            prefix + "router.erc_noise", counter (i d + c, step, seed lo, seed hi),
//            u = (first word + 1/2) 2^-32; P rounded to f32
//   M_i,j  = || P_i Wg_j^T ||_2                         Wg_j: expert j's gate_proj [Fe, d]
//   L      = coeff / E^2 * sum_i sum_{j != i} [relu(M_i,j - alpha M_i,i) + relu(M_j,i - alpha M_i,i)]
//
// The noise depends only on (train.seed, the layer, the training step, the
// element) and the router at the step's first Forward (it is drawn then and
// kept for the step: a constant, no gradient), so every layout draws the same
// proxies. An EP rank computes the
// columns M_:,j of its own experts (one [E, E * Fe_local] GEMM) and the columns
// are gathered over the EP group (E x E floats), so every rank knows L.
//
// Gradient scaling (the trainer scales each micro-batch by 1 / (dp * grad_accum)
// and the gradient sync SUMS): every rank computes the same L, but only the
// part of its gradient that flows through its own experts' columns. Summed over
// an EP group those parts give the whole gradient once, so the router's part is
// multiplied by ep_size (the DP sum then covers dp / ep_size EP groups); the
// experts' gradient is summed over the ep_rank's EDP x TP ranks (grad_sync.h),
// so it is multiplied by ep_size / tp_size.
//
// Expert tensor parallelism (ShardPlan::expert_tp): a rank holds the ffn
// slice Fe / tp of its experts' gate_proj, so its P Wg^T holds a slice of
// each activation: the squared norms are summed over the TP group before the
// square root, and the router's gradient (a sum over the ffn dimension) is
// summed over the TP group too. Each TP rank's gate_proj gradient is its own
// slice's, reduced over EDP only, so the experts' factor is ep_size.
#ifndef MOE_MODEL_ERC_LOSS_H_
#define MOE_MODEL_ERC_LOSS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "comm/communicator.h"
#include "model/common.h"

namespace moe::model {

class ErcLoss {
 public:
  // `prefix` is "model.layers.{l}.mlp."; the noise is keyed by prefix +
  // "router.erc_noise". plan: ep_size and tp_size for the gradient scaling.
  void Init(const std::string& prefix, const config::MoeConfig& moe, uint64_t seed, const ShardPlan& plan);
  bool enabled() const { return coeff_ > 0; }
  // The training step whose noise the next Forward draws (Model::SetStep).
  void set_step(int64_t step) { step_ = step; }

  // router_w [E, d]; gate_w [E_local, Fe, d] = experts [expert_begin, expert_begin + E_local);
  // `ep`: the EP group when ep_size > 1 (collective: every EP rank calls this in
  // the same order), else null. Returns L and keeps what Backward needs.
  // `router_values`: router_w's values when the caller read them already (a MoE
  // layer reads them with its routing, model/moe_layer.h); empty: read here
  // (a host wait). The activations' squared norms are computed, summed over
  // the expert TP group and gathered over EP on the stream and read once
  // here (one host wait, whatever the layout).
  absl::StatusOr<double> Forward(Stream& stream, const Tensor& router_w, const Tensor& gate_w,
                                 int64_t expert_begin, comm::Communicator* ep,
                                 absl::Span<const float> router_values = {});
  // Accumulates scale * dL / d(router_w) into router_grad and scale * dL / d(gate_w)
  // into gate_grad (each times the factor above). Releases the saved state.
  absl::Status Backward(Stream& stream, float scale, const Tensor& gate_w, const Tensor& router_grad,
                        const Tensor& gate_grad);

  double loss() const { return loss_; }
  double alpha() const { return alpha_; }
  // The proxies' noise factors 1 + eps_i (2 u - 1) [E * d] and M [E, E] (row i =
  // proxy, column j = expert) of the last Forward, for tests.
  const std::vector<double>& noise() const { return delta_; }
  const std::vector<float>& activation_norms() const { return m_; }

 private:
  // delta_ from the router rows r [E, d] and step_.
  void DrawNoise(absl::Span<const float> r, int64_t E, int64_t d);

  std::string noise_name_;
  double coeff_ = 0, alpha_ = 1;
  uint64_t seed_ = 0;
  int64_t step_ = 0, noise_step_ = -1;  // noise_step_: the step delta_ was drawn for
  int ep_size_ = 1, tp_size_ = 1;
  comm::Communicator* expert_tp_ = nullptr;  // ExpertTpGroup(plan)
  // Forward state.
  int64_t num_experts_ = 0, hidden_ = 0, local_ = 0, ffn_ = 0, expert_begin_ = 0;
  std::vector<double> delta_;  // [E * d]
  std::vector<float> m_;       // [E * E], M_i,j at i * E + j
  Tensor act_;                 // [E, E_local * Fe]: P Wg_local^T, on the device
  Tensor rows_;                // i32 [E * E_local]: 0, 1, ... (act_'s rows as [E * E_local, Fe]); kept
  Tensor proxies_;             // [E, d]
  double loss_ = 0;
};

}  // namespace moe::model

#endif  // MOE_MODEL_ERC_LOSS_H_
