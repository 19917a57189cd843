// Causal attention on the CPU, blocked as FlashAttention-2 is: the causal half
// only, tiles of kTileQ queries x kTileK keys, an online softmax, and only the
// row log-sum-exp kept for backward (memory O(S) per row, never [S, S]).
//
// Forward: one task per (batch, query head, query tile) owns its output rows.
// Backward, without atomics and with a fixed order of every sum: one task per
// (batch, query head) walks its causal tile pairs once, key tiles outer, over the
// recomputed P = exp(s - lse) and dS = P (dP - D): dK, dV of a key tile sum over the
// query tiles in order, dQ of every row over the key tiles in order. With grouped
// KV heads each query head's dK, dV land in a buffer and are summed over the group
// (in head order) after. Inside a diagonal tile pair the masked part is skipped in
// 16-key / 4- or 8-row steps. The tasks are a fixed partition
// (ThreadPool::ParallelFor with grain 1), so results do not depend on the thread count.
//
// The tile products are register-blocked loops over 16-float vectors (GCC
// vector extensions, no intrinsics); every sum runs in a fixed order.
// MOE_CPU_CLONES builds the task functions for AVX-512, AVX2+FMA and baseline
// x86-64 and picks one at load time.
//
// MOE_ATTENTION=gemm runs attention_gemm.h's chunked GEMM driver instead
// (cpu_attention_gemm.cc), the algorithm of the CUDA backend's cuBLAS path.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "runtime/core/attention_gemm.h"
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
  std::vector<float> s, dp, acc, acc2, kt, vt, m, l, dq;
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

// Causal limit of a tile pair (query tile at i0, key tile at j0): row r of the
// query tile sees column c of the key tile when c <= r + off, off = i0 - j0.

// Rows [i, i + R) of c = a bt over the first NB 16-column blocks of the tile.
template <int R, int NB>
MOE_INLINE void ScoreRows(int64_t i, int64_t k, const float* a, int64_t lda, const float* bt, float* c) {
  V16 acc[R][NB] = {};
  for (int64_t p = 0; p < k; ++p) {
    const float* bp = bt + p * kTileK;
    V16 bv[NB];
    for (int q = 0; q < NB; ++q) bv[q] = Load(bp + 16 * q);
    for (int r = 0; r < R; ++r) {
      const float x = a[(i + r) * lda + p];
      for (int q = 0; q < NB; ++q) acc[r][q] += x * bv[q];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < NB; ++q) Store(c + (i + r) * kTileK + 16 * q, acc[r][q]);
}

template <int R>
MOE_INLINE void ScoreRowsUpTo(int blocks, int64_t i, int64_t k, const float* a, int64_t lda, const float* bt,
                              float* c) {
  switch (blocks) {
    case 1:
      return ScoreRows<R, 1>(i, k, a, lda, bt, c);
    case 2:
      return ScoreRows<R, 2>(i, k, a, lda, bt, c);
    case 3:
      return ScoreRows<R, 3>(i, k, a, lda, bt, c);
    case 4:
      return ScoreRows<R, 4>(i, k, a, lda, bt, c);
    default:
      return;
  }
}

// 16-column blocks of the tile that rows up to `last_row` may see.
MOE_INLINE int VisibleBlocks(int64_t last_row, int64_t off) {
  return static_cast<int>(std::clamp<int64_t>((last_row + off) / 16 + 1, 0, kTileK / 16));
}

// c[m, kTileK] = a[m, k] bt[k, kTileK] (a rows at stride lda, bt and c at stride kTileK):
// scores and dP of a tile. Four rows at a time keep up to 16 accumulators in
// registers; 16-column blocks that no row of the four may see (causal limit `off`)
// are skipped and left unwritten (callers mask them).
MOE_INLINE void TileTimesKt(int64_t m, int64_t k, const float* a, int64_t lda, const float* bt, float* c,
                            int64_t off) {
  static_assert(kTileK == 64);
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) ScoreRowsUpTo<4>(VisibleBlocks(i + 3, off), i, k, a, lda, bt, c);
  for (; i < m; ++i) ScoreRowsUpTo<1>(VisibleBlocks(i, off), i, k, a, lda, bt, c);
}

