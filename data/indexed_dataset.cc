#include "data/indexed_dataset.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "runtime/core/status.h"

namespace moe::data {
namespace {

static_assert(std::endian::native == std::endian::little,
              "the Megatron format is little-endian; this reader maps it directly");

constexpr char kRegenerate[] =
    "regenerate the pair with moe-preprocess (or Megatron's tools/preprocess_data.py)";

std::string ErrnoText() { return std::strerror(errno); }

template <typename T>
T LoadAt(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// An open file and its size at open, closed on scope exit. Nothing is
// memory-mapped: a mapped file that shrinks turns a read past its new end into
// SIGBUS, while pread(2) just comes back short (ReadExact).
struct File {
  int fd = -1;
  int64_t size = 0;
  File() = default;
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  ~File() {
    if (fd >= 0) ::close(fd);
  }
};

absl::Status OpenFile(const std::string& path, File* f) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) {
      return absl::NotFoundError(absl::StrCat(path,
                                              ": no such file; data.train_path / data.valid_path "
                                              "must name an existing Megatron prefix (PREFIX.bin + "
                                              "PREFIX.idx), e.g. one written by moe-preprocess"));
    }
    return absl::PermissionDeniedError(absl::StrCat(path, ": cannot open: ", ErrnoText()));
  }
  f->fd = fd;
  struct stat st;
  if (fstat(fd, &st) != 0) return absl::InternalError(absl::StrCat(path, ": fstat failed: ", ErrnoText()));
  if (!S_ISREG(st.st_mode)) return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  f->size = st.st_size;
  return absl::OkStatus();
}

// The error for a file that is now shorter than when the job opened it.
absl::Status ShrankError(const std::string& path, int64_t opened_size, int fd) {
  struct stat st;
  const std::string now =
      fstat(fd, &st) == 0 ? absl::StrCat(static_cast<int64_t>(st.st_size)) : std::string("fewer");
  return absl::DataLossError(absl::StrCat(
      path, " shrank from ", opened_size, " to ", now,
      " bytes while the job was reading it (truncated or rewritten in place); restore the file or "
      "write new data under another prefix (moe-preprocess writes a new file and renames it)"));
}

// Reads exactly `bytes` bytes at `offset` of the open file `fd` (of size
// `opened_size` when opened). A read that ends early (the file shrank since)
// is ShrankError, a failing one names the file and errno.
absl::Status ReadExact(int fd, const std::string& path, int64_t opened_size, int64_t offset, size_t bytes,
                       void* dst) {
  auto* p = static_cast<uint8_t*>(dst);
  while (bytes > 0) {
    const ssize_t got = ::pread(fd, p, bytes, static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      return absl::DataLossError(
          absl::StrCat(path, ": read of ", bytes, " bytes at byte ", offset, " failed: ", ErrnoText()));
    }
    if (got == 0) return ShrankError(path, opened_size, fd);
    p += got;
    offset += got;
    bytes -= static_cast<size_t>(got);
  }
  return absl::OkStatus();
}

}  // namespace

size_t MegatronDTypeSize(MegatronDType dtype) {
  switch (dtype) {
    case MegatronDType::kUint8:
    case MegatronDType::kInt8:
      return 1;
    case MegatronDType::kInt16:
    case MegatronDType::kUint16:
      return 2;
    case MegatronDType::kInt32:
    case MegatronDType::kFloat32:
      return 4;
    case MegatronDType::kInt64:
    case MegatronDType::kFloat64:
      return 8;
  }
  return 0;
}

const char* MegatronDTypeName(MegatronDType dtype) {
  switch (dtype) {
    case MegatronDType::kUint8:
      return "uint8";
    case MegatronDType::kInt8:
      return "int8";
    case MegatronDType::kInt16:
      return "int16";
    case MegatronDType::kInt32:
      return "int32";
    case MegatronDType::kInt64:
      return "int64";
    case MegatronDType::kFloat64:
      return "float64";
    case MegatronDType::kFloat32:
      return "float32";
    case MegatronDType::kUint16:
      return "uint16";
  }
  return "?";
}

