// Causal attention on the CPU, blocked as FlashAttention-2 is: the causal half
// only, tiles of kTileQ queries x kTileK keys, an online softmax, and only the
// row log-sum-exp kept for backward (memory O(S) per row, never [S, S]).
//
// Forward: one task per (batch, query head, query tile) owns its output rows.
// Backward, without atomics and with a fixed order of every sum, in two passes
// over the same recomputed tiles P = exp(s - lse), dS = P (dP - D):
//   1. one task per (batch, kv head, key tile) accumulates dK, dV of its keys over
//      every query head of the group and every query tile at or below the diagonal;
//   2. one task per (batch, query head, query tile) accumulates dQ of its rows.
// The tasks are a fixed partition (ThreadPool::ParallelFor with grain 1), so
// results do not depend on the thread count.
//
// The tile products are register-blocked loops over 16-float vectors (GCC
// vector extensions, no intrinsics); every sum runs in a fixed order.
// MOE_CPU_CLONES builds the task functions for AVX-512, AVX2+FMA and baseline
// x86-64 and picks one at load time.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "runtime/core/cpu/cpu_kernels.h"
#include "runtime/core/kernel_math.h"

// V16 values passed between always-inline helpers never cross an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace moe::cpu {
namespace {

constexpr int64_t kTileQ = 64, kTileK = 64;

// Shapes of one attention call. Rows of q/out/dq: stride q_row = H * hd;
// of k/v/dk/dv: kv_row = Hkv * hd.
struct Dims {
  int64_t batch, seq, heads, kv_heads, head_dim, group, q_row, kv_row;
  float scale;
  int64_t q_tiles() const { return (seq + kTileQ - 1) / kTileQ; }
  int64_t k_tiles() const { return (seq + kTileK - 1) / kTileK; }
  // Row `i` of head `h` of sequence `b`.
  int64_t q_off(int64_t b, int64_t i, int64_t h) const { return (b * seq + i) * q_row + h * head_dim; }
  int64_t kv_off(int64_t b, int64_t j, int64_t g) const { return (b * seq + j) * kv_row + g * head_dim; }
};

Dims MakeDims(const Tensor& q, const Tensor& k, float scale) {
  Dims d;
  d.batch = q.size(0);
  d.seq = q.size(1);
  d.heads = q.size(2);
  d.head_dim = q.size(3);
  d.kv_heads = k.size(2);
  d.group = d.heads / d.kv_heads;
  d.q_row = d.heads * d.head_dim;
  d.kv_row = d.kv_heads * d.head_dim;
  d.scale = scale;
  return d;
}

// Per-thread scratch, grown on demand.
struct Scratch {
  std::vector<float> s, dp, acc, acc2, kt, vt, m, l;
  void Reserve(int64_t head_dim) {
    s.resize(kTileQ * kTileK);
    dp.resize(kTileQ * kTileK);
    acc.resize(std::max(kTileQ, kTileK) * head_dim);
    acc2.resize(kTileK * head_dim);
    kt.resize(head_dim * kTileK);
    vt.resize(head_dim * kTileK);
    m.resize(kTileQ);
    l.resize(kTileQ);
  }
};
Scratch& ThreadScratch(int64_t head_dim) {
  thread_local Scratch scratch;
  scratch.Reserve(head_dim);
  return scratch;
}

#define MOE_INLINE inline __attribute__((always_inline))

// 16 floats; GCC lowers it to one zmm, two ymm or four xmm per clone. Loads and
// stores go through unaligned, may-alias pointers.
typedef float V16 __attribute__((vector_size(64)));
typedef float V16u __attribute__((vector_size(64), aligned(4), may_alias));
MOE_INLINE V16 Load(const float* p) { return *reinterpret_cast<const V16u*>(p); }
MOE_INLINE void Store(float* p, V16 v) { *reinterpret_cast<V16u*>(p) = v; }

// c[m, kTileK] = a[m, k] bt[k, kTileK] (a rows at stride lda, bt and c at stride kTileK):
// scores and dP of a tile. Four rows at a time keep 16 accumulators in registers.
MOE_INLINE void TileTimesKt(int64_t m, int64_t k, const float* a, int64_t lda, const float* bt, float* c) {
  static_assert(kTileK == 64);
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    V16 acc[4][4] = {};
    for (int64_t p = 0; p < k; ++p) {
      const float* bp = bt + p * kTileK;
      const V16 b0 = Load(bp), b1 = Load(bp + 16), b2 = Load(bp + 32), b3 = Load(bp + 48);
      for (int r = 0; r < 4; ++r) {
        const float x = a[(i + r) * lda + p];
        acc[r][0] += x * b0;
        acc[r][1] += x * b1;
        acc[r][2] += x * b2;
        acc[r][3] += x * b3;
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int q = 0; q < 4; ++q) Store(c + (i + r) * kTileK + 16 * q, acc[r][q]);
  }
  for (; i < m; ++i) {
    V16 acc[4] = {};
    for (int64_t p = 0; p < k; ++p) {
      const float x = a[i * lda + p];
      for (int q = 0; q < 4; ++q) acc[q] += x * Load(bt + p * kTileK + 16 * q);
    }
    for (int q = 0; q < 4; ++q) Store(c + i * kTileK + 16 * q, acc[q]);
  }
}

// c[m, n] += sum_p A(i, p) b[p, n], A(i, p) = a[i * lda + p] (kTransA false) or
// a[p * lda + i] (true); b rows at stride ldb, c at stride ldc. Eight rows of c at a
// time over 16 columns; columns past the last multiple of 16 run as plain loops.
template <bool kTransA>
MOE_INLINE void TileAccumulate(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                               int64_t ldb, float* c, int64_t ldc) {
  auto at = [&](int64_t i, int64_t p) { return kTransA ? a[p * lda + i] : a[i * lda + p]; };
  const int64_t n16 = n / 16 * 16;
  for (int64_t j = 0; j < n16; j += 16) {
    int64_t i = 0;
    for (; i + 8 <= m; i += 8) {
      V16 acc[8];
      for (int r = 0; r < 8; ++r) acc[r] = Load(c + (i + r) * ldc + j);
      for (int64_t p = 0; p < k; ++p) {
        const V16 bp = Load(b + p * ldb + j);
        for (int r = 0; r < 8; ++r) acc[r] += at(i + r, p) * bp;
      }
      for (int r = 0; r < 8; ++r) Store(c + (i + r) * ldc + j, acc[r]);
    }
    for (; i < m; ++i) {
      V16 acc = Load(c + i * ldc + j);
      for (int64_t p = 0; p < k; ++p) acc += at(i, p) * Load(b + p * ldb + j);
      Store(c + i * ldc + j, acc);
    }
  }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = n16; j < n; ++j) {
      float acc = c[i * ldc + j];
      for (int64_t p = 0; p < k; ++p) acc += at(i, p) * b[p * ldb + j];
      c[i * ldc + j] = acc;
    }
}

