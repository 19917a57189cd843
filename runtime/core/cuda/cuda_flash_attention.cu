// Causal attention on tensor cores for bf16 operands (MOE_ATTENTION=flash),
// with FlashAttention-2's tiling: a block takes 64 query rows (16 per warp)
// and walks the key tiles of 64 it can see; the products Q K^T, P V (and in
// backward dO V^T, dS K, P^T dO, dS^T Q) are WMMA 16x16x16 bf16 products with
// f32 accumulation; the running max, sum and rescaled output stay f32, and
// only the row log-sum-exp is kept (the contract of ops::CausalAttention).
//
// Numbers against the f32 contract: q, k, v and dout are bf16 values, so
// every product is exact and only the f32 accumulation order differs; the
// probabilities P and the score gradients dS are rounded to bf16 before they
// enter a product (2^-9 relative), as FlashAttention does; the softmax
// statistics, the output's normalisation and every accumulator are f32.
//
// Backward is deterministic, without atomics: one kernel per key tile writes
// dK and dV (walking the query tiles, and the query heads of its KV group, in
// order), one per query tile writes dQ; both recompute P from the lse.
//
// head_dim 32, 64 or 128 (a template argument: the accumulators of a warp's
// 16 rows are register fragments in backward); rows 16-byte aligned.
//
// The CPU suite runs this file's kernels under tests/core/cuda_emulation.h
// (MOE_CUDA_EMULATION: real threads and barriers per block, wmma by its
// documented semantics) against a float64 reference:
// core_flash_attention_emulation_test. Kernels here launch through
// MOE_LAUNCH and take shared memory through MOE_DYNAMIC_SHARED for that.
#include <cuda_bf16.h>
#include <mma.h>

#include <algorithm>

#include "runtime/core/cuda/cuda_launch.cuh"

