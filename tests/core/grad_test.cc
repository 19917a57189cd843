// Backward ops against central finite differences of their forward ops:
// loss(x) = sum(dy * f(x)) in double; d loss / d x_i = (loss(x + h e_i) -
// loss(x - h e_i)) / 2h at sampled elements, compared by relative norm.
#include <cmath>
#include <functional>
#include <random>

#include "runtime/core/status.h"
#include "tests/core/test_util.h"

namespace moe {
namespace {
using namespace moe::testing;

double Dot(const Tensor& a, const Tensor& b) {
  std::vector<float> va = Vec(a), vb = Vec(b);
  double s = 0;
  for (size_t i = 0; i < va.size(); ++i) s += double(va[i]) * vb[i];
  return s;
}

void CheckGrad(const Tensor& x, const Tensor& analytic, const std::function<double()>& loss,
               const std::string& what, double h = 1e-2, double tol = 2e-3) {
  REQUIRE(x.numel() == analytic.numel());
  std::mt19937 gen(42);
  int64_t n = x.numel();
  std::vector<int64_t> idx;
  if (n <= 48) {
    for (int64_t i = 0; i < n; ++i) idx.push_back(i);
  } else {
    for (int i = 0; i < 48; ++i) idx.push_back(gen() % n);
  }
  float* p = x.data<float>();
  const float* g = analytic.data<float>();
  double err2 = 0, ref2 = 0, worst = 0;
  int64_t worst_i = -1;
  double worst_fd = 0, worst_an = 0;
  for (int64_t i : idx) {
    float saved = p[i];
    p[i] = saved + static_cast<float>(h);
    double lp = loss();
    p[i] = saved - static_cast<float>(h);
    double lm = loss();
    p[i] = saved;
    double fd = (lp - lm) / (2 * h);
    double e = std::fabs(fd - g[i]);
    err2 += e * e;
    ref2 += fd * fd;
    if (e > worst) {
      worst = e;
      worst_i = i;
      worst_fd = fd;
      worst_an = g[i];
    }
  }
  double rel = std::sqrt(err2) / std::max(std::sqrt(ref2), 1e-6);
  INFO(what << ": relative error " << rel << "; worst element " << worst_i << " analytic " << worst_an
            << " finite-difference " << worst_fd);
  CHECK(rel < tol);
}

TEST_CASE("SiluBackward and SwiGLUBackward") {
  Tensor x = Random({5, 11}, 1, -3, 3), up = Random({5, 11}, 2, -2, 2), dy = Random({5, 11}, 3);
  Tensor y = NewF32({5, 11});
  auto loss_silu = [&] {
    REQUIRE(ops::Silu(S(), x, y).ok());
    return Dot(dy, y);
  };
  Tensor dx = Random({5, 11}, 4), dx0 = Clone(dx);
  REQUIRE(ops::SiluBackward(S(), x, dy, dx, 2.0f, 1.0f).ok());
  REQUIRE(ops::Axpby(S(), -1.0f, dx0, 1.0f, dx).ok());  // remove the beta term
  REQUIRE(ops::Scale(S(), dx, 0.5f, dx).ok());
  CheckGrad(x, dx, loss_silu, "silu");

  auto loss_swiglu = [&] {
    REQUIRE(ops::SwiGLU(S(), x, up, y).ok());
    return Dot(dy, y);
  };
  Tensor dg = NewF32({5, 11}), du = NewF32({5, 11});
  REQUIRE(ops::SwiGLUBackward(S(), x, up, dy, dg, du).ok());
  CheckGrad(x, dg, loss_swiglu, "swiglu dgate");
  CheckGrad(up, du, loss_swiglu, "swiglu dup");
}

TEST_CASE("Gemm and GroupedGemm backward") {
  std::vector<int64_t> off = {0, 4, 4, 11, 12};  // expert 1 has no tokens
  int64_t rows = 12, in = 6, out = 5, E = 4;
  Tensor x = Random({rows, in}, 1), w = Random({E, out, in}, 2), dy = Random({rows, out}, 3);
  Tensor y = NewF32({rows, out});
  auto loss = [&] {
    REQUIRE(ops::GroupedGemm(S(), x, w, true, y, off).ok());
    return Dot(dy, y);
  };
  Tensor dx = NewF32({rows, in}), dw = NewF32({E, out, in});
  REQUIRE(ops::GroupedGemm(S(), dy, w, false, dx, off).ok());
  REQUIRE(ops::GroupedGemmWeightGrad(S(), dy, x, dw, off).ok());
  CheckGrad(x, dx, loss, "grouped dX");
  CheckGrad(w, dw, loss, "grouped dW");
  std::vector<float> vdw = Vec(dw.Select(1));
  for (float f : vdw) CHECK(f == 0.0f);  // zero-token expert

  Tensor a = Random({7, 3}, 4), b = Random({5, 3}, 5), dc = Random({7, 5}, 6), c = NewF32({7, 5});
  auto loss2 = [&] {
    REQUIRE(ops::Gemm(S(), a, false, b, true, c).ok());
    return Dot(dc, c);
  };
  Tensor da = NewF32({7, 3}), db = NewF32({5, 3});
  REQUIRE(ops::Gemm(S(), dc, false, b, false, da).ok());
  REQUIRE(ops::Gemm(S(), dc, true, a, false, db).ok());
  CheckGrad(a, da, loss2, "gemm dA");
  CheckGrad(b, db, loss2, "gemm dB");
}

TEST_CASE("RmsNormBackward") {
  int64_t rows = 7, d = 13;
  Tensor x = Random({rows, d}, 1, -2, 2), w = Random({d}, 2, 0.5, 1.5), dy = Random({rows, d}, 3);
  Tensor y = NewF32({rows, d}), rstd = NewF32({rows});
  auto loss = [&] {
    REQUIRE(ops::RmsNorm(S(), x, w, 1e-5f, y, rstd).ok());
    return Dot(dy, y);
  };
  loss();
  Tensor dx = NewF32({rows, d}), dw = Random({d}, 4), dw0 = Clone(dw);
  REQUIRE(ops::RmsNormBackward(S(), x, w, rstd, dy, dx, dw).ok());
  REQUIRE(ops::Axpby(S(), -1.0f, dw0, 1.0f, dw).ok());  // dweight accumulates
  CheckGrad(x, dx, loss, "rmsnorm dx");
  CheckGrad(w, dw, loss, "rmsnorm dweight");
  // accumulate_dx adds.
  Tensor dx2 = Clone(dx);
  REQUIRE(ops::RmsNormBackward(S(), x, w, rstd, dy, dx2, dw, true).ok());
  REQUIRE(ops::Scale(S(), dx, 2.0f, dx).ok());
  ExpectClose(dx2, Vd(dx), 1e-6, 1e-7, "accumulate");
}

TEST_CASE("RopeBackward") {
  Tensor x = Random({2, 3, 2, 8}, 1), dy = Random({2, 3, 2, 8}, 2), y = NewF32({2, 3, 2, 8});
  auto loss = [&] {
    REQUIRE(ops::Rope(S(), x, y, 500.0).ok());
    return Dot(dy, y);
  };
  Tensor dx = NewF32({2, 3, 2, 8});
  REQUIRE(ops::RopeBackward(S(), dy, dx, 500.0).ok());
  CheckGrad(x, dx, loss, "rope");
}

// Finite differences of attention's dq, dk, dv at (B, S, H, Hkv, hd), on whichever
// path is set.
void CheckAttentionGrad(int64_t B, int64_t L, int64_t H, int64_t Hkv, int64_t hd, const char* what) {
  INFO(what << ": B " << B << " S " << L << " H " << H << " Hkv " << Hkv << " hd " << hd);
  Tensor q = Random({B, L, H, hd}, 1), k = Random({B, L, Hkv, hd}, 2), v = Random({B, L, Hkv, hd}, 3),
         dy = Random({B, L, H, hd}, 4);
  Tensor out = NewF32({B, L, H, hd}), lse = NewF32({B, H, L});
  const float scale = 0.5f;
  auto loss = [&] {
    REQUIRE(ops::CausalAttention(S(), q, k, v, scale, out, lse).ok());
    return Dot(dy, out);
  };
  loss();
  Tensor dq = NewF32({B, L, H, hd}), dk = NewF32({B, L, Hkv, hd}), dv = NewF32({B, L, Hkv, hd});
  REQUIRE(ops::CausalAttentionBackward(S(), q, k, v, out, lse, scale, dy, dq, dk, dv).ok());
  CheckGrad(q, dq, loss, "attention dq");
  CheckGrad(k, dk, loss, "attention dk");
  CheckGrad(v, dv, loss, "attention dv");
}

TEST_CASE("CausalAttentionBackward with GQA") {
  // One tile, then several 64 x 64 tiles with partial last ones; head_dim 32 runs
  // the 16-float vector paths with no scalar tail.
  struct Case {
    int64_t B, L, H, Hkv, hd;
  };
  for (Case c : {Case{2, 6, 4, 2, 4}, Case{2, 6, 2, 2, 4}, Case{2, 6, 3, 1, 4}, Case{1, 70, 2, 1, 6},
                 Case{1, 140, 2, 2, 5}, Case{1, 100, 4, 2, 32}})
    CheckAttentionGrad(c.B, c.L, c.H, c.Hkv, c.hd, "fused");
}

TEST_CASE("CausalAttentionBackward on the gemm path, in chunks") {
  // attention_gemm.h's driver on the CPU: chunks of 3 and 7 rows (not dividing S),
  // grouped KV heads, and one chunk of the whole sequence.
  struct Case {
    int64_t B, L, H, Hkv, hd, chunk;
  };
  for (Case c : {Case{2, 10, 4, 2, 4, 3}, Case{1, 23, 3, 1, 6, 7}, Case{2, 9, 2, 2, 5, 9}}) {
    GemmAttentionScope gemm(c.chunk, c.B, c.H, c.L);
    CheckAttentionGrad(c.B, c.L, c.H, c.Hkv, c.hd, "gemm");
  }
}

TEST_CASE("SoftmaxBackward and CrossEntropyBackward") {
  int64_t T = 6, V = 11;
  Tensor x = Random({T, V}, 1, -3, 3), dy = Random({T, V}, 2), y = NewF32({T, V});
  auto loss = [&] {
    REQUIRE(ops::Softmax(S(), x, y).ok());
    return Dot(dy, y);
  };
  loss();
  Tensor dx = NewF32({T, V});
  REQUIRE(ops::SoftmaxBackward(S(), y, dy, dx).ok());
  CheckGrad(x, dx, loss, "softmax");

  Tensor targets = FromVecI32({T}, {3, 0, 10, -1, 5, 5});
  Tensor dloss = Random({T}, 3), losses = NewF32({T}), lse = NewF32({T});
  float scale = 1.0f / 5;
  auto ce = [&] {
    REQUIRE(ops::CrossEntropy(S(), x, targets, losses, lse).ok());
    return scale * Dot(dloss, losses);
  };
  ce();
  Tensor dl = NewF32({T, V});
  REQUIRE(ops::CrossEntropyBackward(S(), x, targets, lse, dloss, scale, dl).ok());
  CheckGrad(x, dl, ce, "cross-entropy");
  for (int64_t c = 0; c < V; ++c) CHECK(dl.data<float>()[3 * V + c] == 0.0f);  // ignored
  // In place on the logits, no dloss (= ones).
  Tensor x2 = Clone(x), ones = NewF32({T});
  REQUIRE(ops::Fill(S(), ones, 1.0).ok());
  REQUIRE(ops::CrossEntropyBackward(S(), x, targets, lse, ones, scale, dl).ok());
  REQUIRE(ops::CrossEntropyBackward(S(), x2, targets, lse, Tensor(), scale, x2).ok());
  ExpectEqual(x2, dl, "in place");
}

TEST_CASE("Weighted scatter-add: gradients by GatherRows and GatherRowDot") {
  int64_t N = 5, M = 8, d = 6;
  Tensor src = Random({M, d}, 1), w = Random({M}, 2), dy = Random({N, d}, 3);
  Tensor idx = FromVecI32({M}, {4, 0, 0, 2, 3, 4, 1, 0});
  Tensor y = NewF32({N, d});
  auto loss = [&] {
    REQUIRE(ops::Fill(S(), y, 0.0).ok());
    REQUIRE(ops::ScatterAddRows(S(), src, idx, y, w).ok());
    return Dot(dy, y);
  };
  Tensor dw = NewF32({M}), dsrc = NewF32({M, d});
  REQUIRE(ops::GatherRowDot(S(), dy, idx, src, dw).ok());
  // dsrc[i] = w[i] * dy[idx[i]]: the weighted gather (the dispatchers' CombineBackward).
  REQUIRE(ops::GatherRows(S(), dy, idx, dsrc, w).ok());
  CheckGrad(w, dw, loss, "combine weights");
  CheckGrad(src, dsrc, loss, "scattered rows");
}

}  // namespace
}  // namespace moe
