// moe-preprocess: text files or JSON lines -> a Megatron indexed dataset
// (PREFIX.bin / PREFIX.idx) of byte tokens (bytes 0..255, end of document 256)
// or of SentencePiece ids (--tokenizer spm:MODEL.model; the model's eos ends
// documents), plus (SentencePiece) PREFIX.tokenizer naming the tokenizer and its
// vocabulary so that training checks model.vocab_size before any work.
//
//   moe-preprocess --output-prefix data/fortunes --split=percent /usr/share/games/fortunes
//   moe-preprocess --output-prefix data/f_spm --tokenizer spm:fortunes.model --split=percent
//   /usr/share/games/fortunes moe-preprocess --output-prefix data/web corpus/*.jsonl --workers=8
//   moe-preprocess --check=data/fortunes --vocab-size=257      # validate and print stats
//
// Input files are tokenized in parallel (--workers threads) and written in input
// order, so the output does not depend on the number of workers. The output is
// written under temporary names and renamed at the end: PREFIX.bin/.idx are
// either complete or untouched. Exit codes: 0 done, 1 failure, 2 bad command line.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "data/indexed_dataset.h"
#include "data/spm_tokenizer.h"
#include "data/text_corpus.h"
#include "data/tokenizer.h"

namespace {

using moe::data::ByteTokenizer;

constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;

constexpr char kUsage[] =
    "usage: moe-preprocess --output-prefix PREFIX [options] INPUT...\n"
    "       moe-preprocess --check PREFIX [--vocab-size N]\n"
    "  INPUT               text or JSON-lines files, or directories (every regular file below,\n"
    "                      sorted; *.dat, binary files and symlinks to files already read are skipped)\n"
    "  --output-prefix P   write P.bin and P.idx (Megatron indexed dataset, uint16 tokens)\n"
    "  --split MODE        how text files become documents: file (default: one document per file),\n"
    "                      line, blank (blank-line separated), percent (lines of '%': the fortune\n"
    "                      format of /usr/share/games/fortunes)\n"
    "  --format F          auto (default: *.jsonl and *.json are JSON lines), text, jsonl\n"
    "  --json-key K        JSON lines: the string field holding each document (default text)\n"
    "  --workers N         tokenizing threads (default: hardware threads)\n"
    "  --tokenizer T       byte (default: bytes 0..255, end of document 256) or spm:MODEL.model\n"
    "                      (SentencePiece; vocabulary and end of document (eos_id) from the model)\n"
    "  --append-eod B      end every document with the end-of-document token (default true)\n"
    "  --check PREFIX      validate an existing PREFIX.bin/.idx against --vocab-size and print its\n"
    "                      statistics (tokens, documents, unigram entropy)\n"
    "  --vocab-size N      vocabulary to check tokens against (default: the tokenizer's; 257 for bytes)\n"
    "  --quiet             no progress line\n";

struct Args {
  std::string output_prefix;
  std::string check;
  std::vector<std::string> inputs;
  std::string split = "file";
  std::string format = "auto";
  std::string json_key = "text";
  std::string tokenizer = "byte";
  int workers = 0;
  bool append_eod = true;
  int64_t vocab_size = 0;  // 0 = the tokenizer's
  bool quiet = false;
  bool help = false;
  std::vector<std::string> errors;
};

bool ParseBool(const std::string& v, bool* out) {
  if (v == "true" || v == "1" || v == "yes" || v == "on") return *out = true, true;
  if (v == "false" || v == "0" || v == "no" || v == "off") return *out = false, true;
  return false;
}

Args ParseArgs(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      a.help = true;
      continue;
    }
    if (arg == "--quiet") {
      a.quiet = true;
      continue;
    }
    if (!absl::StartsWith(arg, "--")) {
      a.inputs.push_back(arg);
      continue;
    }
    std::string name = arg, value;
    const size_t eq = arg.find('=');
    if (eq != std::string::npos) {
      name = arg.substr(0, eq);
      value = arg.substr(eq + 1);
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      a.errors.push_back(absl::StrCat(arg, " needs a value"));
      continue;
    }
    if (name == "--output-prefix") {
      a.output_prefix = value;
    } else if (name == "--check") {
      a.check = value;
    } else if (name == "--split") {
      a.split = value;
    } else if (name == "--format") {
      a.format = value;
    } else if (name == "--tokenizer") {
      a.tokenizer = value;
      if (value != "byte" && (!absl::StartsWith(value, "spm:") || value.size() == 4)) {
        a.errors.push_back(absl::StrCat("--tokenizer=", value, " must be byte or spm:MODEL.model"));
      }
    } else if (name == "--json-key") {
      a.json_key = value;
    } else if (name == "--workers") {
      if (!absl::SimpleAtoi(value, &a.workers) || a.workers < 1) {
        a.errors.push_back(absl::StrCat("--workers=", value, " must be a positive integer"));
      }
    } else if (name == "--append-eod") {
      if (!ParseBool(value, &a.append_eod)) {
        a.errors.push_back(absl::StrCat("--append-eod=", value, " must be true or false"));
      }
    } else if (name == "--vocab-size") {
      if (!absl::SimpleAtoi(value, &a.vocab_size) || a.vocab_size < 1) {
        a.errors.push_back(absl::StrCat("--vocab-size=", value, " must be a positive integer"));
      }
    } else {
      a.errors.push_back(absl::StrCat("unknown flag '", name, "'"));
    }
  }
  if (!a.help && a.check.empty()) {
    if (a.output_prefix.empty()) a.errors.push_back("--output-prefix PREFIX is required");
    if (a.inputs.empty()) a.errors.push_back("no INPUT files or directories given");
  }
  return a;
}

