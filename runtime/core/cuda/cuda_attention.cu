// Causal attention keeping only the row log-sum-exp (the CPU contract of
// ops::CausalAttention). One block per query row and head: the row's scores
// live in shared memory (O(S) per row), p = exp(s - lse) is recomputed in
// backward. Backward is two deterministic passes: dQ per query row (which
// also writes delta = rowsum(dout * out)), then dK, dV per key row summing
// the query rows of every head of its KV group in order.
#include <cfloat>

#include "runtime/core/cuda/cuda_launch.cuh"

namespace moe::cuda {
namespace {

constexpr int kAttnThreads = 128;
constexpr int64_t kMaxSeq = 16384;  // backward keeps 2 * seq floats of shared memory per block

// A row of seq floats in shared memory, rounded up to whole 16-byte words: the
// compiler may read the aligned 16 bytes holding a row's last element at once,
// and compute-sanitizer's memcheck flags the part past an unrounded allocation
// (seen on an H200 for the last query row of an odd seq).
__host__ __device__ inline int64_t PaddedRow(int64_t seq) { return (seq + 3) / 4 * 4; }

// q, k, v, out and their gradients are f32 (M = 0) or bf16 (M = 1, widened
// exactly as read; each output rounded once as stored): the f32 arithmetic of
// a bf16 call is the f32 call's on the widened operands, so a bf16 call gives,
// bit for bit, what the bf16 staging decorator gave by casting around the f32
// kernel, without the casts or the f32 copies. lse and delta are f32.
template <int M>
__device__ inline float Dot(ElemIn a, int64_t ao, ElemIn b, int64_t bo, int64_t n) {
  float acc = 0.0f;
  for (int64_t d = 0; d < n; ++d) acc += Ld<M>(a, ao + d) * Ld<M>(b, bo + d);
  return acc;
}

// Row (b, i, h): offsets of q/out/dout rows [B, S, H, hd] and k/v rows [B, S, Hkv, hd].
__device__ inline int64_t QRow(const AttentionShape& sh, int64_t b, int64_t i, int64_t h) {
  return ((b * sh.seq + i) * sh.heads + h) * sh.head_dim;
}
__device__ inline int64_t KRow(const AttentionShape& sh, int64_t b, int64_t j, int64_t hk) {
  return ((b * sh.seq + j) * sh.kv_heads + hk) * sh.head_dim;
}

template <int M>
__global__ void ForwardKernel(ElemIn q, ElemIn k, ElemIn v, float scale, ElemOut out, float* lse,
                              AttentionShape sh) {
  MOE_DYNAMIC_SHARED(scores_bytes);
  float* scores = reinterpret_cast<float*>(scores_bytes);  // [seq]
  __shared__ double red[32];
  const int64_t h = blockIdx.x % sh.heads, i = (blockIdx.x / sh.heads) % sh.seq,
                b = blockIdx.x / (sh.heads * sh.seq);
  const int64_t hk = h / (sh.heads / sh.kv_heads), hd = sh.head_dim;
  const int64_t qrow = QRow(sh, b, i, h);
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j <= i; j += blockDim.x) {
    const float s = scale * Dot<M>(q, qrow, k, KRow(sh, b, j, hk), hd);
    scores[j] = s;
    mx = s > mx ? s : mx;
  }
  const float m = static_cast<float>(BlockMax(static_cast<double>(mx), red));
  double sum = 0;
  for (int64_t j = threadIdx.x; j <= i; j += blockDim.x) {
    const float p = kmath::Exp(scores[j] - m);
    scores[j] = p;
    sum += p;
  }
  const double total = BlockSum(sum, red);  // ends with __syncthreads: every p is visible
  const float l = kmath::LogSumExpFrom(m, static_cast<float>(total));
  if (threadIdx.x == 0) lse[(b * sh.heads + h) * sh.seq + i] = l;
  const float inv = static_cast<float>(1.0 / total);
  for (int64_t d = threadIdx.x; d < hd; d += blockDim.x) {
    float acc = 0.0f;
    for (int64_t j = 0; j <= i; ++j) acc += scores[j] * Ld<M>(v, KRow(sh, b, j, hk) + d);
    St<M>(out, qrow + d, acc * inv);
  }
}

// dQ of row (b, i, h) and delta[b, h, i] = dout_i . out_i.
template <int M>
__global__ void DqKernel(ElemIn q, ElemIn k, ElemIn v, ElemIn out, const float* lse, float scale, ElemIn dout,
                         ElemOut dq, float* delta, AttentionShape sh) {
  MOE_DYNAMIC_SHARED(ds_bytes);
  float* ds = reinterpret_cast<float*>(ds_bytes);  // [seq]
  __shared__ double red[32];
  const int64_t h = blockIdx.x % sh.heads, i = (blockIdx.x / sh.heads) % sh.seq,
                b = blockIdx.x / (sh.heads * sh.seq);
  const int64_t hk = h / (sh.heads / sh.kv_heads), hd = sh.head_dim;
  const int64_t qrow = QRow(sh, b, i, h);
  double acc = 0;
  for (int64_t d = threadIdx.x; d < hd; d += blockDim.x)
    acc += static_cast<double>(Ld<M>(dout, qrow + d)) * Ld<M>(out, qrow + d);
  const float D = static_cast<float>(BlockSum(acc, red));
  const int64_t li = (b * sh.heads + h) * sh.seq + i;
  if (threadIdx.x == 0) delta[li] = D;
  const float l = lse[li];
  for (int64_t j = threadIdx.x; j <= i; j += blockDim.x) {
    const int64_t kr = KRow(sh, b, j, hk);
    const float p = kmath::Exp(scale * Dot<M>(q, qrow, k, kr, hd) - l);
    ds[j] = p * (Dot<M>(dout, qrow, v, kr, hd) - D);
  }
  __syncthreads();
  for (int64_t d = threadIdx.x; d < hd; d += blockDim.x) {
    float g = 0.0f;
    for (int64_t j = 0; j <= i; ++j) g += ds[j] * Ld<M>(k, KRow(sh, b, j, hk) + d);
    St<M>(dq, qrow + d, scale * g);
  }
}

// dK, dV of key row (b, j, hk): sums over the group's heads and the query rows i >= j.
template <int M>
__global__ void DkvKernel(ElemIn q, ElemIn k, ElemIn v, const float* lse, float scale, ElemIn dout,
                          const float* delta, ElemOut dk, ElemOut dv, AttentionShape sh) {
  MOE_DYNAMIC_SHARED(smem_bytes);
  float* smem = reinterpret_cast<float*>(smem_bytes);  // p [seq], ds [seq], each PaddedRow(seq) floats
  float* ps = smem;
  float* ds = smem + PaddedRow(sh.seq);
  const int64_t hk = blockIdx.x % sh.kv_heads, j = (blockIdx.x / sh.kv_heads) % sh.seq,
                b = blockIdx.x / (sh.kv_heads * sh.seq);
  const int64_t group = sh.heads / sh.kv_heads, hd = sh.head_dim;
  const int64_t kr = KRow(sh, b, j, hk);
  // Each thread owns a few d; the accumulators live in registers across heads.
  constexpr int kMaxPerThread = 4;  // head_dim <= 4 * kAttnThreads
  float gk[kMaxPerThread] = {}, gv[kMaxPerThread] = {};
  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = hk * group + g;
    for (int64_t i = j + threadIdx.x; i < sh.seq; i += blockDim.x) {
      const int64_t qrow = QRow(sh, b, i, h), li = (b * sh.heads + h) * sh.seq + i;
      const float p = kmath::Exp(scale * Dot<M>(q, qrow, k, kr, hd) - lse[li]);
      ps[i] = p;
      ds[i] = p * (Dot<M>(dout, qrow, v, kr, hd) - delta[li]);
    }
    __syncthreads();
    for (int t = 0; t < kMaxPerThread; ++t) {
      const int64_t d = threadIdx.x + static_cast<int64_t>(t) * blockDim.x;
      if (d >= hd) break;
      float ak = 0.0f, av = 0.0f;
      for (int64_t i = j; i < sh.seq; ++i) {
        const int64_t qrow = QRow(sh, b, i, h);
        av += ps[i] * Ld<M>(dout, qrow + d);
        ak += ds[i] * Ld<M>(q, qrow + d);
      }
      gk[t] += ak;
      gv[t] += av;
    }
    __syncthreads();
  }
  for (int t = 0; t < kMaxPerThread; ++t) {
    const int64_t d = threadIdx.x + static_cast<int64_t>(t) * blockDim.x;
    if (d >= hd) break;
    St<M>(dk, kr + d, scale * gk[t]);
    St<M>(dv, kr + d, gv[t]);
  }
}

