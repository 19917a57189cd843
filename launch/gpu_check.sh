#!/usr/bin/env bash
# The one-shot GPU check (README "GPU"): on a machine with an NVIDIA H100/H200,
#   bash launch/gpu_check.sh
# builds with CUDA (build-gpu/, sm_90), runs every gpu-labelled test (none may
# be skipped), the GPU benchmarks (grouped expert GEMM vs one cuBLAS GEMM of
# equal FLOPs in bf16, both grouped-GEMM paths; whole-model step tokens/s and
# MFU) and a 50-step training of a ~110M-parameter MoE (configs/gpu_check.textproto,
# in bf16), then prints one JSON summary line
# (and writes it to build-gpu/gpu_check.json). Budget: under 8 minutes on one GPU.
# Without a GPU, the CUDA toolkit or NCCL it stops at once, naming what is missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${MOE_GPU_BUILD_DIR:-$ROOT/build-gpu}"
cd "$ROOT"
die() { echo "gpu_check: $*" >&2; exit 1; }
command -v nvidia-smi >/dev/null || die "no NVIDIA driver (nvidia-smi not found): run this on a GPU machine"
gpus="$(nvidia-smi -L 2>&1)" || die "nvidia-smi failed: $gpus"
[ -n "$gpus" ] || die "nvidia-smi lists no GPU"
[ -x /usr/local/cuda/bin/nvcc ] || command -v nvcc >/dev/null || die "no CUDA toolkit (nvcc) in /usr/local/cuda or PATH"
start=$(date +%s)
phase() { echo "== $* ($(( $(date +%s) - start )) s)" >&2; }

phase "build ($BUILD, CUDA on, sm_90)"
export CMAKE_CXX_COMPILER_LAUNCHER="${CMAKE_CXX_COMPILER_LAUNCHER:-$(command -v ccache || true)}"
export CMAKE_CUDA_COMPILER_LAUNCHER="${CMAKE_CUDA_COMPILER_LAUNCHER:-$(command -v ccache || true)}"
cmake -S . -B "$BUILD" -DMOE_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null
cmake --build "$BUILD" -j"$(nproc)" --target moe-train moe-preprocess moe-bench gpu_cuda_ops_test >/dev/null
cmake --build "$BUILD" -j"$(nproc)" >/dev/null

phase "gpu tests"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
tests_log="$BUILD/gpu_tests.log"
set +e
(cd "$BUILD" && ctest -L gpu --output-on-failure --timeout 300) > "$tests_log" 2>&1
tests_rc=$?
set -e
tests_passed=$(grep -c " Passed " "$tests_log" || true)
tests_failed=$(grep -c -E "\*\*\*Failed|\*\*\*Exception|\*\*\*Timeout" "$tests_log" || true)
tests_skipped=$(grep -c "Skipped" "$tests_log" || true)
cat "$tests_log" >&2

phase "benchmarks"
bench="$BUILD/bin/moe-bench"
ratio() { python3 -c 'import json,sys
for l in sys.stdin:
  l=l.strip()
  if l.startswith("{"): r=json.loads(l); print(json.dumps({"ratio": r.get("ratio",{}).get("value"), "figures": {k: v["value"] for k, v in r["figures"].items()}}))' ; }
gemm_grouped=$("$bench" gpu-gemm --json dtype=bf16 path=grouped 2>&1 | ratio | tail -1 || true)
gemm_per_expert=$("$bench" gpu-gemm --json dtype=bf16 path=per_expert 2>&1 | ratio | tail -1 || true)
gemm_f32=$("$bench" gpu-gemm --json dtype=f32 path=per_expert 2>&1 | ratio | tail -1 || true)
model=$("$bench" model --json config=configs/bench_model.textproto device=cuda steps=5 2>&1 | ratio | tail -1 || true)

phase "50-step training (~110M parameters)"
run="$BUILD/gpu_check_run"
rm -rf "$run"; mkdir -p "$run/data"
corpus="$run/data/text"
if [ -d /usr/share/games/fortunes ]; then corpus=/usr/share/games/fortunes; else
  mkdir -p "$corpus"; for i in $(seq 1 3000); do echo "line $i: the quick brown fox jumps over the lazy dog"; done > "$corpus/a.txt"; fi
"$BUILD/bin/moe-preprocess" --quiet --output-prefix "$run/data/corpus" --split=percent "$corpus"
precision=(train.precision=bf16)
train_start=$(date +%s)
set +e
"$BUILD/bin/moe-train" --config=configs/gpu_check.textproto data.train_path="$run/data/corpus" \
  train.run_dir="$run" checkpoint.dir="$run/ckpt" "${precision[@]}" > "$run/train.log" 2>&1
train_rc=$?
set -e
train_s=$(( $(date +%s) - train_start ))
tail -5 "$run/train.log" >&2
losses=$(python3 -c 'import json,sys
l=[json.loads(x)["loss"] for x in open(sys.argv[1]) if "\"event\":\"train\"" in x]
print(json.dumps({"steps": len(l), "first": l[0] if l else None, "last": l[-1] if l else None}))' "$run/metrics.jsonl" 2>/dev/null || echo '{}')

total=$(( $(date +%s) - start ))
ok=true
[ "$tests_rc" = 0 ] && [ "$tests_skipped" = 0 ] && [ "$train_rc" = 0 ] || ok=false
summary=$(python3 -c 'import json,sys
a=sys.argv
def j(s):
  try: return json.loads(s)
  except Exception: return None
print(json.dumps({"ok": a[1]=="true", "gpus": a[2], "seconds": int(a[3]),
  "tests": {"passed": int(a[4]), "failed": int(a[5]), "skipped": int(a[6])},
  "grouped_gemm_bf16": {"grouped": j(a[7]), "per_expert": j(a[8]), "f32_per_expert": j(a[9]), "target_vs_gemm": 0.8},
  "model_step": j(a[10]),
  "train": {"exit": int(a[11]), "seconds": int(a[12]), "precision": a[13], "losses": j(a[14])}}))' \
  "$ok" "$gpus" "$total" "$tests_passed" "$tests_failed" "$tests_skipped" "$gemm_grouped" "$gemm_per_expert" \
  "$gemm_f32" "$model" "$train_rc" "$train_s" "${precision[0]#train.precision=}" "$losses")
echo "$summary" | tee "$BUILD/gpu_check.json"
[ "$ok" = true ]
