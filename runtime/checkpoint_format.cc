#include "runtime/checkpoint_format.h"

#include <fcntl.h>
#include <hdf5.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "data/h5_status.h"
#include "runtime/checkpoint_fs.h"
#include "runtime/checkpoint_hash.h"
#include "runtime/core/status.h"

namespace moe {

using data::H5Id;

#define CKPT_H5_CHECK(expr, file) RETURN_IF_ERROR(MOE_H5_CHECK_(expr, file))

std::string StepDirName(int64_t step) { return absl::StrFormat("step_%08d", step); }

std::optional<int64_t> ParseStepDirName(const std::string& name) {
  if (!absl::StartsWith(name, "step_")) return std::nullopt;
  const std::string digits = name.substr(5);
  if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos) return std::nullopt;
  int64_t step = 0;
  if (!absl::SimpleAtoi(digits, &step)) return std::nullopt;
  return step;
}

std::string RankFileName(int rank) { return absl::StrFormat("rank_%05d.h5", rank); }

std::string JoinPath(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  if (dir.back() == '/') return dir + name;
  return absl::StrCat(dir, "/", name);
}

absl::StatusOr<std::vector<std::pair<int64_t, std::string>>> ListCheckpoints(const std::string& dir) {
  CheckpointFs* fs = CheckpointFs::Default();
  std::vector<std::pair<int64_t, std::string>> out;
  if (!fs->Exists(dir)) return out;
  ASSIGN_OR_RETURN(std::vector<std::string> names, fs->ListDir(dir));
  for (const std::string& n : names) {
    if (std::optional<int64_t> step = ParseStepDirName(n)) out.emplace_back(*step, JoinPath(dir, n));
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  return out;
}

// ---- Boxes ---------------------------------------------------------------------

int64_t Box::numel() const {
  int64_t n = 1;
  for (int64_t c : count) n *= c;
  return n;
}

std::string Box::ToString() const {
  std::vector<std::string> parts;
  for (size_t i = 0; i < count.size(); ++i) {
    int64_t end = 0;  // a hostile manifest's box may end past int64: shown as offset:+count
    parts.push_back(__builtin_add_overflow(offset[i], count[i], &end)
                        ? absl::StrCat(offset[i], ":+", count[i])
                        : absl::StrCat(offset[i], ":", end));
  }
  return absl::StrCat("[", absl::StrJoin(parts, ", "), "]");
}

std::optional<Box> Intersect(const Box& a, const Box& b) {
  if (a.rank() != b.rank()) return std::nullopt;
  Box out;
  for (int i = 0; i < a.rank(); ++i) {
    const int64_t lo = std::max(a.offset[i], b.offset[i]);
    const int64_t hi = std::min(a.offset[i] + a.count[i], b.offset[i] + b.count[i]);
    if (hi <= lo) return std::nullopt;
    out.offset.push_back(lo);
    out.count.push_back(hi - lo);
  }
  return out;
}

namespace {

// Elements [begin, end) of the row-major order of dims [d, rank) of `box`, with
// the leading coordinates fixed in `prefix` (absolute), appended to `out`.
void Decompose(const Box& box, int d, int64_t begin, int64_t end, std::vector<int64_t>& prefix,
               std::vector<Box>& out) {
  if (begin >= end) return;
  const int rank = box.rank();
  int64_t inner = 1;
  for (int i = d + 1; i < rank; ++i) inner *= box.count[i];
  auto emit = [&](int64_t row_begin, int64_t rows) {  // full rows of dim d
    Box b;
    b.offset = prefix;
    b.count.assign(prefix.size(), 1);
    b.offset.push_back(box.offset[d] + row_begin);
    b.count.push_back(rows);
    for (int i = d + 1; i < rank; ++i) {
      b.offset.push_back(box.offset[i]);
      b.count.push_back(box.count[i]);
    }
    out.push_back(std::move(b));
  };
  if (d == rank - 1) {
    emit(begin, end - begin);
    return;
  }
  int64_t row = begin / inner;
  if (begin % inner != 0) {  // a partial first row
    const int64_t row_end = std::min(end, (row + 1) * inner);
    prefix.push_back(box.offset[d] + row);
    Decompose(box, d + 1, begin - row * inner, row_end - row * inner, prefix, out);
    prefix.pop_back();
    begin = row_end;
    ++row;
  }
  if (begin >= end) return;
  const int64_t full_rows = end / inner - row;
  if (full_rows > 0) {
    emit(row, full_rows);
    begin = (row + full_rows) * inner;
    row += full_rows;
  }
  if (begin < end) {  // a partial last row
    prefix.push_back(box.offset[d] + row);
    Decompose(box, d + 1, 0, end - row * inner, prefix, out);
    prefix.pop_back();
  }
}

}  // namespace

std::vector<Box> DecomposeFlatRange(const Box& box, int64_t begin, int64_t end) {
  std::vector<Box> out;
  std::vector<int64_t> prefix;
  if (box.rank() == 0 || begin >= end) return out;
  Decompose(box, 0, begin, end, prefix, out);
  return out;
}

void CopyRegion(const void* src, const Box& src_box, void* dst, const Box& dst_box, const Box& region,
                size_t elem_size) {
  // Relative coordinates; trailing dimensions that the region covers fully in
  // both boxes are fused so that each memcpy is as long as possible.
  std::vector<int64_t> s = src_box.count, d = dst_box.count, c = region.count, rs(c.size()), rd(c.size());
  for (size_t i = 0; i < c.size(); ++i) {
    rs[i] = region.offset[i] - src_box.offset[i];
    rd[i] = region.offset[i] - dst_box.offset[i];
  }
  while (c.size() > 1 && c.back() == s.back() && c.back() == d.back()) {
    const size_t n = c.size();
    const int64_t last = c.back();
    s[n - 2] *= last, d[n - 2] *= last, c[n - 2] *= last;
    rs[n - 2] *= last, rd[n - 2] *= last;
    s.pop_back(), d.pop_back(), c.pop_back(), rs.pop_back(), rd.pop_back();
  }
  const int r = static_cast<int>(c.size());
  std::vector<int64_t> sstride(r, 1), dstride(r, 1);
  for (int i = r - 2; i >= 0; --i) {
    sstride[i] = sstride[i + 1] * s[i + 1];
    dstride[i] = dstride[i + 1] * d[i + 1];
  }
  const size_t run = static_cast<size_t>(c[r - 1]) * elem_size;
  std::vector<int64_t> idx(r, 0);
  const char* sp = static_cast<const char*>(src);
  char* dp = static_cast<char*>(dst);
  for (;;) {
    int64_t so = 0, doff = 0;
    for (int i = 0; i < r; ++i) {
      so += (rs[i] + idx[i]) * sstride[i];
      doff += (rd[i] + idx[i]) * dstride[i];
    }
    std::memcpy(dp + doff * elem_size, sp + so * elem_size, run);
    int i = r - 2;
    for (; i >= 0; --i) {
      if (++idx[i] < c[i]) break;
      idx[i] = 0;
    }
    if (i < 0) break;
  }
}

// ---- Manifest ----------------------------------------------------------------

std::string SerializeManifestFile(const ckpt::Manifest& manifest) {
  ckpt::ManifestFile file;
  file.set_format_version(kCheckpointFormatVersion);
  manifest.SerializeToString(file.mutable_manifest());
  file.set_checksum(Xxh64Hash(file.manifest().data(), file.manifest().size()));
  return file.SerializeAsString();
}

absl::StatusOr<ckpt::Manifest> ParseManifestFile(const std::string& bytes, const std::string& path) {
  ckpt::ManifestFile file;
  if (!file.ParseFromString(bytes) || file.format_version() == 0) {
    return absl::DataLossError(
        absl::StrCat(path, " is damaged: not a checkpoint manifest (", bytes.size(), " bytes)"));
  }
  if (file.format_version() > kCheckpointFormatVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat(path, " has checkpoint format version ", file.format_version(), ", newer than version ",
                     kCheckpointFormatVersion, " that this build reads; load it with a newer moe-runtime"));
  }
  const uint64_t sum = Xxh64Hash(file.manifest().data(), file.manifest().size());
  if (sum != file.checksum()) {
    return absl::DataLossError(absl::StrCat(path, " is damaged: manifest checksum ", ChecksumHex(sum),
                                            " does not match the stored ", ChecksumHex(file.checksum())));
  }
  ckpt::Manifest manifest;
  if (!manifest.ParseFromString(file.manifest())) {
    return absl::DataLossError(absl::StrCat(path, " is damaged: the manifest does not parse"));
  }
  return manifest;
}

