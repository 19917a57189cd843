// Sharded checkpoints: every rank writes only the shards it owns, in parallel,
// to its own HDF5 file; a master file stitches them into whole tensors under
// their canonical names (HDF5 virtual datasets), and a protobuf manifest keeps
// the training state and a checksum per shard. A checkpoint loads into any
// (tp, ep, dp) layout: each rank reads just the shards that overlap its part.
//
//   ASSIGN_OR_RETURN(auto ckpt, Checkpointer::Create(*groups.world, groups.layout,
//                                                    CheckpointOptionsFromConfig(config.checkpoint())));
//   std::vector<ShardedTensor> tensors = ModelTensors(params);
//   AppendOptimizerTensors(*optimizer, params, tensors);
//   ASSIGN_OR_RETURN(std::optional<LoadedCheckpoint> resumed,
//                    ckpt->Resume(config.train().resume(), tensors));   // auto | none | PATH
//   if (resumed) { optimizer->set_step(...); sampler.Restore(...); ... resumed->state ... }
//   ...
//   RETURN_IF_ERROR(ckpt->Save(train_state, tensors, resolved_config_text));
//   ...
//   RETURN_IF_ERROR(ckpt->WaitForPendingSave());   // before exiting (async saves)
//
// Directory layout (checkpoint.dir):
//   step_00000100/            a complete checkpoint (see checkpoint_format.h for its files)
//   step_00000200.tmp-1a2b3c  a save in progress or a crashed one: never read, removed by the next save
//   latest                    "step_00000200\n", replaced atomically after each save
//
// Guarantees
// - No gather: each distinct shard is written once, by one of the ranks that
//   hold it (replicas over DP/EDP/TP: the holder with the fewest bytes to
//   write so far, so the write load spreads over all ranks). Who writes and
//   reads what is decided by the pure plan of runtime/checkpoint_plan.h; this
//   file gathers its input and executes it.
// - A checkpoint directory appears (rename) only after every rank's files and
//   the manifest are fsynced; then the parent directory is fsynced and `latest`
//   updated (temp + rename). keep_last prunes only after that. A crash at any
//   moment leaves the previous checkpoints intact and loadable.
// - Load checks every shard it reads against its checksum, and refuses a
//   manifest of a newer format version. Errors name the file and the tensor.
// - Every collective method returns the same status on every rank.
//
// Host memory: tensors the host can read (CPU) are written from and read into
// their own memory. Tensors in device memory move through one reusable host
// bucket of options.host_bucket_bytes (checkpoint.host_bucket_mb): a sync save
// copies each shard a contiguous element range at a time into it, hashes and
// writes it, and reuses it; a load reads into it (or assembles there, from a
// saved shard, the part of a box it holds) and copies to the device; replicas
// exchange their boxes through it in bucket-sized messages. So a sync save
// never holds more than the bucket on the host, and a load the bucket plus, when
// the layout changed, the one saved shard it is reading from. An async save
// trades host memory for not stalling training: it snapshots the bytes this
// rank writes (just its pieces, not whole tensors) to the host before Save
// returns. last_peak_host_staging_bytes() reports what a call held.
//
// Threads: the methods are called from one thread. With options.async, Save
// returns once the state is copied to host memory; a background thread writes
// it (plain pwrite/fsync: HDF5 calls stay on the calling thread) and runs the
// final collectives on the checkpointer's own communicator (split from `world`
// at Create), so the caller's communicators are never used concurrently.
#ifndef MOE_RUNTIME_CHECKPOINT_H_
#define MOE_RUNTIME_CHECKPOINT_H_

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "comm/communicator.h"
#include "parallel/layout.h"
#include "parallel/parameter.h"
#include "runtime/checkpoint_fs.h"
#include "runtime/checkpoint_plan.h"
#include "runtime/core/tensor.h"

namespace moe::config {
class CheckpointConfig;
}
namespace moe::optim {
class Optimizer;
}

