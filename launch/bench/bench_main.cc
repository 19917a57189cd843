#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "comm/mpi_env.h"
#include "launch/bench/bench.h"

namespace moe::bench {

absl::StatusOr<std::vector<double>> InterleavedMedians(
    int kinds, int64_t iters, const std::function<absl::StatusOr<double>(int)>& run) {
  for (int kind = 0; kind < kinds; ++kind) {  // warm-up: pages, launches, caches
    absl::StatusOr<double> t = run(kind);
    if (!t.ok()) return t.status();
  }
  std::vector<std::vector<double>> times(kinds);
  for (int64_t i = 0; i < iters; ++i) {
    for (int kind = 0; kind < kinds; ++kind) {
      absl::StatusOr<double> t = run(kind);
      if (!t.ok()) return t.status();
      times[kind].push_back(*t);
    }
  }
  std::vector<double> median(kinds, 0.0);
  for (int kind = 0; kind < kinds; ++kind) {
    if (times[kind].empty()) continue;
    std::sort(times[kind].begin(), times[kind].end());
    median[kind] = times[kind][times[kind].size() / 2];
  }
  return median;
}

std::vector<Suite>& Suites() {
  static std::vector<Suite> suites;
  return suites;
}

Registrar::Registrar(std::string name, std::string description, SuiteFn fn) {
  Suites().push_back({std::move(name), std::move(description), std::move(fn)});
}

long Args::Int(const std::string& key, long fallback) const {
  auto it = kv.find(key);
  long v;
  return it != kv.end() && absl::SimpleAtoi(it->second, &v) ? v : fallback;
}
double Args::Double(const std::string& key, double fallback) const {
  auto it = kv.find(key);
  double v;
  return it != kv.end() && absl::SimpleAtod(it->second, &v) ? v : fallback;
}
std::string Args::Str(const std::string& key, const std::string& fallback) const {
  auto it = kv.find(key);
  return it != kv.end() ? it->second : fallback;
}

namespace {
std::string JsonEscape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out.push_back('\\');
    out.push_back(c);
  }
  return out;
}
std::string JsonNumber(double v) {
  if (!std::isfinite(v)) return "null";
  return absl::StrFormat("%.6g", v);
}
}  // namespace

void Reporter::Add(Measurement m) {
  if (json_ && print_) {
    std::string line = absl::StrCat("{\"suite\":\"", JsonEscape(suite_), "\",\"params\":{");
    for (size_t i = 0; i < m.params.size(); ++i) {
      absl::StrAppend(&line, i ? "," : "", "\"", JsonEscape(m.params[i].first), "\":\"",
                      JsonEscape(m.params[i].second), "\"");
    }
    absl::StrAppend(&line, "},\"figures\":{");
    for (size_t i = 0; i < m.figures.size(); ++i) {
      absl::StrAppend(&line, i ? "," : "", "\"", JsonEscape(m.figures[i].name),
                      "\":{\"value\":", JsonNumber(m.figures[i].value), ",\"unit\":\"",
                      JsonEscape(m.figures[i].unit), "\"}");
    }
    absl::StrAppend(&line, "}");
    if (!m.ratio_name.empty()) {
      absl::StrAppend(&line, ",\"ratio\":{\"name\":\"", JsonEscape(m.ratio_name),
                      "\",\"value\":", JsonNumber(m.ratio), "}");
    }
    absl::StrAppend(&line, "}\n");
    std::fputs(line.c_str(), stdout);
    std::fflush(stdout);
  }
  rows_.push_back(std::move(m));
}

void Reporter::Note(std::string text) { notes_.push_back(std::move(text)); }

