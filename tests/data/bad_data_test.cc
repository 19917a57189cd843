// Every kind of bad data is refused before training, with a message that names
// the file, the field or offset, and the fix.
#include <catch2/catch.hpp>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "data/indexed_dataset.h"
#include "runtime/core/config.h"
#include "tests/data/data_test_util.h"

namespace moe::data {
namespace {

using Catch::Contains;
using testing::ReadBytes;
using testing::TempDir;
using testing::WriteBytes;

// Three documents of byte tokens with end-of-document 256: 5 + 4 + 6 tokens.
std::string WriteGood(const TempDir& tmp, const std::string& name = "good") {
  auto w = IndexedDatasetWriter::Create(tmp / name, 257);
  REQUIRE(w.ok());
  for (const std::vector<int32_t>& doc :
       {std::vector<int32_t>{104, 101, 108, 108, 256}, {111, 32, 119, 256}, {111, 114, 108, 100, 33, 256}}) {
    REQUIRE((*w)->AddDocument(doc.data(), static_cast<int64_t>(doc.size())).ok());
  }
  REQUIRE((*w)->Finish().ok());
  return tmp / name;
}

std::string OpenError(const std::string& prefix) {
  auto ds = IndexedDataset::Open(prefix);
  REQUIRE_FALSE(ds.ok());
  return std::string(ds.status().message());
}

template <typename T>
void Patch(const std::string& path, size_t offset, T value) {
  std::string bytes = ReadBytes(path);
  REQUIRE(offset + sizeof(T) <= bytes.size());
  std::memcpy(bytes.data() + offset, &value, sizeof(T));
  WriteBytes(path, bytes);
}

TEST_CASE("the good file opens (the corruptions below start from it)") {
  TempDir tmp;
  auto ds = IndexedDataset::Open(WriteGood(tmp));
  REQUIRE(ds.ok());
  CHECK((*ds)->num_tokens() == 15);
  CHECK((*ds)->num_documents() == 3);
}

TEST_CASE("missing files") {
  TempDir tmp;
  std::string e = OpenError(tmp / "nothing");
  CHECK_THAT(e, Contains(tmp / "nothing.idx") && Contains("no such file") && Contains("moe-preprocess"));
  const std::string p = WriteGood(tmp);
  std::filesystem::remove(p + ".bin");
  CHECK_THAT(OpenError(p), Contains(p + ".bin") && Contains("no such file"));
}

TEST_CASE("truncated .bin, longer .bin, and an .idx from another dataset") {
  TempDir tmp;
  const std::string p = WriteGood(tmp);
  const std::string bin = ReadBytes(p + ".bin");
  REQUIRE(bin.size() == 30);
  WriteBytes(p + ".bin", bin.substr(0, 25));
  CHECK_THAT(OpenError(p), Contains(p + ".bin does not match " + p + ".idx") && Contains("sequence 2") &&
                               Contains("ends at byte 30") && Contains("only 25 bytes") &&
                               Contains("truncated"));
  WriteBytes(p + ".bin", bin + "xx");
  CHECK_THAT(OpenError(p), Contains("does not match") && Contains("ending at byte 30") &&
                               Contains("the .bin has 32 bytes"));
  // An .idx written for other documents beside this .bin.
  const std::string other = WriteGood(tmp, "other");
  WriteBytes(p + ".bin", bin);
  {
    auto w = IndexedDatasetWriter::Create(tmp / "other", 257);
    REQUIRE(w.ok());
    std::vector<int32_t> doc(40, 65);
    REQUIRE((*w)->AddDocument(doc.data(), 40).ok());
    REQUIRE((*w)->Finish().ok());
  }
  std::filesystem::copy_file(other + ".idx", p + ".idx", std::filesystem::copy_options::overwrite_existing);
  CHECK_THAT(OpenError(p), Contains("does not match") && Contains("ends at byte 80"));
}

TEST_CASE("corrupt .idx: size, magic, version, dtype code, lengths, document indices") {
  TempDir tmp;
  const std::string p = WriteGood(tmp);
  const std::string idx_path = p + ".idx";
  const std::string idx = ReadBytes(idx_path);
  REQUIRE(idx.size() == 34 + 12 * 3 + 8 * 4);

  WriteBytes(idx_path, idx.substr(0, 20));
  CHECK_THAT(OpenError(p), Contains(idx_path) && Contains("truncated .idx") && Contains("34-byte header"));
  WriteBytes(idx_path, idx.substr(0, idx.size() - 8));
  CHECK_THAT(OpenError(p),
             Contains("truncated .idx") && Contains("sequence_count = 3") && Contains("document_count = 4"));
  WriteBytes(idx_path, idx + "abc");  // N = 3 extra bytes: Megatron multimodal sequence modes
  CHECK(IndexedDataset::Open(p).ok());
  CHECK((*IndexedDataset::Open(p))->has_sequence_modes());
  WriteBytes(idx_path, idx + "abcd");
  CHECK_THAT(OpenError(p), Contains("has 106 bytes but its header") && Contains("describes 102"));

  WriteBytes(idx_path, "TNTIDX\0\0\0" + idx.substr(9));
  CHECK_THAT(OpenError(p), Contains("bad magic at offset 0") && Contains("TNTIDX"));
  WriteBytes(idx_path, idx);
  Patch<uint64_t>(idx_path, 9, 2);
  CHECK_THAT(OpenError(p), Contains("version (offset 9) = 2"));
  for (uint8_t code : {uint8_t{0}, uint8_t{9}, uint8_t{200}}) {
    WriteBytes(idx_path, idx);
    Patch<uint8_t>(idx_path, 17, code);
    CHECK_THAT(OpenError(p), Contains(idx_path) &&
                                 Contains("unknown dtype code " + std::to_string(code) + " at offset 17") &&
                                 Contains("8 uint16"));
  }
  // A different, valid dtype code makes the sizes disagree: uint8 -> 15 bytes expected, .bin has 30.
  WriteBytes(idx_path, idx);
  Patch<uint8_t>(idx_path, 17, 1);
  CHECK_THAT(OpenError(p), Contains("does not match"));

  WriteBytes(idx_path, idx);
  Patch<int32_t>(idx_path, 34 + 4, -4);
  CHECK_THAT(OpenError(p), Contains("sequence_lengths[1] (byte offset 38) = -4 is negative"));
  const size_t docs = 34 + 12 * 3;
  WriteBytes(idx_path, idx);
  Patch<int64_t>(idx_path, docs, 1);
  CHECK_THAT(OpenError(p), Contains("document_indices[0]") && Contains("must be 0"));
  WriteBytes(idx_path, idx);
  Patch<int64_t>(idx_path, docs + 16, 0);  // 0 1 0 3
  CHECK_THAT(OpenError(p),
             Contains("document_indices[2] (byte offset 86) = 0 after 1") && Contains("non-decreasing"));
  WriteBytes(idx_path, idx);
  Patch<int64_t>(idx_path, docs + 24, 2);  // 0 1 2 2: sequence 2 belongs to no document
  CHECK_THAT(OpenError(p), Contains("last document index") && Contains("sequence_count = 3"));
}

config::JobConfig Config(const std::string& train_path) {
  config::JobConfig c;
  c.mutable_data()->set_train_path(train_path);
  c.mutable_model()->set_seq_len(4);
  c.mutable_train()->set_micro_batch(2);
  ApplyDefaults(2, &c);
  return c;
}

TEST_CASE("fewer tokens than one global batch names the numbers and the fixes") {
  TempDir tmp;
  const std::string p = WriteGood(tmp);  // 15 tokens: 3 samples of 5 with stride 4
  config::JobConfig c = Config(p);
  c.mutable_data()->set_valid_fraction(0);
  auto d = OpenTrainingData(c, 2);  // global batch 2 x 2 x 1 = 4 samples
  REQUIRE_FALSE(d.ok());
  CHECK_THAT(std::string(d.status().message()),
             Contains("not enough train data") && Contains(p + ".{bin,idx}") && Contains("15 tokens") &&
                 Contains("3 samples of seq_len + 1 = 5") &&
                 Contains("dp 2 x train.micro_batch 2 x train.grad_accum 1 = 4 samples (17 tokens)") &&
                 Contains("smaller train.micro_batch") && Contains("model.seq_len") && Contains("more data"));
  CHECK(OpenTrainingData(c, 1).ok());         // a global batch of 2 fits
  c.mutable_data()->set_valid_fraction(0.5);  // 2 samples held out, 1 left to train
  auto held = OpenTrainingData(c, 1);
  REQUIRE_FALSE(held.ok());
  CHECK_THAT(std::string(held.status().message()), Contains("1 samples") && Contains("data.valid_fraction"));
}

TEST_CASE("tokens outside the vocabulary, wrong paths and formats") {
  TempDir tmp;
  const std::string p = WriteGood(tmp);
  config::JobConfig c = Config(p);
  c.mutable_model()->set_vocab_size(200);
  auto d = OpenTrainingData(c, 1);
  REQUIRE_FALSE(d.ok());
  CHECK_THAT(std::string(d.status().message()), Contains(p + ".bin") &&
                                                    Contains("token 256 at token offset 4") &&
                                                    Contains("model.vocab_size = 200") && Contains("257"));

  c = Config(tmp / "absent");
  d = OpenTrainingData(c, 1);
  REQUIRE_FALSE(d.ok());
  CHECK(d.status().code() == absl::StatusCode::kNotFound);
  c = Config("");
  CHECK_THAT(std::string(OpenTrainingData(c, 1).status().message()), Contains("data.train_path is empty"));
  c = Config(p);
  c.mutable_data()->set_format("parquet");
  CHECK_THAT(std::string(OpenTrainingData(c, 1).status().message()),
             Contains("data.format = \"parquet\"") && Contains("\"megatron\" or \"hdf5\""));
  c = Config(p);
  c.mutable_data()->set_valid_path(tmp / "no_valid");
  CHECK_THAT(std::string(OpenTrainingData(c, 1).status().message()), Contains(tmp / "no_valid.idx"));
  c = Config(p);
  c.mutable_data()->set_valid_fraction(1.0);
  CHECK_THAT(std::string(OpenTrainingData(c, 1).status().message()), Contains("data.valid_fraction = 1"));
}

}  // namespace
}  // namespace moe::data
