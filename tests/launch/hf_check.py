#!/usr/bin/python3
"""An independent check of a Hugging Face export (moe-ckpt export-hf).

Shares no code with the C++ writer: the safetensors format is parsed here from its
description (8-byte little-endian header length, a JSON header of
{name: {dtype, shape, data_offsets}} and "__metadata__", then the raw little-endian
data), the Hugging Face names are mapped back to the canonical names of docs/model.md
from docs/hf_interop.md's table, and the model is evaluated with the NumPy reference
tests/reference/model_ref.py.

  hf_check.py --hf DIR --family F [--bf16 DIR] --valid PREFIX --valid-loss X
              --global-batch N --eval-batches B --ref tests/reference

Checks: the index (every tensor's file holds it; total_size is the sum of the data),
config.json (architecture and family fields, the model's sizes), every tensor's name
and shape for the family, the bf16 export equal to the fp32 values rounded to nearest
even, and the validation loss of the first B * N samples of the validation split
recomputed in float64 equal to the runtime's (relative 1e-5).
"""
import argparse
import json
import os
import struct
import sys

import numpy as np

DTYPES = {"F32": np.dtype("<f4"), "BF16": np.dtype("<u2"), "F16": np.dtype("<f2")}


def read_safetensors(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    assert 8 + n <= len(raw), f"{path}: header length {n} past the end"
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    data = raw[8 + n:]
    out, meta = {}, header.pop("__metadata__", {})
    spans = []
    for name, e in header.items():
        b, t = e["data_offsets"]
        dt = DTYPES[e["dtype"]]
        count = int(np.prod(e["shape"], dtype=np.int64))
        assert t - b == count * dt.itemsize, f"{path}: {name}: offsets do not match the shape"
        assert t <= len(data), f"{path}: {name}: data past the end"
        spans.append((b, t, name))
        a = np.frombuffer(data[b:t], dtype=dt).reshape(e["shape"])
        if e["dtype"] == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        out[name] = (e["dtype"], a.astype(np.float32))
    spans.sort()
    for (b0, t0, n0), (b1, t1, n1) in zip(spans, spans[1:]):
        assert b1 >= t0, f"{path}: {n0} and {n1} overlap"
    return out, meta, len(data)


def read_dir(d):
    index_path = os.path.join(d, "model.safetensors.index.json")
    tensors, sizes = {}, 0
    if os.path.exists(index_path):
        index = json.load(open(index_path))
        files = sorted(set(index["weight_map"].values()))
        for f in files:
            t, meta, nbytes = read_safetensors(os.path.join(d, f))
            assert meta.get("format") == "pt", f"{f}: metadata format is {meta.get('format')}"
            for name in t:
                assert index["weight_map"].get(name) == f, f"index: {name} not mapped to {f}"
            tensors.update(t)
            sizes += sum(a.size * (4 if dt == "F32" else 2) for dt, a in t.values())
        assert set(index["weight_map"]) == set(tensors), "index and files list different tensors"
        assert index["metadata"]["total_size"] == sizes, \
            f"index total_size {index['metadata']['total_size']} != {sizes}"
    else:
        tensors, meta, _ = read_safetensors(os.path.join(d, "model.safetensors"))
    return tensors


def canonical(tensors, cfg, family):
    """HF names -> canonical docs/model.md names (experts stacked on dim 0)."""
    E = cfg["num_experts"]
    p = {}
    moe_block = "block_sparse_moe" if family == "mixtral" else "mlp"
    expert_names = ({"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"} if family == "mixtral"
                    else {k: k for k in ("gate_proj", "up_proj", "down_proj")})
    shared = "shared_experts" if family == "deepseek_v3" else "shared_expert"
    used = set()

    def take(name):
        used.add(name)
        return tensors[name][1].astype(np.float64)

    p["model.embed_tokens.weight"] = take("model.embed_tokens.weight")
    for l in range(cfg["num_layers"]):
        pre = f"model.layers.{l}."
        for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                  "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                  "self_attn.o_proj.weight"):
            p[pre + n] = take(pre + n)
        if family == "qwen2_moe":
            for n in ("q_proj", "k_proj", "v_proj"):
                assert not take(pre + f"self_attn.{n}.bias").any(), "nonzero attention bias"
        n = cfg["moe_layer_freq"]
        if l % n != n - 1:
            for w in ("gate_proj", "up_proj", "down_proj"):
                p[pre + f"mlp.{w}.weight"] = take(pre + f"mlp.{w}.weight")
            continue
        b = pre + moe_block + "."
        p[pre + "mlp.router.weight"] = take(b + "gate.weight")
        for ours, theirs in expert_names.items():
            p[pre + "mlp.experts." + ours] = np.stack(
                [take(b + f"experts.{e}.{theirs}.weight") for e in range(E)])
        if cfg["expert_bias"]:
            assert tensors[b + "gate.e_score_correction_bias"][0] == "F32", "bias not F32"
            p[pre + "mlp.router.expert_bias"] = take(b + "gate.e_score_correction_bias")
        if cfg["shared_expert_ffn_hidden_size"] > 0:
            for w in ("gate_proj", "up_proj", "down_proj"):
                p[pre + f"mlp.shared_expert.{w}.weight"] = take(b + f"{shared}.{w}.weight")
            if cfg["shared_expert_gate"]:
                p[pre + "mlp.shared_expert_gate.weight"] = take(b + "shared_expert_gate.weight")
    p["model.norm.weight"] = take("model.norm.weight")
    if not cfg["tie_word_embeddings"]:
        p["lm_head.weight"] = take("lm_head.weight")
    left = set(tensors) - used
    assert not left, f"tensors the family does not have: {sorted(left)[:5]}"
    return p


def model_cfg(c, family, ref):
    """model_ref's config from config.json's Hugging Face fields."""
    cfg = dict(ref.BASE)
    cfg.update(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
               num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
               num_kv_heads=c["num_key_value_heads"], norm_eps=c["rms_norm_eps"],
               rope_theta=c["rope_theta"], tie_word_embeddings=c["tie_word_embeddings"],
               top_k=c["num_experts_per_tok"], seq_len=c["max_position_embeddings"])
    assert c["head_dim"] * c["num_attention_heads"] == c["hidden_size"]
    if family == "mixtral":
        assert c["architectures"] == ["MixtralForCausalLM"]
        cfg.update(num_experts=c["num_local_experts"], expert_ffn_hidden_size=c["intermediate_size"],
                   ffn_hidden_size=c["intermediate_size"], moe_layer_freq=1)
    elif family == "qwen2_moe":
        assert c["architectures"] == ["Qwen2MoeForCausalLM"]
        cfg.update(num_experts=c["num_experts"], expert_ffn_hidden_size=c["moe_intermediate_size"],
                   ffn_hidden_size=c["intermediate_size"], moe_layer_freq=c["decoder_sparse_step"],
                   norm_topk_prob=c["norm_topk_prob"],
                   shared_expert_ffn_hidden_size=c["shared_expert_intermediate_size"],
                   shared_expert_gate=c["shared_expert_intermediate_size"] > 0)
    else:
        assert c["architectures"] == ["DeepseekV3ForCausalLM"]
        assert c["first_k_dense_replace"] == 0 and c["moe_layer_freq"] == 1
        cfg.update(num_experts=c["n_routed_experts"], expert_ffn_hidden_size=c["moe_intermediate_size"],
                   ffn_hidden_size=c["intermediate_size"], moe_layer_freq=1,
                   norm_topk_prob=c["norm_topk_prob"], score_function=c["scoring_func"],
                   expert_bias=c["topk_method"] == "noaux_tc",
                   num_expert_groups=c["n_group"], group_topk=c["topk_group"] if c["n_group"] > 1 else 0,
                   shared_expert_ffn_hidden_size=c["n_shared_experts"] * c["moe_intermediate_size"])
    return cfg


def valid_samples(prefix, S, count, ref_dir):
    sys.path.insert(0, ref_dir)
    import megatron_writer  # the independent indexed-dataset reader
    _, seqs, _ = megatron_writer.read(prefix)
    stream = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs])
    n = (len(stream) - 1) // S
    return np.stack([stream[(k % n) * S:(k % n) * S + S + 1] for k in range(count)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--bf16")
    ap.add_argument("--family", required=True)
    ap.add_argument("--valid", required=True)
    ap.add_argument("--valid-loss", type=float, required=True)
    ap.add_argument("--global-batch", type=int, required=True)
    ap.add_argument("--eval-batches", type=int, required=True)
    ap.add_argument("--ref", required=True)
    a = ap.parse_args()
    sys.path.insert(0, a.ref)
    import model_ref as ref

    c = json.load(open(os.path.join(a.hf, "config.json")))
    assert c["model_type"] == a.family, f"model_type {c['model_type']} != {a.family}"
    cfg = model_cfg(c, a.family, ref)
    tensors = read_dir(a.hf)
    assert all(dt == "F32" for dt, _ in tensors.values()), "fp32 export has non-F32 tensors"
    params = canonical(tensors, cfg, a.family)
    for name, shape in ref.param_shapes(cfg) + ref.state_shapes(cfg):
        assert params[name].shape == tuple(shape), f"{name}: {params[name].shape} != {shape}"
    if a.bf16:
        t16 = read_dir(a.bf16)
        assert set(t16) == set(tensors), "bf16 export lists other tensors"
        for name, (dt, x) in tensors.items():
            want = x.view(np.uint32)
            want = ((want + 0x7FFF + ((want >> 16) & 1)) >> 16).astype(np.uint32) << 16  # nearest even
            got_dt, got = t16[name]
            if name.endswith("e_score_correction_bias"):
                assert got_dt == "F32" and np.array_equal(got, x), f"{name}: bias not kept in F32"
                continue
            assert got_dt == "BF16", f"{name}: {got_dt}"
            assert np.array_equal(got.view(np.uint32), want), f"{name}: bf16 values are not the rounded fp32"
    S = cfg["seq_len"]
    tokens = valid_samples(a.valid, S, a.global_batch * a.eval_batches, a.ref)
    # The runtime's valid loss: the mean over micro-batches of each one's mean CE; the
    # micro-batches are equal in size, so the mean over all positions. Dropless config.
    parts = ref.forward(params, tokens, dict(cfg, erc_loss_coeff=0.0), noises={})[0]
    rel = abs(parts["ce"] - a.valid_loss) / abs(a.valid_loss)
    assert np.isfinite(parts["ce"]) and np.isfinite(a.valid_loss), "non-finite loss"
    assert rel < 1e-5, f"reference CE {parts['ce']!r} vs runtime valid loss {a.valid_loss!r} (rel {rel:.2e})"
    print(f"OK {a.family}: {len(tensors)} tensors, reference CE {parts['ce']:.8f} vs runtime "
          f"{a.valid_loss:.8f} (rel {rel:.1e}){', bf16 = rounded fp32' if a.bf16 else ''}")


if __name__ == "__main__":
    main()
