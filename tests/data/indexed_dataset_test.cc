// The Megatron .bin/.idx reader against files written by an independent writer
// (tests/reference/megatron_writer.py, following Megatron-LM's indexed_dataset.py),
// and the C++ writer against the same files, byte for byte.
#include "data/indexed_dataset.h"

#include <catch2/catch.hpp>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "tests/data/data_test_util.h"

namespace moe::data {
namespace {

using testing::ReadBytes;
using testing::TempDir;

struct Case {
  std::string name;
  int dtype_code = 0;
  int64_t num_sequences = 0;
  std::vector<int64_t> document_indices;
  std::vector<std::vector<int64_t>> sequences;
};

std::vector<Case> ParseExpected(const std::string& path) {
  std::ifstream in(path);
  std::vector<Case> cases;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ss(line);
    std::string kind;
    ss >> kind;
    if (kind == "case") {
      Case c;
      int64_t num_docs;
      ss >> c.name >> c.dtype_code >> c.num_sequences >> num_docs;
      cases.push_back(c);
    } else if (kind == "doc") {
      for (int64_t v; ss >> v;) cases.back().document_indices.push_back(v);
    } else if (kind == "seq") {
      cases.back().sequences.emplace_back();
      for (int64_t v; ss >> v;) cases.back().sequences.back().push_back(v);
    }
  }
  return cases;
}

const std::string kFixtures = std::string(MOE_TEST_DATA_DIR) + "/megatron";

void CheckCase(const std::string& dir, const Case& c) {
  INFO("case " << c.name << " in " << dir);
  auto opened = IndexedDataset::Open(dir + "/" + c.name);
  REQUIRE(opened.ok());
  const IndexedDataset& ds = **opened;
  CHECK(static_cast<int>(ds.dtype()) == c.dtype_code);
  REQUIRE(ds.num_sequences() == c.num_sequences);
  CHECK(ds.document_indices() == c.document_indices);
  CHECK(ds.num_documents() == static_cast<int64_t>(c.document_indices.size()) - 1);
  std::vector<int64_t> stream;
  for (int64_t i = 0; i < ds.num_sequences(); ++i) {
    std::vector<int64_t> seq;
    REQUIRE(ds.ReadSequence(i, &seq).ok());
    CHECK(seq == c.sequences[i]);
    CHECK(ds.sequence_lengths()[i] == static_cast<int32_t>(c.sequences[i].size()));
    stream.insert(stream.end(), seq.begin(), seq.end());
  }
  REQUIRE(ds.num_tokens() == static_cast<int64_t>(stream.size()));
  const bool non_negative = c.name != "megatron_int16_negative";
  if (!non_negative) {
    absl::Status s = ds.Validate(1 << 20);
    CHECK_FALSE(s.ok());
    CHECK_THAT(std::string(s.message()), Catch::Contains("token -1 at token offset 1"));
    return;
  }
  // The concatenated stream, read whole and in every window of length 3 (which
  // crosses sequence boundaries and the empty sequence).
  std::vector<int32_t> all(stream.size());
  REQUIRE(ds.Read(0, ds.num_tokens(), all.data()).ok());
  for (size_t i = 0; i < stream.size(); ++i) CHECK(all[i] == stream[i]);
  for (int64_t b = 0; b + 3 <= ds.num_tokens(); ++b) {
    int32_t w[3];
    REQUIRE(ds.Read(b, 3, w).ok());
    CHECK((w[0] == stream[b] && w[1] == stream[b + 1] && w[2] == stream[b + 2]));
  }
  int32_t dummy[2];
  CHECK(ds.Read(ds.num_tokens() - 1, 2, dummy).code() == absl::StatusCode::kOutOfRange);
  // Vocabulary check: the largest token passes vocab = max + 1 and fails vocab = max.
  int64_t max_token = 0, max_at = 0;
  for (size_t i = 0; i < stream.size(); ++i) {
    if (stream[i] > max_token) max_token = stream[i], max_at = static_cast<int64_t>(i);
  }
  CHECK(ds.Validate(max_token + 1).ok());
  absl::Status s = ds.Validate(max_token);
  REQUIRE_FALSE(s.ok());
  CHECK_THAT(std::string(s.message()), Catch::Contains(c.name + ".bin") &&
                                           Catch::Contains("token " + std::to_string(max_token) +
                                                           " at token offset " + std::to_string(max_at)));
}

TEST_CASE("reads the committed fixtures of the reference writer, every dtype code") {
  std::vector<Case> cases = ParseExpected(kFixtures + "/expected.txt");
  REQUIRE(cases.size() == 10);  // 8 dtypes + negative int16 + byte tokens
  for (const Case& c : cases) CheckCase(kFixtures, c);
}

TEST_CASE("the reference writer, run now, reproduces the fixtures; the reader reads its output") {
  TempDir tmp;
  const std::string cmd = "/usr/bin/python3 " + std::string(MOE_SOURCE_DIR) +
                          "/tests/reference/megatron_writer.py fixtures " + tmp.path();
  REQUIRE(std::system(cmd.c_str()) == 0);
  std::vector<Case> cases = ParseExpected(tmp / "expected.txt");
  REQUIRE(cases.size() == 10);
  for (const Case& c : cases) {
    CheckCase(tmp.path(), c);
    for (const char* ext : {".bin", ".idx"}) {
      INFO(c.name << ext);
      CHECK(ReadBytes(tmp / (c.name + ext)) == ReadBytes(kFixtures + "/" + c.name + ext));
    }
  }
}

// The C++ writer, given the same documents, writes the same bytes as the
// reference writer (uint16 for a small vocabulary, int32 for a large one).
TEST_CASE("IndexedDatasetWriter writes what Megatron writes, atomically") {
  std::vector<Case> cases = ParseExpected(kFixtures + "/expected.txt");
  for (const Case& c : cases) {
    if (c.name != "megatron_uint16" && c.name != "megatron_int32" && c.name != "megatron_bytes") continue;
    INFO(c.name);
    TempDir tmp;
    // int32 for a vocabulary past 65535, uint16 up to it.
    const int64_t vocab = c.name == "megatron_int32" ? (int64_t{1} << 31) - 1 : 65535;
    auto w = IndexedDatasetWriter::Create(tmp / "out", vocab);
    REQUIRE(w.ok());
    // megatron_uint16 holds the token 65535, which a vocabulary of 65535 rejects.
    if (c.name == "megatron_uint16") {
      int32_t big = 65535;
      CHECK_FALSE((*w)->AddSequence(&big, 1).ok());
      w = IndexedDatasetWriter::Create(tmp / "out", 65536);  // int32, so compare values only
      REQUIRE(w.ok());
    }
    size_t d = 1;
    for (size_t i = 0; i < c.sequences.size(); ++i) {
      std::vector<int32_t> seq(c.sequences[i].begin(), c.sequences[i].end());
      REQUIRE((*w)->AddSequence(seq.data(), static_cast<int64_t>(seq.size())).ok());
      while (d < c.document_indices.size() && c.document_indices[d] == static_cast<int64_t>(i) + 1) {
        (*w)->EndDocument();
        ++d;
      }
    }
    // Documents that end before the first sequence (none here) or empty ones in between.
    while (d < c.document_indices.size()) (*w)->EndDocument(), ++d;
    CHECK_FALSE(std::filesystem::exists(tmp / "out.bin"));  // only temporaries so far
    REQUIRE((*w)->Finish().ok());
    w->reset();
    if (c.name != "megatron_uint16") {
      CHECK(ReadBytes(tmp / "out.bin") == ReadBytes(kFixtures + "/" + c.name + ".bin"));
      CHECK(ReadBytes(tmp / "out.idx") == ReadBytes(kFixtures + "/" + c.name + ".idx"));
    }
    Case as_written = c;
    as_written.name = "out";
    as_written.dtype_code = c.name == "megatron_bytes" ? 8 : 4;
    CheckCase(tmp.path(), as_written);
    // Only the two files remain: no temporaries left behind.
    int files = 0;
    for (auto& e : std::filesystem::directory_iterator(tmp.path())) files += e.is_regular_file();
    CHECK(files == 2);
  }
}

TEST_CASE("a writer destroyed before Finish leaves nothing behind") {
  TempDir tmp;
  {
    auto w = IndexedDatasetWriter::Create(tmp / "partial", 257);
    REQUIRE(w.ok());
    std::vector<int32_t> t = {1, 2, 3};
    REQUIRE((*w)->AddDocument(t.data(), 3).ok());
    int32_t bad = 257;
    absl::Status s = (*w)->AddDocument(&bad, 1);
    CHECK_THAT(std::string(s.message()), Catch::Contains("token 257") && Catch::Contains("vocab_size = 257"));
  }
  CHECK(std::filesystem::is_empty(tmp.path()));
}

// The format allows sequences anywhere in the .bin: the reader reads runs of
// sequences stored back to back at once and jumps between the others.
TEST_CASE("sequences stored out of order in the .bin read in index order") {
  TempDir tmp;
  const std::vector<std::vector<int32_t>> docs = {{1, 2, 3, 4, 5}, {6, 7, 8, 9}, {10, 11, 12, 13, 14, 15}};
  {
    auto w = IndexedDatasetWriter::Create(tmp / "c", 257);
    REQUIRE(w.ok());
    for (const auto& d : docs) REQUIRE((*w)->AddDocument(d.data(), static_cast<int64_t>(d.size())).ok());
    REQUIRE((*w)->Finish().ok());
  }
  // uint16 .bin: docs at bytes 0, 10 and 18. Index them as 1, 2, 0: sequences
  // 0 and 1 are back to back (bytes 10..30), sequence 2 jumps back to byte 0.
  std::string idx = ReadBytes(tmp / "c.idx");
  const int32_t lengths[3] = {4, 6, 5};
  const int64_t pointers[3] = {10, 18, 0};
  std::memcpy(idx.data() + kIndexHeaderBytes, lengths, sizeof(lengths));
  std::memcpy(idx.data() + kIndexHeaderBytes + sizeof(lengths), pointers, sizeof(pointers));
  testing::WriteBytes(tmp / "c.idx", idx);
  auto ds = IndexedDataset::Open(tmp / "c");
  REQUIRE(ds.ok());
  std::vector<int32_t> stream;
  for (int d : {1, 2, 0}) stream.insert(stream.end(), docs[d].begin(), docs[d].end());
  REQUIRE((*ds)->num_tokens() == static_cast<int64_t>(stream.size()));
  for (int64_t b = 0; b < (*ds)->num_tokens(); ++b) {
    for (int64_t n = 1; b + n <= (*ds)->num_tokens(); ++n) {
      std::vector<int32_t> got(n);
      REQUIRE((*ds)->Read(b, n, got.data()).ok());
      INFO("tokens [" << b << ", " << b + n << ")");
      CHECK(got == std::vector<int32_t>(stream.begin() + b, stream.begin() + b + n));
    }
  }
  std::vector<int64_t> seq;
  REQUIRE((*ds)->ReadSequence(2, &seq).ok());
  CHECK(seq == std::vector<int64_t>{1, 2, 3, 4, 5});
  CHECK((*ds)->Validate(16).ok());
  absl::Status s = (*ds)->Validate(15);
  CHECK_THAT(std::string(s.message()), Catch::Contains("token 15 at token offset 9 (sequence 1, byte 28)"));
}

TEST_CASE("dtype for the vocabulary and the prefix helpers") {
  CHECK(IndexedDatasetWriter::DTypeForVocab(257) == MegatronDType::kUint16);
  CHECK(IndexedDatasetWriter::DTypeForVocab(65535) == MegatronDType::kUint16);
  CHECK(IndexedDatasetWriter::DTypeForVocab(65536) == MegatronDType::kInt32);
  CHECK(IndexedDatasetPrefix("a/b.bin") == "a/b");
  CHECK(IndexedDatasetPrefix("a/b.idx") == "a/b");
  CHECK(IndexedDatasetPrefix("a/b") == "a/b");
  for (int code = 1; code <= 8; ++code) {
    CHECK(MegatronDTypeSize(static_cast<MegatronDType>(code)) > 0);
  }
  CHECK_FALSE(IsMegatronDTypeCode(0));
  CHECK_FALSE(IsMegatronDTypeCode(9));
}

}  // namespace
}  // namespace moe::data