absl::StatusOr<ckpt::Manifest> ReadManifest(const std::string& dir) {
  const std::string path = JoinPath(dir, kManifestFileName);
  CheckpointFs* fs = CheckpointFs::Default();
  if (!fs->Exists(dir))
    return absl::NotFoundError(absl::StrCat("checkpoint directory ", dir, " does not exist"));
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    return absl::InvalidArgumentError(absl::StrCat(
        dir,
        " is not a checkpoint directory (a plain file); give a step_NNNNNNNN directory or a checkpoint.dir"));
  }
  if (!fs->Exists(path)) {
    return absl::DataLossError(
        absl::StrCat(dir, " is not a complete checkpoint: ", kManifestFileName, " is missing"));
  }
  ASSIGN_OR_RETURN(std::string bytes, fs->ReadFile(path));
  return ParseManifestFile(bytes, path);
}

absl::Status ValidateManifest(const ckpt::Manifest& manifest, const std::string& dir) {
  auto bad = [&](const std::string& tensor, const std::string& what) {
    return absl::DataLossError(absl::StrCat("checkpoint ", dir, ": tensor ", tensor, ": ", what));
  };
  for (const ckpt::TensorEntry& t : manifest.tensors()) {
    if (t.dtype() != "f32") return bad(t.name(), absl::StrCat("dtype \"", t.dtype(), "\", expected f32"));
    const int rank = t.global_shape_size();
    if (rank < 1 || rank > 5) return bad(t.name(), absl::StrCat("rank ", rank, " is not in 1..5"));
    // Any product of the dimensions is bounded first, so that no count below
    // (numel, a shard's bytes, offset + count) can overflow int64.
    constexpr int64_t kMaxElements = int64_t{1} << 60;
    int64_t numel = 1;
    for (int64_t d : t.global_shape()) {
      if (d <= 0) return bad(t.name(), "a dimension of its global shape is <= 0");
      if (__builtin_mul_overflow(numel, d, &numel) || numel > kMaxElements) {
        return bad(t.name(), absl::StrCat("its global shape [", absl::StrJoin(t.global_shape(), ","),
                                          "] holds more than 2^60 elements (a damaged manifest?)"));
      }
    }
    int64_t covered = 0;
    std::vector<Box> boxes;
    for (const ckpt::Shard& s : t.shards()) {
      Box b{{s.offset().begin(), s.offset().end()}, {s.count().begin(), s.count().end()}};
      if (b.offset.size() != static_cast<size_t>(rank) || b.count.size() != static_cast<size_t>(rank)) {
        return bad(t.name(), "a shard's box has the wrong rank");
      }
      for (int i = 0; i < rank; ++i) {
        if (b.offset[i] < 0 || b.count[i] <= 0 || b.offset[i] > t.global_shape(i) - b.count[i]) {
          return bad(t.name(), absl::StrCat("shard ", b.ToString(), " lies outside the global shape"));
        }
      }
      if (s.nbytes() != b.numel() * 4)
        return bad(t.name(), absl::StrCat("shard ", b.ToString(), " nbytes mismatch"));
      if (s.file().empty() || s.dataset().empty() || s.file().find('/') != std::string::npos) {
        return bad(t.name(), absl::StrCat("shard ", b.ToString(), " names no file or dataset"));
      }
      for (const Box& o : boxes) {
        if (Intersect(o, b))
          return bad(t.name(), absl::StrCat("shards ", o.ToString(), " and ", b.ToString(), " overlap"));
      }
      covered += b.numel();
      boxes.push_back(std::move(b));
    }
    if (covered != numel) {
      return bad(t.name(), absl::StrCat("its shards cover ", covered, " of ", numel, " elements"));
    }
  }
  return absl::OkStatus();
}

