#!/usr/bin/env bash
# Stop signals into resume, end to end (README: on SIGTERM or SIGUSR1 a run
# finishes the step, saves and exits 0; a run resumed on the same layout is
# bit-identical). 2 ranks with the demo's settings (EP 2, LLEP with the cost
# model's measured link rate, overlap chunks 2) plus capacity drops, and 90% of
# the assignments forced into one expert so that LLEP moves work (the GEMM rate
# is set low, so the cost model lets it at any measured link speed). For SIGTERM
# and for SIGUSR1, sent to one rank once step 3 is logged:
#   - every rank exits 0 by itself (each rank's code recorded);
#   - step k (the step the log says it stopped after) is saved, `latest` names
#     it, it is the only checkpoint, and moe-ckpt verify passes;
#   - resumed to k + 3, the run ends with the same model and optimizer state
#     as an uninterrupted run to k + 3 (h5diff of model.h5: every tensor bit for
#     bit) and the same losses and gradient norms at every step.
# All runs start from one step-0 checkpoint, so that they plan LLEP with the
# same measured rates (kept in checkpoints; fresh measurements differ).
source "$(dirname "${BASH_SOURCE[0]}")/../lib/test_env.sh"
test_init "$@"
test_corpus 60 || exit 1
common=(--config="$SRC/configs/demo.textproto" data.train_path=data/corpus
        model.num_layers=2 model.seq_len=32 model.hidden_size=64 model.ffn_hidden_size=128
        model.moe.expert_ffn_hidden_size=64 model.moe.capacity_factor=2
        model.moe.forced_routing.fraction=0.9 llep.min_tokens_per_gemm=1 llep.gemm_gflops=1
        optim.warmup_steps=2 optim.decay_steps=1000 train.log_every=1 train.eval_every=0 train.eval_batches=1
        checkpoint.save_every=0 checkpoint.keep_last=0)
# train NAME ARGS...: a 2-rank moe-train, each rank's exit code in exits_NAME/.
TEST_MPI_LIMIT=300
train() { local name=$1; shift; mpirun_counted 2 "$name" "$BIN/moe-train" "${common[@]}" "$@"; }
# ok NAME: both ranks exited 0.
ok() { ranks_exited "$1" 0 2; }
# step, loss and grad norm of each train line of a metrics file.
losses() {
  python3 -c 'import json,sys
for line in open(sys.argv[1]):
    v = json.loads(line)
    if v["event"] == "train": print(v["step"], repr(v["loss"]), repr(v["grad_norm"]))' "$1"
}

train init train.steps=0 train.run_dir=init checkpoint.dir=init/ckpt
ok init || exit 1
step0=init/ckpt/step_00000000
for sig in TERM USR1; do
  d=run_$sig
  train "$d" train.steps=100000 train.run_dir=$d checkpoint.dir=$d/ckpt train.resume=$step0 &
  launcher=$!
  for _ in $(seq 1 240); do grep -q "step 3/" "$d.out" 2>/dev/null && break; sleep 0.5; done
  # One rank process itself (moe-train, not the wrapper or mpirun).
  pid=$(pgrep -f "^$BIN/moe-train .*checkpoint.dir=$d/ckpt" | tail -1)
  if [ -n "$pid" ]; then kill -"$sig" "$pid"; else echo "FAIL: SIG$sig: no rank to signal"; cat "$d.out"; fail=1; fi
  wait $launcher
  ok "$d" || continue
  k=$(sed -n 's/.*stopped after step \([0-9]*\).*/\1/p' "$d.out" | head -1)
  if [ -z "$k" ] || [ "$k" -lt 3 ]; then echo "FAIL: SIG$sig: no stop at step >= 3"; cat "$d.out"; fail=1; continue; fi
  name=$(printf 'step_%08d' "$k")
  [ "$(ls $d/ckpt | grep '^step_')" = "$name" ] || { echo "FAIL: SIG$sig: checkpoints $(ls $d/ckpt), want only $name"; fail=1; }
  [ "$(cat $d/ckpt/latest)" = "$name" ] || { echo "FAIL: SIG$sig: latest is '$(cat $d/ckpt/latest)', want $name"; fail=1; }
  "$BIN/moe-ckpt" verify "$d/ckpt/$name" > "$d.verify" 2>&1 || { echo "FAIL: SIG$sig: verify"; cat "$d.verify"; fail=1; }
  [ "$(losses $d/metrics.jsonl | wc -l)" = "$k" ] || { echo "FAIL: SIG$sig: metrics lines != $k"; fail=1; }

  end=$((k + 3))
  train "$d.resumed" train.steps=$end train.run_dir=$d checkpoint.dir=$d/ckpt
  ok "$d.resumed" || continue
  grep -q "resumed from $d/ckpt/$name at step $k" "$d.resumed.out" || { echo "FAIL: SIG$sig: no resume from $name"; cat "$d.resumed.out"; fail=1; }
  train "$d.ref" train.steps=$end train.run_dir=$d.ref checkpoint.dir=$d.ref/ckpt train.resume=$step0
  ok "$d.ref" || continue
  final=$(printf 'step_%08d' "$end")
  if ! h5diff "$d/ckpt/$final/model.h5" "$d.ref/ckpt/$final/model.h5" > "$d.h5diff" 2>&1; then
    echo "FAIL: SIG$sig: the resumed run's step $end differs from the uninterrupted run's"; head -20 "$d.h5diff"; fail=1
  fi
  losses "$d/metrics.jsonl" > "$d.losses"; losses "$d.ref/metrics.jsonl" > "$d.ref.losses"
  [ "$(wc -l < "$d.ref.losses")" = "$end" ] || { echo "FAIL: SIG$sig: reference has $(wc -l < "$d.ref.losses") steps"; fail=1; }
  diff "$d.losses" "$d.ref.losses" > /dev/null || { echo "FAIL: SIG$sig: losses differ"; diff "$d.losses" "$d.ref.losses"; fail=1; }
  # LLEP moved work and capacity dropped assignments in these runs.
  python3 -c 'import json,sys
lines = [json.loads(l) for l in open(sys.argv[1])]
layers = [m for v in lines if v["event"] == "train" for m in v["moe_layers"]]
fired = sum(m["llep_fired"] for m in layers); dropped = sum(m["dropped"] for m in layers)
print("llep_fired", fired, "dropped", dropped)
sys.exit(0 if fired > 0 and dropped > 0 else 1)' "$d.ref/metrics.jsonl" || { echo "FAIL: SIG$sig: LLEP never fired or nothing dropped"; fail=1; }
done
test_done "signal resume test"
