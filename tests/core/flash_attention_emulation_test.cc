// The CUDA flash attention kernels (runtime/core/cuda/cuda_flash_attention.cu,
// the real source) run on the CPU under tests/core/cuda_emulation.h, against
// a float64 evaluation of the attention contract (ops::CausalAttention): the
// forward's out and lse and the backward's dq, dk and dv. Their tiling,
// indexing, masking, GQA head loops, online softmax and barriers run as
// written; the wmma products as documented. The bound is a bf16 step: P and
// dS are rounded to bf16 before their products and every output is bf16 (the
// largest error seen is 3.4e-3 of the largest reference value).
//
// The kernels are compiled into this test and into nothing else here: the
// test links no runtime library, so moe::cuda's names are this file's.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#define MOE_CUDA_EMULATION 1
// clang-format off
#include "tests/core/cuda_emulation.h"
#include "runtime/core/cuda/cuda_flash_attention.cu"
// clang-format on

namespace moe {
namespace {

using cuda::AttentionShape;

uint16_t ToBf16(float f) { return kmath::F32ToBF16(f); }
double Wide(uint16_t b) { return kmath::BF16ToF32(b); }

struct Case {
  int64_t batch, seq, heads, kv_heads, head_dim;
  float q_scale;  // larger: sharper softmax rows (the online rescaling at work)
};

// max |got - want| / max(1, max |want|): relative to the outputs' scale, which
// is about 1 and more here, and absolute where the contract's value is 0 (dq
// and dk of a one-key row: a softmax over one key has no score gradient).
double RelError(const std::vector<double>& want, const std::vector<double>& got) {
  double worst = 0, scale = 1.0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double e = std::isfinite(got[i]) ? std::fabs(got[i] - want[i]) : INFINITY;
    worst = std::max(worst, e);
    scale = std::max(scale, std::fabs(want[i]));
  }
  return worst / scale;
}

void Check(const Case& c, uint32_t seed) {
  const int64_t B = c.batch, S = c.seq, H = c.heads, Hkv = c.kv_heads, D = c.head_dim, G = H / Hkv;
  INFO("B " << B << " S " << S << " H " << H << "/" << Hkv << " hd " << D << " q scale " << c.q_scale);
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t nq = B * S * H * D, nk = B * S * Hkv * D;
  // Outputs start as bf16 NaN: an element a kernel fails to write shows.
  std::vector<uint16_t> q(nq), k(nk), v(nk), dout(nq), out(nq, 0xffff), dq(nq, 0xffff), dk(nk, 0xffff),
      dv(nk, 0xffff);
  for (uint16_t& x : q) x = ToBf16(normal(gen) * c.q_scale);
  for (uint16_t& x : k) x = ToBf16(normal(gen) * 1.5f);
  for (uint16_t& x : v) x = ToBf16(normal(gen));
  for (uint16_t& x : dout) x = ToBf16(normal(gen));
  std::vector<float> lse(B * H * S, NAN), delta(B * H * S, NAN);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const AttentionShape sh{B, S, H, Hkv, D};
  REQUIRE(cuda::FlashAttentionShapeOk(sh));
  REQUIRE(cuda::LaunchFlashAttentionForward(q.data(), k.data(), v.data(), scale, out.data(), lse.data(), sh,
                                            nullptr) == cudaSuccess);
  REQUIRE(cuda::LaunchFlashAttentionBackward(q.data(), k.data(), v.data(), out.data(), lse.data(), scale,
                                             dout.data(), dq.data(), dk.data(), dv.data(), delta.data(), sh,
                                             nullptr) == cudaSuccess);

  // The contract in float64 (delta from the kernel's bf16 out, as training has it).
  std::vector<double> rout(nq), rlse(B * H * S), rdq(nq, 0.0), rdk(nk, 0.0), rdv(nk, 0.0);
  auto qi = [&](int64_t b, int64_t i, int64_t h) { return ((b * S + i) * H + h) * D; };
  auto ki = [&](int64_t b, int64_t j, int64_t hk) { return ((b * S + j) * Hkv + hk) * D; };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < S; ++i) {
        const int64_t hk = h / G, qo = qi(b, i, h);
        std::vector<double> p(i + 1);
        double mx = -INFINITY;
        for (int64_t j = 0; j <= i; ++j) {
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += Wide(q[qo + d]) * Wide(k[ki(b, j, hk) + d]);
          p[j] = scale * dot;
          mx = std::max(mx, p[j]);
        }
        double sum = 0;
        for (double s : p) sum += std::exp(s - mx);
        const double l = mx + std::log(sum);
        rlse[(b * H + h) * S + i] = l;
        for (double& x : p) x = std::exp(x - l);
        double dl = 0;
        for (int64_t d = 0; d < D; ++d) {
          double acc = 0;
          for (int64_t j = 0; j <= i; ++j) acc += p[j] * Wide(v[ki(b, j, hk) + d]);
          rout[qo + d] = acc;
          dl += Wide(dout[qo + d]) * Wide(out[qo + d]);
        }
        for (int64_t j = 0; j <= i; ++j) {
          double dp = 0;
          for (int64_t d = 0; d < D; ++d) dp += Wide(dout[qo + d]) * Wide(v[ki(b, j, hk) + d]);
          const double ds = p[j] * (dp - dl);
          for (int64_t d = 0; d < D; ++d) {
            rdq[qo + d] += scale * ds * Wide(k[ki(b, j, hk) + d]);
            rdk[ki(b, j, hk) + d] += scale * ds * Wide(q[qo + d]);
            rdv[ki(b, j, hk) + d] += p[j] * Wide(dout[qo + d]);
          }
        }
      }
  auto widen = [](const std::vector<uint16_t>& x) {
    std::vector<double> w(x.size());
    for (size_t i = 0; i < x.size(); ++i) w[i] = Wide(x[i]);
    return w;
  };
  const std::vector<double> glse(lse.begin(), lse.end());
  CHECK(RelError(rout, widen(out)) < 1e-2);
  CHECK(RelError(rlse, glse) < 1e-5);
  CHECK(RelError(rdq, widen(dq)) < 1e-2);
  CHECK(RelError(rdk, widen(dk)) < 1e-2);
  CHECK(RelError(rdv, widen(dv)) < 1e-2);
}

TEST_CASE("flash attention kernels, emulated on the CPU, match the float64 contract") {
  // Every head size; sequences of 1, inside a tile, one past a tile, several
  // tiles; GQA groups of 1, 2 and 4; sharp softmax rows.
  Check({1, 1, 2, 2, 64, 1.5f}, 1);
  Check({3, 65, 2, 1, 32, 1.5f}, 2);
  Check({2, 130, 4, 2, 64, 1.5f}, 3);
  Check({1, 129, 4, 1, 128, 12.0f}, 4);
  Check({1, 70, 2, 2, 32, 8.0f}, 5);
}

TEST_CASE("flash attention refuses the shapes its kernels do not take") {
  CHECK_FALSE(cuda::FlashAttentionShapeOk({1, 8, 2, 2, 48}));      // head_dim
  CHECK_FALSE(cuda::FlashAttentionShapeOk({1, 8, 3, 2, 64}));      // heads not a multiple of kv_heads
  CHECK_FALSE(cuda::FlashAttentionShapeOk({1, 8, 0, 2, 64}));      // no heads
  CHECK_FALSE(cuda::FlashAttentionShapeOk({70000, 8, 1, 1, 64}));  // batch * heads over the grid's y limit
  CHECK(cuda::FlashAttentionShapeOk({4, 2048, 16, 4, 64}));
}

}  // namespace
}  // namespace moe