// ---- HDF5 ----------------------------------------------------------------------

namespace {

std::vector<hsize_t> Dims(const std::vector<int64_t>& v) { return std::vector<hsize_t>(v.begin(), v.end()); }

absl::Status WriteInt64Attribute(hid_t obj, const char* name, const std::vector<int64_t>& values,
                                 const std::string& file) {
  const hsize_t n = values.size();
  H5Id space(H5Screate_simple(1, &n, nullptr));
  CKPT_H5_CHECK(space.get(), file);
  H5Id attr(H5Acreate2(obj, name, H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT));
  CKPT_H5_CHECK(attr.get(), file);
  CKPT_H5_CHECK(H5Awrite(attr.get(), H5T_NATIVE_INT64, values.data()), file);
  return absl::OkStatus();
}

absl::StatusOr<H5Id> LinkCreateProps(const std::string& file) {
  H5Id lcpl(H5Pcreate(H5P_LINK_CREATE));
  CKPT_H5_CHECK(lcpl.get(), file);
  CKPT_H5_CHECK(H5Pset_create_intermediate_group(lcpl.get(), 1), file);
  return lcpl;
}

// Flushes (checked) then closes the file: its bytes are in the OS when this
// returns OK. The caller fsyncs.
absl::Status CloseFile(H5Id& file, const std::string& path) {
  const herr_t rc = H5Fflush(file.get(), H5F_SCOPE_LOCAL);
  absl::Status s = MOE_H5_CHECK_(rc, path);
  file.Reset();
  return s;
}

}  // namespace

