// libFuzzer: the JSON-lines text reader of moe-preprocess (one object per
// line, the document in "text"). Input: one line.
#include <string>

#include "data/json_text.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view line(reinterpret_cast<const char*>(data), size);
  (void)moe::data::ExtractJsonStringField(line, "text");
  return 0;
}
