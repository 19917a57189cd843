// The gemm attention path (attention_gemm.h) on the CPU: the batched GEMMs as
// one pool job of sgemm tiles each (RunGemmTasks), the row passes as pool
// loops over kernel_math.h's AttentionProb / AttentionScoreGrad, the same
// functions the CUDA row kernels and the fused CPU kernel call. The CPU's
// default is the fused kernel (cpu_attention.cc); this path exists so that the
// algorithm the CUDA backend runs on cuBLAS is tested here, and for comparing
// the two (MOE_ATTENTION=gemm).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "runtime/core/attention_gemm.h"
#include "runtime/core/cpu/cpu_kernels.h"
#include "runtime/core/kernel_math.h"

namespace moe::cpu {
namespace {

class CpuAttentionEngine : public attn::Engine {
 public:
  absl::Status Gemm(const attn::BatchedGemm& g) override {
    std::vector<GemmTask> tasks;
    tasks.reserve(static_cast<size_t>(g.count()));
    for (int64_t t = 0; t < g.count(); ++t)
      tasks.push_back({g.trans_a, g.trans_b, g.m, g.n, g.k, g.a.At(t, g.heads), g.a.ld, g.b.At(t, g.heads),
                       g.b.ld, const_cast<float*>(g.c.At(t, g.heads)), g.c.ld});
    RunGemmTasks(tasks, g.alpha, g.beta);
    return absl::OkStatus();
  }

  absl::Status SoftmaxRows(const attn::ScoreBlock& blk, float scale, float* lse) override {
    Pool().ParallelFor(blk.batch * blk.rows, GrainFor(4 * blk.keys), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / blk.rows, r = t % blk.rows;
        float* row = blk.s + b * blk.stride + r * blk.ld;
        const int64_t vis = Visible(blk, r);
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < vis; ++j) mx = std::max(mx, row[j] * scale);
        double sum = 0;
        for (int64_t j = 0; j < vis; ++j) sum += kmath::Exp(row[j] * scale - mx);
        const float l = kmath::LogSumExpFrom(mx, static_cast<float>(sum));
        for (int64_t j = 0; j < vis; ++j) row[j] = kmath::AttentionProb(row[j], scale, l);
        std::fill(row + vis, row + blk.keys, 0.0f);
        lse[b * blk.lse_stride + blk.i0 + r] = l;
      }
    });
    return absl::OkStatus();
  }

  absl::Status SoftmaxBackwardRows(const attn::ScoreBlock& blk, float* dp, float scale, const float* lse,
                                   const float* delta) override {
    Pool().ParallelFor(blk.batch * blk.rows, GrainFor(4 * blk.keys), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / blk.rows, r = t % blk.rows, at = b * blk.stride + r * blk.ld;
        float* srow = blk.s + at;
        float* drow = dp + at;
        const int64_t vis = Visible(blk, r);
        const float l = lse[b * blk.lse_stride + blk.i0 + r], dl = delta[b * blk.lse_stride + blk.i0 + r];
        for (int64_t j = 0; j < vis; ++j) {
          const float p = kmath::AttentionProb(srow[j], scale, l);
          srow[j] = p;
          drow[j] = kmath::AttentionScoreGrad(p, drow[j], dl);
        }
        std::fill(srow + vis, srow + blk.keys, 0.0f);
        std::fill(drow + vis, drow + blk.keys, 0.0f);
      }
    });
    return absl::OkStatus();
  }

  absl::Status DeltaRows(const attn::Shape& sh, const float* out, const float* dout, float* delta) override {
    const int64_t rows = sh.batch * sh.heads * sh.seq;
    Pool().ParallelFor(rows, GrainFor(2 * sh.head_dim), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {  // t = (b * heads + h) * seq + i
        const int64_t i = t % sh.seq, bh = t / sh.seq, h = bh % sh.heads, b = bh / sh.heads;
        const int64_t off = ((b * sh.seq + i) * sh.heads + h) * sh.head_dim;
        double acc = 0;
        for (int64_t c = 0; c < sh.head_dim; ++c) acc += static_cast<double>(out[off + c]) * dout[off + c];
        delta[t] = static_cast<float>(acc);
      }
    });
    return absl::OkStatus();
  }

  absl::Status Zero(float* p, int64_t n) override {
    std::fill(p, p + n, 0.0f);
    return absl::OkStatus();
  }

 private:
  // Keys row r of the block sees: j <= i0 + r, within the block's keys.
  static int64_t Visible(const attn::ScoreBlock& blk, int64_t r) {
    return std::min(blk.i0 + r + 1, blk.keys);
  }
};

attn::Shape ShapeOf(const Tensor& q, const Tensor& k) {
  return attn::Shape{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
}

}  // namespace

absl::Status GemmCausalAttention(const Tensor& q, const Tensor& k, const Tensor& v, float scale,
                                 const Tensor& out, const Tensor& lse) {
  const attn::Shape sh = ShapeOf(q, k);
  const int64_t chunk = attn::ChunkRows(sh, attn::AttentionSettingsRef().workspace_bytes);
  std::vector<float> work(static_cast<size_t>(attn::WorkspaceFloats(sh, chunk, /*backward=*/false)));
  CpuAttentionEngine engine;
  return attn::Forward(engine, sh, q.data<float>(), k.data<float>(), v.data<float>(), scale,
                       out.data<float>(), lse.data<float>(), work.data(), chunk);
}

absl::Status GemmCausalAttentionBackward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                                         const Tensor& lse, float scale, const Tensor& dout, const Tensor& dq,
                                         const Tensor& dk, const Tensor& dv) {
  const attn::Shape sh = ShapeOf(q, k);
  const int64_t chunk = attn::ChunkRows(sh, attn::AttentionSettingsRef().workspace_bytes);
  std::vector<float> work(static_cast<size_t>(attn::WorkspaceFloats(sh, chunk, /*backward=*/true)));
  std::vector<float> delta(static_cast<size_t>(sh.batch * sh.heads * sh.seq));
  CpuAttentionEngine engine;
  return attn::Backward(engine, sh, q.data<float>(), k.data<float>(), v.data<float>(), out.data<float>(),
                        lse.data<float>(), scale, dout.data<float>(), dq.data<float>(), dk.data<float>(),
                        dv.data<float>(), delta.data(), work.data(), chunk);
}

}  // namespace moe::cpu
