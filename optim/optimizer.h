// Optimizers over a ParameterList: AdamW and SGD, fp32 state, optionally
// partitioned over the data-parallel groups (ZeRO-1).
//
//   ASSIGN_OR_RETURN(std::unique_ptr<Optimizer> opt, CreateOptimizer(config.optim(), params, groups));
//   ASSIGN_OR_RETURN(LrSchedule schedule, LrSchedule::FromConfig(config.optim()));
//   ... forward, backward, gradient all-reduce (parallel/) ...
//   ASSIGN_OR_RETURN(double grad_norm, GlobalGradNorm(params, groups));  // clip.h
//   const double lr = schedule.At(opt->step() + 1);
//   // opt->step() is now one more; the update reads the gradients clipped.
//   RETURN_IF_ERROR(opt->Step(lr, ClipCoefficient(grad_norm, config.optim().clip_grad())));
//
// Contract
// - Step reads Parameter::grad (already reduced over DP / EDP: gradient
//   synchronisation happens elsewhere), times grad_scale (clipping), and
//   updates Parameter::value in place. It neither changes nor zeroes the
//   gradients.
// - Mixed precision (train.precision bf16): a parameter with a compute copy
//   (Parameter::compute, bf16) has it rewritten from every updated element,
//   equal bit for bit to model::RefreshComputeCopies after the step, so the
//   caller does not refresh. AdamW writes it in the update's own pass (one
//   read of the master, not two); SGD casts after its update; under ZeRO-1 the
//   other ranks' updates are cast as they arrive from the all-gather.
// - AdamW updates every parameter (range) in one call of the list form of
//   ops::AdamW: on a GPU one launch per 32 parameters, not one each.
// - Every parameter's value and grad are f32 on one device; Step enqueues its
//   ops (and, under ZeRO-1, the stream-ordered all-gathers) on that device's
//   default stream and returns without a host wait: later work on the stream
//   sees the new values; a host reader synchronizes the stream first. A
//   failed all-gather is reported by the stream's next Synchronize.
// - State: f32, allocated (zero) at construction and attributed to
//   MemoryCategory::kOptimizer. AdamW keeps "exp_avg" and "exp_avg_sq", SGD with
//   momentum "momentum_buffer", SGD without momentum nothing.
// - Weight decay applies to parameters with Parameter::weight_decay, or to all
//   of them when OptimizerOptions::decay_all (optim.decay_norms_and_embeddings).
//
// Update rules (per element; t = step() after the increment, starting at 1):
//   AdamW (torch.optim.AdamW, decoupled decay):
//     m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//     p -= lr * (m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + wd * p)
//   SGD (torch.optim.SGD, dampening 0, no Nesterov): d = g + wd * p
//     momentum > 0: buf = momentum * buf + d (buf = d at t = 1); p -= lr * buf
//     momentum = 0: p -= lr * d
//
// ZeRO-1 (OptimizerOptions::shard_state): the dense parameters' local tensors,
// flattened and concatenated in list order, form one index space of N
// elements per DP group; expert parameters one per EDP group. Group rank r of
// s owns the elements [N * r / s, N * (r + 1) / s), keeps state only for those,
// updates only those, and then an AllGatherV over the group (in buckets of at
// most gather_bucket_elements, ordered on the default stream) gives every rank
// all updated values. The
// per-element math is the same, so the result equals the unsharded optimizer
// bit for bit. Step is then collective: every rank of every DP and EDP group
// calls it (every rank of the world, in practice).
//
// Checkpoints: states() lists, per parameter, the flat range [begin, end) of
// the local tensor (row-major) that this rank holds state for, and the state
// tensors (handles sharing the optimizer's storage). Unsharded, the range is
// the whole tensor and the tensors have the local shape; under ZeRO-1 the
// tensors are 1-D [end - begin] and parameters with no element owned here are
// absent. Resume: build the optimizer, LoadState every (parameter, state) and
// set_step.
#ifndef MOE_OPTIM_OPTIMIZER_H_
#define MOE_OPTIM_OPTIMIZER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "parallel/parameter.h"
#include "parallel/process_groups.h"
#include "runtime/core/backend.h"
#include "runtime/core/kernels.h"  // AdamWTarget
#include "runtime/core/tensor.h"

namespace moe::config {
class OptimConfig;
}