absl::Status CreateRankFileLayout(const std::string& path, std::vector<RankDataset>& datasets) {
  data::ScopedH5Quiet quiet;
  H5Id file(H5Fcreate(path.c_str(), H5F_ACC_EXCL, H5P_DEFAULT, H5P_DEFAULT));
  CKPT_H5_CHECK(file.get(), path);
  ASSIGN_OR_RETURN(H5Id lcpl, LinkCreateProps(path));
  H5Id dcpl(H5Pcreate(H5P_DATASET_CREATE));
  CKPT_H5_CHECK(dcpl.get(), path);
  CKPT_H5_CHECK(H5Pset_layout(dcpl.get(), H5D_CONTIGUOUS), path);
  CKPT_H5_CHECK(H5Pset_alloc_time(dcpl.get(), H5D_ALLOC_TIME_EARLY), path);
  CKPT_H5_CHECK(H5Pset_fill_time(dcpl.get(), H5D_FILL_TIME_NEVER), path);
  for (RankDataset& d : datasets) {
    const std::vector<hsize_t> dims = Dims(d.shape);
    H5Id space(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr));
    CKPT_H5_CHECK(space.get(), path);
    H5Id dset(H5Dcreate2(file.get(), d.dataset.c_str(), H5T_IEEE_F32LE, space.get(), lcpl.get(), dcpl.get(),
                         H5P_DEFAULT));
    CKPT_H5_CHECK(dset.get(), path);
    RETURN_IF_ERROR(WriteInt64Attribute(dset.get(), "global_offset", d.global_offset, path));
    RETURN_IF_ERROR(WriteInt64Attribute(dset.get(), "global_shape", d.global_shape, path));
    const haddr_t offset = H5Dget_offset(dset.get());
    if (offset == HADDR_UNDEF) {
      return absl::InternalError(
          absl::StrCat("H5Dget_offset(", d.dataset, ") on ", path, ": no storage allocated"));
    }
    d.file_offset = static_cast<uint64_t>(offset);
  }
  return CloseFile(file, path);
}