bool IsMegatronDTypeCode(uint8_t code) { return code >= 1 && code <= 8; }

std::string IndexedDatasetPrefix(const std::string& path) {
  if (absl::EndsWith(path, ".bin") || absl::EndsWith(path, ".idx")) {
    return path.substr(0, path.size() - 4);
  }
  return path;
}
std::string BinPath(const std::string& prefix) { return absl::StrCat(prefix, ".bin"); }
std::string IdxPath(const std::string& prefix) { return absl::StrCat(prefix, ".idx"); }

// ---------------------------------------------------------------------------
// IndexedDataset

absl::StatusOr<std::unique_ptr<IndexedDataset>> IndexedDataset::Open(const std::string& path) {
  const std::string prefix = IndexedDatasetPrefix(path);
  const std::string idx_path = IdxPath(prefix);
  const std::string bin_path = BinPath(prefix);
  std::unique_ptr<IndexedDataset> ds(new IndexedDataset());
  ds->prefix_ = prefix;

  File idx;
  RETURN_IF_ERROR(OpenFile(idx_path, &idx));
  File bin;
  RETURN_IF_ERROR(OpenFile(bin_path, &bin));

  if (idx.size < kIndexHeaderBytes) {
    return absl::DataLossError(absl::StrCat(idx_path, ": truncated .idx: ", idx.size,
                                            " bytes, shorter than the 34-byte header; ", kRegenerate));
  }
  uint8_t h[kIndexHeaderBytes];
  RETURN_IF_ERROR(ReadExact(idx.fd, idx_path, idx.size, 0, sizeof(h), h));
  if (std::memcmp(h, kIndexMagic, 9) != 0) {
    std::string found;
    for (int i = 0; i < 9; ++i) {
      found += (h[i] >= 32 && h[i] < 127) ? std::string(1, static_cast<char>(h[i]))
                                          : absl::StrCat("\\x", absl::Hex(h[i], absl::kZeroPad2));
    }
    return absl::DataLossError(absl::StrCat(idx_path, ": bad magic at offset 0: \"", found,
                                            "\", expected \"MMIDIDX\\x00\\x00\"; this is not a Megatron "
                                            "mmap indexed dataset (the old \"TNTIDX\" lazy format is not "
                                            "supported); ",
                                            kRegenerate));
  }
  const uint64_t version = LoadAt<uint64_t>(h + 9);
  if (version != 1) {
    return absl::DataLossError(
        absl::StrCat(idx_path, ": version (offset 9) = ", version, ", only version 1 exists; ", kRegenerate));
  }
  const uint8_t code = h[17];
  if (!IsMegatronDTypeCode(code)) {
    return absl::DataLossError(
        absl::StrCat(idx_path, ": unknown dtype code ", static_cast<int>(code),
                     " at offset 17; Megatron's codes are 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, "
                     "6 float64, 7 float32, 8 uint16; ",
                     kRegenerate));
  }
  ds->dtype_ = static_cast<MegatronDType>(code);
  ds->item_size_ = MegatronDTypeSize(ds->dtype_);
  const uint64_t n = LoadAt<uint64_t>(h + 18);
  const uint64_t d = LoadAt<uint64_t>(h + 26);

  // Sizes in uint64 with overflow in mind: a corrupt count must not wrap.
  const uint64_t body = static_cast<uint64_t>(idx.size - kIndexHeaderBytes);
  if (n > body / 12 || d > body / 8 || 12 * n + 8 * d > body) {
    return absl::DataLossError(absl::StrCat(idx_path, ": truncated .idx: header says sequence_count = ", n,
                                            " and document_count = ", d, ", which need ", kIndexHeaderBytes,
                                            " + 12*", n, " + 8*", d, " bytes, but the file has ", idx.size,
                                            "; ", kRegenerate));
  }
  const uint64_t expected = 12 * n + 8 * d;
  if (body == expected) {
    ds->has_modes_ = false;
  } else if (body == expected + n) {
    ds->has_modes_ = true;  // Megatron multimodal: one int8 mode per sequence
  } else {
    return absl::DataLossError(
        absl::StrCat(idx_path, ": .idx has ", idx.size, " bytes but its header (sequence_count = ", n,
                     ", document_count = ", d, ") describes ", kIndexHeaderBytes + expected, " (or ",
                     kIndexHeaderBytes + expected + n, " with sequence modes); ", kRegenerate));
  }
  if (d < 1) {
    return absl::DataLossError(
        absl::StrCat(idx_path,
                     ": document_count (offset 26) = 0; Megatron always stores document_indices "
                     "starting with 0, so it is at least 1; ",
                     kRegenerate));
  }

  ds->lengths_.resize(n);
  ds->pointers_.resize(n);
  ds->document_indices_.resize(d);
  const int64_t lengths_off = kIndexHeaderBytes;
  const int64_t pointers_off = lengths_off + 4 * static_cast<int64_t>(n);
  const int64_t docs_off = pointers_off + 8 * static_cast<int64_t>(n);
  RETURN_IF_ERROR(ReadExact(idx.fd, idx_path, idx.size, lengths_off, 4 * n, ds->lengths_.data()));
  RETURN_IF_ERROR(ReadExact(idx.fd, idx_path, idx.size, pointers_off, 8 * n, ds->pointers_.data()));
  RETURN_IF_ERROR(ReadExact(idx.fd, idx_path, idx.size, docs_off, 8 * d, ds->document_indices_.data()));

  // Every sequence must lie inside the .bin.
  ds->token_offsets_.resize(n + 1);
  ds->token_offsets_[0] = 0;
  int64_t end_max = 0;
  const int64_t item = static_cast<int64_t>(ds->item_size_);
  for (uint64_t i = 0; i < n; ++i) {
    const int64_t len = ds->lengths_[i];
    const int64_t ptr = ds->pointers_[i];
    if (len < 0) {
      return absl::DataLossError(absl::StrCat(idx_path, ": sequence_lengths[", i, "] (byte offset ",
                                              lengths_off + 4 * static_cast<int64_t>(i), ") = ", len,
                                              " is negative; ", kRegenerate));
    }
    if (ptr < 0 || ptr > bin.size || len > (bin.size - ptr) / item) {
      // (ptr is then at most the .bin's size where the end is computed, and
      // len * item < 2^35, so the end cannot overflow.)
      const std::string where = ptr < 0 || ptr > bin.size ? absl::StrCat("starts at byte ", ptr)
                                                          : absl::StrCat("ends at byte ", ptr + len * item);
      return absl::DataLossError(
          absl::StrCat(bin_path, " does not match ", idx_path, ": sequence ", i, " (sequence_pointers[", i,
                       "] at .idx byte ", pointers_off + 8 * static_cast<int64_t>(i), " = ", ptr, ", length ",
                       len, " x ", item, " bytes) ", where, " but the .bin has only ", bin.size,
                       " bytes: the .bin is truncated or belongs to another .idx; ", kRegenerate));
    }
    end_max = std::max(end_max, ptr + len * item);
    ds->token_offsets_[i + 1] = ds->token_offsets_[i] + len;
  }
  if (end_max != bin.size) {
    return absl::DataLossError(absl::StrCat(
        bin_path, " does not match ", idx_path, ": the .idx describes ", n, " sequences of ",
        ds->token_offsets_[n], " ", MegatronDTypeName(ds->dtype_), " tokens ending at byte ", end_max,
        ", but the .bin has ", bin.size, " bytes; the two files come from different runs; ", kRegenerate));
  }
  // Document indices: 0, non-decreasing, ending at N.
  const auto& di = ds->document_indices_;
  if (di[0] != 0) {
    return absl::DataLossError(absl::StrCat(idx_path, ": document_indices[0] (byte offset ", docs_off,
                                            ") = ", di[0], ", must be 0; ", kRegenerate));
  }
  for (uint64_t k = 1; k < d; ++k) {
    if (di[k] < di[k - 1] || di[k] > static_cast<int64_t>(n)) {
      return absl::DataLossError(absl::StrCat(idx_path, ": document_indices[", k, "] (byte offset ",
                                              docs_off + 8 * static_cast<int64_t>(k), ") = ", di[k],
                                              " after ", di[k - 1],
                                              "; document indices must be non-decreasing and at most "
                                              "sequence_count = ",
                                              n, "; ", kRegenerate));
    }
  }
  if (di[d - 1] != static_cast<int64_t>(n)) {
    return absl::DataLossError(absl::StrCat(idx_path, ": the last document index (document_indices[", d - 1,
                                            "]) = ", di[d - 1], " but sequence_count = ", n,
                                            "; sequences after the last document boundary mean an "
                                            "unfinished document; ",
                                            kRegenerate));
  }

  ds->bin_path_ = bin_path;
  ds->bin_size_ = bin.size;
  ds->bin_fd_ = std::exchange(bin.fd, -1);
  return ds;
}

