#!/usr/bin/env bash
# Hugging Face export and import, end to end (README "Hugging Face
# checkpoints", docs/hf_interop.md). For a Mixtral-shaped, a DeepSeek-shaped
# (sigmoid, expert bias, 2 groups, an ungated shared expert) and a
# Qwen2-MoE-shaped model (a gated shared expert, MoE every second layer), and
# the Mixtral shape saved by tensor parallelism with experts sharded over TP:
#   - a real 2-rank moe-train run (EP 2, or TP 2) trains 3 steps and saves;
#   - export-hf (fp32, sharded by a small --max-shard-size, with the train
#     state), import-hf, export-hf again: every file equal byte for byte (so
#     every tensor round-trips bit for bit), moe-ckpt verify passes;
#   - the run resumed from the imported checkpoint logs the same losses and
#     gradient norms, bit for bit, as the run resumed from the original;
#   - hf_check.py (its own safetensors reader and name mapping, and the NumPy
#     reference model) checks the files, the index and config.json, and
#     recomputes the validation loss the runtime logged at step 3 from the
#     Hugging Face tensors alone;
#   - a bf16 export holds the fp32 values rounded to nearest even (hf_check.py);
# and damaged inputs (truncated file, header length past the file, overlapping
# offsets, a shape that disagrees with config.json, an unknown dtype, a tensor
# missing from the index, a config.json field that disagrees with the runtime's
# config, an unknown model_type) each stop import-hf with exit 2 and the file and
# tensor named, leaving no checkpoint behind.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/test_env.sh"
test_init "$@"
PY=""
for p in /usr/bin/python3 python3; do
  if "$p" -c "import numpy" 2>/dev/null; then PY="$p"; break; fi
done
[ -n "$PY" ] || { echo "FAIL: the check needs python3-numpy (launch/setup.sh installs it)"; exit 1; }
test_corpus 40 || exit 1
mkdir vtext
for i in $(seq 1 6); do printf 'valid %d: look before you leap.\n%%\n' "$i" >> vtext/v.txt; done
"$BIN/moe-preprocess" --quiet --output-prefix data/valid --split=percent vtext || { echo "FAIL: preprocess valid"; exit 1; }
common=(--config="$SRC/configs/demo.textproto" data.train_path=data/corpus data.valid_path=data/valid
        model.num_layers=2 model.seq_len=16 model.hidden_size=32 model.num_heads=4 model.num_kv_heads=2
        model.ffn_hidden_size=48 model.moe.num_experts=4 model.moe.expert_ffn_hidden_size=24
        parallel.expert=2 llep.enabled=false train.micro_batch=2 train.log_every=1 train.eval_every=0
        train.eval_batches=2 optim.warmup_steps=1 checkpoint.save_every=0 checkpoint.keep_last=0)
train() {  # NAME ARGS...: a 2-rank moe-train
  local name=$1; shift
  TEST_MPI_LIMIT=300 test_mpirun -np 2 "$BIN/moe-train" "${common[@]}" "$@" > "$name.out" 2>&1 ||
    { echo "FAIL: $name: moe-train failed"; tail -20 "$name.out"; return 1; }
}
losses() {  # step, loss, grad norm of each train line after step $2
  "$PY" -c 'import json,sys
for line in open(sys.argv[1]):
    v = json.loads(line)
    if v["event"] == "train" and v["step"] > int(sys.argv[2]): print(v["step"], repr(v["loss"]), repr(v["grad_norm"]))' "$1" "$2"
}

