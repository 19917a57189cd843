// The arithmetic of the kernels, per element and per row: small inline
// functions that the CPU backend's loops call and that a CUDA backend compiles
// as __host__ __device__ (MOE_HOST_DEVICE), so both backends run the same math.
// Nothing here allocates, branches on data in ways a vector unit cannot follow,
// or touches memory beyond its arguments: the CPU loops that call these
// functions vectorise.
#ifndef MOE_RUNTIME_CORE_KERNEL_MATH_H_
#define MOE_RUNTIME_CORE_KERNEL_MATH_H_

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MOE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MOE_HOST_DEVICE inline
#endif

namespace moe::kmath {

MOE_HOST_DEVICE uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
MOE_HOST_DEVICE float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// exp(x) for f32, branch-free so that loops calling it vectorise (Cephes expf):
// x = n ln2 + r with |r| <= ln2 / 2 (n rounded with the 1.5 * 2^23 trick, exact
// without -ffast-math; ln2 split in two so n * C1 is exact), e^r = 1 + r + r^2 P(r)
// with Cephes' degree-5 minimax P, times 2^n assembled in exponent bits (as
// 2^(n/2) 2^(n - n/2), so n = -126 .. 128 all fit). About 1 ulp from the correctly
// rounded exp; x < ln(FLT_MIN) gives 0 (no subnormals), x > ln(FLT_MAX) +inf, NaN stays NaN.
MOE_HOST_DEVICE float Exp(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kC1 = 0.693359375f, kC2 = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  constexpr float kMin = -87.3365447f, kMax = 88.7228391f;
  // NaN clamps to kMin too (it must not reach the float -> int conversion below,
  // which is undefined for NaN); the result is x itself, chosen at the end.
  const float xc = x > kMax ? kMax : (x >= kMin ? x : kMin);
  const float nf = (xc * kLog2e + kRound) - kRound;
  const float r = (xc - nf * kC1) - nf * kC2;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t n = static_cast<int32_t>(nf);
  const int32_t n1 = n >> 1, n2 = n - n1;
  float y =
      p * BitsFloat(static_cast<uint32_t>(n1 + 127) << 23) * BitsFloat(static_cast<uint32_t>(n2 + 127) << 23);
  y = x < kMin ? 0.0f : y;
  y = x > kMax ? INFINITY : y;
  return x != x ? x : y;
}

MOE_HOST_DEVICE float Sigmoid(float z) { return 1.0f / (1.0f + Exp(-z)); }
MOE_HOST_DEVICE float Silu(float z) { return z * Sigmoid(z); }
// d silu(z) / dz.
MOE_HOST_DEVICE float SiluGrad(float z) {
  const float s = Sigmoid(z);
  return s * (1.0f + z * (1.0f - s));
}

// SwiGLU: out = silu(gate) * up; backward: dgate = dout * up * silu'(gate), dup = dout * silu(gate).
MOE_HOST_DEVICE float SwiGLU(float gate, float up) { return Silu(gate) * up; }
MOE_HOST_DEVICE void SwiGLUBackward(float gate, float up, float dout, float* dgate, float* dup) {
  const float s = Sigmoid(gate);
  *dgate = dout * up * (s * (1.0f + gate * (1.0f - s)));
  *dup = dout * gate * s;
}

// RMSNorm, per row of d values: rstd = 1 / sqrt(sum_sq / d + eps); out_i = x_i rstd w_i.
MOE_HOST_DEVICE float RmsNormRstd(double sum_sq, int64_t d, float eps) {
  return static_cast<float>(1.0 / std::sqrt(sum_sq / static_cast<double>(d > 0 ? d : 1) + eps));
}
// Backward, per row: coef = (sum_i w_i dy_i x_i) / d * rstd^2; dx_i = rstd (w_i dy_i - x_i coef).
MOE_HOST_DEVICE float RmsNormBackwardCoef(double dot_wdyx, int64_t d, float rstd) {
  return static_cast<float>(dot_wdyx / static_cast<double>(d > 0 ? d : 1)) * rstd * rstd;
}
MOE_HOST_DEVICE float RmsNormDx(float x, float w, float dy, float rstd, float coef) {
  return rstd * (w * dy - x * coef);
}

// RoPE rotate-half on the pair (x1, x2) = (x[j], x[j + hd/2]) with c = cos, s = sin of the angle
// (s negated for the inverse rotation).
MOE_HOST_DEVICE void RopePair(float x1, float x2, float c, float s, float* y1, float* y2) {
  *y1 = x1 * c - x2 * s;
  *y2 = x2 * c + x1 * s;
}

// Online softmax (attention): the running sum of exp(x - max) is multiplied by this
// when the row max grows from old_max to new_max (0 when old_max is -inf: nothing seen).
MOE_HOST_DEVICE float OnlineSoftmaxRescale(float old_max, float new_max) { return Exp(old_max - new_max); }
// log-sum-exp from a row's (max, sum); -inf for an empty or all -inf row.
MOE_HOST_DEVICE float LogSumExpFrom(float max, float sum) {
  return sum > 0.0f ? max + std::log(sum) : -INFINITY;
}
// Attention: the probability of a raw score s = q . k given the row's log-sum-exp
// of scale * s, and dS of it, P (dP - D) with D = dout . out of the row (the
// caller multiplies by scale where dS meets Q or K). Both attention paths use them.
MOE_HOST_DEVICE float AttentionProb(float s, float scale, float lse) { return Exp(s * scale - lse); }
MOE_HOST_DEVICE float AttentionScoreGrad(float p, float dp, float delta) { return p * (dp - delta); }
// Cross-entropy gradient of one logit: f (softmax - onehot), f = scale * dloss.
MOE_HOST_DEVICE float CrossEntropyGrad(float logit, float lse, float f, bool is_target) {
  return f * Exp(logit - lse) - (is_target ? f : 0.0f);
}

// One AdamW element (decoupled weight decay). bc1 = 1 - beta1^step, bc2 = 1 - beta2^step.
MOE_HOST_DEVICE void AdamWElement(float g, float lr, float beta1, float beta2, float eps, float weight_decay,
                                  float bc1, float bc2, float* p, float* m, float* v) {
  const float mn = beta1 * *m + (1.0f - beta1) * g;
  const float vn = beta2 * *v + (1.0f - beta2) * g * g;
  *m = mn;
  *v = vn;
  *p -= lr * ((mn / bc1) / (std::sqrt(vn / bc2) + eps) + weight_decay * *p);
}

// bf16 <-> f32, round to nearest even; NaN stays NaN (quiet).
MOE_HOST_DEVICE uint16_t F32ToBF16(float f) {
  uint32_t bits = FloatBits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}
MOE_HOST_DEVICE float BF16ToF32(uint16_t h) { return BitsFloat(static_cast<uint32_t>(h) << 16); }
// v as a bf16 store and load give it back.
MOE_HOST_DEVICE float RoundToBF16(float v) { return BF16ToF32(F32ToBF16(v)); }

// Element access for kernels templated on their storage type (f32, or bf16 as
// uint16_t bits): load as f32, compute in f32, round once on store (ops.h
// "Precision"). The CPU backend's Cast uses the same conversions.
MOE_HOST_DEVICE float LoadF32(const float* p, int64_t i) { return p[i]; }
MOE_HOST_DEVICE float LoadF32(const uint16_t* p, int64_t i) { return BF16ToF32(p[i]); }
MOE_HOST_DEVICE void StoreF32(float* p, int64_t i, float v) { p[i] = v; }
MOE_HOST_DEVICE void StoreF32(uint16_t* p, int64_t i, float v) { p[i] = F32ToBF16(v); }

// ---- Shared with the CUDA backend's row and routing kernels -------------------

// RoPE inverse frequency of pair j of a head of head_dim: theta^(-2j / head_dim), in double.
MOE_HOST_DEVICE double RopeInvFreq(int64_t j, int64_t head_dim, double theta) {
  return std::pow(theta, -2.0 * static_cast<double>(j) / static_cast<double>(head_dim));
}

// Softmax backward of one element: y (dy - sum_c y_c dy_c).
MOE_HOST_DEVICE float SoftmaxGrad(float y, float dy, float dot_y_dy) { return y * (dy - dot_y_dy); }

// Top-k order: value a (column ia) goes before value b (column ib) when larger,
// ties to the lower column.
MOE_HOST_DEVICE bool TopKBefore(float a, int32_t ia, float b, int32_t ib) {
  return a > b || (a == b && ia < ib);
}

// Philox4x32-10 (rng.h): ten rounds on the counter c[4] with key (k0, k1), in place.
MOE_HOST_DEVICE void Philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kM0) * c[0];
    const uint64_t p1 = static_cast<uint64_t>(kM1) * c[2];
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
    k0 += kW0;
    k1 += kW1;
  }
}

// The Normal(0, 1) value of element `index` under (seed, key): counter = {index lo,
// index hi, seed lo, seed hi}, Box-Muller on the first two words, in double.
MOE_HOST_DEVICE float PhiloxNormal(uint64_t seed, uint32_t k0, uint32_t k1, uint64_t index) {
  uint32_t c[4] = {static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32),
                   static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
  Philox4x32_10(c, k0, k1);
  constexpr double kInv32 = 1.0 / 4294967296.0;
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  const double u1 = (static_cast<double>(c[0]) + 1.0) * kInv32;
  const double u2 = (static_cast<double>(c[1]) + 1.0) * kInv32;
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(kTwoPi * u2));
}

}  // namespace moe::kmath

#endif  // MOE_RUNTIME_CORE_KERNEL_MATH_H_
