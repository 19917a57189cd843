// libFuzzer: opening and reading an HDF5 token dataset (data.format = "hdf5").
//
// Structure-aware: the input does not become the .h5 file's bytes. It chooses
// what a well-formed but hostile file holds at "tokens" (a dataset of any
// integer, float, string or compound type, of rank 0 to 3 or a null
// dataspace, contiguous, compact or chunked and partly unwritten, with any
// values; or a group; or nothing) and the harness writes that file through
// the HDF5 API. Byte-level mutation of the file itself crashes libhdf5 1.10
// (Debian 12) inside its own metadata parsing (e.g. a NULL read in
// H5F__accum_read under H5Lexists, found by this harness's first version);
// that is the library's hardening to do, not something this reader can check
// before handing the file to it (README, Data: trust the .h5 files you train on).
// Whatever Open accepts must validate and read without touching memory out of
// bounds, and every token Read returns must be a non-negative int32.
#include <fuzzer/FuzzedDataProvider.h>
#include <hdf5.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "data/h5_status.h"
#include "data/hdf5_dataset.h"
#include "fuzz_util.h"

namespace {

using moe::data::H5Id;

// The file types a token dataset might be written with (the reader must take
// every integer type and refuse the rest by name).
hid_t PickType(FuzzedDataProvider& in, H5Id* owned) {
  switch (in.ConsumeIntegralInRange<int>(0, 13)) {
    case 0:
      return H5T_STD_U8LE;
    case 1:
      return H5T_STD_I8LE;
    case 2:
      return H5T_STD_U16LE;
    case 3:
      return H5T_STD_U16BE;
    case 4:
      return H5T_STD_I16LE;
    case 5:
      return H5T_STD_U32LE;
    case 6:
      return H5T_STD_I32LE;
    case 7:
      return H5T_STD_I32BE;
    case 8:
      return H5T_STD_U64LE;
    case 9:
      return H5T_STD_I64BE;
    case 10:
      return H5T_IEEE_F32LE;
    case 11:
      return H5T_IEEE_F64BE;
    case 12: {
      *owned = H5Id(H5Tcopy(H5T_C_S1));
      H5Tset_size(owned->get(), in.ConsumeIntegralInRange<size_t>(1, 8));
      return owned->get();
    }
    default: {
      *owned = H5Id(H5Tcreate(H5T_COMPOUND, 8));
      H5Tinsert(owned->get(), "id", 0, H5T_STD_I32LE);
      H5Tinsert(owned->get(), "pad", 4, H5T_STD_I32LE);
      return owned->get();
    }
  }
}

// Writes the file the input describes; false when HDF5 refuses the
// description (then there is nothing to read).
bool WriteFile(const std::string& path, FuzzedDataProvider& in) {
  H5Id file(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT));
  if (!file.valid()) return false;
  const int what = in.ConsumeIntegralInRange<int>(0, 7);
  if (what == 0) return true;  // no "tokens" at all
  if (what == 1) return H5Id(H5Gcreate2(file.get(), "tokens", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT)).valid();
  const std::string name = what == 2 ? "nested/tokens" : "tokens";
  H5Id lcpl(H5Pcreate(H5P_LINK_CREATE));
  H5Pset_create_intermediate_group(lcpl.get(), 1);

  H5Id owned_type;
  const hid_t type = PickType(in, &owned_type);
  const int rank = in.ConsumeIntegralInRange<int>(-1, 3);  // -1: a null dataspace
  const bool huge = rank == 1 && in.ConsumeBool();         // 2^20..2^40 tokens, chunked, unwritten
  std::vector<hsize_t> dims, maxdims;
  hsize_t elements = 1;
  for (int d = 0; d < rank; ++d) {
    dims.push_back(huge ? hsize_t{1} << in.ConsumeIntegralInRange<int>(20, 40)
                        : in.ConsumeIntegralInRange<hsize_t>(0, 64));
    elements *= dims.back();
  }
  const int layout = huge ? 2 : in.ConsumeIntegralInRange<int>(0, 2);  // contiguous, compact, chunked
  for (int d = 0; d < rank; ++d) maxdims.push_back(layout == 2 && in.ConsumeBool() ? H5S_UNLIMITED : dims[d]);
  H5Id space(rank < 0    ? H5Screate(H5S_NULL)
             : rank == 0 ? H5Screate(H5S_SCALAR)
                         : H5Screate_simple(rank, dims.data(), maxdims.data()));
  if (!space.valid()) return false;
  H5Id dcpl(H5Pcreate(H5P_DATASET_CREATE));
  if (layout == 1) H5Pset_layout(dcpl.get(), H5D_COMPACT);
  if (layout == 2 && rank > 0) {
    std::vector<hsize_t> chunk;
    for (int d = 0; d < rank; ++d) chunk.push_back(in.ConsumeIntegralInRange<hsize_t>(1, 64));
    H5Pset_chunk(dcpl.get(), rank, chunk.data());
  }
  if (in.ConsumeBool()) {  // a fill value for what is never written
    std::vector<uint8_t> fill = in.ConsumeBytes<uint8_t>(H5Tget_size(type));
    fill.resize(H5Tget_size(type));
    H5Pset_fill_value(dcpl.get(), type, fill.data());
  }
  H5Id ds(H5Dcreate2(file.get(), name.c_str(), type, space.get(), lcpl.get(), dcpl.get(), H5P_DEFAULT));
  if (!ds.valid()) return false;
  if (!huge && rank >= 0 && elements > 0 && in.ConsumeBool()) {  // the values, else the fill value
    std::vector<uint8_t> bytes = in.ConsumeBytes<uint8_t>(elements * H5Tget_size(type));
    bytes.resize(elements * H5Tget_size(type));
    if (H5Dwrite(ds.get(), type, H5S_ALL, H5S_ALL, H5P_DEFAULT, bytes.data()) < 0) return false;
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  const std::string path = moe::fuzz::ScratchDir() + "/tokens.h5";
  {
    moe::data::ScopedH5Quiet quiet;
    if (!WriteFile(path, in)) return 0;
  }
  auto ds = moe::data::Hdf5TokenDataset::Open(path, "tokens");
  if (!ds.ok()) return 0;
  const int64_t tokens = (*ds)->num_tokens();
  if (tokens <= (int64_t{1} << 16)) (void)(*ds)->Validate(in.ConsumeIntegralInRange<int64_t>(1, 1 << 17));
  std::vector<int32_t> out(64);
  for (int64_t begin : {int64_t{0}, tokens / 3, tokens - 64, tokens - 1, tokens}) {
    const int64_t count = std::min<int64_t>(64, tokens - begin);
    if (begin < 0 || count < 0) continue;
    if (!(*ds)->Read(begin, count, out.data()).ok()) continue;
    for (int64_t j = 0; j < count; ++j) {
      if (out[j] < 0) std::abort();  // Read promises token ids in [0, 2^31)
    }
  }
  (void)(*ds)->Read(-1, 1, out.data());  // refused, not read
  (void)(*ds)->Read(tokens, std::min<int64_t>(64, 1), out.data());
  return 0;
}
