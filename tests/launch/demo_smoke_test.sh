#!/usr/bin/env bash
# End to end as a user runs it: moe-preprocess a text corpus, moe-launch the
# demo config on 4 ranks (EP 2, DP 4) for a few steps with checkpoints,
# check the metrics and the checkpoint with moe-ckpt, resume to more steps,
# and stop a run with SIGTERM (it saves and exits 0; the checkpoint verifies and
# resumes).
source "$(dirname "${BASH_SOURCE[0]}")/../lib/test_env.sh"
test_init "$@"
test_corpus 60 || exit 1
common=(--config="$SRC/configs/demo.textproto" data.train_path=data/corpus train.run_dir=run
        checkpoint.dir=run/ckpt optim.warmup_steps=2 train.log_every=2 train.eval_every=0 train.eval_batches=1
        model.num_layers=2 model.seq_len=32)
"$BIN/moe-launch" -n 4 -- "${common[@]}" train.steps=4 checkpoint.save_every=2 > out1 2>&1 || { echo "FAIL: run 1"; cat out1; fail=1; }
grep -q "step 4/4" out1 || { echo "FAIL: no step 4 in run 1"; cat out1; fail=1; }
[ "$(grep -c '"event":"train"' run/metrics.jsonl)" = 4 ] || { echo "FAIL: metrics lines"; cat run/metrics.jsonl; fail=1; }
[ -f run/config.textproto ] || { echo "FAIL: no resolved config in the run dir"; fail=1; }
"$BIN/moe-ckpt" verify run/ckpt/step_00000004 > verify.out 2>&1 || { echo "FAIL: verify"; cat verify.out; fail=1; }
"$BIN/moe-ckpt" inspect run/ckpt/step_00000004 > inspect.out 2>&1 || { echo "FAIL: inspect"; cat inspect.out; fail=1; }
grep -q "model.layers.1.mlp.experts.up_proj" inspect.out || { echo "FAIL: inspect lists no expert tensor"; cat inspect.out; fail=1; }

# Resume: continues from step 4 to 6 and appends to the metrics.
"$BIN/moe-launch" -n 4 -- "${common[@]}" train.steps=6 > out2 2>&1 || { echo "FAIL: run 2"; cat out2; fail=1; }
grep -q "resumed from run/ckpt/step_00000004" out2 || { echo "FAIL: no resume"; cat out2; fail=1; }
[ "$(grep -c '"event":"train"' run/metrics.jsonl)" = 6 ] || { echo "FAIL: metrics after resume"; fail=1; }

# SIGTERM (as Slurm sends before preemption) to one rank: every rank finishes
# the step, saves, exits 0.
"$BIN/moe-launch" -n 2 -- "${common[@]}" parallel.expert=1 train.run_dir=run3 checkpoint.dir=run3/ckpt \
  train.steps=100000 > out3 2>&1 &
launcher=$!
for _ in $(seq 1 120); do grep -q "step 2/" out3 2>/dev/null && break; sleep 0.5; done
# The rank process itself (not mpirun, whose command line also names moe-train).
pid=$(pgrep -f "^$BIN/moe-train .*run3/ckpt" | head -1)
if [ -n "$pid" ]; then kill -TERM "$pid"; else echo "FAIL: no rank to signal"; cat out3; fail=1; fi
wait $launcher; code=$?
[ $code = 0 ] || { echo "FAIL: SIGTERM run exit $code"; cat out3; fail=1; }
grep -q "stop requested" out3 || { echo "FAIL: no stop message"; cat out3; fail=1; }
k=$(sed -n 's/.*stopped after step \([0-9]*\).*/\1/p' out3 | head -1)
name=$(printf 'step_%08d' "${k:-0}")
if [ -z "$k" ] || [ ! -d "run3/ckpt/$name" ]; then
  echo "FAIL: SIGTERM: step '${k}' not saved ($(ls run3/ckpt 2>&1))"; fail=1
else
  "$BIN/moe-ckpt" verify "run3/ckpt/$name" > verify3.out 2>&1 || { echo "FAIL: verify of the SIGTERM checkpoint"; cat verify3.out; fail=1; }
  # It resumes: two more steps from step k.
  "$BIN/moe-launch" -n 2 -- "${common[@]}" parallel.expert=1 train.run_dir=run3 checkpoint.dir=run3/ckpt \
    train.steps=$((k + 2)) > out4 2>&1 || { echo "FAIL: resume after SIGTERM"; cat out4; fail=1; }
  grep -q "resumed from run3/ckpt/$name at step $k" out4 || { echo "FAIL: no resume from $name"; cat out4; fail=1; }
  grep -q "step $((k + 2))/$((k + 2))" out4 || { echo "FAIL: the resumed run did not reach step $((k + 2))"; cat out4; fail=1; }
fi
test_done "demo smoke test"
