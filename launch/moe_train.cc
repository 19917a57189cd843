// moe-train: the pretraining job. Launch it under mpirun (or launch/moe-launch):
//
//   mpirun -np 4 build/bin/moe-train --config=configs/demo.textproto train.steps=50
//
// Exit codes: 0 done, 1 runtime failure, 2 bad command line or config (every
// rank exits 2, before anything is allocated or written), 124 the start-up
// deadline passed (a rank stuck in MPI initialisation or the start-up checks).
//
// Start-up, in order, each step gated on every rank (control plane: host MPI
// collectives over the world, before any Communicator exists):
//   1. every rank resolves and validates its config; the ranks agree on a hash
//      of the resolved config (a mismatch names the first differing field and
//      the ranks holding each value);
//   2. every rank checks that it can use train.device (a GPU build on a
//      machine without a usable GPU stops here, exit 2) and that the predicted
//      peak memory of its node's ranks fits; rank 0 probes train.run_dir and
//      checkpoint.dir for writing.
// Only then does the job build its communicators and allocate.
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "comm/comm_wrapper.h"
#include "comm/communicator.h"
#include "comm/mpi_env.h"
#include "data/indexed_dataset.h"
#include "data/spm_tokenizer.h"
#include "parallel/layout.h"
#include "parallel/process_groups.h"
#include "runtime/checkpoint_signal.h"
#include "runtime/core/attention_gemm.h"
#include "runtime/core/device_select.h"
#include "runtime/core/logging.h"
#include "runtime/core/status.h"
#include "runtime/job_config.h"
#include "runtime/startup_checks.h"
#include "runtime/trainer.h"

namespace {

constexpr int kExitRuntimeError = 1;
constexpr int kExitUsage = 2;
constexpr int kExitStartupDeadline = 124;
constexpr double kDefaultStartupTimeoutS = 300;

constexpr char kUsage[] =
    "usage: moe-train --config=FILE [field.path=value ...]\n"
    "  --config=FILE     job config in protobuf text format (configs/demo.textproto)\n"
    "  field.path=value  override any scalar field, e.g. train.steps=100 parallel.expert=2\n"
    "  --print-config    print the resolved config and layout, then exit\n"
    "  --world-size=N    with --print-config: resolve for N ranks without starting\n"
    "                    them (moe-launch plans a restart's layout this way)\n"
    "  --startup-timeout-s=S  stop every rank when MPI initialisation and the\n"
    "                    start-up checks take longer than S seconds (default 300)\n";

struct Args {
  std::string config;
  std::vector<std::string> overrides;
  bool print_only = false;
  int world_size = 0;  // --world-size; 0 = the MPI world
  double startup_timeout_s = kDefaultStartupTimeoutS;
  bool help = false;
  std::vector<std::string> errors;
};

Args ParseArgs(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (absl::StartsWith(arg, "--config=")) {
      a.config = arg.substr(9);
    } else if (arg == "--config" && i + 1 < argc) {
      a.config = argv[++i];
    } else if (arg == "--print-config") {
      a.print_only = true;
    } else if (absl::StartsWith(arg, "--world-size=")) {
      if (!absl::SimpleAtoi(arg.substr(13), &a.world_size) || a.world_size < 1) {
        a.errors.push_back(absl::StrCat("--world-size='", arg.substr(13), "' must be a positive integer"));
      }
    } else if (absl::StartsWith(arg, "--startup-timeout-s=")) {
      if (!absl::SimpleAtod(arg.substr(20), &a.startup_timeout_s) || !(a.startup_timeout_s > 0) ||
          a.startup_timeout_s > 1e9) {
        a.errors.push_back(
            absl::StrCat("--startup-timeout-s='", arg.substr(20), "' must be a positive number of seconds"));
        a.startup_timeout_s = kDefaultStartupTimeoutS;
      }
    } else if (arg == "--help" || arg == "-h") {
      a.help = true;
    } else if (absl::StartsWith(arg, "-")) {
      a.errors.push_back(absl::StrCat("unknown flag '", arg, "'"));
    } else {
      a.overrides.push_back(arg);
    }
  }
  if (a.config.empty() && !a.help) a.errors.push_back("--config=FILE is required");
  if (a.world_size > 0 && !a.print_only) a.errors.push_back("--world-size=N needs --print-config");
  return a;
}

int Finish(int code) {
  moe::comm::MpiEnv::Finalize();
  return code;
}

