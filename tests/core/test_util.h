// Helpers for runtime/core tests: host tensors from vectors, random fills,
// comparisons that print the worst element.
#ifndef MOE_TESTS_CORE_TEST_UTIL_H_
#define MOE_TESTS_CORE_TEST_UTIL_H_

#include <catch2/catch.hpp>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "runtime/core/attention_gemm.h"
#include "runtime/core/backend.h"
#include "runtime/core/ops.h"
#include "runtime/core/tensor.h"
#include "tests/compare.h"

namespace moe::testing {

inline Backend& Cpu() { return **GetBackend(Device::Cpu()); }
inline Stream& S() { return Cpu().default_stream(); }

inline Tensor NewF32(Shape shape, MemoryCategory c = MemoryCategory::kActivations) {
  auto t = Tensor::Zeros(Cpu(), shape, DType::kF32, c);
  REQUIRE(t.ok());
  return *t;
}

inline Tensor FromVec(Shape shape, const std::vector<float>& v) {
  REQUIRE(static_cast<int64_t>(v.size()) == shape.numel());
  auto t = Tensor::FromHost(Cpu(), shape, DType::kF32, v.data(), v.size() * 4, MemoryCategory::kActivations);
  REQUIRE(t.ok());
  return *t;
}

inline Tensor FromVecI32(Shape shape, const std::vector<int32_t>& v) {
  REQUIRE(static_cast<int64_t>(v.size()) == shape.numel());
  auto t = Tensor::FromHost(Cpu(), shape, DType::kI32, v.data(), v.size() * 4, MemoryCategory::kActivations);
  REQUIRE(t.ok());
  return *t;
}

inline Tensor Random(Shape shape, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(shape.numel());
  for (auto& x : v) x = dist(gen);
  return FromVec(shape, v);
}

inline std::vector<float> Vec(const Tensor& t) {
  const float* p = t.data<float>();
  return std::vector<float>(p, p + t.numel());
}

inline std::vector<double> Vd(const Tensor& t) {
  std::vector<float> v = Vec(t);
  return std::vector<double>(v.begin(), v.end());
}

inline Tensor Clone(const Tensor& t) { return FromVec(t.shape(), Vec(t)); }

// |got - want| <= atol + rtol * |want| elementwise; prints the worst element.
// NaN or Inf on either side fails (tests/compare.h).
inline void ExpectClose(const std::vector<float>& got, const std::vector<double>& want, double rtol,
                        double atol, const std::string& what) {
  const Closeness c = Compare(got, want, Tolerance{.rtol = rtol, .atol = atol}, what);
  INFO(c.message);
  CHECK(c.ok);
}

inline void ExpectClose(const Tensor& got, const std::vector<double>& want, double rtol, double atol,
                        const std::string& what) {
  ExpectClose(Vec(got), want, rtol, atol, what);
}

inline void ExpectEqual(const Tensor& a, const Tensor& b, const std::string& what) {
  std::vector<float> va = Vec(a), vb = Vec(b);
  REQUIRE(va.size() == vb.size());
  size_t bad = 0;
  for (size_t i = 0; i < va.size(); ++i)
    if (va[i] != vb[i]) ++bad;
  INFO(what << ": " << bad << " of " << va.size() << " elements differ");
  CHECK(bad == 0);
}

// While alive: attention takes the gemm path (attention_gemm.h) with `chunk` query
// rows per chunk for batch B, H query heads and sequence S (the workspace sized
// to give it).
class GemmAttentionScope {
 public:
  GemmAttentionScope(int64_t chunk, int64_t B, int64_t H, int64_t S) : saved_(attn::AttentionSettingsRef()) {
    attn::AttentionSettingsRef().path = attn::AttentionPath::kGemm;
    attn::AttentionSettingsRef().workspace_bytes =
        chunk * 2 * B * H * S * static_cast<int64_t>(sizeof(float));
  }
  ~GemmAttentionScope() { attn::AttentionSettingsRef() = saved_; }
  GemmAttentionScope(const GemmAttentionScope&) = delete;
  GemmAttentionScope& operator=(const GemmAttentionScope&) = delete;

 private:
  attn::AttentionSettings saved_;
};

}  // namespace moe::testing

#endif  // MOE_TESTS_CORE_TEST_UTIL_H_