absl::Status WriteMasterFile(const std::string& path, const ckpt::Manifest& manifest) {
  data::ScopedH5Quiet quiet;
  H5Id file(H5Fcreate(path.c_str(), H5F_ACC_EXCL, H5P_DEFAULT, H5P_DEFAULT));
  CKPT_H5_CHECK(file.get(), path);
  ASSIGN_OR_RETURN(H5Id lcpl, LinkCreateProps(path));
  for (const ckpt::TensorEntry& t : manifest.tensors()) {
    const std::vector<hsize_t> dims(t.global_shape().begin(), t.global_shape().end());
    const int rank = static_cast<int>(dims.size());
    H5Id space(H5Screate_simple(rank, dims.data(), nullptr));
    CKPT_H5_CHECK(space.get(), path);
    H5Id dcpl(H5Pcreate(H5P_DATASET_CREATE));
    CKPT_H5_CHECK(dcpl.get(), path);
    // Unmapped elements would read as NaN (there are none: shards tile the tensor).
    const float fill = std::numeric_limits<float>::quiet_NaN();
    CKPT_H5_CHECK(H5Pset_fill_value(dcpl.get(), H5T_NATIVE_FLOAT, &fill), path);
    for (const ckpt::Shard& s : t.shards()) {
      const std::vector<hsize_t> start(s.offset().begin(), s.offset().end());
      const std::vector<hsize_t> count(s.count().begin(), s.count().end());
      H5Id vspace(H5Scopy(space.get()));
      CKPT_H5_CHECK(vspace.get(), path);
      CKPT_H5_CHECK(
          H5Sselect_hyperslab(vspace.get(), H5S_SELECT_SET, start.data(), nullptr, count.data(), nullptr),
          path);
      H5Id src(H5Screate_simple(rank, count.data(), nullptr));
      CKPT_H5_CHECK(src.get(), path);
      CKPT_H5_CHECK(
          H5Pset_virtual(dcpl.get(), vspace.get(), s.file().c_str(), s.dataset().c_str(), src.get()), path);
    }
    H5Id dset(H5Dcreate2(file.get(), t.name().c_str(), H5T_IEEE_F32LE, space.get(), lcpl.get(), dcpl.get(),
                         H5P_DEFAULT));
    CKPT_H5_CHECK(dset.get(), path);
  }
  H5Id root(H5Gopen2(file.get(), "/", H5P_DEFAULT));
  CKPT_H5_CHECK(root.get(), path);
  RETURN_IF_ERROR(WriteInt64Attribute(root.get(), "step", {manifest.step()}, path));
  RETURN_IF_ERROR(WriteInt64Attribute(root.get(), "format_version", {kCheckpointFormatVersion}, path));
  root.Reset();
  return CloseFile(file, path);
}

struct ShardReader::Impl {
  std::map<std::string, H5Id> files;
  std::map<std::string, int> fds;  // the same files for pread of contiguous data
  ~Impl() {
    for (auto& [name, fd] : fds) ::close(fd);
  }
};

ShardReader::ShardReader(std::string dir) : dir_(std::move(dir)), impl_(new Impl) {}
ShardReader::~ShardReader() = default;

absl::Status ShardReader::Read(const ckpt::TensorEntry& tensor, const ckpt::Shard& shard, void* dst) {
  // One piece: the whole shard straight into dst.
  const size_t whole = static_cast<size_t>(std::max<int64_t>(shard.nbytes(), 4));
  return ReadInChunks(tensor, shard, dst, whole, nullptr);
}

