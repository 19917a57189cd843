#include "runtime/checkpoint_fs.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <system_error>

#include "absl/strings/str_cat.h"

namespace moe {
namespace {

absl::Status Errno(const std::string& call, const std::string& path, int err) {
  return absl::InternalError(absl::StrCat(call, "(", path, ") failed: ", std::strerror(err)));
}

class PosixFile : public CheckpointFile {
 public:
  PosixFile(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  ~PosixFile() override {
    if (fd_ >= 0) ::close(fd_);
  }
  absl::Status WriteAt(uint64_t offset, const void* data, size_t nbytes) override {
    const char* p = static_cast<const char*>(data);
    while (nbytes > 0) {
      // Bounded calls: Linux writes at most ~2 GiB per call anyway.
      const size_t n = std::min<size_t>(nbytes, size_t{1} << 30);
      const ssize_t w = ::pwrite(fd_, p, n, static_cast<off_t>(offset));
      if (w < 0) {
        if (errno == EINTR) continue;
        return Errno("pwrite", path_, errno);
      }
      if (w == 0) return absl::InternalError(absl::StrCat("pwrite(", path_, ") wrote nothing"));
      p += w;
      offset += static_cast<uint64_t>(w);
      nbytes -= static_cast<size_t>(w);
    }
    return absl::OkStatus();
  }
  absl::Status Sync() override {
    if (::fsync(fd_) != 0) return Errno("fsync", path_, errno);
    return absl::OkStatus();
  }
  absl::Status Close() override {
    if (fd_ < 0) return absl::OkStatus();
    const int rc = ::close(fd_);
    fd_ = -1;
    if (rc != 0) return Errno("close", path_, errno);
    return absl::OkStatus();
  }

 private:
  int fd_;
  std::string path_;
};

class PosixFs : public CheckpointFs {
 public:
  absl::Status CreateDir(const std::string& path) override {
    std::error_code ec;
    std::filesystem::create_directories(path, ec);
    if (ec) return absl::InternalError(absl::StrCat("mkdir(", path, ") failed: ", ec.message()));
    return absl::OkStatus();
  }
  absl::StatusOr<std::unique_ptr<CheckpointFile>> OpenForWrite(const std::string& path) override {
    const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
    if (fd < 0) return Errno("open", path, errno);
    return std::unique_ptr<CheckpointFile>(new PosixFile(fd, path));
  }
  absl::Status WriteFile(const std::string& path, const std::string& contents) override {
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return Errno("open", path, errno);
    PosixFile f(fd, path);
    absl::Status s = f.WriteAt(0, contents.data(), contents.size());
    if (s.ok()) s = f.Sync();
    absl::Status c = f.Close();
    return s.ok() ? c : s;
  }
  absl::StatusOr<std::string> ReadFile(const std::string& path) override {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return Errno("open", path, errno);
    std::string out;
    char buf[1 << 16];
    for (;;) {
      const ssize_t r = ::read(fd, buf, sizeof(buf));
      if (r < 0) {
        if (errno == EINTR) continue;
        const int err = errno;
        ::close(fd);
        return Errno("read", path, err);
      }
      if (r == 0) break;
      out.append(buf, static_cast<size_t>(r));
    }
    ::close(fd);
    return out;
  }
  absl::Status SyncDir(const std::string& path) override {
    const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return Errno("open", path, errno);
    const int rc = ::fsync(fd);
    const int err = errno;
    ::close(fd);
    if (rc != 0) return Errno("fsync", path, err);
    return absl::OkStatus();
  }
  absl::Status Rename(const std::string& from, const std::string& to) override {
    if (::rename(from.c_str(), to.c_str()) != 0) return Errno("rename", from + " -> " + to, errno);
    return absl::OkStatus();
  }
  absl::Status RemoveAll(const std::string& path) override {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
    if (ec) return absl::InternalError(absl::StrCat("remove(", path, ") failed: ", ec.message()));
    return absl::OkStatus();
  }
  absl::StatusOr<std::vector<std::string>> ListDir(const std::string& path) override {
    DIR* d = ::opendir(path.c_str());
    if (d == nullptr) return Errno("opendir", path, errno);
    std::vector<std::string> names;
    while (dirent* e = ::readdir(d)) {
      const std::string name = e->d_name;
      if (name != "." && name != "..") names.push_back(name);
    }
    ::closedir(d);
    std::sort(names.begin(), names.end());
    return names;
  }
  bool Exists(const std::string& path) override {
    struct stat st;
    return ::stat(path.c_str(), &st) == 0;
  }
};

// Routes a file's calls through the fault injector.
class FaultFile : public CheckpointFile {
 public:
  FaultFile(FaultInjectionFs* fs, std::unique_ptr<CheckpointFile> base, std::string path)
      : fs_(fs), base_(std::move(base)), path_(std::move(path)) {}
  absl::Status WriteAt(uint64_t offset, const void* data, size_t nbytes) override {
    if (absl::Status s = fs_->Check(FsOp::kWrite, path_); !s.ok()) return s;
    return base_->WriteAt(offset, data, nbytes);
  }
  absl::Status Sync() override {
    if (absl::Status s = fs_->Check(FsOp::kSyncFile, path_); !s.ok()) return s;
    return base_->Sync();
  }
  absl::Status Close() override { return base_->Close(); }

