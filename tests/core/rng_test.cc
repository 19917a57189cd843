// Philox4x32-10 known answers and slice-independent initialisation.
#include "runtime/core/rng.h"

#include <cmath>

#include "runtime/core/status.h"
#include "tests/core/test_util.h"

namespace moe {
namespace {
using namespace moe::testing;

TEST_CASE("Philox4x32-10 known-answer vectors (Random123)") {
  CHECK(Philox4x32_10({0, 0, 0, 0}, {0, 0}) ==
        PhiloxCounter{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u});
  CHECK(Philox4x32_10({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, {0xffffffffu, 0xffffffffu}) ==
        PhiloxCounter{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu});
  CHECK(Philox4x32_10({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, {0xa4093822u, 0x299f31d0u}) ==
        PhiloxCounter{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u});
}

TEST_CASE("PhiloxNormal is a standard normal") {
  PhiloxKey key = PhiloxKeyFromName("model.layers.0.self_attn.q_proj.weight");
  double sum = 0, sq = 0;
  const int n = 200000;
  for (int i = 0; i < n; ++i) {
    double z = PhiloxNormal(1234, key, i);
    sum += z;
    sq += z * z;
  }
  double mean = sum / n, var = sq / n - mean * mean;
  CHECK(std::fabs(mean) < 0.01);  // 4.5 standard errors
  CHECK(std::fabs(var - 1) < 0.02);
  CHECK(PhiloxKeyFromName("a") != PhiloxKeyFromName("b"));
  CHECK(PhiloxNormal(1, key, 7) != PhiloxNormal(2, key, 7));
}

TEST_CASE("InitNormal: the same (seed, name, index) whatever the slice") {
  const char* name = "model.layers.1.mlp.experts.gate_proj";
  Shape global({4, 6, 10});
  Tensor full = NewF32(global);
  REQUIRE(ops::InitNormal(S(), full, 99, name, 0.02f).ok());
  // Element i of the full tensor is 0.02 * PhiloxNormal(seed, key(name), i).
  PhiloxKey key = PhiloxKeyFromName(name);
  for (int64_t i : {0, 1, 59, 239}) CHECK(full.data<float>()[i] == 0.02f * PhiloxNormal(99, key, i));
  // An expert shard (dim 0) and a TP shard (dims 1 and 2) of it.
  for (auto [off, box] : {std::pair<std::vector<int64_t>, Shape>{{2, 0, 0}, {2, 6, 10}},
                          {{1, 3, 0}, {2, 3, 10}},
                          {{0, 1, 4}, {4, 5, 3}},
                          {{3, 5, 9}, {1, 1, 1}}}) {
    Tensor part = NewF32(box);
    REQUIRE(ops::InitNormal(S(), part, 99, name, global, off, 0.02f).ok());
    std::vector<double> want;
    for (int64_t a = 0; a < box[0]; ++a)
      for (int64_t b = 0; b < box[1]; ++b)
        for (int64_t c = 0; c < box[2]; ++c)
          want.push_back(full.data<float>()[((off[0] + a) * 6 + off[1] + b) * 10 + off[2] + c]);
    ExpectClose(part, want, 0, 0, "slice " + box.ToString());
  }
  // A contiguous row slice used as a 1-D box of the flattened tensor.
  Tensor rows = NewF32({60});
  REQUIRE(ops::InitNormal(S(), rows, 99, name, Shape({240}), std::vector<int64_t>{120}, 0.02f).ok());
  ExpectEqual(rows, full.Select(2).Reshape({60}), "flat slice");
  // Out-of-range boxes are rejected.
  CHECK(
      !ops::InitNormal(S(), NewF32({2, 6, 10}), 99, name, global, std::vector<int64_t>{3, 0, 0}, 0.02f).ok());
  CHECK(!ops::InitNormal(S(), NewF32({2, 6}), 99, name, global, std::vector<int64_t>{0, 0}, 0.02f).ok());
  // Another name gives other values.
  Tensor other = NewF32(global);
  REQUIRE(ops::InitNormal(S(), other, 99, "model.layers.1.mlp.experts.up_proj", 0.02f).ok());
  CHECK(Vec(other) != Vec(full));
}

}  // namespace
}  // namespace moe
