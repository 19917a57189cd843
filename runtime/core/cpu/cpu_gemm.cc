// GEMMs on OpenBLAS. Transposes and heads-in-place layouts are expressed with
// cblas's trans flags and leading dimensions, never with copies.
//
// Threads: OpenBLAS runs single-threaded (cpu_backend.h); each GEMM is split
// into a fixed grid of tiles of C that the backend's ThreadPool runs, and a
// grouped or batched GEMM is one pool job over all its (matrix, tile) pairs.
// The grid depends only on the shapes, never on the thread count, and every
// element of C is one single-threaded OpenBLAS dot over the full K, so results
// do not depend on the thread count.
#include <cblas.h>

#include <algorithm>
#include <vector>

#include "runtime/core/cpu/cpu_kernels.h"

namespace moe::cpu {
namespace {

// C = alpha op(A) op(B) + beta C on the calling thread.
void SgemmOneThread(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
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

// The tile grid of one GEMM: rows of C in blocks of tm, columns in blocks of tn.
// Tiles of at most kTileRows x kTileCols (large enough that re-packing A and B
// per tile costs a few percent), merged while a tile would hold fewer than
// kMinTileFlops (below that the pool's hand-off costs more than it saves). A GEMM
// whose C is small but whose K is long (the weight gradients, C [out, in] summed
// over every token) would be one tile on one thread: a GEMM run alone (not one
// matrix of a grouped or batched GEMM, whose matrices already share the pool) is
// split, the longer side first, until it has kMinTiles tiles or another split
// would take its tiles under kMinTileFlops.
struct Grid {
  int64_t tm, tn, mt, nt;
  int64_t tiles() const { return mt * nt; }
};
constexpr int64_t kTileRows = 256, kTileCols = 512, kMinTiles = 4;
constexpr double kMinTileFlops = 4e6;

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

Grid TileGrid(int64_t m, int64_t n, int64_t k, int64_t min_tiles) {
  int64_t mt = std::max<int64_t>(1, CeilDiv(m, kTileRows)), nt = std::max<int64_t>(1, CeilDiv(n, kTileCols));
  const double flops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  while (mt * nt > 1 && flops / static_cast<double>(mt * nt) < kMinTileFlops) {
    if (mt >= nt) {
      mt = CeilDiv(mt, 2);
    } else {
      nt = CeilDiv(nt, 2);
    }
  }
  while (mt * nt < min_tiles && flops / static_cast<double>(2 * mt * nt) >= kMinTileFlops) {
    const int64_t rows = CeilDiv(m, mt), cols = CeilDiv(n, nt);
    if (std::max(rows, cols) < 32) break;  // no side left to halve into 16-multiples
    if (rows >= cols) {
      mt *= 2;
    } else {
      nt *= 2;
    }
  }
  // Tile edges on multiples of 16 (OpenBLAS's register blocks), so tiles are whole kernels.
  const int64_t tm = mt == 1 ? m : CeilDiv(CeilDiv(m, mt), 16) * 16;
  const int64_t tn = nt == 1 ? n : CeilDiv(CeilDiv(n, nt), 16) * 16;
  return Grid{tm, tn, CeilDiv(m, std::max<int64_t>(tm, 1)), CeilDiv(n, std::max<int64_t>(tn, 1))};
}

// Tile t of a GEMM with grid g (row-major over the grid).
void SgemmTile(const Grid& g, int64_t t, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
               float alpha, const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
               int64_t ldc) {
  const int64_t i0 = (t / g.nt) * g.tm, j0 = (t % g.nt) * g.tn;
  const int64_t rows = std::min(g.tm, m - i0), cols = std::min(g.tn, n - j0);
  // Row i of op(A) starts at a + i * lda (no trans) or column i (trans); column j
  // of op(B) at b + j (no trans) or row j (trans).
  const float* ai = trans_a ? a + i0 : a + i0 * lda;
  const float* bj = trans_b ? b + j0 * ldb : b + j0;
  SgemmOneThread(trans_a, trans_b, rows, cols, k, alpha, ai, lda, bj, ldb, beta, c + i0 * ldc + j0, ldc);
}

}  // namespace

// Runs every tile of every task as one pool job (tasks in order, tiles in grid order).
void RunGemmTasks(const std::vector<GemmTask>& tasks, float alpha, float beta) {
  std::vector<Grid> grids;
  std::vector<int64_t> first;  // first[i]: index of task i's first tile
  int64_t total = 0;
  for (const GemmTask& g : tasks) {
    grids.push_back(TileGrid(g.m, g.n, g.k, /*min_tiles=*/1));
    first.push_back(total);
    total += grids.back().tiles();
  }
  first.push_back(total);
  Pool().ParallelFor(total, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const size_t i =
          static_cast<size_t>(std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1);
      const GemmTask& g = tasks[i];
      SgemmTile(grids[i], t - first[i], g.trans_a, g.trans_b, g.m, g.n, g.k, alpha, g.a, g.lda, g.b, g.ldb,
                beta, g.c, g.ldc);
    }
  });
}

void Sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
           int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const Grid g = TileGrid(m, n, k, kMinTiles);
  if (g.tiles() == 1 || k == 0) {
    SgemmOneThread(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  Pool().ParallelFor(g.tiles(), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      SgemmTile(g, t, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  });
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
    std::vector<GemmTask> tasks;
    for (int64_t i = 0; i < batch; ++i)
      tasks.push_back({trans_a, trans_b, m, n, k, pa + i * ra * ca, ca, pb + (i / ratio) * rb * cb, cb,
                       pc + i * m * n, n});
    RunGemmTasks(tasks, alpha, beta);
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
    std::vector<GemmTask> tasks;
    for (size_t e = 0; e + 1 < off.size(); ++e) {
      int64_t rows = off[e + 1] - off[e];
      if (rows == 0) continue;
      // trans_w: y_e = x_e W_e^T (W_e [P, Q] = [out, in]); else y_e = x_e W_e (W_e [P, Q] = [in, out]).
      tasks.push_back(
          {false, trans_w, rows, out, in, px + off[e] * in, in, pw + e * p * q, q, py + off[e] * out, out});
    }
    RunGemmTasks(tasks, alpha, beta);
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
    std::vector<GemmTask> tasks;
    for (size_t e = 0; e + 1 < off.size(); ++e) {
      int64_t rows = off[e + 1] - off[e];
      // rows == 0: the k == 0 path gives dw_e = beta * dw_e.
      tasks.push_back({true, false, p, q, rows, pdy + off[e] * p, p, px + off[e] * q, q, pdw + e * p * q, q});
    }
    RunGemmTasks(tasks, alpha, beta);
    return absl::OkStatus();
  });
}

}  // namespace moe::cpu
