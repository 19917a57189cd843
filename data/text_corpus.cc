#include "data/text_corpus.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <system_error>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "data/json_text.h"
#include "data/tokenizer.h"

namespace moe::data {
namespace fs = std::filesystem;

absl::StatusOr<SplitMode> ParseSplitMode(absl::string_view name) {
  if (name == "file") return SplitMode::kFile;
  if (name == "line") return SplitMode::kLine;
  if (name == "blank") return SplitMode::kBlank;
  if (name == "percent") return SplitMode::kPercent;
  return absl::InvalidArgumentError(
      absl::StrCat("--split=", name, " is not a split mode; use file, line, blank or percent"));
}

absl::StatusOr<InputFormat> ParseInputFormat(absl::string_view name) {
  if (name == "auto") return InputFormat::kAuto;
  if (name == "text") return InputFormat::kText;
  if (name == "jsonl") return InputFormat::kJsonl;
  return absl::InvalidArgumentError(
      absl::StrCat("--format=", name, " is not a format; use auto, text or jsonl"));
}

namespace {

bool IsBlank(absl::string_view s) {
  return std::all_of(s.begin(), s.end(),
                     [](char c) { return absl::ascii_isspace(static_cast<unsigned char>(c)); });
}

// Calls f(line_with_newline, line_without_newline_or_cr) for every line.
template <typename F>
void ForEachLine(absl::string_view text, F f) {
  size_t pos = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    const size_t end = nl == absl::string_view::npos ? text.size() : nl + 1;
    absl::string_view full = text.substr(pos, end - pos);
    absl::string_view bare = full;
    if (absl::EndsWith(bare, "\n")) bare.remove_suffix(1);
    if (absl::EndsWith(bare, "\r")) bare.remove_suffix(1);
    f(full, bare);
    pos = end;
  }
}

}  // namespace

std::vector<absl::string_view> SplitDocuments(absl::string_view text, SplitMode mode) {
  std::vector<absl::string_view> docs;
  auto add = [&](absl::string_view d) {
    if (!IsBlank(d)) docs.push_back(d);
  };
  if (mode == SplitMode::kFile) {
    add(text);
    return docs;
  }
  if (mode == SplitMode::kLine) {
    ForEachLine(text, [&](absl::string_view, absl::string_view bare) { add(bare); });
    return docs;
  }
  // kBlank / kPercent: a document runs from its first line to the line before
  // the next separator.
  const char* doc_begin = text.data();
  const char* doc_end = text.data();
  ForEachLine(text, [&](absl::string_view full, absl::string_view bare) {
    const bool separator = mode == SplitMode::kBlank ? IsBlank(bare) : bare == "%";
    if (separator) {
      add(absl::string_view(doc_begin, static_cast<size_t>(doc_end - doc_begin)));
      doc_begin = full.data() + full.size();
    }
    doc_end = full.data() + full.size();
  });
  add(absl::string_view(doc_begin, static_cast<size_t>(doc_end - doc_begin)));
  return docs;
}

absl::StatusOr<TokenizedFile> TokenizeFile(const std::string& path, const TokenizeOptions& options) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open for reading"));
  const std::streamoff size = in.tellg();
  in.seekg(0);
  std::string text(static_cast<size_t>(std::max<std::streamoff>(size, 0)), '\0');
  if (size > 0 && !in.read(text.data(), size)) {
    return absl::DataLossError(absl::StrCat(path, ": read failed"));
  }

  TokenizedFile out;
  out.bytes_read = static_cast<int64_t>(text.size());
  out.tokens.reserve(text.size() + text.size() / 64);
  absl::Status error;
  auto add_doc = [&](absl::string_view doc) {
    const size_t before = out.tokens.size();
    if (options.spm != nullptr) {
      absl::Status s = options.spm->Encode(doc, &out.tokens);
      if (!s.ok() && error.ok()) error = absl::Status(s.code(), absl::StrCat(path, ": ", s.message()));
      if (options.append_eod) out.tokens.push_back(options.spm->eod_id());
    } else {
      ByteTokenizer::Encode(doc, &out.tokens);
      if (options.append_eod) out.tokens.push_back(ByteTokenizer::kEndOfDocument);
    }
    out.document_lengths.push_back(static_cast<int64_t>(out.tokens.size() - before));
  };

  bool jsonl = options.format == InputFormat::kJsonl;
  if (options.format == InputFormat::kAuto) {
    jsonl = absl::EndsWith(path, ".jsonl") || absl::EndsWith(path, ".json");
  }
  absl::string_view view(text);
  if (absl::StartsWith(view, "\xEF\xBB\xBF")) view.remove_prefix(3);  // UTF-8 byte order mark
  if (!jsonl) {
    for (absl::string_view doc : SplitDocuments(view, options.split)) add_doc(doc);
    if (!error.ok()) return error;
    return out;
  }
  int64_t line_no = 0;
  ForEachLine(view, [&](absl::string_view, absl::string_view bare) {
    ++line_no;
    if (!error.ok() || IsBlank(bare)) return;
    absl::StatusOr<std::string> doc = ExtractJsonStringField(bare, options.json_key);
    if (!doc.ok()) {
      error = absl::InvalidArgumentError(absl::StrCat(path, ":", line_no, ": ", doc.status().message(),
                                                      " (JSON lines: one object per line with a string \"",
                                                      options.json_key, "\" field; see --json-key)"));
      return;
    }
    if (!doc->empty()) add_doc(*doc);
  });
  if (!error.ok()) return error;
  return out;
}

