// A small strict JSON reader for JSON-lines corpora: each line is one object,
// and the document is the string value of one top-level key ("text").
// The whole line is checked against RFC 8259 (objects, arrays, strings, numbers,
// true/false/null; no trailing commas, comments, NaN or single quotes); string
// escapes \" \\ \/ \b \f \n \r \t and \uXXXX (surrogate pairs joined) are decoded
// to UTF-8. Nested values are parsed and skipped.
#ifndef MOE_DATA_JSON_TEXT_H_
#define MOE_DATA_JSON_TEXT_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moe::data {

// The decoded string value of top-level key `key` in the JSON object `line`.
// Errors (InvalidArgument) give the byte column (1-based) and what was expected:
// malformed JSON, a top-level value that is not an object, a missing key, a
// value that is not a string, a lone surrogate. A duplicated key: the last wins.
absl::StatusOr<std::string> ExtractJsonStringField(absl::string_view line, absl::string_view key);

}  // namespace moe::data

#endif  // MOE_DATA_JSON_TEXT_H_
