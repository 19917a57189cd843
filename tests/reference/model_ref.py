#!/usr/bin/python3
"""Independent float64 NumPy reference of the model in docs/model.md.

Written from the math alone (no code shared with the C++ runtime): forward of the
Mixtral-family decoder (embedding, RMSNorm, GQA attention with rotate-half RoPE and a
causal mask, dense SwiGLU layers, MoE layers every moe_layer_freq with a top-k softmax
router, norm_topk_prob, capacity with the "probs" and "position" drop policies or
dropless, Switch load-balancing loss and router z-loss, tied or untied LM head,
mean cross-entropy) and its backward derived by hand (NumPy has no autograd).

  model_ref.py --check            finite-difference check of every gradient (float64)
  model_ref.py --write DIR        writes DIR/model_ref_<name>.h5 for each tiny config

Fixture layout (HDF5), read by tests/model/reference_test.cc:
  root attributes      the config, under config.proto's field names
  tokens               int32 [B, S+1]
  param/<name>         every parameter, canonical docs/model.md name and global shape (float32;
                       the values are float32-exact, so the C++ run uses the same numbers)
  grad/<name>          d loss / d param, float32 (computed in float64)
  logits               float32 [B, S, V]
  loss/ce, loss/aux, loss/z, loss/total   float64 scalars (aux and z summed over MoE layers)
  moe/<l>/tokens_per_expert   int64 [E], kept assignments per expert (after capacity)
  moe/<l>/selected_per_expert int64 [E], assignments before capacity
"""
import argparse
import math
import os
import sys

import numpy as np

# ----------------------------------------------------------------------------- configs

BASE = dict(norm_eps=1e-5, rope_theta=10000.0, norm_topk_prob=True,
            capacity_factor=0.0, drop_policy="probs", tie_word_embeddings=False,
            aux_loss_coeff=0.1, z_loss_coeff=0.01)

CONFIGS = {
    # Untied head, dropless, MoE every second layer (layer 1 is MoE, layer 0 dense).
    "untied_dropless": dict(BASE, vocab_size=37, hidden_size=16, num_layers=2, num_heads=4,
                            num_kv_heads=2, ffn_hidden_size=20, num_experts=4, top_k=2,
                            expert_ffn_hidden_size=12, moe_layer_freq=2, seq_len=7,
                            micro_batch=2, seed=11),
    # Tied head, every layer MoE, capacity 1.0 with the "probs" drop policy.
    "tied_capacity_probs": dict(BASE, vocab_size=29, hidden_size=12, num_layers=2,
                                num_heads=3, num_kv_heads=1, ffn_hidden_size=20,
                                num_experts=4, top_k=2, expert_ffn_hidden_size=10,
                                moe_layer_freq=1, seq_len=6, micro_batch=2,
                                capacity_factor=1.0, drop_policy="probs",
                                tie_word_embeddings=True, seed=22),
    # k = E, no renormalisation, capacity 0.75 with the "position" drop policy, 3 layers
    # with MoE at l % 2 == 1, T = 15 not divisible by E.
    "position_k_eq_e": dict(BASE, vocab_size=19, hidden_size=8, num_layers=3, num_heads=2,
                            num_kv_heads=1, ffn_hidden_size=16, num_experts=3, top_k=3,
                            expert_ffn_hidden_size=8, moe_layer_freq=2, seq_len=5,
                            micro_batch=3, capacity_factor=0.75, drop_policy="position",
                            norm_topk_prob=False, seed=33),
}


def is_moe(cfg, l):
    n = cfg["moe_layer_freq"]
    return l % n == n - 1


