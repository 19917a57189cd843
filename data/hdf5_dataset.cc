#include "data/hdf5_dataset.h"

#include <sys/stat.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "runtime/core/status.h"

namespace moe::data {

absl::StatusOr<std::unique_ptr<Hdf5TokenDataset>> Hdf5TokenDataset::Open(const std::string& path,
                                                                         const std::string& dataset) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) {
    return absl::NotFoundError(absl::StrCat(path,
                                            ": no such file; with data.format = \"hdf5\", "
                                            "data.train_path / data.valid_path name an .h5 file"));
  }
  ScopedH5Quiet quiet;
  if (H5Fis_hdf5(path.c_str()) <= 0) {
    H5Eclear2(H5E_DEFAULT);
    return absl::InvalidArgumentError(
        absl::StrCat(path,
                     ": not an HDF5 file; data.format = \"hdf5\" needs one (for a Megatron .bin/.idx "
                     "prefix set data.format = \"megatron\")"));
  }
  std::unique_ptr<Hdf5TokenDataset> ds(new Hdf5TokenDataset());
  ds->path_ = path;
  ds->dataset_name_ = dataset;
  ds->file_ = H5Id(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT));
  if (!ds->file_.valid()) return H5Error("H5Fopen", path, __FILE__, __LINE__);
  if (H5Lexists(ds->file_.get(), dataset.c_str(), H5P_DEFAULT) <= 0) {
    H5Eclear2(H5E_DEFAULT);
    return absl::NotFoundError(absl::StrCat(path, ": no dataset \"", dataset,
                                            "\"; set data.hdf5_dataset to the path of the 1-D token "
                                            "dataset inside the file (h5ls -r ",
                                            path, " lists them)"));
  }
  ds->dataset_ = H5Id(H5Dopen2(ds->file_.get(), dataset.c_str(), H5P_DEFAULT));
  if (!ds->dataset_.valid())
    return H5Error(absl::StrCat("H5Dopen2(\"", dataset, "\")"), path, __FILE__, __LINE__);
  H5Id type(H5Dget_type(ds->dataset_.get()));
  if (!type.valid()) return H5Error("H5Dget_type", path, __FILE__, __LINE__);
  if (H5Tget_class(type.get()) != H5T_INTEGER) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": dataset \"", dataset,
                                                   "\" is not of an integer type; token ids must be stored "
                                                   "as integers (e.g. uint16 or int32)"));
  }
  H5Id space(H5Dget_space(ds->dataset_.get()));
  if (!space.valid()) return H5Error("H5Dget_space", path, __FILE__, __LINE__);
  const int rank = H5Sget_simple_extent_ndims(space.get());
  if (rank != 1) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": dataset \"", dataset, "\" has ", rank,
                                                   " dimensions; the token stream must be 1-D (flatten it)"));
  }
  hsize_t dims[1] = {0};
  if (H5Sget_simple_extent_dims(space.get(), dims, nullptr) < 0) {
    return H5Error("H5Sget_simple_extent_dims", path, __FILE__, __LINE__);
  }
  ds->num_tokens_ = static_cast<int64_t>(dims[0]);
  return ds;
}

std::string Hdf5TokenDataset::Describe() const { return absl::StrCat(path_, ":/", dataset_name_); }

absl::Status Hdf5TokenDataset::ReadRaw(int64_t begin, int64_t count, int64_t* out) const {
  if (begin < 0 || count < 0 || begin > num_tokens_ - count) {
    return absl::OutOfRangeError(absl::StrCat(Describe(), ": token range [", begin, ", ", begin + count,
                                              ") outside the stream of ", num_tokens_, " tokens"));
  }
  if (count == 0) return absl::OkStatus();
  ScopedH5Quiet quiet;
  H5Id file_space(H5Dget_space(dataset_.get()));
  if (!file_space.valid()) return H5Error("H5Dget_space", path_, __FILE__, __LINE__);
  const hsize_t start[1] = {static_cast<hsize_t>(begin)};
  const hsize_t n[1] = {static_cast<hsize_t>(count)};
  RETURN_IF_ERROR(MOE_H5_CHECK_(
      H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, start, nullptr, n, nullptr), path_));
  H5Id mem_space(H5Screate_simple(1, n, nullptr));
  if (!mem_space.valid()) return H5Error("H5Screate_simple", path_, __FILE__, __LINE__);
  RETURN_IF_ERROR(MOE_H5_CHECK_(
      H5Dread(dataset_.get(), H5T_NATIVE_INT64, mem_space.get(), file_space.get(), H5P_DEFAULT, out), path_));
  return absl::OkStatus();
}

absl::Status Hdf5TokenDataset::Read(int64_t begin, int64_t count, int32_t* out) const {
  std::vector<int64_t> raw(static_cast<size_t>(std::max<int64_t>(count, 0)));
  RETURN_IF_ERROR(ReadRaw(begin, count, raw.data()));
  for (int64_t j = 0; j < count; ++j) {
    if (raw[j] < 0 || raw[j] > std::numeric_limits<int32_t>::max()) {
      return absl::DataLossError(absl::StrCat(Describe(), ": token ", raw[j], " at offset ", begin + j,
                                              " is not a token id in [0, 2^31); run Validate(vocab_size)"));
    }
    out[j] = static_cast<int32_t>(raw[j]);
  }
  return absl::OkStatus();
}

absl::Status Hdf5TokenDataset::Validate(int64_t vocab_size) const {
  constexpr int64_t kChunk = 1 << 20;
  std::vector<int64_t> raw(static_cast<size_t>(std::min(kChunk, std::max<int64_t>(num_tokens_, 1))));
  for (int64_t begin = 0; begin < num_tokens_; begin += kChunk) {
    const int64_t count = std::min(kChunk, num_tokens_ - begin);
    RETURN_IF_ERROR(ReadRaw(begin, count, raw.data()));
    for (int64_t j = 0; j < count; ++j) {
      if (raw[j] < 0 || raw[j] >= vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat(Describe(), ": token ", raw[j], " at token offset ", begin + j,
                         " is outside [0, model.vocab_size = ", vocab_size,
                         "); set model.vocab_size to the tokenizer's vocabulary or re-tokenize the data"));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace moe::data
