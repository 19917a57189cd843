#include "runtime/safetensors.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "runtime/core/json.h"
#include "runtime/core/kernel_math.h"

namespace moe {
namespace {

struct FileCloser {
  void operator()(std::FILE* f) const {
    if (f != nullptr) std::fclose(f);
  }
};
using File = std::unique_ptr<std::FILE, FileCloser>;

absl::Status Bad(const std::string& path, const std::string& what) {
  return absl::DataLossError(absl::StrCat(path, ": ", what));
}

// A JSON number that is a non-negative integer below 2^53 (exact in a double).
bool AsCount(const JsonValue& v, uint64_t* out) {
  if (v.kind != JsonValue::Kind::kNumber) return false;
  if (!(v.number >= 0) || v.number > 9007199254740992.0 || std::floor(v.number) != v.number) return false;
  *out = static_cast<uint64_t>(v.number);
  return true;
}

float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const int exp = (h >> 10) & 0x1f;
  const uint32_t mant = h & 0x3ffu;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(mant), -24);  // subnormal (or zero)
  } else if (exp == 31) {
    v = mant == 0 ? std::numeric_limits<float>::infinity() : std::numeric_limits<float>::quiet_NaN();
  } else {
    v = std::ldexp(static_cast<float>(mant | 0x400u), exp - 25);
  }
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits |= sign;
  std::memcpy(&v, &bits, 4);
  return v;
}

void PutU64(uint64_t v, char* out) {
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

}  // namespace

int SafetensorsDtypeSize(const std::string& dtype) {
  if (dtype == "F64" || dtype == "I64" || dtype == "U64") return 8;
  if (dtype == "F32" || dtype == "I32" || dtype == "U32") return 4;
  if (dtype == "F16" || dtype == "BF16" || dtype == "I16" || dtype == "U16") return 2;
  if (dtype == "I8" || dtype == "U8" || dtype == "BOOL" || dtype == "F8_E4M3" || dtype == "F8_E5M2") return 1;
  return 0;
}

bool IsSafetensorsDtypeSupported(const std::string& dtype) {
  return dtype == "F32" || dtype == "BF16" || dtype == "F16";
}

int64_t SafetensorsEntry::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

const SafetensorsEntry* SafetensorsHeader::Find(const std::string& name) const {
  for (const SafetensorsEntry& e : tensors)
    if (e.name == name) return &e;
  return nullptr;
}

std::string SafetensorsHeader::Metadata(const std::string& key) const {
  for (const auto& [k, v] : metadata)
    if (k == key) return v;
  return "";
}

absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(const std::string& json, uint64_t data_bytes,
                                                         const std::string& path) {
  absl::StatusOr<JsonValue> parsed = ParseJson(json);
  if (!parsed.ok())
    return Bad(path, absl::StrCat("the header is not valid JSON: ", parsed.status().message()));
  if (parsed->kind != JsonValue::Kind::kObject) return Bad(path, "the header is not a JSON object");
  SafetensorsHeader header;
  header.data_start = 8 + json.size();
  std::set<std::string> names;
  for (const auto& [name, v] : parsed->object) {
    if (name == "__metadata__") {
      if (v.kind != JsonValue::Kind::kObject) return Bad(path, "__metadata__ is not an object of strings");
      for (const auto& [k, s] : v.object) {
        if (s.kind != JsonValue::Kind::kString)
          return Bad(path, absl::StrCat("__metadata__ value of \"", k, "\" is not a string"));
        header.metadata.emplace_back(k, s.string);
      }
      continue;
    }
    const std::string where = absl::StrCat("tensor \"", name, "\": ");
    if (!names.insert(name).second) return Bad(path, absl::StrCat(where, "listed twice in the header"));
    if (v.kind != JsonValue::Kind::kObject)
      return Bad(path, absl::StrCat(where, "its entry is not an object"));
    SafetensorsEntry e;
    e.name = name;
    const JsonValue* dtype = v.Find("dtype");
    const JsonValue* shape = v.Find("shape");
    const JsonValue* offsets = v.Find("data_offsets");
    if (dtype == nullptr || dtype->kind != JsonValue::Kind::kString)
      return Bad(path, absl::StrCat(where, "no string \"dtype\""));
    e.dtype = dtype->string;
    if (SafetensorsDtypeSize(e.dtype) == 0)
      return Bad(path, absl::StrCat(where, "unknown dtype \"", e.dtype, "\""));
    if (shape == nullptr || shape->kind != JsonValue::Kind::kArray)
      return Bad(path, absl::StrCat(where, "no \"shape\" array"));
    uint64_t numel = 1;
    for (const JsonValue& d : shape->array) {
      uint64_t n;
      if (!AsCount(d, &n)) return Bad(path, absl::StrCat(where, "shape has a value that is not a count"));
      e.shape.push_back(static_cast<int64_t>(n));
      if (n != 0 && numel > (uint64_t{1} << 50) / n)
        return Bad(path, absl::StrCat(where, "shape has too many elements"));
      numel *= n;
    }
    if (offsets == nullptr || offsets->kind != JsonValue::Kind::kArray || offsets->array.size() != 2 ||
        !AsCount(offsets->array[0], &e.begin) || !AsCount(offsets->array[1], &e.end) || e.end < e.begin) {
      return Bad(path, absl::StrCat(where, "\"data_offsets\" is not [BEGIN, END] with BEGIN <= END"));
    }
    const uint64_t want = numel * static_cast<uint64_t>(SafetensorsDtypeSize(e.dtype));
    if (e.end - e.begin != want) {
      return Bad(path, absl::StrCat(where, "data_offsets [", e.begin, ", ", e.end, ") hold ", e.end - e.begin,
                                    " bytes, its dtype ", e.dtype, " and shape [",
                                    absl::StrJoin(e.shape, ", "), "] need ", want));
    }
    if (e.end > data_bytes) {
      return Bad(path, absl::StrCat(where, "data_offsets [", e.begin, ", ", e.end, ") end past the data (",
                                    data_bytes, " bytes: the file is truncated or the header is wrong)"));
    }
    header.tensors.push_back(std::move(e));
  }
  // No two tensors share bytes.
  std::vector<const SafetensorsEntry*> by_offset;
  for (const SafetensorsEntry& e : header.tensors)
    if (e.end > e.begin) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const SafetensorsEntry* a, const SafetensorsEntry* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    if (by_offset[i]->begin < by_offset[i - 1]->end) {
      return Bad(path, absl::StrCat("tensors \"", by_offset[i - 1]->name, "\" [", by_offset[i - 1]->begin,
                                    ", ", by_offset[i - 1]->end, ") and \"", by_offset[i]->name, "\" [",
                                    by_offset[i]->begin, ", ", by_offset[i]->end, ") overlap"));
    }
  }
  return header;
}

absl::StatusOr<SafetensorsReader> SafetensorsReader::Open(const std::string& path) {
  File f(std::fopen(path.c_str(), "rb"));
  if (f == nullptr) return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  struct stat st;
  if (::fstat(::fileno(f.get()), &st) != 0) return Bad(path, "cannot stat");
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  unsigned char len_bytes[8];
  if (size < 8 || std::fread(len_bytes, 1, 8, f.get()) != 8)
    return Bad(path, absl::StrCat("the file is ", size, " bytes, shorter than the 8-byte header length"));
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len_bytes[i];
  if (n > kMaxSafetensorsHeaderBytes)
    return Bad(path, absl::StrCat("header length ", n, " exceeds the limit of ", kMaxSafetensorsHeaderBytes,
                                  " bytes (not a safetensors file, or a damaged one)"));
  if (n > size - 8)
    return Bad(path, absl::StrCat("header length ", n, " runs past the end of the file (", size, " bytes)"));
  std::string json(n, '\0');
  if (n > 0 && std::fread(json.data(), 1, n, f.get()) != n) return Bad(path, "cannot read the header");
  SafetensorsReader r;
  r.path_ = path;
  absl::StatusOr<SafetensorsHeader> header = ParseSafetensorsHeader(json, size - 8 - n, path);
  if (!header.ok()) return header.status();
  r.header_ = std::move(*header);
  return r;
}

