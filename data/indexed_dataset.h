// The Megatron-LM indexed dataset: a PREFIX.bin / PREFIX.idx pair, read and
// written exactly as megatron/core/datasets/indexed_dataset.py does, so data
// preprocessed by Megatron's tools/preprocess_data.py loads unchanged.
//
// PREFIX.bin: the token arrays of every sequence, concatenated, raw little-endian
// values of the dtype below, no header.
//
// PREFIX.idx (all integers little-endian, no padding):
//   offset  0  9 bytes   magic "MMIDIDX\0\0"
//   offset  9  uint64    version = 1
//   offset 17  uint8     dtype code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
//                        6 float64, 7 float32, 8 uint16
//   offset 18  uint64    sequence_count  N
//   offset 26  uint64    document_count  D  (= number of documents + 1: it counts
//                        the entries of document_indices, which start with 0)
//   offset 34  int32[N]  sequence_lengths (tokens)
//              int64[N]  sequence_pointers (byte offset of each sequence in .bin)
//              int64[D]  document_indices: document d is sequences
//                        [document_indices[d], document_indices[d+1])
//              int8[N]   sequence_modes, only in Megatron's multimodal files
//                        (accepted and ignored)
//
// Example: documents "ab" and "c" with an end-of-document token 256, one sequence
// per document, dtype uint16: .bin = 61 00 62 00 00 01 63 00 00 01 (10 bytes);
// N = 2, D = 3, lengths {3, 2}, pointers {0, 6}, document_indices {0, 1, 2}.
#ifndef MOE_DATA_INDEXED_DATASET_H_
#define MOE_DATA_INDEXED_DATASET_H_

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "data/token_source.h"

namespace moe::data {

// Megatron's DType codes (indexed_dataset.py, class DType).
enum class MegatronDType : uint8_t {
  kUint8 = 1,
  kInt8 = 2,
  kInt16 = 3,
  kInt32 = 4,
  kInt64 = 5,
  kFloat64 = 6,
  kFloat32 = 7,
  kUint16 = 8,
};

size_t MegatronDTypeSize(MegatronDType dtype);
const char* MegatronDTypeName(MegatronDType dtype);  // "uint16", ...
// Is `code` one of the eight codes above?
bool IsMegatronDTypeCode(uint8_t code);

inline constexpr char kIndexMagic[] = "MMIDIDX\0\0";  // 9 bytes, sizeof = 10
inline constexpr int64_t kIndexHeaderBytes = 34;

// "corpus" -> "corpus.bin" / "corpus.idx". `prefix` may also name either file
// ("corpus.bin", "corpus.idx"); the extension is dropped first.
std::string IndexedDatasetPrefix(const std::string& path);
std::string BinPath(const std::string& prefix);
std::string IdxPath(const std::string& prefix);

// Read-only view of one .bin/.idx pair. Open() checks the whole index against
// the .bin (magic, version, dtype code, sizes, every pointer and length,
// document indices) so that later reads cannot go out of bounds. Nothing is
// memory-mapped: tokens are read with pread(2) through the page cache (shared
// by the ranks of a node), so a .bin truncated or rewritten in place while a
// job reads it is a DataLoss error naming the file and both sizes, never a
// SIGBUS (a mapped read past a file's new end raises one). A read costs an
// fstat and a pread more than a copy from a mapping: microseconds per sample
// (`moe-bench data` measures both), far below a training step.
// All const methods are safe to call from several threads at once.
class IndexedDataset : public TokenSource {
 public:
  // `prefix` as for IndexedDatasetPrefix(). Errors name the file, the field or
  // byte offset, the value found and the fix.
  static absl::StatusOr<std::unique_ptr<IndexedDataset>> Open(const std::string& prefix);

  ~IndexedDataset() override;
  IndexedDataset(const IndexedDataset&) = delete;
  IndexedDataset& operator=(const IndexedDataset&) = delete;

  MegatronDType dtype() const { return dtype_; }
  int64_t num_sequences() const { return static_cast<int64_t>(lengths_.size()); }
  // Number of documents = document_indices().size() - 1.
  int64_t num_documents() const { return static_cast<int64_t>(document_indices_.size()) - 1; }
  const std::vector<int32_t>& sequence_lengths() const { return lengths_; }
  const std::vector<int64_t>& sequence_pointers() const { return pointers_; }
  const std::vector<int64_t>& document_indices() const { return document_indices_; }
  bool has_sequence_modes() const { return has_modes_; }
  int64_t bin_bytes() const { return bin_size_; }

