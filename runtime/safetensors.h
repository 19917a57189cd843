// The safetensors file format (Hugging Face), read and written here without a
// library:
//
//   8 bytes    N, the header's length, little-endian u64
//   N bytes    a JSON object (UTF-8): one member per tensor,
//                "name": {"dtype": "F32", "shape": [4, 8], "data_offsets": [BEGIN, END]}
//              and optionally "__metadata__": {"key": "string value", ...}
//   the rest   the tensors' bytes, little-endian, row-major; a tensor's bytes
//              are [8 + N + BEGIN, 8 + N + END) of the file
//
// The reader treats every file as hostile: the header length is bounded (by
// kMaxSafetensorsHeaderBytes and the file's size), the header must be a JSON
// object of well-formed entries, every dtype known, END - BEGIN equal to the
// shape's element count times the dtype's size, every range inside the data
// and no two ranges overlapping. Errors (DataLoss) name the file and the
// tensor.
#ifndef MOE_RUNTIME_SAFETENSORS_H_
#define MOE_RUNTIME_SAFETENSORS_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace moe {

// The largest header the reader accepts (Hugging Face's own limit).
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100u << 20;

// The dtypes the reader converts to f32 ("F32", "BF16", "F16"); the writer
// writes F32 and BF16 (round to nearest even).
bool IsSafetensorsDtypeSupported(const std::string& dtype);
// Bytes per element of a dtype of the format (0 for an unknown one).
int SafetensorsDtypeSize(const std::string& dtype);

struct SafetensorsEntry {
  std::string name;
  std::string dtype;            // "F32", "BF16", ...
  std::vector<int64_t> shape;   // may be empty (a scalar)
  uint64_t begin = 0, end = 0;  // data_offsets, relative to the data section
  int64_t numel() const;
};

struct SafetensorsHeader {
  std::vector<SafetensorsEntry> tensors;                      // in header order
  std::vector<std::pair<std::string, std::string>> metadata;  // "__metadata__"
  uint64_t data_start = 0;                                    // 8 + N
  const SafetensorsEntry* Find(const std::string& name) const;
  std::string Metadata(const std::string& key) const;  // "" when absent
};

// Parses and checks a header: `json` is its N bytes, `data_bytes` the size of
// the data section (file size - 8 - N). `path` names the file in errors.
absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(const std::string& json, uint64_t data_bytes,
                                                         const std::string& path);

// An open safetensors file: the header checked at Open, tensors read on demand.
class SafetensorsReader {
 public:
  static absl::StatusOr<SafetensorsReader> Open(const std::string& path);
  const SafetensorsHeader& header() const { return header_; }
  const std::string& path() const { return path_; }
  // The tensor's values converted to f32 (F32, BF16, F16; bit-exact widening).
  absl::StatusOr<std::vector<float>> ReadF32(const SafetensorsEntry& entry) const;

 private:
  std::string path_;
  SafetensorsHeader header_;
};

// One tensor to write: `data` holds numel(shape) f32 values, stored as
// `dtype` ("F32" or "BF16"; BF16 rounds to nearest even).
struct SafetensorsTensorOut {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  const float* data = nullptr;
};

// The bytes the tensors take in a file (header excluded).
uint64_t SafetensorsDataBytes(const SafetensorsTensorOut& t);

// Writes `path` (created or truncated; the caller makes the whole output
// appear atomically): the header with the tensors in the given order and
// `metadata`, then their data. Names must be unique.
absl::Status WriteSafetensors(const std::string& path, absl::Span<const SafetensorsTensorOut> tensors,
                              const std::vector<std::pair<std::string, std::string>>& metadata);

}  // namespace moe

#endif  // MOE_RUNTIME_SAFETENSORS_H_