declare -A shapes=(
  [mixtral]=""
  [deepseek]="model.moe.score_function=sigmoid model.moe.expert_bias_update_rate=0.01 model.moe.num_expert_groups=2 model.moe.group_topk=1 model.moe.shared_expert_ffn_hidden_size=48"
  [qwen]="model.moe.shared_expert_ffn_hidden_size=40 model.moe.shared_expert_gate=true model.moe.moe_layer_freq=2 model.moe.norm_topk_prob=false"
  [tp2]="parallel.tensor=2 parallel.expert=1 parallel.expert_tensor_parallel=true"
)
declare -A family=([mixtral]=mixtral [deepseek]=deepseek_v3 [qwen]=qwen2_moe [tp2]=mixtral)
declare -A gbatch=([mixtral]=4 [deepseek]=4 [qwen]=4 [tp2]=2)  # data-parallel size x micro_batch 2
for m in mixtral deepseek qwen tp2; do
  # shellcheck disable=SC2206
  extra=(${shapes[$m]})
  train "$m.a" "${extra[@]}" train.steps=3 train.run_dir=$m/a checkpoint.dir=$m/a/ckpt || { fail=1; continue; }
  ck=$m/a/ckpt/step_00000003
  "$BIN/moe-ckpt" export-hf --max-shard-size 20000 --train-state $ck $m/hf > $m.export 2>&1 ||
    { echo "FAIL: $m: export-hf"; cat $m.export; fail=1; continue; }
  grep -q "${family[$m]}" $m.export || { echo "FAIL: $m: export is not ${family[$m]}"; cat $m.export; fail=1; }
  ls $m/hf | grep -q 'model-00001-of-000[0-9][0-9].safetensors' && ! ls $m/hf | grep -q 'of-00001' ||
    { echo "FAIL: $m: not sharded: $(ls $m/hf)"; fail=1; }
  "$BIN/moe-ckpt" import-hf $m/hf $m/imported > $m.import 2>&1 ||
    { echo "FAIL: $m: import-hf"; cat $m.import; fail=1; continue; }
  "$BIN/moe-ckpt" verify $m/imported > $m.verify 2>&1 || { echo "FAIL: $m: verify imported"; cat $m.verify; fail=1; }
  "$BIN/moe-ckpt" export-hf --max-shard-size 20000 --train-state $m/imported $m/hf2 > $m.export2 2>&1 ||
    { echo "FAIL: $m: export-hf of the import"; cat $m.export2; fail=1; continue; }
  for f in $(ls $m/hf); do
    cmp -s $m/hf/$f $m/hf2/$f || { echo "FAIL: $m: $f differs after export -> import -> export"; fail=1; }
  done
  [ "$(ls $m/hf2 | wc -l)" = "$(ls $m/hf | wc -l)" ] || { echo "FAIL: $m: file lists differ"; fail=1; }
  # The resumed runs: from the original and from the imported checkpoint.
  cp -r $m/a $m/b && rm -rf $m/b/ckpt
  train "$m.a2" "${extra[@]}" train.steps=5 train.run_dir=$m/a checkpoint.dir=$m/a/ckpt || { fail=1; continue; }
  train "$m.b2" "${extra[@]}" train.steps=5 train.run_dir=$m/b checkpoint.dir=$m/b/ckpt train.resume=$m/imported ||
    { fail=1; continue; }
  grep -q "resumed from $m/imported/step_00000003 at step 3" $m.b2.out || { echo "FAIL: $m: no resume at step 3"; fail=1; }
  la=$(losses $m/a/metrics.jsonl 3); lb=$(losses $m/b/metrics.jsonl 3)
  [ "$(echo "$la" | wc -l)" = 2 ] && [ "$la" = "$lb" ] ||
    { echo "FAIL: $m: resumed losses differ:"; echo "$la"; echo "vs"; echo "$lb"; fail=1; }
  echo "$m: steps 4-5 after import equal the original's: $(echo $la)"
  # Weights only (no --train-state): a step-0 checkpoint with the same model tensors.
  # (The issue's spelling, export --format hf / import, for this round trip.)
  "$BIN/moe-ckpt" export --format hf $ck $m/hf_w > /dev/null 2>&1 && "$BIN/moe-ckpt" import $m/hf_w $m/imported_w > $m.import_w 2>&1 &&
    "$BIN/moe-ckpt" verify $m/imported_w/step_00000000 > /dev/null 2>&1 &&
    "$BIN/moe-ckpt" export-hf $m/imported_w $m/hf_w2 > /dev/null 2>&1 || { echo "FAIL: $m: weights-only round trip"; cat $m.import_w; fail=1; }
  [ ! -e $m/hf_w/moe_train_state.safetensors ] || { echo "FAIL: $m: a train state without --train-state"; fail=1; }
  for f in $(ls $m/hf_w); do
    cmp -s $m/hf_w/$f $m/hf_w2/$f || { echo "FAIL: $m: weights-only $f differs after export -> import -> export"; fail=1; }
  done
  # Weights only, from a run's step-0 checkpoint: the import (the weights and a
  # fresh optimizer state) trains exactly as that checkpoint does.
  train "$m.i" "${extra[@]}" train.steps=0 train.run_dir=$m/i checkpoint.dir=$m/i/ckpt || { fail=1; continue; }
  "$BIN/moe-ckpt" export-hf $m/i/ckpt $m/hf_i > /dev/null 2>&1 && "$BIN/moe-ckpt" import-hf $m/hf_i $m/imported_i > $m.import_i 2>&1 ||
    { echo "FAIL: $m: step-0 weights-only round trip"; cat $m.import_i; fail=1; continue; }
  cp -r $m/i $m/j && rm -rf $m/j/ckpt
  train "$m.i2" "${extra[@]}" train.steps=2 train.run_dir=$m/i checkpoint.dir=$m/i/ckpt || { fail=1; continue; }
  train "$m.j2" "${extra[@]}" train.steps=2 train.run_dir=$m/j checkpoint.dir=$m/j/ckpt train.resume=$m/imported_i ||
    { fail=1; continue; }
  li=$(losses $m/i/metrics.jsonl 0); lj=$(losses $m/j/metrics.jsonl 0)
  [ "$(echo "$li" | wc -l)" = 2 ] && [ "$li" = "$lj" ] ||
    { echo "FAIL: $m: weights-only import trains differently:"; echo "$li"; echo "vs"; echo "$lj"; fail=1; }
  echo "$m: steps 1-2 from the weights-only import equal the step-0 checkpoint's: $(echo $lj)"
  # A directory from elsewhere: config.json without this runtime's own config
  # (the model comes from the Hugging Face fields alone); same tensors back.
  cp -r $m/hf_w $m/hf_foreign
  "$PY" -c 'import json,sys; c=json.load(open(sys.argv[1])); c.pop("moe_runtime_config"); json.dump(c, open(sys.argv[1], "w"))' \
    $m/hf_foreign/config.json
  "$BIN/moe-ckpt" import-hf $m/hf_foreign $m/imported_f > $m.import_f 2>&1 &&
    "$BIN/moe-ckpt" export-hf $m/imported_f $m/hf_f2 > /dev/null 2>&1 || { echo "FAIL: $m: foreign import"; cat $m.import_f; fail=1; }
  for f in $(ls $m/hf_w | grep safetensors); do
    cmp -s $m/hf_w/$f $m/hf_f2/$f || { echo "FAIL: $m: foreign import: $f differs"; fail=1; }
  done
  # The independent check, on the export and on a bf16 export.
  "$BIN/moe-ckpt" export-hf --dtype bf16 $ck $m/hf_bf16 > $m.export_bf16 2>&1 ||
    { echo "FAIL: $m: bf16 export"; cat $m.export_bf16; fail=1; continue; }
  valid=$("$PY" -c 'import json,sys
for line in open(sys.argv[1]):
    v = json.loads(line)
    if v["event"] == "eval" and v["step"] == 3: print(repr(v["valid_loss"]))' $m/a/metrics.jsonl | head -1)
  "$PY" "$SRC/tests/launch/hf_check.py" --hf $m/hf --bf16 $m/hf_bf16 --family ${family[$m]} \
    --valid data/valid --valid-loss "$valid" --global-batch ${gbatch[$m]} --eval-batches 2 --ref "$SRC/tests/reference" \
    > $m.check 2>&1 || { echo "FAIL: $m: hf_check.py"; cat $m.check; fail=1; }
  echo "$m: $(cat $m.export | head -1)"; tail -1 $m.check
done

# Damaged inputs: each one exit 2, the problem named, no checkpoint written.
src=mixtral/hf
damage() {  # NAME PATTERN PYTHON-EDIT: copy the export, edit it, import, expect exit 2 + PATTERN
  local name=$1 pattern=$2 edit=$3
  rm -rf bad_$name; cp -r $src bad_$name
  "$PY" - "bad_$name" <<EOF
import json, os, struct, sys
d = sys.argv[1]
f = os.path.join(d, "model-00001-of-" + [n for n in os.listdir(d) if n.startswith("model-00001")][0][15:])
many = max((n for n in os.listdir(d) if n.startswith("model-")),
           key=lambda n: len(json.loads(open(os.path.join(d, n), "rb").read()[8:8 + struct.unpack("<Q", open(os.path.join(d, n), "rb").read(8))[0]])))
many = os.path.join(d, many)
def header(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8:8 + n]), b[8 + n:]
def rewrite(path, h, data):
    t = json.dumps(h).encode()
    open(path, "wb").write(struct.pack("<Q", len(t)) + t + data)
$edit
EOF
  "$BIN/moe-ckpt" import-hf bad_$name out_$name > bad_$name.out 2>&1
  local rc=$?
  [ $rc = 2 ] || { echo "FAIL: damage $name: exit $rc, want 2"; cat bad_$name.out; fail=1; }
  grep -q "$pattern" bad_$name.out || { echo "FAIL: damage $name: no '$pattern' in:"; cat bad_$name.out; fail=1; }
  [ ! -e out_$name ] || { echo "FAIL: damage $name: out_$name was written"; fail=1; }
  echo "damage $name: $(head -1 bad_$name.out)"
}
damage truncated "model-00001-of-0000.*safetensors.*end past the data" \
  'b = open(f, "rb").read(); open(f, "wb").write(b[:len(b) - 100])'