// dst[c, j] = src[j * ld + c] for j < n (a tile of keys or values, transposed), 0 for n <= j < kTileK.
MOE_INLINE void Transpose(const float* src, int64_t ld, int64_t n, int64_t head_dim, float* __restrict dst) {
  for (int64_t c = 0; c < head_dim; ++c) {
    float* row = dst + c * kTileK;
    for (int64_t j = 0; j < n; ++j) row[j] = src[j * ld + c];
    for (int64_t j = n; j < kTileK; ++j) row[j] = 0.0f;
  }
}

MOE_INLINE void Zero(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = 0.0f;
}

// Sum of x[0..n) in 16 fixed lanes (vectorises; the same order on every ISA).
MOE_INLINE float LaneSum(const float* x, int64_t n) {
  float lane[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) lane[l] += x[i + l];
  for (int l = 0; i < n; ++i, ++l) lane[l] += x[i];
  float s = 0;
  for (int l = 0; l < 16; ++l) s += lane[l];
  return s;
}

MOE_INLINE float LaneDot(const float* a, const float* b, int64_t n) {
  float lane[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) lane[l] += a[i + l] * b[i + l];
  for (int l = 0; i < n; ++i, ++l) lane[l] += a[i] * b[i];
  float s = 0;
  for (int l = 0; l < 16; ++l) s += lane[l];
  return s;
}

