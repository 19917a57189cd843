// The plan of a sharded checkpoint: which rank writes or reads which box of
// which canonical tensor, the datasets of each rank file and the manifest's
// contents. Pure: no file I/O, no MPI. Checkpointer (runtime/checkpoint.h)
// gathers every rank's held pieces, calls these functions (every rank gets the
// same answer from the same input) and executes the result.
//
//   std::vector<LocalPiece> mine = ...LocalPieces(tensors)...;      // this rank
//   held[r] = rank r's pieces (gathered: EncodePieces / DecodeHeldPieces)
//   ASSIGN_OR_RETURN(SavePlan plan, PlanSave(TensorInfos(tensors), held));
//   RankFileDatasets(plan, infos, rank)   the datasets of rank_<rank>.h5
//   ManifestForSave(plan, infos, ...)     manifest.pb without checksums
//   ASSIGN_OR_RETURN(LoadPlan load, PlanLoad(entries, held, rank));
//
// Example: world 4 = TP 2 x DP 2, q_proj [8, 4] column-parallel (dim 0 over
// TP). Ranks 0 and 2 hold rows [0:4], ranks 1 and 3 rows [4:8]. The plan has
// two shards, each with two holders; each is written once, by the holder with
// the fewest bytes so far (the largest shards are placed first), so two of the
// four ranks write q_proj and the others write the next tensor's shards. A
// load into TP 1 reads both shards into each rank's whole [0:8, 0:4] box: the
// four ranks all hold that box, so one of them reads it and sends it to the
// other three.
#ifndef MOE_RUNTIME_CHECKPOINT_PLAN_H_
#define MOE_RUNTIME_CHECKPOINT_PLAN_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "parallel/layout.h"
#include "parallel/parameter.h"
#include "runtime/checkpoint.pb.h"
#include "runtime/checkpoint_format.h"
#include "runtime/core/tensor.h"

namespace moe {

// One tensor of the checkpoint as this rank holds it.
struct ShardedTensor {
  // Path in model.h5: a canonical name (docs/model.md), or OptimizerStateName(...).
  std::string name;
  Shape global_shape;  // rank 1..5
  // The box of the global tensor this rank's data belongs to
  // (parallel::ShardOffsets / LocalShape).
  parallel::ShardSpec shard;
  // ZeRO-1: only the elements [flat_begin, flat_end) of that box, in its
  // row-major order, are held here. flat_end < 0: the whole box.
  int64_t flat_begin = 0, flat_end = -1;
  // f32, contiguous, numel = the held elements; any device. Save reads it, Load
  // writes it (the handle shares storage with the model or optimizer).
  Tensor tensor;
};

// What a plan needs of a tensor: its name and global shape. Every rank passes
// the same list in the same order.
struct TensorInfo {
  std::string name;
  Shape global_shape;
};
std::vector<TensorInfo> TensorInfos(absl::Span<const ShardedTensor> tensors);

// XXH64 of the names and global shapes, in order (ranks compare it).
uint64_t TensorListHash(absl::Span<const TensorInfo> tensors);

// One box of one tensor held by a rank, and where its elements start in the
// rank's tensor (a ZeRO-1 range is held as up to 2 * rank - 1 boxes).
struct LocalPiece {
  int tensor = 0;  // index into the tensor list
  Box box;
  int64_t elem_offset = 0;
};

// The pieces a holder of (shard, [flat_begin, flat_end)) of `info` holds, as
// tensor `index`. Errors (InvalidArgument, naming the tensor) for a box outside
// the global shape or a flat range outside the box. Empty when nothing is held.
absl::StatusOr<std::vector<LocalPiece>> HeldPieces(int index, const TensorInfo& info,
                                                   const parallel::ShardSpec& shard, int64_t flat_begin,
                                                   int64_t flat_end);

// Checks the tensors of a Save or Load (unique non-empty names, rank >= 1,
// boxes inside, f32 tensors of the held size) and lists this rank's pieces.
absl::StatusOr<std::vector<LocalPiece>> LocalPieces(absl::Span<const ShardedTensor> tensors);

// Pieces as integers for an all-gather, and back (the element offsets are not
// sent: they matter only to the holder). `global_shapes` gives each tensor's rank.
std::vector<int64_t> EncodePieces(absl::Span<const LocalPiece> pieces);
absl::StatusOr<std::vector<LocalPiece>> DecodePieces(absl::Span<const int64_t> ints,
                                                     absl::Span<const TensorInfo> tensors);

// A distinct box of a tensor (a shard) and the ranks that hold it.
struct PlannedShard {
  int tensor = 0;
  Box box;
  std::vector<int> holders;  // ranks, ascending
  int owner = -1;            // the one holder that writes it (save) or reads it (load)
  std::string dataset;       // save: its dataset in the owner's rank file
};

// Groups every rank's pieces (held[r] = rank r's) into distinct shards, sorted
// by (tensor, box), and gives each an owner: largest shards first, each to the
// holder with the fewest elements so far, so the work spreads over all ranks
// and replicas (DP/EDP/TP) are handled once.
std::vector<PlannedShard> DistinctShards(const std::vector<std::vector<LocalPiece>>& held);

// ---- Save ------------------------------------------------------------------------

struct SavePlan {
  std::vector<PlannedShard> shards;             // sorted by (tensor, box); owner = writer
  std::vector<std::vector<int>> tensor_shards;  // per tensor: indices into shards, in order
  std::vector<int> writers;                     // ranks that write a file, ascending