damage header_length "header length .* past the end of the file" \
  'b = open(f, "rb").read(); open(f, "wb").write(struct.pack("<Q", len(b) * 2) + b[8:])'
damage header_limit "header length 1099511627776 exceeds the limit" \
  'b = open(f, "rb").read(); open(f, "wb").write(struct.pack("<Q", 1 << 40) + b[8:])'
damage overlap "tensors .* overlap" '
f = many
h, data = header(f)
names = [k for k in h if k != "__metadata__"]
a, b = names[0], names[1]
n = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
if h[a]["data_offsets"][1] - h[a]["data_offsets"][0] == n: h[b]["data_offsets"] = list(h[a]["data_offsets"])
else: h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + n]
rewrite(f, h, data)'
damage wrong_shape "tensor \"model.embed_tokens.weight\" has shape \[32, 257\], config.json gives \[257, 32\]" '
h, data = header(f)
h["model.embed_tokens.weight"]["shape"] = [32, 257]
rewrite(f, h, data)'
damage dtype "unknown dtype \"Q4\"" '
h, data = header(f)
k = [k for k in h if k != "__metadata__"][0]
h[k]["dtype"] = "Q4"
rewrite(f, h, data)'
damage missing "tensors of the config.s model are missing: model.norm.weight" '
idx = json.load(open(os.path.join(d, "model.safetensors.index.json")))
fn = idx["weight_map"].pop("model.norm.weight")
json.dump(idx, open(os.path.join(d, "model.safetensors.index.json"), "w"))
p = os.path.join(d, fn); h, data = header(p); h.pop("model.norm.weight"); rewrite(p, h, data)'
damage not_json "the header is not valid JSON" '
b = open(f, "rb").read(); n = struct.unpack("<Q", b[:8])[0]
open(f, "wb").write(b[:8] + b"[" + b[9:])'
damage config_mismatch "field \"num_local_experts\" is 8 but moe_runtime_config says 4" '
p = os.path.join(d, "config.json"); c = json.load(open(p)); c["num_local_experts"] = 8; json.dump(c, open(p, "w"))'
damage model_type "model_type \"llama\" is not one this runtime imports" '
p = os.path.join(d, "config.json"); c = json.load(open(p)); c["model_type"] = "llama"; json.dump(c, open(p, "w"))'
# A format other than hf: exit 2 naming the one there is.
"$BIN/moe-ckpt" export --format onnx x y > bad_format.out 2>&1
rc=$?
[ $rc = 2 ] || { echo "FAIL: export --format onnx: exit $rc, want 2"; fail=1; }
expect_in bad_format.out "--format=onnx: the one format is hf"
test_done "hf interop test"
