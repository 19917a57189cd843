// The HDF5 token dataset on files written here with the HDF5 C API.
#include "data/hdf5_dataset.h"

#include <hdf5.h>

#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "runtime/core/config.h"
#include "tests/data/data_test_util.h"

namespace moe::data {
namespace {

using Catch::Contains;
using testing::TempDir;

// Writes `values` as dataset `name` of file type `file_type` with `rank` dims
// (rank 2: shape [2, n/2]).
void WriteH5(const std::string& path, const std::string& name, hid_t file_type, hid_t mem_type,
             const void* values, hsize_t n, int rank = 1) {
  hid_t f = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  REQUIRE(f >= 0);
  hsize_t dims[2] = {n, 1};
  if (rank == 2) dims[0] = 2, dims[1] = n / 2;
  hid_t space = H5Screate_simple(rank, dims, nullptr);
  hid_t group = H5Gcreate2(f, "corpus", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  hid_t ds = H5Dcreate2(f, name.c_str(), file_type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  REQUIRE(ds >= 0);
  REQUIRE(H5Dwrite(ds, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, values) >= 0);
  H5Dclose(ds);
  H5Gclose(group);
  H5Sclose(space);
  H5Fclose(f);
}

TEST_CASE("reads a 1-D uint16 and int64 token dataset, in any window") {
  TempDir tmp;
  std::vector<uint16_t> u16(1000);
  for (size_t i = 0; i < u16.size(); ++i) u16[i] = static_cast<uint16_t>((i * 7) % 257);
  WriteH5(tmp / "u16.h5", "tokens", H5T_STD_U16LE, H5T_NATIVE_UINT16, u16.data(), u16.size());
  auto ds = Hdf5TokenDataset::Open(tmp / "u16.h5", "tokens");
  REQUIRE(ds.ok());
  CHECK((*ds)->num_tokens() == 1000);
  CHECK((*ds)->Describe() == tmp / "u16.h5:/tokens");
  std::vector<int32_t> out(1000);
  REQUIRE((*ds)->Read(0, 1000, out.data()).ok());
  for (size_t i = 0; i < u16.size(); ++i) REQUIRE(out[i] == u16[i]);
  REQUIRE((*ds)->Read(993, 7, out.data()).ok());
  CHECK(out[0] == u16[993]);
  CHECK(out[6] == u16[999]);
  CHECK((*ds)->Read(995, 6, out.data()).code() == absl::StatusCode::kOutOfRange);
  CHECK((*ds)->Validate(257).ok());
  absl::Status v = (*ds)->Validate(256);  // 110 * 7 = 2 * 257 + 256
  CHECK_THAT(std::string(v.message()),
             Contains("u16.h5:/tokens") && Contains("token 256 at token offset 110"));

  // A dataset inside a group, of a signed 64-bit type, with a negative token.
  std::vector<int64_t> i64 = {5, 6, 7, -3, 9};
  WriteH5(tmp / "i64.h5", "corpus/ids", H5T_STD_I64LE, H5T_NATIVE_INT64, i64.data(), i64.size());
  auto g = Hdf5TokenDataset::Open(tmp / "i64.h5", "corpus/ids");
  REQUIRE(g.ok());
  REQUIRE((*g)->Read(0, 3, out.data()).ok());
  CHECK((out[0] == 5 && out[1] == 6 && out[2] == 7));
  CHECK_THAT(std::string((*g)->Read(2, 3, out.data()).message()), Contains("token -3 at offset 3"));
  CHECK_THAT(std::string((*g)->Validate(100).message()), Contains("token -3 at token offset 3"));
}

TEST_CASE("bad HDF5 inputs: missing file, not HDF5, no dataset, 2-D, float") {
  TempDir tmp;
  auto missing = Hdf5TokenDataset::Open(tmp / "none.h5", "tokens");
  CHECK_THAT(std::string(missing.status().message()), Contains("none.h5: no such file"));
  testing::WriteBytes(tmp / "text.h5", "just text");
  CHECK_THAT(std::string(Hdf5TokenDataset::Open(tmp / "text.h5", "tokens").status().message()),
             Contains("not an HDF5 file"));
  std::vector<int32_t> v = {1, 2, 3, 4};
  WriteH5(tmp / "a.h5", "ids", H5T_STD_I32LE, H5T_NATIVE_INT32, v.data(), 4);
  CHECK_THAT(std::string(Hdf5TokenDataset::Open(tmp / "a.h5", "tokens").status().message()),
             Contains("no dataset \"tokens\"") && Contains("data.hdf5_dataset"));
  WriteH5(tmp / "b.h5", "tokens", H5T_STD_I32LE, H5T_NATIVE_INT32, v.data(), 4, 2);
  CHECK_THAT(std::string(Hdf5TokenDataset::Open(tmp / "b.h5", "tokens").status().message()),
             Contains("has 2 dimensions"));
  std::vector<float> f = {1, 2, 3, 4};
  WriteH5(tmp / "c.h5", "tokens", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, f.data(), 4);
  CHECK_THAT(std::string(Hdf5TokenDataset::Open(tmp / "c.h5", "tokens").status().message()),
             Contains("not of an integer type"));
}

TEST_CASE("OpenTrainingData with data.format = hdf5") {
  TempDir tmp;
  std::vector<int32_t> tokens(4 * 40 + 1);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>(i % 257);
  WriteH5(tmp / "t.h5", "tokens", H5T_STD_I32LE, H5T_NATIVE_INT32, tokens.data(), tokens.size());
  config::JobConfig c;
  c.mutable_data()->set_format("hdf5");
  c.mutable_data()->set_train_path(tmp / "t.h5");
  c.mutable_model()->set_seq_len(4);
  c.mutable_train()->set_micro_batch(2);
  ApplyDefaults(1, &c);
  auto d = OpenTrainingData(c, 1);
  REQUIRE(d.ok());
  CHECK((*d)->train->num_samples() == 38);
  CHECK((*d)->valid->num_samples() == 2);  // ceil(0.05 * 40)
  std::vector<int32_t> row(10);
  REQUIRE((*d)->valid->EvalMicroBatch(0, 0, 0, row.data()).ok());
  CHECK(row[0] == 38 * 4);
  CHECK(row[9] == 39 * 4 + 4);
  REQUIRE((*d)->train->MicroBatch(0, 0, row.data()).ok());
}

}  // namespace
}  // namespace moe::data
