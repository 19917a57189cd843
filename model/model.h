// Model: the decoder-only MoE transformer of docs/model.md with its loss,
// explicit forward and backward (no autograd), on one rank's shard.
//
//   JobConfig job = ...; ApplyDefaults(world, &job);
//   ASSIGN_OR_RETURN(Backend * backend, GetBackend(Device::Cpu()));
//   Stream& stream = backend->default_stream();
//   ASSIGN_OR_RETURN(std::unique_ptr<Model> model,
//                    Model::Create(job.model(), stream, job.train().seed()));
//   for (Parameter* p : model->parameters()) ...    // canonical names, global shapes
//   RETURN_IF_ERROR(model->ZeroGrads(stream));
//   ASSIGN_OR_RETURN(LossParts loss, model->Forward(stream, tokens, micro_batch));
//   RETURN_IF_ERROR(model->Backward(stream, 1.0f / grad_accum));   // grads +=
//
// tokens: B sequences of S + 1 token ids, row-major (input = [:, :S], target =
// [:, 1:]); S may be at most model.seq_len. The loss of a micro-batch is
// ce + sum over MoE layers of (aux + z + erc); Backward(scale) accumulates
// scale * d loss / d param into every Parameter::grad.
#ifndef MOE_MODEL_MODEL_H_
#define MOE_MODEL_MODEL_H_

#include <functional>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "model/common.h"
#include "model/embedding.h"
#include "model/rms_norm.h"
#include "model/token_dispatcher.h"
#include "model/transformer_block.h"

namespace moe::model {

struct LossParts {
  double ce = 0;   // mean cross-entropy over the T tokens
  double aux = 0;  // load-balancing losses, summed over MoE layers
  double z = 0;    // router z-losses, summed over MoE layers
  double erc = 0;  // expert-router coupling losses, summed over MoE layers (0 when off)
  // With Forward's ce_read: the index of the cross-entropy in that read (ce
  // is 0 until the caller waits for the read and takes it from there).
  size_t ce_read = 0;
  double total() const { return ce + aux + z + erc; }
};

// Makes the token dispatcher of MoE layer `layer` (the parallel layer's
// all-to-all one); empty means LocalTokenDispatcher.
using DispatcherFactory = std::function<std::unique_ptr<TokenDispatcher>(int layer)>;

// Called by Backward after block `layer`'s backward, when that block's
// parameter grads are final for this micro-batch (gradient sync marks them
// ready); blocks come in reverse order. The embedding, final norm and lm_head
// grads are final when Backward returns.
using BlockDoneFn = std::function<absl::Status(int layer)>;

class Model {
 public:
  // Builds the model of `cfg` (after ApplyDefaults) on stream's backend and
  // initialises it from `seed` (docs/model.md). With plan.tp_size > 1,
  // plan.tp_group is required; with plan.ep_size > 1 a dispatcher factory.
  // compute_dtype (train.precision): f32, or bf16 for bf16 weight copies and
  // activations over f32 masters and gradients (docs/design.md "Precision").
  static absl::StatusOr<std::unique_ptr<Model>> Create(const config::ModelConfig& cfg, Stream& stream,
                                                       uint64_t seed, const ShardPlan& plan = {},
                                                       DispatcherFactory dispatchers = {},
                                                       DType compute_dtype = DType::kF32);

  // Forward of one micro-batch; keeps what Backward needs. Reads the
  // cross-entropy on the host (a host wait for the whole forward), unless
  // `ce_read` is given: then its device value is added to that read
  // (LossParts::ce_read) and the caller reads it later, e.g. every micro-batch's
  // at once after their backwards are enqueued (Trainer::TrainStep).
  absl::StatusOr<LossParts> Forward(Stream& stream, absl::Span<const int32_t> tokens, int64_t num_seqs,
                                    HostReadback* ce_read = nullptr);
  // Accumulates loss_scale * d(ce + aux + z + erc)/d param into every grad.
  absl::Status Backward(Stream& stream, float loss_scale = 1.0f, const BlockDoneFn& on_block_done = {});
  // Every grad = 0.
  absl::Status ZeroGrads(Stream& stream);
  // The training step (1-based) whose micro-batches the next Forwards run: it
  // seeds the per-step noise of the expert-router coupling loss, so every
  // micro-batch and every layout of a step draws the same proxies.
  void SetStep(int64_t step);
  // After the masters (Parameter::value) changed outside the optimizer
  // (checkpoint load, a hand-written update): rounds them into the bf16
  // compute copies. optim::Optimizer::Step keeps them itself.
  // No-op in f32. Enqueued on `stream`.
  absl::Status RefreshComputeWeights(Stream& stream);
  // f32 or bf16: the dtype of the weights and activations forward computes with.
  DType compute_dtype() const;

  // The parameters in docs/model.md's order (no lm_head when tied).
  const parallel::ParameterList& parameters() const { return params_; }
  // State that is not trained by the optimizer but belongs to the model and is
  // checkpointed under its canonical name (value only, no grad): the routers'
  // expert biases (model.moe.expert_bias_update_rate > 0). Empty otherwise.
  const parallel::ParameterList& buffers() const { return buffers_; }
  // Auxiliary-loss-free balancing, once per optimizer step after the update:
  // gathers every biased router's pending load (its training micro-batches
  // since the last update) into one vector, calls sum_over_data_parallel on it
  // (collective over the DP group: the load of the whole global batch), and
  // updates each bias from its slice. No-op (and no call) without biases.
  absl::Status UpdateExpertBiases(
      Stream& stream, const std::function<absl::Status(std::vector<double>&)>& sum_over_data_parallel);
  // Logits [T, V] of the last Forward (overwritten by Backward).
  const Tensor& logits() const { return logits_; }
  const config::ModelConfig& config() const { return cfg_; }
  int num_layers() const { return static_cast<int>(blocks_.size()); }
  TransformerBlock& block(int l) { return *blocks_[l]; }

 private:
  Model() = default;
  absl::Status Init(Stream& stream, uint64_t seed, const ShardPlan& plan,
                    const DispatcherFactory& dispatchers);

  config::ModelConfig cfg_;
  Embedding embed_;
  std::vector<std::unique_ptr<TransformerBlock>> blocks_;
  RMSNorm final_norm_;
  parallel::Parameter lm_head_;  // unused when tied
  parallel::ParameterList params_, buffers_;
  // Forward state.
  int64_t num_tokens_ = 0;
  Tensor targets_, hn_, logits_, lse_;
};

}  // namespace moe::model

#endif  // MOE_MODEL_MODEL_H_