void Reporter::Flush() {
  if (!print_) return;
  if (json_) return;
  if (rows_.empty()) return;  // the suite printed its own output
  // Columns: the first row's params and figures (+ ratio), in order.
  std::vector<std::string> header;
  for (auto& p : rows_[0].params) header.push_back(p.first);
  for (auto& f : rows_[0].figures) header.push_back(absl::StrCat(f.name, " (", f.unit, ")"));
  bool has_ratio = !rows_[0].ratio_name.empty();
  if (has_ratio) header.push_back(rows_[0].ratio_name);
  std::vector<std::vector<std::string>> cells;
  for (auto& r : rows_) {
    std::vector<std::string> row;
    for (auto& p : r.params) row.push_back(p.second);
    for (auto& f : r.figures) row.push_back(absl::StrFormat("%.4g", f.value));
    if (has_ratio) row.push_back(r.ratio_name.empty() ? "" : absl::StrFormat("%.3f", r.ratio));
    cells.push_back(std::move(row));
  }
  std::vector<size_t> width(header.size());
  for (size_t c = 0; c < header.size(); ++c) {
    width[c] = header[c].size();
    for (auto& row : cells)
      if (c < row.size()) width[c] = std::max(width[c], row[c].size());
  }
  std::printf("== moe-bench %s\n", suite_.c_str());
  auto print_row = [&](const std::vector<std::string>& row) {
    std::string line;
    for (size_t c = 0; c < header.size(); ++c) {
      absl::StrAppendFormat(&line, "%*s  ", static_cast<int>(width[c]), c < row.size() ? row[c] : "");
    }
    std::printf("%s\n", line.c_str());
  };
  print_row(header);
  for (auto& row : cells) print_row(row);
  for (auto& n : notes_) std::printf("note: %s\n", n.c_str());
  std::fflush(stdout);
}

}  // namespace moe::bench

int main(int argc, char** argv) {
  using moe::bench::Suites;
  absl::Status init = moe::comm::MpiEnv::Init(&argc, &argv);
  if (!init.ok()) {
    std::fprintf(stderr, "moe-bench: %s\n", std::string(init.message()).c_str());
    return 1;
  }
  moe::bench::Args args;
  args.rank = moe::comm::MpiEnv::world_rank();
  args.world = moe::comm::MpiEnv::world_size();
  std::string suite_name;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--json") {
      args.json = true;
    } else if (a.find('=') != std::string::npos) {
      std::string key = a.substr(0, a.find('='));
      while (!key.empty() && key[0] == '-') key.erase(0, 1);
      args.kv[key] = a.substr(a.find('=') + 1);
    } else if (suite_name.empty()) {
      suite_name = a;
    } else {
      if (args.rank == 0) std::fprintf(stderr, "moe-bench: unexpected argument '%s'\n", a.c_str());
      moe::comm::MpiEnv::Finalize();
      return 2;
    }
  }
  std::sort(Suites().begin(), Suites().end(), [](auto& a, auto& b) { return a.name < b.name; });
  const moe::bench::Suite* suite = nullptr;
  for (auto& s : Suites())
    if (s.name == suite_name) suite = &s;
  if (suite == nullptr) {
    if (args.rank == 0) {
      if (!suite_name.empty()) std::fprintf(stderr, "moe-bench: no suite '%s'\n", suite_name.c_str());
      std::fprintf(stderr, "usage: [mpirun -np N] moe-bench SUITE [--json] [key=value ...]\nsuites:\n");
      for (auto& s : Suites()) std::fprintf(stderr, "  %-12s %s\n", s.name.c_str(), s.description.c_str());
    }
    moe::comm::MpiEnv::Finalize();
    return suite_name.empty() ? 0 : 2;
  }
  moe::bench::Reporter reporter(suite->name, args.json, args.rank == 0);
  absl::Status status = suite->fn(args, reporter);
  if (!status.ok()) {
    std::fprintf(stderr, "[rank %d] moe-bench %s: %s\n", args.rank, suite->name.c_str(),
                 std::string(status.message()).c_str());
    if (args.world == 1) {
      moe::comm::MpiEnv::Finalize();
      return 1;
    }
    moe::comm::MpiEnv::Abort(1);  // the other ranks may be waiting in a collective
  }
  reporter.Flush();
  moe::comm::MpiEnv::Finalize();
  return 0;
}