absl::Status ShardReader::ReadInChunks(
    const ckpt::TensorEntry& tensor, const ckpt::Shard& shard, void* buffer, size_t buffer_bytes,
    const std::function<absl::Status(int64_t byte_offset, size_t nbytes)>& consume) {
  const Box box{{shard.offset().begin(), shard.offset().end()}, {shard.count().begin(), shard.count().end()}};
  const std::string where = absl::StrCat("checkpoint ", dir_, ": file ", shard.file(), ", tensor ",
                                         tensor.name(), ", shard ", box.ToString());
  const std::string path = JoinPath(dir_, shard.file());
  data::ScopedH5Quiet quiet;
  auto it = impl_->files.find(shard.file());
  if (it == impl_->files.end()) {
    H5Id f(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT));
    if (!f.valid()) {
      absl::Status s = data::H5Error("H5Fopen", path, __FILE__, __LINE__);
      return absl::DataLossError(
          absl::StrCat(where, ": cannot open the file (missing or truncated): ", s.message()));
    }
    it = impl_->files.emplace(shard.file(), std::move(f)).first;
  }
  H5Id dset(H5Dopen2(it->second.get(), shard.dataset().c_str(), H5P_DEFAULT));
  if (!dset.valid()) {
    absl::Status s = data::H5Error("H5Dopen2", path, __FILE__, __LINE__);
    return absl::DataLossError(
        absl::StrCat(where, ": dataset ", shard.dataset(), " is missing: ", s.message()));
  }
  H5Id space(H5Dget_space(dset.get()));
  const int rank = space.valid() ? H5Sget_simple_extent_ndims(space.get()) : -1;
  std::vector<hsize_t> dims(std::max(rank, 0));
  if (rank != box.rank() || H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr) < 0 ||
      Dims(box.count) != dims) {
    return absl::DataLossError(
        absl::StrCat(where, ": dataset ", shard.dataset(), " does not have the shard's shape"));
  }
  H5Id type(H5Dget_type(dset.get()));
  if (!type.valid() || H5Tget_class(type.get()) != H5T_FLOAT || H5Tget_size(type.get()) != 4) {
    return absl::DataLossError(absl::StrCat(where, ": dataset ", shard.dataset(), " is not f32"));
  }
  const size_t chunk = buffer_bytes / 4 * 4;
  if (chunk == 0) return absl::InvalidArgumentError(absl::StrCat(where, ": a read buffer of 0 f32 elements"));
  // Contiguous data (what the checkpointer writes) is read with pread in
  // pieces, each hashed while still in cache; anything else through HDF5, a
  // chunk at a time as the hyperslabs of its flat element range.
  const haddr_t offset = H5Dget_offset(dset.get());
  const bool contiguous = offset != HADDR_UNDEF && H5Tget_order(type.get()) == H5T_ORDER_LE;
  int fd = -1;
  if (contiguous) {
    auto fd_it = impl_->fds.find(shard.file());
    if (fd_it == impl_->fds.end()) {
      const int opened = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
      if (opened < 0)
        return absl::DataLossError(absl::StrCat(where, ": open failed: ", std::strerror(errno)));
      fd_it = impl_->fds.emplace(shard.file(), opened).first;
    }
    fd = fd_it->second;
  }
  Xxh64 hash;
  char* out = static_cast<char*>(buffer);
  const int64_t total = shard.nbytes();
  for (int64_t begin = 0; begin < total;) {
    const size_t n = static_cast<size_t>(std::min<int64_t>(static_cast<int64_t>(chunk), total - begin));
    if (contiguous) {
      for (size_t done = 0; done < n;) {
        const size_t m = std::min<size_t>(size_t{4} << 20, n - done);
        const ssize_t r = ::pread(fd, out + done, m, static_cast<off_t>(offset + begin + done));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
          return absl::DataLossError(absl::StrCat(where,
                                                  ": the file ends before the shard's data (truncated?)",
                                                  r < 0 ? absl::StrCat(": ", std::strerror(errno)) : ""));
        }
        hash.Update(out + done, static_cast<size_t>(r));
        done += static_cast<size_t>(r);
      }
    } else {
      herr_t rc = 0;
      if (static_cast<int64_t>(n) == total) {
        rc = H5Dread(dset.get(), H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, out);
      } else {
        H5Id file_space(H5Dget_space(dset.get()));
        const hsize_t count = n / 4;
        H5Id mem_space(H5Screate_simple(1, &count, nullptr));
        rc = file_space.valid() && mem_space.valid() ? H5Sselect_none(file_space.get()) : -1;
        const Box zero_based{std::vector<int64_t>(box.rank(), 0), box.count};
        for (const Box& b :
             DecomposeFlatRange(zero_based, begin / 4, (begin + static_cast<int64_t>(n)) / 4)) {
          if (rc < 0) break;
          rc = H5Sselect_hyperslab(file_space.get(), H5S_SELECT_OR, Dims(b.offset).data(), nullptr,
                                   Dims(b.count).data(), nullptr);
        }
        if (rc >= 0)
          rc = H5Dread(dset.get(), H5T_NATIVE_FLOAT, mem_space.get(), file_space.get(), H5P_DEFAULT, out);
      }
      if (rc < 0) {
        absl::Status s = data::H5Error("H5Dread", path, __FILE__, __LINE__);
        return absl::DataLossError(absl::StrCat(where, ": read failed (truncated file?): ", s.message()));
      }
      hash.Update(out, n);
    }
    if (consume) RETURN_IF_ERROR(consume(begin, n));
    begin += static_cast<int64_t>(n);
  }
  const uint64_t sum = hash.Digest();
  if (sum != shard.checksum()) {
    return absl::DataLossError(absl::StrCat(where, ": checksum mismatch (computed ", ChecksumHex(sum),
                                            ", stored ", ChecksumHex(shard.checksum()),
                                            "): the data is corrupt"));
  }
  return absl::OkStatus();
}

