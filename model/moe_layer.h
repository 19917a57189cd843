// MoELayer: router -> token dispatcher -> experts -> combine (docs/model.md's MoE(x)).
// The layer drives its TokenDispatcher's one (pipelined) interface: with the
// all-to-all dispatcher (model/alltoall_dispatcher.h) parallel.overlap_chunks
// chunks, the later chunks' exchanges in flight while chunk c's experts
// compute, in forward and backward; with the local one, its one chunk.
//
//   y_t = sum_{e in S_t, kept} w_t,e SwiGLU_e(x_t) [+ g_t SwiGLU_shared(x_t)],
//   plus the layer's aux and z losses (read after Forward; their gradient
//   scales are Backward arguments). The shared expert
//   (model.moe.shared_expert_ffn_hidden_size > 0) is a DenseMLP named
//   "mlp.shared_expert.", sharded over TP like the dense MLP; g_t = 1, or
//   sigmoid(x_t . w) with model.moe.shared_expert_gate (w: "mlp.shared_expert_gate.weight" [1, d]).
//   With model.moe.erc_loss_coeff > 0 Forward also computes the expert-router
//   coupling loss (model/erc_loss.h; collective over the EP group).
//
// Forward's routing wait: the host makes the plan (model/router.h), so it
// reads the router's choice and loss sums, the shared expert's gate logits
// and, with the coupling loss, the router's rows in one HostReadback
// (model/common.h), started before the shared expert is enqueued and waited
// for after: on a GPU the shared expert computes while the host plans. (The coupling loss reads
// its activations' norms on its own: runtime/host_syncs.h.) Backward waits for
// nothing (the gate's slope g (1 - g) is uploaded with the forward's tables).
//
// Expert tensor parallelism (ShardPlan::expert_tp, parallel.expert_tensor_parallel):
// each TP rank holds a 1/tp slice of every local expert's ffn dimension
// (model/experts.h), so SwiGLU_e(x) is the sum over the TP ranks of their
// slices' outputs (Megatron's column-parallel w1/w3, row-parallel w2). The
// dispatcher must then not split tokens over TP (model::TedGroup(plan) is
// null): every TP rank receives the same rows for its experts, runs its slice
// and the partial outputs are all-reduced over the TP group right after the
// expert GEMMs, before the combine; in backward the experts' input gradients
// (partial sums through the column-parallel w1/w3) are all-reduced likewise.
// The weight gradients of the slices stay local (reduced over EDP only).
#ifndef MOE_MODEL_MOE_LAYER_H_
#define MOE_MODEL_MOE_LAYER_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/common.h"
#include "model/dense_mlp.h"
#include "model/erc_loss.h"
#include "model/experts.h"
#include "model/llep.h"
#include "model/router.h"
#include "model/token_dispatcher.h"

namespace moe::model {

class MoELayer {
 public:
  // `prefix` is "model.layers.{l}.mlp."; the experts are model.moe.experts_impl
  // over this rank's experts (plan); `dispatcher` null means a LocalTokenDispatcher.
  absl::Status Init(Stream& stream, const std::string& prefix, const config::ModelConfig& cfg, float init_std,
                    float down_std, const ShardPlan& plan, uint64_t seed,
                    std::unique_ptr<TokenDispatcher> dispatcher = nullptr);
  // x [T, d] -> y [T, d]; seq_len: tokens per sequence (Router::Forward).
  absl::StatusOr<Tensor> Forward(Stream& stream, const Tensor& x, int64_t seq_len = 0);
  // dy [T, d]; aux_scale, z_scale, erc_scale = d loss / d (this layer's aux,
  // z, erc). Returns dx.
  absl::StatusOr<Tensor> Backward(Stream& stream, const Tensor& dy, float aux_scale, float z_scale,
                                  float erc_scale);

  double aux_loss() const { return router_.aux_loss(); }
  double z_loss() const { return router_.z_loss(); }
  // The expert-router coupling loss of the last Forward (0 when
  // model.moe.erc_loss_coeff = 0); its noise follows set_step.
  double erc_loss() const { return erc_.enabled() ? erc_.loss() : 0.0; }
  void set_step(int64_t step) { erc_.set_step(step); }
  ErcLoss& erc() { return erc_; }
  const RoutingPlan& routing() const { return router_.plan(); }
  Router& router() { return router_; }
  Experts& experts() { return *experts_; }
  TokenDispatcher& dispatcher() { return *dispatcher_; }
  DenseMLP* shared_expert() { return shared_.get(); }                                     // null when absent
  parallel::Parameter* shared_expert_gate() { return gated_ ? &shared_gate_ : nullptr; }  // null when ungated
  // Appends the parameters in docs/model.md's order (router, experts, shared expert, its gate).
  absl::Status CollectParameters(parallel::ParameterList* list);
  // LLEP (model/llep.h): when set, each Forward plans over the EP group and,
  // when the plan fires, runs the all-to-all dispatcher's pipelined path with
  // the runner's reroute and experts (same results). Null: standard EP.
  void SetLlep(std::unique_ptr<LlepRunner> llep) { llep_ = std::move(llep); }
  LlepRunner* llep() { return llep_.get(); }
  // The TP group the experts are sharded over, or null (replicated over TP).
  comm::Communicator* expert_tp_group() const { return expert_tp_; }

 private:
  absl::StatusOr<Tensor> RoutedForward(Stream& stream, const Tensor& x, const RoutingPlan& plan);
  absl::StatusOr<Tensor> RoutedBackward(Stream& stream, const Tensor& dy, float aux_scale, float z_scale);
  // y += g * s, s = shared(x) (g = 1 ungated, else sigmoid of `gate_logits`
  // [T], read with the router's choice) / its backward (dx += ...).
  absl::Status SharedCombine(Stream& stream, const Tensor& x, const Tensor& s,
                             absl::Span<const float> gate_logits, const Tensor& y);
  absl::Status SharedBackward(Stream& stream, const Tensor& dy, const Tensor& dx);

  Router router_;
  ErcLoss erc_;
  std::unique_ptr<DenseMLP> shared_;
  bool gated_ = false;
  parallel::Parameter shared_gate_;
  // gated: shared(x) [T, d], x, 0..T-1, g [T], g (1 - g) [T]
  Tensor shared_out_, shared_x_, rows_, gate_, gate_slope_;
  HostReadback read_;  // the router's choice and loss sums, the gate's logits
  std::unique_ptr<TokenDispatcher> dispatcher_;
  std::unique_ptr<Experts> experts_;
  comm::Communicator* expert_tp_ = nullptr;  // ExpertTpGroup(plan)
  Tensor x_;
  std::vector<Experts::Saved> saved_;  // per chunk
  std::unique_ptr<LlepRunner> llep_;
  bool llep_active_ = false;  // this micro-batch runs through llep_
};

}  // namespace moe::model

#endif  // MOE_MODEL_MOE_LAYER_H_