// Statistics of a token stream: counts per token id and the unigram entropy.
struct Unigram {
  std::vector<int64_t> counts;
  int64_t total = 0;
  void Add(const int32_t* t, int64_t n) {
    if (counts.size() < static_cast<size_t>(ByteTokenizer::kVocabSize))
      counts.resize(ByteTokenizer::kVocabSize);
    for (int64_t i = 0; i < n; ++i) {
      if (static_cast<size_t>(t[i]) >= counts.size()) counts.resize(t[i] + 1);
      ++counts[t[i]];
    }
    total += n;
  }
  double EntropyNats() const {
    double h = 0;
    for (int64_t c : counts) {
      if (c > 0) {
        const double p = static_cast<double>(c) / static_cast<double>(total);
        h -= p * std::log(p);
      }
    }
    return h;
  }
  int64_t distinct() const {
    return std::count_if(counts.begin(), counts.end(), [](int64_t c) { return c > 0; });
  }
};

std::string EntropyLine(const Unigram& u) {
  const double nats = u.EntropyNats();
  return absl::StrFormat("unigram entropy %.4f bits/token = %.4f nats/token over %d distinct tokens",
                         nats / std::log(2.0), nats, u.distinct());
}

class Progress {
 public:
  explicit Progress(bool quiet) : quiet_(quiet), tty_(isatty(2) == 1), start_(Clock::now()), last_(start_) {}
  double Seconds() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }
  void Update(size_t done, size_t files, int64_t bytes, int64_t tokens, bool final) {
    if (quiet_) return;
    const auto now = Clock::now();
    const double since = std::chrono::duration<double>(now - last_).count();
    if (!final && since < (tty_ ? 0.2 : 2.0)) return;
    last_ = now;
    const double secs = std::max(Seconds(), 1e-9);
    const std::string line =
        absl::StrFormat("moe-preprocess: %d/%d files, %.2f MB read, %d tokens, %.1f MB/s", done, files,
                        bytes / 1e6, tokens, bytes / 1e6 / secs);
    std::fprintf(stderr, tty_ ? "\r%s%s" : "%s%s", line.c_str(), (final || !tty_) ? "\n" : "");
    std::fflush(stderr);
  }

 private:
  using Clock = std::chrono::steady_clock;
  bool quiet_;
  bool tty_;
  Clock::time_point start_;
  Clock::time_point last_;
};

