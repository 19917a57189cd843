// Multi-rank checkpoint tests (run at 1, 2 and 4 ranks): round trips between
// every (tp, ep, dp) layout of every world size up to the job's, ZeRO-1 on and
// off; canonical names in model.h5 (h5dump, h5py); crash safety with injected
// faults; corruption, truncation and newer-version refusals; keep_last;
// resume=auto passing over a corrupt newest; async saves; the stop signal.
#include <hdf5.h>
#include <signal.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <set>

#include "checkpoint_test_util.h"
#include "parallel/layout.h"
#include "runtime/checkpoint_format.h"
#include "runtime/checkpoint_signal.h"
#include "runtime/core/config.pb.h"
#include "runtime/core/status.h"

namespace moe {
namespace {

using testing::BuildModel;
using testing::CountMismatches;
using testing::FillModel;
using testing::FlipByte;
using testing::GroupsOver;
using testing::MakeCheckpointer;
using testing::SharedTempDir;
using testing::SynthModel;
using testing::World;
using testing::WorldBarrier;

struct LayoutCase {
  int world, tp, ep;
  std::string Name() const { return absl::StrCat("(world ", world, ", tp ", tp, ", ep ", ep, ")"); }
};

// Every valid (tp, ep) of every world size 1, 2, 4 up to the job's; E = 4.
std::vector<LayoutCase> AllLayouts() {
  std::vector<LayoutCase> out;
  for (int w : {1, 2, 4}) {
    if (w > World().size()) continue;
    for (int tp = 1; tp <= w; tp *= 2) {
      for (int ep = 1; ep <= w / tp; ep *= 2) out.push_back({w, tp, ep});
    }
  }
  return out;
}

// Saves the model of `layout` (ZeRO-1 per `zero`) filled with `salt` as step
// `step` under `dir`. Collective over World().
void SaveAt(const LayoutCase& layout, bool zero, const std::string& dir, int64_t step, int salt) {
  parallel::ProcessGroups g = GroupsOver(layout.world, layout.tp, layout.ep);
  if (g.world) {
    SynthModel m;
    BuildModel(m, g, zero);
    FillModel(m, salt);
    auto ckpt = MakeCheckpointer(g, dir);
    absl::Status s = ckpt->Save(testing::SampleTrainState(step), m.Tensors(), "model { num_layers: 1 }");
    INFO(s.ToString());
    REQUIRE(s.ok());
  }
  WorldBarrier();
}

// Loads `path` into the model of `layout` and checks every element.
void LoadAndCheck(const LayoutCase& layout, bool zero, const std::string& path, int salt, int64_t step) {
  parallel::ProcessGroups g = GroupsOver(layout.world, layout.tp, layout.ep);
  if (g.world) {
    SynthModel m;
    BuildModel(m, g, zero);
    const float sentinel = -12345.0f;
    FillModel(m, 0, &sentinel);
    auto ckpt = MakeCheckpointer(g, "");
    absl::StatusOr<LoadedCheckpoint> loaded = ckpt->Load(path, m.Tensors());
    INFO("load at " << layout.Name() << " zero " << zero << ": " << loaded.status().ToString());
    REQUIRE(loaded.ok());
    CHECK(CountMismatches(m, salt) == 0);
    CHECK(loaded->state == testing::SampleTrainState(step));
    CHECK(loaded->config_text == "model { num_layers: 1 }");
  }
  WorldBarrier();
}

TEST_CASE("a checkpoint saved at any layout loads exactly at any other") {
  const std::string root = SharedTempDir("layouts");
  const std::vector<LayoutCase> layouts = AllLayouts();
  int k = 0;
  for (const LayoutCase& a : layouts) {
    for (bool zero_a : {false, true}) {
      ++k;
      const std::string dir = absl::StrCat(root, "/save", k);
      SaveAt(a, zero_a, dir, k, k);
      const std::string path = JoinPath(dir, StepDirName(k));
      if (World().rank() == 0) {
        // Each distinct shard written once; replicas' writes spread over ranks.
        ckpt::Manifest m = ReadManifest(path).value();
        REQUIRE(ValidateManifest(m, path).ok());
        CHECK(m.layout().world() == a.world);
        CHECK(m.layout().tp() == a.tp);
        CHECK(m.layout().ep() == a.ep);
        std::set<int> writers;
        int64_t bytes_in_files = 0;
        for (const auto& t : m.tensors()) {
          for (const auto& s : t.shards()) writers.insert(s.writer_rank());
        }
        for (const std::string& f : m.files()) {
          if (f != kMasterFileName) bytes_in_files += std::filesystem::file_size(JoinPath(path, f));
        }
        CHECK(static_cast<int>(writers.size()) == a.world);
        CHECK(bytes_in_files >= m.total_bytes());
        CHECK(bytes_in_files < m.total_bytes() + a.world * 64 * 1024);  // data once, plus HDF5 metadata
      }
      // Each (save layout, load layout) pair once, over the two ZeRO-1 settings
      // of the save (k alternates them); the load's ZeRO-1 setting varies too.
      for (size_t b = 0; b < layouts.size(); ++b) {
        if ((b + k) % 2 != 0) continue;
        const bool zero_b = (b / 2 + k) % 2 == 0;
        INFO("saved at " << a.Name() << " zero " << zero_a << ", loading at " << layouts[b].Name());
        LoadAndCheck(layouts[b], zero_b, path, k, k);
      }
    }
  }
  if (World().rank() == 0) std::filesystem::remove_all(root);
}

// Runs a command, returns (exit code, output).
std::pair<int, std::string> Run(const std::string& command) {
  std::string out;
  FILE* p = ::popen((command + " 2>&1").c_str(), "r");
  REQUIRE(p != nullptr);
  char buf[4096];
  while (size_t n = std::fread(buf, 1, sizeof(buf), p)) out.append(buf, n);
  const int status = ::pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

TEST_CASE("model.h5 shows every tensor by canonical name with its global shape") {
  const std::string root = SharedTempDir("h5dump");
  const LayoutCase layout{World().size(), World().size() >= 2 ? 2 : 1, 1};
  SaveAt(layout, /*zero=*/true, root, 3, 3);
  if (World().rank() == 0) {
    const std::string dir = JoinPath(root, StepDirName(3));
    const std::string master = JoinPath(dir, kMasterFileName);
    auto [rc, out] = Run(absl::StrCat("h5dump -H ", master));
    REQUIRE(rc == 0);
    const std::map<std::string, std::string> expected = {
        {"model.embed_tokens.weight", "( 16, 8 )"},
        {"model.layers.0.self_attn.o_proj.weight", "( 8, 8 )"},
        {"model.layers.0.mlp.experts.up_proj", "( 4, 12, 8 )"},
        {"model.layers.0.mlp.experts.down_proj", "( 4, 8, 12 )"},
        {"exp_avg_sq", ""},
        {"lm_head.weight", "( 16, 8 )"}};
    for (const auto& [name, shape] : expected) {
      INFO(name << " in\n" << out);
      const size_t at = out.find(absl::StrCat("DATASET \"", name, "\""));
      if (shape.empty()) {
        CHECK(out.find(absl::StrCat("GROUP \"", name, "\"")) != std::string::npos);
        continue;
      }
      REQUIRE(at != std::string::npos);
      CHECK(out.find(absl::StrCat("DATASPACE  SIMPLE { ", shape, " / ", shape, " }"), at) <
            out.find("}", at + 80));
      CHECK(out.find("H5T_IEEE_F32LE", at) != std::string::npos);
    }
    // h5py reads whole tensors through the virtual datasets, after the directory
    // moved (relative source names), equal to the function the ranks filled in.
    const std::string moved = root + "_moved";
    std::filesystem::rename(dir, moved);
    const std::string script = absl::StrCat(
        "import h5py, numpy as np, sys\n"
        "f = h5py.File('",
        moved, "/model.h5', 'r')\n", R"PY(
def value(name, idx, salt):
    h = 2166136261
    for c in name.encode():
        h = ((h ^ c) * 16777619) & 0xffffffff
    v = ((h % 97) * 16 + (idx % 1021) * 0.25 + salt * 0.125) * np.where((idx + salt) % 3 == 0, -1, 1)
    return v.astype(np.float32)
names = []
f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
for n in names:
    d = f[n][...]
    salt = 3
    if n.startswith('optimizer/exp_avg/'): salt = 4
    if n.startswith('optimizer/exp_avg_sq/'): salt = 5
    want = value(n, np.arange(d.size, dtype=np.int64), salt).reshape(d.shape)
    if d.dtype != np.float32 or not np.array_equal(d, want):
        print('MISMATCH', n, d.shape); sys.exit(1)
print('OK', len(names), f['model.layers.0.mlp.experts.up_proj'].shape)
)PY");
    std::ofstream(root + "/check.py") << script;
    auto [prc, pout] = Run(absl::StrCat("/usr/bin/python3 ", root, "/check.py"));
    INFO(pout);
    CHECK(prc == 0);
    CHECK(pout.find("OK 30 (4, 12, 8)") != std::string::npos);
    std::filesystem::remove_all(moved);
  }
  WorldBarrier();
}

// The (file, dataset) holding `tensor`'s first shard, and that shard's offset in the file.
struct ShardLocation {
  std::string file;
  uint64_t offset = 0;
};
ShardLocation LocateShard(const std::string& dir, const std::string& tensor, int shard = 0) {
  ckpt::Manifest m = ReadManifest(dir).value();
  for (const auto& t : m.tensors()) {
    if (t.name() != tensor) continue;
    const ckpt::Shard& s = t.shards(shard);
    const std::string path = JoinPath(dir, s.file());
    hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
    hid_t d = H5Dopen2(f, s.dataset().c_str(), H5P_DEFAULT);
    const haddr_t off = H5Dget_offset(d);
    H5Dclose(d);
    H5Fclose(f);
    return {path, static_cast<uint64_t>(off)};
  }
  FAIL("no tensor " << tensor);
  return {};
}

TEST_CASE("a killed save leaves the previous checkpoint loadable") {
  const std::string root = SharedTempDir("killed");
  const int n = World().size();
  parallel::ProcessGroups g = GroupsOver(n, 1, n >= 2 ? 2 : 1);
  SynthModel m;
  BuildModel(m, g, /*zero=*/true);
  FaultInjectionFs faulty(CheckpointFs::Default());
  CheckpointOptions o;
  o.fs = &faulty;
  auto ckpt = MakeCheckpointer(g, root, o);
  FillModel(m, 1);
  REQUIRE(ckpt->Save(testing::SampleTrainState(1), m.Tensors(), "").ok());

  // Killed between the shard writes and the rename (on rank 0, which renames),
  // or in the middle of the shard writes (on the last rank).
  struct Fault {
    int rank;
    FsOp op;
    int skip;
  };
  for (const Fault& fault :
       {Fault{0, FsOp::kRename, 0}, Fault{n - 1, FsOp::kWrite, 1}, Fault{0, FsOp::kWriteFile, 0}}) {
    INFO("fault: " << FsOpName(fault.op) << " on rank " << fault.rank);
    faulty.Reset();
    if (g.layout.rank == fault.rank) faulty.FailOn(fault.op, fault.skip, /*crash=*/true);
    FillModel(m, 2);
    absl::Status s = ckpt->Save(testing::SampleTrainState(2), m.Tensors(), "");
    REQUIRE(!s.ok());
    CHECK_THAT(std::string(s.message()), Catch::Contains("injected fault"));
    if (g.layout.rank == 0) {
      auto list = ListCheckpoints(root).value();
      REQUIRE(list.size() == 1);
      CHECK(list[0].first == 1);
      CHECK(CheckpointFs::Default()->ReadFile(JoinPath(root, kLatestFileName)).value() == "step_00000001\n");
    }
    faulty.Reset();
    const float sentinel = -1.0f;
    FillModel(m, 0, &sentinel);
    auto resumed = ckpt->Resume("auto", m.Tensors());
    INFO(resumed.status().ToString());
    REQUIRE(resumed.ok());
    REQUIRE(resumed->has_value());
    CHECK((*resumed)->state.step == 1);
    CHECK((*resumed)->skipped.empty());
    CHECK(CountMismatches(m, 1) == 0);
  }
  // The next save clears the leftovers of the crashed ones.
  FillModel(m, 3);
  REQUIRE(ckpt->Save(testing::SampleTrainState(3), m.Tensors(), "").ok());
  if (g.layout.rank == 0) {
    for (const auto& e : std::filesystem::directory_iterator(root)) {
      CHECK(e.path().filename().string().find(".tmp-") == std::string::npos);
    }
  }
  WorldBarrier();
  if (World().rank() == 0) std::filesystem::remove_all(root);
}

TEST_CASE("corruption, truncation and a newer format are refused with names") {
  const std::string root = SharedTempDir("corrupt");
  const int n = World().size();
  parallel::ProcessGroups g = GroupsOver(n, n >= 2 ? 2 : 1, 1);
  SynthModel m;
  BuildModel(m, g, /*zero=*/false);
  auto ckpt = MakeCheckpointer(g, root);
  for (int64_t step : {10, 20}) {
    FillModel(m, static_cast<int>(step));
    REQUIRE(ckpt->Save(testing::SampleTrainState(step), m.Tensors(), "").ok());
  }
  const std::string newest = JoinPath(root, StepDirName(20));
  const std::string tensor = "model.layers.0.mlp.experts.down_proj";
  ShardLocation where;
  if (World().rank() == 0) {
    where = LocateShard(newest, tensor, /*shard=*/0);
    FlipByte(where.file, where.offset + 17);
    VerifyReport report;
    absl::Status v = VerifyCheckpoint(newest, &report);
    CHECK(v.code() == absl::StatusCode::kDataLoss);
    CHECK_THAT(std::string(v.message()),
               Catch::Contains(std::filesystem::path(where.file).filename().string()) &&
                   Catch::Contains(tensor) && Catch::Contains("checksum mismatch"));
    CHECK(VerifyCheckpoint(JoinPath(root, StepDirName(10)), &report).ok());
  }
  WorldBarrier();
  // Load refuses it on every rank with the same message.
  absl::StatusOr<LoadedCheckpoint> bad = ckpt->Load(newest, m.Tensors());
  REQUIRE(!bad.ok());
  CHECK(bad.status().code() == absl::StatusCode::kDataLoss);
  CHECK_THAT(std::string(bad.status().message()),
             Catch::Contains(tensor) && Catch::Contains("rank_0") && Catch::Contains("checksum mismatch"));
  // resume=auto passes over it to step 10 and says why.
  auto resumed = ckpt->Resume("auto", m.Tensors());
  REQUIRE(resumed.ok());
  REQUIRE(resumed->has_value());
  CHECK((*resumed)->state.step == 10);
  REQUIRE((*resumed)->skipped.size() == 1);
  CHECK_THAT((*resumed)->skipped[0],
             Catch::StartsWith("step_00000020: ") && Catch::Contains("checksum mismatch"));
  CHECK(CountMismatches(m, 10) == 0);

  // A truncated rank file (of a checkpoint that is otherwise intact).
  REQUIRE(ckpt->Save(testing::SampleTrainState(25), m.Tensors(), "").ok());
  const std::string truncated = JoinPath(root, StepDirName(25));
  if (World().rank() == 0) {
    const std::string victim = JoinPath(truncated, RankFileName(n - 1));
    std::filesystem::resize_file(victim, std::filesystem::file_size(victim) / 2);
  }
  WorldBarrier();
  bad = ckpt->Load(truncated, m.Tensors());
  REQUIRE(!bad.ok());
  CHECK(bad.status().code() == absl::StatusCode::kDataLoss);
  CHECK_THAT(std::string(bad.status().message()),
             Catch::Contains(RankFileName(n - 1)) && Catch::Contains("truncated"));

  // A manifest of a newer format version.
  const std::string older = JoinPath(root, StepDirName(10));
  if (World().rank() == 0) {
    const std::string path = JoinPath(older, kManifestFileName);
    ckpt::ManifestFile file;
    REQUIRE(file.ParseFromString(CheckpointFs::Default()->ReadFile(path).value()));
    file.set_format_version(kCheckpointFormatVersion + 1);
    REQUIRE(CheckpointFs::Default()->WriteFile(path, file.SerializeAsString()).ok());
  }
  WorldBarrier();
  bad = ckpt->Load(older, m.Tensors());
  REQUIRE(!bad.ok());
  CHECK(bad.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(bad.status().message()), Catch::Contains("format version 2, newer than version 1"));
  // Nothing valid is left: resume=auto fails and lists both.
  auto none = ckpt->Resume("auto", m.Tensors());
  REQUIRE(!none.ok());
  CHECK_THAT(std::string(none.status().message()), Catch::Contains("step_00000025") &&
                                                       Catch::Contains("step_00000020") &&
                                                       Catch::Contains("step_00000010"));
  // A model that does not match the checkpoint.
  SynthModel other;
  BuildModel(other, g, false, /*scale=*/2);
  FillModel(m, 20);
  REQUIRE(ckpt->Save(testing::SampleTrainState(30), m.Tensors(), "").ok());
  bad = ckpt->Load(JoinPath(root, StepDirName(30)), other.Tensors());
  REQUIRE(!bad.ok());
  CHECK_THAT(std::string(bad.status().message()),
             Catch::Contains("global shape [16,8], the model's is [32,16]"));
  WorldBarrier();
  if (World().rank() == 0) std::filesystem::remove_all(root);
}

TEST_CASE("keep_last, latest, saving a step again, resume none and PATH") {
  const std::string root = SharedTempDir("keep");
  const int n = World().size();
  parallel::ProcessGroups g = GroupsOver(n, 1, n);
  SynthModel m;
  BuildModel(m, g, /*zero=*/true);
  CheckpointOptions o;
  o.keep_last = 2;
  auto ckpt = MakeCheckpointer(g, root, o);
  for (int64_t step = 1; step <= 4; ++step) {
    FillModel(m, static_cast<int>(step));
    REQUIRE(ckpt->Save(testing::SampleTrainState(step), m.Tensors(), "").ok());
  }
  FillModel(m, 44);  // step 4 again, other values: replaces it
  REQUIRE(ckpt->Save(testing::SampleTrainState(4), m.Tensors(), "").ok());
  if (World().rank() == 0) {
    auto list = ListCheckpoints(root).value();
    REQUIRE(list.size() == 2);
    CHECK(list[0].first == 4);
    CHECK(list[1].first == 3);
    CHECK(CheckpointFs::Default()->ReadFile(JoinPath(root, kLatestFileName)).value() == "step_00000004\n");
  }
  const float sentinel = 0.0f;
  FillModel(m, 0, &sentinel);
  auto none = ckpt->Resume("none", m.Tensors());
  REQUIRE(none.ok());
  CHECK(!none->has_value());
  auto by_path = ckpt->Resume(JoinPath(root, StepDirName(3)), m.Tensors());
  REQUIRE(by_path.ok());
  REQUIRE(by_path->has_value());
  CHECK(CountMismatches(m, 3) == 0);
  auto by_root = ckpt->Resume(root, m.Tensors());
  REQUIRE(by_root.ok());
  REQUIRE(by_root->has_value());
  CHECK((*by_root)->state.step == 4);
  CHECK(CountMismatches(m, 44) == 0);
  auto empty = MakeCheckpointer(g, root + "/nothing_here");
  auto fresh = empty->Resume("auto", m.Tensors());
  REQUIRE(fresh.ok());
  CHECK(!fresh->has_value());
  WorldBarrier();
  if (World().rank() == 0) std::filesystem::remove_all(root);
}

TEST_CASE("an async save writes the state as it was when Save returned") {
  const std::string root = SharedTempDir("async");
  const int n = World().size();
  parallel::ProcessGroups g = GroupsOver(n, n >= 2 ? 2 : 1, 1);
  SynthModel m;
  BuildModel(m, g, /*zero=*/true);
  CheckpointOptions o;
  o.async = true;
  auto ckpt = MakeCheckpointer(g, root, o);
  FillModel(m, 5);
  REQUIRE(ckpt->Save(testing::SampleTrainState(5), m.Tensors(), "").ok());
  FillModel(m, 6);  // training goes on while the save runs
  REQUIRE(ckpt->Save(testing::SampleTrainState(6), m.Tensors(), "").ok());  // waits for step 5
  FillModel(m, 7);
  REQUIRE(ckpt->WaitForPendingSave().ok());
  for (int step : {5, 6}) {
    auto loaded = ckpt->Load(JoinPath(root, StepDirName(step)), m.Tensors());
    REQUIRE(loaded.ok());
    CHECK(CountMismatches(m, step) == 0);
  }
  // An async save that fails reports it at the next call, on every rank.
  FaultInjectionFs faulty(CheckpointFs::Default());
  o.fs = &faulty;
  auto failing = MakeCheckpointer(g, root, o);
  if (g.layout.rank == 0) faulty.FailOn(FsOp::kSyncDir, 0, false);
  REQUIRE(failing->Save(testing::SampleTrainState(8), m.Tensors(), "").ok());
  absl::Status s = failing->WaitForPendingSave();
  CHECK_THAT(std::string(s.message()), Catch::Contains("injected fault: sync_dir"));
  WorldBarrier();
  if (World().rank() == 0) std::filesystem::remove_all(root);
}

// The bytes of `dataset` of HDF5 file `path` as stored (contiguous data).
std::string DatasetBytes(const std::string& path, const std::string& dataset, int64_t nbytes) {
  hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  REQUIRE(f >= 0);
  hid_t d = H5Dopen2(f, dataset.c_str(), H5P_DEFAULT);
  REQUIRE(d >= 0);
  const haddr_t offset = H5Dget_offset(d);
  H5Dclose(d);
  H5Fclose(f);
  REQUIRE(offset != HADDR_UNDEF);
  std::string bytes(static_cast<size_t>(nbytes), '\0');
  std::ifstream in(path, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(offset));
  in.read(bytes.data(), nbytes);
  REQUIRE(in.gcount() == nbytes);
  return bytes;
}

// CheckpointOptions::stage_host_tensors runs the device path on CPU tensors:
// every shard through a host bucket smaller than most of them (4100 bytes:
// 1025 floats, so the chunks cut rows at odd places).
TEST_CASE("tensors staged through a small host bucket save the same files and load exactly") {
  constexpr int64_t kBucket = 4100;
  const std::string root = SharedTempDir("bucket");
  const int n = World().size();
  const LayoutCase save_at{n, n >= 2 ? 2 : 1, 1};
  const std::string text = "model { num_layers: 1 }";
  CheckpointOptions staged;
  staged.host_bucket_bytes = kBucket;
  staged.stage_host_tensors = true;
  // Scale 4: the experts' [4, 48, 32] tensors are 24 KiB, embed 8 KiB.
  {
    parallel::ProcessGroups g = GroupsOver(save_at.world, save_at.tp, save_at.ep);
    SynthModel m;
    BuildModel(m, g, /*zero=*/true, /*scale=*/4);
    FillModel(m, 3);
    auto plain = MakeCheckpointer(g, root + "/plain");
    REQUIRE(plain->Save(testing::SampleTrainState(3), m.Tensors(), text).ok());
    CHECK(plain->last_peak_host_staging_bytes() == 0);  // host tensors: written in place
    auto bucketed = MakeCheckpointer(g, root + "/staged", staged);
    REQUIRE(bucketed->Save(testing::SampleTrainState(3), m.Tensors(), text).ok());
    const int64_t peak = bucketed->last_peak_host_staging_bytes();
    UNSCOPED_INFO("rank " << g.layout.rank << ": sync save peak host staging " << peak << " bytes, bucket "
                          << kBucket);
    CHECK(peak > 0);
    CHECK(peak <= kBucket);
  }
  WorldBarrier();
  const std::string plain_path = JoinPath(root + "/plain", StepDirName(3));
  const std::string staged_path = JoinPath(root + "/staged", StepDirName(3));
  if (World().rank() == 0) {
    // The same plan, checksums and data bytes in every rank file.
    ckpt::Manifest a = ReadManifest(plain_path).value(), b = ReadManifest(staged_path).value();
    REQUIRE(a.tensors_size() == b.tensors_size());
    int64_t largest = 0, chunked = 0;
    for (int t = 0; t < a.tensors_size(); ++t) {
      REQUIRE(a.tensors(t).shards_size() == b.tensors(t).shards_size());
      for (int k = 0; k < a.tensors(t).shards_size(); ++k) {
        const ckpt::Shard& x = a.tensors(t).shards(k);
        const ckpt::Shard& y = b.tensors(t).shards(k);
        CAPTURE(a.tensors(t).name(), k);
        CHECK(x.file() == y.file());
        CHECK(x.dataset() == y.dataset());
        CHECK(x.nbytes() == y.nbytes());
        CHECK(x.checksum() == y.checksum());
        CHECK(DatasetBytes(JoinPath(plain_path, x.file()), x.dataset(), x.nbytes()) ==
              DatasetBytes(JoinPath(staged_path, y.file()), y.dataset(), y.nbytes()));
        largest = std::max<int64_t>(largest, x.nbytes());
        chunked += x.nbytes() > kBucket ? 1 : 0;
      }
    }
    CHECK(largest > 4 * kBucket);
    CHECK(chunked >= 4);
    CHECK(a.total_bytes() == b.total_bytes());
    CHECK(a.config_text() == b.config_text());
  }
  int64_t largest_shard = 0;
  const ckpt::Manifest saved = ReadManifest(staged_path).value();
  for (const auto& t : saved.tensors()) {
    for (const auto& sh : t.shards()) largest_shard = std::max<int64_t>(largest_shard, sh.nbytes());
  }
  // Loads through the bucket: the same layout (whole shards, through the
  // bucket only), and every other layout of this world size, ZeRO-1 on and off
  // (partial shards; replicas exchanged in bucket-sized messages). In the
  // last round only the even ranks stage, so ranks on the host path (all
  // messages at once) and the bucketed path (one bucket at a time) meet.
  std::vector<LayoutCase> loads;
  for (const LayoutCase& l : AllLayouts()) {
    if (l.world == n) loads.push_back(l);
  }
  for (int mixed = 0; mixed <= (n >= 2 ? 1 : 0); ++mixed) {
    for (const LayoutCase& l : loads) {
      for (bool zero : {false, true}) {
        const bool same = l.tp == save_at.tp && l.ep == save_at.ep && zero;
        INFO("load at " << l.Name() << " zero " << zero << (mixed ? " (even ranks staged)" : ""));
        parallel::ProcessGroups g = GroupsOver(l.world, l.tp, l.ep);
        SynthModel m;
        BuildModel(m, g, zero, /*scale=*/4);
        const float sentinel = -12345.0f;
        FillModel(m, 0, &sentinel);
        CheckpointOptions o = staged;
        o.stage_host_tensors = !mixed || g.layout.rank % 2 == 0;
        auto ckpt = MakeCheckpointer(g, "", o);
        absl::StatusOr<LoadedCheckpoint> loaded = ckpt->Load(staged_path, m.Tensors());
        INFO(loaded.status().ToString());
        REQUIRE(loaded.ok());
        CHECK(CountMismatches(m, 3) == 0);
        CHECK(loaded->state == testing::SampleTrainState(3));
        const int64_t peak = ckpt->last_peak_host_staging_bytes();
        if (!o.stage_host_tensors) {
          CHECK(peak == 0);
        } else if (same) {
          CHECK(peak <= kBucket);  // whole shards stream through the bucket
        } else {
          CHECK(peak <= kBucket + largest_shard);  // plus the one saved shard it cuts from
        }
        if (same && !mixed) {
          UNSCOPED_INFO("rank " << g.layout.rank << ": load peak host staging " << peak << " bytes");
        }
        WorldBarrier();
      }
    }
  }
  if (World().rank() == 0) std::filesystem::remove_all(root);
}

TEST_CASE("an async save of staged tensors snapshots only this rank's pieces") {
  constexpr int64_t kBucket = 4096;
  const std::string root = SharedTempDir("bucket_async");
  const int n = World().size();
  parallel::ProcessGroups g = GroupsOver(n, n >= 2 ? 2 : 1, 1);
  SynthModel m;
  BuildModel(m, g, /*zero=*/true, /*scale=*/4);
  CheckpointOptions o;
  o.async = true;
  o.host_bucket_bytes = kBucket;
  o.stage_host_tensors = true;
  auto ckpt = MakeCheckpointer(g, root, o);
  FillModel(m, 5);
  REQUIRE(ckpt->Save(testing::SampleTrainState(5), m.Tensors(), "").ok());
  const int64_t peak = ckpt->last_peak_host_staging_bytes();
  FillModel(m, 6);  // training goes on while the save runs
  REQUIRE(ckpt->WaitForPendingSave().ok());
  // The snapshot is exactly the bytes this rank wrote.
  int64_t written = 0, held = 0;
  const std::string path = JoinPath(root, StepDirName(5));
  const ckpt::Manifest saved = ReadManifest(path).value();
  for (const auto& t : saved.tensors()) {
    for (const auto& sh : t.shards()) {
      if (sh.writer_rank() == g.layout.rank) written += sh.nbytes();
    }
  }
  for (const ShardedTensor& t : m.Tensors()) held += t.tensor.defined() ? t.tensor.nbytes() : 0;
  CHECK(peak == written);
  if (n >= 2) CHECK(peak < held);  // replicas are written once: not every rank's whole tensors
  auto loaded = ckpt->Load(path, m.Tensors());
  REQUIRE(loaded.ok());
  CHECK(CountMismatches(m, 5) == 0);
  WorldBarrier();
  if (World().rank() == 0) std::filesystem::remove_all(root);
}

TEST_CASE("the host bucket is checked: positive, and the same on every rank") {
  const int n = World().size();
  parallel::ProcessGroups g = GroupsOver(n, 1, 1);
  CheckpointOptions o;
  o.host_bucket_bytes = 0;
  auto zero = Checkpointer::Create(*g.world, g.layout, o);
  REQUIRE(!zero.ok());
  CHECK_THAT(std::string(zero.status().message()), Catch::Contains("set checkpoint.host_bucket_mb > 0"));
  if (n >= 2) {
    o.host_bucket_bytes = g.layout.rank == 1 ? 8192 : 4096;
    auto differ = Checkpointer::Create(*g.world, g.layout, o);
    REQUIRE(!differ.ok());
    CHECK_THAT(std::string(differ.status().message()),
               Catch::Contains("checkpoint.host_bucket_mb must be the same on every rank"));
  }
  config::CheckpointConfig c;
  CHECK(CheckpointOptionsFromConfig(c).host_bucket_bytes == int64_t{256} << 20);
  c.set_host_bucket_mb(3);
  CHECK(CheckpointOptionsFromConfig(c).host_bucket_bytes == int64_t{3} << 20);
  WorldBarrier();
}

TEST_CASE("moe-ckpt inspect and verify, with exit codes") {
  const std::string root = SharedTempDir("tool");
  SaveAt({World().size(), 1, 1}, /*zero=*/false, root, 12, 12);
  if (World().rank() == 0) {
    const std::string tool = absl::StrCat(MOE_BIN_DIR, "/moe-ckpt");
    const std::string dir = JoinPath(root, StepDirName(12));
    auto [rc, out] = Run(absl::StrCat(tool, " inspect ", root));
    INFO(out);
    CHECK(rc == 0);
    CHECK(out.find("step         12") != std::string::npos);
    CHECK(out.find("model.layers.0.mlp.experts.up_proj") != std::string::npos);
    CHECK(out.find("[4, 12, 8]") != std::string::npos);
    CHECK(out.find(absl::StrCat("layout       world ", World().size())) != std::string::npos);
    auto [vrc, vout] = Run(absl::StrCat(tool, " verify ", dir));
    CHECK(vrc == 0);
    CHECK(vout.find("OK") == 0);
    FlipByte(LocateShard(dir, "lm_head.weight").file, LocateShard(dir, "lm_head.weight").offset + 3);
    auto [brc, bout] = Run(absl::StrCat(tool, " verify ", root));
    INFO(bout);
    CHECK(brc == 1);
    CHECK(bout.find("CORRUPT") != std::string::npos);
    CHECK(bout.find("lm_head.weight") != std::string::npos);
    CHECK(Run(absl::StrCat(tool, " inspect ", root, "/missing")).first == 1);
    CHECK(Run(absl::StrCat(tool, " frobnicate ", root)).first == 2);
    CHECK(Run(tool).first == 2);
    std::filesystem::remove_all(root);
  }
  WorldBarrier();
}

// Forwards every call to the POSIX file system and records, in order, each
// fsync (a file's Sync, WriteFile, which fsyncs, and SyncDir) and rename.
class SyncRecordingFs : public CheckpointFs {
 public:
  struct Event {
    std::string what;  // "sync", "syncdir", "rename"
    std::string path;  // the file or directory (rename: the target)
  };
  std::vector<Event> events() const {
    std::lock_guard<std::mutex> lock(mu_);
    return events_;
  }
  void Record(const std::string& what, const std::string& path) {
    std::lock_guard<std::mutex> lock(mu_);
    events_.push_back({what, path});
  }

  absl::Status CreateDir(const std::string& path) override { return base_->CreateDir(path); }
  absl::StatusOr<std::unique_ptr<CheckpointFile>> OpenForWrite(const std::string& path) override {
    ASSIGN_OR_RETURN(std::unique_ptr<CheckpointFile> file, base_->OpenForWrite(path));
    return std::unique_ptr<CheckpointFile>(new File(this, path, std::move(file)));
  }
  absl::Status WriteFile(const std::string& path, const std::string& contents) override {
    RETURN_IF_ERROR(base_->WriteFile(path, contents));
    Record("sync", path);
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> ReadFile(const std::string& path) override { return base_->ReadFile(path); }
  absl::Status SyncDir(const std::string& path) override {
    RETURN_IF_ERROR(base_->SyncDir(path));
    Record("syncdir", path);
    return absl::OkStatus();
  }
  absl::Status Rename(const std::string& from, const std::string& to) override {
    RETURN_IF_ERROR(base_->Rename(from, to));
    Record("rename", to);
    return absl::OkStatus();
  }
  absl::Status RemoveAll(const std::string& path) override { return base_->RemoveAll(path); }
  absl::StatusOr<std::vector<std::string>> ListDir(const std::string& path) override {
    return base_->ListDir(path);
  }
  bool Exists(const std::string& path) override { return base_->Exists(path); }

 private:
  class File : public CheckpointFile {
   public:
    File(SyncRecordingFs* fs, std::string path, std::unique_ptr<CheckpointFile> base)
        : fs_(fs), path_(std::move(path)), base_(std::move(base)) {}
    absl::Status WriteAt(uint64_t offset, const void* data, size_t nbytes) override {
      return base_->WriteAt(offset, data, nbytes);
    }
    absl::Status Sync() override {
      RETURN_IF_ERROR(base_->Sync());
      fs_->Record("sync", path_);
      return absl::OkStatus();
    }
    absl::Status Close() override { return base_->Close(); }

   private:
    SyncRecordingFs* fs_;
    std::string path_;
    std::unique_ptr<CheckpointFile> base_;
  };
  CheckpointFs* base_ = CheckpointFs::Default();
  mutable std::mutex mu_;
  std::vector<Event> events_;
};

// Position of the first event (what, path) at or after `from`; -1 when none.
int Find(const std::vector<SyncRecordingFs::Event>& events, const std::string& what, const std::string& path,
         int from = 0) {
  for (int i = from; i < static_cast<int>(events.size()); ++i) {
    if (events[i].what == what && events[i].path == path) return i;
  }
  return -1;
}

// docs/design.md: a checkpoint appears (rename) only after every file in it and
// its directory are on disk, then the parent directory and `latest` are synced.
// Counted through the file-system wrapper on every rank, sync and async.
TEST_CASE(
    "every file of a checkpoint, its directory and the parent are fsynced before and after it appears") {
  const std::string root = SharedTempDir("fsync");
  const int n = World().size();
  parallel::ProcessGroups g = GroupsOver(n, 1, n >= 2 ? 2 : 1);
  SynthModel m;
  BuildModel(m, g, /*zero=*/true);
  FillModel(m, 1);
  for (bool async : {false, true}) {
    CAPTURE(async);
    SyncRecordingFs fs;
    CheckpointOptions o;
    o.async = async;
    o.fs = &fs;
    auto ckpt = MakeCheckpointer(g, root, o);
    const int64_t step = async ? 8 : 7;
    REQUIRE(ckpt->Save(testing::SampleTrainState(step), m.Tensors(), "").ok());
    REQUIRE(ckpt->WaitForPendingSave().ok());
    const std::string final_dir = JoinPath(root, absl::StrCat("step_0000000", step));
    const std::vector<SyncRecordingFs::Event> events = fs.events();
    // This rank's file, when it has one, was fsynced exactly once, in the
    // temporary directory (before the rename).
    const std::string mine = RankFileName(g.layout.rank);
    int synced_mine = 0;
    std::string tmp_dir;
    for (const auto& e : events) {
      if (e.what == "sync" && std::filesystem::path(e.path).filename() == mine) {
        ++synced_mine;
        tmp_dir = std::filesystem::path(e.path).parent_path().string();
      }
    }
    const bool have_file = std::filesystem::exists(JoinPath(final_dir, mine));
    CHECK(synced_mine == (have_file ? 1 : 0));
    if (have_file) CHECK(tmp_dir.find(".tmp-") != std::string::npos);
    // Every rank wrote its file (n ranks, ZeRO-1: every rank owns shards).
    CHECK(have_file);
    if (g.layout.rank == 0) {
      tmp_dir.clear();
      for (const auto& e : events) {
        if (e.what == "rename" && e.path == final_dir) break;
        if (e.what == "syncdir" && e.path.find(".tmp-") != std::string::npos) tmp_dir = e.path;
      }
      REQUIRE(!tmp_dir.empty());
      // Every file in the checkpoint was synced in the temporary directory
      // (the rank files by their ranks, the others here), then the directory,
      // then it was renamed, then the parent synced, then `latest` written,
      // renamed and the parent synced again.
      const int dir_synced = Find(events, "syncdir", tmp_dir);
      int files = 0;
      for (const auto& entry : std::filesystem::directory_iterator(final_dir)) {
        const std::string name = entry.path().filename().string();
        ++files;
        if (name.rfind("rank_", 0) == 0) continue;  // synced by its rank (checked there)
        CAPTURE(name);
        const int at = Find(events, "sync", JoinPath(tmp_dir, name));
        CHECK(at >= 0);
        CHECK(at < dir_synced);
      }
      CHECK(files == n + 2);  // manifest.pb, model.h5, one file per rank
      const int renamed = Find(events, "rename", final_dir, dir_synced);
      CHECK(renamed > dir_synced);
      const int parent = Find(events, "syncdir", root, renamed);
      CHECK(parent > renamed);
      const int latest = Find(events, "rename", JoinPath(root, kLatestFileName), parent);
      CHECK(latest > parent);
      CHECK(Find(events, "syncdir", root, latest) > latest);
    }
    WorldBarrier();
  }
  if (World().rank() == 0) std::filesystem::remove_all(root);
}

TEST_CASE("a stop signal on one rank stops every rank at the same step") {
  REQUIRE(InstallStopSignalHandlers().ok());
  ClearStopRequest();
  auto none = AgreeOnStop(World());
  REQUIRE(none.ok());
  CHECK(!*none);
  if (World().rank() == World().size() - 1) {
    REQUIRE(::raise(SIGUSR1) == 0);
    CHECK(StopRequested());
    CHECK(StopSignal() == SIGUSR1);
  }
  auto stop = AgreeOnStop(World());
  REQUIRE(stop.ok());
  CHECK(*stop);
  ClearStopRequest();
  if (World().rank() == 0) {
    REQUIRE(::raise(SIGTERM) == 0);  // the handler, not the default action
    CHECK(StopSignal() == SIGTERM);
  }
  stop = AgreeOnStop(World());
  REQUIRE(stop.ok());
  CHECK(*stop);
  ClearStopRequest();
}

}  // namespace
}  // namespace moe