namespace moe::optim {

enum class OptimizerType : uint8_t { kAdamW = 0, kSgd = 1 };

struct OptimizerOptions {
  OptimizerType type = OptimizerType::kAdamW;
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;  // AdamW
  double momentum = 0.0;                         // SGD
  double weight_decay = 0.0;
  bool decay_all = false;                             // decay parameters whose weight_decay flag is false too
  bool shard_state = false;                           // ZeRO-1
  int64_t gather_bucket_elements = int64_t{1} << 24;  // ZeRO-1 all-gather bucket (64 MiB of f32)
};

// optim.type, beta1, beta2, eps, momentum, weight_decay, decay_norms_and_embeddings,
// shard_state. Errors name the field (unknown type, betas outside [0, 1),
// eps <= 0, negative weight_decay or momentum).
absl::StatusOr<OptimizerOptions> OptimizerOptionsFromConfig(const config::OptimConfig& config);

// The optimizer state of one parameter on this rank.
struct ParamState {
  parallel::Parameter* param = nullptr;
  // Flat [begin, end) of param->value (row-major) covered by the tensors.
  int64_t begin = 0, end = 0;
  // (state name, f32 tensor): param's local shape when whole(), else [end - begin].
  std::vector<std::pair<std::string, Tensor>> tensors;

  bool whole() const { return begin == 0 && end == param->value.numel(); }
  // nullptr when absent.
  const Tensor* Find(absl::string_view state_name) const;
};

class Optimizer {
 public:
  // Validates the parameters (f32 value and grad of equal shape, one device,
  // unique names), partitions them (ZeRO-1) and allocates zero state. `params`
  // and, with shard_state, `groups` (dp, edp) must outlive the optimizer.
  // `groups` may be null without shard_state.
  static absl::StatusOr<std::unique_ptr<Optimizer>> Create(const OptimizerOptions& options,
                                                           parallel::ParameterList& params,
                                                           const parallel::ProcessGroups* groups);
  ~Optimizer();
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  // One update of every parameter with learning rate `lr` (see the rules
  // above); increments step() first. Collective over DP and EDP under ZeRO-1.
  // grad_scale multiplies every gradient element as the update reads it (the
  // clipping coefficient, optim::ClipCoefficient), the gradients unchanged:
  // the update of scaling them first (AdamW bit for bit, SGD to f32
  // rounding: its lr * scale is one factor), without a pass over them.
  absl::Status Step(double lr, double grad_scale = 1.0);

  // Number of Steps taken (or set by set_step).
  int64_t step() const { return step_; }
  void set_step(int64_t step) { step_ = step; }

  const OptimizerOptions& options() const { return options_; }
  const char* type_name() const;  // "adamw", "sgd"
  bool sharded() const { return options_.shard_state; }
  // The state names of this type: {"exp_avg", "exp_avg_sq"}, {"momentum_buffer"} or {}.
  const std::vector<std::string>& state_names() const { return state_names_; }
  // This rank's state in parameter-list order (see "Checkpoints" above).
  const std::vector<ParamState>& states() const { return states_; }
  // Copies `value` (f32 on any device, numel == end - begin of that state) into
  // the state `state_name` of parameter `param_name`. NotFound when this rank
  // holds no such state; InvalidArgument on a size or dtype mismatch.
  absl::Status LoadState(absl::string_view param_name, absl::string_view state_name, const Tensor& value);
  // The effective weight decay of `p` (options().weight_decay or 0).
  double WeightDecayOf(const parallel::Parameter& p) const;
  // Bytes of state held on this rank.
  int64_t StateBytes() const;

 private:
  // The flat index space of one ZeRO-1 group (dense over DP or expert over EDP).
  struct FlatGroup {
    comm::Communicator* comm = nullptr;
    std::vector<parallel::Parameter*> params;  // in list order
    std::vector<int64_t> offsets;              // params.size() + 1 prefix sums of numel
    int64_t owned_begin = 0, owned_end = 0;
    int64_t total() const { return offsets.back(); }
    int64_t OwnedBegin(int rank) const;
  };

  Optimizer(const OptimizerOptions& options, Backend* backend);
  absl::Status Partition(parallel::ParameterList& params, const parallel::ProcessGroups* groups);
  // SGD's update of one state's range (AdamW updates every range in one list op).
  absl::Status SgdUpdate(const ParamState& s, double lr, double grad_scale);
  // The AdamW list op's target for one state's range.
  AdamWTarget AdamWTargetOf(const ParamState& s) const;
  absl::Status Gather(const FlatGroup& g);

  OptimizerOptions options_;
  Backend* backend_ = nullptr;
  std::vector<std::string> state_names_;
  std::vector<ParamState> states_;
  std::vector<FlatGroup> groups_;  // ZeRO-1 only
  Tensor gather_buffer_;           // ZeRO-1, f32, kCommunication
  int64_t step_ = 0;
};

// CreateOptimizer(config.optim(), params, groups): the optimizer of the job.
absl::StatusOr<std::unique_ptr<Optimizer>> CreateOptimizer(const config::OptimConfig& config,
                                                           parallel::ParameterList& params,
                                                           const parallel::ProcessGroups& groups);

}  // namespace moe::optim

#endif  // MOE_OPTIM_OPTIMIZER_H_