def param_shapes(cfg):
    """Canonical names and global shapes, in docs/model.md order."""
    V, d, L = cfg["vocab_size"], cfg["hidden_size"], cfg["num_layers"]
    H, Hkv = cfg["num_heads"], cfg["num_kv_heads"]
    hd = d // H
    F, E, Fe = cfg["ffn_hidden_size"], cfg["num_experts"], cfg["expert_ffn_hidden_size"]
    out = [("model.embed_tokens.weight", (V, d))]
    for l in range(L):
        p = f"model.layers.{l}."
        out += [(p + "input_layernorm.weight", (d,)),
                (p + "self_attn.q_proj.weight", (H * hd, d)),
                (p + "self_attn.k_proj.weight", (Hkv * hd, d)),
                (p + "self_attn.v_proj.weight", (Hkv * hd, d)),
                (p + "self_attn.o_proj.weight", (d, H * hd)),
                (p + "post_attention_layernorm.weight", (d,))]
        if is_moe(cfg, l):
            out += [(p + "mlp.router.weight", (E, d)),
                    (p + "mlp.experts.gate_proj", (E, Fe, d)),
                    (p + "mlp.experts.up_proj", (E, Fe, d)),
                    (p + "mlp.experts.down_proj", (E, d, Fe))]
        else:
            out += [(p + "mlp.gate_proj.weight", (F, d)),
                    (p + "mlp.up_proj.weight", (F, d)),
                    (p + "mlp.down_proj.weight", (d, F))]
    out.append(("model.norm.weight", (d,)))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (V, d)))
    return out


def draw_params(cfg, rng):
    """Random float32-exact parameters, larger than the training init so that every
    term (attention pattern, routing, aux/z losses) has a visible gradient."""
    params = {}
    for name, shape in param_shapes(cfg):
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            x = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name.endswith("router.weight"):
            x = 1.0 * rng.standard_normal(shape)
        elif name == "model.embed_tokens.weight" or name == "lm_head.weight":
            x = 0.5 * rng.standard_normal(shape)
        else:
            x = rng.standard_normal(shape) / math.sqrt(shape[-1])
        params[name] = x.astype(np.float32).astype(np.float64)
    return params

# ----------------------------------------------------------------------------- pieces


def rmsnorm_fwd(x, g, eps):
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * r * g, (x, r, g)


def rmsnorm_bwd(dy, cache):
    x, r, g = cache
    dg = np.sum(dy * x * r, axis=tuple(range(dy.ndim - 1)))
    dxh = dy * g
    dx = r * dxh - x * r ** 3 * np.mean(dxh * x, axis=-1, keepdims=True)
    return dx, dg


