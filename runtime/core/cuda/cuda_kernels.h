// Host launchers of the CUDA kernels, one op family per .cu file. Each takes
// device pointers, sizes and the cudaStream_t of the backend Stream the op was
// called on (cuda_kernels.cc unpacks Tensors and Streams), enqueues its
// kernels and returns cudaGetLastError(). The per-element and per-row
// arithmetic is kernel_math.h's, the same functions the CPU backend calls, so
// the CPU test suite tests it. This header is plain C++ (no absl) so nvcc
// compiles only what the kernels need.
//
// Compiled only with MOE_WITH_CUDA.
#ifndef MOE_RUNTIME_CORE_CUDA_CUDA_KERNELS_H_
#define MOE_RUNTIME_CORE_CUDA_CUDA_KERNELS_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace moe::cuda {

// Written by the first kernel thread that finds a bad index (mapped host
// memory, one per stream); the stream's Synchronize turns it into
// InvalidArgument naming the op, the position and the value, and clears it.
struct DeviceError {
  int code;  // 0 = none, 1 = index out of range, 2 = a by_row entry that does not match the index
  int op;    // OpKind
  long long position;
  long long value;
  long long limit;
};

// A stream's record in mapped host memory: its kernels' DeviceError and the
// count of its opened host gates (cuda_gate.cu).
struct StreamRecord {
  DeviceError error;
  unsigned long long gates_open;
};

// ---- cuda_gate.cu ----
// Holds stream s until *gates_open >= ticket (a one-thread kernel polling
// mapped host memory; the host raises the count with a release store).
cudaError_t LaunchWaitHostGate(const unsigned long long* gates_open, unsigned long long ticket,
                               cudaStream_t s);

// Element types the element-wise launchers take (runtime/core/dtype.h order is not assumed).
enum class ElemType : int { kF32 = 0, kBF16 = 1, kI32 = 2, kI64 = 3, kF64 = 4 };

// ---- cuda_elementwise.cu ----
cudaError_t LaunchFill(void* p, ElemType t, int64_t n, double value, cudaStream_t s);
cudaError_t LaunchCast(const void* src, ElemType st, void* dst, ElemType dt, int64_t n, cudaStream_t s);
// Operands of the arithmetic element-wise kernels: f32 or bf16 each, mixed
// freely. A bf16 input is widened exactly, the arithmetic is f32 (kernel_math.h)
// and a bf16 output is rounded once, to nearest even: the numbers the bf16
// staging decorator gives around an f32 kernel, without its copies. Each
// element is read before it is written, so an output may alias an input.
struct ElemIn {
  const void* p;
  ElemType t;  // kF32 or kBF16
};
struct ElemOut {
  void* p;
  ElemType t;  // kF32 or kBF16
};
cudaError_t LaunchAdd(ElemIn a, ElemIn b, ElemOut out, int64_t n, cudaStream_t s);
cudaError_t LaunchMul(ElemIn a, ElemIn b, ElemOut out, int64_t n, cudaStream_t s);
cudaError_t LaunchAxpby(float alpha, ElemIn x, float beta, ElemOut y, int64_t n, cudaStream_t s);
cudaError_t LaunchScale(ElemIn x, float alpha, ElemOut out, int64_t n, cudaStream_t s);
cudaError_t LaunchSilu(ElemIn x, ElemOut out, int64_t n, cudaStream_t s);
cudaError_t LaunchSiluBackward(ElemIn x, ElemIn dout, ElemOut dx, float alpha, float beta, int64_t n,
                               cudaStream_t s);
cudaError_t LaunchSwiGLU(ElemIn gate, ElemIn up, ElemOut out, int64_t n, cudaStream_t s);
cudaError_t LaunchSwiGLUBackward(ElemIn gate, ElemIn up, ElemIn dout, ElemOut dgate, ElemOut dup, int64_t n,
                                 cudaStream_t s);

