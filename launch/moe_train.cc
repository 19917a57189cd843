// moe-train: the pretraining job. Launch it under mpirun (or launch/moe-launch):
//
//   mpirun -np 4 build/bin/moe-train --config=configs/demo.textproto train.steps=50
//
// Exit codes: 0 done, 1 runtime failure, 2 bad command line or config (every
// rank exits 2, before anything is allocated or written).
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "comm/comm_wrapper.h"
#include "comm/communicator.h"
#include "comm/mpi_env.h"
#include "data/indexed_dataset.h"
#include "data/spm_tokenizer.h"
#include "parallel/layout.h"
#include "parallel/process_groups.h"
#include "runtime/checkpoint_signal.h"
#include "runtime/core/logging.h"
#include "runtime/core/status.h"
#include "runtime/job_config.h"
#include "runtime/trainer.h"

namespace {

constexpr int kExitRuntimeError = 1;
constexpr int kExitUsage = 2;

constexpr char kUsage[] =
    "usage: moe-train --config=FILE [field.path=value ...]\n"
    "  --config=FILE     job config in protobuf text format (configs/demo.textproto)\n"
    "  field.path=value  override any scalar field, e.g. train.steps=20 parallel.expert=2\n"
    "  --print-config    print the resolved config and layout, then exit\n"
    "  --world-size=N    with --print-config: resolve for N ranks without starting\n"
    "                    them (moe-launch plans a restart's layout this way)\n";

struct Args {
  std::string config;
  std::vector<std::string> overrides;
  bool print_only = false;
  int world_size = 0;  // --world-size; 0 = the MPI world
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

// Builds the process groups and the trainer and trains. Any error here is a
// runtime failure of this rank; the caller stops the whole job.
absl::Status Train(const moe::JobConfig& config) {
  ASSIGN_OR_RETURN(moe::comm::CommOptions options,
                   moe::comm::CommOptionsFromConfig(config.comm(), config.train().device()));
  ASSIGN_OR_RETURN(auto world, moe::comm::CreateWorldCommunicator(options));
  ASSIGN_OR_RETURN(moe::parallel::ProcessGroups groups,
                   moe::parallel::CreateProcessGroups(std::move(world), config.parallel().tensor(),
                                                      config.parallel().expert()));
  ASSIGN_OR_RETURN(std::unique_ptr<moe::Trainer> trainer, moe::Trainer::Create(config, &groups));
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
  absl::Status init = moe::comm::MpiEnv::Init(&argc, &argv);
  if (!init.ok()) {
    std::fprintf(stderr, "moe-train: %s\n", std::string(init.message()).c_str());
    return kExitRuntimeError;
  }
  const int rank = moe::comm::MpiEnv::world_rank();
  Args args = ParseArgs(argc, argv);
  const int world = args.world_size > 0 ? args.world_size : moe::comm::MpiEnv::world_size();
  if (args.help || !args.errors.empty()) {
    if (rank == 0) {
      for (const auto& e : args.errors) std::fprintf(stderr, "moe-train: %s\n", e.c_str());
      std::fprintf(stderr, "%s", kUsage);
    }
    return Finish(args.help ? 0 : kExitUsage);
  }

  // Every rank resolves the same config; a bad one stops all of them with exit
  // code 2 before any allocation. Rank 0 alone prints the reasons.
  absl::StatusOr<moe::JobConfig> config = moe::ResolveJobConfig(args.config, args.overrides, world);
  if (!config.ok()) {
    if (rank == 0) std::fprintf(stderr, "moe-train: %s\n", std::string(config.status().message()).c_str());
    return Finish(kExitUsage);
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
  const auto& p = config->parallel();
  absl::StatusOr<std::string> table = moe::parallel::FormatLayoutTable(world, p.tensor(), p.expert());
  if (!table.ok()) {
    if (rank == 0) std::fprintf(stderr, "moe-train: %s\n", std::string(table.status().message()).c_str());
    return Finish(kExitUsage);
  }
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

  if (rank == 0) {
    std::error_code ec;
    std::filesystem::create_directories(config->train().run_dir(), ec);
    if (ec) {
      MOE_LOG(ERROR) << "cannot create train.run_dir '" << config->train().run_dir() << "': " << ec.message();
      moe::comm::MpiEnv::Abort(kExitRuntimeError);
    }
    std::string path = config->train().run_dir() + "/config.textproto";
    std::string tmp = path + ".tmp";
    {
      std::ofstream out(tmp);
      out << moe::ConfigToText(*config);
    }
    std::filesystem::rename(tmp, path, ec);
    MOE_LOG_RANK0(INFO) << "resolved config written to " << path;
  }
  absl::Status status = Train(*config);
  if (!status.ok()) {
    // The other ranks may be waiting in a collective: stop them all.
    MOE_LOG(ERROR) << "moe-train failed: " << status.message();
    moe::comm::MpiEnv::Abort(kExitRuntimeError);
  }
  return Finish(0);
}
