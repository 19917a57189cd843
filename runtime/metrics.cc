#include "runtime/metrics.h"

#include <cerrno>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "runtime/core/json.h"

namespace moe {
namespace {
std::string Number(double v) {
  if (!std::isfinite(v)) return std::isnan(v) ? "\"nan\"" : (v > 0 ? "\"inf\"" : "\"-inf\"");
  return absl::StrFormat("%.9g", v);
}
}  // namespace

void JsonLine::Key(absl::string_view key) {
  if (body_.size() > 1) body_.push_back(',');
  absl::StrAppend(&body_, "\"", JsonEscape(key), "\":");
}
JsonLine& JsonLine::Add(absl::string_view key, double value) {
  Key(key);
  body_ += Number(value);
  return *this;
}
JsonLine& JsonLine::Add(absl::string_view key, int64_t value) {
  Key(key);
  absl::StrAppend(&body_, value);
  return *this;
}
JsonLine& JsonLine::Add(absl::string_view key, bool value) {
  Key(key);
  body_ += value ? "true" : "false";
  return *this;
}
JsonLine& JsonLine::Add(absl::string_view key, absl::string_view value) {
  Key(key);
  absl::StrAppend(&body_, "\"", JsonEscape(value), "\"");
  return *this;
}
JsonLine& JsonLine::Add(absl::string_view key, const std::vector<int64_t>& values) {
  Key(key);
  absl::StrAppend(&body_, "[", absl::StrJoin(values, ","), "]");
  return *this;
}
JsonLine& JsonLine::Add(absl::string_view key, const std::vector<double>& values) {
  Key(key);
  body_ += "[";
  for (size_t i = 0; i < values.size(); ++i) absl::StrAppend(&body_, i ? "," : "", Number(values[i]));
  body_ += "]";
  return *this;
}
JsonLine& JsonLine::AddRaw(absl::string_view key, absl::string_view json) {
  Key(key);
  absl::StrAppend(&body_, json);
  return *this;
}

absl::StatusOr<MetricsWriter> MetricsWriter::Open(const std::string& path, bool append) {
  std::FILE* f = std::fopen(path.c_str(), append ? "a" : "w");
  if (f == nullptr) {
    return absl::UnavailableError(absl::StrCat("cannot open metrics file '", path,
                                               "': ", std::strerror(errno), "; check train.run_dir"));
  }
  return MetricsWriter(f, path);
}

MetricsWriter::MetricsWriter(MetricsWriter&& other) noexcept
    : file_(other.file_), path_(std::move(other.path_)) {
  other.file_ = nullptr;
}
MetricsWriter& MetricsWriter::operator=(MetricsWriter&& other) noexcept {
  if (this != &other) {
    if (file_) std::fclose(file_);
    file_ = other.file_;
    path_ = std::move(other.path_);
    other.file_ = nullptr;
  }
  return *this;
}
MetricsWriter::~MetricsWriter() {
  if (file_) std::fclose(file_);
}

absl::Status MetricsWriter::Write(const JsonLine& line) {
  std::string text = line.str();
  text.push_back('\n');
  if (std::fwrite(text.data(), 1, text.size(), file_) != text.size() || std::fflush(file_) != 0) {
    return absl::DataLossError(
        absl::StrCat("writing metrics to '", path_, "' failed: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

}  // namespace moe