// ---- Row passes of the gemm path (attention_gemm.h): one block per row of a
// score block, the row's causal keys j <= i0 + r visible, the rest written 0.

__device__ inline int64_t VisibleKeys(int64_t i0, int64_t r, int64_t keys) {
  return i0 + r + 1 < keys ? i0 + r + 1 : keys;
}

__global__ void SoftmaxRowsKernel(float* s, int64_t ld, int64_t stride, int64_t rows, int64_t keys,
                                  int64_t i0, int64_t lse_stride, float scale, float* lse) {
  __shared__ double red[32];
  const int64_t b = blockIdx.x / rows, r = blockIdx.x % rows;
  float* row = s + b * stride + r * ld;
  const int64_t vis = VisibleKeys(i0, r, keys);
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < vis; j += blockDim.x) {
    const float x = row[j] * scale;
    mx = x > mx ? x : mx;
  }
  const float m = static_cast<float>(BlockMax(static_cast<double>(mx), red));
  double sum = 0;
  for (int64_t j = threadIdx.x; j < vis; j += blockDim.x) sum += kmath::Exp(row[j] * scale - m);
  const float l = kmath::LogSumExpFrom(m, static_cast<float>(BlockSum(sum, red)));
  for (int64_t j = threadIdx.x; j < keys; j += blockDim.x)
    row[j] = j < vis ? kmath::AttentionProb(row[j], scale, l) : 0.0f;
  if (threadIdx.x == 0) lse[b * lse_stride + i0 + r] = l;
}

