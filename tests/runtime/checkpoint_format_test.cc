// Single-process pieces of the checkpoint format: XXH64 against the reference
// vectors, box decomposition and copies against naive element loops, the
// manifest envelope (newer version refused, damage caught), the rank-file and
// master-file HDF5 layout, verification and the fault-injecting file system.
#include "runtime/checkpoint_format.h"

#include <catch2/catch.hpp>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <string>
#include <vector>

#include "runtime/checkpoint_fs.h"
#include "runtime/checkpoint_hash.h"

namespace moe {
namespace {

namespace fs = std::filesystem;

std::string TempDir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / absl::StrCat("moe_ckpt_format_", name, "_", ::getpid());
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

TEST_CASE("XXH64 matches the reference vectors, in one call or many") {
  CHECK(Xxh64Hash("", 0) == 0xEF46DB3751D8E999ULL);
  CHECK(Xxh64Hash("a", 1) == 0xD24EC4F1A98C6E5BULL);
  CHECK(Xxh64Hash("abc", 3) == 0x44BC2CF5AD770999ULL);
  const char* text = "Nobody inspects the spammish repetition";
  CHECK(Xxh64Hash(text, std::strlen(text)) == 0xFBCEA83C8A378BF1ULL);
  // xxhsum's sanity buffer (its BMK_sanityCheck): byte i = top byte of a
  // 32-bit generator squared at each step.
  std::vector<unsigned char> buf(4096 + 64);
  uint32_t byte_gen = 2654435761U;
  for (unsigned char& b : buf) {
    b = static_cast<unsigned char>(byte_gen >> 24);
    byte_gen *= byte_gen;
  }
  CHECK(Xxh64Hash(buf.data(), 1) == 0x4FCE394CC88952D8ULL);
  CHECK(Xxh64Hash(buf.data(), 14) == 0xCFFA8DB881BC3A3DULL);
  CHECK(Xxh64Hash(buf.data(), 1, 2654435761U) == 0x739840CB819FA723ULL);
  // Longer inputs (4 stripes and a tail), from the system's libxxhash 0.8.1.
  CHECK(Xxh64Hash(buf.data(), 101) == 0x0EAB543384F878ADULL);
  CHECK(Xxh64Hash(buf.data(), 4096 + 64, 7) == 0x0B35E0624939E28DULL);
  // Streaming in odd pieces gives the one-shot digest.
  for (size_t n : {size_t{31}, size_t{32}, size_t{33}, size_t{100}, buf.size()}) {
    Xxh64 h;
    size_t at = 0, step = 1;
    while (at < n) {
      const size_t k = std::min(step, n - at);
      h.Update(buf.data() + at, k);
      at += k;
      step = step * 3 % 37 + 1;
    }
    CHECK(h.Digest() == Xxh64Hash(buf.data(), n));
  }
  CHECK(ChecksumHex(0xEF46DB3751D8E999ULL) == "ef46db3751d8e999");
}

TEST_CASE("step directory names") {
  CHECK(StepDirName(100) == "step_00000100");
  CHECK(ParseStepDirName("step_00000100") == std::optional<int64_t>(100));
  CHECK(ParseStepDirName("step_123456789") == std::optional<int64_t>(123456789));
  CHECK(!ParseStepDirName("step_00000100.tmp-1a2b3c4d"));
  CHECK(!ParseStepDirName("step_"));
  CHECK(!ParseStepDirName("latest"));
  CHECK(RankFileName(3) == "rank_00003.h5");
}

// Row-major flat index of a global coordinate.
int64_t Flat(const std::vector<int64_t>& shape, const std::vector<int64_t>& idx) {
  int64_t f = 0;
  for (size_t i = 0; i < shape.size(); ++i) f = f * shape[i] + idx[i];
  return f;
}

// Global flat indices of a box's elements in its row-major order.
std::vector<int64_t> BoxElements(const std::vector<int64_t>& shape, const Box& box) {
  std::vector<int64_t> out;
  std::vector<int64_t> idx(box.offset);
  if (box.numel() == 0) return out;
  for (;;) {
    out.push_back(Flat(shape, idx));
    int d = box.rank() - 1;
    for (; d >= 0; --d) {
      if (++idx[d] < box.offset[d] + box.count[d]) break;
      idx[d] = box.offset[d];
    }
    if (d < 0) break;
  }
  return out;
}

TEST_CASE("a flat range of a box decomposes into contiguous boxes in order") {
  const std::vector<int64_t> shape = {5, 7, 6};
  const Box box{{1, 2, 1}, {3, 4, 5}};  // 60 elements
  const std::vector<int64_t> all = BoxElements(shape, box);
  for (int64_t b = 0; b <= box.numel(); b += 7) {
    for (int64_t e = b; e <= box.numel(); e += 5) {
      std::vector<Box> parts = DecomposeFlatRange(box, b, e);
      CHECK(parts.size() <= 5u);
      std::vector<int64_t> got;
      for (const Box& p : parts) {
        REQUIRE(p.numel() > 0);
        std::vector<int64_t> el = BoxElements(shape, p);
        got.insert(got.end(), el.begin(), el.end());
      }
      CHECK(got == std::vector<int64_t>(all.begin() + b, all.begin() + e));
    }
  }
  CHECK(DecomposeFlatRange(box, 0, box.numel()).size() == 1);
}

TEST_CASE("CopyRegion copies exactly the intersection") {
  const std::vector<int64_t> shape = {6, 5, 4};
  const Box src{{1, 0, 0}, {4, 5, 4}}, dst{{0, 1, 2}, {6, 3, 2}};
  std::vector<float> s(src.numel()), d(dst.numel(), -1.0f);
  std::vector<int64_t> se = BoxElements(shape, src), de = BoxElements(shape, dst);
  for (size_t i = 0; i < s.size(); ++i) s[i] = static_cast<float>(se[i]);
  std::optional<Box> region = Intersect(src, dst);
  REQUIRE(region);
  CHECK(region->ToString() == "[1:5, 1:4, 2:4]");
  CopyRegion(s.data(), src, d.data(), dst, *region, sizeof(float));
  std::vector<int64_t> re = BoxElements(shape, *region);
  for (size_t i = 0; i < d.size(); ++i) {
    const bool inside = std::find(re.begin(), re.end(), de[i]) != re.end();
    CHECK(d[i] == (inside ? static_cast<float>(de[i]) : -1.0f));
  }
  CHECK(!Intersect(Box{{0}, {2}}, Box{{2}, {3}}));
}

ckpt::Manifest SmallManifest() {
  ckpt::Manifest m;
  m.set_step(7);
  m.mutable_train()->set_consumed_samples(56);
  ckpt::TensorEntry* t = m.add_tensors();
  t->set_name("model.norm.weight");
  t->set_dtype("f32");
  t->add_global_shape(8);
  for (int r = 0; r < 2; ++r) {
    ckpt::Shard* s = t->add_shards();
    s->add_offset(4 * r);
    s->add_count(4);
    s->set_writer_rank(r);
    s->set_file(RankFileName(r));
    s->set_dataset("model.norm.weight");
    s->set_nbytes(16);
  }
  return m;
}

TEST_CASE("the manifest envelope refuses newer versions and damage") {
  const ckpt::Manifest m = SmallManifest();
  const std::string bytes = SerializeManifestFile(m);
  absl::StatusOr<ckpt::Manifest> back = ParseManifestFile(bytes, "x/manifest.pb");
  REQUIRE(back.ok());
  CHECK(back->step() == 7);
  CHECK(back->train().consumed_samples() == 56);

  ckpt::ManifestFile file;
  REQUIRE(file.ParseFromString(bytes));
  file.set_format_version(kCheckpointFormatVersion + 1);
  absl::StatusOr<ckpt::Manifest> newer = ParseManifestFile(file.SerializeAsString(), "x/manifest.pb");
  REQUIRE(!newer.ok());
  CHECK(newer.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(newer.status().message()),
             Catch::Contains("format version 2, newer than version 1"));

  file.set_format_version(kCheckpointFormatVersion);
  (*file.mutable_manifest())[3] ^= 0x10;
  absl::StatusOr<ckpt::Manifest> damaged = ParseManifestFile(file.SerializeAsString(), "x/manifest.pb");
  REQUIRE(!damaged.ok());
  CHECK(damaged.status().code() == absl::StatusCode::kDataLoss);
  CHECK_THAT(std::string(damaged.status().message()), Catch::Contains("checksum"));

  CHECK(!ParseManifestFile(bytes.substr(0, bytes.size() / 2), "x/manifest.pb").ok());
  CHECK(!ParseManifestFile("", "x/manifest.pb").ok());
}

TEST_CASE("manifest validation catches gaps, overlaps and boxes outside the tensor") {
  ckpt::Manifest m = SmallManifest();
  CHECK(ValidateManifest(m, "d").ok());
  ckpt::Manifest gap = m;
  gap.mutable_tensors(0)->mutable_shards(1)->set_count(0, 3);
  gap.mutable_tensors(0)->mutable_shards(1)->set_nbytes(12);
  CHECK_THAT(std::string(ValidateManifest(gap, "d").message()), Catch::Contains("cover 7 of 8"));
  ckpt::Manifest overlap = m;
  overlap.mutable_tensors(0)->mutable_shards(1)->set_offset(0, 2);
  CHECK_THAT(std::string(ValidateManifest(overlap, "d").message()), Catch::Contains("overlap"));
  ckpt::Manifest outside = m;
  outside.mutable_tensors(0)->mutable_shards(1)->set_offset(0, 6);
  CHECK_THAT(std::string(ValidateManifest(outside, "d").message()), Catch::Contains("outside"));
}

// Writes a two-file checkpoint by hand through the format functions.
void WriteTwoRankCheckpoint(const std::string& dir, std::vector<float>& values) {
  ckpt::Manifest m = SmallManifest();
  values.resize(8);
  std::iota(values.begin(), values.end(), 1.0f);
  for (int r = 0; r < 2; ++r) {
    std::vector<RankDataset> ds(1);
    ds[0].dataset = "model.norm.weight";
    ds[0].shape = {4};
    ds[0].global_offset = {4 * r};
    ds[0].global_shape = {8};
    REQUIRE(CreateRankFileLayout(JoinPath(dir, RankFileName(r)), ds).ok());
    auto file = CheckpointFs::Default()->OpenForWrite(JoinPath(dir, RankFileName(r)));
    REQUIRE(file.ok());
    REQUIRE((*file)->WriteAt(ds[0].file_offset, values.data() + 4 * r, 16).ok());
    REQUIRE((*file)->Sync().ok());
    REQUIRE((*file)->Close().ok());
    m.mutable_tensors(0)->mutable_shards(r)->set_checksum(Xxh64Hash(values.data() + 4 * r, 16));
    m.add_files(RankFileName(r));
  }
  m.add_files(kMasterFileName);
  REQUIRE(WriteMasterFile(JoinPath(dir, kMasterFileName), m).ok());
  REQUIRE(
      CheckpointFs::Default()->WriteFile(JoinPath(dir, kManifestFileName), SerializeManifestFile(m)).ok());
}

TEST_CASE("rank files written by pwrite read back; verify catches a flipped byte") {
  const std::string dir = TempDir("verify");
  std::vector<float> values;
  WriteTwoRankCheckpoint(dir, values);
  VerifyReport ok_report;
  REQUIRE(VerifyCheckpoint(dir, &ok_report).ok());
  CHECK(ok_report.shards == 2);
  CHECK(ok_report.bytes == 32);

  ckpt::Manifest m = ReadManifest(dir).value();
  {
    ShardReader reader(dir);
    std::vector<float> got(4);
    REQUIRE(reader.Read(m.tensors(0), m.tensors(0).shards(1), got.data()).ok());
    CHECK(got == std::vector<float>(values.begin() + 4, values.end()));
  }
  // Flip one byte of rank 1's data (the last 16 bytes hold no metadata? find them).
  const std::string path = JoinPath(dir, RankFileName(1));
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  std::string content((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const size_t at = content.find(std::string(reinterpret_cast<const char*>(values.data() + 4), 16));
  REQUIRE(at != std::string::npos);
  f.seekp(static_cast<std::streamoff>(at + 5));
  f.put(static_cast<char>(content[at + 5] ^ 0x40));
  f.close();
  VerifyReport bad;
  absl::Status s = VerifyCheckpoint(dir, &bad);
  REQUIRE(!s.ok());
  CHECK(s.code() == absl::StatusCode::kDataLoss);
  CHECK_THAT(std::string(s.message()), Catch::Contains("rank_00001.h5") &&
                                           Catch::Contains("model.norm.weight") &&
                                           Catch::Contains("checksum mismatch"));
  fs::remove_all(dir);
}

TEST_CASE("a truncated rank file is refused naming the file and the tensor") {
  const std::string dir = TempDir("truncated");
  std::vector<float> values;
  WriteTwoRankCheckpoint(dir, values);
  const std::string path = JoinPath(dir, RankFileName(0));
  fs::resize_file(path, fs::file_size(path) - 10);
  VerifyReport report;
  absl::Status s = VerifyCheckpoint(dir, &report);
  REQUIRE(!s.ok());
  CHECK_THAT(std::string(s.message()),
             Catch::Contains("rank_00000.h5") && Catch::Contains("model.norm.weight"));
  fs::remove_all(dir);
}

TEST_CASE("the fault-injecting file system fails on cue and can play dead") {
  const std::string dir = TempDir("faults");
  FaultInjectionFs faulty(CheckpointFs::Default());
  REQUIRE(faulty.WriteFile(JoinPath(dir, "a"), "1").ok());
  faulty.FailOn(FsOp::kRename, /*skip=*/1, /*crash=*/false);
  CHECK(faulty.Rename(JoinPath(dir, "a"), JoinPath(dir, "b")).ok());
  absl::Status s = faulty.Rename(JoinPath(dir, "b"), JoinPath(dir, "c"));
  CHECK_THAT(std::string(s.message()), Catch::Contains("injected fault: rename"));
  CHECK(faulty.Exists(JoinPath(dir, "b")));
  CHECK(faulty.Rename(JoinPath(dir, "b"), JoinPath(dir, "c")).ok());  // armed once
  faulty.FailOn(FsOp::kSyncDir, 0, /*crash=*/true);
  CHECK(!faulty.SyncDir(dir).ok());
  CHECK(faulty.crashed());
  CHECK(!faulty.WriteFile(JoinPath(dir, "d"), "2").ok());  // nothing after the crash
  CHECK(!faulty.Exists(JoinPath(dir, "d")));
  CHECK(faulty.calls(FsOp::kRename) == 3);
  faulty.Reset();
  CHECK(faulty.WriteFile(JoinPath(dir, "d"), "2").ok());
  fs::remove_all(dir);
}

}  // namespace
}  // namespace moe
