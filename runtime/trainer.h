// Trainer: the pretraining loop of one rank (collective: every rank of the
// world runs the same Trainer in lock step).
//
//   ASSIGN_OR_RETURN(auto groups, parallel::CreateProcessGroups(std::move(world), tp, ep));
//   ASSIGN_OR_RETURN(auto trainer, Trainer::Create(config, &groups));
//   RETURN_IF_ERROR(trainer->Run());
//
// One optimizer step: for each of train.grad_accum micro-batches (docs/model.md's
// global batch rule: micro-batch a * dp + dp_rank of the global batch),
// forward and backward with the loss scaled by 1 / (dp * grad_accum), so that
// summing gradients over the data-parallel groups (dense: DP, experts: EDP)
// gives the gradient of the step's mean loss; then a non-finite check,
// global-norm clipping, the learning rate of the schedule, the optimizer
// update. Rank 0 logs every train.log_every steps and writes one JSON line
// per step to <run_dir>/metrics.jsonl (metrics.h).
//
// Checkpoints (checkpoint.h): Create resumes per train.resume (auto: the newest
// valid checkpoint under checkpoint.dir); Run saves every checkpoint.save_every
// steps and at the end (train.steps = 0 saves the initial model as step 0),
// and on SIGTERM/SIGUSR1 finishes the current step, saves and returns OK.
#ifndef MOE_RUNTIME_TRAINER_H_
#define MOE_RUNTIME_TRAINER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "data/dataset.h"
#include "model/llep.h"
#include "model/model.h"
#include "optim/lr_schedule.h"
#include "optim/optimizer.h"
#include "parallel/grad_sync.h"
#include "parallel/process_groups.h"
#include "runtime/checkpoint.h"
#include "runtime/core/config.h"
#include "runtime/metrics.h"
#include "runtime/profiler.h"

namespace moe {

struct MoeLayerStats {
  int layer = 0;
  std::vector<int64_t> tokens_per_expert;  // kept assignments, summed over the global batch
  int64_t dropped = 0;                     // assignments dropped by capacity
  double max_over_mean = 1.0;              // expert load imbalance
  // LLEP (llep.enabled), over the step's micro-batches and EP groups:
  double llep_fired = 0;                // fraction of (micro-batch, EP group) where it fired
  double llep_imbalance_before = 1.0;   // mean per-rank load max/mean before the plan
  double llep_imbalance_after = 1.0;    // ... and after (= before when it did not fire)
  int64_t llep_tokens_moved = 0;        // (token, expert) pairs computed off their native rank
  int64_t llep_weight_bytes_moved = 0;  // expert weight bytes sent to helpers
  // Auxiliary-loss-free balancing (model.moe.expert_bias_update_rate > 0): the
  // layer's expert bias after this step's update; empty without one.
  std::vector<double> expert_bias;
};

struct StepStats {
  int64_t step = 0;                                  // optimizer steps taken after this one
  double loss = 0, ce = 0, aux = 0, z = 0, erc = 0;  // means over the global batch
  double lr = 0, grad_norm = 0;
  double step_time_s = 0, tokens_per_s = 0;
  int64_t mem_peak_bytes = 0;              // this rank's device memory peak so far
  double expert_load_max_over_mean = 1.0;  // worst MoE layer
  std::vector<MoeLayerStats> moe_layers;
  // Every rank's breakdown of this step (profiler.h), in world rank order;
  // filled on rank 0 only (empty elsewhere).
  std::vector<RankStepProfile> ranks;
};

// True for an error that every rank of the job returned together, so each
// rank may exit on its own instead of aborting the others: the ranks agree on
// data errors over the host world (comm/agree.h) when opening the data, before
// the model is built (Trainer::Create), and after reading each step's and each
// evaluation batch's micro-batches (a file truncated under the job), before
// any collective of that step.
bool IsJobWideError(const absl::Status& status);

class Trainer {
 public:
  // Opens the data (every data error before anything else), builds the model
  // of this rank's shard, the optimizer and the schedule, and (rank 0) the
  // metrics file. `groups` must outlive the trainer.
  // `profiler` should be the CommSink of `groups`' world communicator (then
  // metrics and traces hold every op); without one the trainer makes its own,
  // which sees spans but no communicator ops.
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(const JobConfig& config,
                                                         parallel::ProcessGroups* groups,
                                                         std::shared_ptr<Profiler> profiler = nullptr);
  ~Trainer();