// ---- cuda_reduce.cu ----
enum class ReduceKind : int { kSum = 0, kSumSquares = 1, kMax = 2 };
// out[0] = alpha * reduce(x) + beta * out[0] (max: out[0] = max), accumulated in
// double in a fixed order that depends on n only (deterministic): up to 1024
// blocks each reduce one contiguous slice into `scratch`, one double per block,
// and one block combines those in order. ReduceScratchBytes(n) is 0 where one
// block does it all (n <= 16384); scratch may then be null.
size_t ReduceScratchBytes(int64_t n);
cudaError_t LaunchReduce(const float* x, int64_t n, ReduceKind kind, float* out, float alpha, float beta,
                         void* scratch, cudaStream_t s);
// out[c] = alpha * sum_r x[r, c] + beta * out[c], in row chunks (cuda_launch.cuh
// ColumnChunks) whose double partials go to `scratch`; ColumnSumScratchBytes is
// 0 (scratch may be null) for one chunk (rows <= 128).
size_t ColumnSumScratchBytes(int64_t rows, int64_t cols);
cudaError_t LaunchSumRows(const float* x, int64_t rows, int64_t cols, float* out, float alpha, float beta,
                          void* scratch, cudaStream_t s);

// ---- cuda_norm.cu ----
// Activations and weight f32 or bf16 each (as ElemIn / ElemOut above); rstd f32.
// residual.p null: RmsNorm (sum unused); else AddRmsNorm (sum = x + residual,
// normalised; sum may alias x or residual).
cudaError_t LaunchRmsNorm(ElemIn x, ElemIn residual, ElemOut sum, ElemIn weight, float eps, ElemOut out,
                          float* rstd, int64_t rows, int64_t d, cudaStream_t s);
// dweight += its column sums, over row chunks as SumRows's: `scratch` holds
// ColumnSumScratchBytes(rows, d) (null where that is 0).
cudaError_t LaunchRmsNormBackward(ElemIn x, ElemIn weight, const float* rstd, ElemIn dout, ElemOut dx,
                                  ElemOut dweight, bool accumulate_dx, int64_t rows, int64_t d, void* scratch,
                                  cudaStream_t s);

// ---- cuda_rope.cu ----
// in and out f32 or bf16 each; out may alias in.
cudaError_t LaunchRope(ElemIn in, ElemOut out, int64_t batch, int64_t seq, int64_t heads, int64_t head_dim,
                       double theta, int64_t position_offset, bool inverse, cudaStream_t s);

// ---- cuda_attention.cu ----
struct AttentionShape {
  int64_t batch, seq, heads, kv_heads, head_dim;
};
// The largest seq the kernels take (the row of scores lives in shared memory).
int64_t MaxAttentionSeq();
// q, k, v, out, dout, dq, dk, dv all f32 or all bf16 (q's type says which;
// f32 arithmetic either way, bf16 widened as read and rounded once as
// written); lse f32.
cudaError_t LaunchAttentionForward(ElemIn q, ElemIn k, ElemIn v, float scale, ElemOut out, float* lse,
                                   AttentionShape sh, cudaStream_t s);
// delta: scratch [batch, heads, seq] floats.
cudaError_t LaunchAttentionBackward(ElemIn q, ElemIn k, ElemIn v, ElemIn out, const float* lse, float scale,
                                    ElemIn dout, ElemOut dq, ElemOut dk, ElemOut dv, float* delta,
                                    AttentionShape sh, cudaStream_t s);

// ---- cuda_flash_attention.cu (MOE_ATTENTION=flash: bf16 on tensor cores) ----
// Shapes the flash kernels take: head_dim 32, 64 or 128, batch * heads <= 65535.
// Their operands must also be bf16 with 16-byte aligned rows (the caller checks).
bool FlashAttentionShapeOk(AttentionShape sh);
cudaError_t LaunchFlashAttentionForward(const uint16_t* q, const uint16_t* k, const uint16_t* v, float scale,
                                        uint16_t* out, float* lse, AttentionShape sh, cudaStream_t s);
// delta: scratch [batch, heads, seq] floats.
cudaError_t LaunchFlashAttentionBackward(const uint16_t* q, const uint16_t* k, const uint16_t* v,
                                         const uint16_t* out, const float* lse, float scale,
                                         const uint16_t* dout, uint16_t* dq, uint16_t* dk, uint16_t* dv,
                                         float* delta, AttentionShape sh, cudaStream_t s);

