// Small pieces every layer of model/ shares: how a rank's part of the model is
// cut (ShardPlan), parameter creation with the docs/model.md initialisation, and
// host <-> device staging of small arrays.
//
// Conventions of model/ (llm.c style, no autograd):
//   - Activations are [T, d] row-major (T = B * S tokens, token t = b * S + s).
//   - Forward(stream, x) returns a new output tensor and keeps, in the layer,
//     what its Backward needs; Backward(stream, dy) consumes that (releasing
//     it), ACCUMULATES (+=) into every parameter's grad and returns dx. One
//     Forward is followed by at most one Backward.
//   - Everything runs on the stream passed in, through runtime/core/ops.h; no
//     layer touches device memory directly.
#ifndef MOE_MODEL_COMMON_H_
#define MOE_MODEL_COMMON_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "comm/communicator.h"
#include "parallel/layout.h"
#include "parallel/parameter.h"
#include "runtime/core/backend.h"
#include "runtime/core/config.pb.h"
#include "runtime/core/tensor.h"

namespace moe::model {

// Which part of the model this rank holds. Single rank: the defaults.
// Tensor parallelism (tp_size > 1) shards attention heads and FFN columns;
// expert parallelism gives EP rank r the experts [r * E / ep_size, (r + 1) * E / ep_size).
struct ShardPlan {
  int tp_size = 1, tp_rank = 0;
  int ep_size = 1, ep_rank = 0;
  // The TP group (tp_size ranks; required when tp_size > 1): attention and the
  // dense MLP all-reduce their row-parallel outputs and their inputs' grads on
  // it (Megatron's f/g). Borrowed; must outlive the model.
  comm::Communicator* tp_group = nullptr;
  // parallel.expert_tensor_parallel: each TP rank holds the ffn slice
  // [Fe r / tp, Fe (r + 1) / tp) of every local expert (gate/up
  // split on dim 1, down on dim 2) and the experts' output is summed over the
  // TP group; false: experts are replicated over TP (duplicate-token dropping).
  bool expert_tp = false;
  // Experts [begin, end) held by this rank for num_experts E.
  int64_t expert_begin(int64_t num_experts) const {
    return parallel::OwnedExperts(num_experts, ep_size, ep_rank).first;
  }
  int64_t expert_end(int64_t num_experts) const {
    return parallel::OwnedExperts(num_experts, ep_size, ep_rank).second;
  }
};

// The TP group the experts are sharded over (expert tensor parallelism), or
// null (experts replicated over TP, or TP = 1).
comm::Communicator* ExpertTpGroup(const ShardPlan& plan);
// The TP group the token dispatcher splits the tokens over (DeepSpeed-TED's
// duplicate-token dropping, for experts replicated over TP), or null (TP = 1,
// or expert TP: every TP rank then sends all its tokens, since each expert's
// ffn slices are on every TP rank).
comm::Communicator* TedGroup(const ShardPlan& plan);

// Tensor-parallel shards of a Linear weight [out, in] (tp_dim -1 when tp_size 1):
// column-parallel splits the output rows, row-parallel the input columns.
parallel::ShardSpec ColumnParallelShard(int64_t out_features, const ShardPlan& plan);
parallel::ShardSpec RowParallelShard(int64_t in_features, const ShardPlan& plan);

// How a parameter is initialised (docs/model.md): Normal(0, std) by Philox over the
// global element index, or the constant 1 (norm gains).
struct InitSpec {
  enum Kind { kNormal, kOnes } kind = kNormal;
  float std = 0.02f;
  static InitSpec Normal(float std) { return {kNormal, std}; }
  static InitSpec Ones() { return {kOnes, 0.0f}; }
};

// Fills `p` (name, global shape, kind, shard, weight decay default), allocates
// its local value (MemoryCategory::kParameters) and zeroed grad (kGradients) on
// stream's backend, and initialises the value: element i of the global tensor
// depends only on (seed, name, i), whatever shard this rank holds.
absl::Status CreateParameter(Stream& stream, std::string name, Shape global_shape, parallel::ParamKind kind,
                             const parallel::ShardSpec& shard, InitSpec init, uint64_t seed,
                             parallel::Parameter* p);

// A new activation tensor (MemoryCategory::kActivations), uninitialised. Layers
// pass their input's dtype for tensors in the compute dtype (bf16 under
// train.precision bf16) and leave f32 for what stays f32 in every precision
// (rstd, lse, routing, losses: ops.h "Precision").
absl::StatusOr<Tensor> NewActivation(Stream& stream, Shape shape, DType dtype = DType::kF32);

// `t` itself when it is of `dtype`, else a new activation holding t converted
// (f32 routing gradients entering a bf16 GEMM).
absl::StatusOr<Tensor> CastActivation(Stream& stream, const Tensor& t, DType dtype);

// Gives every parameter of `params` a compute copy of `dtype` (Parameter::compute:
// a bf16 copy of the f32 master, MemoryCategory::kParameters) and fills it;
// dtype f32 removes the copies (the layers then read the masters).
absl::Status SetComputeCopies(Stream& stream, const parallel::ParameterList& params, DType dtype);
// Copies every master `value` into its compute copy (rounding to bf16), after the
// optimizer step or a checkpoint load changed the masters. No-op without copies.
absl::Status RefreshComputeCopies(Stream& stream, const parallel::ParameterList& params);

// Host staging of small arrays (routing tables, indices, scalars). ToHost
// synchronizes the stream; FromHost does not wait (Tensor::FromHostOn: the
// values land in stream order, for work enqueued on `stream` after it).
absl::StatusOr<std::vector<float>> ToHostFloats(Stream& stream, const Tensor& t);
absl::StatusOr<Tensor> FromHostFloats(Stream& stream, absl::Span<const float> values, Shape shape,
                                      MemoryCategory category = MemoryCategory::kActivations);
absl::StatusOr<Tensor> FromHostInts(Stream& stream, absl::Span<const int32_t> values, Shape shape,
                                    MemoryCategory category = MemoryCategory::kActivations);
// Several small host arrays uploaded in one copy: one device buffer and one
// Stream::CopyFromHost for all (a GPU pays a copy's fixed cost once, not per
// array). Each Add returns the index of its tensor in Upload's result, a view
// of that buffer with the shape and dtype added (each at a 256-byte aligned
// offset), in stream order as FromHostFloats gives it; the views keep the
// whole buffer alive. The arrays are copied at Add: the caller's may go.
//
//   HostUploads up;
//   const size_t tok = up.AddInts(token_ids, Shape{n}), w = up.AddFloats(weights, Shape{n});
//   ASSIGN_OR_RETURN(std::vector<Tensor> t, up.Upload(stream));
class HostUploads {
 public:
  size_t AddFloats(absl::Span<const float> values, Shape shape);
  size_t AddInts(absl::Span<const int32_t> values, Shape shape);
  // An error names the array whose values do not match its shape.
  absl::StatusOr<std::vector<Tensor>> Upload(Stream& stream,
                                             MemoryCategory category = MemoryCategory::kActivations);