// Ends this process when start-up (MPI initialisation and the start-up
// checks) has not finished by the deadline: until the communicators exist no
// watchdog bounds a rank that never arrives.
class StartupDeadline {
 public:
  explicit StartupDeadline(double timeout_s)
      : thread_([this, timeout_s] {
          std::unique_lock<std::mutex> lock(mu_);
          const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
          if (cv_.wait_until(lock, deadline, [this] { return done_; })) return;
          std::fprintf(
              stderr,
              "moe-train: start-up did not finish within %g s (--startup-timeout-s): a rank is stuck "
              "in MPI initialisation or has not reached the start-up checks; check that every rank "
              "started (host down, wrong hostfile, blocked network). Stopping this rank.\n",
              timeout_s);
          std::fflush(stderr);
          std::_Exit(kExitStartupDeadline);
        }) {}
  ~StartupDeadline() { Disarm(); }
  void Disarm() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

// Collective over the world: every rank's start-up problem ("" when none).
// Returns the message of the lowest failing rank (prefixed with its rank when
// that is not rank 0), "" when every rank is fine.
absl::StatusOr<std::string> GatherProblems(const std::string& mine) {
  ASSIGN_OR_RETURN(std::vector<std::string> all, moe::comm::MpiEnv::AllGatherBytes(mine));
  for (size_t r = 0; r < all.size(); ++r) {
    if (all[r].empty()) continue;
    return r > 0 ? absl::StrCat("rank ", r, ": ", all[r]) : all[r];
  }
  return std::string();
}

// Collective over the world: OK when every rank resolved the same config,
// else InvalidArgument naming the first differing field and the ranks.
absl::Status AgreeOnConfig(const moe::JobConfig& config) {
  const std::vector<std::string> flat = moe::FlattenConfig(config);
  ASSIGN_OR_RETURN(std::vector<std::string> hashes,
                   moe::comm::MpiEnv::AllGatherBytes(absl::StrCat(moe::ConfigHash(flat))));
  bool same = true;
  for (const std::string& h : hashes) same = same && h == hashes[0];
  if (same) return absl::OkStatus();
  ASSIGN_OR_RETURN(std::vector<std::string> texts,
                   moe::comm::MpiEnv::AllGatherBytes(absl::StrJoin(flat, "\n")));
  std::vector<std::vector<std::string>> per_rank;
  for (const std::string& t : texts) per_rank.push_back(absl::StrSplit(t, '\n'));
  std::string where = moe::DescribeConfigDisagreement(per_rank);
  if (where.empty()) where = "the config hashes differ";
  return absl::InvalidArgumentError(absl::StrCat(
      "the ranks resolved different configurations: ", where,
      "; every rank must run with the same --config and overrides (an MPMD launch must not differ in them)"));
}

// This rank's device problem ("" when none): train.device names a GPU that
// this machine cannot use (a CUDA build where no device is visible or the
// driver does not fit the runtime). Validation has already refused a device
// the build lacks, and comm.backend = "nccl" with a CPU device.
std::string DeviceProblem(const moe::JobConfig& config, int) {
  const std::string& device = config.train().device();
  absl::StatusOr<moe::Device> resolved = moe::ResolveDevice(device, nullptr);
  if (resolved.ok()) return "";
  return absl::StrCat("train.device = \"", device, "\": ", resolved.status().message(),
                      "; set train.device = \"cpu\" (comm.backend \"auto\" then uses MPI) or run where every "
                      "rank sees a usable GPU");
}

// This rank's memory problem ("" when none): the predicted peak of the
// node's ranks against the memory available.
std::string MemoryProblem(const moe::JobConfig& config) {
  absl::Status mem =
      moe::CheckMemoryFits(config, moe::comm::MpiEnv::local_size(), moe::AvailableMemoryBytes());
  return mem.ok() ? "" : std::string(mem.message());
}

// Rank 0's lock on checkpoint.dir, held until the process ends.
std::optional<moe::DirectoryLock> g_checkpoint_lock;

// Rank 0's directory problems ("" when none): train.run_dir and
// checkpoint.dir must be writable directories (created when missing), and no
// other job may hold checkpoint.dir (rank 0 locks it for the job's life).
std::string DirectoryProblems(const moe::JobConfig& config, int rank) {
  std::vector<std::string> problems;
  if (rank == 0) {
    absl::Status run = moe::ProbeWritableDirectory(config.train().run_dir(), "train.run_dir");
    if (!run.ok()) problems.push_back(std::string(run.message()));
    if (!config.checkpoint().dir().empty()) {
      absl::Status ckpt = moe::ProbeWritableDirectory(config.checkpoint().dir(), "checkpoint.dir");
      if (ckpt.ok()) {
        absl::StatusOr<moe::DirectoryLock> lock =
            moe::DirectoryLock::Acquire(config.checkpoint().dir(), "checkpoint.dir");
        if (lock.ok()) {
          g_checkpoint_lock.emplace(*std::move(lock));
        } else {
          ckpt = lock.status();
        }
      }
      if (!ckpt.ok()) problems.push_back(std::string(ckpt.message()));
    }
  }
  return absl::StrJoin(problems, "\n  ");
}

// Rank 0, once the trainer exists: the resolved config next to the metrics,
// written whole (temporary file, then rename) or not at all.
absl::Status WriteResolvedConfig(const moe::JobConfig& config) {
  const std::string path = config.train().run_dir() + "/config.textproto";
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << moe::ConfigToText(config);
    out.flush();
    if (!out) return absl::UnavailableError(absl::StrCat("cannot write ", tmp, "; check train.run_dir"));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::filesystem::remove(tmp, ec);
    return absl::UnavailableError(absl::StrCat("cannot rename ", tmp, " to ", path, "; check train.run_dir"));
  }
  MOE_LOG(INFO) << "resolved config written to " << path;
  return absl::OkStatus();
}

