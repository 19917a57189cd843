// Turning text files into documents of byte tokens (what moe-preprocess runs
// on each input file, in parallel; kept here so it is testable).
#ifndef MOE_DATA_TEXT_CORPUS_H_
#define MOE_DATA_TEXT_CORPUS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "data/spm_tokenizer.h"

namespace moe::data {

// How a plain-text file is cut into documents. Separators are whole lines;
// a document keeps its lines' '\n' (except in kLine), and documents holding
// only whitespace are dropped.
//   kFile     the whole file is one document
//   kLine     every line is a document (without its line break)
//   kBlank    documents are separated by blank (whitespace-only) lines
//   kPercent  documents are separated by lines that are exactly "%": the
//             fortune(6) format of /usr/share/games/fortunes
enum class SplitMode { kFile, kLine, kBlank, kPercent };

// "file" | "line" | "blank" | "percent".
absl::StatusOr<SplitMode> ParseSplitMode(absl::string_view name);

// The documents of `text` (views into it).
std::vector<absl::string_view> SplitDocuments(absl::string_view text, SplitMode mode);

enum class InputFormat { kAuto, kText, kJsonl };
absl::StatusOr<InputFormat> ParseInputFormat(absl::string_view name);  // "auto" | "text" | "jsonl"

struct TokenizeOptions {
  SplitMode split = SplitMode::kFile;
  // kAuto: files ending in .jsonl or .json are JSON lines, all others text.
  InputFormat format = InputFormat::kAuto;
  std::string json_key = "text";  // the field holding each JSON line's document
  bool append_eod = true;         // end every document with the tokenizer's end of document
  // The tokenizer: null = bytes (ByteTokenizer, end of document 256); else a
  // SentencePiece model (its eos_id ends documents). Borrowed; thread-safe.
  const SentencePieceTokenizer* spm = nullptr;
};

// One input file, tokenized: documents back to back in `tokens`, the length of
// each in `document_lengths`.
struct TokenizedFile {
  std::vector<int32_t> tokens;
  std::vector<int64_t> document_lengths;
  int64_t bytes_read = 0;
};

// Reads and tokenizes `path` with the byte tokenizer or options.spm. JSON lines: every non-empty
// line must be an object with a string `json_key`; an error names the file, the
// line and the column.
absl::StatusOr<TokenizedFile> TokenizeFile(const std::string& path, const TokenizeOptions& options);

// Expands the command line's inputs into files, in order: a file stays as given;
// a directory becomes every regular file below it, sorted by path, skipping
// hidden files, *.dat files (fortune's binary indices), files with a NUL byte in
// their first 8 KiB (binary), and symlinks to a file already listed (the .u8
// links of the fortunes package). What was skipped, and why, goes to *skipped.
// Errors: a path that does not exist; nothing left to read.
absl::StatusOr<std::vector<std::string>> ListInputFiles(const std::vector<std::string>& paths,
                                                        std::vector<std::string>* skipped);

}  // namespace moe::data

#endif  // MOE_DATA_TEXT_CORPUS_H_
