// Row-wise neural-network kernels: normalisation, RoPE, softmax,
// losses, top-k, row gather/scatter. Rows are independent and run on the
// ThreadPool; accumulations that cross rows (dweight, scatter-add) are
// done in a fixed order so results are deterministic.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "absl/strings/str_cat.h"
#include "runtime/core/bf16_staging.h"
#include "runtime/core/cpu/cpu_kernels.h"
#include "runtime/core/kernel_math.h"

namespace moe::cpu {
namespace {

// First bad index seen by a parallel loop.
struct BadIndex {
  std::atomic<bool> bad{false};
  std::atomic<int64_t> position{0}, value{0};
  void Report(int64_t pos, int64_t val) {
    bool expected = false;
    if (bad.compare_exchange_strong(expected, true)) {
      position = pos;
      value = val;
    }
  }
};

// cos and sin of pos * inv_freq[j] (computed in double, stored as float) for the
// positions offset .. offset + seq - 1, [seq, head_dim / 2] each. Every layer's q
// and k rotate by the same table, so each thread keeps the last one it built.
struct RopeTable {
  int64_t seq = -1, head_dim = -1, offset = 0;
  double theta = 0;
  std::vector<float> cos, sin;
};

const RopeTable& RopeTableFor(int64_t seq, int64_t head_dim, double theta, int64_t offset) {
  thread_local RopeTable t;
  if (t.seq == seq && t.head_dim == head_dim && t.theta == theta && t.offset == offset) return t;
  const int64_t half = head_dim / 2;
  std::vector<double> inv_freq(half);
  for (int64_t j = 0; j < half; ++j) inv_freq[j] = kmath::RopeInvFreq(j, head_dim, theta);
  t.cos.resize(seq * half);
  t.sin.resize(seq * half);
  for (int64_t i = 0; i < seq; ++i) {
    const double pos = static_cast<double>(offset + i);
    for (int64_t j = 0; j < half; ++j) {
      t.cos[i * half + j] = static_cast<float>(std::cos(pos * inv_freq[j]));
      t.sin[i * half + j] = static_cast<float>(std::sin(pos * inv_freq[j]));
    }
  }
  t.seq = seq;
  t.head_dim = head_dim;
  t.theta = theta;
  t.offset = offset;
  return t;
}

void RopeRows(const float* in, float* out, int64_t batch, int64_t seq, int64_t heads, int64_t head_dim,
              double theta, int64_t position_offset, bool inverse) {
  const int64_t half = head_dim / 2, row = heads * head_dim;
  const RopeTable& table = RopeTableFor(seq, head_dim, theta, position_offset);
  const float *cos_table = table.cos.data(), *sin_table = table.sin.data();
  Pool().ParallelFor(batch * seq, GrainFor(row * 4), [&](int64_t r0, int64_t r1) {
    std::vector<float> sn(half);
    for (int64_t r = r0; r < r1; ++r) {
      const float* c = cos_table + (r % seq) * half;
      const float* s = sin_table + (r % seq) * half;
      for (int64_t j = 0; j < half; ++j) sn[j] = inverse ? -s[j] : s[j];
      for (int64_t h = 0; h < heads; ++h) {
        const float* x = in + r * row + h * head_dim;
        float* y = out + r * row + h * head_dim;
#pragma GCC ivdep
        for (int64_t j = 0; j < half; ++j)
          kmath::RopePair(x[j], x[j + half], c[j], sn[j], &y[j], &y[j + half]);
      }
    }
  });
}

// sum_i a[i] b[i] c[i] in double over 8 fixed lanes (vectorises; the same order
// on every ISA and thread count). c may be null (then 1).
inline double LaneDot3(const float* a, const float* b, const float* c, int64_t n) {
  double lane[8] = {};
  int64_t i = 0;
  if (c == nullptr) {
    for (; i + 8 <= n; i += 8)
      for (int l = 0; l < 8; ++l) lane[l] += static_cast<double>(a[i + l]) * b[i + l];
    for (int l = 0; i < n; ++i, ++l) lane[l] += static_cast<double>(a[i]) * b[i];
  } else {
    for (; i + 8 <= n; i += 8)
      for (int l = 0; l < 8; ++l) lane[l] += static_cast<double>(a[i + l]) * b[i + l] * c[i + l];
    for (int l = 0; i < n; ++i, ++l) lane[l] += static_cast<double>(a[i]) * b[i] * c[i];
  }
  double s = 0;
  for (double x : lane) s += x;
  return s;
}

}  // namespace

namespace {
// RMSNorm of rows [r0, r1) of x [rows, d] (after sum = x + residual when residual is given).
void RmsNormRows(const float* px, const float* pres, float* psum, const float* pw, float eps, float* po,
                 float* pr, int64_t d, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = px + r * d;
    if (pres != nullptr) {
      const float* rr = pres + r * d;
      float* sr = psum + r * d;
#pragma GCC ivdep
      for (int64_t i = 0; i < d; ++i) sr[i] = xr[i] + rr[i];
      xr = sr;
    }
    const float rs = kmath::RmsNormRstd(LaneDot3(xr, xr, nullptr, d), d, eps);
    pr[r] = rs;
    float* orow = po + r * d;
#pragma GCC ivdep
    for (int64_t i = 0; i < d; ++i) orow[i] = xr[i] * rs * pw[i];
  }
}
}  // namespace

