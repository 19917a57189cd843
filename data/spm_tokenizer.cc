#include "data/spm_tokenizer.h"

#include <cstdio>
#include <fstream>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "data/spm_processor.h"

namespace moe::data {

absl::StatusOr<std::unique_ptr<SentencePieceTokenizer>> SentencePieceTokenizer::Load(
    const std::string& model_path) {
  std::unique_ptr<SentencePieceTokenizer> t(new SentencePieceTokenizer());
  t->processor_ = std::make_unique<SpmProcessor>();
  std::string error;
  if (!t->processor_->Load(model_path, &error)) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot load the SentencePiece model '", model_path, "': ", error));
  }
  t->path_ = model_path;
  t->vocab_size_ = t->processor_->piece_size();
  t->eod_id_ = t->processor_->eos_id();
  if (t->eod_id_ < 0 || t->eod_id_ >= t->vocab_size_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the SentencePiece model '", model_path, "' has no end-of-sentence piece (eos_id = ", t->eod_id_,
        "); train it with spm_train --eos_id=2 (the default) to end documents"));
  }
  return t;
}

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

absl::Status SentencePieceTokenizer::Encode(absl::string_view text, std::vector<int32_t>* out) const {
  std::vector<int> ids;
  std::string error;
  if (!processor_->Encode(text.data(), text.size(), &ids, &error)) {
    return absl::InternalError(absl::StrCat("SentencePiece (", path_, ") cannot encode: ", error));
  }
  out->insert(out->end(), ids.begin(), ids.end());
  return absl::OkStatus();
}

absl::Status WriteTokenizerInfo(const std::string& prefix, const TokenizerInfo& info) {
  const std::string path = prefix + ".tokenizer", tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << "tokenizer " << info.tokenizer << "\nvocab_size " << info.vocab_size << "\neod_id " << info.eod_id
        << "\n";
    out.close();
    if (!out) return absl::UnavailableError(absl::StrCat("cannot write ", tmp));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return absl::UnavailableError(absl::StrCat("cannot rename ", tmp, " to ", path));
  }
  return absl::OkStatus();
}

absl::StatusOr<TokenizerInfo> ReadTokenizerInfo(const std::string& prefix) {
  const std::string path = prefix + ".tokenizer";
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, " does not exist"));
  TokenizerInfo info;
  std::string line;
  bool vocab = false;
  while (std::getline(in, line)) {
    const size_t sp = line.find(' ');
    if (sp == std::string::npos) continue;
    const std::string key = line.substr(0, sp), value = line.substr(sp + 1);
    if (key == "tokenizer") info.tokenizer = value;
    if (key == "vocab_size") vocab = absl::SimpleAtoi(value, &info.vocab_size);
    if (key == "eod_id" && !absl::SimpleAtoi(value, &info.eod_id)) vocab = false;
  }
  if (!vocab || info.vocab_size <= 0) {
    return absl::DataLossError(absl::StrCat(path, ": no valid 'vocab_size N' line"));
  }
  return info;
}

absl::Status CheckVocabAgainstTokenizer(const std::string& prefix, int64_t model_vocab_size) {
  absl::StatusOr<TokenizerInfo> info = ReadTokenizerInfo(prefix);
  if (absl::IsNotFound(info.status())) return absl::OkStatus();
  if (!info.ok()) return info.status();
  if (model_vocab_size < info->vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model.vocab_size = ", model_vocab_size, " is smaller than the vocabulary of the tokenizer ",
        info->tokenizer, " that made ", prefix, " (", info->vocab_size, " tokens, end of document ",
        info->eod_id, "); set model.vocab_size = ", info->vocab_size));
  }
  return absl::OkStatus();
}

}  // namespace moe::data