IndexedDataset::~IndexedDataset() {
  if (bin_fd_ >= 0) ::close(bin_fd_);
}

std::string IndexedDataset::Describe() const { return absl::StrCat(prefix_, ".{bin,idx}"); }

bool IndexedDataset::Decode(const uint8_t* p, int64_t* value) const {
  switch (dtype_) {
    case MegatronDType::kUint8:
      *value = p[0];
      return true;
    case MegatronDType::kInt8:
      *value = static_cast<int8_t>(p[0]);
      return true;
    case MegatronDType::kInt16:
      *value = LoadAt<int16_t>(p);
      return true;
    case MegatronDType::kUint16:
      *value = LoadAt<uint16_t>(p);
      return true;
    case MegatronDType::kInt32:
      *value = LoadAt<int32_t>(p);
      return true;
    case MegatronDType::kInt64:
      *value = LoadAt<int64_t>(p);
      return true;
    case MegatronDType::kFloat32: {
      const float f = LoadAt<float>(p);
      if (!(std::floor(f) == f) || std::fabs(f) > 9.0e15f) return false;
      *value = static_cast<int64_t>(f);
      return true;
    }
    case MegatronDType::kFloat64: {
      const double f = LoadAt<double>(p);
      if (!(std::floor(f) == f) || std::fabs(f) > 9.0e15) return false;
      *value = static_cast<int64_t>(f);
      return true;
    }
  }
  return false;
}