// Number of keys j0 + j (j < nk) that query row i may see.
MOE_INLINE int64_t Visible(int64_t i, int64_t j0, int64_t nk) {
  return std::clamp<int64_t>(i - j0 + 1, 0, nk);
}

// Forward of query tile qt of head h of sequence b.
MOE_CPU_CLONES void ForwardTask(const Dims& d, const float* q, const float* k, const float* v, float* out,
                                float* lse, int64_t b, int64_t h, int64_t qt) {
  const int64_t hd = d.head_dim, g = h / d.group;
  const int64_t i0 = qt * kTileQ, nq = std::min(kTileQ, d.seq - i0);
  Scratch& w = ThreadScratch(hd);
  float *s = w.s.data(), *acc = w.acc.data(), *kt = w.kt.data(), *m = w.m.data(), *l = w.l.data();
  Zero(acc, nq * hd);
  for (int64_t r = 0; r < nq; ++r) {
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = 0.0f;
  }
  const float* qtile = q + d.q_off(b, i0, h);
  const int64_t last = i0 + nq - 1;  // the last key any row of the tile sees
  for (int64_t j0 = 0; j0 <= last; j0 += kTileK) {
    const int64_t nk = std::min(kTileK, last + 1 - j0);
    Transpose(k + d.kv_off(b, j0, g), d.kv_row, nk, hd, kt);
    TileTimesKt(nq, hd, qtile, d.q_row, kt, s);
    for (int64_t r = 0; r < nq; ++r) {
      float* row = s + r * kTileK;
      const int64_t vis = Visible(i0 + r, j0, nk);
      float mx = m[r];
      for (int64_t j = 0; j < kTileK; ++j) {
        row[j] = j < vis ? row[j] * d.scale : -std::numeric_limits<float>::infinity();
        mx = std::max(mx, row[j]);
      }
      if (vis == 0) {  // no key of this tile is visible: the row keeps its state, adds nothing
        Zero(row, kTileK);
        continue;
      }
#pragma GCC ivdep
      for (int64_t j = 0; j < kTileK; ++j) row[j] = kmath::Exp(row[j] - mx);
      const float alpha = kmath::OnlineSoftmaxRescale(m[r], mx);
      l[r] = l[r] * alpha + LaneSum(row, kTileK);
      m[r] = mx;
      float* ar = acc + r * hd;
      for (int64_t c = 0; c < hd; ++c) ar[c] *= alpha;
    }
    TileAccumulate<false>(nq, hd, nk, s, kTileK, v + d.kv_off(b, j0, g), d.kv_row, acc, hd);
  }
  for (int64_t r = 0; r < nq; ++r) {
    const float inv = 1.0f / l[r];
    float* orow = out + d.q_off(b, i0 + r, h);
    const float* ar = acc + r * hd;
    for (int64_t c = 0; c < hd; ++c) orow[c] = ar[c] * inv;
    lse[(b * d.heads + h) * d.seq + i0 + r] = kmath::LogSumExpFrom(m[r], l[r]);
  }
}