// Builds the process groups and the trainer and trains. Any error here is a
// runtime failure of this rank; the caller stops the whole job.
absl::Status Train(const moe::JobConfig& config) {
  ASSIGN_OR_RETURN(moe::comm::CommOptions options,
                   moe::comm::CommOptionsFromConfig(config.comm(), config.train().device()));
  // The device the trainer computes on ("cuda" is the local rank's GPU, not
  // cuda:0): the MPI communicator stages that device's buffers.
  ASSIGN_OR_RETURN(options.device, moe::ResolveDevice(config.train().device(), nullptr));
  // Every communicator reports its ops to the profiler (the groups inherit the sink).
  auto profiler = std::make_shared<moe::Profiler>();
  options.sink = profiler;
  ASSIGN_OR_RETURN(auto world, moe::comm::CreateWorldCommunicator(options));
  ASSIGN_OR_RETURN(moe::parallel::ProcessGroups groups,
                   moe::parallel::CreateProcessGroups(std::move(world), config.parallel().tensor(),
                                                      config.parallel().expert()));
  ASSIGN_OR_RETURN(std::unique_ptr<moe::Trainer> trainer, moe::Trainer::Create(config, &groups, profiler));
  // Written only once every start-up step passed: a run that fails to start
  // leaves the previous run's copy as it was.
  if (groups.layout.rank == 0) RETURN_IF_ERROR(WriteResolvedConfig(config));
  return trainer->Run();
}

}  // namespace