// ---- Verify ----------------------------------------------------------------------

absl::Status CheckMasterFile(const ckpt::Manifest& manifest, const std::string& dir) {
  const std::string path = JoinPath(dir, kMasterFileName);
  CheckpointFs* fs = CheckpointFs::Default();
  if (!fs->Exists(path)) {
    return absl::DataLossError(absl::StrCat("checkpoint ", dir, ": ", kMasterFileName, " is missing"));
  }
  if (manifest.master_checksum() == 0) return absl::OkStatus();
  ASSIGN_OR_RETURN(std::string bytes, fs->ReadFile(path));
  const uint64_t sum = Xxh64Hash(bytes.data(), bytes.size());
  if (sum != manifest.master_checksum()) {
    return absl::DataLossError(absl::StrCat("checkpoint ", dir, ": ", kMasterFileName, " is damaged (",
                                            bytes.size(), " bytes, xxh64 ", absl::Hex(sum, absl::kZeroPad16),
                                            ", the manifest says ",
                                            absl::Hex(manifest.master_checksum(), absl::kZeroPad16), ")"));
  }
  return absl::OkStatus();
}

absl::Status VerifyCheckpoint(const std::string& dir, VerifyReport* report) {
  *report = VerifyReport();
  ASSIGN_OR_RETURN(ckpt::Manifest manifest, ReadManifest(dir));
  RETURN_IF_ERROR(ValidateManifest(manifest, dir));
  std::vector<char> buffer, through_master;
  {
    ShardReader reader(dir);
    for (const ckpt::TensorEntry& t : manifest.tensors()) {
      ++report->tensors;
      for (const ckpt::Shard& s : t.shards()) {
        ++report->shards;
        report->bytes += s.nbytes();
        buffer.resize(static_cast<size_t>(s.nbytes()));
        if (absl::Status st = reader.Read(t, s, buffer.data()); !st.ok()) {
          report->errors.push_back(std::string(st.message()));
          continue;
        }
        // A checkpoint of NaN parameters verifies by checksum but cannot train.
        const float* x = reinterpret_cast<const float*>(buffer.data());
        const int64_t n = s.nbytes() / 4;
        int64_t bad = 0, first = -1;
        for (int64_t i = 0; i < n; ++i) {
          if (!std::isfinite(x[i])) {
            if (bad++ == 0) first = i;
          }
        }
        if (bad > 0) {
          const Box b{{s.offset().begin(), s.offset().end()}, {s.count().begin(), s.count().end()}};
          report->errors.push_back(absl::StrCat(
              "checkpoint ", dir, ": tensor ", t.name(), " region ", b.ToString(), " in ", s.file(),
              " holds ", bad, " NaN or Inf value(s) (first at element ", first, " of the shard)"));
        }
      }
    }
  }
  // The master file: every tensor present with its global shape, and each
  // shard's region read through the virtual dataset equal to the shard.
  const std::string master = JoinPath(dir, kMasterFileName);
  if (absl::Status st = CheckMasterFile(manifest, dir); !st.ok())
    report->errors.push_back(std::string(st.message()));
  data::ScopedH5Quiet quiet;
  H5Id file(H5Fopen(master.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT));
  if (!file.valid()) {
    report->errors.push_back(absl::StrCat("checkpoint ", dir, ": cannot open ", kMasterFileName));
  } else if (report->errors.empty()) {
    for (const ckpt::TensorEntry& t : manifest.tensors()) {
      H5Id dset(H5Dopen2(file.get(), t.name().c_str(), H5P_DEFAULT));
      if (!dset.valid()) {
        report->errors.push_back(
            absl::StrCat("checkpoint ", dir, ": ", kMasterFileName, " lacks tensor ", t.name()));
        continue;
      }
      H5Id space(H5Dget_space(dset.get()));
      std::vector<hsize_t> dims(t.global_shape_size());
      if (H5Sget_simple_extent_ndims(space.get()) != t.global_shape_size() ||
          H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr) < 0 ||
          dims != std::vector<hsize_t>(t.global_shape().begin(), t.global_shape().end())) {
        report->errors.push_back(absl::StrCat("checkpoint ", dir, ": ", kMasterFileName, " tensor ", t.name(),
                                              " has the wrong shape"));
        continue;
      }
      for (const ckpt::Shard& s : t.shards()) {
        const std::vector<hsize_t> start(s.offset().begin(), s.offset().end());
        const std::vector<hsize_t> count(s.count().begin(), s.count().end());
        H5Id fspace(H5Scopy(space.get()));
        H5Id mspace(H5Screate_simple(static_cast<int>(count.size()), count.data(), nullptr));
        through_master.resize(static_cast<size_t>(s.nbytes()));
        const bool ok = H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, start.data(), nullptr, count.data(),
                                            nullptr) >= 0 &&
                        H5Dread(dset.get(), H5T_NATIVE_FLOAT, mspace.get(), fspace.get(), H5P_DEFAULT,
                                through_master.data()) >= 0;
        if (!ok || Xxh64Hash(through_master.data(), through_master.size()) != s.checksum()) {
          const Box b{{s.offset().begin(), s.offset().end()}, {s.count().begin(), s.count().end()}};
          report->errors.push_back(absl::StrCat("checkpoint ", dir, ": ", kMasterFileName, " tensor ",
                                                t.name(), " region ", b.ToString(),
                                                " does not read back the shard in ", s.file()));
        }
      }
    }
  }
  if (!report->errors.empty()) return absl::DataLossError(report->errors.front());
  return absl::OkStatus();
}

}  // namespace moe
