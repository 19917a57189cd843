// A CPU stand-in for the part of cuBLAS that the CUDA backend uses, written
// from NVIDIA's documented semantics (the cuBLAS library reference: cublasGemmEx,
// cublasGemmBatchedEx, cublasGemmStridedBatchedEx, cublasGemmGroupedBatchedEx,
// cublasSetMathMode, cublasComputeType_t), with the names, parameter types and
// enum values of the real cublas_api.h / cublas_v2.h / library_types.h, so the
// real caller source compiles unchanged against it. What it models:
//   - column-major GEMM, C = alpha * op(A) * op(B) + beta * C with op(A) m x k,
//     op(B) k x n, C m x n; A stored lda x k (transa == N) or lda x m, B stored
//     ldb x n (transb == N) or ldb x k; CUBLAS_OP_C is CUBLAS_OP_T for real types;
//   - "device" memory is host memory: matrices and the pointer arrays of the
//     batched and grouped calls are read directly;
//   - stream order: a call's arguments, host arrays and scalars are read and
//     checked when it is made; the GEMMs run at once on the calling thread,
//     or, where the including code defines MOE_CUBLAS_EMULATION_SUBMIT
//     (see Enqueue below), are queued on the handle's stream, reading the
//     matrices and pointer arrays when they run;
//   - alpha and beta are host floats (pointer mode host; the scale type of
//     every 32F compute type); when beta == 0, C is not read (a NaN there does
//     not propagate); k == 0 gives C = beta * C;
//   - accumulation in float, in k order, one product at a time; a bf16 C gets
//     the float result rounded once (round to nearest even);
//     CUBLAS_COMPUTE_32F_FAST_TF32 rounds each input element to TF32 (10
//     explicit mantissa bits, nearest even) and CUBLAS_COMPUTE_32F_FAST_16BF to
//     bf16 before multiplying; the handle's math mode does not change the
//     arithmetic of an explicit compute type (CUBLAS_COMPUTE_32F is exact f32);
//   - argument checks as documented (CUBLAS_STATUS_INVALID_VALUE), type
//     combinations outside the documented tables, or outside what is emulated,
//     CUBLAS_STATUS_NOT_SUPPORTED, a null or destroyed handle
//     CUBLAS_STATUS_NOT_INITIALIZED. Every argument of a call is checked before
//     anything is written.
// Emulated types: CUDA_R_32F and CUDA_R_16BF (CUDA_R_16F and the compute types
// that need half rounding are documented but not emulated: NOT_SUPPORTED).
// What it cannot show: algorithm-dependent summation order, real alignment
// faults, asynchronous errors.
//
// Include it after a header that defines `cudaStream_t` (a pointer type) and
// `__nv_bfloat16` (tests/core/cuda_emulation.h). Test code only.
#ifndef MOE_TESTS_CORE_CUBLAS_EMULATION_H_
#define MOE_TESTS_CORE_CUBLAS_EMULATION_H_

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_set>
#include <vector>

#include "runtime/core/kernel_math.h"

// ---- library_types.h -------------------------------------------------------
typedef enum cudaDataType_t {
  CUDA_R_16F = 2,
  CUDA_C_16F = 6,
  CUDA_R_16BF = 14,
  CUDA_C_16BF = 15,
  CUDA_R_32F = 0,
  CUDA_C_32F = 4,
  CUDA_R_64F = 1,
  CUDA_C_64F = 5,
  CUDA_R_4I = 16,
  CUDA_C_4I = 17,
  CUDA_R_4U = 18,
  CUDA_C_4U = 19,
  CUDA_R_8I = 3,
  CUDA_C_8I = 7,
  CUDA_R_8U = 8,
  CUDA_C_8U = 9,
  CUDA_R_16I = 20,
  CUDA_C_16I = 21,
  CUDA_R_16U = 22,
  CUDA_C_16U = 23,
  CUDA_R_32I = 10,
  CUDA_C_32I = 11,
  CUDA_R_32U = 12,
  CUDA_C_32U = 13,
  CUDA_R_64I = 24,
  CUDA_C_64I = 25,
  CUDA_R_64U = 26,
  CUDA_C_64U = 27,
  CUDA_R_8F_E4M3 = 28,
  CUDA_R_8F_UE4M3 = CUDA_R_8F_E4M3,
  CUDA_R_8F_E5M2 = 29,
  CUDA_R_8F_UE8M0 = 30,
  CUDA_R_6F_E2M3 = 31,
  CUDA_R_6F_E3M2 = 32,
  CUDA_R_4F_E2M1 = 33,
} cudaDataType;
typedef enum cudaDataType_t cudaDataType_t;

// ---- cublas_api.h ----------------------------------------------------------
typedef enum {
  CUBLAS_STATUS_SUCCESS = 0,
  CUBLAS_STATUS_NOT_INITIALIZED = 1,
  CUBLAS_STATUS_ALLOC_FAILED = 3,
  CUBLAS_STATUS_INVALID_VALUE = 7,
  CUBLAS_STATUS_ARCH_MISMATCH = 8,
  CUBLAS_STATUS_MAPPING_ERROR = 11,
  CUBLAS_STATUS_EXECUTION_FAILED = 13,
  CUBLAS_STATUS_INTERNAL_ERROR = 14,
  CUBLAS_STATUS_NOT_SUPPORTED = 15,
  CUBLAS_STATUS_LICENSE_ERROR = 16
} cublasStatus_t;