int64_t IndexedDataset::SequenceOf(int64_t pos) const {
  // The last s with token_offsets_[s] <= pos that is not empty.
  int64_t s = static_cast<int64_t>(std::upper_bound(token_offsets_.begin(), token_offsets_.end(), pos) -
                                   token_offsets_.begin()) -
              1;
  while (token_offsets_[s + 1] <= pos) ++s;  // skips empty sequences
  return s;
}

int64_t IndexedDataset::ByteOf(int64_t pos) const {
  const int64_t s = SequenceOf(pos);
  return pointers_[s] + (pos - token_offsets_[s]) * static_cast<int64_t>(item_size_);
}

absl::Status IndexedDataset::ReadRaw(int64_t begin, int64_t count, uint8_t* raw) const {
  if (count == 0) return absl::OkStatus();
  const int64_t item = static_cast<int64_t>(item_size_);
  const int64_t n = num_sequences();
  int64_t s = SequenceOf(begin);
  int64_t pos = begin;
  while (count > 0) {
    while (token_offsets_[s + 1] <= pos) ++s;
    const int64_t byte = pointers_[s] + (pos - token_offsets_[s]) * item;
    int64_t take = std::min(count, token_offsets_[s + 1] - pos);
    // Sequences stored back to back (as every writer stores them) are one read.
    while (take < count && s + 1 < n && pointers_[s + 1] == pointers_[s] + lengths_[s] * item) {
      ++s;
      take += std::min<int64_t>(count - take, lengths_[s]);
    }
    RETURN_IF_ERROR(ReadExact(bin_fd_, bin_path_, bin_size_, byte, static_cast<size_t>(take * item), raw));
    raw += take * item;
    pos += take;
    count -= take;
  }
  return absl::OkStatus();
}

