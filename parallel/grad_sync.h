// GradSync: the data-parallel gradient reduction of one training step.
//
// Gradients are SUMMED (not averaged): the trainer scales each micro-batch's
// loss by 1 / (dp * grad_accum), so the sum over the group is the gradient of
// the step's mean loss (docs/model.md's global batch rule).
//
//   dense parameters   summed over the DP group (groups.dp)
//   expert parameters  summed over the ranks that hold the same experts: the
//                      EDP group, and with TP > 1 and experts replicated over
//                      TP (tp_dim == -1) also over the TP ranks, because with
//                      duplicate-token dropping every TP rank computes other
//                      tokens with the same expert weights. That union (EDP x
//                      TP, the ranks of equal ep_rank) is split off the world
//                      communicator at Create.
//
// Buckets (parallel.grad_bucket_mb): parameters are taken in reverse
// registration order (the order backward finishes them), one open bucket per
// reduction group, closed when it reaches the size. A bucket is launched (an
// asynchronous AllReduce) as soon as every parameter in it was marked ready;
// Finish() launches what is left, waits for everything and writes the sums
// back into the grads. A bucket of one parameter is reduced in place; larger
// ones are copied into a flat buffer (allocated once).
//
// Stream order, no host waits: a bucket's all-reduce is enqueued on its
// group's communication stream (a worker stream per reduction group, so
// groups reduce concurrently) after an event recorded on the compute stream
// where the grads were written; Finish() makes the compute stream wait on
// each bucket's completion event and enqueues the copies back there. The
// host never blocks on a bucket (the destructor, only, drains the streams).
//
//   ASSIGN_OR_RETURN(auto sync, GradSync::Create(groups, params, stream, {.bucket_mb = 25}));
//   for each micro-batch: forward; backward (on the last micro-batch, after a
//     layer's backward accumulated its grads: sync->MarkReady(p) for each of its params)
//   RETURN_IF_ERROR(sync->Finish());  // before clipping and the optimizer step
//
// Collective: the ranks of each group mark the same parameters in the same
// order (they run the same model code). A grad must not change between its
// MarkReady and Finish. Not thread-safe: one thread drives it.
#ifndef MOE_PARALLEL_GRAD_SYNC_H_
#define MOE_PARALLEL_GRAD_SYNC_H_

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/communicator.h"
#include "parallel/parameter.h"
#include "parallel/process_groups.h"
#include "runtime/core/backend.h"

namespace moe::parallel {

struct GradSyncOptions {
  double bucket_mb = 25.0;  // parallel.grad_bucket_mb; <= 0 puts every parameter in its own bucket
};

class GradSync {
 public:
  // Collective over groups.world when groups.layout.tp > 1 (the expert
  // replica group is split off it). `params` (and the layers owning them) and
  // `groups` must outlive the GradSync. Grads must be defined f32 tensors.
  static absl::StatusOr<std::unique_ptr<GradSync>> Create(ProcessGroups& groups, const ParameterList& params,
                                                          Stream& stream, const GradSyncOptions& options);
  ~GradSync();

  // p's grad is final for this step. Launches its bucket when complete.
  absl::Status MarkReady(const Parameter* p);
  // Launches the buckets not launched yet (their unmarked grads are taken as
  // final), waits for all, copies the sums back; resets for the next step.
  absl::Status Finish();

  struct BucketInfo {
    std::string group;               // communicator name
    std::vector<std::string> names;  // parameters, in bucket order
    int64_t numel = 0;
  };
  std::vector<BucketInfo> buckets() const;
  // The group `p`'s gradient is summed over.
  const comm::Communicator& GroupOf(const Parameter& p) const;
  // Buckets launched so far in this step (before Finish: those whose grads
  // were all marked ready).
  int launched_buckets() const;
  // Payload bytes all-reduced by the last Finish (0 for groups of one rank).
  int64_t last_step_bytes() const { return last_step_bytes_; }

 private:
  struct Bucket;
  explicit GradSync(Stream& stream);
  comm::Communicator* GroupFor(const Parameter& p) const;
  absl::Status Launch(Bucket& b);

  Stream& stream_;
  // One communication stream per reduction group.
  std::unordered_map<comm::Communicator*, std::unique_ptr<Stream>> comm_streams_;
  ProcessGroups* groups_ = nullptr;
  std::unique_ptr<comm::Communicator> expert_replicas_;  // EDP x TP, when tp > 1
  std::vector<std::unique_ptr<Bucket>> buckets_;
  std::unordered_map<const Parameter*, int> bucket_of_;
  std::unordered_map<const Parameter*, bool> ready_;
  int64_t step_bytes_ = 0, last_step_bytes_ = 0;
};

}  // namespace moe::parallel

#endif  // MOE_PARALLEL_GRAD_SYNC_H_
