// A token corpus seen as one stream: every sequence of the dataset, in file
// order, concatenated. The sampler cuts this stream into training samples; it
// never needs to know whether the tokens live in a Megatron .bin/.idx pair or in
// an HDF5 dataset.
#ifndef MOE_DATA_TOKEN_SOURCE_H_
#define MOE_DATA_TOKEN_SOURCE_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"

namespace moe::data {

class TokenSource {
 public:
  virtual ~TokenSource() = default;

  // Total number of tokens in the concatenated stream.
  virtual int64_t num_tokens() const = 0;

  // Copies tokens [begin, begin + count) of the stream to out[0..count).
  // Errors: the range is outside [0, num_tokens()), a token is negative or does
  // not fit int32, or the underlying file read fails. Whether concurrent calls
  // are safe is stated by each implementation.
  virtual absl::Status Read(int64_t begin, int64_t count, int32_t* out) const = 0;

  // Scans every token once: an error names the file and the token offset of the
  // first token that is negative or >= vocab_size (and the fix).
  virtual absl::Status Validate(int64_t vocab_size) const = 0;

  // The file(s) this stream comes from, for messages: "data/corpus.{bin,idx}".
  virtual std::string Describe() const = 0;
};

}  // namespace moe::data

#endif  // MOE_DATA_TOKEN_SOURCE_H_