// P = exp(scale s - lse) and dS = P (dP - D) of one (query tile, key tile) pair, in
// place of s and dp: rows r < nq are queries i0 + r, columns keys j0 + j.
MOE_INLINE void ProbsAndDs(const Dims& d, int64_t i0, int64_t nq, int64_t j0, int64_t nk,
                           const float* lse_row, const float* delta_row, float* s, float* dp) {
  for (int64_t r = 0; r < nq; ++r) {
    float* __restrict sr = s + r * kTileK;
    float* __restrict dr = dp + r * kTileK;
    const int64_t vis = Visible(i0 + r, j0, nk);
    const float lse = lse_row[r], delta = delta_row[r];
#pragma GCC ivdep
    for (int64_t j = 0; j < kTileK; ++j) {
      const float p = j < vis ? kmath::Exp(sr[j] * d.scale - lse) : 0.0f;
      sr[j] = p;
      dr[j] = j < vis ? p * (dr[j] - delta) : 0.0f;
    }
  }
}

// Backward pass 1: dK, dV of key tile kt_index of kv head g of sequence b.
MOE_CPU_CLONES void KeyValueGradTask(const Dims& d, const float* q, const float* k, const float* v,
                                     const float* lse, const float* delta, const float* dout, float* dk,
                                     float* dv, int64_t b, int64_t g, int64_t kt_index) {
  const int64_t hd = d.head_dim;
  const int64_t j0 = kt_index * kTileK, nk = std::min(kTileK, d.seq - j0);
  Scratch& w = ThreadScratch(hd);
  float *s = w.s.data(), *dp = w.dp.data(), *dk_acc = w.acc.data(), *dv_acc = w.acc2.data();
  float *kt = w.kt.data(), *vt = w.vt.data();
  Transpose(k + d.kv_off(b, j0, g), d.kv_row, nk, hd, kt);
  Transpose(v + d.kv_off(b, j0, g), d.kv_row, nk, hd, vt);
  Zero(dk_acc, kTileK * hd);
  Zero(dv_acc, kTileK * hd);
  for (int64_t h = g * d.group; h < (g + 1) * d.group; ++h) {
    for (int64_t i0 = j0 / kTileQ * kTileQ; i0 < d.seq; i0 += kTileQ) {
      const int64_t nq = std::min(kTileQ, d.seq - i0);
      const float* qtile = q + d.q_off(b, i0, h);
      const float* dotile = dout + d.q_off(b, i0, h);
      TileTimesKt(nq, hd, qtile, d.q_row, kt, s);
      TileTimesKt(nq, hd, dotile, d.q_row, vt, dp);
      const int64_t row0 = (b * d.heads + h) * d.seq + i0;
      ProbsAndDs(d, i0, nq, j0, nk, lse + row0, delta + row0, s, dp);
      TileAccumulate<true>(nk, hd, nq, s, kTileK, dotile, d.q_row, dv_acc, hd);  // dV += P^T dO
      TileAccumulate<true>(nk, hd, nq, dp, kTileK, qtile, d.q_row, dk_acc, hd);  // dK += dS^T Q (x scale)
    }
  }
  for (int64_t j = 0; j < nk; ++j) {
    float* dkr = dk + d.kv_off(b, j0 + j, g);
    float* dvr = dv + d.kv_off(b, j0 + j, g);
    for (int64_t c = 0; c < hd; ++c) {
      dkr[c] = dk_acc[j * hd + c] * d.scale;
      dvr[c] = dv_acc[j * hd + c];
    }
  }
}

