#!/usr/bin/env bash
# The one-shot GPU check (README "GPU"): on a machine with an NVIDIA H100/H200,
#   bash launch/gpu_check.sh
# builds with CUDA (build-gpu/, sm_90), runs every gpu-labelled test, the GPU
# benchmarks (grouped expert GEMM vs one cuBLAS GEMM of equal FLOPs in bf16,
# both grouped-GEMM paths; the whole-model step of docs/design.md's benchmark
# shape: tokens/s, MFU, measured vs predicted peak memory; page-locked vs
# pageable host copies; checkpoint save and load) and a 50-step bf16
# training of a ~110M-parameter MoE (configs/gpu_check.textproto), then prints
# one JSON summary line (also written to build-gpu/gpu_check.json; every
# phase's full output is in build-gpu/gpu_check/). Budget: under 8 minutes on
# one GPU; each phase has its own time limit, so a hang costs that phase only,
# and all of them together (after the build) at most MOE_GPU_CHECK_BUDGET_S.
# Order: benchmarks, training, then the tests (their multi-rank runs are the
# likeliest to hang, and then cannot starve the measurements of the budget).
# No test may be skipped, except the NCCL test's multi-rank runs on a machine
# with fewer GPUs than ranks (NCCL needs one GPU per rank; layout invariance on
# one GPU runs over the MPI communicator instead).
#
# Environment: MOE_GPU_BUILD_DIR (default build-gpu); MOE_GPU_PREBUILT=1 runs the
# binaries already in $MOE_GPU_BUILD_DIR/bin without building (launch/gpu_bundle.sh
# does this on a machine without the build's packages); MOE_GPU_TEXT, the text
# corpus of the training run (default /usr/share/games/fortunes); MOE_GPU_MEMCHECK=1
# also runs gpu_cuda_ops_test under compute-sanitizer's memcheck;
# MOE_GPU_CHECK_BUDGET_S (default 480) bounds the seconds of all phases after the
# build together: a phase is cut at what is left, one with under 10 s left is
# not run (its entry in the summary is null), and the summary is printed.
# Without a GPU, the CUDA toolkit or NCCL it stops at once, naming what is missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${MOE_GPU_BUILD_DIR:-$ROOT/build-gpu}"
cd "$ROOT"
die() { echo "gpu_check: $*" >&2; exit 1; }
budget=${MOE_GPU_CHECK_BUDGET_S:-480}
[[ "$budget" =~ ^[1-9][0-9]*$ ]] ||
  die "MOE_GPU_CHECK_BUDGET_S=$budget: the seconds all phases after the build may take together, a positive integer (default 480)"
command -v nvidia-smi >/dev/null || die "no NVIDIA driver (nvidia-smi not found): run this on a GPU machine"
gpus="$(nvidia-smi -L 2>&1)" || die "nvidia-smi failed: $gpus"
[ -n "$gpus" ] || die "nvidia-smi lists no GPU"
gpu_count=$(grep -c "^GPU " <<< "$gpus" || true)
start=$(date +%s)
phase() { echo "== $* ($(( $(date +%s) - start )) s)" >&2; }
LOGS="$BUILD/gpu_check"

if [ "${MOE_GPU_PREBUILT:-0}" = 1 ]; then
  [ -x "$BUILD/bin/moe-train" ] || die "MOE_GPU_PREBUILT=1 but $BUILD/bin/moe-train is missing"
else
  [ -x /usr/local/cuda/bin/nvcc ] || command -v nvcc >/dev/null || die "no CUDA toolkit (nvcc) in /usr/local/cuda or PATH"
  phase "build ($BUILD, CUDA on, sm_90)"
  export CMAKE_CXX_COMPILER_LAUNCHER="${CMAKE_CXX_COMPILER_LAUNCHER:-$(command -v ccache || true)}"
  export CMAKE_CUDA_COMPILER_LAUNCHER="${CMAKE_CUDA_COMPILER_LAUNCHER:-$(command -v ccache || true)}"
  cmake -S . -B "$BUILD" -DMOE_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null
  cmake --build "$BUILD" -j"$(nproc)" --target moe-train moe-preprocess moe-bench gpu_cuda_ops_test comm_nccl_test >/dev/null