typedef enum {
  CUBLAS_OP_N = 0,
  CUBLAS_OP_T = 1,
  CUBLAS_OP_C = 2,
  CUBLAS_OP_HERMITAN = 2,
  CUBLAS_OP_CONJG = 3  // a placeholder: not supported (INVALID_VALUE as an op)
} cublasOperation_t;

typedef enum {
  CUBLAS_GEMM_DFALT = -1,
  CUBLAS_GEMM_DEFAULT = -1,
  CUBLAS_GEMM_ALGO0 = 0,
  CUBLAS_GEMM_ALGO1 = 1,
  CUBLAS_GEMM_ALGO2 = 2,
  CUBLAS_GEMM_ALGO3 = 3,
  CUBLAS_GEMM_ALGO4 = 4,
  CUBLAS_GEMM_ALGO5 = 5,
  CUBLAS_GEMM_ALGO6 = 6,
  CUBLAS_GEMM_ALGO7 = 7,
  CUBLAS_GEMM_ALGO8 = 8,
  CUBLAS_GEMM_ALGO9 = 9,
  CUBLAS_GEMM_ALGO10 = 10,
  CUBLAS_GEMM_ALGO11 = 11,
  CUBLAS_GEMM_ALGO12 = 12,
  CUBLAS_GEMM_ALGO13 = 13,
  CUBLAS_GEMM_ALGO14 = 14,
  CUBLAS_GEMM_ALGO15 = 15,
  CUBLAS_GEMM_ALGO16 = 16,
  CUBLAS_GEMM_ALGO17 = 17,
  CUBLAS_GEMM_ALGO18 = 18,
  CUBLAS_GEMM_ALGO19 = 19,
  CUBLAS_GEMM_ALGO20 = 20,
  CUBLAS_GEMM_ALGO21 = 21,
  CUBLAS_GEMM_ALGO22 = 22,
  CUBLAS_GEMM_ALGO23 = 23,
  CUBLAS_GEMM_DEFAULT_TENSOR_OP = 99,
  CUBLAS_GEMM_DFALT_TENSOR_OP = 99,
  CUBLAS_GEMM_ALGO0_TENSOR_OP = 100,
  CUBLAS_GEMM_ALGO1_TENSOR_OP = 101,
  CUBLAS_GEMM_ALGO2_TENSOR_OP = 102,
  CUBLAS_GEMM_ALGO3_TENSOR_OP = 103,
  CUBLAS_GEMM_ALGO4_TENSOR_OP = 104,
  CUBLAS_GEMM_ALGO5_TENSOR_OP = 105,
  CUBLAS_GEMM_ALGO6_TENSOR_OP = 106,
  CUBLAS_GEMM_ALGO7_TENSOR_OP = 107,
  CUBLAS_GEMM_ALGO8_TENSOR_OP = 108,
  CUBLAS_GEMM_ALGO9_TENSOR_OP = 109,
  CUBLAS_GEMM_ALGO10_TENSOR_OP = 110,
  CUBLAS_GEMM_ALGO11_TENSOR_OP = 111,
  CUBLAS_GEMM_ALGO12_TENSOR_OP = 112,
  CUBLAS_GEMM_ALGO13_TENSOR_OP = 113,
  CUBLAS_GEMM_ALGO14_TENSOR_OP = 114,
  CUBLAS_GEMM_ALGO15_TENSOR_OP = 115,
  CUBLAS_GEMM_AUTOTUNE = 999,
} cublasGemmAlgo_t;

typedef enum {
  CUBLAS_DEFAULT_MATH = 0,
  CUBLAS_TENSOR_OP_MATH = 1,  // deprecated
  CUBLAS_PEDANTIC_MATH = 2,
  CUBLAS_TF32_TENSOR_OP_MATH = 3,
  CUBLAS_FP32_EMULATED_BF16X9_MATH = 4,
  CUBLAS_FP64_EMULATED_FIXEDPOINT_MATH = 8,
  CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION = 16,  // a flag, or'ed with one of the above
} cublasMath_t;

typedef cudaDataType cublasDataType_t;

typedef enum {
  CUBLAS_COMPUTE_16F = 64,
  CUBLAS_COMPUTE_16F_PEDANTIC = 65,
  CUBLAS_COMPUTE_32F = 68,
  CUBLAS_COMPUTE_32F_PEDANTIC = 69,
  CUBLAS_COMPUTE_32F_FAST_16F = 74,
  CUBLAS_COMPUTE_32F_FAST_16BF = 75,
  CUBLAS_COMPUTE_32F_FAST_TF32 = 77,
  CUBLAS_COMPUTE_32F_EMULATED_16BFX9 = 78,
  CUBLAS_COMPUTE_64F = 70,
  CUBLAS_COMPUTE_64F_PEDANTIC = 71,
  CUBLAS_COMPUTE_64F_EMULATED_FIXEDPOINT = 79,
  CUBLAS_COMPUTE_32I = 72,
  CUBLAS_COMPUTE_32I_PEDANTIC = 73,
} cublasComputeType_t;

// The opaque library context: what the emulation keeps of it.
struct cublasContext {
  cudaStream_t stream = nullptr;
  cublasMath_t math_mode = CUBLAS_DEFAULT_MATH;
#ifdef MOE_CUBLAS_EMULATION_DEVICE
  int device = MOE_CUBLAS_EMULATION_DEVICE;  // current at cublasCreate: the handle's device
#endif
};
typedef struct cublasContext* cublasHandle_t;

