// PredictPeakMemory: the per-rank peak as a sum of documented terms.
//
// Notation (docs/model.md): B micro_batch, S seq_len, T = B*S tokens, d hidden,
// H heads, Hkv kv heads, hd = d/H, V vocab, L layers, E experts, k top_k,
// Fe expert ffn, F dense ffn, TP = parallel.tensor, EP = parallel.expert.
// Element sizes: indices i32 (4 bytes); f32 (4 bytes) for what is f32 in every
// precision (master parameters, gradients, optimizer state, rstd, attention lse,
// combine weights, logits [T,V] and their lse); the compute dtype `a` (4 bytes
// fp32, 2 bytes under train.precision bf16) for every other activation.
//
// train.precision bf16 adds:
//   parameters   the bf16 compute copy of every parameter (2 bytes per element)
//   head         dlogits are a bf16 [T,V] tensor beside the f32 logits during
//                the cross-entropy backward (in fp32 they overwrite the logits)
//   staging      the cpu backend stages bf16 operands through f32 copies for
//                the duration of one op (bf16_staging.h); the largest are in
//                the head: the cross-entropy backward writes dlogits through an
//                f32 [T,V], and the LM-head backward GEMM dh = dlogits W takes
//                f32 [T,V] + [V,d] + [T,d] once the logits are released. cuda
//                runs both on the bf16 tensors (stage_rows, stage_gemms false);
//                its staged ops (gemm-path attention, reductions) are a
//                layer's size.
//                The larger moment is the head working set.
//
// Persistent (allocated once, live during the whole step):
//   parameters   embed V*d (+ lm_head V*d if untied) + final norm d
//                + per layer: 2 norms 2d, attention (H*hd*d + 2*Hkv*hd*d + d*H*hd) / TP,
//                  dense MLP 3*F*d / TP, or MoE router E*d + experts 3*(E/EP)*Fe*d / ETP
//                  (ETP = TP with parallel.expert_tensor_parallel, else 1: replicated over TP)
//                  + shared expert 3*Fs*d / TP + its gate d (shared_expert_gate)
//   gradients    one per parameter element
//   optimizer    AdamW: 2 per parameter element (exp_avg, exp_avg_sq); SGD: 1 with momentum
//
// Activations kept from forward for backward, per layer (they are all live at
// the start of backward, which is where the peak is):
//   attention block: block input h [T,d], rstd [T], normed a [T,d],
//     q [T,H*hd], k, v [T,Hkv*hd] (after RoPE), the row log-sum-exp lse [B,H,S] (the
//     [S,S] probabilities are never stored: backward recomputes them tile by tile),
//     attention out o [T,H*hd]
//   MLP block: block input h [T,d], rstd [T], normed m [T,d], then
//     dense: gate, up, silu(gate)*up [T,F] each (/TP)
//     MoE (dispatched rows R = T*k, dropless and balanced in expectation; the
//       routing plan lives on the host): the router's scores [T,E] and lse [T]
//       (f32; the sigmoid router also keeps its logits [T,E]),
//       token index, row index and combine weights [R] (i32, i32, f32),
//       permuted tokens [R,d], gate, up, act [R,Fe] each (/TP), expert outputs [R,d];
//       a shared expert (Fs = model.moe.shared_expert_ffn_hidden_size) adds
//       gate, up, act [T,Fs] (/TP), and when gated its output [T,d], the gate
//       and its slope [T] (f32), its row index [T] and order [2T+1] (i32)
// Head: final-norm input [T,d], rstd [T], normed [T,d], logits [T,V], lse [T],
//   targets [T]. dlogits overwrite the logits.
// Backward working set: the head needs dhn and dh [T,d]; then logits, normed
// and lse are released, and each layer needs dh [T,d] in and out plus the
// larger of the MLP scratch (MoE: d expert-out [R,d], expert dx [R,d], dact
// [R,Fe] (SwiGLU backward in place over gate/up), the token gradient [T,d],
// and with a shared expert its dx [T,d], live through all of that after the
// shared expert's own scratch: dact [T,Fs], dx [T,d], gated dy*g [T,d];
// dense: dact [T,F], dx [T,d]) and the attention scratch (do, dq [T,H*hd],
// dk, dv [T,Hkv*hd], da [T,d]). Predicted peak = persistent + kept activations
// + max(head working set, layer working set - released head tensors).
// Transient forward buffers are smaller than that and are not added.
#include "runtime/core/memory_model.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace moe {