 private:
  FaultInjectionFs* fs_;
  std::unique_ptr<CheckpointFile> base_;
  std::string path_;
};

}  // namespace

CheckpointFs* CheckpointFs::Default() {
  static PosixFs* fs = new PosixFs();
  return fs;
}

const char* FsOpName(FsOp op) {
  switch (op) {
    case FsOp::kCreateDir:
      return "create_dir";
    case FsOp::kWrite:
      return "write";
    case FsOp::kSyncFile:
      return "sync_file";
    case FsOp::kWriteFile:
      return "write_file";
    case FsOp::kSyncDir:
      return "sync_dir";
    case FsOp::kRename:
      return "rename";
    case FsOp::kRemove:
      return "remove";
    case FsOp::kNumOps:
      break;
  }
  return "?";
}

void FaultInjectionFs::FailOn(FsOp op, int skip, bool crash) {
  std::lock_guard<std::mutex> lock(mu_);
  armed_op_ = static_cast<int>(op);
  fail_at_ = calls_[armed_op_] + skip;
  crash_ = crash;
}

void FaultInjectionFs::Reset() {
  std::lock_guard<std::mutex> lock(mu_);
  armed_op_ = -1;
  crash_ = crashed_ = false;
  std::fill(std::begin(calls_), std::end(calls_), 0);
}

bool FaultInjectionFs::crashed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return crashed_;
}

int FaultInjectionFs::calls(FsOp op) const {
  std::lock_guard<std::mutex> lock(mu_);
  return calls_[static_cast<int>(op)];
}

absl::Status FaultInjectionFs::Check(FsOp op, const std::string& path) {
  std::lock_guard<std::mutex> lock(mu_);
  const int i = static_cast<int>(op);
  const int n = calls_[i]++;
  if (crashed_) {
    return absl::InternalError(
        absl::StrCat("injected fault: ", FsOpName(op), "(", path, ") after a simulated crash"));
  }
  if (i == armed_op_ && n == fail_at_) {
    armed_op_ = -1;
    crashed_ = crash_;
    return absl::InternalError(absl::StrCat("injected fault: ", FsOpName(op), "(", path, ")"));
  }
  return absl::OkStatus();
}

absl::Status FaultInjectionFs::CreateDir(const std::string& path) {
  if (absl::Status s = Check(FsOp::kCreateDir, path); !s.ok()) return s;
  return base_->CreateDir(path);
}

absl::StatusOr<std::unique_ptr<CheckpointFile>> FaultInjectionFs::OpenForWrite(const std::string& path) {
  absl::StatusOr<std::unique_ptr<CheckpointFile>> f = base_->OpenForWrite(path);
  if (!f.ok()) return f.status();
  return std::unique_ptr<CheckpointFile>(new FaultFile(this, std::move(*f), path));
}

absl::Status FaultInjectionFs::WriteFile(const std::string& path, const std::string& contents) {
  if (absl::Status s = Check(FsOp::kWriteFile, path); !s.ok()) return s;
  return base_->WriteFile(path, contents);
}

absl::StatusOr<std::string> FaultInjectionFs::ReadFile(const std::string& path) {
  return base_->ReadFile(path);
}

absl::Status FaultInjectionFs::SyncDir(const std::string& path) {
  if (absl::Status s = Check(FsOp::kSyncDir, path); !s.ok()) return s;
  return base_->SyncDir(path);
}

absl::Status FaultInjectionFs::Rename(const std::string& from, const std::string& to) {
  if (absl::Status s = Check(FsOp::kRename, from); !s.ok()) return s;
  return base_->Rename(from, to);
}

absl::Status FaultInjectionFs::RemoveAll(const std::string& path) {
  if (absl::Status s = Check(FsOp::kRemove, path); !s.ok()) return s;
  return base_->RemoveAll(path);
}

absl::StatusOr<std::vector<std::string>> FaultInjectionFs::ListDir(const std::string& path) {
  return base_->ListDir(path);
}

bool FaultInjectionFs::Exists(const std::string& path) { return base_->Exists(path); }

}  // namespace moe
