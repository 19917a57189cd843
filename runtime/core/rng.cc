#include "runtime/core/rng.h"

#include "runtime/core/kernel_math.h"

namespace moe {

PhiloxCounter Philox4x32_10(PhiloxCounter ctr, PhiloxKey key) {
  kmath::Philox4x32_10(ctr.data(), key[0], key[1]);
  return ctr;
}

PhiloxKey PhiloxKeyFromName(absl::string_view name) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : name) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  // SplitMix64 finaliser: spreads FNV's weak high bits.
  h ^= h >> 30;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 27;
  h *= 0x94d049bb133111ebull;
  h ^= h >> 31;
  return {static_cast<uint32_t>(h), static_cast<uint32_t>(h >> 32)};
}

float PhiloxNormal(uint64_t seed, PhiloxKey key, uint64_t index) {
  return kmath::PhiloxNormal(seed, key[0], key[1], index);
}

}  // namespace moe
