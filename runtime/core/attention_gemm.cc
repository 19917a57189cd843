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
  return absl::InvalidArgumentError(
      absl::StrCat("MOE_ATTENTION=\"", name, "\": not an attention path; use \"fused\" or \"gemm\""));
}

absl::string_view AttentionPathName(AttentionPath path) {
  return path == AttentionPath::kGemm ? "gemm" : "fused";
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
  const int64_t per_row = 2 * std::max<int64_t>(sh.batch, 1) * seq * static_cast<int64_t>(sizeof(float));
  int64_t rows = std::max<int64_t>(workspace_bytes / per_row, 1);
  if (rows >= 64) rows = rows / 64 * 64;
  // At least kMinChunks chunks where the rows allow: a chunk of n rows computes the
  // masked half of its n x n diagonal block too, so the waste is about 1 / chunks.
  const int64_t target = std::max<int64_t>((seq + kMinChunks - 1) / kMinChunks + 63, 64) / 64 * 64;
  return std::min({rows, target, seq});
}

int64_t WorkspaceFloats(const Shape& sh, int64_t chunk, bool backward) {
  return (backward ? 2 : 1) * sh.batch * std::min(chunk, sh.seq) * sh.seq;
}

namespace {

// Strides of the [B, S, H, hd] and [B, S, Hkv, hd] tensors and the [B, H, S] rows.
struct Layout {
  int64_t q_ld, q_batch, kv_ld, kv_batch, group;
  explicit Layout(const Shape& sh)
      : q_ld(sh.heads * sh.head_dim),
        q_batch(sh.seq * sh.heads * sh.head_dim),
        kv_ld(sh.kv_heads * sh.head_dim),
        kv_batch(sh.seq * sh.kv_heads * sh.head_dim),
        group(sh.heads / sh.kv_heads) {}
  // Element offset of row i of head h (of batch 0) in a [B, S, H, hd] tensor.
  int64_t q_at(const Shape& sh, int64_t i, int64_t h) const { return i * q_ld + h * sh.head_dim; }
  int64_t kv_at(const Shape& sh, int64_t g) const { return g * sh.head_dim; }
};

// scores[b] (n x L) = alpha x[b, i0:i0+n, h] (n x hd) y[b, 0:L, g]^T (hd x L).
BatchedGemm RowsTimesKeysT(const Shape& sh, const Layout& l, const float* x, const float* y, float* scores,
                           int64_t i0, int64_t n, int64_t keys, int64_t h) {
  return BatchedGemm{false,
                     true,
                     n,
                     keys,
                     sh.head_dim,
                     1.0f,
                     x + l.q_at(sh, i0, h),
                     l.q_ld,
                     l.q_batch,
                     y + l.kv_at(sh, h / l.group),
                     l.kv_ld,
                     l.kv_batch,
                     0.0f,
                     scores,
                     keys,
                     n * keys,
                     sh.batch};
}

ScoreBlock Block(const Shape& sh, float* scores, int64_t i0, int64_t n, int64_t keys) {
  return ScoreBlock{scores, keys, n * keys, sh.batch, n, keys, i0, sh.heads * sh.seq};
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
    const int64_t n = std::min(chunk, sh.seq - i0), keys = i0 + n;
    for (int64_t h = 0; h < sh.heads; ++h) {
      // S = Q_c K^T; P = softmax(scale S) in place, lse kept.
      RETURN_IF_ERROR(e.Gemm(RowsTimesKeysT(sh, l, q, k, work, i0, n, keys, h)));
      RETURN_IF_ERROR(e.SoftmaxRows(Block(sh, work, i0, n, keys), scale, lse + h * sh.seq));
      // O_c = P V[0:L] (n x L times L x hd), straight into out's rows.
      RETURN_IF_ERROR(e.Gemm(BatchedGemm{false, false, n, sh.head_dim, keys, 1.0f, work, keys, n * keys,
                                         v + l.kv_at(sh, h / l.group), l.kv_ld, l.kv_batch, 0.0f,
                                         out + l.q_at(sh, i0, h), l.q_ld, l.q_batch, sh.batch}));
    }
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
  const int64_t block = sh.batch * std::min(chunk, sh.seq) * sh.seq;
  float* s = work;
  float* dp = work + block;
  for (int64_t i0 = 0; i0 < sh.seq; i0 += chunk) {
    const int64_t n = std::min(chunk, sh.seq - i0), keys = i0 + n;
    for (int64_t h = 0; h < sh.heads; ++h) {
      const int64_t g = h / l.group;
      RETURN_IF_ERROR(e.Gemm(RowsTimesKeysT(sh, l, q, k, s, i0, n, keys, h)));      // S = Q_c K^T
      RETURN_IF_ERROR(e.Gemm(RowsTimesKeysT(sh, l, dout, v, dp, i0, n, keys, h)));  // dP = dO_c V^T
      RETURN_IF_ERROR(
          e.SoftmaxBackwardRows(Block(sh, s, i0, n, keys), dp, scale, lse + h * sh.seq, delta + h * sh.seq));
      const float* q_c = q + l.q_at(sh, i0, h);
      const float* do_c = dout + l.q_at(sh, i0, h);
      // dV[0:L] += P^T dO_c and dK[0:L] += scale dS^T Q_c (L x n times n x hd).
      RETURN_IF_ERROR(
          e.Gemm(BatchedGemm{true, false, keys, sh.head_dim, n, 1.0f, s, keys, n * keys, do_c, l.q_ld,
                             l.q_batch, 1.0f, dv + l.kv_at(sh, g), l.kv_ld, l.kv_batch, sh.batch}));
      RETURN_IF_ERROR(
          e.Gemm(BatchedGemm{true, false, keys, sh.head_dim, n, scale, dp, keys, n * keys, q_c, l.q_ld,
                             l.q_batch, 1.0f, dk + l.kv_at(sh, g), l.kv_ld, l.kv_batch, sh.batch}));
      // dQ_c = scale dS K[0:L] (n x L times L x hd).
      RETURN_IF_ERROR(e.Gemm(BatchedGemm{false, false, n, sh.head_dim, keys, scale, dp, keys, n * keys,
                                         k + l.kv_at(sh, g), l.kv_ld, l.kv_batch, 0.0f,
                                         dq + l.q_at(sh, i0, h), l.q_ld, l.q_batch, sh.batch}));
    }
  }
  return absl::OkStatus();
}

}  // namespace moe::attn