def rope_tables(S, hd, theta):
    j = np.arange(hd // 2, dtype=np.float64)
    inv_freq = theta ** (-2.0 * j / hd)
    ang = np.arange(S, dtype=np.float64)[:, None] * inv_freq[None, :]
    ang = np.concatenate([ang, ang], axis=-1)  # [S, hd]
    return np.cos(ang), np.sin(ang)


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def rotate_half_t(g):  # transpose of rotate_half: [g1, g2] -> [g2, -g1]
    h = g.shape[-1] // 2
    return np.concatenate([g[..., h:], -g[..., :h]], axis=-1)


def rope_fwd(x, cos, sin):  # x [B, S, nh, hd]
    return x * cos[None, :, None, :] + rotate_half(x) * sin[None, :, None, :]


def rope_bwd(dy, cos, sin):
    return dy * cos[None, :, None, :] + rotate_half_t(dy * sin[None, :, None, :])


def softmax(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def attention_fwd(a, Wq, Wk, Wv, Wo, cfg, B, S):
    d, H, Hkv = cfg["hidden_size"], cfg["num_heads"], cfg["num_kv_heads"]
    hd, rep = d // H, H // Hkv
    q = (a @ Wq.T).reshape(B, S, H, hd)
    k = (a @ Wk.T).reshape(B, S, Hkv, hd)
    v = (a @ Wv.T).reshape(B, S, Hkv, hd)
    cos, sin = rope_tables(S, hd, cfg["rope_theta"])
    qr, kr = rope_fwd(q, cos, sin), rope_fwd(k, cos, sin)
    kre = np.repeat(kr, rep, axis=2)  # query head j reads kv head j // rep
    ve = np.repeat(v, rep, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", qr, kre) / math.sqrt(hd)
    mask = np.triu(np.ones((S, S), dtype=bool), 1)
    s = np.where(mask[None, None], -np.inf, s)
    P = softmax(s, -1)
    o = np.einsum("bhqk,bkhd->bqhd", P, ve).reshape(B * S, H * hd)
    out = o @ Wo.T
    return out, (a, Wq, Wk, Wv, Wo, qr, kre, ve, P, o, cos, sin, B, S, H, Hkv, hd, rep)


def attention_bwd(dout, cache):
    a, Wq, Wk, Wv, Wo, qr, kre, ve, P, o, cos, sin, B, S, H, Hkv, hd, rep = cache
    dWo = dout.T @ o
    do = (dout @ Wo).reshape(B, S, H, hd)
    dP = np.einsum("bqhd,bkhd->bhqk", do, ve)
    dve = np.einsum("bhqk,bqhd->bkhd", P, do)
    ds = P * (dP - np.sum(dP * P, axis=-1, keepdims=True)) / math.sqrt(hd)
    dqr = np.einsum("bhqk,bkhd->bqhd", ds, kre)
    dkre = np.einsum("bhqk,bqhd->bkhd", ds, qr)
    dkr = dkre.reshape(B, S, Hkv, rep, hd).sum(axis=3)
    dv = dve.reshape(B, S, Hkv, rep, hd).sum(axis=3)
    dq = rope_bwd(dqr, cos, sin).reshape(B * S, H * hd)
    dk = rope_bwd(dkr, cos, sin).reshape(B * S, Hkv * hd)
    dv = dv.reshape(B * S, Hkv * hd)
    da = dq @ Wq + dk @ Wk + dv @ Wv
    return da, dq.T @ a, dk.T @ a, dv.T @ a, dWo


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def swiglu_fwd(x, Wg, Wu, Wd):
    g = x @ Wg.T
    u = x @ Wu.T
    sg = sigmoid(g)
    act = g * sg * u
    return act @ Wd.T, (x, Wg, Wu, Wd, g, u, sg, act)


def swiglu_bwd(dy, cache):
    x, Wg, Wu, Wd, g, u, sg, act = cache
    dWd = dy.T @ act
    dact = dy @ Wd
    du = dact * g * sg
    dg = dact * u * sg * (1.0 + g * (1.0 - sg))
    return dg @ Wg + du @ Wu, dg.T @ x, du.T @ x, dWd


def route(p, cfg):
    """Top-k (ties to the lower expert index), weights, capacity. Returns (sel [T,k],
    w [T,k], keep [T,k] bool, ps [T,k], ssum [T])."""
    T, E = p.shape
    k = cfg["top_k"]
    sel = np.argsort(-p, axis=1, kind="stable")[:, :k]  # stable: equal p keep index order
    ps = np.take_along_axis(p, sel, axis=1)
    ssum = ps.sum(axis=1)
    w = ps / ssum[:, None] if cfg["norm_topk_prob"] else ps.copy()
    keep = np.ones((T, k), dtype=bool)
    c = cfg["capacity_factor"]
    if c > 0:
        cap = math.ceil(c * T * k / E)
        for e in range(E):
            ts, slots = np.nonzero(sel == e)  # ascending t; a token picks e at most once
            idx = list(range(len(ts)))
            if cfg["drop_policy"] == "probs":
                idx.sort(key=lambda i: (-w[ts[i], slots[i]], ts[i]))
            elif cfg["drop_policy"] == "position":
                idx.sort(key=lambda i: ts[i])
            else:
                raise ValueError(cfg["drop_policy"])
            for i in idx[cap:]:
                keep[ts[i], slots[i]] = False
    return sel, w, keep, ps, ssum


def logsumexp(z):
    m = np.max(z, axis=1)
    return m + np.log(np.sum(np.exp(z - m[:, None]), axis=1))


def moe_fwd(x, Wr, Wg, Wu, Wd, cfg):
    T = x.shape[0]
    E, k = cfg["num_experts"], cfg["top_k"]
    z = x @ Wr.T
    p = softmax(z, 1)
    sel, w, keep, ps, ssum = route(p, cfg)
    y = np.zeros_like(x)
    experts = []
    for e in range(E):
        ts, slots = np.nonzero((sel == e) & keep)
        out, c = swiglu_fwd(x[ts], Wg[e], Wu[e], Wd[e])
        y[ts] += w[ts, slots][:, None] * out
        experts.append((ts, slots, out, c))
    f = np.array([(sel == e).sum() for e in range(E)], dtype=np.float64) / (T * k)
    Pm = p.mean(axis=0)
    aux = cfg["aux_loss_coeff"] * E * np.sum(f * Pm)
    lse = logsumexp(z)
    zl = cfg["z_loss_coeff"] * np.mean(lse ** 2)
    stats = dict(kept=np.array([len(ex[0]) for ex in experts], dtype=np.int64),
                 selected=np.array([(sel == e).sum() for e in range(E)], dtype=np.int64))
    return y, aux, zl, (x, Wr, z, p, sel, w, keep, ps, ssum, experts, f, lse, stats)


def moe_bwd(dy, daux, dzl, cache, cfg):
    x, Wr, z, p, sel, w, keep, ps, ssum, experts, f, lse, _ = cache
    T, E = p.shape
    dx = np.zeros_like(x)
    dw = np.zeros_like(w)
    dWg, dWu, dWd = [], [], []
    for e, (ts, slots, out, c) in enumerate(experts):
        dw[ts, slots] = np.sum(dy[ts] * out, axis=1)
        dxe, g1, g2, g3 = swiglu_bwd(dy[ts] * w[ts, slots][:, None], c)
        np.add.at(dx, ts, dxe)
        dWg.append(g1), dWu.append(g2), dWd.append(g3)
    if cfg["norm_topk_prob"]:
        dps = dw / ssum[:, None] - (np.sum(dw * ps, axis=1) / ssum ** 2)[:, None]
    else:
        dps = dw
    dp = np.zeros_like(p)
    np.put_along_axis(dp, sel, dps, axis=1)  # the k selected experts are distinct
    dp += daux * cfg["aux_loss_coeff"] * E * f[None, :] / T
    dz = p * (dp - np.sum(dp * p, axis=1, keepdims=True))
    dz += dzl * cfg["z_loss_coeff"] * 2.0 / T * lse[:, None] * p
    dx += dz @ Wr
    return dx, dz.T @ x, np.stack(dWg), np.stack(dWu), np.stack(dWd)

# ----------------------------------------------------------------------------- model


def forward(params, tokens, cfg):
    B, S1 = tokens.shape
    S = S1 - 1
    T = B * S
    inp, tgt = tokens[:, :S].reshape(T), tokens[:, 1:].reshape(T)
    eps = cfg["norm_eps"]
    emb = params["model.embed_tokens.weight"]
    h = emb[inp]
    layers = []
    aux_total, z_total = 0.0, 0.0
    moe_stats = {}
    for l in range(cfg["num_layers"]):
        pre = f"model.layers.{l}."
        a, c1 = rmsnorm_fwd(h, params[pre + "input_layernorm.weight"], eps)
        att, c2 = attention_fwd(a, params[pre + "self_attn.q_proj.weight"],
                                params[pre + "self_attn.k_proj.weight"],
                                params[pre + "self_attn.v_proj.weight"],
                                params[pre + "self_attn.o_proj.weight"], cfg, B, S)
        h = h + att
        m, c3 = rmsnorm_fwd(h, params[pre + "post_attention_layernorm.weight"], eps)
        if is_moe(cfg, l):
            y, aux, zl, c4 = moe_fwd(m, params[pre + "mlp.router.weight"],
                                     params[pre + "mlp.experts.gate_proj"],
                                     params[pre + "mlp.experts.up_proj"],
                                     params[pre + "mlp.experts.down_proj"], cfg)
            aux_total += aux
            z_total += zl
            moe_stats[l] = dict(c4[-1], aux=aux, z=zl, p=c4[3], w=c4[5], sel=c4[4])
        else:
            y, c4 = swiglu_fwd(m, params[pre + "mlp.gate_proj.weight"],
                               params[pre + "mlp.up_proj.weight"],
                               params[pre + "mlp.down_proj.weight"])
        h = h + y
        layers.append((c1, c2, c3, c4))
    hn, cn = rmsnorm_fwd(h, params["model.norm.weight"], eps)
    head = emb if cfg["tie_word_embeddings"] else params["lm_head.weight"]
    logits = hn @ head.T
    lp = logits - logsumexp(logits)[:, None]
    ce = -np.mean(lp[np.arange(T), tgt])
    parts = dict(ce=ce, aux=aux_total, z=z_total, loss=ce + aux_total + z_total)
    cache = (inp, tgt, layers, hn, cn, head, logits, B, S, T)
    return parts, logits.reshape(B, S, -1), moe_stats, cache


def backward(params, cache, cfg, w_ce=1.0, w_aux=1.0, w_z=1.0):
    """Gradients of w_ce * ce + w_aux * sum(aux) + w_z * sum(z) for every parameter."""
    inp, tgt, layers, hn, cn, head, logits, B, S, T = cache
    grads = {name: np.zeros(shape) for name, shape in param_shapes(cfg)}
    dlogits = softmax(logits, 1)
    dlogits[np.arange(T), tgt] -= 1.0
    dlogits *= w_ce / T
    dhead = dlogits.T @ hn
    if cfg["tie_word_embeddings"]:
        grads["model.embed_tokens.weight"] += dhead
    else:
        grads["lm_head.weight"] += dhead
    dh, grads["model.norm.weight"] = rmsnorm_bwd(dlogits @ head, cn)
    for l in reversed(range(cfg["num_layers"])):
        pre = f"model.layers.{l}."
        c1, c2, c3, c4 = layers[l]
        if is_moe(cfg, l):
            dm, dWr, dWg, dWu, dWd = moe_bwd(dh, w_aux, w_z, c4, cfg)
            grads[pre + "mlp.router.weight"] = dWr
            grads[pre + "mlp.experts.gate_proj"] = dWg
            grads[pre + "mlp.experts.up_proj"] = dWu
            grads[pre + "mlp.experts.down_proj"] = dWd
        else:
            dm, dWg, dWu, dWd = swiglu_bwd(dh, c4)
            grads[pre + "mlp.gate_proj.weight"] = dWg
            grads[pre + "mlp.up_proj.weight"] = dWu
            grads[pre + "mlp.down_proj.weight"] = dWd
        dx, grads[pre + "post_attention_layernorm.weight"] = rmsnorm_bwd(dm, c3)
        dh = dh + dx
        da, dWq, dWk, dWv, dWo = attention_bwd(dh, c2)
        grads[pre + "self_attn.q_proj.weight"] = dWq
        grads[pre + "self_attn.k_proj.weight"] = dWk
        grads[pre + "self_attn.v_proj.weight"] = dWv
        grads[pre + "self_attn.o_proj.weight"] = dWo
        dx, grads[pre + "input_layernorm.weight"] = rmsnorm_bwd(da, c1)
        dh = dh + dx
    np.add.at(grads["model.embed_tokens.weight"], inp, dh)
    return grads

# ----------------------------------------------------------------------------- checks


def routing_margins(cfg, moe_stats):
    """Smallest gap that a float32 run could flip: between the k-th and (k+1)-th
    probability of a token, and between the weights either side of a capacity cut
    ("probs" policy). Exact ties never occur with random parameters."""
    k, E = cfg["top_k"], cfg["num_experts"]
    gap = np.inf
    for st in moe_stats.values():
        ps = np.sort(st["p"], axis=1)[:, ::-1]
        if k < E:
            gap = min(gap, float(np.min(ps[:, k - 1] - ps[:, k])))
        if cfg["capacity_factor"] > 0 and cfg["drop_policy"] == "probs":
            sel, w = st["sel"], st["w"]
            for e in range(E):
                we = np.sort(w[sel == e])[::-1]
                T = sel.shape[0]
                cap = math.ceil(cfg["capacity_factor"] * T * k / E)
                if len(we) > cap:
                    gap = min(gap, float(we[cap - 1] - we[cap]))
    return gap


def make_case(cfg):
    rng = np.random.default_rng(cfg["seed"])
    for _ in range(100):
        params = draw_params(cfg, rng)
        tokens = rng.integers(0, cfg["vocab_size"],
                              size=(cfg["micro_batch"], cfg["seq_len"] + 1)).astype(np.int32)
        parts, logits, stats, cache = forward(params, tokens, cfg)
        dropped = sum(int(s["selected"].sum() - s["kept"].sum()) for s in stats.values())
        if routing_margins(cfg, stats) < 2e-3:
            continue
        if cfg["capacity_factor"] > 0 and dropped == 0:
            continue
        return params, tokens, parts, logits, stats, cache
    raise RuntimeError("no parameter draw with safe routing margins")


def check(cfg, name, max_per_tensor, rng):
    params, tokens, _, _, stats, _ = make_case(cfg)
    worst = 0.0
    for weights in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 1.0)):
        _, _, _, cache = forward(params, tokens, cfg)
        grads = backward(params, cache, cfg, *weights)

        def loss_of(p):
            parts = forward(p, tokens, cfg)[0]
            return weights[0] * parts["ce"] + weights[1] * parts["aux"] + weights[2] * parts["z"]

        for pname, shape in param_shapes(cfg):
            n = int(np.prod(shape))
            idx = np.arange(n) if n <= max_per_tensor else rng.choice(n, max_per_tensor, False)
            x = params[pname].reshape(-1)
            g = grads[pname].reshape(-1)
            gmax = np.max(np.abs(grads[pname])) + 1e-12
            for i in idx:
                h = 1e-5
                old = x[i]
                x[i] = old + h
                lp = loss_of(params)
                x[i] = old - h
                lm = loss_of(params)
                x[i] = old
                fd = (lp - lm) / (2 * h)
                # Central differences in float64: truncation O(h^2) ~ 1e-10, rounding
                # ~ 1e-16 / 1e-5 = 1e-11; relative to the element, floored at 1e-3 of
                # the tensor's largest gradient.
                # An absolute floor of 1e-9 covers gradients that are exactly zero
                # (aux with k = E is constant: every f_e = 1/E).
                scale = max(abs(g[i]), 1e-3 * gmax)
                err = abs(fd - g[i]) / scale
                if scale > 1e-6:
                    worst = max(worst, err)
                if abs(fd - g[i]) > 1e-5 * scale + 1e-9:
                    print(f"[{name}] weights={weights} {pname}[{i}]: analytic {g[i]:.10g} "
                          f"fd {fd:.10g} rel err {err:.3g}")
                    return False
    dropped = {l: int(s["selected"].sum() - s["kept"].sum()) for l, s in stats.items()}
    print(f"[{name}] gradient check OK, worst relative error {worst:.3g}; dropped per MoE "
          f"layer {dropped}")
    return True


def write(cfg, name, out_dir):
    import h5py
    params, tokens, parts, logits, stats, cache = make_case(cfg)
    grads = backward(params, cache, cfg)
    path = os.path.join(out_dir, f"model_ref_{name}.h5")
    with h5py.File(path, "w", libver=("v110", "v110")) as f:
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                    "ffn_hidden_size", "seq_len", "micro_batch", "num_experts", "top_k",
                    "expert_ffn_hidden_size", "moe_layer_freq"):
            f.attrs[key] = np.int64(cfg[key])
        for key in ("norm_eps", "rope_theta", "capacity_factor", "aux_loss_coeff",
                    "z_loss_coeff"):
            f.attrs[key] = np.float64(cfg[key])
        f.attrs["norm_topk_prob"] = np.int64(cfg["norm_topk_prob"])
        f.attrs["tie_word_embeddings"] = np.int64(cfg["tie_word_embeddings"])
        f.attrs["drop_policy"] = np.bytes_(cfg["drop_policy"])  # fixed-length ASCII
        f.attrs["generator"] = np.bytes_("tests/reference/model_ref.py (float64 NumPy, hand backward)")
        f["tokens"] = tokens
        for pname, _ in param_shapes(cfg):
            f["param/" + pname] = params[pname].astype(np.float32)
            f["grad/" + pname] = grads[pname].astype(np.float32)
        f["logits"] = logits.astype(np.float32)
        for key, dst in (("ce", "ce"), ("aux", "aux"), ("z", "z"), ("loss", "total")):
            f["loss/" + dst] = np.float64(parts[key])
        for l, st in stats.items():
            f[f"moe/{l}/tokens_per_expert"] = st["kept"]
            f[f"moe/{l}/selected_per_expert"] = st["selected"]
            f[f"moe/{l}/aux"] = np.float64(st["aux"])
            f[f"moe/{l}/z"] = np.float64(st["z"])
    dropped = {l: int(s["selected"].sum() - s["kept"].sum()) for l, s in stats.items()}
    print(f"wrote {path}: loss {parts['loss']:.6f} (ce {parts['ce']:.6f} aux {parts['aux']:.6f} "
          f"z {parts['z']:.6f}), routing margin {routing_margins(cfg, stats):.3g}, "
          f"dropped {dropped}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="finite-difference gradient check")
    ap.add_argument("--write", metavar="DIR", help="write the HDF5 fixtures into DIR")
    ap.add_argument("--max-per-tensor", type=int, default=60,
                    help="elements checked per tensor (random subset when larger)")
    args = ap.parse_args()
    if not args.check and not args.write:
        ap.error("give --check and/or --write DIR")
    ok = True
    if args.check:
        rng = np.random.default_rng(0)
        for name, cfg in CONFIGS.items():
            ok = check(cfg, name, args.max_per_tensor, rng) and ok
    if args.write:
        for name, cfg in CONFIGS.items():
            write(cfg, name, args.write)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