  // Trains to train.steps with evaluation every train.eval_every steps and at
  // the end. Returns the first error of any step (non-finite loss or gradient
  // named with the step and parameter).
  absl::Status Run();
  // Saves a checkpoint of the current step (collective; checkpoint.dir set).
  absl::Status SaveCheckpoint();
  // True when Run stopped early on a signal.
  bool stopped_by_signal() const { return stopped_by_signal_; }
  // One optimizer step.
  absl::StatusOr<StepStats> TrainStep();
  // Mean validation cross-entropy over the first train.eval_batches global
  // batches of the validation split (the same sequences on every layout with
  // the same global batch); nullopt without a validation split.
  absl::StatusOr<std::optional<double>> Evaluate();

  int64_t step() const { return step_; }
  model::Model& model() { return *model_; }
  optim::Optimizer& optimizer() { return *optimizer_; }
  const parallel::ParameterList& parameters() const { return model_->parameters(); }
  data::TrainingData& data() { return *data_; }
  const std::vector<StepStats>& history() const { return history_; }
  // The LLEP cost model's measured rates (zero when nothing is measured: LLEP
  // off, EP 1, cost model off or both rates in the config). Measured at
  // start-up, agreed over the whole job (minimum), kept in checkpoints, and
  // taken from the checkpoint on resume, so the LLEP plans (and the float
  // summation order they imply) are a function of the checkpointed state.
  const model::LlepRates& llep_rates() const { return llep_rates_; }

 private:
  Trainer(const JobConfig& config, parallel::ProcessGroups* groups);
  absl::Status Resume();
  // True when this job measures LLEP rates (the same answer on every rank).
  bool MeasuresLlepRates() const;
  absl::StatusOr<std::vector<double>> SumOverDataParallel(std::vector<double> values);
  void Log(const StepStats& s) const;
  absl::Status WriteMetrics(const StepStats& s);

  JobConfig config_;
  parallel::ProcessGroups* groups_;
  Backend* backend_ = nullptr;
  Stream* stream_ = nullptr;
  std::unique_ptr<data::TrainingData> data_;
  std::unique_ptr<model::Model> model_;
  std::unique_ptr<optim::Optimizer> optimizer_;
  std::unique_ptr<parallel::GradSync> grad_sync_;
  std::vector<std::vector<const parallel::Parameter*>> block_params_;  // per layer, for grad sync
  std::optional<optim::LrSchedule> schedule_;
  std::optional<MetricsWriter> metrics_;  // rank 0
  model::HostReadback ce_read_;           // the step's micro-batch cross-entropies
  model::HostReadback bias_read_;         // the step's new expert biases, for the metrics
  // Reads micro-batches [0, count) of `read` into tokens_ and agrees on the
  // outcome over the host world: every rank gets OK or the same job-wide error.
  absl::Status ReadMicroBatches(int count, const std::function<absl::Status(int, int32_t*)>& read);

  std::vector<int32_t> tokens_;  // a step's micro-batches, [grad_accum, micro_batch, seq_len + 1]
  std::vector<StepStats> history_;
  absl::Status ProfileStep(StepStats* s);
  std::unique_ptr<Checkpointer> checkpointer_;
  std::shared_ptr<Profiler> profiler_;
  std::vector<ShardedTensor> checkpoint_tensors_;  // model and optimizer state
  int64_t step_ = 0;
  bool resumed_ = false;
  model::LlepRates llep_rates_;
  bool stopped_by_signal_ = false;
};

}  // namespace moe

#endif  // MOE_RUNTIME_TRAINER_H_
