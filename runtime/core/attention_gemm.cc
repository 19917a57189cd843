#include "runtime/core/attention_gemm.h"

#include <algorithm>
#include <cstdlib>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "runtime/core/logging.h"
#include "runtime/core/status.h"

namespace moe::attn {

absl::StatusOr<AttentionPath> ParseAttentionPath(absl::string_view name) {
  if (name == "fused") return AttentionPath::kFused;
  if (name == "gemm") return AttentionPath::kGemm;
  if (name == "flash") return AttentionPath::kFlash;
  return absl::InvalidArgumentError(absl::StrCat(
      "MOE_ATTENTION=\"", name, "\": not an attention path; use \"fused\", \"gemm\" or \"flash\""));
}

absl::string_view AttentionPathName(AttentionPath path) {
  switch (path) {
    case AttentionPath::kGemm:
      return "gemm";
    case AttentionPath::kFlash:
      return "flash";
    case AttentionPath::kFused:
      break;
  }
  return "fused";
}

absl::StatusOr<AttentionSettings> AttentionSettingsFromEnv() {
  AttentionSettings s;
  if (const char* v = std::getenv("MOE_ATTENTION"); v != nullptr && *v != '\0') {
    ASSIGN_OR_RETURN(s.path, ParseAttentionPath(v));
  }
  if (const char* v = std::getenv("MOE_ATTENTION_WORKSPACE_MB"); v != nullptr && *v != '\0') {
    int64_t mb = 0;
    if (!absl::SimpleAtoi(v, &mb) || mb < 1 || mb > (int64_t{1} << 20))
      return absl::InvalidArgumentError(absl::StrCat("MOE_ATTENTION_WORKSPACE_MB=\"", v,
                                                     "\": want a whole number of MiB from 1 to 1048576"));
    s.workspace_bytes = mb << 20;
  }
  return s;
}

namespace {
thread_local bool tf32_products = false;
}  // namespace

bool Tf32ProductsAllowed() { return tf32_products; }
Tf32ProductsScope::Tf32ProductsScope(bool allow) : saved_(tf32_products) { tf32_products = allow; }
Tf32ProductsScope::~Tf32ProductsScope() { tf32_products = saved_; }

AttentionSettings& AttentionSettingsRef() {
  static AttentionSettings settings = [] {
    absl::StatusOr<AttentionSettings> s = AttentionSettingsFromEnv();
    if (s.ok()) return *s;
    // moe-train refuses these at start-up (AttentionSettingsFromEnv); a test or
    // benchmark that reaches here keeps the defaults, loudly.
    MOE_LOG(ERROR) << s.status().message() << "; using the defaults";
    return AttentionSettings{};
  }();
  return settings;
}

int64_t ChunkRows(const Shape& sh, int64_t workspace_bytes) {
  const int64_t seq = std::max<int64_t>(sh.seq, 1);
  const int64_t per_row = 2 * std::max<int64_t>(sh.batch, 1) * std::max<int64_t>(sh.heads, 1) * seq *
                          static_cast<int64_t>(sizeof(float));
  int64_t rows = std::max<int64_t>(workspace_bytes / per_row, 1);
  if (rows >= 64) rows = rows / 64 * 64;
  // At least kMinChunks chunks where the rows allow: a chunk of n rows computes the
  // masked half of its n x n diagonal block too, so the waste is about 1 / chunks.
  const int64_t target = std::max<int64_t>((seq + kMinChunks - 1) / kMinChunks + 63, 64) / 64 * 64;
  return std::min({rows, target, seq});
}

bool OneStride(const Operand& x, int64_t batch, int64_t heads, int64_t* stride) {
  if (heads == 1) {
    *stride = x.stride;
    return true;
  }
  *stride = x.head_stride;
  return x.head_div == 1 && (batch == 1 || x.stride == heads * x.head_stride);
}

int64_t WorkspaceFloats(const Shape& sh, int64_t chunk, bool backward) {
  return (backward ? 2 : 1) * sh.batch * sh.heads * std::min(chunk, sh.seq) * sh.seq;
}

namespace {

// Strides of the [B, S, H, hd] and [B, S, Hkv, hd] tensors.
struct Layout {
  int64_t q_ld, q_batch, kv_ld, kv_batch, group;
  explicit Layout(const Shape& sh)
      : q_ld(sh.heads * sh.head_dim),
        q_batch(sh.seq * sh.heads * sh.head_dim),
        kv_ld(sh.kv_heads * sh.head_dim),
        kv_batch(sh.seq * sh.kv_heads * sh.head_dim),
        group(sh.heads / sh.kv_heads) {}
};

// One chunk of query rows [i0, i0 + n) against its keys [0, keys = i0 + n).
struct Chunk {
  int64_t i0, n, keys;
};

// Rows i0.. of a [B, S, H, hd] tensor, matrix (b, h) per query head h.
Operand QueryRows(const Shape& sh, const Layout& l, const float* x, const Chunk& c) {
  return Operand{x + c.i0 * l.q_ld, l.q_ld, l.q_batch, sh.head_dim, 1};
}
// The keys (or values) of query head h: KV head h / group of a [B, S, Hkv, hd] tensor.
Operand KeyRows(const Shape& sh, const Layout& l, const float* x) {
  return Operand{x, l.kv_ld, l.kv_batch, sh.head_dim, l.group};
}
// A [B, H, n, keys] score block, matrix (b, h).
Operand Scores(const Shape& sh, const float* s, const Chunk& c) {
  return Operand{s, c.keys, sh.heads * c.n * c.keys, c.n * c.keys, 1};
}

// scores[b, h] (n x keys) = x[b, i0:i0+n, h] (n x hd) y[b, 0:keys, h / group]^T.
BatchedGemm RowsTimesKeysT(const Shape& sh, const Layout& l, const float* x, const float* y, float* scores,
                           const Chunk& c) {
  return BatchedGemm{false,
                     true,
                     c.n,
                     c.keys,
                     sh.head_dim,
                     1.0f,
                     QueryRows(sh, l, x, c),
                     KeyRows(sh, l, y),
                     0.0f,
                     Scores(sh, scores, c),
                     sh.batch,
                     sh.heads};
}

// out[b, i0:i0+n, h] (n x hd) = alpha scores[b, h] (n x keys) y[b, 0:keys, h / group].
BatchedGemm ScoresTimesKeys(const Shape& sh, const Layout& l, const float* scores, const float* y,
                            float alpha, float* out, const Chunk& c) {
  return BatchedGemm{false,
                     false,
                     c.n,
                     sh.head_dim,
                     c.keys,
                     alpha,
                     Scores(sh, scores, c),
                     KeyRows(sh, l, y),
                     0.0f,
                     QueryRows(sh, l, out, c),
                     sh.batch,
                     sh.heads};
}

// For the heads h = g * group + e of member e of every KV group g:
// acc[b, 0:keys, g] (keys x hd) += alpha scores[b, h]^T (keys x n) x[b, i0:i0+n, h].
BatchedGemm ScoresTTimesRows(const Shape& sh, const Layout& l, const float* scores, const float* x,
                             float alpha, float* acc, const Chunk& c, int64_t e) {
  const Operand s = Scores(sh, scores, c), rows = QueryRows(sh, l, x, c);
  return BatchedGemm{
      true,
      false,
      c.keys,
      sh.head_dim,
      c.n,
      alpha,
      Operand{s.base + e * s.head_stride, s.ld, s.stride, l.group * s.head_stride, 1},
      Operand{rows.base + e * rows.head_stride, rows.ld, rows.stride, l.group * rows.head_stride, 1},
      1.0f,
      Operand{acc, l.kv_ld, l.kv_batch, sh.head_dim, 1},
      sh.batch,
      sh.kv_heads};
}

ScoreBlock Block(const Shape& sh, float* scores, const Chunk& c) {
  return ScoreBlock{scores, c.keys, c.n * c.keys, sh.batch * sh.heads, c.n, c.keys, c.i0, sh.seq};
}

absl::Status CheckShape(const Shape& sh, int64_t chunk) {
  if (sh.batch < 0 || sh.seq < 0 || sh.heads < 1 || sh.kv_heads < 1 || sh.head_dim < 1 ||
      sh.heads % sh.kv_heads != 0 || chunk < 1)
    return absl::InvalidArgumentError(absl::StrCat("gemm attention: bad shape B ", sh.batch, " S ", sh.seq,
                                                   " H ", sh.heads, " Hkv ", sh.kv_heads, " hd ", sh.head_dim,
                                                   " or chunk ", chunk));
  return absl::OkStatus();
}

}  // namespace

absl::Status Forward(Engine& e, const Shape& sh, const float* q, const float* k, const float* v, float scale,
                     float* out, float* lse, float* work, int64_t chunk) {
  RETURN_IF_ERROR(CheckShape(sh, chunk));
  const Layout l(sh);
  for (int64_t i0 = 0; i0 < sh.seq; i0 += chunk) {
    const int64_t n = std::min(chunk, sh.seq - i0);
    const Chunk c{i0, n, i0 + n};
    RETURN_IF_ERROR(e.Gemm(RowsTimesKeysT(sh, l, q, k, work, c)));           // S = Q_c K^T
    RETURN_IF_ERROR(e.SoftmaxRows(Block(sh, work, c), scale, lse));          // P = softmax(scale S), lse
    RETURN_IF_ERROR(e.Gemm(ScoresTimesKeys(sh, l, work, v, 1.0f, out, c)));  // O_c = P V
  }
  return absl::OkStatus();
}

absl::Status Backward(Engine& e, const Shape& sh, const float* q, const float* k, const float* v,
                      const float* out, const float* lse, float scale, const float* dout, float* dq,
                      float* dk, float* dv, float* delta, float* work, int64_t chunk) {
  RETURN_IF_ERROR(CheckShape(sh, chunk));
  const Layout l(sh);
  const int64_t kv_elems = sh.batch * l.kv_batch;
  RETURN_IF_ERROR(e.Zero(dk, kv_elems));
  RETURN_IF_ERROR(e.Zero(dv, kv_elems));
  RETURN_IF_ERROR(e.DeltaRows(sh, out, dout, delta));
  float* s = work;
  float* dp = work + sh.batch * sh.heads * std::min(chunk, sh.seq) * sh.seq;
  for (int64_t i0 = 0; i0 < sh.seq; i0 += chunk) {
    const int64_t n = std::min(chunk, sh.seq - i0);
    const Chunk c{i0, n, i0 + n};
    RETURN_IF_ERROR(e.Gemm(RowsTimesKeysT(sh, l, q, k, s, c)));                      // S = Q_c K^T
    RETURN_IF_ERROR(e.Gemm(RowsTimesKeysT(sh, l, dout, v, dp, c)));                  // dP = dO_c V^T
    RETURN_IF_ERROR(e.SoftmaxBackwardRows(Block(sh, s, c), dp, scale, lse, delta));  // P, dS
    // dV += P^T dO_c and dK += scale dS^T Q_c, the group's heads one after another.
    for (int64_t m = 0; m < l.group; ++m) {
      RETURN_IF_ERROR(e.Gemm(ScoresTTimesRows(sh, l, s, dout, 1.0f, dv, c, m)));
      RETURN_IF_ERROR(e.Gemm(ScoresTTimesRows(sh, l, dp, q, scale, dk, c, m)));
    }
    RETURN_IF_ERROR(e.Gemm(ScoresTimesKeys(sh, l, dp, k, scale, dq, c)));  // dQ_c = scale dS K
  }
  return absl::OkStatus();
}

}  // namespace moe::attn
