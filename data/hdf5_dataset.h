// A token corpus stored as one 1-D integer dataset in an HDF5 file
// (data.format = "hdf5", data.train_path = the .h5 file, data.hdf5_dataset = the
// dataset's path inside it, default "tokens"). The dataset is the whole
// concatenated token stream; any integer type HDF5 can convert to int64 works
// (h5py: f.create_dataset("tokens", data=np.array(ids, dtype=np.uint16))).
// Reads are hyperslab reads through the HDF5 C API (serial: H5Fopen with
// H5P_DEFAULT), so the file is never loaded whole.
#ifndef MOE_DATA_HDF5_DATASET_H_
#define MOE_DATA_HDF5_DATASET_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "data/h5_status.h"
#include "data/token_source.h"

namespace moe::data {

// Not thread-safe (the HDF5 library build is not): one thread reads at a time.
class Hdf5TokenDataset : public TokenSource {
 public:
  // Errors: missing file, not an HDF5 file, no such dataset, a dataset that is
  // not 1-D or not of an integer type.
  static absl::StatusOr<std::unique_ptr<Hdf5TokenDataset>> Open(const std::string& path,
                                                                const std::string& dataset);

  int64_t num_tokens() const override { return num_tokens_; }
  absl::Status Read(int64_t begin, int64_t count, int32_t* out) const override;
  absl::Status Validate(int64_t vocab_size) const override;
  std::string Describe() const override;

 private:
  Hdf5TokenDataset() = default;
  // Reads [begin, begin + count) as int64 into out.
  absl::Status ReadRaw(int64_t begin, int64_t count, int64_t* out) const;

  std::string path_;
  std::string dataset_name_;
  H5Id file_;
  H5Id dataset_;
  H5Id file_space_;
  int64_t num_tokens_ = 0;
};

}  // namespace moe::data

#endif  // MOE_DATA_HDF5_DATASET_H_
