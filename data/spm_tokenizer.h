// SentencePiece tokenizer for moe-preprocess (--tokenizer spm:MODEL.model),
// through Debian's libsentencepiece. The vocabulary size and the
// end-of-document id (the model's </s>, eos_id) come from the model file.
//
//   ASSIGN_OR_RETURN(auto spm, SentencePieceTokenizer::Load("corpus.model"));
//   std::vector<int32_t> ids;
//   RETURN_IF_ERROR(spm->Encode(text, &ids));        // appends; thread-safe
//
// Train a model with spm_train (package sentencepiece); README shows how.
// Lossless round trips need --normalization_rule_name=identity,
// --remove_extra_whitespaces=false and --byte_fallback=true.
#ifndef MOE_DATA_SPM_TOKENIZER_H_
#define MOE_DATA_SPM_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moe::data {

class SpmProcessor;  // data/spm_processor.h

class SentencePieceTokenizer {
 public:
  // Errors: the file cannot be read or is not a SentencePiece model; the model
  // has no end-of-sentence piece (train it with --eos_id >= 0).
  static absl::StatusOr<std::unique_ptr<SentencePieceTokenizer>> Load(const std::string& model_path);
  ~SentencePieceTokenizer();

  absl::Status Encode(absl::string_view text, std::vector<int32_t>* out) const;
  int32_t vocab_size() const { return vocab_size_; }
  int32_t eod_id() const { return eod_id_; }
  const std::string& path() const { return path_; }

 private:
  SentencePieceTokenizer() = default;
  std::unique_ptr<SpmProcessor> processor_;
  std::string path_;
  int32_t vocab_size_ = 0, eod_id_ = -1;
};

// The tokenizer a SentencePiece dataset was made with, written by moe-preprocess
// next to the data as PREFIX.tokenizer ("key value" lines: tokenizer, vocab_size, eod_id) so
// that training checks model.vocab_size against it before any work.
struct TokenizerInfo {
  std::string tokenizer;  // "byte" or "spm:PATH"
  int64_t vocab_size = 0;
  int64_t eod_id = 0;
};
absl::Status WriteTokenizerInfo(const std::string& prefix, const TokenizerInfo& info);
// nullopt-like: returns NotFound when PREFIX.tokenizer does not exist.
absl::StatusOr<TokenizerInfo> ReadTokenizerInfo(const std::string& prefix);
// OK when no PREFIX.tokenizer exists or model_vocab_size >= its vocab_size;
// else an error naming model.vocab_size, both numbers and the fix.
absl::Status CheckVocabAgainstTokenizer(const std::string& prefix, int64_t model_vocab_size);

}  // namespace moe::data

#endif  // MOE_DATA_SPM_TOKENIZER_H_