int main(int argc, char** argv) {
  // A scheduler's stop notice (SIGTERM/SIGUSR1) that comes during start-up is
  // kept, not fatal: the trainer stops after its first step and saves.
  if (absl::Status s = moe::InstallStopSignalHandlers(); !s.ok()) {
    std::fprintf(stderr, "moe-train: %s\n", std::string(s.message()).c_str());
    return kExitRuntimeError;
  }
  Args args = ParseArgs(argc, argv);
  StartupDeadline deadline(args.startup_timeout_s);
  // Fault injection for the start-up deadline test: a rank that stalls before
  // MPI initialisation, as one on a hung host would.
  if (const char* stall = std::getenv("MOE_FAULT_STALL_BEFORE_INIT_S"); stall != nullptr) {
    std::this_thread::sleep_for(std::chrono::duration<double>(std::atof(stall)));
  }
  absl::Status init = moe::comm::MpiEnv::Init(&argc, &argv);
  if (!init.ok()) {
    std::fprintf(stderr, "moe-train: %s\n", std::string(init.message()).c_str());
    return kExitRuntimeError;
  }
  const int rank = moe::comm::MpiEnv::world_rank();
  const int world = args.world_size > 0 ? args.world_size : moe::comm::MpiEnv::world_size();
  if (args.help || !args.errors.empty()) {
    if (rank == 0) {
      for (const auto& e : args.errors) std::fprintf(stderr, "moe-train: %s\n", e.c_str());
      std::fprintf(stderr, "%s", kUsage);
    }
    return Finish(args.help ? 0 : kExitUsage);
  }
  auto stop = [&](const std::string& message) {
    if (!message.empty()) std::fprintf(stderr, "moe-train: %s\n", message.c_str());
    return Finish(kExitUsage);
  };

  // Step 1: every rank resolves the config; a bad one on any rank stops all of
  // them with exit code 2 before any allocation (the lowest failing rank's
  // reasons are printed once, by rank 0); then the ranks agree on it.
  absl::StatusOr<moe::JobConfig> config = moe::ResolveJobConfig(args.config, args.overrides, world);
  std::string problem = config.ok() ? "" : std::string(config.status().message());
  absl::StatusOr<std::string> verdict = GatherProblems(problem);
  if (!verdict.ok()) return stop(std::string(verdict.status().message()));
  if (!verdict->empty()) return stop(rank == 0 ? *verdict : "");
  if (absl::Status agree = AgreeOnConfig(*config); !agree.ok()) {
    return stop(rank == 0 ? std::string(agree.message()) : "");
  }
  // A dataset's tokenizer (PREFIX.tokenizer from moe-preprocess) must fit in
  // model.vocab_size: a config error, so exit 2 on every rank.
  if (config->data().format() == "megatron" && !config->data().train_path().empty()) {
    for (const std::string& path : {config->data().train_path(), config->data().valid_path()}) {
      if (path.empty()) continue;
      absl::Status vocab = moe::data::CheckVocabAgainstTokenizer(moe::data::IndexedDatasetPrefix(path),
                                                                 config->model().vocab_size());
      if (!vocab.ok()) {
        if (rank == 0) std::fprintf(stderr, "moe-train: %s\n", std::string(vocab.message()).c_str());
        return Finish(kExitUsage);
      }
    }
  }
  // The communicator wrapper's variables (comm/comm_wrapper.h) are usage too.
  if (absl::Status wrap = moe::comm::WrapperOptionsFromEnv().status(); !wrap.ok()) {
    if (rank == 0) std::fprintf(stderr, "moe-train: %s\n", std::string(wrap.message()).c_str());
    return Finish(kExitUsage);
  }
  // So are the attention path's (runtime/core/attention_gemm.h).
  if (absl::Status attn = moe::attn::AttentionSettingsFromEnv().status(); !attn.ok()) {
    if (rank == 0) std::fprintf(stderr, "moe-train: %s\n", std::string(attn.message()).c_str());
    return Finish(kExitUsage);
  }
  const auto& p = config->parallel();
  absl::StatusOr<std::string> table = moe::parallel::FormatLayoutTable(world, p.tensor(), p.expert());
  if (!table.ok()) return stop(rank == 0 ? std::string(table.status().message()) : "");
  if (rank == 0) {
    std::printf("# resolved config (%s)\n%s\n%s", args.config.c_str(), moe::ConfigToText(*config).c_str(),
                table->c_str());
    std::fflush(stdout);
  }
  if (args.print_only) return Finish(0);
  // One line per node: where the launcher placed its ranks.
  if (moe::comm::MpiEnv::local_rank() == 0)
    MOE_LOG(INFO) << "node " << moe::comm::MpiEnv::node_id() << " of " << moe::comm::MpiEnv::num_nodes()
                  << ", local rank " << moe::comm::MpiEnv::local_rank() << " of "
                  << moe::comm::MpiEnv::local_size() << " (from " << moe::comm::MpiEnv::placement_source()
                  << ")";
  MOE_LOG_RANK0(INFO) << "attention path: "
                      << moe::attn::AttentionPathName(moe::attn::AttentionSettingsRef().path)
                      << " (MOE_ATTENTION), workspace bound "
                      << (moe::attn::AttentionSettingsRef().workspace_bytes >> 20) << " MiB";

  // Step 2: the device, memory, then (nothing is created before the job can
  // run) directories.
  for (auto check :
       {&DeviceProblem, +[](const moe::JobConfig&c, int) { return MemoryProblem(c); }, &DirectoryProblems}) {
    verdict = GatherProblems(check(*config, rank));
    if (!verdict.ok()) return stop(std::string(verdict.status().message()));
    if (!verdict->empty()) return stop(rank == 0 ? *verdict : "");
  }
  deadline.Disarm();

  absl::Status status = Train(*config);
  if (moe::IsJobWideError(status)) {
    // Every rank has this error (a data problem, agreed before the model is
    // built or before a step's first collective): each exits 1 by itself.
    MOE_LOG(ERROR) << "moe-train failed: " << status.message();
    return Finish(kExitRuntimeError);
  }
  if (!status.ok()) {
    // The other ranks may be waiting in a collective: stop them all.
    MOE_LOG(ERROR) << "moe-train failed: " << status.message();
    moe::comm::MpiEnv::Abort(kExitRuntimeError);
  }
  return Finish(0);
}
