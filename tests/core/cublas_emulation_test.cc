// tests/core/cublas_emulation.h against hand-worked column-major examples: every
// expected value below is worked out in the comments from the documented
// definition (C = alpha * op(A) op(B) + beta * C, column-major, element (r, c)
// of a matrix with leading dimension ld at index r + c * ld), not by a second
// implementation of the same loop.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#define MOE_CUDA_EMULATION 1
#include "tests/core/cuda_emulation.h"

// A stream of this test's own, to check stream order: work submitted on a
// non-null stream waits until the test drains the queue (the null stream runs
// it at once).
#include <functional>
namespace moe::test_stream {
inline std::vector<std::function<void()>>& Queue() {
  static std::vector<std::function<void()>> queue;
  return queue;
}
inline void Submit(cudaStream_t stream, std::function<void()> fn) {
  if (stream == nullptr)
    fn();
  else
    Queue().push_back(std::move(fn));
}
inline void Drain() {
  std::vector<std::function<void()>> queue;
  queue.swap(Queue());
  for (auto& fn : queue) fn();
}
}  // namespace moe::test_stream
#define MOE_CUBLAS_EMULATION_SUBMIT(stream, fn) ::moe::test_stream::Submit(stream, fn)
#include "tests/core/cublas_emulation.h"

