// A .bin that shrinks while a job reads it (issue 18): reads fail with a
// DataLoss error naming the file and both sizes instead of SIGBUS.
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
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace moe::data
