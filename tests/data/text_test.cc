// Byte tokenizer, strict JSON string-field extraction, document splitting and
// input-file listing (what moe-preprocess runs per file).
#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "data/json_text.h"
#include "data/spm_tokenizer.h"
#include "data/text_corpus.h"
#include "data/tokenizer.h"
#include "tests/data/data_test_util.h"

namespace moe::data {
namespace {

using Catch::Contains;
using testing::TempDir;
using testing::WriteBytes;

TEST_CASE("byte tokenizer: one token per byte, 256 ends a document, lossless") {
  std::string all;
  for (int b = 0; b < 256; ++b) all.push_back(static_cast<char>(b));
  std::vector<int32_t> t = ByteTokenizer::Encode(all);
  REQUIRE(t.size() == 256);
  for (int b = 0; b < 256; ++b) CHECK(t[b] == b);
  CHECK(ByteTokenizer::Decode(t) == all);
  CHECK(ByteTokenizer::Encode("h\xC3\xA9") == std::vector<int32_t>{104, 0xC3, 0xA9});
  CHECK(ByteTokenizer::Decode({104, 105, 256, 300, -1}) == "hi<|eod|><?300><?-1>");
  CHECK(ByteTokenizer::Decode({97, 256}, "\n---\n") == "a\n---\n");
  CHECK(ByteTokenizer::kVocabSize == 257);
}

std::string Text(absl::string_view line, absl::string_view key = "text") {
  auto r = ExtractJsonStringField(line, key);
  INFO(line);
  REQUIRE(r.ok());
  return *r;
}

std::string Error(absl::string_view line, absl::string_view key = "text") {
  auto r = ExtractJsonStringField(line, key);
  INFO(line);
  REQUIRE_FALSE(r.ok());
  return std::string(r.status().message());
}

TEST_CASE("JSON lines: the text field, with every escape") {
  CHECK(Text(R"({"text": "hello"})") == "hello");
  CHECK(Text(R"(  {"id": 7, "meta": {"a": [1, 2.5e-3, true, null, {"text": "nested"}]}, "text": "x"}  )") ==
        "x");
  CHECK(Text(R"({"text":"a\"b\\c\/d\be\ff\ng\rh\ti"})") == "a\"b\\c/d\be\ff\ng\rh\ti");
  CHECK(Text(R"({"text": "\u0041\u00e9\u20AC\ud83d\ude00"})") == "A\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80");
  CHECK(Text(R"({"text": "\u0000"})") == std::string(1, '\0'));
  CHECK(Text("{\"text\": \"caf\xC3\xA9\"}") == "caf\xC3\xA9");  // raw UTF-8 passes through
  CHECK(Text(R"({"text": "first", "text": "last"})") == "last");
  CHECK(Text(R"({"body": "b", "text": ""})") == "");
  CHECK(Text(R"({"content": "c"})", "content") == "c");
  CHECK(Text(R"({"a": -0.5E+2, "b": [], "c": {}, "text": "ok"})") == "ok");
}

TEST_CASE("JSON lines: malformed input is an error with its column") {
  CHECK_THAT(Error(R"({"id": 1})"), Contains("no key \"text\""));
  CHECK_THAT(Error(R"({"text": 5})"), Contains("key \"text\" at column 10 holds a number, not a string"));
  CHECK_THAT(Error(R"({"text": ["a"]})"), Contains("holds an array"));
  CHECK_THAT(Error(R"(["text"])"), Contains("must be a JSON object"));
  CHECK_THAT(Error(R"({"text": "a",})"), Contains("column 14") && Contains("starting an object key"));
  CHECK_THAT(Error(R"({"text": "abc)"), Contains("unterminated string"));
  CHECK_THAT(Error(R"({"text": "a\qb"})"), Contains("invalid escape '\\q'"));
  CHECK_THAT(Error(R"({"text": "\u12G4"})"), Contains("four hex digits"));
  CHECK_THAT(Error(R"({"text": "\ud83d"})"), Contains("high surrogate"));
  CHECK_THAT(Error(R"({"text": "\ude00"})"), Contains("lone low surrogate"));
  CHECK_THAT(Error("{\"text\": \"a\tb\"}"), Contains("raw control character"));
  CHECK_THAT(Error(R"({"text": "a"} x)"), Contains("unexpected characters after"));
  CHECK_THAT(Error(R"({'text': 'a'})"), Contains("column 2"));
  CHECK_THAT(Error(R"({"n": 01, "text": "a"})"), Contains("column 8"));
  CHECK_THAT(Error(R"({"n": tru, "text": "a"})"), Contains("invalid literal"));
  CHECK_THAT(Error(R"({"n": NaN, "text": "a"})"), Contains("unexpected character 'N'"));
  CHECK_THAT(Error(""), Contains("must be a JSON object"));
}

std::vector<std::string> Split(absl::string_view text, SplitMode mode) {
  std::vector<std::string> out;
  for (absl::string_view d : SplitDocuments(text, mode)) out.emplace_back(d);
  return out;
}

TEST_CASE("splitting text into documents") {
  const std::string fortune = "A fortune.\n%\nTwo\nlines.\n%\n%\n  \n%\nLast, no newline";
  CHECK(Split(fortune, SplitMode::kPercent) ==
        std::vector<std::string>{"A fortune.\n", "Two\nlines.\n", "Last, no newline"});
  CHECK(Split("x\r\n%\r\ny\r\n", SplitMode::kPercent) == std::vector<std::string>{"x\r\n", "y\r\n"});
  CHECK(Split("50% off\n%%\n", SplitMode::kPercent) == std::vector<std::string>{"50% off\n%%\n"});
  CHECK(Split("p1 a\np1 b\n\n \t\np2\n\n", SplitMode::kBlank) ==
        std::vector<std::string>{"p1 a\np1 b\n", "p2\n"});
  CHECK(Split("one\n\ntwo\r\nthree", SplitMode::kLine) == std::vector<std::string>{"one", "two", "three"});
  CHECK(Split("whole\n\nfile\n", SplitMode::kFile) == std::vector<std::string>{"whole\n\nfile\n"});
  CHECK(Split(" \n\n", SplitMode::kFile).empty());
  CHECK(ParseSplitMode("percent").value() == SplitMode::kPercent);
  CHECK_THAT(std::string(ParseSplitMode("para").status().message()),
             Contains("file, line, blank or percent"));
}

TEST_CASE("TokenizeFile: text and JSON lines, end-of-document tokens, line numbers in errors") {
  TempDir tmp;
  WriteBytes(tmp / "f.txt", "\xEF\xBB\xBFqu\n%\nip\n");
  TokenizeOptions o;
  o.split = SplitMode::kPercent;
  auto t = TokenizeFile(tmp / "f.txt", o);
  REQUIRE(t.ok());
  CHECK(t->tokens == std::vector<int32_t>{'q', 'u', '\n', 256, 'i', 'p', '\n', 256});
  CHECK(t->document_lengths == std::vector<int64_t>{4, 4});
  CHECK(t->bytes_read == 11);
  o.append_eod = false;
  t = TokenizeFile(tmp / "f.txt", o);
  REQUIRE(t.ok());
  CHECK(t->document_lengths == std::vector<int64_t>{3, 3});

  WriteBytes(tmp / "d.jsonl",
             "{\"text\": \"a\\u00e9\"}\n\n{\"text\": \"\", \"x\": 1}\r\n{\"id\": 3, \"text\": \"b\\n\"}");
  o = TokenizeOptions();
  t = TokenizeFile(tmp / "d.jsonl", o);
  REQUIRE(t.ok());
  CHECK(t->tokens == std::vector<int32_t>{'a', 0xC3, 0xA9, 256, 'b', '\n', 256});
  CHECK(t->document_lengths == std::vector<int64_t>{4, 3});
  WriteBytes(tmp / "bad.jsonl", "{\"text\": \"ok\"}\n{\"txt\": \"no\"}\n");
  auto bad = TokenizeFile(tmp / "bad.jsonl", o);
  REQUIRE_FALSE(bad.ok());
  CHECK_THAT(std::string(bad.status().message()),
             Contains(tmp / "bad.jsonl:2:") && Contains("no key \"text\""));
  o.format = InputFormat::kText;  // the same file read as text: one document
  t = TokenizeFile(tmp / "bad.jsonl", o);
  REQUIRE(t.ok());
  CHECK(t->document_lengths.size() == 1);
  CHECK(TokenizeFile(tmp / "missing", o).status().code() == absl::StatusCode::kNotFound);
}

TEST_CASE("ListInputFiles: sorted regular files; .dat, binary and duplicate symlinks skipped") {
  TempDir tmp;
  namespace fs = std::filesystem;
  fs::create_directories(tmp / "corpus/sub");
  WriteBytes(tmp / "corpus/b", "b text\n");
  WriteBytes(tmp / "corpus/a", "a text\n");
  WriteBytes(tmp / "corpus/a.dat", "index");
  WriteBytes(tmp / "corpus/sub/c", "c text\n");
  WriteBytes(tmp / "corpus/.hidden", "h\n");
  WriteBytes(tmp / "corpus/bin", std::string("\x01\x00\x02", 3));
  WriteBytes(tmp / "outside", "o\n");
  fs::create_symlink("a", tmp / "corpus/a.u8");
  fs::create_symlink(tmp / "outside", tmp / "corpus/link_out");
  std::vector<std::string> skipped;
  auto files = ListInputFiles({tmp / "corpus", tmp / "corpus/b"}, &skipped);
  REQUIRE(files.ok());
  CHECK(*files == std::vector<std::string>{tmp / "corpus/a", tmp / "corpus/b", tmp / "corpus/link_out",
                                           tmp / "corpus/sub/c"});
  CHECK(skipped.size() == 4);  // a.dat, bin, a.u8, and b named twice
  auto missing = ListInputFiles({tmp / "nope"}, &skipped);
  CHECK_THAT(std::string(missing.status().message()), Contains("nope: no such file"));
  fs::create_directories(tmp / "empty");
  CHECK_FALSE(ListInputFiles({tmp / "empty"}, &skipped).ok());
}

TEST_CASE("SentencePiece: a missing or broken model is refused, naming the file") {
  auto missing = SentencePieceTokenizer::Load("/nonexistent/model.model");
  REQUIRE(!missing.ok());
  CHECK(std::string(missing.status().message()).find("/nonexistent/model.model") != std::string::npos);
  const std::string junk = (std::filesystem::temp_directory_path() / "moe_not_a_model.model").string();
  { std::ofstream(junk) << "not a sentencepiece model"; }
  auto broken = SentencePieceTokenizer::Load(junk);
  REQUIRE(!broken.ok());
  CHECK(std::string(broken.status().message()).find("cannot load the SentencePiece model") !=
        std::string::npos);
  std::filesystem::remove(junk);
}

TEST_CASE("PREFIX.tokenizer: written by moe-preprocess, model.vocab_size checked against it") {
  const std::string prefix = (std::filesystem::temp_directory_path() / "moe_tokinfo_test").string();
  std::filesystem::remove(prefix + ".tokenizer");
  CHECK(CheckVocabAgainstTokenizer(prefix, 10).ok());  // no file: nothing to check
  REQUIRE(WriteTokenizerInfo(prefix, {"spm:x.model", 1000, 2}).ok());
  auto info = ReadTokenizerInfo(prefix);
  REQUIRE(info.ok());
  CHECK(info->tokenizer == "spm:x.model");
  CHECK(info->vocab_size == 1000);
  CHECK(info->eod_id == 2);
  CHECK(CheckVocabAgainstTokenizer(prefix, 1000).ok());
  CHECK(CheckVocabAgainstTokenizer(prefix, 1024).ok());  // a padded vocabulary is fine
  absl::Status small = CheckVocabAgainstTokenizer(prefix, 257);
  REQUIRE(!small.ok());
  CHECK(std::string(small.message()).find("model.vocab_size = 257 is smaller") != std::string::npos);
  CHECK(std::string(small.message()).find("set model.vocab_size = 1000") != std::string::npos);
  std::filesystem::remove(prefix + ".tokenizer");
}

}  // namespace
}  // namespace moe::data