// Row passes of the gemm path (attention_gemm.h's ScoreBlock: `batch` blocks of
// `rows` x `keys` at s + b * stride, row r at stride ld, query i0 + r; lse and
// delta of that row at b * lse_stride + i0 + r).
cudaError_t LaunchAttentionSoftmaxRows(float* s, int64_t ld, int64_t stride, int64_t batch, int64_t rows,
                                       int64_t keys, int64_t i0, int64_t lse_stride, float scale, float* lse,
                                       cudaStream_t st);
cudaError_t LaunchAttentionSoftmaxBackwardRows(float* s, float* dp, int64_t ld, int64_t stride, int64_t batch,
                                               int64_t rows, int64_t keys, int64_t i0, int64_t lse_stride,
                                               float scale, const float* lse, const float* delta,
                                               cudaStream_t st);
// Pointer arrays of a batched GEMM over t = b * heads + h (attention_gemm.h's
// Operand, in floats): out[t], out[count + t], out[2 count + t] for a, b, c.
struct BatchOperand {
  const float* base;
  int64_t stride, head_stride, head_div;
};
cudaError_t LaunchBatchPointers(BatchOperand a, BatchOperand b, BatchOperand c, int64_t batch, int64_t heads,
                                void** out, cudaStream_t st);
// delta [batch, heads, seq] = rowsum(out o dout).
cudaError_t LaunchAttentionDelta(const float* out, const float* dout, float* delta, AttentionShape sh,
                                 cudaStream_t st);

// ---- cuda_softmax.cu (softmax, log-sum-exp, cross-entropy, top-k) ----
cudaError_t LaunchSoftmax(const float* x, float* out, int64_t rows, int64_t cols, cudaStream_t s);
cudaError_t LaunchSoftmaxBackward(const float* y, const float* dy, float* dx, float alpha, float beta,
                                  int64_t rows, int64_t cols, cudaStream_t s);
cudaError_t LaunchLogSumExp(const float* x, float* out, int64_t rows, int64_t cols, cudaStream_t s);
// logits and dlogits f32 or bf16 each (dlogits may alias logits); losses, lse, dloss f32.
cudaError_t LaunchCrossEntropy(ElemIn logits, const int32_t* targets, float* losses, float* lse, int64_t rows,
                               int64_t cols, DeviceError* err, int op, cudaStream_t s);
cudaError_t LaunchCrossEntropyBackward(ElemIn logits, const int32_t* targets, const float* lse,
                                       const float* dloss, float scale, ElemOut dlogits, int64_t rows,
                                       int64_t cols, DeviceError* err, int op, cudaStream_t s);
cudaError_t LaunchTopK(const float* x, int k, float* values, int32_t* indices, int64_t rows, int64_t cols,
                       cudaStream_t s);

// ---- cuda_router.cu (ops.h RouterScores and its backward; one thread a token) ----
// selection (may be null) entries outside [0, E) are reported (code 1) and give a 0 score.
// The choice (kernels.h RouterChoice): sigmoid, top_k, num_groups, group_topk.
cudaError_t LaunchRouterScores(const float* logits, const float* bias, const int32_t* selection, bool sigmoid,
                               int top_k, int64_t num_groups, int group_topk, float* scores,
                               float* aux_scores, float* lse, int32_t* experts, float* selected, int64_t rows,
                               int64_t E, DeviceError* err, int op, cudaStream_t s);
// logits, dscores may be null; daux has daux_rows rows (dividing rows).
cudaError_t LaunchRouterScoresBackward(const float* scores, const float* logits, const float* lse,
                                       const float* daux, const float* dscores, bool sigmoid, float z_coef,
                                       float* dlogits, int64_t rows, int64_t E, int64_t daux_rows,
                                       cudaStream_t s);

// ---- cuda_rows.cu (permute / un-permute, embedding) ----
cudaError_t LaunchGatherRows(const void* src, const int32_t* index, void* dst, int64_t m, int64_t n,
                             int64_t row_bytes, DeviceError* err, int op, cudaStream_t s);
