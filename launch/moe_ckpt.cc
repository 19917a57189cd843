// moe-ckpt: look into and check checkpoints (runtime/checkpoint.h) without MPI.
//
//   moe-ckpt inspect runs/x/ckpt/step_00000100     # step, layout, train state, files, tensors
//   moe-ckpt inspect runs/x/ckpt                   # the checkpoint `latest` points to
//   moe-ckpt verify runs/x/ckpt/step_00000100      # every shard's checksum, the master file
//   moe-ckpt verify runs/x/ckpt                    # every checkpoint under it
//   moe-ckpt export-hf runs/x/ckpt hf/x            # Hugging Face safetensors + config.json
//   moe-ckpt import-hf hf/x runs/y/ckpt            # back into a checkpoint (step_… + latest)
//
// Exit codes: 0 ok, 1 corrupt, invalid or not found (inspect, verify) or a
// failed write, 2 bad command line, or export-hf/import-hf input that does not
// check (a damaged or mismatched file, named in the message).
#include <sys/stat.h>

#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "comm/communicator.h"
#include "comm/mpi_env.h"
#include "parallel/layout.h"
#include "runtime/checkpoint.h"
#include "runtime/checkpoint_format.h"
#include "runtime/checkpoint_fs.h"
#include "runtime/checkpoint_hash.h"
#include "runtime/core/backend.h"
#include "runtime/core/status.h"
#include "runtime/hf_interop.h"