namespace {

bool LooksBinary(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  char buf[8192];
  in.read(buf, sizeof(buf));
  return std::find(buf, buf + in.gcount(), '\0') != buf + in.gcount();
}

}  // namespace

absl::StatusOr<std::vector<std::string>> ListInputFiles(const std::vector<std::string>& paths,
                                                        std::vector<std::string>* skipped) {
  std::vector<std::string> files;
  std::set<fs::path> seen;  // canonical paths already listed
  auto canonical = [](const fs::path& p) {
    std::error_code ec;
    fs::path c = fs::canonical(p, ec);
    return ec ? p : c;
  };
  for (const std::string& arg : paths) {
    std::error_code ec;
    const fs::file_status st = fs::status(arg, ec);
    if (ec || !fs::exists(st)) {
      return absl::NotFoundError(absl::StrCat(arg, ": no such file or directory"));
    }
    if (!fs::is_directory(st)) {
      if (seen.insert(canonical(arg)).second) {
        files.push_back(arg);
      } else {
        skipped->push_back(absl::StrCat(arg, " (named twice)"));
      }
      continue;
    }
    std::vector<fs::path> regular;
    std::vector<fs::path> links;
    for (auto it = fs::recursive_directory_iterator(arg, fs::directory_options::skip_permission_denied, ec);
         !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
      const fs::path& p = it->path();
      const std::string name = p.filename().string();
      if (absl::StartsWith(name, ".")) {
        if (it->is_directory()) it.disable_recursion_pending();
        continue;
      }
      const fs::file_status ls = it->symlink_status();
      if (fs::is_symlink(ls)) {
        if (fs::is_regular_file(it->status())) links.push_back(p);
      } else if (fs::is_regular_file(ls)) {
        regular.push_back(p);
      }
    }
    if (ec) return absl::PermissionDeniedError(absl::StrCat(arg, ": cannot list: ", ec.message()));
    std::sort(regular.begin(), regular.end());
    std::sort(links.begin(), links.end());
    std::vector<fs::path> chosen;
    for (const fs::path& p : regular) {
      if (p.extension() == ".dat") {
        skipped->push_back(absl::StrCat(p.string(), " (*.dat: fortune index)"));
      } else if (LooksBinary(p)) {
        skipped->push_back(absl::StrCat(p.string(), " (binary: NUL bytes)"));
      } else if (seen.insert(canonical(p)).second) {
        chosen.push_back(p);
      }
    }
    for (const fs::path& p : links) {
      if (p.extension() == ".dat" || LooksBinary(p)) {
        skipped->push_back(absl::StrCat(p.string(), " (link to a binary file)"));
      } else if (seen.insert(canonical(p)).second) {
        chosen.push_back(p);
      } else {
        skipped->push_back(absl::StrCat(p.string(), " (symlink to a file already read)"));
      }
    }
    std::sort(chosen.begin(), chosen.end());
    for (const fs::path& p : chosen) files.push_back(p.string());
  }
  if (files.empty()) {
    return absl::InvalidArgumentError("no input files left to read (directories held only skipped files)");
  }
  return files;
}

}  // namespace moe::data