// c[m, n] += sum_p A(i, p) b[p, n], A(i, p) = a[i * lda + p] (kTransA false) or
// a[p * lda + i] (true); b rows at stride ldb, c at stride ldc. Eight rows of c at a
// time over 16 columns; columns past the last multiple of 16 run as plain loops.
// A is a tile of probabilities (or dS) with causal limit `off`, exactly zero where
// masked: without kTransA (rows are queries) row i needs p <= i + off only, with it
// (rows are keys) p >= i - off only; the rest is skipped.
template <bool kTransA>
MOE_INLINE void TileAccumulate(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                               int64_t ldb, float* c, int64_t ldc, int64_t off) {
  auto at = [&](int64_t i, int64_t p) { return kTransA ? a[p * lda + i] : a[i * lda + p]; };
  // The p range of rows [i, i_last].
  auto p_begin = [&](int64_t i) { return kTransA ? std::clamp<int64_t>(i - off, 0, k) : int64_t{0}; };
  auto p_end = [&](int64_t i_last) { return kTransA ? k : std::clamp<int64_t>(i_last + off + 1, 0, k); };
  const int64_t n16 = n / 16 * 16;
  for (int64_t j = 0; j < n16; j += 16) {
    int64_t i = 0;
    for (; i + 8 <= m; i += 8) {
      const int64_t p0 = p_begin(i), p1 = p_end(i + 7);
      if (p0 >= p1) continue;
      V16 acc[8];
      for (int r = 0; r < 8; ++r) acc[r] = Load(c + (i + r) * ldc + j);
      for (int64_t p = p0; p < p1; ++p) {
        const V16 bp = Load(b + p * ldb + j);
        for (int r = 0; r < 8; ++r) acc[r] += at(i + r, p) * bp;
      }
      for (int r = 0; r < 8; ++r) Store(c + (i + r) * ldc + j, acc[r]);
    }
    for (; i < m; ++i) {
      V16 acc = Load(c + i * ldc + j);
      for (int64_t p = p_begin(i), p1 = p_end(i); p < p1; ++p) acc += at(i, p) * Load(b + p * ldb + j);
      Store(c + i * ldc + j, acc);
    }
  }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = n16; j < n; ++j) {
      float acc = c[i * ldc + j];
      for (int64_t p = p_begin(i), p1 = p_end(i); p < p1; ++p) acc += at(i, p) * b[p * ldb + j];
      c[i * ldc + j] = acc;
    }
}

// dst[c, j] = src[j * ld + c] for j < n (a tile of keys or values, transposed), 0 for n <= j < kTileK.
MOE_INLINE void Transpose(const float* src, int64_t ld, int64_t n, int64_t head_dim, float* __restrict dst) {
  // Source rows read whole (they are the strided side), the tile written by column.
  for (int64_t j = 0; j < n; ++j) {
    const float* row = src + j * ld;
    for (int64_t c = 0; c < head_dim; ++c) dst[c * kTileK + j] = row[c];
  }
  if (n < kTileK)
    for (int64_t c = 0; c < head_dim; ++c)
      for (int64_t j = n; j < kTileK; ++j) dst[c * kTileK + j] = 0.0f;
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
    TileTimesKt(nq, hd, qtile, d.q_row, kt, s, i0 - j0);
    for (int64_t r = 0; r < nq; ++r) {
      float* row = s + r * kTileK;
      const int64_t vis = Visible(i0 + r, j0, nk);
      // Scaled scores, -inf where masked (columns past the causal limit may hold
      // anything: they are selected away), and the row max in 16 lanes (max is exact,
      // so the lanes' order does not matter).
      float lane_max[16];
      for (int l = 0; l < 16; ++l) lane_max[l] = m[r];
      for (int64_t j0v = 0; j0v < kTileK; j0v += 16)
        for (int l = 0; l < 16; ++l) {
          const float x = j0v + l < vis ? row[j0v + l] * d.scale : -std::numeric_limits<float>::infinity();
          row[j0v + l] = x;
          lane_max[l] = lane_max[l] > x ? lane_max[l] : x;
        }
      float mx = lane_max[0];
      for (int l = 1; l < 16; ++l) mx = std::max(mx, lane_max[l]);
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
    TileAccumulate<false>(nq, hd, nk, s, kTileK, v + d.kv_off(b, j0, g), d.kv_row, acc, hd, i0 - j0);
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
    // Exp runs on every column (branch-free, so the loop vectorises); masked ones,
    // which may hold anything, are selected away.
#pragma GCC ivdep
    for (int64_t j = 0; j < kTileK; ++j) {
      const float p = kmath::AttentionProb(sr[j], d.scale, lse);
      const bool visible = j < vis;
      sr[j] = visible ? p : 0.0f;
      dr[j] = visible ? kmath::AttentionScoreGrad(p, dr[j], delta) : 0.0f;
    }
  }
}