namespace moe::cublas_emulation {

// Live handles, so that a null, destroyed or foreign handle is answered with
// CUBLAS_STATUS_NOT_INITIALIZED instead of being dereferenced.
struct HandleRegistry {
  std::mutex mu;
  std::unordered_set<const cublasContext*> live;
};
inline HandleRegistry& Handles() {
  static HandleRegistry* registry = new HandleRegistry();  // never destroyed (used by stream workers at exit)
  return *registry;
}
inline bool IsLive(const cublasContext* h) {
  if (h == nullptr) return false;
  HandleRegistry& r = Handles();
  std::lock_guard<std::mutex> lock(r.mu);
  return r.live.count(h) != 0;
}

// fp32 -> TF32 (8 exponent bits, 10 explicit mantissa bits), round to nearest
// even, kept in a float; NaN and infinity pass through.
inline float RoundToTF32(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if ((bits & 0x7f800000u) == 0x7f800000u) return v;
  bits += 0xfffu + ((bits >> 13) & 1u);
  bits &= ~0x1fffu;
  float r;
  std::memcpy(&r, &bits, sizeof r);
  return r;
}

enum class InputRounding { kNone, kTF32, kBF16 };

inline float RoundInput(float v, InputRounding rounding) {
  switch (rounding) {
    case InputRounding::kTF32:
      return RoundToTF32(v);
    case InputRounding::kBF16:
      return kmath::RoundToBF16(v);
    case InputRounding::kNone:
      break;
  }
  return v;
}

inline size_t ElementBytes(cudaDataType t) { return t == CUDA_R_16BF ? 2 : 4; }

inline float Load(const void* p, cudaDataType t, int64_t i) {
  if (t == CUDA_R_16BF) {
    uint16_t h;
    std::memcpy(&h, static_cast<const unsigned char*>(p) + i * 2, sizeof h);
    return kmath::BF16ToF32(h);
  }
  float f;
  std::memcpy(&f, static_cast<const unsigned char*>(p) + i * 4, sizeof f);
  return f;
}

inline void Store(void* p, cudaDataType t, int64_t i, float v) {
  if (t == CUDA_R_16BF) {
    const uint16_t h = kmath::F32ToBF16(v);
    std::memcpy(static_cast<unsigned char*>(p) + i * 2, &h, sizeof h);
    return;
  }
  std::memcpy(static_cast<unsigned char*>(p) + i * 4, &v, sizeof v);
}

inline bool ValidOp(cublasOperation_t op) {
  return op == CUBLAS_OP_N || op == CUBLAS_OP_T || op == CUBLAS_OP_C;
}

inline bool ValidAlgo(cublasGemmAlgo_t algo) {
  const int a = static_cast<int>(algo);
  return a == -1 || (a >= 0 && a <= 23) || (a >= 99 && a <= 115) || a == 999;
}

inline int64_t Max1(int64_t v) { return v > 1 ? v : 1; }

// The documented INVALID_VALUE conditions of one GEMM's shape: m, n, k >= 0,
// transa/transb one of N, T, C; lda >= max(1, m) if transa == N else
// max(1, k); ldb >= max(1, k) if transb == N else max(1, n); ldc >= max(1, m).
inline cublasStatus_t CheckShape(cublasOperation_t transa, cublasOperation_t transb, int64_t m, int64_t n,
                                 int64_t k, int64_t lda, int64_t ldb, int64_t ldc) {
  if (!ValidOp(transa) || !ValidOp(transb)) return CUBLAS_STATUS_INVALID_VALUE;
  if (m < 0 || n < 0 || k < 0) return CUBLAS_STATUS_INVALID_VALUE;
  if (lda < Max1(transa == CUBLAS_OP_N ? m : k)) return CUBLAS_STATUS_INVALID_VALUE;
  if (ldb < Max1(transb == CUBLAS_OP_N ? k : n)) return CUBLAS_STATUS_INVALID_VALUE;
  if (ldc < Max1(m)) return CUBLAS_STATUS_INVALID_VALUE;
  return CUBLAS_STATUS_SUCCESS;
}

// The type table of cublasGemmEx / cublasGemmBatchedEx /
// cublasGemmStridedBatchedEx, restricted to the emulated types (scale type
// CUDA_R_32F throughout):
//   CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_PEDANTIC:
//     16BF x 16BF -> 16BF, 16BF x 16BF -> 32F, 32F x 32F -> 32F
//   CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_COMPUTE_32F_FAST_16BF:
//     32F x 32F -> 32F
// Documented but not emulated (NOT_SUPPORTED here): the 16F rows, 8I, complex,
// CUBLAS_COMPUTE_32F_FAST_16F, 16F, 64F, 32I and the emulated compute types.
inline cublasStatus_t CheckGemmExTypes(cudaDataType a, cudaDataType b, cudaDataType c,
                                       cublasComputeType_t compute, InputRounding* rounding) {
  if (a != b) return CUBLAS_STATUS_NOT_SUPPORTED;
  switch (compute) {
    case CUBLAS_COMPUTE_32F:
    case CUBLAS_COMPUTE_32F_PEDANTIC:
      *rounding = InputRounding::kNone;
      if (a == CUDA_R_16BF && (c == CUDA_R_16BF || c == CUDA_R_32F)) return CUBLAS_STATUS_SUCCESS;
      if (a == CUDA_R_32F && c == CUDA_R_32F) return CUBLAS_STATUS_SUCCESS;
      return CUBLAS_STATUS_NOT_SUPPORTED;
    case CUBLAS_COMPUTE_32F_FAST_TF32:
    case CUBLAS_COMPUTE_32F_FAST_16BF:
      *rounding = compute == CUBLAS_COMPUTE_32F_FAST_TF32 ? InputRounding::kTF32 : InputRounding::kBF16;
      if (a == CUDA_R_32F && c == CUDA_R_32F) return CUBLAS_STATUS_SUCCESS;
      return CUBLAS_STATUS_NOT_SUPPORTED;
    default:
      return CUBLAS_STATUS_NOT_SUPPORTED;
  }
}

// The type table of cublasGemmGroupedBatchedEx, restricted to the emulated
// types (scale type CUDA_R_32F; Atype == Btype == Ctype in every row):
//   CUBLAS_COMPUTE_32F:           16BF x 16BF -> 16BF, 32F x 32F -> 32F
//   CUBLAS_COMPUTE_32F_FAST_TF32: 32F x 32F -> 32F
// No mixed row (16BF x 16BF -> 32F), no _PEDANTIC or FAST_16BF compute type.
// Documented but not emulated: 16F x 16F -> 16F (CUBLAS_COMPUTE_32F) and the
// 64F row.
inline cublasStatus_t CheckGroupedTypes(cudaDataType a, cudaDataType b, cudaDataType c,
                                        cublasComputeType_t compute, InputRounding* rounding) {
  if (a != b || a != c) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (compute == CUBLAS_COMPUTE_32F && (a == CUDA_R_32F || a == CUDA_R_16BF)) {
    *rounding = InputRounding::kNone;
    return CUBLAS_STATUS_SUCCESS;
  }
  if (compute == CUBLAS_COMPUTE_32F_FAST_TF32 && a == CUDA_R_32F) {
    *rounding = InputRounding::kTF32;
    return CUBLAS_STATUS_SUCCESS;
  }
  return CUBLAS_STATUS_NOT_SUPPORTED;
}

// One GEMM whose arguments were checked: C = alpha * op(A) op(B) + beta * C.
struct Gemm {
  cublasOperation_t transa, transb;
  int64_t m, n, k;
  float alpha, beta;
  const void* a;
  cudaDataType a_type;
  int64_t lda;
  const void* b;
  cudaDataType b_type;
  int64_t ldb;
  void* c;
  cudaDataType c_type;
  int64_t ldc;
  InputRounding rounding;
};

// The matrix pointers a GEMM reads or writes are non-null (CUBLAS_STATUS_
// EXECUTION_FAILED otherwise: on a GPU, a fault of the launched kernel).
inline bool PointersUsable(const Gemm& g) {
  if (g.m == 0 || g.n == 0) return true;
  if (g.c == nullptr) return false;
  if (g.k > 0 && (g.a == nullptr || g.b == nullptr)) return false;
  return true;
}

inline void Run(const Gemm& g) {
  // op(A)'s rows and op(B)'s columns, each contiguous and with its inputs
  // rounded: op(A)(i, p) is A(i, p) if transa == N, else A(p, i); op(B)(p, j) likewise.
  std::vector<float> a(static_cast<size_t>(g.m * g.k)), b(static_cast<size_t>(g.n * g.k));
  for (int64_t i = 0; i < g.m; ++i)
    for (int64_t p = 0; p < g.k; ++p)
      a[i * g.k + p] = RoundInput(
          Load(g.a, g.a_type, g.transa == CUBLAS_OP_N ? i + p * g.lda : p + i * g.lda), g.rounding);
  for (int64_t j = 0; j < g.n; ++j)
    for (int64_t p = 0; p < g.k; ++p)
      b[j * g.k + p] = RoundInput(
          Load(g.b, g.b_type, g.transb == CUBLAS_OP_N ? p + j * g.ldb : j + p * g.ldb), g.rounding);
  for (int64_t j = 0; j < g.n; ++j) {
    for (int64_t i = 0; i < g.m; ++i) {
      const int64_t ci = i + j * g.ldc;
      float r;
      if (g.k == 0) {
        r = g.beta == 0.0f ? 0.0f : g.beta * Load(g.c, g.c_type, ci);
      } else {
        const float *ar = a.data() + i * g.k, *bc = b.data() + j * g.k;
        float acc = 0.0f;
        for (int64_t p = 0; p < g.k; ++p) {  // in k order, each product rounded before the sum
          const float prod = ar[p] * bc[p];
          acc = acc + prod;
        }
        r = g.alpha * acc;
        if (g.beta != 0.0f) r = r + g.beta * Load(g.c, g.c_type, ci);
      }
      Store(g.c, g.c_type, ci, r);
    }
  }
}

inline const void* Offset(const void* p, cudaDataType t, long long elements) {
  return p == nullptr
             ? nullptr
             : static_cast<const unsigned char*>(p) + elements * static_cast<long long>(ElementBytes(t));
}
inline void* Offset(void* p, cudaDataType t, long long elements) {
  return p == nullptr ? nullptr
                      : static_cast<unsigned char*>(p) + elements * static_cast<long long>(ElementBytes(t));
}

// Runs a call's work in the order of the handle's stream. Everything a call
// takes from the host (the shape, the per-group arrays, alpha and beta) is
// read when it is made; what lives in "device" memory (the matrices and the
// pointer arrays) when the work runs. Without MOE_CUBLAS_EMULATION_SUBMIT the
// work runs at once, on the calling thread; a CUDA emulation with asynchronous
// streams defines it, before including this header, as a call that runs
// `fn` (a copyable void() callable) in `stream`'s order, e.g.
//   #define MOE_CUBLAS_EMULATION_SUBMIT(stream, fn) moe::cuda_emulation::Submit(stream, fn)
// A null matrix pointer found when the work runs is a device fault: the call's
// CUBLAS_STATUS_EXECUTION_FAILED when it runs at once, an abort when queued.
template <typename Work>
cublasStatus_t Enqueue(cublasHandle_t handle, const char* api, Work work) {
  static_cast<void>(api);     // named to the census only where one is kept
  static_cast<void>(handle);  // unused when the work runs at once
#ifdef MOE_CUBLAS_EMULATION_DEVICE
  // A handle works on the device that was current at its creation: its
  // kernels cannot launch from a thread with another device current.
  if (handle->device != MOE_CUBLAS_EMULATION_DEVICE) return CUBLAS_STATUS_EXECUTION_FAILED;
#endif
#ifdef MOE_CUBLAS_EMULATION_COUNT
  MOE_CUBLAS_EMULATION_COUNT(api);
#endif
#ifdef MOE_CUBLAS_EMULATION_SUBMIT
  MOE_CUBLAS_EMULATION_SUBMIT(handle->stream, [work]() mutable {
    if (!work()) {
      std::fprintf(stderr, "cublas emulation: a GEMM's matrix pointer is null (a device fault)\n");
      std::abort();
    }
  });
  return CUBLAS_STATUS_SUCCESS;
#else
  return work() ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
#endif
}

// cublasGemmEx, cublasGemmBatchedEx and cublasGemmStridedBatchedEx share this:
// `matrix(i, &a, &b, &c)` gives problem i's matrices (it is copied into the
// queued work, so it holds its pointers by value).
template <typename MatrixOf>
cublasStatus_t UniformBatch(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                            int64_t m, int64_t n, int64_t k, const void* alpha, cudaDataType a_type,
                            int64_t lda, cudaDataType b_type, int64_t ldb, const void* beta,
                            cudaDataType c_type, int64_t ldc, int64_t batch_count, bool arrays_present,
                            cublasComputeType_t compute, cublasGemmAlgo_t algo, const char* api,
                            MatrixOf matrix) {
  if (!IsLive(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (cublasStatus_t s = CheckShape(transa, transb, m, n, k, lda, ldb, ldc); s != CUBLAS_STATUS_SUCCESS)
    return s;
  if (batch_count < 0 || alpha == nullptr || beta == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  InputRounding rounding = InputRounding::kNone;
  if (cublasStatus_t s = CheckGemmExTypes(a_type, b_type, c_type, compute, &rounding);
      s != CUBLAS_STATUS_SUCCESS) {
    return s;
  }
  if (!ValidAlgo(algo)) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (m == 0 || n == 0 || batch_count == 0) return CUBLAS_STATUS_SUCCESS;
  if (!arrays_present) return CUBLAS_STATUS_INVALID_VALUE;
  float alpha_v, beta_v;
  std::memcpy(&alpha_v, alpha, sizeof alpha_v);
  std::memcpy(&beta_v, beta, sizeof beta_v);
  const Gemm shape{transa, transb,  m,      n,   k,       alpha_v, beta_v, nullptr, a_type,
                   lda,    nullptr, b_type, ldb, nullptr, c_type,  ldc,    rounding};
  return Enqueue(handle, api, [shape, batch_count, matrix]() {
    Gemm g = shape;
    for (int64_t i = 0; i < batch_count; ++i) {
      matrix(i, &g.a, &g.b, &g.c);
      if (!PointersUsable(g)) return false;
    }
    for (int64_t i = 0; i < batch_count; ++i) {
      matrix(i, &g.a, &g.b, &g.c);
      Run(g);
    }
    return true;
  });
}

template <typename Int>
cublasStatus_t Grouped(cublasHandle_t handle, const cublasOperation_t transa_array[],
                       const cublasOperation_t transb_array[], const Int m_array[], const Int n_array[],
                       const Int k_array[], const void* alpha_array, const void* const Aarray[],
                       cudaDataType_t Atype, const Int lda_array[], const void* const Barray[],
                       cudaDataType_t Btype, const Int ldb_array[], const void* beta_array,
                       void* const Carray[], cudaDataType_t Ctype, const Int ldc_array[], Int group_count,
                       const Int group_size[], cublasComputeType_t computeType) {
  if (!IsLive(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (group_count < 0) return CUBLAS_STATUS_INVALID_VALUE;
  InputRounding rounding = InputRounding::kNone;
  if (cublasStatus_t s = CheckGroupedTypes(Atype, Btype, Ctype, computeType, &rounding);
      s != CUBLAS_STATUS_SUCCESS) {
    return s;
  }
  if (group_count == 0) return CUBLAS_STATUS_SUCCESS;
  // The per-group arrays are host arrays of group_count entries, indexed by
  // group (alpha_array and beta_array: floats, the scale type of the 32F
  // compute types).
  if (transa_array == nullptr || transb_array == nullptr || m_array == nullptr || n_array == nullptr ||
      k_array == nullptr || alpha_array == nullptr || lda_array == nullptr || ldb_array == nullptr ||
      beta_array == nullptr || ldc_array == nullptr || group_size == nullptr) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  const float* alphas = static_cast<const float*>(alpha_array);
  const float* betas = static_cast<const float*>(beta_array);
  struct Group {
    Gemm shape;
    int64_t size;
  };
  std::vector<Group> groups;
  int64_t problem_count = 0;
  for (Int gi = 0; gi < group_count; ++gi) {
    if (group_size[gi] < 0) return CUBLAS_STATUS_INVALID_VALUE;
    if (cublasStatus_t s = CheckShape(transa_array[gi], transb_array[gi], m_array[gi], n_array[gi],
                                      k_array[gi], lda_array[gi], ldb_array[gi], ldc_array[gi]);
        s != CUBLAS_STATUS_SUCCESS) {
      return s;
    }
    groups.push_back({Gemm{transa_array[gi], transb_array[gi], m_array[gi], n_array[gi], k_array[gi],
                           alphas[gi], betas[gi], nullptr, Atype, lda_array[gi], nullptr, Btype,
                           ldb_array[gi], nullptr, Ctype, ldc_array[gi], rounding},
                      group_size[gi]});
    problem_count += group_size[gi];
  }
  if (problem_count == 0) return CUBLAS_STATUS_SUCCESS;
  if (Aarray == nullptr || Barray == nullptr || Carray == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  // Aarray, Barray and Carray hold problem_count = sum(group_size) pointers,
  // group after group: group gi's group_size[gi] problems follow those of
  // groups 0 .. gi-1 (a group of size 0 takes none).
  return Enqueue(handle, "cublasGemmGroupedBatchedEx", [groups, Aarray, Barray, Carray]() {
    for (int pass = 0; pass < 2; ++pass) {  // check every pointer, then run
      int64_t p = 0;
      for (const Group& group : groups) {
        Gemm g = group.shape;
        for (int64_t j = 0; j < group.size; ++j, ++p) {
          g.a = Aarray[p];
          g.b = Barray[p];
          g.c = Carray[p];
          if (pass == 0 && !PointersUsable(g)) return false;
          if (pass == 1) Run(g);
        }
      }
    }
    return true;
  });
}

}  // namespace moe::cublas_emulation

// ---- context ---------------------------------------------------------------
inline cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
  if (handle == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  cublasContext* h = new cublasContext;
  moe::cublas_emulation::HandleRegistry& r = moe::cublas_emulation::Handles();
  std::lock_guard<std::mutex> lock(r.mu);
  r.live.insert(h);
  *handle = h;
  return CUBLAS_STATUS_SUCCESS;
}

inline cublasStatus_t cublasDestroy_v2(cublasHandle_t handle) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  moe::cublas_emulation::HandleRegistry& r = moe::cublas_emulation::Handles();
  std::lock_guard<std::mutex> lock(r.mu);
  if (r.live.erase(handle) == 0) return CUBLAS_STATUS_NOT_INITIALIZED;
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

inline cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t streamId) {
  if (!moe::cublas_emulation::IsLive(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->stream = streamId;
  return CUBLAS_STATUS_SUCCESS;
}

inline cublasStatus_t cublasGetStream_v2(cublasHandle_t handle, cudaStream_t* streamId) {
  if (!moe::cublas_emulation::IsLive(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (streamId == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *streamId = handle->stream;
  return CUBLAS_STATUS_SUCCESS;
}

// cublas_v2.h maps these names to the _v2 entry points.
#define cublasCreate cublasCreate_v2
#define cublasDestroy cublasDestroy_v2
#define cublasSetStream cublasSetStream_v2
#define cublasGetStream cublasGetStream_v2

inline cublasStatus_t cublasGetMathMode(cublasHandle_t handle, cublasMath_t* mode) {
  if (!moe::cublas_emulation::IsLive(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (mode == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *mode = handle->math_mode;
  return CUBLAS_STATUS_SUCCESS;
}

// The mode is one of the cublasMath_t values, optionally or'ed with
// CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION; it is recorded (the
// emulation's arithmetic is that of the explicit compute type regardless).
inline cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
  if (!moe::cublas_emulation::IsLive(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  const int base =
      static_cast<int>(mode) & ~static_cast<int>(CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION);
  if (base != CUBLAS_DEFAULT_MATH && base != CUBLAS_TENSOR_OP_MATH && base != CUBLAS_PEDANTIC_MATH &&
      base != CUBLAS_TF32_TENSOR_OP_MATH && base != CUBLAS_FP32_EMULATED_BF16X9_MATH &&
      base != CUBLAS_FP64_EMULATED_FIXEDPOINT_MATH) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  handle->math_mode = mode;
  return CUBLAS_STATUS_SUCCESS;
}

inline const char* cublasGetStatusName(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS:
      return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED:
      return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH:
      return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR:
      return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED:
      return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR:
      return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR:
      return "CUBLAS_STATUS_LICENSE_ERROR";
  }
  return "CUBLAS_STATUS_UNKNOWN";
}

inline const char* cublasGetStatusString(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS:
      return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return "the library was not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED:
      return "the resource allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "an invalid numeric value was used as an argument";
    case CUBLAS_STATUS_ARCH_MISMATCH:
      return "an absent device architectural feature is required";
    case CUBLAS_STATUS_MAPPING_ERROR:
      return "an access to GPU memory space failed";
    case CUBLAS_STATUS_EXECUTION_FAILED:
      return "the GPU program failed to execute";
    case CUBLAS_STATUS_INTERNAL_ERROR:
      return "an internal operation failed";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "the functionality requested is not supported";
    case CUBLAS_STATUS_LICENSE_ERROR:
      return "the functionality requested requires some license";
  }
  return "unknown error";
}

// ---- GEMM extensions -------------------------------------------------------
inline cublasStatus_t cublasGemmEx_64(cublasHandle_t handle, cublasOperation_t transa,
                                      cublasOperation_t transb, int64_t m, int64_t n, int64_t k,
                                      const void* alpha, const void* A, cudaDataType Atype, int64_t lda,
                                      const void* B, cudaDataType Btype, int64_t ldb, const void* beta,
                                      void* C, cudaDataType Ctype, int64_t ldc,
                                      cublasComputeType_t computeType, cublasGemmAlgo_t algo) {
  return moe::cublas_emulation::UniformBatch(handle, transa, transb, m, n, k, alpha, Atype, lda, Btype, ldb,
                                             beta, Ctype, ldc, 1, true, computeType, algo, "cublasGemmEx",
                                             [=](int64_t, const void** a, const void** b, void** c) {
                                               *a = A;
                                               *b = B;
                                               *c = C;
                                             });
}

inline cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                                   int m, int n, int k, const void* alpha, const void* A, cudaDataType Atype,
                                   int lda, const void* B, cudaDataType Btype, int ldb, const void* beta,
                                   void* C, cudaDataType Ctype, int ldc, cublasComputeType_t computeType,
                                   cublasGemmAlgo_t algo) {
  return cublasGemmEx_64(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype,
                         ldc, computeType, algo);
}

inline cublasStatus_t cublasGemmBatchedEx_64(cublasHandle_t handle, cublasOperation_t transa,
                                             cublasOperation_t transb, int64_t m, int64_t n, int64_t k,
                                             const void* alpha, const void* const Aarray[],
                                             cudaDataType Atype, int64_t lda, const void* const Barray[],
                                             cudaDataType Btype, int64_t ldb, const void* beta,
                                             void* const Carray[], cudaDataType Ctype, int64_t ldc,
                                             int64_t batchCount, cublasComputeType_t computeType,
                                             cublasGemmAlgo_t algo) {
  const bool arrays = Aarray != nullptr && Barray != nullptr && Carray != nullptr;
  return moe::cublas_emulation::UniformBatch(
      handle, transa, transb, m, n, k, alpha, Atype, lda, Btype, ldb, beta, Ctype, ldc, batchCount, arrays,
      computeType, algo, "cublasGemmBatchedEx", [=](int64_t i, const void** a, const void** b, void** c) {
        *a = Aarray[i];
        *b = Barray[i];
        *c = Carray[i];
      });
}

inline cublasStatus_t cublasGemmBatchedEx(cublasHandle_t handle, cublasOperation_t transa,
                                          cublasOperation_t transb, int m, int n, int k, const void* alpha,
                                          const void* const Aarray[], cudaDataType Atype, int lda,
                                          const void* const Barray[], cudaDataType Btype, int ldb,
                                          const void* beta, void* const Carray[], cudaDataType Ctype, int ldc,
                                          int batchCount, cublasComputeType_t computeType,
                                          cublasGemmAlgo_t algo) {
  return cublasGemmBatchedEx_64(handle, transa, transb, m, n, k, alpha, Aarray, Atype, lda, Barray, Btype,
                                ldb, beta, Carray, Ctype, ldc, batchCount, computeType, algo);
}

// strideA/B/C: the offset, in elements, from one problem's matrix to the next.
inline cublasStatus_t cublasGemmStridedBatchedEx_64(cublasHandle_t handle, cublasOperation_t transa,
                                                    cublasOperation_t transb, int64_t m, int64_t n, int64_t k,
                                                    const void* alpha, const void* A, cudaDataType Atype,
                                                    int64_t lda, long long int strideA, const void* B,
                                                    cudaDataType Btype, int64_t ldb, long long int strideB,
                                                    const void* beta, void* C, cudaDataType Ctype,
                                                    int64_t ldc, long long int strideC, int64_t batchCount,
                                                    cublasComputeType_t computeType, cublasGemmAlgo_t algo) {
  using moe::cublas_emulation::Offset;
  return moe::cublas_emulation::UniformBatch(handle, transa, transb, m, n, k, alpha, Atype, lda, Btype, ldb,
                                             beta, Ctype, ldc, batchCount, true, computeType, algo,
                                             "cublasGemmStridedBatchedEx",
                                             [=](int64_t i, const void** a, const void** b, void** c) {
                                               *a = Offset(A, Atype, i * strideA);
                                               *b = Offset(B, Btype, i * strideB);
                                               *c = Offset(C, Ctype, i * strideC);
                                             });
}

inline cublasStatus_t cublasGemmStridedBatchedEx(
    cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k,
    const void* alpha, const void* A, cudaDataType Atype, int lda, long long int strideA, const void* B,
    cudaDataType Btype, int ldb, long long int strideB, const void* beta, void* C, cudaDataType Ctype,
    int ldc, long long int strideC, int batchCount, cublasComputeType_t computeType, cublasGemmAlgo_t algo) {
  return cublasGemmStridedBatchedEx_64(handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B,
                                       Btype, ldb, strideB, beta, C, Ctype, ldc, strideC, batchCount,
                                       computeType, algo);
}

// Grouped: group i has group_size[i] problems, all with transa_array[i],
// transb_array[i], m_array[i], n_array[i], k_array[i], lda_array[i],
// ldb_array[i], ldc_array[i] and the float scalars alpha_array[i],
// beta_array[i] (host arrays of group_count entries); Aarray, Barray and
// Carray hold the problems' matrices group after group.
inline cublasStatus_t cublasGemmGroupedBatchedEx(
    cublasHandle_t handle, const cublasOperation_t transa_array[], const cublasOperation_t transb_array[],
    const int m_array[], const int n_array[], const int k_array[], const void* alpha_array,
    const void* const Aarray[], cudaDataType_t Atype, const int lda_array[], const void* const Barray[],
    cudaDataType_t Btype, const int ldb_array[], const void* beta_array, void* const Carray[],
    cudaDataType_t Ctype, const int ldc_array[], int group_count, const int group_size[],
    cublasComputeType_t computeType) {
  return moe::cublas_emulation::Grouped<int>(
      handle, transa_array, transb_array, m_array, n_array, k_array, alpha_array, Aarray, Atype, lda_array,
      Barray, Btype, ldb_array, beta_array, Carray, Ctype, ldc_array, group_count, group_size, computeType);
}

inline cublasStatus_t cublasGemmGroupedBatchedEx_64(
    cublasHandle_t handle, const cublasOperation_t transa_array[], const cublasOperation_t transb_array[],
    const int64_t m_array[], const int64_t n_array[], const int64_t k_array[], const void* alpha_array,
    const void* const Aarray[], cudaDataType_t Atype, const int64_t lda_array[], const void* const Barray[],
    cudaDataType_t Btype, const int64_t ldb_array[], const void* beta_array, void* const Carray[],
    cudaDataType_t Ctype, const int64_t ldc_array[], int64_t group_count, const int64_t group_size[],
    cublasComputeType_t computeType) {
  return moe::cublas_emulation::Grouped<int64_t>(
      handle, transa_array, transb_array, m_array, n_array, k_array, alpha_array, Aarray, Atype, lda_array,
      Barray, Btype, ldb_array, beta_array, Carray, Ctype, ldc_array, group_count, group_size, computeType);
}

// ---- the C++ overloads of cublas_api.h for old code passing a cudaDataType as
// the compute type: it becomes the matching cublasComputeType_t (_PEDANTIC when
// the handle's math mode is CUBLAS_PEDANTIC_MATH).
inline cublasStatus_t cublasMigrateComputeType(cublasHandle_t handle, cudaDataType_t dataType,
                                               cublasComputeType_t* computeType) {
  cublasMath_t mode = CUBLAS_DEFAULT_MATH;
  if (cublasStatus_t s = cublasGetMathMode(handle, &mode); s != CUBLAS_STATUS_SUCCESS) return s;
  const bool pedantic = (static_cast<int>(mode) & 0xf) == CUBLAS_PEDANTIC_MATH;
  switch (dataType) {
    case CUDA_R_32F:
    case CUDA_C_32F:
      *computeType = pedantic ? CUBLAS_COMPUTE_32F_PEDANTIC : CUBLAS_COMPUTE_32F;
      return CUBLAS_STATUS_SUCCESS;
    case CUDA_R_64F:
    case CUDA_C_64F:
      *computeType = pedantic ? CUBLAS_COMPUTE_64F_PEDANTIC : CUBLAS_COMPUTE_64F;
      return CUBLAS_STATUS_SUCCESS;
    case CUDA_R_16F:
      *computeType = pedantic ? CUBLAS_COMPUTE_16F_PEDANTIC : CUBLAS_COMPUTE_16F;
      return CUBLAS_STATUS_SUCCESS;
    case CUDA_R_32I:
      *computeType = pedantic ? CUBLAS_COMPUTE_32I_PEDANTIC : CUBLAS_COMPUTE_32I;
      return CUBLAS_STATUS_SUCCESS;
    default:
      return CUBLAS_STATUS_NOT_SUPPORTED;
  }
}

inline cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                                   int m, int n, int k, const void* alpha, const void* A, cudaDataType Atype,
                                   int lda, const void* B, cudaDataType Btype, int ldb, const void* beta,
                                   void* C, cudaDataType Ctype, int ldc, cudaDataType computeType,
                                   cublasGemmAlgo_t algo) {
  cublasComputeType_t migrated = CUBLAS_COMPUTE_32F;
  if (cublasStatus_t s = cublasMigrateComputeType(handle, computeType, &migrated); s != CUBLAS_STATUS_SUCCESS)
    return s;
  return cublasGemmEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype,
                      ldc, migrated, algo);
}

inline cublasStatus_t cublasGemmBatchedEx(cublasHandle_t handle, cublasOperation_t transa,
                                          cublasOperation_t transb, int m, int n, int k, const void* alpha,
                                          const void* const Aarray[], cudaDataType Atype, int lda,
                                          const void* const Barray[], cudaDataType Btype, int ldb,
                                          const void* beta, void* const Carray[], cudaDataType Ctype, int ldc,
                                          int batchCount, cudaDataType computeType, cublasGemmAlgo_t algo) {
  cublasComputeType_t migrated = CUBLAS_COMPUTE_32F;
  if (cublasStatus_t s = cublasMigrateComputeType(handle, computeType, &migrated); s != CUBLAS_STATUS_SUCCESS)
    return s;
  return cublasGemmBatchedEx(handle, transa, transb, m, n, k, alpha, Aarray, Atype, lda, Barray, Btype, ldb,
                             beta, Carray, Ctype, ldc, batchCount, migrated, algo);
}

inline cublasStatus_t cublasGemmStridedBatchedEx(
    cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k,
    const void* alpha, const void* A, cudaDataType Atype, int lda, long long int strideA, const void* B,
    cudaDataType Btype, int ldb, long long int strideB, const void* beta, void* C, cudaDataType Ctype,
    int ldc, long long int strideC, int batchCount, cudaDataType computeType, cublasGemmAlgo_t algo) {
  cublasComputeType_t migrated = CUBLAS_COMPUTE_32F;
  if (cublasStatus_t s = cublasMigrateComputeType(handle, computeType, &migrated); s != CUBLAS_STATUS_SUCCESS)
    return s;
  return cublasGemmStridedBatchedEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B, Btype,
                                    ldb, strideB, beta, C, Ctype, ldc, strideC, batchCount, migrated, algo);
}

#endif  // MOE_TESTS_CORE_CUBLAS_EMULATION_H_