__global__ void SoftmaxBackwardRowsKernel(float* s, float* dp, int64_t ld, int64_t stride, int64_t rows,
                                          int64_t keys, int64_t i0, int64_t lse_stride, float scale,
                                          const float* lse, const float* delta) {
  const int64_t b = blockIdx.x / rows, r = blockIdx.x % rows, at = b * stride + r * ld;
  float* srow = s + at;
  float* drow = dp + at;
  const int64_t vis = VisibleKeys(i0, r, keys);
  const float l = lse[b * lse_stride + i0 + r], dl = delta[b * lse_stride + i0 + r];
  for (int64_t j = threadIdx.x; j < keys; j += blockDim.x) {
    const float p = j < vis ? kmath::AttentionProb(srow[j], scale, l) : 0.0f;
    drow[j] = j < vis ? kmath::AttentionScoreGrad(p, drow[j], dl) : 0.0f;
    srow[j] = p;
  }
}

__device__ inline const float* OperandAt(const BatchOperand& x, int64_t t, int64_t heads) {
  return x.base + (t / heads) * x.stride + ((t % heads) / x.head_div) * x.head_stride;
}

__global__ void BatchPointersKernel(BatchOperand a, BatchOperand b, BatchOperand c, int64_t batch,
                                    int64_t heads, void** out) {
  const int64_t count = batch * heads;
  MOE_GRID_STRIDE(t, count) {
    out[t] = const_cast<float*>(OperandAt(a, t, heads));
    out[count + t] = const_cast<float*>(OperandAt(b, t, heads));
    out[2 * count + t] = const_cast<float*>(OperandAt(c, t, heads));
  }
}

// delta[(b * heads + h) * seq + i] = out[b, i, h] . dout[b, i, h], a thread per row.
__global__ void DeltaKernel(const float* out, const float* dout, float* delta, AttentionShape sh) {
  const int64_t rows = sh.batch * sh.heads * sh.seq;
  MOE_GRID_STRIDE(t, rows) {
    const int64_t i = t % sh.seq, bh = t / sh.seq, h = bh % sh.heads, b = bh / sh.heads;
    const int64_t off = QRow(sh, b, i, h);
    double acc = 0;
    for (int64_t c = 0; c < sh.head_dim; ++c) acc += static_cast<double>(out[off + c]) * dout[off + c];
    delta[t] = static_cast<float>(acc);
  }
}

cudaError_t AllowSharedMemory(const void* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// Launches kernel (an instantiation) on `blocks` blocks of kAttnThreads with
// `smem` bytes of dynamic shared memory, first allowing more than 48 KiB.
#define MOE_ATTN_LAUNCH(kernel, blocks, smem, s, ...)                                                     \
  do {                                                                                                    \
    if (cudaError_t e = AllowSharedMemory(reinterpret_cast<const void*>(kernel), smem); e != cudaSuccess) \
      return e;                                                                                           \
    MOE_LAUNCH(kernel, blocks, kAttnThreads, smem, s, __VA_ARGS__);                                       \
  } while (0)

}  // namespace