// Backward of query head h of sequence b in one pass over its causal tile pairs,
// key tiles outer: dK, dV of a key tile accumulate over the query tiles at or below
// the diagonal and go to dk_h, dv_h (rows at stride ld, row j of this head at
// dk_h + j * ld); dQ of every row accumulates in scratch over the key tiles, in
// order, and goes to dq at the end.
MOE_CPU_CLONES void BackwardTask(const Dims& d, const float* q, const float* k, const float* v,
                                 const float* lse, const float* delta, const float* dout, float* dq,
                                 float* dk_h, float* dv_h, int64_t ld, int64_t b, int64_t h) {
  const int64_t hd = d.head_dim, g = h / d.group;
  Scratch& w = ThreadScratch(hd);
  w.dq.resize(d.seq * hd);
  float *s = w.s.data(), *dp = w.dp.data(), *dk_acc = w.acc.data(), *dv_acc = w.acc2.data();
  float *kt = w.kt.data(), *vt = w.vt.data(), *dq_acc = w.dq.data();
  Zero(dq_acc, d.seq * hd);
  const int64_t row0 = (b * d.heads + h) * d.seq;
  for (int64_t j0 = 0; j0 < d.seq; j0 += kTileK) {
    const int64_t nk = std::min(kTileK, d.seq - j0);
    const float* ktile = k + d.kv_off(b, j0, g);
    Transpose(ktile, d.kv_row, nk, hd, kt);
    Transpose(v + d.kv_off(b, j0, g), d.kv_row, nk, hd, vt);
    Zero(dk_acc, kTileK * hd);
    Zero(dv_acc, kTileK * hd);
    for (int64_t i0 = j0 / kTileQ * kTileQ; i0 < d.seq; i0 += kTileQ) {
      const int64_t nq = std::min(kTileQ, d.seq - i0), off = i0 - j0;
      const float* qtile = q + d.q_off(b, i0, h);
      const float* dotile = dout + d.q_off(b, i0, h);
      TileTimesKt(nq, hd, qtile, d.q_row, kt, s, off);
      TileTimesKt(nq, hd, dotile, d.q_row, vt, dp, off);
      ProbsAndDs(d, i0, nq, j0, nk, lse + row0 + i0, delta + row0 + i0, s, dp);
      TileAccumulate<true>(nk, hd, nq, s, kTileK, dotile, d.q_row, dv_acc, hd, off);  // dV += P^T dO
      TileAccumulate<true>(nk, hd, nq, dp, kTileK, qtile, d.q_row, dk_acc, hd,
                           off);  // dK += dS^T Q (x scale)
      TileAccumulate<false>(nq, hd, nk, dp, kTileK, ktile, d.kv_row, dq_acc + i0 * hd, hd,
                            off);  // dQ += dS K (x scale)
    }
    for (int64_t j = 0; j < nk; ++j) {
      float* dkr = dk_h + (j0 + j) * ld;
      float* dvr = dv_h + (j0 + j) * ld;
      for (int64_t c = 0; c < hd; ++c) {
        dkr[c] = dk_acc[j * hd + c] * d.scale;
        dvr[c] = dv_acc[j * hd + c];
      }
    }
  }
  for (int64_t i = 0; i < d.seq; ++i) {
    float* dqr = dq + d.q_off(b, i, h);
    for (int64_t c = 0; c < hd; ++c) dqr[c] = dq_acc[i * hd + c] * d.scale;
  }
}

