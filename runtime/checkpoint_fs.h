// The file-system calls a checkpoint makes, behind a small interface (like
// leveldb's Env) so that tests can fail any of them on cue.
//
//   CheckpointFs* fs = CheckpointFs::Default();              // POSIX
//   FaultInjectionFs faulty(fs);
//   faulty.FailOn(FsOp::kRename, /*skip=*/0, /*crash=*/true); // the first rename fails,
//                                                            // and every call after it
//
// What goes through it: shard data (pwrite into files whose HDF5 structure was
// laid out beforehand), fsync of files and directories, the manifest, the
// `latest` pointer, renames and removals. HDF5's own metadata writes do not (they
// happen before any shard byte is written, inside the temporary directory).
//
// Thread safety: every method may be called from any thread.
#ifndef MOE_RUNTIME_CHECKPOINT_FS_H_
#define MOE_RUNTIME_CHECKPOINT_FS_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace moe {

// An existing file opened for writing at offsets.
class CheckpointFile {
 public:
  virtual ~CheckpointFile() = default;
  virtual absl::Status WriteAt(uint64_t offset, const void* data, size_t nbytes) = 0;
  virtual absl::Status Sync() = 0;   // fsync: the data is on disk
  virtual absl::Status Close() = 0;  // further calls fail
};

class CheckpointFs {
 public:
  virtual ~CheckpointFs() = default;
  // The process-wide POSIX implementation (never null, never freed).
  static CheckpointFs* Default();

  virtual absl::Status CreateDir(const std::string& path) = 0;  // parents too; ok if it exists
  // Opens an existing file for writing without truncating it.
  virtual absl::StatusOr<std::unique_ptr<CheckpointFile>> OpenForWrite(const std::string& path) = 0;
  // Creates or truncates `path`, writes `contents`, fsyncs and closes it.
  virtual absl::Status WriteFile(const std::string& path, const std::string& contents) = 0;
  virtual absl::StatusOr<std::string> ReadFile(const std::string& path) = 0;
  virtual absl::Status SyncDir(const std::string& path) = 0;  // fsync of a directory
  // rename(2): atomic; replaces `to` when it is a file or an empty directory.
  virtual absl::Status Rename(const std::string& from, const std::string& to) = 0;
  virtual absl::Status RemoveAll(const std::string& path) = 0;  // a file or a tree; ok if absent
  // Names (not paths) of the entries of a directory, sorted.
  virtual absl::StatusOr<std::vector<std::string>> ListDir(const std::string& path) = 0;
  virtual bool Exists(const std::string& path) = 0;
};

enum class FsOp : int {
  kCreateDir = 0,
  kWrite,     // CheckpointFile::WriteAt
  kSyncFile,  // CheckpointFile::Sync
  kWriteFile,
  kSyncDir,
  kRename,
  kRemove,
  kNumOps,
};
const char* FsOpName(FsOp op);  // "write", "rename", ...

// Forwards every call to a base file system (leveldb's EnvWrapper) and fails
// one chosen call: the (skip + 1)-th call of `op` from now returns an InternalError
// without touching the disk. With `crash`, every call after it fails too (and
// nothing more reaches the disk), which leaves the files as a process killed at
// that point would. Reads (ReadFile, ListDir, Exists) are never failed.
class FaultInjectionFs : public CheckpointFs {
 public:
  explicit FaultInjectionFs(CheckpointFs* base) : base_(base) {}

  void FailOn(FsOp op, int skip, bool crash);
  void Reset();  // no fault armed, not crashed, counters zero
  bool crashed() const;
  int calls(FsOp op) const;  // calls of `op` seen (failed ones included)

  absl::Status CreateDir(const std::string& path) override;
  absl::StatusOr<std::unique_ptr<CheckpointFile>> OpenForWrite(const std::string& path) override;
  absl::Status WriteFile(const std::string& path, const std::string& contents) override;
  absl::StatusOr<std::string> ReadFile(const std::string& path) override;
  absl::Status SyncDir(const std::string& path) override;
  absl::Status Rename(const std::string& from, const std::string& to) override;
  absl::Status RemoveAll(const std::string& path) override;
  absl::StatusOr<std::vector<std::string>> ListDir(const std::string& path) override;
  bool Exists(const std::string& path) override;

  // OK, or the injected error for this call of `op` on `path`. Public for the
  // file wrapper; counts the call.
  absl::Status Check(FsOp op, const std::string& path);

 private:
  CheckpointFs* base_;
  mutable std::mutex mu_;
  int calls_[static_cast<int>(FsOp::kNumOps)] = {};
  int armed_op_ = -1;
  int fail_at_ = 0;
  bool crash_ = false;
  bool crashed_ = false;
};

}  // namespace moe

#endif  // MOE_RUNTIME_CHECKPOINT_FS_H_