  // Indices of the shards `rank` writes, in plan order.
  std::vector<int> ShardsWrittenBy(int rank) const;
};

// The save plan of `tensors` from every rank's pieces. Errors (InvalidArgument,
// naming the tensor) when replicas hold overlapping but different boxes or
// the distinct boxes do not cover a tensor exactly. Dataset names: the
// tensor's name, "<name>@k" when one file holds several shards of it.
absl::StatusOr<SavePlan> PlanSave(absl::Span<const TensorInfo> tensors,
                                  const std::vector<std::vector<LocalPiece>>& held);

// The datasets of rank_<rank>.h5, in ShardsWrittenBy(rank) order.
std::vector<RankDataset> RankFileDatasets(const SavePlan& plan, absl::Span<const TensorInfo> tensors,
                                          int rank);

// For each shard `rank` writes (ShardsWrittenBy order): the index of its own
// piece holding exactly that box. Internal error when it holds none.
absl::StatusOr<std::vector<int>> WriterPieces(const SavePlan& plan, absl::Span<const LocalPiece> pieces,
                                              int rank);

// What the trainer needs besides tensors to continue exactly. Global: rank 0's
// copy is written.
struct RngStreamState {
  std::string name;
  uint64_t seed = 0;
  uint64_t counter = 0;
};
struct TrainState {
  int64_t step = 0;  // optimizer steps completed; names the directory
  int64_t consumed_samples = 0;
  std::vector<int64_t> sampler_state;  // data::SamplerState::ToInts()
  std::vector<RngStreamState> rng;
  int64_t lr_step = 0;
  std::map<std::string, int64_t> int_values;  // anything else (e.g. "optimizer.step")
  std::map<std::string, double> double_values;
  bool operator==(const TrainState& o) const;
};
ckpt::TrainState TrainStateToProto(const TrainState& s);
TrainState TrainStateFromProto(const ckpt::TrainState& p);

// manifest.pb's contents for a save, every shard's checksum still 0: step,
// config, layout, train state, one entry per tensor with its shards in plan
// order (box, writer, file, dataset, bytes), the files (model.h5 first, then
// the writers' rank files) and the total bytes.
ckpt::Manifest ManifestForSave(const SavePlan& plan, absl::Span<const TensorInfo> tensors,
                               const TrainState& state, const std::string& config_text,
                               const parallel::RankLayout& layout);
// Sets each shard's checksum (checksums[i] for plan.shards[i]).
void SetManifestChecksums(const SavePlan& plan, const std::map<int, uint64_t>& checksums,
                          ckpt::Manifest* manifest);

// ---- Load ------------------------------------------------------------------------

// The manifest entry of each tensor, in the tensors' order. NotFound for a
// tensor the checkpoint lacks, FailedPrecondition for a checkpoint tensor the
// model lacks or a different global shape; `path` names the checkpoint in the
// message. With `partial` (checkpoint.partial_load), a tensor on one side only
// is no error: the model's gets a null entry (it keeps its values; PlanLoad
// skips it) and one line per such tensor, either side, goes to `skipped`.
// A different global shape is an error either way.
absl::StatusOr<std::vector<const ckpt::TensorEntry*>> MatchManifest(
    const ckpt::Manifest& manifest, absl::Span<const TensorInfo> tensors, const std::string& path,
    bool partial = false, std::vector<std::string>* skipped = nullptr);

struct LoadPlan {
  // A piece this rank reads from disk, from the saved shards overlapping it.
  struct Read {
    int shard = 0;       // index into the tensor's manifest entry shards
    Box region;          // the overlap, in global coordinates
    bool whole = false;  // the saved shard is exactly the piece's box: read straight in
  };
  struct PieceRead {
    int piece = 0;  // index into this rank's pieces
    std::vector<Read> reads;
  };
  std::vector<PieceRead> reads;
  // Replicas: after reading, a reader sends its piece to every other holder,
  // which receives it. Listed in the same (tensor, box) order on every rank,
  // so sends and receives between two ranks pair up.
  struct Transfer {
    int piece = 0;  // index into this rank's pieces
    int peer = 0;
    bool send = false;
  };
  std::vector<Transfer> transfers;
};

// `rank`'s part of loading: held[r] are every rank's pieces (held[rank] this
// rank's own, in LocalPieces order), entries the matched manifest entries.
LoadPlan PlanLoad(const std::vector<std::vector<LocalPiece>>& held,
                  absl::Span<const ckpt::TensorEntry* const> entries, int rank);

}  // namespace moe

#endif  // MOE_RUNTIME_CHECKPOINT_PLAN_H_
