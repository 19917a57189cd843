// Helpers for the optimizer tests: a tiny "model" that owns its Parameters
// (CPU f32 tensors), values that are a deterministic function of (name, global
// index, salt), and host copies.
#ifndef MOE_TESTS_OPTIM_OPTIM_TEST_UTIL_H_
#define MOE_TESTS_OPTIM_OPTIM_TEST_UTIL_H_

#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "parallel/parameter.h"
#include "runtime/core/backend.h"
#include "runtime/core/tensor.h"

namespace moe::optim::testing {

inline Backend& Cpu() {
  auto b = GetBackend(Device::Cpu());
  REQUIRE(b.ok());
  return **b;
}

inline Tensor HostTensor(const Shape& shape, const std::vector<float>& values, MemoryCategory c) {
  REQUIRE(static_cast<int64_t>(values.size()) == shape.numel());
  auto t = Tensor::FromHost(Cpu(), shape, DType::kF32, values.data(), values.size() * sizeof(float), c);
  REQUIRE(t.ok());
  return *t;
}

inline std::vector<float> ToVector(const Tensor& t) {
  REQUIRE(t.dtype() == DType::kF32);
  const float* p = t.data<float>();
  return std::vector<float>(p, p + t.numel());
}

inline void SetValues(const Tensor& t, const std::vector<float>& v) {
  REQUIRE(static_cast<int64_t>(v.size()) == t.numel());
  std::memcpy(t.data<float>(), v.data(), v.size() * sizeof(float));
}

// Gives `p` a bf16 compute copy (Parameter::compute, as train.precision bf16
// does) filled with a pattern that no rounding of a finite value produces
// (0xffff is a NaN), so a copy the optimizer skipped shows.
inline void AddComputeCopy(parallel::Parameter& p) {
  auto c = Tensor::Empty(Cpu(), p.value.shape(), DType::kBF16, MemoryCategory::kParameters);
  REQUIRE(c.ok());
  std::memset(c->raw_data(), 0xff, c->nbytes());
  p.compute = *c;
}

// The elements of p's compute copy that differ from its value rounded to bf16
// (round to nearest even), as "index: got/want" lines; empty when all agree.
inline std::vector<std::string> ComputeCopyMismatches(const parallel::Parameter& p) {
  REQUIRE(p.compute.defined());
  REQUIRE(p.compute.numel() == p.value.numel());
  const float* v = p.value.data<float>();
  const uint16_t* c = p.compute.data<uint16_t>();
  std::vector<std::string> bad;
  for (int64_t i = 0; i < p.value.numel(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, &v[i], sizeof(bits));
    bits += 0x7fffu + ((bits >> 16) & 1u);  // finite values only here
    const uint16_t want = static_cast<uint16_t>(bits >> 16);
    if (c[i] != want)
      bad.push_back(std::to_string(i) + ": " + std::to_string(c[i]) + "/" + std::to_string(want));
  }
  return bad;
}

// Element `index` of the global tensor `name` (salt: which tensor/step).
inline float GlobalValue(const std::string& name, int64_t index, int salt) {
  uint32_t h = 2166136261u;
  for (char c : name) h = (h ^ static_cast<uint8_t>(c)) * 16777619u;
  const double x = std::sin(0.731 * static_cast<double>(index) + 0.113 * (h % 1000) + 1.37 * salt);
  return static_cast<float>(0.5 * x + 0.01 * ((index + salt) % 7));
}

// Fills the local tensor `t` of `p` with the global function.
inline void FillShard(const parallel::Parameter& p, const Tensor& t, int salt) {
  float* out = t.data<float>();
  parallel::ForEachLocalRun(p.global_shape, p.shard, [&](int64_t g, int64_t l, int64_t n) {
    for (int64_t j = 0; j < n; ++j) out[l + j] = GlobalValue(p.name, g + j, salt);
  });
}

// A model owning its parameters (stable addresses).
struct TestModel {
  std::vector<std::unique_ptr<parallel::Parameter>> owned;
  parallel::ParameterList list;

  parallel::Parameter* Add(const std::string& name, const Shape& global_shape, parallel::ParamKind kind,
                           parallel::ShardSpec shard, bool weight_decay = true) {
    auto p = std::make_unique<parallel::Parameter>();
    p->name = name;
    p->global_shape = global_shape;
    p->kind = kind;
    p->shard = shard;
    p->weight_decay = weight_decay;
    const Shape local = parallel::LocalShape(global_shape, shard);
    auto v = Tensor::Zeros(Cpu(), local, DType::kF32, MemoryCategory::kParameters);
    auto g = Tensor::Zeros(Cpu(), local, DType::kF32, MemoryCategory::kGradients);
    REQUIRE(v.ok());
    REQUIRE(g.ok());
    p->value = *v;
    p->grad = *g;
    parallel::Parameter* raw = p.get();
    owned.push_back(std::move(p));
    absl::Status st = list.Add(raw);
    INFO(st.ToString());
    REQUIRE(st.ok());
    return raw;
  }
};

}  // namespace moe::optim::testing

#endif  // MOE_TESTS_OPTIM_OPTIM_TEST_UTIL_H_
