// A .bin that shrinks while a job reads it (issue 18): reads fail with a
// DataLoss error naming the file and both sizes instead of SIGBUS (the reader
// maps nothing; its reads are bounded). The job-level behaviour (every rank
// exits 1 with the message) is tests/launch/data_shrink_test.sh.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <string>
#include <vector>

#include "data/indexed_dataset.h"

namespace moe::data {
namespace {

TEST_CASE("a .bin truncated after Open: Read and ReadSequence name the file, no SIGBUS") {
  const std::string dir =
      (std::filesystem::temp_directory_path() / ("moe_truncated_bin_" + std::to_string(::getpid()))).string();
  std::filesystem::create_directories(dir);
  const std::string prefix = dir + "/corpus";
  {
    auto writer = IndexedDatasetWriter::Create(prefix, 257).value();
    std::vector<int32_t> doc(100000, 7);
    for (int d = 0; d < 4; ++d) REQUIRE(writer->AddDocument(doc.data(), doc.size()).ok());
    REQUIRE(writer->Finish().ok());
  }
  auto ds = IndexedDataset::Open(prefix).value();
  std::vector<int32_t> out(1000);
  REQUIRE(ds->Read(0, 1000, out.data()).ok());
  const auto size = std::filesystem::file_size(prefix + ".bin");
  std::filesystem::resize_file(prefix + ".bin", size / 4);  // in place, as `truncate` does

  absl::Status s = ds->Read(ds->num_tokens() - 1000, 1000, out.data());
  REQUIRE(s.code() == absl::StatusCode::kDataLoss);
  const std::string m(s.message());
  CAPTURE(m);
  CHECK(m.find(prefix + ".bin shrank from " + std::to_string(size) + " to " + std::to_string(size / 4)) !=
        std::string::npos);
  std::vector<int64_t> seq;
  CHECK(ds->ReadSequence(3, &seq).code() == absl::StatusCode::kDataLoss);
  // Validate has no size check of its own: its bounded reads come back short
  // past the new end, the same error (a mapped read would raise SIGBUS here).
  s = ds->Validate(257);
  CHECK(s.code() == absl::StatusCode::kDataLoss);
  CHECK_THAT(std::string(s.message()), Catch::Contains(prefix + ".bin shrank from " + std::to_string(size)));
  // Reads before the new end fail too: the job stops at its first read after
  // the file shrank, wherever that read falls.
  CHECK(ds->Read(0, 1000, out.data()).code() == absl::StatusCode::kDataLoss);
  // Emptied: the same, with the size 0 named.
  std::filesystem::resize_file(prefix + ".bin", 0);
  s = ds->Read(0, 10, out.data());
  CHECK_THAT(std::string(s.message()), Catch::Contains("to 0 bytes while the job was reading it"));
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace moe::data
