#include "data/tokenizer.h"

#include "absl/strings/str_cat.h"

namespace moe::data {

void ByteTokenizer::Encode(absl::string_view text, std::vector<int32_t>* out) {
  out->reserve(out->size() + text.size());
  for (char c : text) out->push_back(static_cast<int32_t>(static_cast<unsigned char>(c)));
}

std::vector<int32_t> ByteTokenizer::Encode(absl::string_view text) {
  std::vector<int32_t> out;
  Encode(text, &out);
  return out;
}

std::string ByteTokenizer::Decode(const int32_t* tokens, int64_t count, absl::string_view eod_marker) {
  std::string s;
  s.reserve(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    const int32_t t = tokens[i];
    if (t >= 0 && t < 256) {
      s.push_back(static_cast<char>(static_cast<unsigned char>(t)));
    } else if (t == kEndOfDocument) {
      absl::StrAppend(&s, eod_marker);
    } else {
      absl::StrAppend(&s, "<?", t, ">");
    }
  }
  return s;
}

std::string ByteTokenizer::Decode(const std::vector<int32_t>& tokens, absl::string_view eod_marker) {
  return Decode(tokens.data(), static_cast<int64_t>(tokens.size()), eod_marker);
}

}  // namespace moe::data