  // Sequence i's tokens as stored (no range check against a vocabulary; float
  // dtypes must hold integral values).
  absl::Status ReadSequence(int64_t i, std::vector<int64_t>* out) const;

  // TokenSource: the stream is sequence 0, 1, ..., N-1 concatenated.
  int64_t num_tokens() const override { return token_offsets_.back(); }
  absl::Status Read(int64_t begin, int64_t count, int32_t* out) const override;
  absl::Status Validate(int64_t vocab_size) const override;
  std::string Describe() const override;

 private:
  IndexedDataset() = default;
  // The token stored at `p` (item_size_ bytes of dtype_); false when a float
  // dtype holds a non-integral value.
  bool Decode(const uint8_t* p, int64_t* value) const;
  // The (non-empty) sequence holding stream token `pos`, and that token's .bin byte.
  int64_t SequenceOf(int64_t pos) const;
  int64_t ByteOf(int64_t pos) const;
  // The stored bytes of stream tokens [begin, begin + count) into raw[0, count *
  // item_size_), one pread per run of sequences stored back to back. Bounded:
  // a .bin that shrank since Open gives DataLoss naming it, never SIGBUS.
  absl::Status ReadRaw(int64_t begin, int64_t count, uint8_t* raw) const;
  // DataLoss naming the file when the .bin is now shorter than when opened.
  absl::Status CheckBinSize() const;

  std::string prefix_;
  MegatronDType dtype_ = MegatronDType::kUint16;
  size_t item_size_ = 2;
  bool has_modes_ = false;
  std::vector<int32_t> lengths_;
  std::vector<int64_t> pointers_;
  std::vector<int64_t> document_indices_;
  std::vector<int64_t> token_offsets_;  // N + 1 prefix sums of lengths_
  std::string bin_path_;
  int64_t bin_size_ = 0;  // at Open
  int bin_fd_ = -1;       // the open .bin, read with pread
};

// Writes a .bin/.idx pair as Megatron's IndexedDatasetBuilder does, one
// sequence per document unless AddSequence/EndDocument are used directly. The
// files are written under temporary names (PREFIX.bin.tmp.<pid>.<n>, ...) and
// renamed into place by Finish(); a writer destroyed before Finish() removes
// them, so PREFIX.bin/.idx are never half-written. Not thread-safe.
class IndexedDatasetWriter {
 public:
  // uint16 when vocab_size <= 65535, else int32.
  static MegatronDType DTypeForVocab(int64_t vocab_size);

  static absl::StatusOr<std::unique_ptr<IndexedDatasetWriter>> Create(const std::string& prefix,
                                                                      int64_t vocab_size);
  ~IndexedDatasetWriter();
  IndexedDatasetWriter(const IndexedDatasetWriter&) = delete;
  IndexedDatasetWriter& operator=(const IndexedDatasetWriter&) = delete;

  // Appends one sequence; every token must lie in [0, vocab_size).
  absl::Status AddSequence(const int32_t* tokens, int64_t count);
  // Closes the current document (Megatron's end_document()).
  void EndDocument();
  // AddSequence + EndDocument.
  absl::Status AddDocument(const int32_t* tokens, int64_t count);

  // Writes the .idx and renames both files into place.
  absl::Status Finish();

  MegatronDType dtype() const { return dtype_; }
  int64_t num_tokens() const { return num_tokens_; }
  int64_t num_sequences() const { return static_cast<int64_t>(lengths_.size()); }
  int64_t num_documents() const { return static_cast<int64_t>(document_indices_.size()) - 1; }

 private:
  IndexedDatasetWriter() = default;
  void RemoveTemporaries();

  std::string prefix_;
  std::string bin_tmp_;
  std::string idx_tmp_;
  int64_t vocab_size_ = 0;
  MegatronDType dtype_ = MegatronDType::kUint16;
  std::FILE* bin_ = nullptr;
  bool finished_ = false;
  int64_t num_tokens_ = 0;
  std::vector<int32_t> lengths_;
  std::vector<int64_t> document_indices_{0};
  std::vector<uint8_t> buffer_;
};

}  // namespace moe::data

#endif  // MOE_DATA_INDEXED_DATASET_H_