namespace {

constexpr int kExitOk = 0;
constexpr int kExitBad = 1;
constexpr int kExitUsage = 2;

constexpr char kUsage[] =
    "usage: moe-ckpt inspect [--config] DIR\n"
    "       moe-ckpt verify DIR\n"
    "       moe-ckpt export-hf [--dtype fp32|bf16] [--max-shard-size BYTES] [--train-state] DIR OUT_DIR\n"
    "       moe-ckpt import-hf HF_DIR OUT_CKPT_DIR\n"
    "       (also spelled `moe-ckpt export --format hf ...` and `moe-ckpt import [--format hf] ...`)\n"
    "  DIR      a checkpoint (step_NNNNNNNN/), or a checkpoint.dir: inspect then reads the one\n"
    "           `latest` names (else the newest), verify checks every checkpoint under it\n"
    "  inspect  step, layout, train state, files and tensors (global shapes, shards, bytes)\n"
    "  --config also print the resolved config the run saved\n"
    "  verify   read every shard and check its checksum, and the master file's tensors\n"
    "  export-hf  the checkpoint's model as Hugging Face safetensors (model.safetensors, or\n"
    "           model-0000i-of-0000N.safetensors + model.safetensors.index.json above the shard\n"
    "           size, default 5 GiB) and config.json of the matching family (mixtral, qwen2_moe,\n"
    "           deepseek_v3); --dtype fp32 (default) or bf16; --train-state also writes\n"
    "           moe_train_state.safetensors (optimizer state, train state, job config)\n"
    "  import-hf  such a directory back into a checkpoint under OUT_CKPT_DIR (new or empty):\n"
    "           step_<N>/ and latest, N = 0 or the exported step (with the train state)\n"
    "exit codes: 0 ok, 1 corrupt/invalid/not found or a failed write, 2 usage or bad\n"
    "           export-hf/import-hf input\n";

bool IsCheckpoint(const std::string& dir) {
  return moe::CheckpointFs::Default()->Exists(moe::JoinPath(dir, moe::kManifestFileName));
}

std::string Shape(const google::protobuf::RepeatedField<int64_t>& dims) {
  return absl::StrCat("[", absl::StrJoin(dims, ", "), "]");
}

std::string HumanBytes(int64_t n) {
  if (n >= (int64_t{1} << 30)) return absl::StrFormat("%.2f GiB", n / double(int64_t{1} << 30));
  if (n >= (int64_t{1} << 20)) return absl::StrFormat("%.2f MiB", n / double(int64_t{1} << 20));
  if (n >= 1024) return absl::StrFormat("%.2f KiB", n / 1024.0);
  return absl::StrCat(n, " B");
}

int64_t FileSize(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 ? static_cast<int64_t>(st.st_size) : -1;
}

// The checkpoint `inspect` shows for DIR.
bool ResolveOne(const std::string& dir, std::string* out) {
  if (IsCheckpoint(dir)) {
    *out = dir;
    return true;
  }
  moe::CheckpointFs* fs = moe::CheckpointFs::Default();
  const std::string latest = moe::JoinPath(dir, moe::kLatestFileName);
  if (fs->Exists(latest)) {
    absl::StatusOr<std::string> name = fs->ReadFile(latest);
    if (name.ok()) {
      std::string n(absl::StripAsciiWhitespace(*name));
      if (IsCheckpoint(moe::JoinPath(dir, n))) {
        *out = moe::JoinPath(dir, n);
        return true;
      }
    }
  }
  absl::StatusOr<std::vector<std::pair<int64_t, std::string>>> list = moe::ListCheckpoints(dir);
  if (list.ok() && !list->empty()) {
    *out = list->front().second;
    return true;
  }
  return false;
}

int Inspect(const std::string& arg, bool show_config) {
  std::string dir;
  if (!ResolveOne(arg, &dir)) {
    std::fprintf(stderr, "moe-ckpt: %s is neither a checkpoint nor a directory of checkpoints\n",
                 arg.c_str());
    return kExitBad;
  }
  absl::StatusOr<moe::ckpt::Manifest> m = moe::ReadManifest(dir);
  if (!m.ok()) {
    std::fprintf(stderr, "moe-ckpt: %s\n", std::string(m.status().message()).c_str());
    return kExitBad;
  }
  const moe::ckpt::TrainState& t = m->train();
  const moe::ckpt::Layout& l = m->layout();
  std::printf("checkpoint   %s\n", dir.c_str());
  std::printf("format       %s (checksums %s)\n", m->created_by().c_str(), m->checksum_algorithm().c_str());
  std::printf("step         %lld\n", static_cast<long long>(m->step()));
  std::printf("layout       world %d  tp %d  dp %d  ep %d  edp %d\n", l.world(), l.tp(), l.dp(), l.ep(),
              l.edp());
  std::printf("train        consumed_samples %lld  lr_step %lld  sampler_state [%s]\n",
              static_cast<long long>(t.consumed_samples()), static_cast<long long>(t.lr_step()),
              absl::StrJoin(t.sampler_state(), ", ").c_str());
  for (const moe::ckpt::RngState& r : t.rng()) {
    std::printf("rng          %s seed %llu counter %llu\n", r.name().c_str(),
                static_cast<unsigned long long>(r.seed()), static_cast<unsigned long long>(r.counter()));
  }
  for (const auto& [k, v] : t.int_values())
    std::printf("value        %s = %lld\n", k.c_str(), static_cast<long long>(v));
  for (const auto& [k, v] : t.double_values()) std::printf("value        %s = %.17g\n", k.c_str(), v);
  int64_t on_disk = 0;
  std::printf("files        %d\n", m->files_size() + 1);
  for (const std::string& f : m->files()) {
    const int64_t n = FileSize(moe::JoinPath(dir, f));
    on_disk += std::max<int64_t>(n, 0);
    std::printf("  %-20s %s\n", f.c_str(), n < 0 ? "MISSING" : HumanBytes(n).c_str());
  }
  std::printf("tensors      %d (%s of f32 data, %s on disk)\n", m->tensors_size(),
              HumanBytes(m->total_bytes()).c_str(), HumanBytes(on_disk).c_str());
  for (const moe::ckpt::TensorEntry& e : m->tensors()) {
    int64_t bytes = 0;
    for (const moe::ckpt::Shard& s : e.shards()) bytes += s.nbytes();
    std::printf("  %-60s %-4s %-20s %3d shard(s) %s\n", e.name().c_str(), e.dtype().c_str(),
                Shape(e.global_shape()).c_str(), e.shards_size(), HumanBytes(bytes).c_str());
  }
  if (show_config) std::printf("config\n%s\n", m->config_text().c_str());
  return kExitOk;
}

int VerifyOne(const std::string& dir) {
  moe::VerifyReport report;
  absl::Status s = moe::VerifyCheckpoint(dir, &report);
  if (s.ok()) {
    std::printf("OK       %s: %lld tensors, %lld shards, %s, checksums match\n", dir.c_str(),
                static_cast<long long>(report.tensors), static_cast<long long>(report.shards),
                HumanBytes(report.bytes).c_str());
    return kExitOk;
  }
  if (report.errors.empty()) report.errors.push_back(std::string(s.message()));
  std::printf("CORRUPT  %s: %zu problem(s)\n", dir.c_str(), report.errors.size());
  for (const std::string& e : report.errors) std::printf("  %s\n", e.c_str());
  return kExitBad;
}

int Verify(const std::string& arg) {
  if (IsCheckpoint(arg)) return VerifyOne(arg);
  std::error_code ec;
  if (std::filesystem::exists(arg, ec) && !std::filesystem::is_directory(arg, ec)) {
    // A usage error (a log or a single file given by mistake), not damage.
    std::fprintf(stderr,
                 "moe-ckpt: %s is not a checkpoint directory (a plain file); give a step_NNNNNNNN "
                 "directory or a checkpoint.dir\n",
                 arg.c_str());
    return kExitUsage;
  }
  absl::StatusOr<std::vector<std::pair<int64_t, std::string>>> list = moe::ListCheckpoints(arg);
  if (!list.ok() || list->empty()) {
    if (moe::CheckpointFs::Default()->Exists(arg)) return VerifyOne(arg);  // says what is missing
    std::fprintf(stderr, "moe-ckpt: %s is neither a checkpoint nor a directory of checkpoints\n",
                 arg.c_str());
    return kExitBad;
  }
  int rc = kExitOk;
  for (const auto& [step, path] : *list) {
    if (VerifyOne(path) != kExitOk) rc = kExitBad;
  }
  return rc;
}

std::string Problem(const absl::Status& s) { return std::string(s.message()); }

int ExportHfCommand(const std::string& arg, const std::string& out, const moe::HfExportOptions& options) {
  std::string dir;
  if (!ResolveOne(arg, &dir)) {
    std::fprintf(stderr, "moe-ckpt: %s is neither a checkpoint nor a directory of checkpoints\n",
                 arg.c_str());
    return kExitUsage;
  }
  absl::StatusOr<moe::HfExportReport> r = moe::ExportHf(dir, out, options);
  if (!r.ok()) {
    std::fprintf(stderr, "moe-ckpt export-hf: %s\n", Problem(r.status()).c_str());
    return r.status().code() == absl::StatusCode::kUnavailable ? kExitBad : kExitUsage;
  }
  std::printf("exported %s to %s: %s, %lld tensors, %s (%s), files %s\n", dir.c_str(), out.c_str(),
              moe::HfFamilyName(r->family), static_cast<long long>(r->tensors), HumanBytes(r->bytes).c_str(),
              options.dtype.c_str(), absl::StrJoin(r->files, " ").c_str());
  return kExitOk;
}

// Writes the imported tensors as a one-rank checkpoint with the checkpointer
// itself (temporary directory, fsync, rename, `latest`): a failure leaves no
// checkpoint behind.
absl::Status WriteCheckpoint(const moe::HfImported& im, const std::string& out) {
  moe::comm::CommOptions options;
  options.backend = "mpi";
  ASSIGN_OR_RETURN(std::unique_ptr<moe::comm::Communicator> world,
                   moe::comm::CreateWorldCommunicator(options));
  if (world->size() != 1)
    return absl::FailedPreconditionError("moe-ckpt import-hf runs as one process (no mpirun)");
  ASSIGN_OR_RETURN(moe::parallel::RankLayout layout, moe::parallel::ComputeLayout(1, 1, 1, 0));
  moe::CheckpointOptions copt;
  copt.dir = out;
  ASSIGN_OR_RETURN(std::unique_ptr<moe::Checkpointer> ckpt, moe::Checkpointer::Create(*world, layout, copt));
  ASSIGN_OR_RETURN(moe::Backend * backend, moe::GetBackend(moe::Device::Cpu()));
  std::vector<moe::ShardedTensor> tensors;
  for (size_t i = 0; i < im.shapes.size(); ++i) {
    moe::ShardedTensor t;
    t.name = im.shapes[i].name;
    t.global_shape = moe::Shape(im.shapes[i].shape);
    ASSIGN_OR_RETURN(
        t.tensor, moe::Tensor::FromHost(*backend, t.global_shape, moe::DType::kF32, im.data[i].data(),
                                        im.data[i].size() * sizeof(float), moe::MemoryCategory::kParameters));
    tensors.push_back(std::move(t));
  }
  return ckpt->Save(im.state, tensors, im.config_text);
}

int ImportHfCommand(const std::string& hf_dir, const std::string& out) {
  std::error_code ec;
  if (std::filesystem::exists(out, ec) &&
      !(std::filesystem::is_directory(out, ec) && std::filesystem::is_empty(out, ec))) {
    std::fprintf(stderr, "moe-ckpt import-hf: %s exists and is not an empty directory; give a new one\n",
                 out.c_str());
    return kExitUsage;
  }
  // Everything is read and checked before anything is written.
  absl::StatusOr<moe::HfImported> im = moe::ReadHf(hf_dir);
  if (!im.ok()) {
    std::fprintf(stderr, "moe-ckpt import-hf: %s\n", Problem(im.status()).c_str());
    return kExitUsage;
  }
  int argc = 0;
  char** argv = nullptr;
  absl::Status s = moe::comm::MpiEnv::Init(&argc, &argv);
  if (s.ok()) s = WriteCheckpoint(*im, out);
  moe::comm::MpiEnv::Finalize();
  if (!s.ok()) {
    std::fprintf(stderr, "moe-ckpt import-hf: writing %s: %s\n", out.c_str(), Problem(s).c_str());
    return kExitBad;
  }
  int64_t n = 0;
  for (const std::vector<float>& d : im->data) n += static_cast<int64_t>(d.size());
  std::printf("imported %s (%s, %s) into %s: step %lld, %zu tensors, %s%s\n", hf_dir.c_str(),
              moe::HfFamilyName(im->family), absl::StrJoin(im->files, " ").c_str(),
              moe::JoinPath(out, moe::StepDirName(im->state.step)).c_str(),
              static_cast<long long>(im->state.step), im->shapes.size(), HumanBytes(n * 4).c_str(),
              im->with_train_state ? ", with the optimizer and train state"
                                   : " (weights, and a fresh optimizer state: zeros at step 0)");
  return kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args;
  for (int i = 1; i < argc; ++i) {  // "--dtype bf16" as "--dtype=bf16"
    const std::string a = argv[i];
    if ((a == "--dtype" || a == "--max-shard-size" || a == "--format") && i + 1 < argc) {
      args.push_back(a + "=" + argv[++i]);
    } else {
      args.push_back(a);
    }
  }
  if (args.empty() || args[0] == "--help" || args[0] == "-h") {
    std::fputs(kUsage, args.empty() ? stderr : stdout);
    return args.empty() ? kExitUsage : kExitOk;
  }
  // `export --format hf` and `import [--format hf]` are the same commands as
  // export-hf and import-hf (Hugging Face is the one foreign format).
  if (args[0] == "export" || args[0] == "import") {
    std::string format = args[0] == "import" ? "hf" : "";
    for (auto it = args.begin() + 1; it != args.end();) {
      if (absl::StartsWith(*it, "--format=")) {
        format = it->substr(9);
        it = args.erase(it);
      } else {
        ++it;
      }
    }
    if (format != "hf") {
      std::fprintf(stderr, "moe-ckpt %s: --format=%s: the one format is hf (Hugging Face safetensors)\n",
                   args[0].c_str(), format.empty() ? "(missing)" : format.c_str());
      return kExitUsage;
    }
    args[0] += "-hf";
  }
  const std::string command = args[0];
  bool show_config = false;
  moe::HfExportOptions hf;
  std::vector<std::string> rest;
  for (size_t i = 1; i < args.size(); ++i) {
    if (args[i] == "--config" && command == "inspect") {
      show_config = true;
    } else if (args[i] == "--train-state" && command == "export-hf") {
      hf.train_state = true;
    } else if (absl::StartsWith(args[i], "--dtype=") && command == "export-hf") {
      const std::string v = args[i].substr(8);
      if (v != "fp32" && v != "bf16") {
        std::fprintf(stderr, "moe-ckpt: --dtype=%s: use fp32 or bf16\n", v.c_str());
        return kExitUsage;
      }
      hf.dtype = v == "fp32" ? "F32" : "BF16";
    } else if (absl::StartsWith(args[i], "--max-shard-size=") && command == "export-hf") {
      uint64_t v = 0;
      if (!absl::SimpleAtoi(args[i].substr(17), &v) || v == 0) {
        std::fprintf(stderr, "moe-ckpt: %s: give a positive number of bytes\n", args[i].c_str());
        return kExitUsage;
      }
      hf.max_shard_bytes = v;
    } else if (!args[i].empty() && args[i][0] == '-') {
      std::fprintf(stderr, "moe-ckpt: unknown option %s\n%s", args[i].c_str(), kUsage);
      return kExitUsage;
    } else {
      rest.push_back(args[i]);
    }
  }
  if (command == "export-hf" || command == "import-hf") {
    if (rest.size() != 2) {
      std::fprintf(stderr, "%s", kUsage);
      return kExitUsage;
    }
    return command == "export-hf" ? ExportHfCommand(rest[0], rest[1], hf) : ImportHfCommand(rest[0], rest[1]);
  }
  if ((command != "inspect" && command != "verify") || rest.size() != 1) {
    std::fprintf(stderr, "%s", kUsage);
    return kExitUsage;
  }
  return command == "inspect" ? Inspect(rest[0], show_config) : Verify(rest[0]);
}