int Check(const Args& args) {
  auto ds = moe::data::IndexedDataset::Open(args.check);
  if (!ds.ok()) {
    std::fprintf(stderr, "moe-preprocess: %s\n", std::string(ds.status().message()).c_str());
    return kExitFailure;
  }
  const int64_t vocab_size = args.vocab_size > 0 ? args.vocab_size : ByteTokenizer::kVocabSize;
  absl::Status valid = (*ds)->Validate(vocab_size);
  if (!valid.ok()) {
    std::fprintf(stderr, "moe-preprocess: %s\n", std::string(valid.message()).c_str());
    return kExitFailure;
  }
  Unigram u;
  std::vector<int32_t> buf;
  const int64_t n = (*ds)->num_tokens();
  constexpr int64_t kChunk = 1 << 20;
  for (int64_t b = 0; b < n; b += kChunk) {
    const int64_t c = std::min(kChunk, n - b);
    buf.resize(c);
    absl::Status s = (*ds)->Read(b, c, buf.data());
    if (!s.ok()) {
      std::fprintf(stderr, "moe-preprocess: %s\n", std::string(s.message()).c_str());
      return kExitFailure;
    }
    u.Add(buf.data(), c);
  }
  std::printf("%s: dtype %s, %lld sequences, %lld documents, %lld tokens, all < vocab_size %lld\n%s\n",
              (*ds)->Describe().c_str(), moe::data::MegatronDTypeName((*ds)->dtype()),
              static_cast<long long>((*ds)->num_sequences()), static_cast<long long>((*ds)->num_documents()),
              static_cast<long long>(n), static_cast<long long>(vocab_size), EntropyLine(u).c_str());
  return 0;
}