// Backward pass 2: dQ of query tile qt of head h of sequence b.
MOE_CPU_CLONES void QueryGradTask(const Dims& d, const float* q, const float* k, const float* v,
                                  const float* lse, const float* delta, const float* dout, float* dq,
                                  int64_t b, int64_t h, int64_t qt) {
  const int64_t hd = d.head_dim, g = h / d.group;
  const int64_t i0 = qt * kTileQ, nq = std::min(kTileQ, d.seq - i0);
  Scratch& w = ThreadScratch(hd);
  float *s = w.s.data(), *dp = w.dp.data(), *dq_acc = w.acc.data(), *kt = w.kt.data(), *vt = w.vt.data();
  Zero(dq_acc, nq * hd);
  const float* qtile = q + d.q_off(b, i0, h);
  const float* dotile = dout + d.q_off(b, i0, h);
  const int64_t row0 = (b * d.heads + h) * d.seq + i0;
  const int64_t last = i0 + nq - 1;
  for (int64_t j0 = 0; j0 <= last; j0 += kTileK) {
    const int64_t nk = std::min(kTileK, last + 1 - j0);
    Transpose(k + d.kv_off(b, j0, g), d.kv_row, nk, hd, kt);
    Transpose(v + d.kv_off(b, j0, g), d.kv_row, nk, hd, vt);
    TileTimesKt(nq, hd, qtile, d.q_row, kt, s);
    TileTimesKt(nq, hd, dotile, d.q_row, vt, dp);
    ProbsAndDs(d, i0, nq, j0, nk, lse + row0, delta + row0, s, dp);
    TileAccumulate<false>(nq, hd, nk, dp, kTileK, k + d.kv_off(b, j0, g), d.kv_row, dq_acc,
                          hd);  // dQ += dS K
  }
  for (int64_t r = 0; r < nq; ++r) {
    float* dqr = dq + d.q_off(b, i0 + r, h);
    for (int64_t c = 0; c < hd; ++c) dqr[c] = dq_acc[r * hd + c] * d.scale;
  }
}

// D[b, h, i] = dout[b, i, h] . out[b, i, h] (the softmax backward's row term).
MOE_CPU_CLONES void DeltaRows(const Dims& d, const float* out, const float* dout, float* delta, int64_t t0,
                              int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {  // t = (b * heads + h) * seq + i
    const int64_t i = t % d.seq, bh = t / d.seq, h = bh % d.heads, b = bh / d.heads;
    const int64_t off = d.q_off(b, i, h);
    delta[t] = LaneDot(out + off, dout + off, d.head_dim);
  }
}

}  // namespace

absl::Status CpuKernels::CausalAttention(S& s, T q, T k, T v, float scale, T out, T lse) {
  return AsCpu(s).Run([=]() {
    const Dims d = MakeDims(q, k, scale);
    const float *pq = q.data<float>(), *pk = k.data<float>(), *pv = v.data<float>();
    float *po = out.data<float>(), *pl = lse.data<float>();
    const int64_t tiles = d.q_tiles();
    Pool().ParallelFor(d.batch * d.heads * tiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        ForwardTask(d, pq, pk, pv, po, pl, t / (d.heads * tiles), t / tiles % d.heads, t % tiles);
    });
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::CausalAttentionBackward(S& s, T q, T k, T v, T out, T lse, float scale, T dout, T dq,
                                                 T dk, T dv) {
  return AsCpu(s).Run([=]() {
    const Dims d = MakeDims(q, k, scale);
    const float *pq = q.data<float>(), *pk = k.data<float>(), *pv = v.data<float>(), *po = out.data<float>(),
                *pl = lse.data<float>(), *pdo = dout.data<float>();
    float *pdq = dq.data<float>(), *pdk = dk.data<float>(), *pdv = dv.data<float>();
    std::vector<float> delta(d.batch * d.heads * d.seq);
    Pool().ParallelFor(static_cast<int64_t>(delta.size()), GrainFor(d.head_dim * 2),
                       [&](int64_t t0, int64_t t1) { DeltaRows(d, po, pdo, delta.data(), t0, t1); });
    const int64_t ktiles = d.k_tiles(), qtiles = d.q_tiles();
    Pool().ParallelFor(d.batch * d.kv_heads * ktiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        KeyValueGradTask(d, pq, pk, pv, pl, delta.data(), pdo, pdk, pdv, t / (d.kv_heads * ktiles),
                         t / ktiles % d.kv_heads, t % ktiles);
    });
    Pool().ParallelFor(d.batch * d.heads * qtiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        QueryGradTask(d, pq, pk, pv, pl, delta.data(), pdo, pdq, t / (d.heads * qtiles), t / qtiles % d.heads,
                      t % qtiles);
    });
    return absl::OkStatus();
  });
}

}  // namespace moe::cpu
