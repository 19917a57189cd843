// GEMMs on OpenBLAS. Transposes and heads-in-place layouts are expressed with
// cblas's trans flags and leading dimensions, never with copies.
#include <cblas.h>

#include <vector>

#include "runtime/core/cpu/cpu_kernels.h"

namespace moe::cpu {

void Sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
           int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0 || alpha == 0.0f) {
    for (int64_t i = 0; i < m; ++i) {
      float* row = c + i * ldc;
      for (int64_t j = 0; j < n; ++j) row[j] = beta == 0.0f ? 0.0f : beta * row[j];
    }
    return;
  }
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
              static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha, a,
              static_cast<int>(std::max<int64_t>(lda, 1)), b, static_cast<int>(std::max<int64_t>(ldb, 1)),
              beta, c, static_cast<int>(std::max<int64_t>(ldc, 1)));
}

absl::Status CpuKernels::Gemm(S& s, T a, bool trans_a, T b, bool trans_b, T c, float alpha, float beta) {
  return AsCpu(s).Run([=]() {
    int64_t k = trans_a ? LeadRows(a) : Cols(a);
    Sgemm(trans_a, trans_b, LeadRows(c), Cols(c), k, alpha, a.data<float>(), Cols(a), b.data<float>(),
          Cols(b), beta, c.data<float>(), Cols(c));
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::BatchedGemm(S& s, T a, bool trans_a, T b, bool trans_b, T c, float alpha,
                                     float beta) {
  return AsCpu(s).Run([=]() {
    int64_t ra = a.size(-2), ca = a.size(-1), rb = b.size(-2), cb = b.size(-1);
    int64_t m = c.size(-2), n = c.size(-1), k = trans_a ? ra : ca;
    int64_t batch = c.numel() == 0 ? 0 : (c.rank() == 4 ? c.size(0) * c.size(1) : c.size(0));
    int64_t batch_b = b.rank() == 4 ? b.size(0) * b.size(1) : b.size(0);
    int64_t ratio = batch_b == 0 ? 1 : batch / std::max<int64_t>(batch_b, 1);
    const float* pa = a.data<float>();
    const float* pb = b.data<float>();
    float* pc = c.data<float>();
    for (int64_t i = 0; i < batch; ++i)
      Sgemm(trans_a, trans_b, m, n, k, alpha, pa + i * ra * ca, ca, pb + (i / ratio) * rb * cb, cb, beta,
            pc + i * m * n, n);
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::GroupedGemm(S& s, T x, T w, bool trans_w, T y, absl::Span<const int64_t> offsets,
                                     float alpha, float beta) {
  std::vector<int64_t> off(offsets.begin(), offsets.end());
  return AsCpu(s).Run([=, off = std::move(off)]() {
    int64_t p = w.size(1), q = w.size(2);
    int64_t in = x.size(1), out = y.size(1);
    const float* px = x.data<float>();
    const float* pw = w.data<float>();
    float* py = y.data<float>();
    for (size_t e = 0; e + 1 < off.size(); ++e) {
      int64_t rows = off[e + 1] - off[e];
      if (rows == 0) continue;
      // trans_w: y_e = x_e W_e^T (W_e [P, Q] = [out, in]); else y_e = x_e W_e (W_e [P, Q] = [in, out]).
      Sgemm(false, trans_w, rows, out, in, alpha, px + off[e] * in, in, pw + e * p * q, q, beta,
            py + off[e] * out, out);
    }
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::GroupedGemmWeightGrad(S& s, T dy, T x, T dw, absl::Span<const int64_t> offsets,
                                               float alpha, float beta) {
  std::vector<int64_t> off(offsets.begin(), offsets.end());
  return AsCpu(s).Run([=, off = std::move(off)]() {
    int64_t p = dw.size(1), q = dw.size(2);
    const float* pdy = dy.data<float>();
    const float* px = x.data<float>();
    float* pdw = dw.data<float>();
    for (size_t e = 0; e + 1 < off.size(); ++e) {
      int64_t rows = off[e + 1] - off[e];
      // rows == 0: Sgemm's k == 0 path gives dw_e = beta * dw_e.
      Sgemm(true, false, p, q, rows, alpha, pdy + off[e] * p, p, px + off[e] * q, q, beta, pdw + e * p * q,
            q);
    }
    return absl::OkStatus();
  });
}

}  // namespace moe::cpu