int Run(const Args& args) {
  std::unique_ptr<moe::data::SentencePieceTokenizer> spm;
  moe::data::TokenizerInfo info{"byte", ByteTokenizer::kVocabSize, ByteTokenizer::kEndOfDocument};
  if (absl::StartsWith(args.tokenizer, "spm:")) {
    auto loaded = moe::data::SentencePieceTokenizer::Load(args.tokenizer.substr(4));
    if (!loaded.ok()) {
      std::fprintf(stderr, "moe-preprocess: --tokenizer=%s: %s\n", args.tokenizer.c_str(),
                   std::string(loaded.status().message()).c_str());
      return kExitUsage;
    }
    spm = std::move(*loaded);
    info = {args.tokenizer, spm->vocab_size(), spm->eod_id()};
  }
  if (args.vocab_size > 0 && args.vocab_size < info.vocab_size) {
    std::fprintf(stderr,
                 "moe-preprocess: --vocab-size=%lld is smaller than the %s tokenizer's vocabulary %lld\n",
                 static_cast<long long>(args.vocab_size), info.tokenizer.c_str(),
                 static_cast<long long>(info.vocab_size));
    return kExitUsage;
  }
  const int64_t vocab_size = args.vocab_size > 0 ? args.vocab_size : info.vocab_size;
  moe::data::TokenizeOptions options;
  options.spm = spm.get();
  options.json_key = args.json_key;
  options.append_eod = args.append_eod;
  auto split = moe::data::ParseSplitMode(args.split);
  auto format = moe::data::ParseInputFormat(args.format);
  if (!split.ok() || !format.ok()) {
    std::fprintf(stderr, "moe-preprocess: %s\n%s",
                 std::string((split.ok() ? format.status() : split.status()).message()).c_str(), kUsage);
    return kExitUsage;
  }
  options.split = *split;
  options.format = *format;

  std::vector<std::string> skipped;
  auto files = moe::data::ListInputFiles(args.inputs, &skipped);
  if (!files.ok()) {
    std::fprintf(stderr, "moe-preprocess: %s\n", std::string(files.status().message()).c_str());
    return kExitFailure;
  }
  if (!skipped.empty() && !args.quiet) {
    std::fprintf(stderr, "moe-preprocess: skipped %zu files, e.g. %s\n", skipped.size(), skipped[0].c_str());
  }
  auto writer = moe::data::IndexedDatasetWriter::Create(args.output_prefix, vocab_size);
  if (!writer.ok()) {
    std::fprintf(stderr, "moe-preprocess: %s\n", std::string(writer.status().message()).c_str());
    return kExitFailure;
  }

  const size_t num_files = files->size();
  const int workers = static_cast<int>(std::min<size_t>(
      num_files, args.workers > 0 ? args.workers : std::max(1u, std::thread::hardware_concurrency())));
  // Workers take files in order; the main thread writes them in order. A worker
  // waits while it is more than `window` files ahead of the writer (bounded memory).
  const size_t window = 2 * static_cast<size_t>(workers);
  std::vector<std::optional<absl::StatusOr<moe::data::TokenizedFile>>> results(num_files);
  std::mutex mu;
  std::condition_variable cv;
  size_t next_file = 0;
  size_t written = 0;
  bool stop = false;
  std::vector<std::thread> threads;
  for (int w = 0; w < workers; ++w) {
    threads.emplace_back([&] {
      while (true) {
        size_t i;
        {
          std::unique_lock<std::mutex> lock(mu);
          cv.wait(lock, [&] { return stop || next_file >= num_files || next_file < written + window; });
          if (stop || next_file >= num_files) return;
          i = next_file++;
        }
        auto r = moe::data::TokenizeFile((*files)[i], options);
        std::lock_guard<std::mutex> lock(mu);
        results[i] = std::move(r);
        cv.notify_all();
      }
    });
  }

  Progress progress(args.quiet);
  Unigram unigram;
  int64_t bytes = 0;
  absl::Status status;
  for (size_t i = 0; i < num_files && status.ok(); ++i) {
    std::optional<absl::StatusOr<moe::data::TokenizedFile>> r;
    {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return results[i].has_value(); });
      r = std::move(results[i]);
      results[i].reset();
    }
    if (!r->ok()) {
      status = r->status();
    } else {
      const moe::data::TokenizedFile& f = **r;
      int64_t offset = 0;
      for (int64_t len : f.document_lengths) {
        status = (*writer)->AddDocument(f.tokens.data() + offset, len);
        if (!status.ok()) break;
        offset += len;
      }
      unigram.Add(f.tokens.data(), static_cast<int64_t>(f.tokens.size()));
      bytes += f.bytes_read;
    }
    {
      std::lock_guard<std::mutex> lock(mu);
      written = i + 1;
      if (!status.ok()) stop = true;
      cv.notify_all();
    }
    progress.Update(i + 1, num_files, bytes, (*writer)->num_tokens(), false);
  }
  {
    std::lock_guard<std::mutex> lock(mu);
    stop = true;
    cv.notify_all();
  }
  for (auto& t : threads) t.join();
  if (status.ok()) status = (*writer)->Finish();
  // PREFIX.tokenizer only for a SentencePiece dataset (byte datasets keep
  // today's behaviour: any model.vocab_size above their largest token); a stale
  // one from an earlier run on the same prefix goes.
  const std::string prefix = moe::data::IndexedDatasetPrefix(args.output_prefix);
  if (status.ok() && spm != nullptr) status = moe::data::WriteTokenizerInfo(prefix, info);
  if (status.ok() && spm == nullptr) std::remove((prefix + ".tokenizer").c_str());
  if (!status.ok()) {
    std::fprintf(stderr, "\nmoe-preprocess: %s\n", std::string(status.message()).c_str());
    return kExitFailure;  // the writer removes its temporary files
  }
  progress.Update(num_files, num_files, bytes, (*writer)->num_tokens(), true);
  const double secs = progress.Seconds();
  std::printf(
      "wrote %s.bin/.idx: %zu files, %lld documents, %lld tokens (%s), %.2f MB read in %.2f s "
      "(%.1f MB/s, %d workers)\ntokenizer %s: vocabulary %lld, end of document %lld (set model.vocab_size >= "
      "%lld)\n%s\n",
      moe::data::IndexedDatasetPrefix(args.output_prefix).c_str(), num_files,
      static_cast<long long>((*writer)->num_documents()), static_cast<long long>((*writer)->num_tokens()),
      moe::data::MegatronDTypeName((*writer)->dtype()), bytes / 1e6, secs, bytes / 1e6 / std::max(secs, 1e-9),
      workers, info.tokenizer.c_str(), static_cast<long long>(info.vocab_size),
      static_cast<long long>(info.eod_id), static_cast<long long>(vocab_size), EntropyLine(unigram).c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Args args = ParseArgs(argc, argv);
  if (args.help) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  if (!args.errors.empty()) {
    for (const std::string& e : args.errors) std::fprintf(stderr, "moe-preprocess: %s\n", e.c_str());
    std::fputs(kUsage, stderr);
    return kExitUsage;
  }
  return args.check.empty() ? Run(args) : Check(args);
}