namespace moe::cuda {
namespace {

namespace wmma = nvcuda::wmma;
using Bf16 = __nv_bfloat16;
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, Bf16, wmma::row_major>;
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, Bf16, wmma::row_major>;
using FragBt = wmma::fragment<wmma::matrix_b, 16, 16, 16, Bf16, wmma::col_major>;  // B^T of a row-major tile
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

constexpr int kTile = 64;  // query rows of a block, keys of a tile
constexpr int kWarps = 4;  // 16 rows each
constexpr int kFlashThreads = kWarps * 32;
constexpr int kLdS = kTile + 4;  // f32 16 x 64 tiles (floats; padded against bank conflicts)
constexpr int kLdP = kTile + 8;  // bf16 16 x 64 tiles

// Padded row strides of the 64 x HD bf16 operand tiles and the 16 x HD f32
// output tiles. Every fragment's first element is 32-byte aligned.
template <int HD>
__host__ __device__ constexpr int LdB() {
  return HD + 8;
}
template <int HD>
__host__ __device__ constexpr int LdO() {
  return HD + 4;
}
template <int HD>
constexpr size_t OperandTileBytes() {
  return static_cast<size_t>(kTile) * LdB<HD>() * 2;
}
constexpr size_t kScoreTileBytes = static_cast<size_t>(kWarps) * 16 * kLdS * 4;  // one per warp
constexpr size_t kProbTileBytes = static_cast<size_t>(kWarps) * 16 * kLdP * 2;
template <int HD>
constexpr size_t OutTileBytes() {
  return static_cast<size_t>(kWarps) * 16 * LdO<HD>() * 4;
}

__device__ inline const Bf16* B(const uint16_t* p) { return reinterpret_cast<const Bf16*>(p); }

// Rows [row0, row0 + 64) of one head (row r at base + r * stride, HD bf16
// each) into a 64 x HD tile; rows at or past seq are zero. 16-byte copies.
template <int HD>
__device__ void LoadTile(const uint16_t* base, int64_t stride, int64_t row0, int64_t seq, uint16_t* tile) {
  constexpr int kChunks = HD / 8;
  for (int t = threadIdx.x; t < kTile * kChunks; t += blockDim.x) {
    const int r = t / kChunks, c = t % kChunks;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (row0 + r < seq) v = *reinterpret_cast<const uint4*>(base + (row0 + r) * stride + c * 8);
    *reinterpret_cast<uint4*>(tile + r * LdB<HD>() + c * 8) = v;
  }
}

// Backward's query tile [q0, q0 + 64) of one head: its q and dout rows and
// its lse and delta (zeros past seq).
template <int HD>
__device__ void LoadQueryTile(const uint16_t* q, const uint16_t* dout, const float* lse, const float* delta,
                              int64_t stride, int64_t q0, int64_t seq, uint16_t* qs, uint16_t* dos,
                              float* lse_s, float* delta_s) {
  LoadTile<HD>(q, stride, q0, seq, qs);
  LoadTile<HD>(dout, stride, q0, seq, dos);
  for (int t = threadIdx.x; t < kTile; t += blockDim.x) {
    const bool in = q0 + t < seq;
    lse_s[t] = in ? lse[q0 + t] : 0.0f;
    delta_s[t] = in ? delta[q0 + t] : 0.0f;
  }
}

// out (16 x 64, ld kLdS) = A (16 rows of a tile at `a`) times B^T, B the 64 x HD tile at `b`.
template <int HD>
__device__ void ProductABt(const uint16_t* a, const uint16_t* b, float* out) {
  for (int n = 0; n < kTile / 16; ++n) {
    FragC acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int kk = 0; kk < HD / 16; ++kk) {
      FragA fa;
      FragBt fb;
      wmma::load_matrix_sync(fa, B(a + kk * 16), LdB<HD>());
      wmma::load_matrix_sync(fb, B(b + n * 16 * LdB<HD>() + kk * 16), LdB<HD>());
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(out + n * 16, acc, kLdS, wmma::mem_row_major);
  }
}

// acc[n] += P (16 x 64 bf16, ld kLdP) times the 64 x HD tile at `b`, for the HD / 16 column blocks.
template <int HD>
__device__ void AccumulatePB(const uint16_t* p, const uint16_t* b, FragC* acc) {
#pragma unroll
  for (int n = 0; n < HD / 16; ++n) {
#pragma unroll
    for (int kk = 0; kk < kTile / 16; ++kk) {
      FragA fa;
      FragB fb;
      wmma::load_matrix_sync(fa, B(p + kk * 16), kLdP);
      wmma::load_matrix_sync(fb, B(b + kk * 16 * LdB<HD>() + n * 16), LdB<HD>());
      wmma::mma_sync(acc[n], fa, fb, acc[n]);
    }
  }
}

// Writes a warp's 16 x HD accumulators times `scale` as bf16 rows (row r at
// dst + (row0 + r) * stride, rows past seq skipped), through `stage` (16 x HD f32).
template <int HD>
__device__ void StoreRows(const FragC* acc, float scale, float* stage, uint16_t* dst, int64_t stride,
                          int64_t row0, int64_t seq) {
#pragma unroll
  for (int n = 0; n < HD / 16; ++n)
    wmma::store_matrix_sync(stage + n * 16, acc[n], LdO<HD>(), wmma::mem_row_major);
  __syncwarp();
  const int lane = threadIdx.x % 32;
  for (int t = lane; t < 16 * HD; t += 32) {
    const int r = t / HD, d = t % HD;
    if (row0 + r < seq) dst[(row0 + r) * stride + d] = kmath::F32ToBF16(stage[r * LdO<HD>() + d] * scale);
  }
}

template <int HD>
__global__ void __launch_bounds__(kFlashThreads)
    FlashForwardKernel(const uint16_t* q, const uint16_t* k, const uint16_t* v, float scale, uint16_t* out,
                       float* lse, AttentionShape sh) {
  MOE_DYNAMIC_SHARED(smem);
  uint16_t* qs = reinterpret_cast<uint16_t*>(smem);
  uint16_t* ks = qs + kTile * LdB<HD>();
  uint16_t* vs = ks + kTile * LdB<HD>();
  float* ss = reinterpret_cast<float*>(vs + kTile * LdB<HD>());
  float* os = ss + kWarps * 16 * kLdS;
  uint16_t* ps = reinterpret_cast<uint16_t*>(os + kWarps * 16 * LdO<HD>());

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.y / sh.heads, h = blockIdx.y % sh.heads, hk = h / (sh.heads / sh.kv_heads);
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t qstride = sh.heads * HD, kstride = sh.kv_heads * HD;
  const int64_t qoff = (b * sh.seq * sh.heads + h) * HD, koff = (b * sh.seq * sh.kv_heads + hk) * HD;
  float* ss_w = ss + warp * 16 * kLdS;
  float* os_w = os + warp * 16 * LdO<HD>();
  uint16_t* ps_w = ps + warp * 16 * kLdP;

  for (int t = lane; t < 16 * LdO<HD>(); t += 32) os_w[t] = 0.0f;
  LoadTile<HD>(q + qoff, qstride, q0, sh.seq, qs);
  // Lane pair (r, half) owns row r of the warp's 16, columns [32 half, 32 half + 32) of a tile.
  const int r = lane >> 1, half = lane & 1;
  const int64_t qi = q0 + warp * 16 + r;
  float m_run = -INFINITY, l_run = 0.0f;
  const int64_t keys = sh.seq < q0 + kTile ? sh.seq : q0 + kTile;  // the block's queries see keys [0, keys)
  for (int64_t k0 = 0; k0 < keys; k0 += kTile) {
    __syncthreads();  // the previous tile is no longer read
    LoadTile<HD>(k + koff, kstride, k0, sh.seq, ks);
    LoadTile<HD>(v + koff, kstride, k0, sh.seq, vs);
    __syncthreads();
    ProductABt<HD>(qs + warp * 16 * LdB<HD>(), ks, ss_w);
    __syncwarp();
    // Online softmax of the row's 64 scores (scaled; masked past the diagonal and the sequence).
    float* srow = ss_w + r * kLdS + half * 32;
    float mx = -INFINITY;
    for (int c = 0; c < 32; ++c) {
      const int64_t j = k0 + half * 32 + c;
      const float sv = (qi < sh.seq && j <= qi) ? srow[c] * scale : -INFINITY;
      srow[c] = sv;
      mx = fmaxf(mx, sv);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_new = fmaxf(m_run, mx);
    const bool none = m_new == -INFINITY;  // nothing seen yet (a row past the sequence)
    const float alpha = none ? 1.0f : kmath::OnlineSoftmaxRescale(m_run, m_new);
    uint16_t* prow = ps_w + r * kLdP + half * 32;
    float sum = 0.0f;
    for (int c = 0; c < 32; ++c) {
      const float p = none ? 0.0f : kmath::Exp(srow[c] - m_new);
      prow[c] = kmath::F32ToBF16(p);
      sum += p;
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l_run = l_run * alpha + sum;
    m_run = m_new;
    float* orow = os_w + r * LdO<HD>();
    for (int d = half; d < HD; d += 2) orow[d] *= alpha;
    __syncwarp();
    // O_w = O_w + P_w V, the accumulator round-tripping through shared memory (it was rescaled there).
    for (int n = 0; n < HD / 16; ++n) {
      FragC acc;
      wmma::load_matrix_sync(acc, os_w + n * 16, LdO<HD>(), wmma::mem_row_major);
      for (int kk = 0; kk < kTile / 16; ++kk) {
        FragA fa;
        FragB fb;
        wmma::load_matrix_sync(fa, B(ps_w + kk * 16), kLdP);
        wmma::load_matrix_sync(fb, B(vs + kk * 16 * LdB<HD>() + n * 16), LdB<HD>());
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(os_w + n * 16, acc, LdO<HD>(), wmma::mem_row_major);
    }
    __syncwarp();
  }
  if (qi >= sh.seq) return;
  const float inv = 1.0f / l_run;  // l_run >= 1: the row's maximum contributes exp(0)
  uint16_t* orow_g = out + qoff + qi * qstride;
  const float* orow = os_w + r * LdO<HD>();
  for (int d = half; d < HD; d += 2) orow_g[d] = kmath::F32ToBF16(orow[d] * inv);
  if (half == 0) lse[(b * sh.heads + h) * sh.seq + qi] = kmath::LogSumExpFrom(m_run, l_run);
}

// delta[b, h, i] = dout_i . out_i (bf16 rows, f32 sum): one warp per row.
__global__ void FlashDeltaKernel(const uint16_t* out, const uint16_t* dout, float* delta, AttentionShape sh) {
  const int64_t rows = sh.batch * sh.heads * sh.seq;
  const int lane = threadIdx.x % 32;
  for (int64_t t = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; t < rows;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x / 32) {
    const int64_t i = t % sh.seq, bh = t / sh.seq, h = bh % sh.heads, b = bh / sh.heads;
    const int64_t off = ((b * sh.seq + i) * sh.heads + h) * sh.head_dim;
    float acc = 0.0f;
    for (int64_t c = lane; c < sh.head_dim; c += 32)
      acc += kmath::BF16ToF32(out[off + c]) * kmath::BF16ToF32(dout[off + c]);
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) delta[t] = acc;
  }
}

// The probabilities and score gradients of a warp's 16 x 64 tile, from the
// raw scores `s` and dP `dp` (f32, ld kLdS), as bf16 (ld kLdP). Row r of the
// tile is `row_index(r)`, column c `col_index(c)`; the pair (query, key) is
// live when key <= query < seq. lse and delta are per query.
template <bool kRowsAreQueries>
__device__ void ScoreGrads(const float* s, const float* dp, int64_t row0, int64_t col0, int64_t seq,
                           float scale, const float* lse, const float* delta, uint16_t* p_out,
                           uint16_t* ds_out) {
  const int lane = threadIdx.x % 32, r = lane >> 1, half = lane & 1;
  for (int c = half * 32; c < half * 32 + 32; ++c) {
    const int64_t qi = kRowsAreQueries ? row0 + r : col0 + c;
    const int64_t kj = kRowsAreQueries ? col0 + c : row0 + r;
    const int qlocal = kRowsAreQueries ? r : c;  // lse / delta index
    float p = 0.0f, ds = 0.0f;
    if (qi < seq && kj <= qi) {
      p = kmath::AttentionProb(s[r * kLdS + c], scale, lse[qlocal]);
      ds = kmath::AttentionScoreGrad(p, dp[r * kLdS + c], delta[qlocal]);
    }
    if (p_out != nullptr) p_out[r * kLdP + c] = kmath::F32ToBF16(p);
    ds_out[r * kLdP + c] = kmath::F32ToBF16(ds);
  }
}

// dK and dV of a 64-key tile (warp w: keys 16w ..): over the query heads of
// the KV group and the query tiles from the diagonal on, in order.
template <int HD>
__global__ void __launch_bounds__(kFlashThreads)
    FlashDkvKernel(const uint16_t* q, const uint16_t* k, const uint16_t* v, const float* lse, float scale,
                   const uint16_t* dout, const float* delta, uint16_t* dk, uint16_t* dv, AttentionShape sh) {
  MOE_DYNAMIC_SHARED(smem);
  uint16_t* ks = reinterpret_cast<uint16_t*>(smem);
  uint16_t* vs = ks + kTile * LdB<HD>();
  uint16_t* qs = vs + kTile * LdB<HD>();
  uint16_t* dos = qs + kTile * LdB<HD>();
  float* st = reinterpret_cast<float*>(dos + kTile * LdB<HD>());  // S^T per warp
  float* dpt = st + kWarps * 16 * kLdS;                           // dP^T per warp
  uint16_t* pt = reinterpret_cast<uint16_t*>(dpt + kWarps * 16 * kLdS);
  uint16_t* dst = pt + kWarps * 16 * kLdP;
  float* lse_s = reinterpret_cast<float*>(dst + kWarps * 16 * kLdP);
  float* delta_s = lse_s + kTile;

  const int warp = threadIdx.x / 32;
  const int64_t b = blockIdx.y / sh.kv_heads, hk = blockIdx.y % sh.kv_heads, group = sh.heads / sh.kv_heads;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t qstride = sh.heads * HD, kstride = sh.kv_heads * HD;
  const int64_t koff = (b * sh.seq * sh.kv_heads + hk) * HD;
  float* st_w = st + warp * 16 * kLdS;
  float* dpt_w = dpt + warp * 16 * kLdS;
  uint16_t* pt_w = pt + warp * 16 * kLdP;
  uint16_t* dst_w = dst + warp * 16 * kLdP;

  FragC dk_acc[HD / 16], dv_acc[HD / 16];
#pragma unroll
  for (int n = 0; n < HD / 16; ++n) {
    wmma::fill_fragment(dk_acc[n], 0.0f);
    wmma::fill_fragment(dv_acc[n], 0.0f);
  }
  LoadTile<HD>(k + koff, kstride, k0, sh.seq, ks);
  LoadTile<HD>(v + koff, kstride, k0, sh.seq, vs);
  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = hk * group + g;
    const int64_t qoff = (b * sh.seq * sh.heads + h) * HD, soff = (b * sh.heads + h) * sh.seq;
    for (int64_t q0 = k0; q0 < sh.seq; q0 += kTile) {
      __syncthreads();  // the previous query tile is no longer read
      LoadQueryTile<HD>(q + qoff, dout + qoff, lse + soff, delta + soff, qstride, q0, sh.seq, qs, dos, lse_s,
                        delta_s);
      __syncthreads();
      ProductABt<HD>(ks + warp * 16 * LdB<HD>(), qs, st_w);    // S^T = K_w Q^T
      ProductABt<HD>(vs + warp * 16 * LdB<HD>(), dos, dpt_w);  // dP^T = V_w dO^T
      __syncwarp();
      ScoreGrads<false>(st_w, dpt_w, k0 + warp * 16, q0, sh.seq, scale, lse_s, delta_s, pt_w, dst_w);
      __syncwarp();
      AccumulatePB<HD>(pt_w, dos, dv_acc);  // dV += P^T dO
      AccumulatePB<HD>(dst_w, qs, dk_acc);  // dK += dS^T Q
    }
  }
  __syncthreads();  // the operand tiles are free: stage the outputs there
  float* stage = reinterpret_cast<float*>(smem) + warp * 16 * LdO<HD>();
  const int64_t row0 = k0 + warp * 16;
  StoreRows<HD>(dk_acc, scale, stage, dk + koff, kstride, row0, sh.seq);
  __syncwarp();
  StoreRows<HD>(dv_acc, 1.0f, stage, dv + koff, kstride, row0, sh.seq);
}

// dQ of a 64-query tile (warp w: queries 16w ..) over the key tiles it sees.
template <int HD>
__global__ void __launch_bounds__(kFlashThreads)
    FlashDqKernel(const uint16_t* q, const uint16_t* k, const uint16_t* v, const float* lse, float scale,
                  const uint16_t* dout, const float* delta, uint16_t* dq, AttentionShape sh) {
  MOE_DYNAMIC_SHARED(smem);
  uint16_t* qs = reinterpret_cast<uint16_t*>(smem);
  uint16_t* dos = qs + kTile * LdB<HD>();
  uint16_t* ks = dos + kTile * LdB<HD>();
  uint16_t* vs = ks + kTile * LdB<HD>();
  float* ss = reinterpret_cast<float*>(vs + kTile * LdB<HD>());
  float* dps = ss + kWarps * 16 * kLdS;
  uint16_t* dss = reinterpret_cast<uint16_t*>(dps + kWarps * 16 * kLdS);
  float* lse_s = reinterpret_cast<float*>(dss + kWarps * 16 * kLdP);
  float* delta_s = lse_s + kTile;

  const int warp = threadIdx.x / 32;
  const int64_t b = blockIdx.y / sh.heads, h = blockIdx.y % sh.heads, hk = h / (sh.heads / sh.kv_heads);
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t qstride = sh.heads * HD, kstride = sh.kv_heads * HD;
  const int64_t qoff = (b * sh.seq * sh.heads + h) * HD, koff = (b * sh.seq * sh.kv_heads + hk) * HD;
  const int64_t soff = (b * sh.heads + h) * sh.seq;
  float* ss_w = ss + warp * 16 * kLdS;
  float* dps_w = dps + warp * 16 * kLdS;
  uint16_t* dss_w = dss + warp * 16 * kLdP;

  FragC dq_acc[HD / 16];
#pragma unroll
  for (int n = 0; n < HD / 16; ++n) wmma::fill_fragment(dq_acc[n], 0.0f);
  LoadQueryTile<HD>(q + qoff, dout + qoff, lse + soff, delta + soff, qstride, q0, sh.seq, qs, dos, lse_s,
                    delta_s);
  const int64_t keys = sh.seq < q0 + kTile ? sh.seq : q0 + kTile;
  for (int64_t k0 = 0; k0 < keys; k0 += kTile) {
    __syncthreads();  // the previous key tile is no longer read (and the query tile is written)
    LoadTile<HD>(k + koff, kstride, k0, sh.seq, ks);
    LoadTile<HD>(v + koff, kstride, k0, sh.seq, vs);
    __syncthreads();
    ProductABt<HD>(qs + warp * 16 * LdB<HD>(), ks, ss_w);    // S = Q_w K^T
    ProductABt<HD>(dos + warp * 16 * LdB<HD>(), vs, dps_w);  // dP = dO_w V^T
    __syncwarp();
    ScoreGrads<true>(ss_w, dps_w, q0 + warp * 16, k0, sh.seq, scale, lse_s + warp * 16, delta_s + warp * 16,
                     nullptr, dss_w);
    __syncwarp();
    AccumulatePB<HD>(dss_w, ks, dq_acc);  // dQ += dS K
  }
  __syncthreads();
  float* stage = reinterpret_cast<float*>(smem) + warp * 16 * LdO<HD>();
  StoreRows<HD>(dq_acc, scale, stage, dq + qoff, qstride, q0 + warp * 16, sh.seq);
}

template <int HD>
constexpr size_t ForwardBytes() {
  return 3 * OperandTileBytes<HD>() + kScoreTileBytes + OutTileBytes<HD>() + kProbTileBytes;
}
template <int HD>
constexpr size_t BackwardBytes() {
  return 4 * OperandTileBytes<HD>() + 2 * kScoreTileBytes + 2 * kProbTileBytes + 2 * kTile * sizeof(float);
}
static_assert(OutTileBytes<128>() <= 2 * OperandTileBytes<128>(), "outputs are staged in the operand tiles");

cudaError_t AllowShared(const void* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <int HD>
cudaError_t Forward(const uint16_t* q, const uint16_t* k, const uint16_t* v, float scale, uint16_t* out,
                    float* lse, AttentionShape sh, cudaStream_t s) {
  constexpr size_t smem = ForwardBytes<HD>();
  if (cudaError_t e = AllowShared(reinterpret_cast<const void*>(FlashForwardKernel<HD>), smem);
      e != cudaSuccess)
    return e;
  const dim3 grid(static_cast<unsigned>((sh.seq + kTile - 1) / kTile),
                  static_cast<unsigned>(sh.batch * sh.heads));
  MOE_LAUNCH(FlashForwardKernel<HD>, grid, kFlashThreads, smem, s, q, k, v, scale, out, lse, sh);
  return cudaGetLastError();
}

template <int HD>
cudaError_t Backward(const uint16_t* q, const uint16_t* k, const uint16_t* v, const uint16_t* out,
                     const float* lse, float scale, const uint16_t* dout, uint16_t* dq, uint16_t* dk,
                     uint16_t* dv, float* delta, AttentionShape sh, cudaStream_t s) {
  constexpr size_t smem = BackwardBytes<HD>();
  if (cudaError_t e = AllowShared(reinterpret_cast<const void*>(FlashDkvKernel<HD>), smem); e != cudaSuccess)
    return e;
  if (cudaError_t e = AllowShared(reinterpret_cast<const void*>(FlashDqKernel<HD>), smem); e != cudaSuccess)
    return e;
  const int64_t rows = sh.batch * sh.heads * sh.seq;
  // A warp per row, 8 per block, grid-stride beyond 4096 blocks.
  const unsigned delta_blocks = static_cast<unsigned>(std::min<int64_t>((rows + 7) / 8, 4096));
  MOE_LAUNCH(FlashDeltaKernel, delta_blocks, 256, 0, s, out, dout, delta, sh);
  const unsigned tiles = static_cast<unsigned>((sh.seq + kTile - 1) / kTile);
  MOE_LAUNCH(FlashDkvKernel<HD>, dim3(tiles, static_cast<unsigned>(sh.batch * sh.kv_heads)), kFlashThreads,
             smem, s, q, k, v, lse, scale, dout, delta, dk, dv, sh);
  MOE_LAUNCH(FlashDqKernel<HD>, dim3(tiles, static_cast<unsigned>(sh.batch * sh.heads)), kFlashThreads, smem,
             s, q, k, v, lse, scale, dout, delta, dq, sh);
  return cudaGetLastError();
}

}  // namespace

bool FlashAttentionShapeOk(AttentionShape sh) {
  const bool hd = sh.head_dim == 32 || sh.head_dim == 64 || sh.head_dim == 128;
  return hd && sh.heads > 0 && sh.kv_heads > 0 && sh.heads % sh.kv_heads == 0 &&
         sh.batch * sh.heads <= 65535 && sh.batch * sh.kv_heads <= 65535;
}

cudaError_t LaunchFlashAttentionForward(const uint16_t* q, const uint16_t* k, const uint16_t* v, float scale,
                                        uint16_t* out, float* lse, AttentionShape sh, cudaStream_t s) {
  if (sh.batch * sh.seq * sh.heads == 0) return cudaGetLastError();
  switch (sh.head_dim) {
    case 32:
      return Forward<32>(q, k, v, scale, out, lse, sh, s);
    case 64:
      return Forward<64>(q, k, v, scale, out, lse, sh, s);
    case 128:
      return Forward<128>(q, k, v, scale, out, lse, sh, s);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t LaunchFlashAttentionBackward(const uint16_t* q, const uint16_t* k, const uint16_t* v,
                                         const uint16_t* out, const float* lse, float scale,
                                         const uint16_t* dout, uint16_t* dq, uint16_t* dk, uint16_t* dv,
                                         float* delta, AttentionShape sh, cudaStream_t s) {
  if (sh.batch * sh.seq * sh.heads == 0) return cudaGetLastError();
  switch (sh.head_dim) {
    case 32:
      return Backward<32>(q, k, v, out, lse, scale, dout, dq, dk, dv, delta, sh, s);
    case 64:
      return Backward<64>(q, k, v, out, lse, scale, dout, dq, dk, dv, delta, sh, s);
    case 128:
      return Backward<128>(q, k, v, out, lse, scale, dout, dq, dk, dv, delta, sh, s);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace moe::cuda
