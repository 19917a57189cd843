// Parameter: one entry of the list that the optimizer, the checkpoint and the
// gradient synchronisation all iterate.
//
// Each entry carries the canonical name and the global (unsharded) shape of
// docs/model.md, the local tensor this rank holds with its gradient, and
// a description of which part of the global tensor that is:
//
//   - tensor parallelism splits at most one dimension (`tp_dim`) of a parameter
//     over the TP ranks; this rank holds [tp_begin, tp_end) along it. Column-
//     parallel weights [out, in] split dim 0, row-parallel ones split dim 1.
//   - expert parameters ([E, ...]) hold the experts [expert_begin, expert_end)
//     along dim 0 (E/EP experts per EP rank; all E on one rank).
//
// Example: model.layers.0.mlp.experts.down_proj, global [8, 128, 256], EP = 2,
// TP = 1, on EP rank 1: expert_begin 4, expert_end 8, tp_dim -1; local [4, 128, 256].
// Element (e, i, j) of the local tensor is element (e + 4, i, j) of the global one.
//
// Gradients of dense parameters are reduced over the data-parallel group, those
// of expert parameters over the expert-data-parallel group (docs/design.md).
//
// Plain data: no MPI, no allocation. The tensors are handles (runtime/core/tensor.h)
// that share storage with the layer that owns the parameter, so copying a
// Parameter does not copy weights.
#ifndef MOE_PARALLEL_PARAMETER_H_
#define MOE_PARALLEL_PARAMETER_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "runtime/core/tensor.h"

namespace moe::parallel {

enum class ParamKind : uint8_t {
  kDense = 0,   // replicated over DP (maybe split over TP); grads reduced over DP
  kExpert = 1,  // dim 0 indexes experts; grads reduced over EDP
};

enum class GradReduceGroup : uint8_t { kDataParallel = 0, kExpertDataParallel = 1 };

const char* ParamKindName(ParamKind k);  // "dense", "expert"

// Which box of the global tensor a rank holds. Default: all of it.
struct ShardSpec {
  int tp_dim = -1;  // dimension split over TP ranks; -1 = not split
  int64_t tp_begin = 0, tp_end = 0;
  // Expert parameters only (dim 0): experts held here. Both 0 for dense ones.
  int64_t expert_begin = 0, expert_end = 0;
};

struct Parameter {
  std::string name;    // canonical (docs/model.md), unique in the model
  Shape global_shape;  // unsharded
  ParamKind kind = ParamKind::kDense;
  ShardSpec shard;
  Tensor value;  // local part, shape LocalShape(global_shape, shard), row-major
  Tensor grad;   // same shape and device as value; backward accumulates into it
  // The copy that forward and backward compute with (train.precision, ops.h
  // "Precision"): undefined in fp32, where the layers read `value` itself; in
  // bf16 a bf16 copy of `value`, which then is the f32 master weight (what the
  // optimizer updates, the checkpoint saves and clipping reads). The copy is
  // refreshed from `value` after every change of `value`: by the optimizer's
  // step itself (optim/optimizer.h), else by model::RefreshComputeCopies.
  // `grad` is f32 in every precision.
  Tensor compute;
  const Tensor& compute_value() const { return compute.defined() ? compute : value; }
  // AdamW/SGD weight decay applies (false for norm gains and embeddings unless
  // optim.decay_norms_and_embeddings).
  bool weight_decay = true;

  GradReduceGroup reduce_group() const {
    return kind == ParamKind::kExpert ? GradReduceGroup::kExpertDataParallel : GradReduceGroup::kDataParallel;
  }
  bool is_sharded() const;  // holds less than the global tensor
};

// A shard covering the whole tensor (for kind kExpert: experts [0, E)).
ShardSpec FullShard(ParamKind kind, const Shape& global_shape);

// The local shape of `shard` of a `global_shape` tensor.
Shape LocalShape(const Shape& global_shape, const ShardSpec& shard);

// The first global index of the shard in every dimension (ops::InitNormal's
// `offsets`): the expert range start on dim 0, tp_begin on tp_dim, else 0.
std::vector<int64_t> ShardOffsets(const Shape& global_shape, const ShardSpec& shard);

// Checks the shard against the global shape (ranges inside the dims, tp_dim not
// the expert dim of an expert parameter, non-empty) and returns an error naming
// the parameter and the bad numbers.
absl::Status ValidateShard(absl::string_view name, ParamKind kind, const Shape& global_shape,
                           const ShardSpec& shard);

// Calls fn(global_offset, local_offset, length) for each maximal run of elements
// that are contiguous in both the local and the global row-major order, in
// increasing local_offset (the runs cover the local tensor exactly once). Used
// to initialise or read a shard element by element of the global tensor:
// local element local_offset + j is global element global_offset + j, j < length.
void ForEachLocalRun(
    const Shape& global_shape, const ShardSpec& shard,
    const std::function<void(int64_t global_offset, int64_t local_offset, int64_t length)>& fn);

// Weight decay default for a canonical name: off for norm gains (".*norm.weight",
// "*layernorm.weight") and the token embedding, on for every other weight.
bool DefaultWeightDecay(absl::string_view canonical_name);

// An ordered list of a model's parameters (the order the model registers them,
// which is docs/model.md's order). Holds pointers into the layers that own the
// Parameter structs; those layers must outlive it.
class ParameterList {
 public:
  // Adds `p` after checking that its name is new, its shard valid and its
  // tensors (when defined) of the local shape.
  absl::Status Add(Parameter* p);
  // nullptr when absent.
  Parameter* Find(absl::string_view name) const;
  const std::vector<Parameter*>& all() const { return params_; }
  size_t size() const { return params_.size(); }
  Parameter* operator[](size_t i) const { return params_[i]; }
  auto begin() const { return params_.begin(); }
  auto end() const { return params_.end(); }
  // Sum of local element counts (all, or of one kind).
  int64_t LocalNumel() const;
  int64_t LocalNumel(ParamKind kind) const;
  // Sum of global element counts (the model's size).
  int64_t GlobalNumel() const;

 private:
  std::vector<Parameter*> params_;
};

}  // namespace moe::parallel

#endif  // MOE_PARALLEL_PARAMETER_H_
