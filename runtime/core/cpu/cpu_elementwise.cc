// Element-wise kernels, reductions, initialisation and the optimizer step.
// Loops run on the backend's ThreadPool; reductions sum fixed-size chunks in
// double and then the chunk sums in order, so results do not depend on the
// thread count.
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "runtime/core/cpu/cpu_kernels.h"
#include "runtime/core/rng.h"

namespace moe::cpu {
namespace {

constexpr int64_t kElemGrain = 1 << 14;

template <typename Fn>
void ForEach(int64_t n, Fn fn) {
  Pool().ParallelFor(n, kElemGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) fn(i);
  });
}

inline float Sigmoid(float z) { return 1.0f / (1.0f + std::exp(-z)); }

uint16_t F32ToBF16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

float BF16ToF32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Sum over fixed chunks of f(i) in double.
template <typename Fn>
double ChunkedSum(int64_t n, Fn f) {
  int64_t num_chunks = (n + kElemGrain - 1) / kElemGrain;
  std::vector<double> partial(num_chunks, 0.0);
  Pool().ParallelFor(n, kElemGrain, [&](int64_t b, int64_t e) {
    double acc = 0;
    for (int64_t i = b; i < e; ++i) acc += f(i);
    partial[b / kElemGrain] = acc;
  });
  double total = 0;
  for (double p : partial) total += p;
  return total;
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
    ForEach(x.numel(), [&](int64_t i) { po[i] = px[i] * Sigmoid(px[i]); });
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::SiluBackward(S& s, T x, T dout, T dx, float alpha, float beta) {
  return AsCpu(s).Run([=]() {
    const float *px = x.data<float>(), *pd = dout.data<float>();
    float* pdx = dx.data<float>();
    ForEach(x.numel(), [&](int64_t i) {
      float sg = Sigmoid(px[i]);
      float g = alpha * pd[i] * sg * (1.0f + px[i] * (1.0f - sg));
      pdx[i] = beta == 0.0f ? g : g + beta * pdx[i];
    });
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::SwiGLU(S& s, T gate, T up, T out) {
  return AsCpu(s).Run([=]() {
    const float *pg = gate.data<float>(), *pu = up.data<float>();
    float* po = out.data<float>();
    ForEach(gate.numel(), [&](int64_t i) { po[i] = pg[i] * Sigmoid(pg[i]) * pu[i]; });
    return absl::OkStatus();
  });
}

absl::Status CpuKernels::SwiGLUBackward(S& s, T gate, T up, T dout, T dgate, T dup) {
  return AsCpu(s).Run([=]() {
    const float *pg = gate.data<float>(), *pu = up.data<float>(), *pd = dout.data<float>();
    float *pdg = dgate.data<float>(), *pdu = dup.data<float>();
    ForEach(gate.numel(), [&](int64_t i) {
      float g = pg[i], u = pu[i], d = pd[i];
      float sg = Sigmoid(g);
      float silu = g * sg;
      pdg[i] = d * u * sg * (1.0f + g * (1.0f - sg));
      pdu[i] = d * silu;
    });
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

absl::Status CpuKernels::AdamW(S& s, T param, T grad, T exp_avg, T exp_avg_sq, float lr, float beta1,
                               float beta2, float eps, float weight_decay, int64_t step) {
  return AsCpu(s).Run([=]() {
    float* p = param.data<float>();
    const float* g = grad.data<float>();
    float* m = exp_avg.data<float>();
    float* v = exp_avg_sq.data<float>();
    float bc1 = static_cast<float>(1.0 - std::pow(static_cast<double>(beta1), step));
    float bc2 = static_cast<float>(1.0 - std::pow(static_cast<double>(beta2), step));
    ForEach(param.numel(), [&](int64_t i) {
      m[i] = beta1 * m[i] + (1.0f - beta1) * g[i];
      v[i] = beta2 * v[i] + (1.0f - beta2) * g[i] * g[i];
      float update = (m[i] / bc1) / (std::sqrt(v[i] / bc2) + eps);
      p[i] -= lr * (update + weight_decay * p[i]);
    });
    return absl::OkStatus();
  });
}

}  // namespace moe::cpu
