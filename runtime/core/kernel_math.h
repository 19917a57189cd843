// The arithmetic of the kernels, per element and per row: small inline
// functions that the CPU backend's loops call and that a CUDA backend compiles
// as __host__ __device__ (MOE_HOST_DEVICE), so both backends run the same math.
// Nothing here allocates or touches memory beyond its arguments. The element
// functions do not branch on data in ways a vector unit cannot follow, so the
// CPU loops that call them vectorise; the router's row functions (a token's
// scores, choice and gradient) are scalar loops over its E experts.
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

// ---- The router (ops.h RouterScores, RouterScoresBackward), per token ------

// Scores s[0, E) of one token's logits z: softmax, s = exp(z - lse(z))
// (score_function "softmax"), or sigmoid(z) ("sigmoid"); with q not null, the
// aux loss's scores q = s / sum s (sigmoid). Returns lse(z) (the z loss's).
// Row sums in double, in column order; kmath::Exp, so every backend agrees.
MOE_HOST_DEVICE float RouterScoresRow(const float* z, int64_t E, bool sigmoid, float* s, float* q) {
  float m = z[0];
  for (int64_t e = 1; e < E; ++e) m = z[e] > m ? z[e] : m;
  double sum = 0;
  for (int64_t e = 0; e < E; ++e) {
    const float x = Exp(z[e] - m);
    if (!sigmoid) s[e] = x;
    sum += x;
  }
  const float lse = static_cast<float>(static_cast<double>(m) + std::log(sum));
  if (!sigmoid) {
    for (int64_t e = 0; e < E; ++e) s[e] = static_cast<float>(static_cast<double>(s[e]) / sum);
    return lse;
  }
  double ssum = 0;
  for (int64_t e = 0; e < E; ++e) {
    s[e] = Sigmoid(z[e]);
    ssum += s[e];
  }
  if (q != nullptr)
    for (int64_t e = 0; e < E; ++e) q[e] = static_cast<float>(static_cast<double>(s[e]) / ssum);
  return lse;
}

// One expert's selection score u = s + b (b: the expert bias, or none); NaN
// ranks below everything, so a non-finite row still picks k distinct experts
// (and its NaN weights reach the loss, which the trainer checks).
MOE_HOST_DEVICE float RouterSelectionScore(const float* s, const float* bias, int64_t e) {
  const float u = bias != nullptr ? s[e] + bias[e] : s[e];
  return u != u ? -INFINITY : u;
}

// The best expert of [0, E) after (pv, pi) in TopKBefore order on u (pi < 0:
// from the top), among the groups in `mask` when per_group > 0 (expert e is in
// group e / per_group); -1 when none is left.
MOE_HOST_DEVICE int32_t RouterNextBest(const float* s, const float* bias, int64_t e0, int64_t e1, float pv,
                                       int32_t pi, int64_t per_group, uint64_t mask) {
  int32_t bi = -1;
  float bv = 0.0f;
  for (int64_t e = e0; e < e1; ++e) {
    if (per_group > 0 && ((mask >> (e / per_group)) & 1u) == 0) continue;
    const float u = RouterSelectionScore(s, bias, e);
    const int32_t c = static_cast<int32_t>(e);
    if (pi >= 0 && !TopKBefore(pv, pi, u, c)) continue;  // taken already
    if (bi < 0 || TopKBefore(u, c, bv, bi)) {
      bv = u;
      bi = c;
    }
  }
  return bi;
}

// The most groups group-limited routing takes (a 64-bit mask per token).
constexpr int64_t kRouterMaxGroups = 64;

// One token's k experts, best first, from its scores s[0, E): the top k of
// u = s + b (TopKBefore: descending, ties to the lower expert). With
// group_topk > 0 (and < num_groups <= kRouterMaxGroups), only the experts of
// the group_topk best of num_groups groups of E / num_groups consecutive
// experts are eligible; a group's score is the sum (in double) of its
// clamp(k / group_topk, 1, E / num_groups) best u (ties: the lower group).
// Writes sel[0, k) and selected[j] = s[sel[j]] (the weights come from s, not u).
// k selection passes, no scratch: k and E are small, one thread per token.
MOE_HOST_DEVICE void RouterChooseRow(const float* s, const float* bias, int64_t E, int k, int64_t num_groups,
                                     int group_topk, int32_t* sel, float* selected) {
  int64_t per_group = 0;
  uint64_t mask = 0;
  if (group_topk > 0 && group_topk < num_groups) {
    per_group = E / num_groups;
    int64_t best = k / group_topk;
    best = best < 1 ? 1 : (best > per_group ? per_group : best);
    double pv = 0;
    int64_t pg = -1;
    for (int g = 0; g < group_topk; ++g) {  // the g-th best group, after (pv, pg)
      double bv = 0;
      int64_t bg = -1;
      for (int64_t h = 0; h < num_groups; ++h) {
        double score = 0;
        float v = 0.0f;
        int32_t i = -1;
        for (int64_t j = 0; j < best; ++j) {
          i = RouterNextBest(s, bias, h * per_group, (h + 1) * per_group, v, i, 0, 0);
          v = RouterSelectionScore(s, bias, i);
          score += v;
        }
        if (pg >= 0 && !(pv > score || (pv == score && pg < h))) continue;  // taken already
        if (bg < 0 || score > bv) {
          bv = score;
          bg = h;
        }
      }
      mask |= uint64_t{1} << bg;
      pv = bv;
      pg = bg;
    }
  }
  float pv = 0.0f;
  int32_t pi = -1;
  for (int j = 0; j < k; ++j) {
    pi = RouterNextBest(s, bias, 0, E, pv, pi, per_group, mask);
    sel[j] = pi;
    selected[j] = pi >= 0 ? s[pi] : 0.0f;
    if (pi >= 0) pv = RouterSelectionScore(s, bias, pi);
  }
}

// d loss / d z of one token (ops.h RouterScoresBackward): dq[0, E) = d loss /
// d q (the aux loss's), ds[0, E) = d loss / d s (the combine weights'; null =
// 0), z_coef lse the z loss's d loss / d lse. softmax: g = dq + ds,
// dz = s (g - <g, s>) + z_coef lse s; sigmoid: q = s / S with S = sum s, so
// d loss / d s = (dq - <dq, q>) / S + ds, dz = that s (1 - s) + z_coef lse
// exp(z - lse). Dot products in double.
MOE_HOST_DEVICE void RouterScoresBackwardRow(const float* s, const float* z, float lse, const float* dq,
                                             const float* ds, int64_t E, bool sigmoid, float z_coef,
                                             float* dz) {
  const float zl = z_coef * lse;
  if (!sigmoid) {
    double dot = 0;
    for (int64_t e = 0; e < E; ++e) dot += static_cast<double>(dq[e] + (ds != nullptr ? ds[e] : 0.0f)) * s[e];
    const float fd = static_cast<float>(dot);
    for (int64_t e = 0; e < E; ++e)
      dz[e] = SoftmaxGrad(s[e], dq[e] + (ds != nullptr ? ds[e] : 0.0f), fd) + zl * s[e];
    return;
  }
  double sum = 0, dot = 0;
  for (int64_t e = 0; e < E; ++e) {
    sum += s[e];
    dot += static_cast<double>(dq[e]) * s[e];
  }
  const float mean = static_cast<float>(dot / sum), inv = static_cast<float>(1.0 / sum);
  for (int64_t e = 0; e < E; ++e) {
    const float g = (dq[e] - mean) * inv + (ds != nullptr ? ds[e] : 0.0f);
    dz[e] = g * s[e] * (1.0f - s[e]) + zl * Exp(z[e] - lse);
  }
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