// dk[b, j, g] = sum over the group's query heads h (in order) of part[b, j, h], the
// same for dv, for token rows t = b * seq + j in [t0, t1).
MOE_CPU_CLONES void SumGroups(const Dims& d, const float* part_k, const float* part_v, float* dk, float* dv,
                              int64_t t0, int64_t t1) {
  const int64_t hd = d.head_dim;
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t g = 0; g < d.kv_heads; ++g) {
      float* dkr = dk + t * d.kv_row + g * hd;
      float* dvr = dv + t * d.kv_row + g * hd;
      const float* pk = part_k + t * d.q_row + g * d.group * hd;
      const float* pv = part_v + t * d.q_row + g * d.group * hd;
      for (int64_t c = 0; c < hd; ++c) {
        dkr[c] = pk[c];
        dvr[c] = pv[c];
      }
      for (int64_t e = 1; e < d.group; ++e)
        for (int64_t c = 0; c < hd; ++c) {
          dkr[c] += pk[e * hd + c];
          dvr[c] += pv[e * hd + c];
        }
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
  const bool gemm = attn::AttentionSettingsRef().path == attn::AttentionPath::kGemm;
  return AsCpu(s).Run([=]() {
    if (gemm) return GemmCausalAttention(q, k, v, scale, out, lse);
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
  const bool gemm = attn::AttentionSettingsRef().path == attn::AttentionPath::kGemm;
  return AsCpu(s).Run([=]() {
    if (gemm) return GemmCausalAttentionBackward(q, k, v, out, lse, scale, dout, dq, dk, dv);
    const Dims d = MakeDims(q, k, scale);
    const float *pq = q.data<float>(), *pk = k.data<float>(), *pv = v.data<float>(), *po = out.data<float>(),
                *pl = lse.data<float>(), *pdo = dout.data<float>();
    float *pdq = dq.data<float>(), *pdk = dk.data<float>(), *pdv = dv.data<float>();
    std::vector<float> delta(d.batch * d.heads * d.seq);
    Pool().ParallelFor(static_cast<int64_t>(delta.size()), GrainFor(d.head_dim * 2),
                       [&](int64_t t0, int64_t t1) { DeltaRows(d, po, pdo, delta.data(), t0, t1); });
    // With grouped-query heads each query head's dK, dV go to a [B, S, H, hd] buffer
    // first and are summed over the group after; otherwise straight to dk, dv.
    const bool grouped = d.group > 1;
    std::vector<float> part_k(grouped ? q.numel() : 0), part_v(grouped ? q.numel() : 0);
    Pool().ParallelFor(d.batch * d.heads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / d.heads, h = t % d.heads;
        float* dk_h = grouped ? part_k.data() + d.q_off(b, 0, h) : pdk + d.kv_off(b, 0, h);
        float* dv_h = grouped ? part_v.data() + d.q_off(b, 0, h) : pdv + d.kv_off(b, 0, h);
        BackwardTask(d, pq, pk, pv, pl, delta.data(), pdo, pdq, dk_h, dv_h, grouped ? d.q_row : d.kv_row, b,
                     h);
      }
    });
    if (grouped) {
      Pool().ParallelFor(d.batch * d.seq, GrainFor(2 * d.q_row), [&](int64_t t0, int64_t t1) {
        SumGroups(d, part_k.data(), part_v.data(), pdk, pdv, t0, t1);
      });
    }
    return absl::OkStatus();
  });
}

}  // namespace moe::cpu
