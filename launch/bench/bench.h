// moe-bench: one executable, one suite per file in launch/bench/.
//
//   moe-bench                 lists the suites
//   moe-bench SUITE [--json] [key=value ...]
//   mpirun -np 4 moe-bench comm --json
//
// A suite measures and reports through Reporter: each measurement is a row of
// named parameters and figures (value + unit); Report() prints a readable
// table (rank 0) or, with --json, one JSON object per line per measurement:
//   {"suite":"comm","params":{...},"figures":{"gbps":{"value":1.2,"unit":"GB/s"}},
//    "ratio":{"name":"vs_raw_mpi","value":0.97}}
// Ratios compare two things measured in the same run (these machines are noisy).
#ifndef MOE_LAUNCH_BENCH_BENCH_H_
#define MOE_LAUNCH_BENCH_BENCH_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace moe::bench {

struct Figure {
  std::string name;
  double value = 0;
  std::string unit;
};

struct Measurement {
  std::vector<std::pair<std::string, std::string>> params;  // ordered
  std::vector<Figure> figures;
  std::string ratio_name;  // empty when the measurement has no ratio
  double ratio = 0;
};

class Reporter {
 public:
  Reporter(std::string suite, bool json, bool print) : suite_(std::move(suite)), json_(json), print_(print) {}
  // Adds a measurement; printed at once in JSON mode, at Flush() as a table otherwise.
  void Add(Measurement m);
  // Prints a free-text note under the table (targets, what was compared).
  void Note(std::string text);
  void Flush();

 private:
  std::string suite_;
  bool json_, print_;
  std::vector<Measurement> rows_;
  std::vector<std::string> notes_;
};

struct Args {
  std::map<std::string, std::string> kv;  // key=value arguments after the suite name
  bool json = false;
  int rank = 0, world = 1;
  // Typed access with defaults.
  long Int(const std::string& key, long fallback) const;
  double Double(const std::string& key, double fallback) const;
  std::string Str(const std::string& key, const std::string& fallback) const;
};

using SuiteFn = std::function<absl::Status(const Args&, Reporter&)>;

struct Suite {
  std::string name, description;
  SuiteFn fn;
};

// Registers a suite at static-initialisation time:
//   static moe::bench::Registrar reg("comm", "AllToAllV/AllReduce vs raw MPI", RunComm);
struct Registrar {
  Registrar(std::string name, std::string description, SuiteFn fn);
};
std::vector<Suite>& Suites();

// Runs `run(kind)` (one timed call, in ms) for kinds 0 .. kinds - 1: each once
// to warm up, then `iters` rounds, interleaved (kind 0, 1, ..., then again);
// returns each kind's median.
absl::StatusOr<std::vector<double>> InterleavedMedians(int kinds, int64_t iters,
                                                       const std::function<absl::StatusOr<double>(int)>& run);

}  // namespace moe::bench

#endif  // MOE_LAUNCH_BENCH_BENCH_H_
