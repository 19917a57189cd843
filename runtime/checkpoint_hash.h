// XXH64 (xxHash, 64-bit, Yann Collet's specification), the checksum of every
// checkpoint shard and of the manifest. Implemented here so the format does not
// depend on a library version; results equal the reference `xxh64sum`.
//
//   Xxh64 h;                      // seed 0
//   h.Update(data, nbytes);       // any number of calls, any sizes
//   uint64_t sum = h.Digest();    // == Xxh64Hash(all the bytes)
#ifndef MOE_RUNTIME_CHECKPOINT_HASH_H_
#define MOE_RUNTIME_CHECKPOINT_HASH_H_

#include <cstddef>
#include <cstdint>
#include <string>

namespace moe {

class Xxh64 {
 public:
  explicit Xxh64(uint64_t seed = 0);
  void Update(const void* data, size_t nbytes);
  uint64_t Digest() const;

 private:
  uint64_t v_[4];
  uint64_t seed_;
  uint64_t total_ = 0;
  unsigned char buffer_[32];
  size_t buffered_ = 0;
};

uint64_t Xxh64Hash(const void* data, size_t nbytes, uint64_t seed = 0);

// "0123456789abcdef" (16 lower-case hex digits).
std::string ChecksumHex(uint64_t checksum);

}  // namespace moe

#endif  // MOE_RUNTIME_CHECKPOINT_HASH_H_