fi
rm -rf "$LOGS"; mkdir -p "$LOGS"
# The source commit of the programs: the bundle's record, else this tree's.
if [ -s "$BUILD/source_commit" ]; then
  commit="$(head -c 64 "$BUILD/source_commit")"
else
  commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  [ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || commit="$commit+dirty"
fi
nvidia-smi > "$LOGS/nvidia-smi.txt" 2>&1 || true
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# The phases below share one budget, so that the summary is always printed in
# time (a lent GPU's command is killed whole at its limit): a phase gets at most
# what is left of it, and one that would start with under 10 s left is skipped.
deadline=$(( $(date +%s) + budget ))
# limited SECONDS LOG COMMAND...: COMMAND's output in LOG; its exit code (124:
# over time, its own limit or the budget's; 125: not run, the budget spent).
limited() {
  local s=$1 log=$2; shift 2
  local left=$(( deadline - $(date +%s) ))
  if [ "$left" -lt 10 ]; then
    echo "gpu_check: not run, the check's $budget s budget is spent (MOE_GPU_CHECK_BUDGET_S)" | tee "$log" >&2
    return 125
  fi
  [ "$s" -le "$left" ] || s=$left
  set +e; timeout -k 10 "$s" "$@" > "$log" 2>&1; local rc=$?; set -e; return $rc
}

phase "benchmarks"
bench="$BUILD/bin/moe-bench"
json_line() { python3 -c 'import json,sys
for l in open(sys.argv[1], errors="replace"):
  l=l.strip()
  if l.startswith("{"):
    r=json.loads(l); print(json.dumps({"ratio": r.get("ratio",{}).get("value"), "figures": {k: v["value"] for k, v in r["figures"].items()}}))' "$1" | tail -1; }
json_lines() { python3 -c 'import json,sys
out=[]
for l in open(sys.argv[1], errors="replace"):
  l=l.strip()
  if l.startswith("{"):
    r=json.loads(l); out.append({"params": r.get("params",{}), "ratio": r.get("ratio",{}).get("value"), "figures": {k: v["value"] for k, v in r["figures"].items()}})
print(json.dumps(out))' "$1"; }
bench_run() {  # bench_run NAME SECONDS ARGS...
  local name=$1 s=$2; shift 2
  limited "$s" "$LOGS/bench_$name.log" "$bench" "$@" || echo "gpu_check: bench $name exit $?" >&2
  json_line "$LOGS/bench_$name.log" || true
}
gemm_grouped=$(bench_run gemm_grouped 40 gpu-gemm --json dtype=bf16 path=grouped)
gemm_per_expert=$(bench_run gemm_per_expert 40 gpu-gemm --json dtype=bf16 path=per_expert)
gemm_streams=$(bench_run gemm_streams 40 gpu-gemm --json dtype=bf16 path=streams)
gemm_f32=$(bench_run gemm_f32 40 gpu-gemm --json dtype=f32 path=per_expert)
# Attention alone at the benchmark shape: the fused kernel vs the chunked GEMM path.
attention=$(bench_run attention 90 attention --json device=cuda iters=3)
# The same in bf16 (as train.precision bf16 runs it: the gemm path's products at
# TF32), with the flash kernel as a third path.
attention_bf16=$(bench_run attention_bf16 90 attention --json device=cuda iters=3 precision=bf16)
# Device<->host copies through page-locked memory (the MPI staging region, the
# checkpoint bucket) vs pageable memory.
host_copy=$(bench_run host_copy 30 host-copy --json device=cuda mb=256 iters=5)
# The clipped bf16 update: one AdamW pass applying the clipping coefficient and
# writing the bf16 copy vs Scale, AdamW and Cast (256M parameters, 4.6 GB of state).
optim_update=$(bench_run optim 30 optim --json device=cuda mparams=256 iters=5)
# The router's host work per MoE layer at the benchmark shape's 8192 tokens, on
# this machine's CPU: what the GPU idles per MoE layer and micro-batch.
router_host=$(bench_run router 20 router --json tokens=8192 experts=8 top_k=2)
# The combine's scatter-add at that shape: the order from the host (one launch)
# vs sorted on the device (keys, CUB radix sort, the add), and the fill it saves.
scatter=$(bench_run scatter 20 scatter --json device=cuda tokens=8192 hidden=1024 iters=20)
# Checkpoint save and load of ~512 MB of GPU tensors through the 256 MiB host
# bucket, against a plain write/read of the same bytes (both records).
limited 90 "$LOGS/bench_ckpt.log" "$bench" ckpt --json device=cuda mb=512 reps=2 dir="$LOGS/ckpt_bench" ||
  echo "gpu_check: bench ckpt exit $?" >&2
ckpt=$(json_lines "$LOGS/bench_ckpt.log" || true)
# docs/design.md's benchmark shape: hidden 1024, 16 layers, 8 experts top-2,
# expert ffn 2816, seq 2048, in bf16.
model_args=(model --json verbose=1 config=configs/bench_model.textproto device=cuda steps=4 warmup=1
  train.precision=bf16 model.hidden_size=1024 model.num_layers=16 model.num_heads=16 model.num_kv_heads=4
  model.ffn_hidden_size=2816 model.moe.num_experts=8 model.moe.top_k=2 model.moe.expert_ffn_hidden_size=2816
  model.seq_len=2048 micro_batch=4)
model=$(MOE_ATTENTION=fused bench_run model 120 "${model_args[@]}")
# The same step with attention on the chunked GEMM driver (cuBLAS; attention_gemm.h).
export MOE_ATTENTION=gemm
model_gemm_attention=$(bench_run model_gemm_attention 120 "${model_args[@]}")
# And on the tensor-core flash kernel (cuda_flash_attention.cu; bf16 operands).
export MOE_ATTENTION=flash
model_flash_attention=$(bench_run model_flash_attention 120 "${model_args[@]}")
unset MOE_ATTENTION
cat "$LOGS"/bench_*.log >&2

phase "50-step training (~110M parameters, bf16)"
run="$LOGS/train"
mkdir -p "$run/data"
text="${MOE_GPU_TEXT:-/usr/share/games/fortunes}"
if [ ! -d "$text" ]; then
  text="$run/data/text"; mkdir -p "$text"
  for i in $(seq 1 3000); do echo "line $i: the quick brown fox jumps over the lazy dog"; done > "$text/a.txt"
fi
"$BUILD/bin/moe-preprocess" --quiet --output-prefix "$run/data/corpus" --split=percent "$text"
train_start=$(date +%s)
train_rc=0
limited 120 "$run/train.log" "$BUILD/bin/moe-train" --config=configs/gpu_check.textproto \
  data.train_path="$run/data/corpus" train.run_dir="$run" checkpoint.dir="$run/ckpt" train.precision=bf16 || train_rc=$?
train_s=$(( $(date +%s) - train_start ))
tail -8 "$run/train.log" >&2
losses=$(python3 -c 'import json,sys
r=[json.loads(x) for x in open(sys.argv[1]) if "\"event\":\"train\"" in x]
l=[x["loss"] for x in r]
print(json.dumps({"steps": len(l), "first": l[0] if l else None, "last": l[-1] if l else None,
                  "last_record": r[-1] if r else None}))' "$run/metrics.jsonl" 2>/dev/null || echo '{}')

# The tests come after the measurements: a hanging multi-rank test then costs
# only its own phase, never the step, MFU and training numbers.
phase "gpu tests"
tests_rc=0
(cd "$BUILD" && limited 300 "$LOGS/tests.log" ctest -L gpu --output-on-failure --timeout 180) || tests_rc=$?
cp "$BUILD/Testing/Temporary/LastTest.log" "$LOGS/LastTest.log" 2>/dev/null || true
tests=$(python3 - "$LOGS/tests.log" "$gpu_count" <<'PY'
import json, re, sys
res = {}
for l in open(sys.argv[1], errors="replace"):
    m = re.search(r"Test +#\d+: (\S+) \.*\s*(\*\*\*)?(Passed|Failed|Skipped|Timeout|Exception|Not Run)?", l)
    if m and m.group(3): res[m.group(1)] = m.group(3)
# NCCL needs one GPU per rank: its multi-rank runs may skip on a machine with fewer GPUs.
allowed = {n for n in res if re.fullmatch(r"comm_nccl_test_np(\d+)", n) and int(n[len("comm_nccl_test_np"):]) > int(sys.argv[2])}
bad = {n: s for n, s in res.items() if s != "Passed" and not (s == "Skipped" and n in allowed)}
print(json.dumps({"results": res, "ok": bool(res) and not bad}))
PY
) || tests='{"ok": false}'
cat "$LOGS/tests.log" >&2

memcheck='"not run (MOE_GPU_MEMCHECK=1 runs it)"'
if [ "${MOE_GPU_MEMCHECK:-0}" = 1 ] && command -v compute-sanitizer >/dev/null; then
  phase "gpu_cuda_ops_test under compute-sanitizer memcheck"
  memcheck_rc=0
  limited 120 "$LOGS/memcheck.log" compute-sanitizer --tool memcheck --error-exitcode 9 "$BUILD/bin/gpu_cuda_ops_test" ||
    memcheck_rc=$?
  memcheck="{\"exit\": $memcheck_rc, \"errors\": $(grep -c "Invalid\|Error:" "$LOGS/memcheck.log" || true)}"
  tail -5 "$LOGS/memcheck.log" >&2
fi

total=$(( $(date +%s) - start ))
ok=true
[ "$(python3 -c 'import json,sys; print(json.loads(sys.argv[1]).get("ok"))' "$tests")" = True ] && [ "$train_rc" = 0 ] || ok=false
summary=$(python3 -c 'import json,sys
a=sys.argv
def j(s):
  try: return json.loads(s)
  except Exception: return None
print(json.dumps({"ok": a[1]=="true", "gpus": a[2], "commit": a[21], "seconds": int(a[3]), "budget_s": int(a[20]), "tests": j(a[4]),
  "grouped_gemm_bf16": {"grouped": j(a[5]), "per_expert": j(a[6]), "streams": j(a[16]), "f32_per_expert": j(a[7]), "target_vs_gemm": 0.8},
  "model_step": j(a[8]), "model_step_gemm_attention": j(a[13]), "model_step_flash_attention": j(a[18]), "attention": j(a[14]), "attention_bf16": j(a[15]), "checkpoint": j(a[17]), "host_copy": j(a[19]), "optim_update": j(a[22]), "router_host": j(a[23]), "scatter": j(a[24]), "memcheck": j(a[12]),
  "train": {"exit": int(a[9]), "seconds": int(a[10]), "precision": "bf16", "losses": j(a[11])}}))' \
  "$ok" "$gpus" "$total" "$tests" "$gemm_grouped" "$gemm_per_expert" "$gemm_f32" "$model" "$train_rc" "$train_s" "$losses" "$memcheck" \
  "$model_gemm_attention" "$attention" "$attention_bf16" "$gemm_streams" "$ckpt" "$model_flash_attention" "$host_copy" "$budget" "$commit" "$optim_update" "$router_host" "$scatter")
echo "$summary" | tee "$BUILD/gpu_check.json"
[ "$ok" = true ]