namespace moe {

// "optimizer/exp_avg/model.layers.0.mlp.router.weight".
std::string OptimizerStateName(absl::string_view state_name, absl::string_view canonical_name);

// One entry per parameter (name, global shape, shard, value).
std::vector<ShardedTensor> ModelTensors(const parallel::ParameterList& params);
// Appends one entry per (state name, parameter of `params`), named
// OptimizerStateName(state, parameter): the optimizer's state tensor (ZeRO-1:
// the flat range this rank owns, possibly empty). `params` is the list the
// optimizer was built on.
void AppendOptimizerTensors(const optim::Optimizer& optimizer, const parallel::ParameterList& params,
                            std::vector<ShardedTensor>& tensors);

struct CheckpointOptions {
  std::string dir;     // checkpoint.dir; "" = no checkpoints (Save fails, Resume auto finds none)
  int keep_last = 0;   // checkpoint.keep_last; 0 = keep all
  bool async = false;  // checkpoint.async
  // checkpoint.partial_load: Load fills the tensors the checkpoint has, leaves
  // the others as they are and ignores checkpoint tensors the model lacks,
  // logging every one (a shape change is still an error).
  bool partial_load = false;
  // checkpoint.timeout_s: deadline of the checkpointer's collectives (they
  // wait for the slowest rank's writes). 0 = scaled per save and load:
  // the world communicator's timeout (comm.timeout_s) + bytes / 50 MB/s
  // (CheckpointDeadline).
  double timeout_s = 0;
  // File system for data, syncs, renames; nullptr = POSIX. Tests pass a
  // FaultInjectionFs (it must outlive the checkpointer).
  CheckpointFs* fs = nullptr;
  // checkpoint.host_bucket_mb, in bytes: the host memory through which tensors
  // that are not host-visible (device memory) are saved and loaded, a
  // contiguous element range at a time (see "Host memory" above). The same on
  // every rank (Create checks): the replicas of a load exchange their boxes in
  // messages of at most this size. At least 4 (one f32).
  int64_t host_bucket_bytes = int64_t{256} << 20;
  // Tests: treat host-visible tensors as device tensors, so that the CPU suite
  // runs the bucketed device path (like CommOptions::stage_through_host).
  bool stage_host_tensors = false;
};

CheckpointOptions CheckpointOptionsFromConfig(const config::CheckpointConfig& config);

// The default checkpoint.timeout_s for moving `bytes` (all ranks together):
// `base_s` (comm.timeout_s) + bytes / kCheckpointAssumedBytesPerS.
inline constexpr double kCheckpointAssumedBytesPerS = 50e6;
double CheckpointDeadline(double base_s, int64_t bytes);

struct SavedLayout {
  int world = 0, tp = 0, dp = 0, ep = 0, edp = 0;
};

struct LoadedCheckpoint {
  std::string path;  // the directory loaded
  TrainState state;
  std::string config_text;  // the resolved config that saved it
  SavedLayout layout;       // the layout that saved it
  // Newer checkpoints that resume=auto passed over: "step_00000300: <why>".
  std::vector<std::string> skipped;
  // checkpoint.partial_load: one line per tensor not loaded (either side).
  std::vector<std::string> tensors_skipped;
};

class Checkpointer {
 public:
  // Collective over `world`: splits the checkpointer's own communicator.
  static absl::StatusOr<std::unique_ptr<Checkpointer>> Create(comm::Communicator& world,
                                                              const parallel::RankLayout& layout,
                                                              CheckpointOptions options);
  // Waits for a pending async save (its error, if any, is logged).
  ~Checkpointer();
  Checkpointer(const Checkpointer&) = delete;
  Checkpointer& operator=(const Checkpointer&) = delete;

  // Collective over the world: saves `tensors` (the same names and global
  // shapes in the same order on every rank; their boxes must tile each global
  // tensor) as dir/step_<state.step>. Waits for the previous async save first
  // and returns its error if it failed. Sync: returns when the checkpoint is
  // complete. Async: returns once the tensors are copied to host memory.
  // An existing checkpoint of the same step is replaced.
  absl::Status Save(const TrainState& state, absl::Span<const ShardedTensor> tensors,
                    const std::string& config_text);
  // Waits for the async save in flight (if any) and returns its status (the
  // same on every rank). Not a collective call itself.
  absl::Status WaitForPendingSave();