 private:
  size_t Add(const void* data, size_t count, DType dtype, Shape shape);
  struct Entry {
    size_t offset;
    size_t count;
    DType dtype;
    Shape shape;
  };
  std::vector<unsigned char> bytes_;
  std::vector<Entry> entries_;
};

// Several f32 or i32 device tensors read to the host with one wait, without waiting
// for the work enqueued after them. Add each tensor; Start enqueues their
// copies into one page-locked staging buffer (Backend::AllocatePinnedHost,
// kept and reused by later reads, so it is allocated once per size) and
// records an event; work enqueued after Start runs on while the host waits in
// Wait, which blocks until the copies landed (one host wait, however many
// tensors; an asynchronous error of the stream up to the copies is its
// status). values(i) (f32) or int_values(i) (i32) then holds tensor i's
// values, until Reset. A MoE layer reads its router's choice (i32 experts,
// f32 scores), the losses' sums and the shared-expert gate logits in one
// read, and enqueues its shared expert between Start and Wait, so that on a
// GPU the shared expert runs while the host plans (model/moe_layer.h).
//
//   HostReadback read;
//   const size_t z = read.Add(logits);
//   RETURN_IF_ERROR(read.Start(stream));
//   ... enqueue work that does not need the values ...
//   RETURN_IF_ERROR(read.Wait());  // or Collect() after a wait for later work
//   absl::Span<const float> zv = read.values(z);
class HostReadback {
 public:
  // The index of t's values; t must be f32 or i32 (checked by Start) and
  // stay unchanged until the read lands. The read holds t until Wait.
  size_t Add(const Tensor& t);
  // FailedPrecondition when a started read was not waited for.
  absl::Status Start(Stream& stream);
  absl::Status Wait();
  // Wait for a read whose copies have landed already, because the host has
  // since waited for later work of the same stream (a Stream::Synchronize,
  // another read's Wait): it takes the values without a host wait of its own.
  // FailedPrecondition, naming the fix, when they have not landed (the event
  // is queried, never waited on). An asynchronous error of the stream is the
  // status of the wait that passed the copies. The trainer takes the step's
  // losses this way after the gradient norm's wait, and the new expert
  // biases after the step end's.
  absl::Status Collect();
  // Tensor i's values after Wait (empty before, or for a tensor of the
  // other dtype).
  absl::Span<const float> values(size_t i) const;
  absl::Span<const int32_t> int_values(size_t i) const;
  // Forgets the tensors and values; keeps the staging buffer and the event.
  void Reset();

 private:
  void Landed();  // releases the tensors; values() answers

  std::vector<Tensor> tensors_;           // released by Wait
  std::vector<size_t> offsets_, counts_;  // in 4-byte words, into the staging buffer
  std::vector<DType> dtypes_;
  std::shared_ptr<Buffer> staging_;
  std::unique_ptr<Event> landed_;
  bool started_ = false, ready_ = false;
};

// The single f32 value of a 1-element tensor (synchronizes).
absl::StatusOr<double> ReadScalar(Stream& stream, const Tensor& t);

// Checks the parts of a ModelConfig that model/ relies on (after ApplyDefaults):
// positive sizes, num_heads divisible by num_kv_heads, even head_dim, hidden_size
// divisible by num_heads, 1 <= top_k <= num_experts, drop_policy known, and that
// `plan` divides heads, FFN sizes and experts. Messages name field and value.
absl::Status ValidateModelConfig(const config::ModelConfig& cfg, const ShardPlan& plan);

// The routing options of model.moe beyond the Mixtral shape (score_function,
// aux_loss_type, expert_bias_update_rate, num_expert_groups, group_topk): one
// message per problem, naming the field, its value and the fix. Empty = valid.
// Needs num_experts and top_k positive.
std::vector<std::string> MoeRoutingProblems(const config::MoeConfig& moe);

}  // namespace moe::model

#endif  // MOE_MODEL_COMMON_H_