absl::Status IndexedDataset::ReadSequence(int64_t i, std::vector<int64_t>* out) const {
  if (i < 0 || i >= num_sequences()) {
    return absl::OutOfRangeError(
        absl::StrCat(Describe(), ": sequence ", i, " outside [0, ", num_sequences(), ")"));
  }
  RETURN_IF_ERROR(CheckBinSize());
  const int64_t item = static_cast<int64_t>(item_size_);
  std::vector<uint8_t> raw(static_cast<size_t>(lengths_[i] * item));
  RETURN_IF_ERROR(ReadRaw(token_offsets_[i], lengths_[i], raw.data()));
  out->resize(lengths_[i]);
  for (int64_t j = 0; j < lengths_[i]; ++j) {
    if (!Decode(raw.data() + j * item, &(*out)[j])) {
      return absl::DataLossError(absl::StrCat(BinPath(prefix_), ": token at byte ", pointers_[i] + j * item,
                                              " (sequence ", i, ") is not an integral ",
                                              MegatronDTypeName(dtype_), " value"));
    }
  }
  return absl::OkStatus();
}

absl::Status IndexedDataset::CheckBinSize() const {
  struct stat st;
  if (fstat(bin_fd_, &st) != 0) {
    return absl::DataLossError(absl::StrCat(BinPath(prefix_), ": fstat failed: ", ErrnoText()));
  }
  if (st.st_size < bin_size_) return ShrankError(BinPath(prefix_), bin_size_, bin_fd_);
  return absl::OkStatus();
}

absl::Status IndexedDataset::Read(int64_t begin, int64_t count, int32_t* out) const {
  if (begin < 0 || count < 0 || begin > num_tokens() - count) {
    return absl::OutOfRangeError(absl::StrCat(Describe(), ": token range [", begin, ", ", begin + count,
                                              ") outside the stream of ", num_tokens(), " tokens"));
  }
  if (count == 0) return absl::OkStatus();
  // The size check makes every read after the .bin shrank fail the same way,
  // also one whose bytes are still there (one fstat per read, see moe-bench
  // data); ReadRaw's bounded reads make the rest safe.
  RETURN_IF_ERROR(CheckBinSize());
  const int64_t item = static_cast<int64_t>(item_size_);
  // Through a buffer on the stack, 16 KiB at a time: no allocation per read.
  alignas(8) uint8_t raw[16384];
  const int64_t chunk = static_cast<int64_t>(sizeof(raw)) / item;
  for (int64_t done = 0; done < count; done += chunk) {
    const int64_t n = std::min(chunk, count - done);
    RETURN_IF_ERROR(ReadRaw(begin + done, n, raw));
    int32_t* dst = out + done;
    if (dtype_ == MegatronDType::kUint16) {  // the common case, kept tight
      for (int64_t j = 0; j < n; ++j) dst[j] = LoadAt<uint16_t>(raw + 2 * j);
      continue;
    }
    for (int64_t j = 0; j < n; ++j) {
      int64_t v;
      const int64_t pos = begin + done + j;
      if (!Decode(raw + j * item, &v) || v < 0 || v > std::numeric_limits<int32_t>::max()) {
        return absl::DataLossError(absl::StrCat(
            BinPath(prefix_), ": token at stream offset ", pos, " (sequence ", SequenceOf(pos),
            ", .bin byte ", ByteOf(pos), ") is not a token id in [0, 2^31); run Validate(vocab_size) first"));
      }
      dst[j] = static_cast<int32_t>(v);
    }
  }
  return absl::OkStatus();
}

