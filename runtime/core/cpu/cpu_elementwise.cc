// Element-wise kernels, reductions, initialisation and the optimizer step.
// Loops run on the backend's ThreadPool in fixed chunks of kElemGrain elements;
// reductions sum each chunk in double over 8 fixed lanes and then the chunk sums
// in order, so results do not depend on the thread count. The per-element math
// is kernel_math.h's (shared with a CUDA backend); loops that evaluate exp
// (SiLU, SwiGLU) and AdamW are built per ISA (MOE_CPU_CLONES).
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "runtime/core/cpu/cpu_kernels.h"
#include "runtime/core/kernel_math.h"
#include "runtime/core/rng.h"

namespace moe::cpu {
namespace {

constexpr int64_t kElemGrain = 1 << 14;

// fn(i) for i in [0, n). Iterations are independent (an output may be the same
// element as an input, never another one), which ivdep tells the vectoriser.
template <typename Fn>
void ForEach(int64_t n, Fn fn) {
  Pool().ParallelFor(n, kElemGrain, [&](int64_t b, int64_t e) {
#pragma GCC ivdep
    for (int64_t i = b; i < e; ++i) fn(i);
  });
}

using kmath::BF16ToF32;
using kmath::F32ToBF16;

// Sum over fixed chunks of f(i) in double, each chunk over 8 lanes (i mod 8).
template <typename Fn>
double ChunkedSum(int64_t n, Fn f) {
  int64_t num_chunks = (n + kElemGrain - 1) / kElemGrain;
  std::vector<double> partial(num_chunks, 0.0);
  Pool().ParallelFor(n, kElemGrain, [&](int64_t b, int64_t e) {
    double lane[8] = {};
    int64_t i = b;
    for (; i + 8 <= e; i += 8)
      for (int l = 0; l < 8; ++l) lane[l] += f(i + l);
    for (int l = 0; i < e; ++i, ++l) lane[l] += f(i);
    double acc = 0;
    for (double x : lane) acc += x;
    partial[b / kElemGrain] = acc;
  });
  double total = 0;
  for (double p : partial) total += p;
  return total;
}

MOE_CPU_CLONES void SiluRange(const float* __restrict x, float* out, int64_t b, int64_t e) {
#pragma GCC ivdep
  for (int64_t i = b; i < e; ++i) out[i] = kmath::Silu(x[i]);
}

MOE_CPU_CLONES void SiluBackwardRange(const float* __restrict x, const float* __restrict dout, float* dx,
                                      float alpha, float beta, int64_t b, int64_t e) {
#pragma GCC ivdep
  for (int64_t i = b; i < e; ++i) {
    const float g = alpha * dout[i] * kmath::SiluGrad(x[i]);
    dx[i] = beta == 0.0f ? g : g + beta * dx[i];
  }
}

MOE_CPU_CLONES void SwiGLURange(const float* gate, const float* up, float* out, int64_t b, int64_t e) {
#pragma GCC ivdep
  for (int64_t i = b; i < e; ++i) out[i] = kmath::SwiGLU(gate[i], up[i]);
}

MOE_CPU_CLONES void SwiGLUBackwardRange(const float* gate, const float* up, const float* dout, float* dgate,
                                        float* dup, int64_t b, int64_t e) {
#pragma GCC ivdep
  for (int64_t i = b; i < e; ++i) {
    float dg, du;
    kmath::SwiGLUBackward(gate[i], up[i], dout[i], &dg, &du);
    dgate[i] = dg;
    dup[i] = du;
  }
}

// g is read as scale * g (the clipping coefficient; 1 leaves it exact).
MOE_CPU_CLONES void AdamWRange(float* __restrict p, const float* __restrict g, float* __restrict m,
                               float* __restrict v, float scale, float lr, float beta1, float beta2,
                               float eps, float weight_decay, float bc1, float bc2, int64_t b, int64_t e) {
#pragma GCC ivdep
  for (int64_t i = b; i < e; ++i) {
    const float gs = scale * g[i];
    kmath::AdamWElement(gs, lr, beta1, beta2, eps, weight_decay, bc1, bc2, &p[i], &m[i], &v[i]);
  }
}

// The same, also writing the updated p rounded to bf16 (the compute copy).
MOE_CPU_CLONES void AdamWBf16Range(float* __restrict p, const float* __restrict g, float* __restrict m,
                                   float* __restrict v, uint16_t* __restrict p16, float scale, float lr,
                                   float beta1, float beta2, float eps, float weight_decay, float bc1,
                                   float bc2, int64_t b, int64_t e) {
#pragma GCC ivdep
  for (int64_t i = b; i < e; ++i) {
    const float gs = scale * g[i];
    kmath::AdamWElement(gs, lr, beta1, beta2, eps, weight_decay, bc1, bc2, &p[i], &m[i], &v[i]);
    p16[i] = kmath::F32ToBF16(p[i]);
  }
}

}  // namespace

absl::Status CpuKernels::Copy(S& s, T src, T dst) {
  if (!src.device().is_cpu() || !dst.device().is_cpu())
    return absl::UnimplementedError(
        absl::StrCat("cpu Copy: ", src.ToString(), " -> ", dst.ToString(), " needs a device backend"));
  return AsCpu(s).Run([=]() {
    if (src.raw_data() != dst.raw_data() && src.nbytes() > 0)
      std::memmove(dst.raw_data(), src.raw_data(), src.nbytes());
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::Cast(S& s, T src, T dst) {
  return AsCpu(s).Run([=]() {
    int64_t n = src.numel();
    DType a = src.dtype(), b = dst.dtype();
    if (a == b) {
      if (n > 0) std::memmove(dst.raw_data(), src.raw_data(), src.nbytes());
    } else if (a == DType::kF32 && b == DType::kBF16) {
      const float* x = src.data<float>();
      uint16_t* y = dst.data<uint16_t>();
      ForEach(n, [&](int64_t i) { y[i] = F32ToBF16(x[i]); });
    } else if (a == DType::kBF16 && b == DType::kF32) {
      const uint16_t* x = src.data<uint16_t>();
      float* y = dst.data<float>();
      ForEach(n, [&](int64_t i) { y[i] = BF16ToF32(x[i]); });
    } else if (a == DType::kF32 && b == DType::kF64) {
      const float* x = src.data<float>();
      double* y = dst.data<double>();
      ForEach(n, [&](int64_t i) { y[i] = x[i]; });
    } else if (a == DType::kF64 && b == DType::kF32) {
      const double* x = src.data<double>();
      float* y = dst.data<float>();
      ForEach(n, [&](int64_t i) { y[i] = static_cast<float>(x[i]); });
    } else if (a == DType::kI32 && b == DType::kI64) {
      const int32_t* x = src.data<int32_t>();
      int64_t* y = dst.data<int64_t>();
      ForEach(n, [&](int64_t i) { y[i] = x[i]; });
    } else if (a == DType::kI64 && b == DType::kI32) {
      const int64_t* x = src.data<int64_t>();
      int32_t* y = dst.data<int32_t>();
      ForEach(n, [&](int64_t i) { y[i] = static_cast<int32_t>(x[i]); });
    } else {
      return absl::UnimplementedError(absl::StrCat("cpu Cast ", DTypeName(a), " -> ", DTypeName(b)));
    }
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::Fill(S& s, T t, double value) {
  return AsCpu(s).Run([=]() {
    int64_t n = t.numel();
    switch (t.dtype()) {
      case DType::kF32: {
        float* p = t.data<float>();
        float v = static_cast<float>(value);
        ForEach(n, [&](int64_t i) { p[i] = v; });
        break;
      }
      case DType::kBF16: {
        uint16_t* p = t.data<uint16_t>();
        uint16_t v = F32ToBF16(static_cast<float>(value));
        ForEach(n, [&](int64_t i) { p[i] = v; });
        break;
      }
      case DType::kI32: {
        int32_t* p = t.data<int32_t>();
        ForEach(n, [&](int64_t i) { p[i] = static_cast<int32_t>(value); });
        break;
      }
      case DType::kI64: {
        int64_t* p = t.data<int64_t>();
        ForEach(n, [&](int64_t i) { p[i] = static_cast<int64_t>(value); });
        break;
      }
      case DType::kF64: {
        double* p = t.data<double>();
        ForEach(n, [&](int64_t i) { p[i] = value; });
        break;
      }
      default:
        return absl::UnimplementedError(absl::StrCat("cpu Fill of ", t.ToString()));
    }
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::Add(S& s, T a, T b, T out) {
  return AsCpu(s).Run([=]() {
    const float *pa = a.data<float>(), *pb = b.data<float>();
    float* po = out.data<float>();
    ForEach(a.numel(), [&](int64_t i) { po[i] = pa[i] + pb[i]; });
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::Mul(S& s, T a, T b, T out) {
  return AsCpu(s).Run([=]() {
    const float *pa = a.data<float>(), *pb = b.data<float>();
    float* po = out.data<float>();
    ForEach(a.numel(), [&](int64_t i) { po[i] = pa[i] * pb[i]; });
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::Axpby(S& s, float alpha, T x, float beta, T y) {
  return AsCpu(s).Run([=]() {
    const float* px = x.data<float>();
    float* py = y.data<float>();
    if (beta == 0.0f)
      ForEach(x.numel(), [&](int64_t i) { py[i] = alpha * px[i]; });
    else
      ForEach(x.numel(), [&](int64_t i) { py[i] = alpha * px[i] + beta * py[i]; });
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::Scale(S& s, T x, float alpha, T out) {
  return AsCpu(s).Run([=]() {
    const float* px = x.data<float>();
    float* po = out.data<float>();
    ForEach(x.numel(), [&](int64_t i) { po[i] = alpha * px[i]; });
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::Silu(S& s, T x, T out) {
  return AsCpu(s).Run([=]() {
    const float* px = x.data<float>();
    float* po = out.data<float>();
    Pool().ParallelFor(x.numel(), kElemGrain, [&](int64_t b, int64_t e) { SiluRange(px, po, b, e); });
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::SiluBackward(S& s, T x, T dout, T dx, float alpha, float beta) {
  return AsCpu(s).Run([=]() {
    const float *px = x.data<float>(), *pd = dout.data<float>();
    float* pdx = dx.data<float>();
    Pool().ParallelFor(x.numel(), kElemGrain,
                       [&](int64_t b, int64_t e) { SiluBackwardRange(px, pd, pdx, alpha, beta, b, e); });
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::SwiGLU(S& s, T gate, T up, T out) {
  return AsCpu(s).Run([=]() {
    const float *pg = gate.data<float>(), *pu = up.data<float>();
    float* po = out.data<float>();
    Pool().ParallelFor(gate.numel(), kElemGrain,
                       [&](int64_t b, int64_t e) { SwiGLURange(pg, pu, po, b, e); });
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::SwiGLUBackward(S& s, T gate, T up, T dout, T dgate, T dup) {
  return AsCpu(s).Run([=]() {
    const float *pg = gate.data<float>(), *pu = up.data<float>(), *pd = dout.data<float>();
    float *pdg = dgate.data<float>(), *pdu = dup.data<float>();
    Pool().ParallelFor(gate.numel(), kElemGrain,
                       [&](int64_t b, int64_t e) { SwiGLUBackwardRange(pg, pu, pd, pdg, pdu, b, e); });
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::ReduceSum(S& s, T x, T out, float alpha, float beta) {
  return AsCpu(s).Run([=]() {
    const float* px = x.data<float>();
    double sum = ChunkedSum(x.numel(), [&](int64_t i) { return static_cast<double>(px[i]); });
    float* po = out.data<float>();
    *po = static_cast<float>(alpha * sum + (beta == 0.0f ? 0.0 : beta * static_cast<double>(*po)));
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::ReduceSumSquares(S& s, T x, T out, float alpha, float beta) {
  return AsCpu(s).Run([=]() {
    const float* px = x.data<float>();
    double sum = ChunkedSum(x.numel(), [&](int64_t i) {
      double v = px[i];
      return v * v;
    });
    float* po = out.data<float>();
    *po = static_cast<float>(alpha * sum + (beta == 0.0f ? 0.0 : beta * static_cast<double>(*po)));
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::ReduceMax(S& s, T x, T out) {
  return AsCpu(s).Run([=]() {
    const float* px = x.data<float>();
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < x.numel(); ++i) m = std::max(m, px[i]);
    *out.data<float>() = m;
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::SumRows(S& s, T x, T out, float alpha, float beta) {
  return AsCpu(s).Run([=]() {
    int64_t rows = LeadRows(x), cols = Cols(x);
    const float* px = x.data<float>();
    float* po = out.data<float>();
    Pool().ParallelFor(cols, 64, [&](int64_t c0, int64_t c1) {
      std::vector<double> acc(c1 - c0, 0.0);
      for (int64_t r = 0; r < rows; ++r) {
        const float* row = px + r * cols;
        for (int64_t c = c0; c < c1; ++c) acc[c - c0] += row[c];
      }
      for (int64_t c = c0; c < c1; ++c)
        po[c] = static_cast<float>(alpha * acc[c - c0] + (beta == 0.0f ? 0.0 : beta * po[c]));
    });
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::InitNormal(S& s, T t, uint64_t seed, absl::string_view name,
                                    const Shape& global_shape, absl::Span<const int64_t> offsets, float std) {
  std::vector<int64_t> off(offsets.begin(), offsets.end());
  PhiloxKey key = PhiloxKeyFromName(name);
  return AsCpu(s).Run([=, off = std::move(off)]() {
    int rank = t.rank();
    float* p = t.data<float>();
    if (rank == 0) {
      p[0] = std * PhiloxNormal(seed, key, 0);
      return absl::OkStatus();
    }
    // Row-major strides of the global tensor.
    std::vector<int64_t> gstride(rank, 1);
    for (int d = rank - 2; d >= 0; --d) gstride[d] = gstride[d + 1] * global_shape[d + 1];
    int64_t cols = t.size(-1), rows = LeadRows(t);
    Pool().ParallelFor(rows, GrainFor(cols * 40), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        // Multi-index of box row r over dims 0..rank-2.
        int64_t rem = r, base = off[rank - 1];
        for (int d = rank - 2; d >= 0; --d) {
          int64_t i = rem % t.size(d);
          rem /= t.size(d);
          base += (off[d] + i) * gstride[d];
        }
        float* row = p + r * cols;
        for (int64_t j = 0; j < cols; ++j)
          row[j] = std * PhiloxNormal(seed, key, static_cast<uint64_t>(base + j));
      }
    });
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::AdamW(S& s, T param, T grad, T exp_avg, T exp_avg_sq, T param_bf16, float grad_scale,
                               float lr, float beta1, float beta2, float eps, float weight_decay,
                               int64_t step) {
  return AsCpu(s).Run([=]() {
    float* p = param.data<float>();
    const float* g = grad.data<float>();
    float* m = exp_avg.data<float>();
    float* v = exp_avg_sq.data<float>();
    uint16_t* p16 = param_bf16.defined() ? param_bf16.data<uint16_t>() : nullptr;
    float bc1 = static_cast<float>(1.0 - std::pow(static_cast<double>(beta1), step));
    float bc2 = static_cast<float>(1.0 - std::pow(static_cast<double>(beta2), step));
    Pool().ParallelFor(param.numel(), kElemGrain, [&](int64_t b, int64_t e) {
      if (p16 != nullptr) {
        AdamWBf16Range(p, g, m, v, p16, grad_scale, lr, beta1, beta2, eps, weight_decay, bc1, bc2, b, e);
      } else {
        AdamWRange(p, g, m, v, grad_scale, lr, beta1, beta2, eps, weight_decay, bc1, bc2, b, e);
      }
    });
    return absl::OkStatus();
  });
}

}  // namespace moe::cpu
