// moe-bench trace: the cost of profile.trace, measured in one process.
//
//   mpirun -np 4 moe-bench trace [config=configs/demo.textproto] [steps=8] [repeats=3]
//                                [FIELD.PATH=VALUE ...: config overrides]
//
// Builds two trainers of the same config on the same ranks, each with its own
// process groups and profiler: one with profile.trace on (its trace window
// covers every measured step, and its trace file is written at the last one,
// inside the timing), one with it off. Their training steps alternate (ABBA,
// so drift in machine load falls on both alike) and each step is timed on the
// host. "trace_overhead" is the ratio of mean step times, traced over
// untraced, over the window's steps but its last (target <= 1.03); the last
// traced step also writes the trace file, reported apart ("write_step_extra",
// and "window_overhead" for the whole window, writing included). Each repeat
// builds both trainers afresh.
// Needs the config's data (launch/demo.sh prepares the demo's corpus);
// metrics, traces and checkpoints go to a temporary directory, removed after.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "comm/communicator.h"
#include "comm/mpi_env.h"
#include "launch/bench/bench.h"
#include "parallel/process_groups.h"
#include "runtime/core/device_select.h"
#include "runtime/core/status.h"
#include "runtime/job_config.h"
#include "runtime/profiler.h"
#include "runtime/trainer.h"

namespace moe::bench {
namespace {

struct Run {
  std::shared_ptr<Profiler> profiler;
  std::unique_ptr<parallel::ProcessGroups> groups;
  std::unique_ptr<Trainer> trainer;
};

absl::StatusOr<Run> Build(const JobConfig& config) {
  Run run;
  ASSIGN_OR_RETURN(comm::CommOptions options,
                   comm::CommOptionsFromConfig(config.comm(), config.train().device()));
  ASSIGN_OR_RETURN(options.device, ResolveDevice(config.train().device(), nullptr));  // the local rank's GPU
  run.profiler = std::make_shared<Profiler>();
  options.sink = run.profiler;
  ASSIGN_OR_RETURN(auto world, comm::CreateWorldCommunicator(options));
  ASSIGN_OR_RETURN(parallel::ProcessGroups groups,
                   parallel::CreateProcessGroups(std::move(world), config.parallel().tensor(),
                                                 config.parallel().expert()));
  run.groups = std::make_unique<parallel::ProcessGroups>(std::move(groups));
  ASSIGN_OR_RETURN(run.trainer, Trainer::Create(config, run.groups.get(), run.profiler));
  return run;
}

absl::StatusOr<double> TimedStep(Trainer& t) {
  const auto begin = std::chrono::steady_clock::now();
  RETURN_IF_ERROR(t.TrainStep().status());
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
}

absl::Status RunTrace(const Args& args, Reporter& reporter) {
  const int steps = static_cast<int>(args.Int("steps", 8)),
            repeats = static_cast<int>(args.Int("repeats", 3));
  if (steps < 2 || repeats < 1) return absl::InvalidArgumentError("trace: steps >= 2 and repeats >= 1");
  std::vector<std::string> overrides;
  for (const auto& [key, value] : args.kv) {
    if (key.find('.') != std::string::npos) overrides.push_back(absl::StrCat(key, "=", value));
  }
  // One scratch directory, named by rank 0 and the same on every rank.
  std::string scratch = args.rank == 0 ? absl::StrCat(std::filesystem::temp_directory_path().string(),
                                                      "/moe-bench-trace-", getpid())
                                       : "";
  ASSIGN_OR_RETURN(std::vector<std::string> all, comm::MpiEnv::AllGatherBytes(scratch));
  scratch = all[0];
  auto config_for = [&](bool trace) -> absl::StatusOr<JobConfig> {
    std::vector<std::string> o = overrides;
    const std::string dir = absl::StrCat(scratch, trace ? "/on" : "/off");
    for (std::string f :
         {absl::StrCat("train.run_dir=", dir), std::string("checkpoint.dir="),
          std::string("train.steps=1000000"), std::string("train.eval_every=0"),
          absl::StrCat("profile.trace=", trace ? "true" : "false"), std::string("profile.trace_start=1"),
          absl::StrCat("profile.trace_steps=", steps), absl::StrCat("profile.trace_dir=", dir, "/trace")})
      o.push_back(f);
    return ResolveJobConfig(args.Str("config", "configs/demo.textproto"), o, args.world);
  };
  ASSIGN_OR_RETURN(JobConfig on_config, config_for(true));
  ASSIGN_OR_RETURN(JobConfig off_config, config_for(false));
  const std::string my_trace = absl::StrCat(scratch, "/on/trace/rank_", args.rank, ".json");
  for (int r = 0; r < repeats; ++r) {
    std::filesystem::remove(my_trace);  // each repeat must write its own
    // Steps of the traced trainer before the last one (spans, records and
    // counters kept), its last step (which also writes the trace file), and
    // the untraced trainer's steps.
    double on_s = 0, last_s = 0, off_s = 0;
    {
      ASSIGN_OR_RETURN(Run on, Build(on_config));
      ASSIGN_OR_RETURN(Run off, Build(off_config));
      // Step 1 of each warms up (and is outside the trace window).
      RETURN_IF_ERROR(on.trainer->TrainStep().status());
      RETURN_IF_ERROR(off.trainer->TrainStep().status());
      for (int s = 0; s < steps; ++s) {
        const bool on_first = s % 2 == 0;
        for (int k = 0; k < 2; ++k) {
          const bool traced = (k == 0) == on_first;
          ASSIGN_OR_RETURN(double t, TimedStep(traced ? *on.trainer : *off.trainer));
          (traced ? (s + 1 == steps ? last_s : on_s) : off_s) += t;
        }
      }
    }
    if (!std::filesystem::exists(my_trace)) {
      return absl::InternalError(absl::StrCat("trace: the traced trainer wrote no ", my_trace));
    }
    const double traced = on_s / (steps - 1), untraced = off_s / steps;
    Measurement m;
    m.params = {{"config", args.Str("config", "configs/demo.textproto")},
                {"ranks", absl::StrCat(args.world)},
                {"steps", absl::StrCat(steps)},
                {"repeat", absl::StrCat(r + 1)}};
    m.figures = {{"step_traced", traced * 1e3, "ms"},
                 {"step_untraced", untraced * 1e3, "ms"},
                 {"write_step_extra", (last_s - untraced) * 1e3, "ms"},
                 {"window_overhead", (on_s + last_s) / (steps * untraced), "x"}};
    m.ratio_name = "trace_overhead";
    m.ratio = traced / untraced;
    reporter.Add(std::move(m));
  }
  // Every rank has checked its file before rank 0 removes the directory.
  RETURN_IF_ERROR(comm::MpiEnv::AllGatherBytes("").status());
  if (args.rank == 0) std::filesystem::remove_all(scratch);
  reporter.Note(
      "trace_overhead = mean traced step / mean untraced step, the two trainers' steps interleaved in one "
      "process (ABBA), target <= 1.03; the last traced step also writes the trace file: write_step_extra is "
      "its time over an untraced step, window_overhead the whole window (writing included) over as many "
      "untraced steps");
  return absl::OkStatus();
}

Registrar reg("trace", "profile.trace on vs off, interleaved in one process (mpirun -np 4)", RunTrace);

}  // namespace
}  // namespace moe::bench
