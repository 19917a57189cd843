// The metrics stream: one JSON object per line in <run_dir>/metrics.jsonl,
// written by rank 0. Each step's line carries at least step, loss, ce, aux, z,
// lr, grad_norm, tokens_per_s, step_time_s, mem_peak_bytes, the max/mean expert
// load, and per-MoE-layer expert token counts.
#ifndef MOE_RUNTIME_METRICS_H_
#define MOE_RUNTIME_METRICS_H_

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moe {

// Builds one JSON object, fields in insertion order.
class JsonLine {
 public:
  JsonLine& Add(absl::string_view key, double value);
  JsonLine& Add(absl::string_view key, int64_t value);
  JsonLine& Add(absl::string_view key, int value) { return Add(key, static_cast<int64_t>(value)); }
  JsonLine& Add(absl::string_view key, bool value);
  JsonLine& Add(absl::string_view key, absl::string_view value);
  JsonLine& Add(absl::string_view key, const char* value) { return Add(key, absl::string_view(value)); }
  JsonLine& Add(absl::string_view key, const std::vector<int64_t>& values);
  JsonLine& Add(absl::string_view key, const std::vector<double>& values);
  // `json` is already valid JSON (a nested object or array).
  JsonLine& AddRaw(absl::string_view key, absl::string_view json);
  std::string str() const { return body_ + "}"; }

 private:
  void Key(absl::string_view key);
  std::string body_ = "{";
};

class MetricsWriter {
 public:
  // Opens <path> for appending (a resumed run continues the same file) or
  // truncating (a fresh run).
  static absl::StatusOr<MetricsWriter> Open(const std::string& path, bool append);
  MetricsWriter(MetricsWriter&& other) noexcept;
  MetricsWriter& operator=(MetricsWriter&& other) noexcept;
  MetricsWriter(const MetricsWriter&) = delete;
  ~MetricsWriter();
  // Writes and flushes one line.
  absl::Status Write(const JsonLine& line);

 private:
  explicit MetricsWriter(std::FILE* file, std::string path) : file_(file), path_(std::move(path)) {}
  std::FILE* file_ = nullptr;
  std::string path_;
};

}  // namespace moe

#endif  // MOE_RUNTIME_METRICS_H_
