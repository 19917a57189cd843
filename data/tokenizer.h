// The byte-level tokenizer of moe-preprocess: token t < 256 is the byte t of the
// UTF-8 text, token 256 ends a document. Vocabulary 257 (model.vocab_size's
// default). Lossless: Decode(Encode(s)) == s for every byte string.
#ifndef MOE_DATA_TOKENIZER_H_
#define MOE_DATA_TOKENIZER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace moe::data {

class ByteTokenizer {
 public:
  static constexpr int32_t kEndOfDocument = 256;
  static constexpr int32_t kVocabSize = 257;

  // Appends the tokens of `text` (one per byte) to *out.
  static void Encode(absl::string_view text, std::vector<int32_t>* out);
  static std::vector<int32_t> Encode(absl::string_view text);

  // Bytes back; the end-of-document token prints as `eod_marker`, and an id
  // outside the vocabulary as "<?id>" (for printing model samples).
  static std::string Decode(const int32_t* tokens, int64_t count, absl::string_view eod_marker = "<|eod|>");
  static std::string Decode(const std::vector<int32_t>& tokens, absl::string_view eod_marker = "<|eod|>");
};

}  // namespace moe::data

#endif  // MOE_DATA_TOKENIZER_H_