// dst[i] = weight[i] * src[index[i]] (rows of d; src and dst f32 or bf16 each,
// the product in f32, rounded once).
cudaError_t LaunchGatherRowsScaled(ElemIn src, const int32_t* index, const float* weight, ElemOut dst,
                                   int64_t m, int64_t n, int64_t d, DeviceError* err, int op, cudaStream_t s);
// dst[index[i]] += weight[i] * src[i] (weight may be null: 1); src and dst f32
// or bf16 each; `overwrite`: every row of dst [n, d] starts from 0 instead (dst
// not read). Deterministic: each destination element adds its sources in i
// order in f32 (rounded once into a bf16 dst), as on CPU. `by_row` (ops.h
// ScatterRowOrder, n + 1 + m entries, or null) spares the sort: one launch,
// checked against index (code 2). `scratch`: a device block of
// ScatterAddRowsScratchBytes(m, n, by_row given) bytes, free again once the
// stream has passed the launch.
size_t ScatterAddRowsScratchBytes(int64_t m, int64_t n, bool by_row);
cudaError_t LaunchScatterAddRows(ElemIn src, const int32_t* index, ElemOut dst, const float* weight,
                                 bool overwrite, const int32_t* by_row, int64_t m, int64_t n, int64_t d,
                                 void* scratch, DeviceError* err, int op, cudaStream_t s);
// out[i] = alpha * dot(a[index[i]], b[i]) + beta * out[i]; a and b f32 or bf16 each, out f32.
cudaError_t LaunchGatherRowDot(ElemIn a, const int32_t* index, ElemIn b, float* out, float alpha, float beta,
                               int64_t m, int64_t n, int64_t d, DeviceError* err, int op, cudaStream_t s);

// ---- cuda_optim.cu (AdamW, initialisation) ----
// param_bf16 (may be null) receives the updated param rounded to bf16; the
// gradient is read as grad_scale * grad.
cudaError_t LaunchAdamW(float* param, const float* grad, float* m, float* v, uint16_t* param_bf16,
                        float grad_scale, float lr, float beta1, float beta2, float eps, float weight_decay,
                        float bc1, float bc2, int64_t n, cudaStream_t s);

// ---- the list forms (ops.h; cuda_elementwise.cu, cuda_reduce.cu, cuda_optim.cu) ----
// Each launcher takes at most kMaxListTensors entries (their pointers travel
// in the kernel's parameters, within CUDA's 4 KiB) and does what the
// one-tensor launcher does for each, in one launch (the sum of squares: two).
inline constexpr int kMaxListTensors = 32;
struct FillEntry {
  void* p;
  ElemType t;
  int64_t n;
};
cudaError_t LaunchFillList(const FillEntry* entries, int count, double value, cudaStream_t s);
struct ReduceEntry {
  const float* x;
  int64_t n;
};
size_t SumSquaresListScratchBytes(const ReduceEntry* entries, int count);
// out[i] = sum of squares of entry i (as LaunchReduce's kSumSquares with alpha 1, beta 0).
cudaError_t LaunchSumSquaresList(const ReduceEntry* entries, int count, float* out, void* scratch,
                                 cudaStream_t s);
struct AdamWEntry {
  float* param;
  const float* grad;
  float* m;
  float* v;
  uint16_t* param_bf16;  // may be null
  int64_t n;
  float weight_decay;
};
cudaError_t LaunchAdamWList(const AdamWEntry* entries, int count, float grad_scale, float lr, float beta1,
                            float beta2, float eps, float bc1, float bc2, cudaStream_t s);

struct InitBox {
  int rank;
  int64_t local[5];   // the box's shape
  int64_t offset[5];  // its offset in the global tensor
  int64_t global[5];  // the global shape
};
cudaError_t LaunchInitNormal(float* p, int64_t n, uint64_t seed, uint32_t k0, uint32_t k1, float std,
                             InitBox box, cudaStream_t s);

}  // namespace moe::cuda

#endif  // MOE_RUNTIME_CORE_CUDA_CUDA_KERNELS_H_