absl::Status CpuKernels::RmsNorm(S& s, T x, T weight, float eps, T out, T rstd) {
  return AsCpu(s).Run([=]() {
    const int64_t rows = LeadRows(x), d = Cols(x);
    Pool().ParallelFor(rows, GrainFor(d * 3), [&](int64_t r0, int64_t r1) {
      RmsNormRows(x.data<float>(), nullptr, nullptr, weight.data<float>(), eps, out.data<float>(),
                  rstd.data<float>(), d, r0, r1);
    });
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::AddRmsNorm(S& s, T x, T residual, T weight, float eps, T sum, T out, T rstd) {
  return AsCpu(s).Run([=]() {
    const int64_t rows = LeadRows(x), d = Cols(x);
    Pool().ParallelFor(rows, GrainFor(d * 4), [&](int64_t r0, int64_t r1) {
      RmsNormRows(x.data<float>(), residual.data<float>(), sum.data<float>(), weight.data<float>(), eps,
                  out.data<float>(), rstd.data<float>(), d, r0, r1);
    });
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::RmsNormBackward(S& s, T x, T weight, T rstd, T dout, T dx, T dweight,
                                         bool accumulate_dx) {
  return AsCpu(s).Run([=]() {
    int64_t rows = LeadRows(x), d = Cols(x);
    const float *px = x.data<float>(), *pw = weight.data<float>(), *pr = rstd.data<float>(),
                *pd = dout.data<float>();
    float *pdx = dx.data<float>(), *pdw = dweight.data<float>();
    Pool().ParallelFor(rows, GrainFor(d * 4), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float *xr = px + r * d, *dr = pd + r * d;
        const float rs = pr[r];
        const float coef = kmath::RmsNormBackwardCoef(LaneDot3(pw, dr, xr, d), d, rs);
        float* dxr = pdx + r * d;
        if (accumulate_dx) {
#pragma GCC ivdep
          for (int64_t i = 0; i < d; ++i) dxr[i] += kmath::RmsNormDx(xr[i], pw[i], dr[i], rs, coef);
        } else {
#pragma GCC ivdep
          for (int64_t i = 0; i < d; ++i) dxr[i] = kmath::RmsNormDx(xr[i], pw[i], dr[i], rs, coef);
        }
      }
    });
    Pool().ParallelFor(d, 64, [&](int64_t c0, int64_t c1) {
      std::vector<double> acc(c1 - c0, 0.0);
      for (int64_t r = 0; r < rows; ++r) {
        const float *xr = px + r * d, *dr = pd + r * d;
        double rs = pr[r];
        for (int64_t c = c0; c < c1; ++c) acc[c - c0] += static_cast<double>(dr[c]) * xr[c] * rs;
      }
      for (int64_t c = c0; c < c1; ++c) pdw[c] += static_cast<float>(acc[c - c0]);
    });
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::Rope(S& s, T x, T out, double theta, int64_t position_offset) {
  return AsCpu(s).Run([=]() {
    RopeRows(x.data<float>(), out.data<float>(), x.size(0), x.size(1), x.size(2), x.size(3), theta,
             position_offset, /*inverse=*/false);
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::RopeBackward(S& s, T dout, T dx, double theta, int64_t position_offset) {
  return AsCpu(s).Run([=]() {
    RopeRows(dout.data<float>(), dx.data<float>(), dout.size(0), dout.size(1), dout.size(2), dout.size(3),
             theta, position_offset, /*inverse=*/true);
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::Softmax(S& s, T x, T out) {
  return AsCpu(s).Run([=]() {
    int64_t rows = LeadRows(x), cols = Cols(x);
    const float* px = x.data<float>();
    float* po = out.data<float>();
    Pool().ParallelFor(rows, GrainFor(cols * 8), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float* xr = px + r * cols;
        float* orow = po + r * cols;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < cols; ++c) mx = std::max(mx, xr[c]);
        double sum = 0;
        for (int64_t c = 0; c < cols; ++c) {
          orow[c] = std::exp(xr[c] - mx);
          sum += orow[c];
        }
        float inv = static_cast<float>(1.0 / sum);
        for (int64_t c = 0; c < cols; ++c) orow[c] *= inv;
      }
    });
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::SoftmaxBackward(S& s, T y, T dy, T dx, float alpha, float beta) {
  return AsCpu(s).Run([=]() {
    int64_t rows = LeadRows(y), cols = Cols(y);
    const float *py = y.data<float>(), *pdy = dy.data<float>();
    float* pdx = dx.data<float>();
    Pool().ParallelFor(rows, GrainFor(cols * 4), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float *yr = py + r * cols, *dyr = pdy + r * cols;
        float* dxr = pdx + r * cols;
        double dot = 0;
        for (int64_t c = 0; c < cols; ++c) dot += static_cast<double>(yr[c]) * dyr[c];
        float fd = static_cast<float>(dot);
        for (int64_t c = 0; c < cols; ++c) {
          float g = kmath::SoftmaxGrad(alpha * yr[c], dyr[c], fd);
          dxr[c] = beta == 0.0f ? g : g + beta * dxr[c];
        }
      }
    });
    return absl::OkStatus();
  });
}

namespace {
// log sum_c exp(x[c]) of one row: the max in 16 lanes (exact, so any order), then
// exp(x - max) by kmath::Exp (branch-free, so the loop vectorises) summed in double
// over 8 fixed lanes (the same order on every ISA and thread count).
MOE_CPU_CLONES float RowLogSumExp(const float* xr, int64_t cols) {
  float lane_max[16];
  for (float& m : lane_max) m = -std::numeric_limits<float>::infinity();
  int64_t c = 0;
  for (; c + 16 <= cols; c += 16)
    for (int l = 0; l < 16; ++l) lane_max[l] = lane_max[l] > xr[c + l] ? lane_max[l] : xr[c + l];
  float mx = -std::numeric_limits<float>::infinity();
  for (float m : lane_max) mx = std::max(mx, m);
  for (; c < cols; ++c) mx = std::max(mx, xr[c]);
  if (std::isinf(mx)) return mx;
  double lane[8] = {};
  c = 0;
  for (; c + 8 <= cols; c += 8)
    for (int l = 0; l < 8; ++l) lane[l] += static_cast<double>(kmath::Exp(xr[c + l] - mx));
  for (int l = 0; c < cols; ++c, ++l) lane[l] += static_cast<double>(kmath::Exp(xr[c] - mx));
  double sum = 0;
  for (double x : lane) sum += x;
  return static_cast<float>(mx + std::log(sum));
}
}  // namespace

absl::Status CpuKernels::LogSumExp(S& s, T x, T out) {
  return AsCpu(s).Run([=]() {
    int64_t rows = LeadRows(x), cols = Cols(x);
    const float* px = x.data<float>();
    float* po = out.data<float>();
    Pool().ParallelFor(rows, GrainFor(cols * 8), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) po[r] = RowLogSumExp(px + r * cols, cols);
    });
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::CrossEntropy(S& s, T logits, T targets, T losses, T lse) {
  return AsCpu(s).Run([=]() -> absl::Status {
    int64_t rows = LeadRows(logits), cols = Cols(logits);
    const float* px = logits.data<float>();
    const int32_t* pt = targets.data<int32_t>();
    float *pl = losses.data<float>(), *pe = lse.data<float>();
    BadIndex bad;
    Pool().ParallelFor(rows, GrainFor(cols * 8), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float* xr = px + r * cols;
        pe[r] = RowLogSumExp(xr, cols);
        int32_t tgt = pt[r];
        if (tgt < 0) {
          pl[r] = 0.0f;
        } else if (tgt >= cols) {
          bad.Report(r, tgt);
          pl[r] = 0.0f;
        } else {
          pl[r] = pe[r] - xr[tgt];
        }
      }
    });
    if (bad.bad)
      return absl::InvalidArgumentError(absl::StrCat("ops::CrossEntropy: targets[", bad.position.load(),
                                                     "] = ", bad.value.load(), " is >= the ", cols,
                                                     " classes of logits"));
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::CrossEntropyBackward(S& s, T logits, T targets, T lse, T dloss, float scale,
                                              T dlogits) {
  return AsCpu(s).Run([=]() -> absl::Status {
    int64_t rows = LeadRows(logits), cols = Cols(logits);
    const float *px = logits.data<float>(), *pe = lse.data<float>();
    const float* pdl = dloss.defined() ? dloss.data<float>() : nullptr;
    const int32_t* pt = targets.data<int32_t>();
    float* pg = dlogits.data<float>();
    BadIndex bad;
    Pool().ParallelFor(rows, GrainFor(cols * 8), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float* xr = px + r * cols;
        float* gr = pg + r * cols;
        int32_t tgt = pt[r];
        if (tgt < 0) {
          for (int64_t c = 0; c < cols; ++c) gr[c] = 0.0f;
          continue;
        }
        if (tgt >= cols) bad.Report(r, tgt);
        const float f = scale * (pdl ? pdl[r] : 1.0f);
        const float l = pe[r];
#pragma GCC ivdep
        for (int64_t c = 0; c < cols; ++c) gr[c] = kmath::CrossEntropyGrad(xr[c], l, f, c == tgt);
      }
    });
    if (bad.bad)
      return absl::InvalidArgumentError(absl::StrCat("ops::CrossEntropyBackward: targets[",
                                                     bad.position.load(), "] = ", bad.value.load(),
                                                     " is >= the ", cols, " classes of logits"));
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::TopK(S& s, T x, int k, T values, T indices) {
  return AsCpu(s).Run([=]() {
    int64_t rows = LeadRows(x), cols = Cols(x);
    const float* px = x.data<float>();
    float* pv = values.data<float>();
    int32_t* pi = indices.data<int32_t>();
    Pool().ParallelFor(rows, GrainFor(cols * 8), [&](int64_t r0, int64_t r1) {
      std::vector<int32_t> idx(cols);
      for (int64_t r = r0; r < r1; ++r) {
        const float* xr = px + r * cols;
        std::iota(idx.begin(), idx.end(), 0);
        std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                          [xr](int32_t a, int32_t b) { return kmath::TopKBefore(xr[a], a, xr[b], b); });
        for (int j = 0; j < k; ++j) {
          pi[r * k + j] = idx[j];
          pv[r * k + j] = xr[idx[j]];
        }
      }
    });
    return absl::OkStatus();
  });
}

namespace {
absl::Status CheckIndices(const char* op, const int32_t* idx, int64_t m, int64_t n) {
  for (int64_t i = 0; i < m; ++i)
    if (idx[i] < 0 || idx[i] >= n)
      return absl::InvalidArgumentError(
          absl::StrCat("ops::", op, ": index[", i, "] = ", idx[i], " is outside [0, ", n, ")"));
  return absl::OkStatus();
}

// The first entry of by_row (ops.h ScatterRowOrder) that does not match
// index: offsets not running from 0 to m without going back, a source outside
// [0, m), of another row, or not above the one before it in its row. -1: none.
int64_t FirstByRowMismatch(const int32_t* by_row, const int32_t* idx, int64_t m, int64_t n) {
  if (by_row[0] != 0) return 0;
  if (by_row[n] != m) return n;
  const int32_t* order = by_row + n + 1;
  for (int64_t r = 0; r < n; ++r) {
    if (by_row[r + 1] < by_row[r]) return r + 1;
    for (int64_t j = by_row[r]; j < by_row[r + 1]; ++j) {
      const int32_t i = order[j];
      if (i < 0 || i >= m || idx[i] != r || (j > by_row[r] && order[j - 1] >= i)) return n + 1 + j;
    }
  }
  return -1;
}
}  // namespace

absl::Status CpuKernels::GatherRows(S& s, T src, T index, T dst, T weight) {
  return AsCpu(s).Run([=]() -> absl::Status {
    int64_t m = index.numel(), n = LeadRows(src);
    const int32_t* idx = index.data<int32_t>();
    absl::Status st = CheckIndices("GatherRows", idx, m, n);
    if (!st.ok()) return st;
    if (weight.defined()) {  // f32 rows (bf16 ones are staged)
      const int64_t d = Cols(src);
      const float *ps = src.data<float>(), *pw = weight.data<float>();
      float* pd = dst.data<float>();
      Pool().ParallelFor(m, GrainFor(d), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const float* sr = ps + static_cast<int64_t>(idx[i]) * d;
          float* dr = pd + i * d;
          const float w = pw[i];
          for (int64_t c = 0; c < d; ++c) dr[c] = w * sr[c];
        }
      });
      return absl::OkStatus();
    }
    size_t row_bytes = static_cast<size_t>(Cols(src)) * DTypeSize(src.dtype());
    const char* ps = static_cast<const char*>(src.raw_data());
    char* pd = static_cast<char*>(dst.raw_data());
    Pool().ParallelFor(m, GrainFor(static_cast<int64_t>(row_bytes / 4)), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) std::memcpy(pd + i * row_bytes, ps + idx[i] * row_bytes, row_bytes);
    });
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::ScatterAddRows(S& s, T src, T index, T dst, T weight, ScatterMode mode, T by_row) {
  return AsCpu(s).Run([=]() -> absl::Status {
    int64_t m = index.numel(), n = LeadRows(dst), d = Cols(src);
    const int32_t* idx = index.data<int32_t>();
    absl::Status st = CheckIndices("ScatterAddRows", idx, m, n);
    if (!st.ok()) return st;
    const float* ps = src.data<float>();
    const float* pw = weight.defined() ? weight.data<float>() : nullptr;
    float* pd = dst.data<float>();
    const bool overwrite = mode == ScatterMode::kOverwrite;
    if (by_row.defined()) {
      const int32_t* rows = by_row.data<int32_t>();
      if (const int64_t bad = FirstByRowMismatch(rows, idx, m, n); bad >= 0)
        return ByRowMismatch("ScatterAddRows", bad, rows[bad]);
      // Destination rows in parallel, each adding its sources in i order.
      const int32_t* order = rows + n + 1;
      Pool().ParallelFor(n, GrainFor(d + 1), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          float* dr = pd + r * d;
          if (overwrite) std::fill(dr, dr + d, 0.0f);
          for (int64_t j = rows[r]; j < rows[r + 1]; ++j) {
            const int64_t i = order[j];
            const float* sr = ps + i * d;
            const float w = pw ? pw[i] : 1.0f;
            for (int64_t c = 0; c < d; ++c) dr[c] += w * sr[c];
          }
        }
      });
      return absl::OkStatus();
    }
    // Column blocks: every destination element is accumulated in i order
    // (from 0 when overwriting: the block's columns of every row are cleared first).
    Pool().ParallelFor(d, std::max<int64_t>(16, (d + 1) / 2), [&](int64_t c0, int64_t c1) {
      if (overwrite)
        for (int64_t r = 0; r < n; ++r) std::fill(pd + r * d + c0, pd + r * d + c1, 0.0f);
      for (int64_t i = 0; i < m; ++i) {
        const float* sr = ps + i * d;
        float* dr = pd + static_cast<int64_t>(idx[i]) * d;
        float w = pw ? pw[i] : 1.0f;
        for (int64_t c = c0; c < c1; ++c) dr[c] += w * sr[c];
      }
    });
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::GatherRowDot(S& s, T a, T index, T b, T out, float alpha, float beta) {
  return AsCpu(s).Run([=]() -> absl::Status {
    int64_t m = index.numel(), n = LeadRows(a), d = Cols(a);
    const int32_t* idx = index.data<int32_t>();
    absl::Status st = CheckIndices("GatherRowDot", idx, m, n);
    if (!st.ok()) return st;
    const float *pa = a.data<float>(), *pb = b.data<float>();
    float* po = out.data<float>();
    Pool().ParallelFor(m, GrainFor(d * 2), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const float *ar = pa + static_cast<int64_t>(idx[i]) * d, *br = pb + i * d;
        double dot = 0;
        for (int64_t c = 0; c < d; ++c) dot += static_cast<double>(ar[c]) * br[c];
        float g = static_cast<float>(alpha * dot);
        po[i] = beta == 0.0f ? g : g + beta * po[i];
      }
    });
    return absl::OkStatus();
  });
}

// The f32 kernels behind the bf16 staging decorator (runtime/core/bf16_staging.h),
// GEMMs included: sgemm is the CPU's fast path for bf16 operands too.
std::unique_ptr<Kernels> MakeCpuKernels() {
  return MakeBf16StagingKernels(std::make_unique<CpuKernels>(), {.stage_gemms = true});
}

}  // namespace moe::cpu
