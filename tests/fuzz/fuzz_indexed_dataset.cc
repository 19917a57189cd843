// libFuzzer: the Megatron .idx/.bin reader. Input: a 4-byte little-endian
// length n, then n bytes of .idx, then the .bin. Open must refuse anything
// malformed with a Status; whatever it accepts must validate and read
// without touching memory outside the mapping.
#include <algorithm>
#include <cstring>
#include <vector>

#include "data/indexed_dataset.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 4) return 0;
  uint32_t n = 0;
  std::memcpy(&n, data, 4);
  data += 4;
  size -= 4;
  n = std::min<uint32_t>(n, static_cast<uint32_t>(size));
  moe::fuzz::WriteScratch("ds.idx", data, n);
  moe::fuzz::WriteScratch("ds.bin", data + n, size - n);
  auto ds = moe::data::IndexedDataset::Open(moe::fuzz::ScratchDir() + "/ds");
  if (!ds.ok()) return 0;
  (void)(*ds)->Validate(257);
  const int64_t tokens = (*ds)->num_tokens();
  std::vector<int32_t> out(64);
  for (int64_t begin : {int64_t{0}, tokens / 2, tokens - 64}) {
    if (begin < 0) continue;
    (void)(*ds)->Read(begin, std::min<int64_t>(64, tokens - begin), out.data());
  }
  std::vector<int64_t> seq;
  for (int64_t s = 0; s < std::min<int64_t>((*ds)->num_sequences(), 8); ++s)
    (void)(*ds)->ReadSequence(s, &seq);
  return 0;
}
