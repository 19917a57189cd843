// HDF5 in data/: RAII for hid_t and the one place where an HDF5 error becomes
// an absl::Status. HDF5's automatic error printing is switched off around each
// checked call (ScopedH5Quiet) and its error stack is folded into the message
// instead, so a failure reads like every other error of the runtime:
//   "H5Dopen2(\"tokens\") failed at data/hdf5_dataset.cc:42 on corpus.h5:
//    H5Dopen2(): unable to open dataset (component not found)".
#ifndef MOE_DATA_H5_STATUS_H_
#define MOE_DATA_H5_STATUS_H_

#include <hdf5.h>

#include <string>
#include <utility>

#include "absl/status/status.h"

namespace moe::data {

// Owns one HDF5 identifier (file, dataset, dataspace, datatype, property list)
// and closes it with the matching H5?close. Move-only.
class H5Id {
 public:
  H5Id() = default;
  explicit H5Id(hid_t id) : id_(id) {}
  ~H5Id() { Reset(); }
  H5Id(H5Id&& o) noexcept : id_(std::exchange(o.id_, H5I_INVALID_HID)) {}
  H5Id& operator=(H5Id&& o) noexcept {
    if (this != &o) {
      Reset();
      id_ = std::exchange(o.id_, H5I_INVALID_HID);
    }
    return *this;
  }
  H5Id(const H5Id&) = delete;
  H5Id& operator=(const H5Id&) = delete;

  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }
  void Reset();

 private:
  hid_t id_ = H5I_INVALID_HID;
};

// Turns off HDF5's printing of error stacks to stderr for its lifetime (the
// stack is read by H5Error instead) and restores the previous handler.
class ScopedH5Quiet {
 public:
  ScopedH5Quiet();
  ~ScopedH5Quiet();
  ScopedH5Quiet(const ScopedH5Quiet&) = delete;
  ScopedH5Quiet& operator=(const ScopedH5Quiet&) = delete;

 private:
  H5E_auto2_t func_ = nullptr;
  void* data_ = nullptr;
};

// The Status for a failed HDF5 call: names the call, the source location, the
// file being accessed, and the innermost messages of HDF5's error stack.
absl::Status H5Error(const std::string& call, const std::string& file, const char* src_file, int src_line);

}  // namespace moe::data

// `expr` returns hid_t or herr_t; negative means failure.
#define MOE_H5_CHECK_(expr, file) \
  ((expr) < 0 ? ::moe::data::H5Error(#expr, (file), __FILE__, __LINE__) : ::absl::OkStatus())

#endif  // MOE_DATA_H5_STATUS_H_
