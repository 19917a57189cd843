// Counter-based random numbers: Philox4x32-10 (Salmon et al., "Parallel random
// numbers: as easy as 1, 2, 3", SC'11), as in Random123.
//
// Initialisation uses it so that element i of parameter P depends only on
// (seed, P's canonical name, i) (docs/design.md invariant 2); ops::InitNormal is the
// device entry point, these are the host building blocks (and tests' KATs).
#ifndef MOE_RUNTIME_CORE_RNG_H_
#define MOE_RUNTIME_CORE_RNG_H_

#include <array>
#include <cstdint>

#include "absl/strings/string_view.h"

namespace moe {

using PhiloxCounter = std::array<uint32_t, 4>;
using PhiloxKey = std::array<uint32_t, 2>;

// Ten rounds of Philox4x32 on `counter` with `key`.
PhiloxCounter Philox4x32_10(PhiloxCounter counter, PhiloxKey key);

// 64-bit FNV-1a of the name, finished with a SplitMix64 mix; lo word first.
PhiloxKey PhiloxKeyFromName(absl::string_view name);

// The Normal(0, 1) value of element `index` of the tensor named by `key` under
// `seed`: counter = {index lo, index hi, seed lo, seed hi}; u1, u2 in (0, 1]
// from the first two output words ((w + 1) * 2^-32); result
// sqrt(-2 ln u1) * cos(2 pi u2), computed in double.
float PhiloxNormal(uint64_t seed, PhiloxKey key, uint64_t index);

}  // namespace moe

#endif  // MOE_RUNTIME_CORE_RNG_H_