  // Collective: fills every tensor of `tensors` from the checkpoint directory
  // `path` (a step_… directory), whatever layout saved it. A box held by one
  // rank is read by it from the shards overlapping it; a box held by several
  // (DP/EDP/TP replicas) is read by one of them (balanced by bytes) and sent to
  // the others, so the files are read about once. Every shard read is checked
  // against its checksum. Fails (same status on every rank) when a tensor is
  // missing or has another global shape, or a shard is corrupt or truncated;
  // tensors may then be partly overwritten.
  absl::StatusOr<LoadedCheckpoint> Load(const std::string& path, absl::Span<const ShardedTensor> tensors);

  // Collective: train.resume semantics.
  //   "none": nullopt.
  //   "auto": the newest checkpoint under options.dir that loads; passes over
  //           (and logs, and lists in `skipped`) the ones that do not; nullopt
  //           when there is none; an error when all fail.
  //   PATH:   a checkpoint directory (step_…), or a directory of them (then as auto).
  absl::StatusOr<std::optional<LoadedCheckpoint>> Resume(const std::string& resume,
                                                         absl::Span<const ShardedTensor> tensors);

  // Complete checkpoints under `dir` as (step, path), newest first (by name; no
  // verification). Empty when `dir` does not exist.
  static absl::StatusOr<std::vector<std::pair<int64_t, std::string>>> List(const std::string& dir);

  const CheckpointOptions& options() const { return options_; }

  // The most host memory held at once for staged (device) tensors by the last
  // Save or Load: the bucket, a load's cached shard, an async save's snapshot.
  // A sync save keeps it <= options.host_bucket_bytes.
  int64_t last_peak_host_staging_bytes() const { return staging_.peak; }

 private:
  // Host staging bytes live and their peak (calling thread only).
  struct StagingMeter {
    int64_t live = 0, peak = 0;
    void Add(int64_t bytes) {
      live += bytes;
      peak = std::max(peak, live);
    }
    void Sub(int64_t bytes) { live -= bytes; }
  };
  struct SaveTask;
  Checkpointer(std::unique_ptr<comm::Communicator> comm, const parallel::RankLayout& layout,
               CheckpointOptions options);
  // Every rank gets the status of the lowest failing rank (or OK).
  absl::Status Agree(const absl::Status& local);
  absl::Status RunSaveTask(SaveTask& task);
  absl::Status Commit(SaveTask& task);
  // The deadline of the collectives that move `bytes` (checkpoint.timeout_s
  // when set, else CheckpointDeadline from the world's comm.timeout_s).
  absl::Status SetDeadline(int64_t bytes);
  // Does the checkpointer move `t` through the host bucket (not host-visible,
  // or options.stage_host_tensors)?
  bool Staged(const Tensor& t) const;
  // A counted host f32 tensor of `numel` elements (staging_.Add); the caller
  // calls staging_.Sub(numel * 4) when it lets go of it. For copies to and
  // from `device`: page-locked when it is a GPU (the bucket, allocated once
  // per save or load; Backend::AllocatePinnedHost).
  absl::StatusOr<Tensor> HostStaging(int64_t numel, Device device);
  // Load: the replicas' exchange of plan.transfers, through `bucket` for
  // staged tensors. Returns the communicator's errors; a failed device copy
  // goes to *local (the exchange goes on: the peers wait for its messages).
  absl::Status ExchangeReplicas(const LoadPlan& plan, absl::Span<const LocalPiece> pieces,
                                absl::Span<const ShardedTensor> tensors, const Tensor& bucket,
                                absl::Status* local);

  std::unique_ptr<comm::Communicator> comm_;
  double base_timeout_s_ = 0;  // the world communicator's timeout (comm.timeout_s)
  parallel::RankLayout layout_;
  CheckpointOptions options_;
  CheckpointFs* fs_;
  std::thread worker_;
  std::shared_ptr<SaveTask> pending_;
  absl::Status pending_status_;
  StagingMeter staging_;
};

}  // namespace moe

#endif  // MOE_RUNTIME_CHECKPOINT_H_