absl::StatusOr<std::vector<float>> SafetensorsReader::ReadF32(const SafetensorsEntry& e) const {
  if (!IsSafetensorsDtypeSupported(e.dtype)) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor \"", e.name, "\" has dtype ", e.dtype,
                                                   "; import reads F32, BF16 and F16"));
  }
  File f(std::fopen(path_.c_str(), "rb"));
  if (f == nullptr) return absl::NotFoundError(absl::StrCat(path_, ": cannot open: ", std::strerror(errno)));
  std::string raw(e.end - e.begin, '\0');
  if (::fseeko(f.get(), static_cast<off_t>(header_.data_start + e.begin), SEEK_SET) != 0 ||
      (!raw.empty() && std::fread(raw.data(), 1, raw.size(), f.get()) != raw.size())) {
    return Bad(path_, absl::StrCat("tensor \"", e.name, "\": cannot read its ", raw.size(), " bytes"));
  }
  const int64_t n = e.numel();
  std::vector<float> out(static_cast<size_t>(n));
  const auto* p = reinterpret_cast<const unsigned char*>(raw.data());
  for (int64_t i = 0; i < n; ++i) {
    if (e.dtype == "F32") {
      uint32_t b = uint32_t{p[4 * i]} | uint32_t{p[4 * i + 1]} << 8 | uint32_t{p[4 * i + 2]} << 16 |
                   uint32_t{p[4 * i + 3]} << 24;
      std::memcpy(&out[i], &b, 4);
    } else {
      const uint16_t h = static_cast<uint16_t>(p[2 * i] | p[2 * i + 1] << 8);
      out[i] = e.dtype == "BF16" ? kmath::BF16ToF32(h) : HalfToFloat(h);
    }
  }
  return out;
}

uint64_t SafetensorsDataBytes(const SafetensorsTensorOut& t) {
  uint64_t n = 1;
  for (int64_t d : t.shape) n *= static_cast<uint64_t>(d);
  return n * static_cast<uint64_t>(SafetensorsDtypeSize(t.dtype));
}

absl::Status WriteSafetensors(const std::string& path, absl::Span<const SafetensorsTensorOut> tensors,
                              const std::vector<std::pair<std::string, std::string>>& metadata) {
  std::string json = "{";
  if (!metadata.empty()) {
    json += "\"__metadata__\":{";
    for (size_t i = 0; i < metadata.size(); ++i) {
      absl::StrAppend(&json, i ? "," : "", "\"", JsonEscape(metadata[i].first), "\":\"",
                      JsonEscape(metadata[i].second), "\"");
    }
    json += "}";
  }
  uint64_t offset = 0;
  std::set<std::string> names;
  for (const SafetensorsTensorOut& t : tensors) {
    if (t.dtype != "F32" && t.dtype != "BF16")
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor ", t.name, ": cannot write dtype ", t.dtype));
    if (!names.insert(t.name).second)
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor ", t.name, " given twice"));
    const uint64_t bytes = SafetensorsDataBytes(t);
    absl::StrAppend(&json, json.size() > 1 ? "," : "", "\"", JsonEscape(t.name), "\":{\"dtype\":\"", t.dtype,
                    "\",\"shape\":[", absl::StrJoin(t.shape, ","), "],\"data_offsets\":[", offset, ",",
                    offset + bytes, "]}");
    offset += bytes;
  }
  json += "}";
  // Pad with spaces so the data starts 8-byte aligned (as Hugging Face's writer does).
  while ((8 + json.size()) % 8 != 0) json += ' ';
  File f(std::fopen(path.c_str(), "wb"));
  if (f == nullptr)
    return absl::UnavailableError(absl::StrCat(path, ": cannot create: ", std::strerror(errno)));
  char len[8];
  PutU64(json.size(), len);
  bool ok = std::fwrite(len, 1, 8, f.get()) == 8 &&
            std::fwrite(json.data(), 1, json.size(), f.get()) == json.size();
  std::vector<unsigned char> buf;
  for (const SafetensorsTensorOut& t : tensors) {
    if (!ok) break;
    const int64_t n = static_cast<int64_t>(SafetensorsDataBytes(t) / SafetensorsDtypeSize(t.dtype));
    buf.resize(static_cast<size_t>(SafetensorsDataBytes(t)));
    for (int64_t i = 0; i < n; ++i) {
      if (t.dtype == "F32") {
        uint32_t b;
        std::memcpy(&b, &t.data[i], 4);
        for (int k = 0; k < 4; ++k) buf[4 * i + k] = static_cast<unsigned char>(b >> (8 * k));
      } else {
        const uint16_t h = kmath::F32ToBF16(t.data[i]);
        buf[2 * i] = static_cast<unsigned char>(h & 0xff);
        buf[2 * i + 1] = static_cast<unsigned char>(h >> 8);
      }
    }
    ok = buf.empty() || std::fwrite(buf.data(), 1, buf.size(), f.get()) == buf.size();
  }
  if (ok) ok = std::fflush(f.get()) == 0 && ::fsync(::fileno(f.get())) == 0;
  if (!ok) return absl::UnavailableError(absl::StrCat(path, ": write failed: ", std::strerror(errno)));
  return absl::OkStatus();
}

}  // namespace moe