std::string MemoryPrediction::Report() const {
  std::string out;
  auto mib = [](int64_t b) { return static_cast<double>(b) / (1 << 20); };
  for (const MemoryTerm& t : terms)
    absl::StrAppendFormat(&out, "%-13s %10.3f MiB  %s\n", MemoryCategoryName(t.category), mib(t.bytes),
                          t.name);
  for (int c = 0; c < kNumMemoryCategories; ++c)
    if (bytes[c] > 0)
      absl::StrAppendFormat(&out, "total %-13s %10.3f MiB\n",
                            MemoryCategoryName(static_cast<MemoryCategory>(c)), mib(bytes[c]));
  absl::StrAppendFormat(&out, "predicted peak %10.3f MiB", mib(peak_bytes));
  return out;
}

absl::StatusOr<MemoryPrediction> PredictPeakMemory(const config::JobConfig& config) {
  const auto& m = config.model();
  const auto& moe = m.moe();
  const int64_t B = config.train().micro_batch(), S = m.seq_len(), T = B * S;
  const int64_t d = m.hidden_size(), H = m.num_heads(), Hkv = m.num_kv_heads();
  const int64_t V = m.vocab_size(), L = m.num_layers(), F = m.ffn_hidden_size();
  const int64_t E = moe.num_experts(), k = moe.top_k(), Fe = moe.expert_ffn_hidden_size();
  const int64_t tp = std::max<int64_t>(config.parallel().tensor(), 1);
  const int64_t ep = std::max<int64_t>(config.parallel().expert(), 1);
  for (auto [name, v] : {std::pair<const char*, int64_t>{"train.micro_batch", B},
                         {"model.seq_len", S},
                         {"model.hidden_size", d},
                         {"model.num_heads", H},
                         {"model.num_kv_heads", Hkv},
                         {"model.vocab_size", V},
                         {"model.num_layers", L}})
    if (v <= 0)
      return absl::InvalidArgumentError(absl::StrCat("PredictPeakMemory: ", name, " = ", v,
                                                     " must be positive (resolve the "
                                                     "config with ApplyDefaults first)"));
  if (E > 0 && E % ep != 0)
    return absl::InvalidArgumentError(absl::StrCat("PredictPeakMemory: parallel.expert = ", ep,
                                                   " must divide model.moe.num_experts = ", E));
  const bool bf16 = config.train().precision() == "bf16";
  const int64_t hd = d / H, R = T * k;
  const int64_t f = 4, a = bf16 ? 2 : 4;  // f32, and the compute dtype
  int num_moe = 0;
  for (int l = 0; l < L; ++l) num_moe += IsMoeLayer(m, l) ? 1 : 0;
  const int64_t num_dense = L - num_moe;

  MemoryPrediction p;
  // `bytes` of one element of the term (f or a).
  auto add = [&](MemoryCategory c, std::string name, int64_t elems, int64_t bytes = 4) {
    p.terms.push_back({std::move(name), c, elems * bytes});
    p.bytes[static_cast<int>(c)] += elems * bytes;
  };
  using MC = MemoryCategory;

  // Parameters.
  int64_t embed = V * d * (m.tie_word_embeddings() ? 1 : 2) + d;
  int64_t attn = 2 * d + (H * hd * d + 2 * Hkv * hd * d + d * H * hd) / tp;
  int64_t dense_mlp = 3 * F * d / tp;
  const int64_t etp = config.parallel().expert_tensor_parallel() ? tp : 1;
  int64_t moe_mlp = E * d + 3 * (E / ep) * Fe * d / etp;
  // The shared expert (sharded over TP like a dense MLP) and its gate [1, d].
  const int64_t Fs = std::max<int64_t>(moe.shared_expert_ffn_hidden_size(), 0);
  const bool gated = Fs > 0 && moe.shared_expert_gate();
  const int64_t shared_mlp = 3 * Fs * d / tp + (gated ? d : 0);
  int64_t params = embed + L * attn + num_dense * dense_mlp + num_moe * (moe_mlp + shared_mlp);
  add(MC::kParameters, "embed (+ untied lm_head) + final norm", embed);
  add(MC::kParameters, "attention + norms, all layers", L * attn);
  if (num_dense) add(MC::kParameters, "dense MLPs", num_dense * dense_mlp);
  if (num_moe) add(MC::kParameters, "MoE router + local experts", num_moe * moe_mlp);
  if (num_moe && Fs > 0) add(MC::kParameters, "MoE shared experts (+ gates)", num_moe * shared_mlp);
  if (bf16) add(MC::kParameters, "bf16 compute copies of the parameters", params, a);
  add(MC::kGradients, "one gradient per parameter", params);
  std::string opt = config.optim().type();
  if (opt == "sgd") {
    if (config.optim().momentum() > 0) add(MC::kOptimizer, "SGD momentum", params);
  } else {
    add(MC::kOptimizer, "AdamW exp_avg + exp_avg_sq", 2 * params);
  }

  // Activations kept for backward (bytes: compute-dtype elements * a + f32 elements * f).
  int64_t attn_act = a * (T * d + T * d + T * H * hd + 2 * T * Hkv * hd + T * H * hd) + f * (T + B * H * S);
  add(MC::kActivations, "attention blocks: h, rstd, a, q, k, v, lse [B,H,S], o", L * attn_act, 1);
  int64_t mlp_in = a * 2 * T * d + f * T;
  add(MC::kActivations, "MLP blocks: h, rstd, m", L * mlp_in, 1);
  if (num_dense) add(MC::kActivations, "dense MLPs: gate, up, act [T,F]", num_dense * 3 * T * F / tp, a);
  const int64_t router_act = f * ((moe.score_function() == "sigmoid" ? 2 : 1) * T * E + T);
  int64_t moe_act = router_act + f * 3 * R + a * (R * d + 3 * R * Fe / tp + R * d);
  if (num_moe)
    add(MC::kActivations,
        "MoE: router scores [T,E] + lse [T], token/row index + weights [R], x_perm [R,d], gate, up, act "
        "[R,Fe], "
        "expert out [R,d]",
        num_moe * moe_act, 1);
  // Shared expert: gate, up, act [T,Fs] (/TP); gated, its output [T,d], the
  // gate and its slope [T] (f32), the row index [T] and row order [2T+1] (i32).
  const int64_t shared_act = a * 3 * T * Fs / tp + (gated ? a * T * d + f * 2 * T + 4 * (3 * T + 1) : 0);
  if (num_moe && Fs > 0)
    add(MC::kActivations,
        gated
            ? "MoE shared experts: gate, up, act [T,Fs], output [T,d], gate + slope + rows [T], order [2T+1]"
            : "MoE shared experts: gate, up, act [T,Fs]",
        num_moe * shared_act, 1);
  const int64_t head_released = f * (T * V + T) + a * T * d;
  add(MC::kActivations, "head: final-norm in, rstd, normed, logits [T,V], lse, targets",
      a * T * d + f * T + head_released + f * T, 1);

  // Backward working set (bytes).
  int64_t moe_bwd = num_moe ? a * (2 * R * d + R * Fe / tp + T * d) : 0;
  if (num_moe && Fs > 0) {
    // The shared expert's backward runs first (dact [T,Fs], its dx [T,d], for
    // a gated one the scaled dy [T,d]) into dx_shared [T,d], which stays live
    // through the routed backward.
    const int64_t shared_bwd = a * (T * Fs / tp + T * d + (gated ? T * d : 0));
    moe_bwd = a * T * d + std::max(moe_bwd, shared_bwd);
  }
  int64_t dense_bwd = num_dense ? a * (T * F / tp + T * d) : 0;
  int64_t attn_bwd = a * (2 * T * H * hd + 2 * T * Hkv * hd + T * d);
  int64_t head_bwd = a * 2 * T * d;
  if (bf16) {
    // The cross-entropy backward: bf16 dlogits (and on cpu their f32 staging)
    // beside the logits; then the LM-head GEMM once the logits are gone (staged
    // on cpu only).
    const bool cpu = config.train().device() == "cpu";
    const int64_t ce_staging = cpu ? f * T * V : 0;
    const int64_t gemm_staging = cpu ? f * (T * V + V * d + T * d) : 0;
    head_bwd = std::max(a * T * V + ce_staging, a * T * V + a * 2 * T * d + gemm_staging - f * T * V);
  }
  int64_t layer_bwd = a * 2 * T * d + std::max({moe_bwd, dense_bwd, attn_bwd}) - head_released;
  add(MC::kActivations,
      bf16 ? "backward: max(head dlogits (bf16) + cpu f32 staging, dlogits + dhn + dh + cpu GEMM f32 staging "
             "- "
             "released logits, dh x2 + max(MLP, attention) scratch - released head)"
           : "backward: max(head dhn + dh, dh x2 + max(MLP, attention) scratch - released head)",
      std::max(head_bwd, layer_bwd), 1);

  for (int c = 0; c < kNumMemoryCategories; ++c) p.peak_bytes += p.bytes[c];
  return p;
}

}  // namespace moe