absl::Status IndexedDataset::Validate(int64_t vocab_size) const {
  const int64_t item = static_cast<int64_t>(item_size_);
  constexpr int64_t kChunkTokens = int64_t{1} << 20;
  std::vector<uint8_t> raw(static_cast<size_t>(std::min(num_tokens(), kChunkTokens) * item));
  for (int64_t begin = 0; begin < num_tokens(); begin += kChunkTokens) {
    const int64_t count = std::min(kChunkTokens, num_tokens() - begin);
    RETURN_IF_ERROR(ReadRaw(begin, count, raw.data()));
    for (int64_t j = 0; j < count; ++j) {
      int64_t v = 0;
      const bool integral = Decode(raw.data() + j * item, &v);
      if (!integral || v < 0 || v >= vocab_size) {
        const int64_t pos = begin + j;
        return absl::InvalidArgumentError(absl::StrCat(
            BinPath(prefix_), ": token ", integral ? absl::StrCat(v) : std::string("(not an integer)"),
            " at token offset ", pos, " (sequence ", SequenceOf(pos), ", byte ", ByteOf(pos),
            ") is outside [0, model.vocab_size = ", vocab_size,
            "); set model.vocab_size to the tokenizer's vocabulary (257 for moe-preprocess's "
            "byte tokenizer) or re-preprocess the data with the model's tokenizer"));
      }
    }
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// IndexedDatasetWriter

MegatronDType IndexedDatasetWriter::DTypeForVocab(int64_t vocab_size) {
  return vocab_size <= 65535 ? MegatronDType::kUint16 : MegatronDType::kInt32;
}

absl::StatusOr<std::unique_ptr<IndexedDatasetWriter>> IndexedDatasetWriter::Create(const std::string& path,
                                                                                   int64_t vocab_size) {
  if (vocab_size <= 0 || vocab_size > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat("vocab_size = ", vocab_size, " must be in [1, 2^31 - 1]"));
  }
  std::unique_ptr<IndexedDatasetWriter> w(new IndexedDatasetWriter());
  w->prefix_ = IndexedDatasetPrefix(path);
  w->vocab_size_ = vocab_size;
  w->dtype_ = DTypeForVocab(vocab_size);
  // Unique per process and writer, so two writers never share temporaries.
  static std::atomic<int64_t> counter{0};
  const std::string suffix = absl::StrCat(".tmp.", static_cast<long>(getpid()), ".", counter++);
  w->bin_tmp_ = BinPath(w->prefix_) + suffix;
  w->idx_tmp_ = IdxPath(w->prefix_) + suffix;
  w->bin_ = std::fopen(w->bin_tmp_.c_str(), "wb");
  if (w->bin_ == nullptr) {
    return absl::PermissionDeniedError(absl::StrCat(w->bin_tmp_, ": cannot create: ", ErrnoText(),
                                                    "; check that the output folder exists and is writable"));
  }
  return w;
}

IndexedDatasetWriter::~IndexedDatasetWriter() {
  if (!finished_) RemoveTemporaries();
}

void IndexedDatasetWriter::RemoveTemporaries() {
  if (bin_ != nullptr) std::fclose(bin_);
  bin_ = nullptr;
  std::remove(bin_tmp_.c_str());
  std::remove(idx_tmp_.c_str());
}

absl::Status IndexedDatasetWriter::AddSequence(const int32_t* tokens, int64_t count) {
  if (finished_ || bin_ == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(prefix_, ": AddSequence after Finish()"));
  }
  if (count > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat(prefix_, ": a sequence of ", count,
                                                   " tokens exceeds the format's int32 length; split it"));
  }
  const size_t item = MegatronDTypeSize(dtype_);
  buffer_.resize(static_cast<size_t>(count) * item);
  for (int64_t j = 0; j < count; ++j) {
    const int32_t t = tokens[j];
    if (t < 0 || t >= vocab_size_) {
      return absl::InvalidArgumentError(absl::StrCat(prefix_, ": token ", t, " at position ", j,
                                                     " of sequence ", lengths_.size(),
                                                     " is outside [0, vocab_size = ", vocab_size_, ")"));
    }
    if (item == 2) {
      const uint16_t v = static_cast<uint16_t>(t);
      std::memcpy(buffer_.data() + 2 * j, &v, 2);
    } else {
      std::memcpy(buffer_.data() + 4 * j, &t, 4);
    }
  }
  if (count > 0 && std::fwrite(buffer_.data(), 1, buffer_.size(), bin_) != buffer_.size()) {
    return absl::DataLossError(absl::StrCat(bin_tmp_, ": write failed: ", ErrnoText()));
  }
  lengths_.push_back(static_cast<int32_t>(count));
  num_tokens_ += count;
  return absl::OkStatus();
}