namespace moe {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// What padding (the rows between m and the leading dimension) holds. A read of
// it would poison a result with NaN; a write to it changes it.
constexpr float kPad = kNaN;
constexpr float kCPad = -777.0f;

using F32s = std::vector<float>;
using Bf16s = std::vector<uint16_t>;

Bf16s ToBf16(const F32s& v) {
  Bf16s r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = kmath::F32ToBF16(v[i]);
  return r;
}

struct Handle {
  cublasHandle_t h = nullptr;
  Handle() { REQUIRE(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS); }
  ~Handle() { cublasDestroy(h); }
};

// The worked 2x3 times 3x2 product used by several cases:
//   op(A) = | 1 2 3 |    op(B) = |  7  8 |
//           | 4 5 6 |            |  9 10 |
//                                | 11 12 |
//   op(A) op(B) = | 1*7 + 2*9 + 3*11   1*8 + 2*10 + 3*12 |   | 58  64 |
//                 | 4*7 + 5*9 + 6*11   4*8 + 5*10 + 6*12 | = | 139 154 |
// m = 2, n = 2, k = 3. Storage, column by column, with padding rows:
//   transa = N: A is the 2x3 op(A), lda = 4: (1 4 . .) (2 5 . .) (3 6 . .)
//   transa = T: A is the 3x2 op(A)^T = |1 4; 2 5; 3 6|, lda = 5:
//               (1 2 3 . .) (4 5 6 . .)
//   transb = N: B is the 3x2 op(B), ldb = 4: (7 9 11 .) (8 10 12 .)
//   transb = T: B is the 2x3 op(B)^T = |7 9 11; 8 10 12|, ldb = 3:
//               (7 8 .) (9 10 .) (11 12 .)
//   C: 2x2, ldc = 3: (c00 c10 .) (c01 c11 .)
const F32s kAN = {1, 4, kPad, kPad, 2, 5, kPad, kPad, 3, 6, kPad, kPad};
const F32s kAT = {1, 2, 3, kPad, kPad, 4, 5, 6, kPad, kPad};
const F32s kBN = {7, 9, 11, kPad, 8, 10, 12, kPad};
const F32s kBT = {7, 8, kPad, 9, 10, kPad, 11, 12, kPad};

TEST_CASE("cublas emulation: handle, stream, math mode, status names") {
  cublasHandle_t h = nullptr;
  REQUIRE(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(h != nullptr);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(0x1234);
  cudaStream_t got = nullptr;
  REQUIRE(cublasGetStream(h, &got) == CUBLAS_STATUS_SUCCESS);
  CHECK(got == nullptr);  // the default stream until one is set
  REQUIRE(cublasSetStream(h, s) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasGetStream(h, &got) == CUBLAS_STATUS_SUCCESS);
  CHECK(got == s);
  cublasMath_t mode = CUBLAS_PEDANTIC_MATH;
  REQUIRE(cublasGetMathMode(h, &mode) == CUBLAS_STATUS_SUCCESS);
  CHECK(mode == CUBLAS_DEFAULT_MATH);
  REQUIRE(cublasSetMathMode(h, CUBLAS_TF32_TENSOR_OP_MATH) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasGetMathMode(h, &mode) == CUBLAS_STATUS_SUCCESS);
  CHECK(mode == CUBLAS_TF32_TENSOR_OP_MATH);
  const auto flagged =
      static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION);
  CHECK(cublasSetMathMode(h, flagged) == CUBLAS_STATUS_SUCCESS);
  CHECK(cublasSetMathMode(h, static_cast<cublasMath_t>(5)) == CUBLAS_STATUS_INVALID_VALUE);
  REQUIRE(cublasDestroy(h) == CUBLAS_STATUS_SUCCESS);
  // A destroyed or null handle.
  CHECK(cublasSetStream(h, s) == CUBLAS_STATUS_NOT_INITIALIZED);
  CHECK(cublasDestroy(h) == CUBLAS_STATUS_NOT_INITIALIZED);
  CHECK(cublasSetMathMode(nullptr, CUBLAS_DEFAULT_MATH) == CUBLAS_STATUS_NOT_INITIALIZED);
  CHECK(cublasCreate(nullptr) == CUBLAS_STATUS_INVALID_VALUE);

  CHECK(std::string(cublasGetStatusName(CUBLAS_STATUS_INVALID_VALUE)) == "CUBLAS_STATUS_INVALID_VALUE");
  CHECK(std::string(cublasGetStatusName(CUBLAS_STATUS_NOT_SUPPORTED)) == "CUBLAS_STATUS_NOT_SUPPORTED");
  CHECK(std::string(cublasGetStatusString(CUBLAS_STATUS_SUCCESS)) == "success");
  // The numeric values of cublas_api.h / library_types.h.
  CHECK(CUBLAS_STATUS_NOT_SUPPORTED == 15);
  CHECK(CUBLAS_STATUS_INVALID_VALUE == 7);
  CHECK(CUDA_R_16BF == 14);
  CHECK(CUDA_R_16F == 2);
  CHECK(CUBLAS_COMPUTE_32F == 68);
  CHECK(CUBLAS_COMPUTE_32F_FAST_TF32 == 77);
  CHECK(CUBLAS_GEMM_DEFAULT_TENSOR_OP == 99);
}

TEST_CASE(
    "cublas emulation: GemmEx 2x3 times 3x2, all four transpose combinations, padded leading dimensions") {
  Handle h;
  struct Case {
    cublasOperation_t ta, tb;
    const F32s* a;
    int lda;
    const F32s* b;
    int ldb;
  };
  const Case cases[] = {
      {CUBLAS_OP_N, CUBLAS_OP_N, &kAN, 4, &kBN, 4}, {CUBLAS_OP_T, CUBLAS_OP_N, &kAT, 5, &kBN, 4},
      {CUBLAS_OP_N, CUBLAS_OP_T, &kAN, 4, &kBT, 3}, {CUBLAS_OP_T, CUBLAS_OP_T, &kAT, 5, &kBT, 3},
      {CUBLAS_OP_C, CUBLAS_OP_C, &kAT, 5, &kBT, 3},  // C is T for real types
  };
  for (const Case& c : cases) {
    CAPTURE(c.ta, c.tb);
    F32s C = {kNaN, kNaN, kCPad, kNaN, kNaN, kCPad};
    const float alpha = 1.0f, beta = 0.0f;
    REQUIRE(cublasGemmEx(h.h, c.ta, c.tb, 2, 2, 3, &alpha, c.a->data(), CUDA_R_32F, c.lda, c.b->data(),
                         CUDA_R_32F, c.ldb, &beta, C.data(), CUDA_R_32F, 3, CUBLAS_COMPUTE_32F,
                         CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
    // | 58 64; 139 154 | column-major with ldc = 3; the padding row untouched,
    // and the NaNs C held before did not propagate (beta == 0).
    CHECK(C[0] == 58.0f);
    CHECK(C[1] == 139.0f);
    CHECK(C[2] == kCPad);
    CHECK(C[3] == 64.0f);
    CHECK(C[4] == 154.0f);
    CHECK(C[5] == kCPad);
  }
}

TEST_CASE("cublas emulation: GemmEx alpha and beta accumulate") {
  Handle h;
  // C before = | 1 2; 3 4 |, alpha = 2, beta = -1:
  //   2*58 - 1 = 115, 2*64 - 2 = 126, 2*139 - 3 = 275, 2*154 - 4 = 304.
  F32s C = {1, 3, kCPad, 2, 4, kCPad};
  const float alpha = 2.0f, beta = -1.0f;
  REQUIRE(cublasGemmEx(h.h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 3, &alpha, kAN.data(), CUDA_R_32F, 4, kBN.data(),
                       CUDA_R_32F, 4, &beta, C.data(), CUDA_R_32F, 3, CUBLAS_COMPUTE_32F,
                       CUBLAS_GEMM_DEFAULT_TENSOR_OP) == CUBLAS_STATUS_SUCCESS);
  CHECK(C == F32s{115, 275, kCPad, 126, 304, kCPad});

  // k == 0: C = beta * C (alpha * op(A) op(B) is empty), A and B not read.
  const float half = 0.5f;
  REQUIRE(cublasGemmEx(h.h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 0, &alpha, nullptr, CUDA_R_32F, 2, nullptr,
                       CUDA_R_32F, 1, &half, C.data(), CUDA_R_32F, 3, CUBLAS_COMPUTE_32F,
                       CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
  CHECK(C == F32s{57.5f, 137.5f, kCPad, 63, 152, kCPad});
  // k == 0 and beta == 0: C = 0 even where it held NaN.
  F32s D = {kNaN, kNaN, kNaN, kNaN};
  const float zero = 0.0f;
  REQUIRE(cublasGemmEx(h.h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 0, &alpha, nullptr, CUDA_R_32F, 2, nullptr,
                       CUDA_R_32F, 1, &zero, D.data(), CUDA_R_32F, 2, CUBLAS_COMPUTE_32F,
                       CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
  CHECK(D == F32s{0, 0, 0, 0});
  // m == 0 or n == 0: nothing is read or written.
  F32s E = {kCPad, kCPad};
  CHECK(cublasGemmEx(h.h, CUBLAS_OP_N, CUBLAS_OP_N, 0, 2, 3, &alpha, nullptr, CUDA_R_32F, 1, kBN.data(),
                     CUDA_R_32F, 4, &beta, E.data(), CUDA_R_32F, 1, CUBLAS_COMPUTE_32F,
                     CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
  CHECK(cublasGemmEx(h.h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 0, 3, &alpha, kAN.data(), CUDA_R_32F, 4, nullptr,
                     CUDA_R_32F, 4, &beta, E.data(), CUDA_R_32F, 2, CUBLAS_COMPUTE_32F,
                     CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
  CHECK(E == F32s{kCPad, kCPad});
}

TEST_CASE("cublas emulation: GemmEx bf16 inputs, f32 accumulation, bf16 output rounded once") {
  Handle h;
  const float alpha = 1.0f, beta = 0.0f;
  // op(A) = | 1 1 1 |, three rows of op(B) columns (k = 3, n = 3, m = 1):
  //   op(B) = | 256 258 256 |
  //           |   1   1   0 |
  //           |   0   0   1 |
  // Products, each exact in f32: 257, 259, 257.
  // bf16 has 8 significant bits: in [256, 512) its spacing is 2, so
  //   257 is halfway between 256 (even mantissa) and 258 -> 256,
  //   259 is halfway between 258 and 260 (even mantissa) -> 260.
  const Bf16s a = ToBf16({1, 1, 1});                          // 1x3, lda = 1
  const Bf16s b = ToBf16({256, 1, 0, 258, 1, 0, 256, 0, 1});  // 3x3, ldb = 3
  F32s c32(3, kNaN);
  REQUIRE(cublasGemmEx(h.h, CUBLAS_OP_N, CUBLAS_OP_N, 1, 3, 3, &alpha, a.data(), CUDA_R_16BF, 1, b.data(),
                       CUDA_R_16BF, 3, &beta, c32.data(), CUDA_R_32F, 1, CUBLAS_COMPUTE_32F,
                       CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
  CHECK(c32 == F32s{257, 259, 257});
  Bf16s c16(3, kmath::F32ToBF16(kNaN));
  REQUIRE(cublasGemmEx(h.h, CUBLAS_OP_N, CUBLAS_OP_N, 1, 3, 3, &alpha, a.data(), CUDA_R_16BF, 1, b.data(),
                       CUDA_R_16BF, 3, &beta, c16.data(), CUDA_R_16BF, 1, CUBLAS_COMPUTE_32F,
                       CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
  CHECK(kmath::BF16ToF32(c16[0]) == 256.0f);
  CHECK(kmath::BF16ToF32(c16[1]) == 260.0f);
  CHECK(kmath::BF16ToF32(c16[2]) == 256.0f);

  // Accumulation is f32 and the rounding happens once, at the store:
  // 256 + 1 + 1 = 258 exactly (a bf16 running sum would stick at 256 + 1 -> 256,
  // 256 + 1 -> 256). op(A) = | 256 1 1 |, op(B) = (1 1 1)^T.
  const Bf16s a2 = ToBf16({256, 1, 1});
  const Bf16s ones = ToBf16({1, 1, 1});
  Bf16s c2(1, 0);
  REQUIRE(cublasGemmEx(h.h, CUBLAS_OP_N, CUBLAS_OP_N, 1, 1, 3, &alpha, a2.data(), CUDA_R_16BF, 1, ones.data(),
                       CUDA_R_16BF, 3, &beta, c2.data(), CUDA_R_16BF, 1, CUBLAS_COMPUTE_32F_PEDANTIC,
                       CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
  CHECK(kmath::BF16ToF32(c2[0]) == 258.0f);

  // bf16 C with beta: 1 * 4 + 1 * bf16(3) = 7, exact.
  Bf16s c3 = ToBf16({3});
  const Bf16s four = ToBf16({4});
  const Bf16s one = ToBf16({1});
  const float beta1 = 1.0f;
  REQUIRE(cublasGemmEx(h.h, CUBLAS_OP_N, CUBLAS_OP_N, 1, 1, 1, &alpha, four.data(), CUDA_R_16BF, 1,
                       one.data(), CUDA_R_16BF, 1, &beta1, c3.data(), CUDA_R_16BF, 1, CUBLAS_COMPUTE_32F,
                       CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
  CHECK(kmath::BF16ToF32(c3[0]) == 7.0f);
}

TEST_CASE("cublas emulation: FAST_TF32 and FAST_16BF round the f32 inputs") {
  Handle h;
  const float alpha = 1.0f, beta = 0.0f;
  // TF32 keeps 10 explicit mantissa bits: near 1 its spacing is 2^-10.
  const float u = std::ldexp(1.0f, -11);  // half a TF32 ulp at 1
  //   1 + 2^-11            halfway between 1 (even) and 1 + 2^-10      -> 1
  //   1 + 3 * 2^-11        halfway between 1 + 2^-10 (odd) and 1 + 2^-9 -> 1 + 2^-9
  //   1 + 2^-11 + 2^-20    above halfway                                -> 1 + 2^-10
  // op(A) = that 3x1 column, op(B) = | 1 | (m = 3, n = 1, k = 1).
  const F32s a = {1 + u, 1 + 3 * u, 1 + u + std::ldexp(1.0f, -20)};
  const F32s b = {1};
  F32s c(3, kNaN);
  REQUIRE(cublasGemmEx(h.h, CUBLAS_OP_N, CUBLAS_OP_N, 3, 1, 1, &alpha, a.data(), CUDA_R_32F, 3, b.data(),
                       CUDA_R_32F, 1, &beta, c.data(), CUDA_R_32F, 3, CUBLAS_COMPUTE_32F_FAST_TF32,
                       CUBLAS_GEMM_DEFAULT_TENSOR_OP) == CUBLAS_STATUS_SUCCESS);
  CHECK(c == F32s{1.0f, 1.0f + 4 * u, 1.0f + 2 * u});
  // The same with CUBLAS_COMPUTE_32F is exact, whatever the math mode says.
  REQUIRE(cublasSetMathMode(h.h, CUBLAS_TF32_TENSOR_OP_MATH) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasGemmEx(h.h, CUBLAS_OP_N, CUBLAS_OP_N, 3, 1, 1, &alpha, a.data(), CUDA_R_32F, 3, b.data(),
                       CUDA_R_32F, 1, &beta, c.data(), CUDA_R_32F, 3, CUBLAS_COMPUTE_32F,
                       CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
  CHECK(c == a);
  // B is rounded too: op(A) = | 1 |, op(B) = | 1 + 2^-11 + 2^-20 | -> 1 + 2^-10.
  const F32s one = {1};
  const F32s bb = {1 + u + std::ldexp(1.0f, -20)};
  F32s c1(1, kNaN);
  REQUIRE(cublasGemmEx(h.h, CUBLAS_OP_N, CUBLAS_OP_N, 1, 1, 1, &alpha, one.data(), CUDA_R_32F, 1, bb.data(),
                       CUDA_R_32F, 1, &beta, c1.data(), CUDA_R_32F, 1, CUBLAS_COMPUTE_32F_FAST_TF32,
                       CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
  CHECK(c1[0] == 1.0f + 2 * u);
  // FAST_16BF: bf16 spacing in [256, 512) is 2; inputs 257 -> 256, 259 -> 260.
  const F32s a16 = {257, 259};
  F32s c16(2, kNaN);
  REQUIRE(cublasGemmEx(h.h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 1, 1, &alpha, a16.data(), CUDA_R_32F, 2, one.data(),
                       CUDA_R_32F, 1, &beta, c16.data(), CUDA_R_32F, 2, CUBLAS_COMPUTE_32F_FAST_16BF,
                       CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
  CHECK(c16 == F32s{256, 260});
}

TEST_CASE("cublas emulation: GemmStridedBatchedEx") {
  Handle h;
  // Three problems, m = 2, n = 1, k = 2, transa = transb = N:
  //   A0 = | 1 2; 3 4 |,  B0 = (5 6)^T  -> C0 = (1*5 + 2*6, 3*5 + 4*6) = (17, 39)
  //   A1 = | 0 1; 1 0 |,  B1 = (7 8)^T  -> C1 = (8, 7)
  //   A2 = | 2 0; 0 -1|,  B2 = (3 4)^T  -> C2 = (6, -4)
  // lda = 2 and strideA = 5 (one padding element between matrices);
  // ldb = 2, strideB = 3; ldc = 2, strideC = 4 (two padding elements).
  const F32s A = {1, 3, 2, 4, kPad, 0, 1, 1, 0, kPad, 2, 0, 0, -1};
  const F32s B = {5, 6, kPad, 7, 8, kPad, 3, 4};
  F32s C = {kNaN, kNaN, kCPad, kCPad, kNaN, kNaN, kCPad, kCPad, kNaN, kNaN};
  const float alpha = 1.0f, beta = 0.0f;
  REQUIRE(cublasGemmStridedBatchedEx(h.h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 1, 2, &alpha, A.data(), CUDA_R_32F, 2,
                                     5, B.data(), CUDA_R_32F, 2, 3, &beta, C.data(), CUDA_R_32F, 2, 4, 3,
                                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
  CHECK(C == F32s{17, 39, kCPad, kCPad, 8, 7, kCPad, kCPad, 6, -4});
  // batchCount == 0: nothing happens.
  CHECK(cublasGemmStridedBatchedEx(h.h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 1, 2, &alpha, nullptr, CUDA_R_32F, 2, 5,
                                   nullptr, CUDA_R_32F, 2, 3, &beta, nullptr, CUDA_R_32F, 2, 4, 0,
                                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
}

TEST_CASE("cublas emulation: GemmBatchedEx reads the pointer arrays") {
  Handle h;
  // m = 1, n = 2, k = 2, transa = T (A stored k x m = 2x1, lda = 2),
  // transb = N (B stored 2x2, ldb = 2), bf16 inputs, f32 output, ldc = 1.
  //   Problem 0: op(A) = | 1 2 |, op(B) = | 3 4; 5 6 | -> (1*3 + 2*5, 1*4 + 2*6) = (13, 16)
  //   Problem 1: the same A, op(B) = | 1 0; 0 1 |      -> (1, 2)
  // The pointer arrays list problem 1's C before problem 0's in memory.
  const Bf16s a = ToBf16({1, 2});
  const Bf16s b0 = ToBf16({3, 5, 4, 6});
  const Bf16s b1 = ToBf16({1, 0, 0, 1});
  F32s c(4, kNaN);  // problem 1's C at c[0..1], problem 0's at c[2..3]
  const void* As[] = {a.data(), a.data()};
  const void* Bs[] = {b0.data(), b1.data()};
  void* Cs[] = {c.data() + 2, c.data()};
  const float alpha = 1.0f, beta = 0.0f;
  REQUIRE(cublasGemmBatchedEx(h.h, CUBLAS_OP_T, CUBLAS_OP_N, 1, 2, 2, &alpha, As, CUDA_R_16BF, 2, Bs,
                              CUDA_R_16BF, 2, &beta, Cs, CUDA_R_32F, 1, 2, CUBLAS_COMPUTE_32F,
                              CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
  CHECK(c == F32s{1, 2, 13, 16});
}

TEST_CASE("cublas emulation: GemmGroupedBatchedEx, two groups of different shapes and sizes") {
  Handle h;
  // Group 0: 2 problems, transa = N, transb = N, m = 2, n = 2, k = 1,
  // lda = 2, ldb = 1, ldc = 3, alpha = 1, beta = 0: the outer product
  // op(A) op(B) = (a0 a1)^T (b0 b1) = | a0*b0 a0*b1; a1*b0 a1*b1 |.
  //   Problem 0: a = (1 2), b = (3 4)     -> | 3 4; 6 8 |     = (3 6 .) (4 8 .)
  //   Problem 1: a = (-1 5), b = (2 0.5)  -> | -2 -0.5; 10 2.5 | = (-2 10 .) (-0.5 2.5 .)
  // Group 1: 1 problem, transa = T, transb = N, m = 1, n = 1, k = 3,
  // lda = 3 (A stored 3x1), ldb = 3, ldc = 1, alpha = 2, beta = 1:
  //   op(A) = | 1 2 3 |, op(B) = (4 5 6)^T, C = 10
  //   -> 2 * (4 + 10 + 18) + 1 * 10 = 74.
  // The pointer arrays hold group 0's two problems, then group 1's.
  const F32s a00 = {1, 2}, b00 = {3, 4};
  const F32s a01 = {-1, 5}, b01 = {2, 0.5f};
  const F32s a10 = {1, 2, 3}, b10 = {4, 5, 6};
  F32s c00(5, kNaN), c01(5, kNaN), c10 = {10};
  c00[2] = c01[2] = kCPad;
  const void* As[] = {a00.data(), a01.data(), a10.data()};
  const void* Bs[] = {b00.data(), b01.data(), b10.data()};
  void* Cs[] = {c00.data(), c01.data(), c10.data()};
  const cublasOperation_t ta[] = {CUBLAS_OP_N, CUBLAS_OP_T};
  const cublasOperation_t tb[] = {CUBLAS_OP_N, CUBLAS_OP_N};
  const int m[] = {2, 1}, n[] = {2, 1}, k[] = {1, 3};
  const int lda[] = {2, 3}, ldb[] = {1, 3}, ldc[] = {3, 1};
  const float alpha[] = {1, 2}, beta[] = {0, 1};
  const int group_size[] = {2, 1};
  REQUIRE(cublasGemmGroupedBatchedEx(h.h, ta, tb, m, n, k, alpha, As, CUDA_R_32F, lda, Bs, CUDA_R_32F, ldb,
                                     beta, Cs, CUDA_R_32F, ldc, 2, group_size,
                                     CUBLAS_COMPUTE_32F) == CUBLAS_STATUS_SUCCESS);
  CHECK(c00 == F32s{3, 6, kCPad, 4, 8});
  CHECK(c01 == F32s{-2, 10, kCPad, -0.5f, 2.5f});
  CHECK(c10 == F32s{74});

  // The _64 entry point, and bf16 throughout (the only bf16 row of the
  // grouped table): group 1 again, C = bf16(10) -> 74 (exact in bf16).
  const Bf16s a10h = ToBf16(a10), b10h = ToBf16(b10);
  Bf16s c10h = ToBf16({10});
  const void* Ah[] = {a10h.data()};
  const void* Bh[] = {b10h.data()};
  void* Ch[] = {c10h.data()};
  const cublasOperation_t ta1[] = {CUBLAS_OP_T}, tb1[] = {CUBLAS_OP_N};
  const int64_t m1[] = {1}, n1[] = {1}, k1[] = {3}, lda1[] = {3}, ldb1[] = {3}, ldc1[] = {1}, size1[] = {1};
  const float alpha1[] = {2}, beta1[] = {1};
  REQUIRE(cublasGemmGroupedBatchedEx_64(h.h, ta1, tb1, m1, n1, k1, alpha1, Ah, CUDA_R_16BF, lda1, Bh,
                                        CUDA_R_16BF, ldb1, beta1, Ch, CUDA_R_16BF, ldc1, 1, size1,
                                        CUBLAS_COMPUTE_32F) == CUBLAS_STATUS_SUCCESS);
  CHECK(kmath::BF16ToF32(c10h[0]) == 74.0f);

  // A group of size 0 takes no pointers: groups {0, 1} use As[0] for group 1.
  const int size01[] = {0, 1};
  const cublasOperation_t taT[] = {CUBLAS_OP_N, CUBLAS_OP_T};
  const void* As1[] = {a10.data()};
  const void* Bs1[] = {b10.data()};
  F32s c(1, 10);
  void* Cs1[] = {c.data()};
  REQUIRE(cublasGemmGroupedBatchedEx(h.h, taT, tb, m, n, k, alpha, As1, CUDA_R_32F, lda, Bs1, CUDA_R_32F, ldb,
                                     beta, Cs1, CUDA_R_32F, ldc, 2, size01,
                                     CUBLAS_COMPUTE_32F) == CUBLAS_STATUS_SUCCESS);
  CHECK(c == F32s{74});

  // Grouped type table: Atype == Btype == Ctype, COMPUTE_32F (or FAST_TF32
  // for f32 only).
  const F32s one = {1};
  F32s c1 = {0};
  const void* A1[] = {one.data()};
  const void* B1[] = {one.data()};
  void* C1[] = {c1.data()};
  const int i1[] = {1};
  const float f1[] = {1}, f0[] = {0};
  const cublasOperation_t opn[] = {CUBLAS_OP_N};
  CHECK(cublasGemmGroupedBatchedEx(h.h, opn, opn, i1, i1, i1, f1, A1, CUDA_R_32F, i1, B1, CUDA_R_32F, i1, f0,
                                   C1, CUDA_R_32F, i1, 1, i1,
                                   CUBLAS_COMPUTE_32F_FAST_TF32) == CUBLAS_STATUS_SUCCESS);
  CHECK(c1 == F32s{1});
  const cublasComputeType_t unsupported_compute[] = {CUBLAS_COMPUTE_32F_PEDANTIC,
                                                     CUBLAS_COMPUTE_32F_FAST_16BF, CUBLAS_COMPUTE_64F};
  for (cublasComputeType_t ct : unsupported_compute) {
    CAPTURE(ct);
    CHECK(cublasGemmGroupedBatchedEx(h.h, opn, opn, i1, i1, i1, f1, A1, CUDA_R_32F, i1, B1, CUDA_R_32F, i1,
                                     f0, C1, CUDA_R_32F, i1, 1, i1, ct) == CUBLAS_STATUS_NOT_SUPPORTED);
  }
  // bf16 inputs into an f32 C: a GemmEx row, not a grouped one.
  CHECK(cublasGemmGroupedBatchedEx(h.h, opn, opn, i1, i1, i1, f1, A1, CUDA_R_16BF, i1, B1, CUDA_R_16BF, i1,
                                   f0, C1, CUDA_R_32F, i1, 1, i1,
                                   CUBLAS_COMPUTE_32F) == CUBLAS_STATUS_NOT_SUPPORTED);
  CHECK(cublasGemmGroupedBatchedEx(h.h, opn, opn, i1, i1, i1, f1, A1, CUDA_R_16BF, i1, B1, CUDA_R_16BF, i1,
                                   f0, C1, CUDA_R_16BF, i1, 1, i1,
                                   CUBLAS_COMPUTE_32F_FAST_TF32) == CUBLAS_STATUS_NOT_SUPPORTED);
  // Invalid values: group_count < 0, group_size[i] < 0, a group's m < 0 or
  // lda too small; nothing is written when any group is invalid.
  c1 = {5};
  CHECK(cublasGemmGroupedBatchedEx(h.h, opn, opn, i1, i1, i1, f1, A1, CUDA_R_32F, i1, B1, CUDA_R_32F, i1, f0,
                                   C1, CUDA_R_32F, i1, -1, i1,
                                   CUBLAS_COMPUTE_32F) == CUBLAS_STATUS_INVALID_VALUE);
  const int neg[] = {-1};
  CHECK(cublasGemmGroupedBatchedEx(h.h, opn, opn, i1, i1, i1, f1, A1, CUDA_R_32F, i1, B1, CUDA_R_32F, i1, f0,
                                   C1, CUDA_R_32F, i1, 1, neg,
                                   CUBLAS_COMPUTE_32F) == CUBLAS_STATUS_INVALID_VALUE);
  CHECK(cublasGemmGroupedBatchedEx(h.h, opn, opn, neg, i1, i1, f1, A1, CUDA_R_32F, i1, B1, CUDA_R_32F, i1, f0,
                                   C1, CUDA_R_32F, i1, 1, i1,
                                   CUBLAS_COMPUTE_32F) == CUBLAS_STATUS_INVALID_VALUE);
  // Two groups, the second with lda = 2 < m = 3: the first group is not run.
  const cublasOperation_t opnn[] = {CUBLAS_OP_N, CUBLAS_OP_N};
  const int m2[] = {1, 3}, one2[] = {1, 1}, lda2[] = {1, 2}, ldc2[] = {1, 3}, size2[] = {1, 0};
  const float f11[] = {1, 1}, f00[] = {0, 0};
  CHECK(cublasGemmGroupedBatchedEx(h.h, opnn, opnn, m2, one2, one2, f11, A1, CUDA_R_32F, lda2, B1, CUDA_R_32F,
                                   one2, f00, C1, CUDA_R_32F, ldc2, 2, size2,
                                   CUBLAS_COMPUTE_32F) == CUBLAS_STATUS_INVALID_VALUE);
  CHECK(c1 == F32s{5});
  // group_count == 0: nothing to do.
  CHECK(cublasGemmGroupedBatchedEx(h.h, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                   CUDA_R_32F, nullptr, nullptr, CUDA_R_32F, nullptr, nullptr, nullptr,
                                   CUDA_R_32F, nullptr, 0, nullptr,
                                   CUBLAS_COMPUTE_32F) == CUBLAS_STATUS_SUCCESS);
  CHECK(cublasGemmGroupedBatchedEx(nullptr, opn, opn, i1, i1, i1, f1, A1, CUDA_R_32F, i1, B1, CUDA_R_32F, i1,
                                   f0, C1, CUDA_R_32F, i1, 1, i1,
                                   CUBLAS_COMPUTE_32F) == CUBLAS_STATUS_NOT_INITIALIZED);
}

TEST_CASE("cublas emulation: INVALID_VALUE, NOT_SUPPORTED and NOT_INITIALIZED of the uniform calls") {
  Handle h;
  const float alpha = 1.0f, beta = 0.0f;
  F32s C(6, kCPad);
  const F32s before = C;
  auto gemm = [&](cublasHandle_t hh, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, int lda,
                  int ldb, int ldc, cudaDataType at = CUDA_R_32F, cudaDataType bt = CUDA_R_32F,
                  cudaDataType ct = CUDA_R_32F, cublasComputeType_t comp = CUBLAS_COMPUTE_32F) {
    // The data are f32; the calls that name other types are refused before any read.
    return cublasGemmEx(hh, ta, tb, m, n, k, &alpha, kAN.data(), at, lda, kBN.data(), bt, ldb, &beta,
                        C.data(), ct, ldc, comp, CUBLAS_GEMM_DEFAULT);
  };
  const auto N = CUBLAS_OP_N, T = CUBLAS_OP_T;
  // m, n, k < 0.
  CHECK(gemm(h.h, N, N, -1, 2, 3, 4, 4, 3) == CUBLAS_STATUS_INVALID_VALUE);
  CHECK(gemm(h.h, N, N, 2, -1, 3, 4, 4, 3) == CUBLAS_STATUS_INVALID_VALUE);
  CHECK(gemm(h.h, N, N, 2, 2, -1, 4, 4, 3) == CUBLAS_STATUS_INVALID_VALUE);
  // lda < max(1, m) with transa == N, lda < max(1, k) otherwise (m = 2, k = 3).
  CHECK(gemm(h.h, N, N, 2, 2, 3, 1, 4, 3) == CUBLAS_STATUS_INVALID_VALUE);
  CHECK(gemm(h.h, T, N, 2, 2, 3, 2, 4, 3) == CUBLAS_STATUS_INVALID_VALUE);  // 2 >= m but < k
  CHECK(gemm(h.h, N, N, 0, 2, 3, 0, 4, 3) == CUBLAS_STATUS_INVALID_VALUE);  // max(1, 0) = 1
  // ldb < max(1, k) with transb == N, ldb < max(1, n) otherwise (n = 2, k = 3).
  CHECK(gemm(h.h, N, N, 2, 2, 3, 4, 2, 3) == CUBLAS_STATUS_INVALID_VALUE);
  CHECK(gemm(h.h, N, T, 2, 2, 3, 4, 1, 3) == CUBLAS_STATUS_INVALID_VALUE);
  // ldc < max(1, m).
  CHECK(gemm(h.h, N, N, 2, 2, 3, 4, 4, 1) == CUBLAS_STATUS_INVALID_VALUE);
  // An operation that is not N, T or C.
  CHECK(gemm(h.h, CUBLAS_OP_CONJG, N, 2, 2, 3, 4, 4, 3) == CUBLAS_STATUS_INVALID_VALUE);
  // Null alpha or beta.
  CHECK(cublasGemmEx(h.h, N, N, 2, 2, 3, nullptr, kAN.data(), CUDA_R_32F, 4, kBN.data(), CUDA_R_32F, 4, &beta,
                     C.data(), CUDA_R_32F, 3, CUBLAS_COMPUTE_32F,
                     CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_INVALID_VALUE);
  // Type combinations outside the table (or not emulated).
  CHECK(gemm(h.h, N, N, 2, 2, 3, 4, 4, 3, CUDA_R_32F, CUDA_R_16BF, CUDA_R_32F) ==
        CUBLAS_STATUS_NOT_SUPPORTED);
  CHECK(gemm(h.h, N, N, 2, 2, 3, 4, 4, 3, CUDA_R_32F, CUDA_R_32F, CUDA_R_16BF) ==
        CUBLAS_STATUS_NOT_SUPPORTED);
  CHECK(gemm(h.h, N, N, 2, 2, 3, 4, 4, 3, CUDA_R_16BF, CUDA_R_16BF, CUDA_R_16F) ==
        CUBLAS_STATUS_NOT_SUPPORTED);
  CHECK(gemm(h.h, N, N, 2, 2, 3, 4, 4, 3, CUDA_R_16BF, CUDA_R_16BF, CUDA_R_16BF,
             CUBLAS_COMPUTE_32F_FAST_TF32) == CUBLAS_STATUS_NOT_SUPPORTED);
  CHECK(gemm(h.h, N, N, 2, 2, 3, 4, 4, 3, CUDA_R_32F, CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_64F) ==
        CUBLAS_STATUS_NOT_SUPPORTED);
  CHECK(gemm(h.h, N, N, 2, 2, 3, 4, 4, 3, CUDA_R_16F, CUDA_R_16F, CUDA_R_16F) == CUBLAS_STATUS_NOT_SUPPORTED);
  CHECK(cublasGemmEx(h.h, N, N, 2, 2, 3, &alpha, kAN.data(), CUDA_R_32F, 4, kBN.data(), CUDA_R_32F, 4, &beta,
                     C.data(), CUDA_R_32F, 3, CUBLAS_COMPUTE_32F,
                     static_cast<cublasGemmAlgo_t>(42)) == CUBLAS_STATUS_NOT_SUPPORTED);
  // No handle.
  CHECK(gemm(nullptr, N, N, 2, 2, 3, 4, 4, 3) == CUBLAS_STATUS_NOT_INITIALIZED);
  CHECK(C == before);  // none of the refused calls wrote

  // batchCount < 0.
  const void* As[] = {kAN.data()};
  const void* Bs[] = {kBN.data()};
  void* Cs[] = {C.data()};
  CHECK(cublasGemmBatchedEx(h.h, N, N, 2, 2, 3, &alpha, As, CUDA_R_32F, 4, Bs, CUDA_R_32F, 4, &beta, Cs,
                            CUDA_R_32F, 3, -1, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_INVALID_VALUE);
  CHECK(cublasGemmStridedBatchedEx(h.h, N, N, 2, 2, 3, &alpha, kAN.data(), CUDA_R_32F, 4, 0, kBN.data(),
                                   CUDA_R_32F, 4, 0, &beta, C.data(), CUDA_R_32F, 3, 0, -1,
                                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_INVALID_VALUE);
  CHECK(cublasGemmBatchedEx(h.h, N, N, 2, 2, 3, &alpha, As, CUDA_R_32F, 4, Bs, CUDA_R_32F, 4, &beta, Cs,
                            CUDA_R_16BF, 3, 1, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_NOT_SUPPORTED);
  CHECK(C == before);

  // The C++ overload for old code passing a cudaDataType compute type:
  // CUDA_R_32F becomes CUBLAS_COMPUTE_32F.
  F32s D(6, kNaN);
  REQUIRE(cublasGemmEx(h.h, N, N, 2, 2, 3, &alpha, kAN.data(), CUDA_R_32F, 4, kBN.data(), CUDA_R_32F, 4,
                       &beta, D.data(), CUDA_R_32F, 3, CUDA_R_32F,
                       CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
  CHECK(D[0] == 58.0f);
  CHECK(D[4] == 154.0f);
}

TEST_CASE(
    "cublas emulation: on a stream, arguments are read at the call, matrices and pointer arrays when it "
    "runs") {
  Handle h;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(0x10);
  REQUIRE(cublasSetStream(h.h, stream) == CUBLAS_STATUS_SUCCESS);
  // GemmBatchedEx, one problem: the 2x3 times 3x2 product (transa = transb = N).
  // The pointer arrays are filled, and B's data written, only after the call
  // (as a cudaMemcpyAsync queued before it would); alpha changes after the call.
  F32s B(kBN.size(), 0.0f);
  F32s C(6, kCPad);
  const void* As[] = {nullptr};
  const void* Bs[] = {nullptr};
  void* Cs[] = {nullptr};
  float alpha = 1.0f;
  const float beta = 0.0f;
  REQUIRE(cublasGemmBatchedEx(h.h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 3, &alpha, As, CUDA_R_32F, 4, Bs,
                              CUDA_R_32F, 4, &beta, Cs, CUDA_R_32F, 3, 1, CUBLAS_COMPUTE_32F,
                              CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
  CHECK(test_stream::Queue().size() == 1);
  CHECK(C == F32s(6, kCPad));  // nothing ran yet
  As[0] = kAN.data();
  Bs[0] = B.data();
  Cs[0] = C.data();
  B = kBN;
  alpha = 100.0f;
  test_stream::Drain();
  CHECK(C == F32s{58, 139, kCPad, 64, 154, kCPad});  // alpha = 1: the value at the call

  // GroupedBatchedEx: the per-group host arrays are read at the call.
  int m[] = {1}, n[] = {1}, k[] = {3}, lda[] = {3}, ldb[] = {3}, ldc[] = {1}, size[] = {1};
  float alphas[] = {2}, betas[] = {1};
  const cublasOperation_t ta[] = {CUBLAS_OP_T}, tb[] = {CUBLAS_OP_N};
  const F32s a = {1, 2, 3}, b = {4, 5, 6};
  F32s c = {10};
  const void* Ag[] = {a.data()};
  const void* Bg[] = {b.data()};
  void* Cg[] = {c.data()};
  REQUIRE(cublasGemmGroupedBatchedEx(h.h, ta, tb, m, n, k, alphas, Ag, CUDA_R_32F, lda, Bg, CUDA_R_32F, ldb,
                                     betas, Cg, CUDA_R_32F, ldc, 1, size,
                                     CUBLAS_COMPUTE_32F) == CUBLAS_STATUS_SUCCESS);
  k[0] = 1;
  alphas[0] = 0;
  size[0] = 0;
  CHECK(c == F32s{10});
  test_stream::Drain();
  CHECK(c == F32s{74});  // 2 * (1*4 + 2*5 + 3*6) + 10
}

}  // namespace
}  // namespace moe
