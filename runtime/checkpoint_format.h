// The on-disk format of a checkpoint directory, below the collective logic of
// runtime/checkpoint.h: names, boxes (regions of a global tensor), the HDF5
// rank files and master file, the manifest, and verification. Everything here
// is single-process (moe-ckpt uses it without MPI).
//
// step_00000100/
//   manifest.pb      ManifestFile (runtime/checkpoint.proto)
//   model.h5         virtual datasets "<canonical name>" and "optimizer/<state>/<canonical name>",
//                    global shape, f32, stitched from the rank files (relative names)
//   rank_00003.h5    the shards world rank 3 wrote, one contiguous f32 dataset each, with
//                    attributes global_offset and global_shape
#ifndef MOE_RUNTIME_CHECKPOINT_FORMAT_H_
#define MOE_RUNTIME_CHECKPOINT_FORMAT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "runtime/checkpoint.pb.h"

namespace moe {

// Version of the format this build writes and the newest it reads.
inline constexpr uint32_t kCheckpointFormatVersion = 1;

inline constexpr char kManifestFileName[] = "manifest.pb";
inline constexpr char kMasterFileName[] = "model.h5";
inline constexpr char kLatestFileName[] = "latest";

std::string StepDirName(int64_t step);  // "step_00000100"
// Parses a complete checkpoint's directory name; temporaries ("step_…tmp-…") are not.
std::optional<int64_t> ParseStepDirName(const std::string& name);
std::string RankFileName(int rank);
// Complete checkpoints under `dir` as (step, path), newest first (by name; no
// verification). Empty when `dir` does not exist.
absl::StatusOr<std::vector<std::pair<int64_t, std::string>>> ListCheckpoints(
    const std::string& dir);  // "rank_00003.h5"
std::string JoinPath(const std::string& dir, const std::string& name);

// A region of a tensor: [offset[i], offset[i] + count[i]) along each dimension.
struct Box {
  std::vector<int64_t> offset, count;
  int rank() const { return static_cast<int>(count.size()); }
  int64_t numel() const;
  bool operator==(const Box& o) const { return offset == o.offset && count == o.count; }
  std::string ToString() const;  // "[0:4, 8:16]"
};

// The intersection of two boxes of the same rank, or nullopt when empty.
std::optional<Box> Intersect(const Box& a, const Box& b);

// The elements [begin, end) of `box` in its row-major order, as the fewest
// boxes (at most 2 * rank - 1), in increasing order. Each one is a contiguous
// run of that order, so its data is the contiguous sub-range of the flat range
// it covers.
std::vector<Box> DecomposeFlatRange(const Box& box, int64_t begin, int64_t end);

// Copies `region` (inside both boxes) from `src`, laid out row-major over
// `src_box`, to `dst`, laid out row-major over `dst_box`. elem_size bytes each.
void CopyRegion(const void* src, const Box& src_box, void* dst, const Box& dst_box, const Box& region,
                size_t elem_size);

// ---- Manifest ----------------------------------------------------------------

// ManifestFile bytes for `manifest` (format version kCheckpointFormatVersion).
std::string SerializeManifestFile(const ckpt::Manifest& manifest);
// Parses manifest.pb bytes; `path` names the file in errors. Refuses a newer
// format version (FailedPrecondition) and a damaged file (DataLoss).
absl::StatusOr<ckpt::Manifest> ParseManifestFile(const std::string& bytes, const std::string& path);
// Reads DIR/manifest.pb.
absl::StatusOr<ckpt::Manifest> ReadManifest(const std::string& dir);

// Checks that the manifest is coherent: shard boxes inside their tensors and
// disjoint, covering every tensor exactly, f32, files named. DataLoss naming
// the tensor otherwise.
absl::Status ValidateManifest(const ckpt::Manifest& manifest, const std::string& dir);

// ---- HDF5 files ----------------------------------------------------------------

// One dataset of a rank file, laid out before its bytes are written.
struct RankDataset {
  std::string dataset;         // path inside the file ("optimizer/exp_avg/…" makes groups)
  std::vector<int64_t> shape;  // the shard's count
  std::vector<int64_t> global_offset, global_shape;  // attributes, for readers of rank files
  uint64_t file_offset = 0;                          // out: byte offset of the contiguous data in the file
};

// Creates `path` with one contiguous f32 dataset per entry, its storage
// allocated but not written (fill never), and fills in each file_offset: the
// caller then writes the bytes with plain pwrite (CheckpointFs), which needs no
// HDF5 call (the HDF5 library here is not thread-safe; async saves write from
// a background thread).
absl::Status CreateRankFileLayout(const std::string& path, std::vector<RankDataset>& datasets);

// Writes the master file: one virtual dataset per tensor of `manifest`, global
// shape, each shard's box mapped to its dataset in its rank file (file names
// relative to the master's directory). Root attributes: step, format_version.
absl::Status WriteMasterFile(const std::string& path, const ckpt::Manifest& manifest);

// Reads whole shards of one checkpoint directory, keeping its rank files open
// between reads. Not thread-safe (HDF5); one reader per thread of use.
class ShardReader {
 public:
  explicit ShardReader(std::string dir);
  ~ShardReader();
  ShardReader(const ShardReader&) = delete;
  ShardReader& operator=(const ShardReader&) = delete;

  // Reads shard `shard` of `tensor` into `dst` (shard.nbytes() bytes) and
  // checks its checksum. Errors (DataLoss) name the file, the tensor and the box.
  absl::Status Read(const ckpt::TensorEntry& tensor, const ckpt::Shard& shard, void* dst);
  // The same shard through a bounded buffer: reads its bytes in order, at most
  // `buffer_bytes` (rounded down to whole f32 elements, >= 4) at a time, into
  // `buffer`, and calls consume(byte_offset, nbytes) on each piece before the
  // next one overwrites it. The checksum is known only at the end: an error
  // return (checksum, truncation, or consume's own) may come after consume has
  // seen every piece, so the caller must not trust what it stored until OK.
  absl::Status ReadInChunks(const ckpt::TensorEntry& tensor, const ckpt::Shard& shard, void* buffer,
                            size_t buffer_bytes,
                            const std::function<absl::Status(int64_t byte_offset, size_t nbytes)>& consume);

 private:
  struct Impl;
  std::string dir_;
  std::unique_ptr<Impl> impl_;
};

// ---- Whole-checkpoint checks (moe-ckpt verify) -----------------------------------

// model.h5 of checkpoint `dir`: present, and equal to manifest.master_checksum
// when the manifest has one. DataLoss naming the file otherwise. Resume and
// verify both check it.
absl::Status CheckMasterFile(const ckpt::Manifest& manifest, const std::string& dir);

struct VerifyReport {
  int64_t tensors = 0, shards = 0, bytes = 0;
  std::vector<std::string> errors;  // one line per problem: file, tensor, what
};
// Reads the manifest, every shard (checksums; and reports shards holding NaN
// or Inf), and checks model.h5 (its checksum, and every tensor with its global
// shape, each shard's region read through the virtual dataset). `report` is reset first. OK only
// when `report->errors` is empty; the status otherwise carries the first error.
absl::Status VerifyCheckpoint(const std::string& dir, VerifyReport* report);

}  // namespace moe

#endif  // MOE_RUNTIME_CHECKPOINT_FORMAT_H_