int64_t MaxAttentionSeq() { return kMaxSeq; }

cudaError_t LaunchAttentionForward(ElemIn q, ElemIn k, ElemIn v, float scale, ElemOut out, float* lse,
                                   AttentionShape sh, cudaStream_t s) {
  const int64_t blocks = sh.batch * sh.seq * sh.heads;
  if (blocks == 0) return cudaGetLastError();
  const size_t smem = static_cast<size_t>(PaddedRow(sh.seq)) * sizeof(float);
  if (q.t == ElemType::kBF16) {
    MOE_ATTN_LAUNCH(ForwardKernel<1>, blocks, smem, s, q, k, v, scale, out, lse, sh);
  } else {
    MOE_ATTN_LAUNCH(ForwardKernel<0>, blocks, smem, s, q, k, v, scale, out, lse, sh);
  }
  return cudaGetLastError();
}

cudaError_t LaunchAttentionBackward(ElemIn q, ElemIn k, ElemIn v, ElemIn out, const float* lse, float scale,
                                    ElemIn dout, ElemOut dq, ElemOut dk, ElemOut dv, float* delta,
                                    AttentionShape sh, cudaStream_t s) {
  const int64_t qblocks = sh.batch * sh.seq * sh.heads, kblocks = sh.batch * sh.seq * sh.kv_heads;
  if (qblocks == 0) return cudaGetLastError();
  const size_t smem = static_cast<size_t>(PaddedRow(sh.seq)) * sizeof(float);
  if (q.t == ElemType::kBF16) {
    MOE_ATTN_LAUNCH(DqKernel<1>, qblocks, smem, s, q, k, v, out, lse, scale, dout, dq, delta, sh);
    MOE_ATTN_LAUNCH(DkvKernel<1>, kblocks, 2 * smem, s, q, k, v, lse, scale, dout, delta, dk, dv, sh);
  } else {
    MOE_ATTN_LAUNCH(DqKernel<0>, qblocks, smem, s, q, k, v, out, lse, scale, dout, dq, delta, sh);
    MOE_ATTN_LAUNCH(DkvKernel<0>, kblocks, 2 * smem, s, q, k, v, lse, scale, dout, delta, dk, dv, sh);
  }
  return cudaGetLastError();
}

cudaError_t LaunchAttentionSoftmaxRows(float* s, int64_t ld, int64_t stride, int64_t batch, int64_t rows,
                                       int64_t keys, int64_t i0, int64_t lse_stride, float scale, float* lse,
                                       cudaStream_t st) {
  if (batch * rows == 0) return cudaGetLastError();
  MOE_LAUNCH(SoftmaxRowsKernel, static_cast<unsigned>(batch * rows), kAttnThreads, 0, st, s, ld, stride, rows,
             keys, i0, lse_stride, scale, lse);
  return cudaGetLastError();
}

cudaError_t LaunchAttentionSoftmaxBackwardRows(float* s, float* dp, int64_t ld, int64_t stride, int64_t batch,
                                               int64_t rows, int64_t keys, int64_t i0, int64_t lse_stride,
                                               float scale, const float* lse, const float* delta,
                                               cudaStream_t st) {
  if (batch * rows == 0) return cudaGetLastError();
  MOE_LAUNCH(SoftmaxBackwardRowsKernel, static_cast<unsigned>(batch * rows), kAttnThreads, 0, st, s, dp, ld,
             stride, rows, keys, i0, lse_stride, scale, lse, delta);
  return cudaGetLastError();
}

cudaError_t LaunchAttentionDelta(const float* out, const float* dout, float* delta, AttentionShape sh,
                                 cudaStream_t st) {
  const int64_t rows = sh.batch * sh.heads * sh.seq;
  if (rows == 0) return cudaGetLastError();
  MOE_LAUNCH(DeltaKernel, GridFor(rows), kThreads, 0, st, out, dout, delta, sh);
  return cudaGetLastError();
}

cudaError_t LaunchBatchPointers(BatchOperand a, BatchOperand b, BatchOperand c, int64_t batch, int64_t heads,
                                void** out, cudaStream_t st) {
  const int64_t count = batch * heads;
  if (count == 0) return cudaGetLastError();
  MOE_LAUNCH(BatchPointersKernel, GridFor(count), kThreads, 0, st, a, b, c, batch, heads, out);
  return cudaGetLastError();
}

}  // namespace moe::cuda
