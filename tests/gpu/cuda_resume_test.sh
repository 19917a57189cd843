#!/usr/bin/env bash
# Checkpoints from and into GPU memory (docs/design.md, Checkpoints: device
# tensors go through a bounded host bucket, never a whole host copy). 10 steps
# of the demo model (2 layers, 1 rank) on cuda saving at steps 5 and 10, then:
#   - resumed on cuda from step 5 (a 1 MiB bucket, so every tensor takes
#     several pieces): steps 6..10 match the uninterrupted run to 1e-6 relative
#     (both runs sum in the same fixed orders on the same GPU);
#   - resumed on cpu from the same checkpoint: within 1e-4 (cuBLAS and the CPU
#     sum in other orders, as in gpu_cuda_train_test);
#   - the same cuda resume in bf16 (fp32 masters in the checkpoint): 1e-6.
# The third argument picks the device (default cuda; cpu checks the script's
# logic without a GPU). Without a usable GPU it prints one line and exits 77.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/test_env.sh"
test_init "$@"
DEV="${3:-cuda}"
TEST_MPI_LIMIT=${TEST_MPI_LIMIT:-300}
test_corpus 80 || exit 1
common=(--config="$SRC/configs/demo.textproto" data.train_path=data/corpus parallel.expert=1 llep.enabled=false
        optim.warmup_steps=2 train.log_every=1 train.eval_every=0 train.steps=10 checkpoint.save_every=5
        model.num_layers=2 model.seq_len=64 comm.backend=mpi)
run() {  # run NAME DEVICE ARGS...
  local name=$1 dev=$2; shift 2
  test_mpirun -np 1 "$BIN/moe-train" "${common[@]}" train.device="$dev" train.run_dir="$name" \
    checkpoint.dir="$name/ckpt" "$@" > "$name.out" 2>&1
}
# compare_tail REF GOT TOL WHAT: GOT's steps 6..10 against REF's.
compare_tail() {
  python3 - "$1/metrics.jsonl" "$2/metrics.jsonl" "$3" "$4" <<'PY'
import json, math, sys
def losses(p):
    return {r["step"]: r["loss"] for r in map(json.loads, open(p)) if r.get("event") == "train"}
ref, got, tol, what = losses(sys.argv[1]), losses(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
steps = list(range(6, 11))
missing = [s for s in steps if s not in ref or s not in got]
if missing or min(got) != 6:
    print("%s: FAIL: steps %s missing, or the resumed run started at %s" % (what, missing, min(got) if got else None)); sys.exit(1)
worst = max(abs(got[s] - ref[s]) / max(abs(ref[s]), 1e-12) for s in steps)
ok = all(math.isfinite(got[s]) for s in steps) and worst <= tol
print("%s: steps 6..10, worst relative loss difference %.3g%s" % (what, worst, "" if ok else " > %g: FAIL" % tol))
sys.exit(0 if ok else 1)
PY
}
run full "$DEV"
code=$?
skip_without_gpu $code full.out
[ $code = 0 ] || { echo "FAIL: the $DEV run exit $code"; cat full.out; exit 1; }
step5=full/ckpt/step_00000005
[ -d "$step5" ] || test_fail "no checkpoint at step 5" full.out
if run resumed "$DEV" train.resume="$step5" checkpoint.host_bucket_mb=1; then
  expect_in resumed.out "resumed from $step5 at step 5"
  compare_tail full resumed 1e-6 "$DEV resumed on $DEV (fp32)" || fail=1
else test_fail "resume on $DEV" resumed.out; fi
if run on_cpu cpu train.resume="$step5"; then
  compare_tail full on_cpu 1e-4 "$DEV checkpoint resumed on cpu (fp32)" || fail=1
else test_fail "resume on cpu" on_cpu.out; fi
if run full_bf16 "$DEV" train.precision=bf16 &&
   run resumed_bf16 "$DEV" train.precision=bf16 train.resume=full_bf16/ckpt/step_00000005 checkpoint.host_bucket_mb=1; then
  compare_tail full_bf16 resumed_bf16 1e-6 "$DEV resumed on $DEV (bf16)" || fail=1
else test_fail "bf16 runs" full_bf16.out resumed_bf16.out; fi
test_done "$DEV resume test"
