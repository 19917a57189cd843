// A small JSON reader for tool inputs (count tables, metrics lines). Numbers
// are kept as double; objects keep their keys in order.
#ifndef MOE_RUNTIME_CORE_JSON_H_
#define MOE_RUNTIME_CORE_JSON_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moe {

struct JsonValue {
  enum class Kind { kNull, kBool, kNumber, kString, kArray, kObject };
  Kind kind = Kind::kNull;
  bool boolean = false;
  double number = 0;
  std::string string;
  std::vector<JsonValue> array;
  std::vector<std::pair<std::string, JsonValue>> object;

  // Defined in json.cc, where JsonValue is complete: clang with libstdc++
  // refuses to instantiate the vectors' members on the incomplete type here.
  JsonValue();
  JsonValue(const JsonValue&);
  JsonValue(JsonValue&&) noexcept;
  JsonValue& operator=(const JsonValue&);
  JsonValue& operator=(JsonValue&&) noexcept;
  ~JsonValue();

  // The member named `key`, or nullptr.
  const JsonValue* Find(absl::string_view key) const;
};

// Parses one JSON document; errors name the byte offset and what was expected.
absl::StatusOr<JsonValue> ParseJson(absl::string_view text);

// Escapes `s` for use inside a JSON string literal.
std::string JsonEscape(absl::string_view s);

}  // namespace moe

#endif  // MOE_RUNTIME_CORE_JSON_H_