void IndexedDatasetWriter::EndDocument() {
  document_indices_.push_back(static_cast<int64_t>(lengths_.size()));
}

absl::Status IndexedDatasetWriter::AddDocument(const int32_t* tokens, int64_t count) {
  RETURN_IF_ERROR(AddSequence(tokens, count));
  EndDocument();
  return absl::OkStatus();
}

absl::Status IndexedDatasetWriter::Finish() {
  if (finished_ || bin_ == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(prefix_, ": Finish() called twice"));
  }
  if (document_indices_.back() != static_cast<int64_t>(lengths_.size())) EndDocument();
  const bool bin_ok = std::fflush(bin_) == 0 && fsync(fileno(bin_)) == 0;
  const bool bin_closed = std::fclose(bin_) == 0;
  bin_ = nullptr;
  if (!bin_ok || !bin_closed) {
    RemoveTemporaries();
    return absl::DataLossError(absl::StrCat(bin_tmp_, ": write failed: ", ErrnoText()));
  }

  std::vector<uint8_t> idx(kIndexHeaderBytes);
  std::memcpy(idx.data(), kIndexMagic, 9);
  const uint64_t version = 1;
  std::memcpy(idx.data() + 9, &version, 8);
  idx[17] = static_cast<uint8_t>(dtype_);
  const uint64_t n = lengths_.size();
  const uint64_t d = document_indices_.size();
  std::memcpy(idx.data() + 18, &n, 8);
  std::memcpy(idx.data() + 26, &d, 8);
  idx.resize(kIndexHeaderBytes + 12 * n + 8 * d);
  uint8_t* p = idx.data() + kIndexHeaderBytes;
  if (n > 0) std::memcpy(p, lengths_.data(), 4 * n);
  const int64_t item = static_cast<int64_t>(MegatronDTypeSize(dtype_));
  int64_t ptr = 0;
  for (uint64_t i = 0; i < n; ++i) {
    std::memcpy(p + 4 * n + 8 * i, &ptr, 8);
    ptr += lengths_[i] * item;
  }
  std::memcpy(p + 12 * n, document_indices_.data(), 8 * d);

  std::FILE* f = std::fopen(idx_tmp_.c_str(), "wb");
  if (f == nullptr) {
    RemoveTemporaries();
    return absl::PermissionDeniedError(absl::StrCat(idx_tmp_, ": cannot create: ", ErrnoText()));
  }
  const bool idx_ok =
      std::fwrite(idx.data(), 1, idx.size(), f) == idx.size() && std::fflush(f) == 0 && fsync(fileno(f)) == 0;
  const bool idx_closed = std::fclose(f) == 0;
  if (!idx_ok || !idx_closed) {
    RemoveTemporaries();
    return absl::DataLossError(absl::StrCat(idx_tmp_, ": write failed: ", ErrnoText()));
  }
  // The .bin first: a reader that sees the new .idx always finds its .bin.
  if (std::rename(bin_tmp_.c_str(), BinPath(prefix_).c_str()) != 0 ||
      std::rename(idx_tmp_.c_str(), IdxPath(prefix_).c_str()) != 0) {
    std::string e = ErrnoText();
    RemoveTemporaries();
    return absl::DataLossError(absl::StrCat(prefix_, ".{bin,idx}: rename from temporary files failed: ", e));
  }
  finished_ = true;
  return absl::OkStatus();
}

}  // namespace moe::data
