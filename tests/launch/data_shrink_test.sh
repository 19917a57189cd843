#!/usr/bin/env bash
# A dataset file that shrinks under a job (issue 18), with moe-train under a
# real 2-rank mpirun on data preprocessed by moe-preprocess, each rank's own
# exit code recorded (a rank that hangs or is aborted shows up as a missing or
# wrong code; mpirun is killed after $TEST_MPI_LIMIT s):
#   - a .bin truncated before the start: every rank exits 1 naming the file,
#     before the model is built, and no checkpoint is written;
#   - a .bin truncated in place while the job trains (after a checkpoint was
#     saved): no SIGBUS; every rank exits 1 by itself within seconds, naming
#     the file and both sizes; no moe-train is left; every checkpoint under
#     checkpoint.dir verifies (moe-ckpt verify), none is half-written, and the
#     last one resumes once the file is restored;
#   - the same with the truncated file seen by rank 1 only (each rank reads
#     data/corpus from its own working directory): rank 0, whose reads
#     succeed, stops at the same step with rank 1's message instead of
#     waiting in the step's first collective.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/test_env.sh"
test_init "$@"
test_corpus 400 || exit 1
common=(--config="$SRC/configs/demo.textproto" optim.warmup_steps=1 train.log_every=1 train.eval_every=0
        model.num_layers=2 model.seq_len=32 parallel.expert=2)
size=$(stat -c %s "$CORPUS.bin")
cut=$((size / 3))
no_model() {  # no_model NAME: the data error came before the model was built
  if grep -q "model: .* parameters" "$TMP/$1.out"; then test_fail "$1: the model was built" "$TMP/$1.out"; fi
}
said() { grep -m1 "moe-train failed" "$TMP/$1.out" | sed 's/^/  /'; }  # the message, for the log
no_sigbus() {
  if grep -qE "Bus error|SIGBUS|exited on signal" "$TMP/$1.out"; then test_fail "$1: a SIGBUS" "$TMP/$1.out"; fi
}
none_left() {  # none_left DIR: no moe-train with checkpoint.dir=$TMP/DIR is still running
  local pids
  sleep 1
  pids=$(pgrep -f "^$BIN/moe-train .*checkpoint.dir=$TMP/$1")
  if [ -n "$pids" ]; then
    test_fail "a moe-train is still running: $(ps -o pid=,args= -p "${pids//$'\n'/,}")"
    kill -KILL $pids
  else
    echo "ok: no moe-train left"
  fi
}
# wait_for FILE TEXT: up to 100 s for TEXT to appear in FILE.
wait_for() {
  for _ in $(seq 1 400); do grep -qF -- "$2" "$1" 2>/dev/null && return 0; sleep 0.25; done
  test_fail "no '$2' in $1 after 100 s" "$1"
}
# ckpt_ok DIR: every checkpoint under DIR verifies, no save was left half-written.
ckpt_ok() {
  local steps
  steps=$(cd "$1" && ls -d step_* 2>/dev/null | tr '\n' ' ')
  [ -n "$steps" ] || { test_fail "no checkpoint in $1"; return 1; }
  "$BIN/moe-ckpt" verify "$1" > "$TMP/verify.out" 2>&1 || { test_fail "moe-ckpt verify $1" "$TMP/verify.out"; return 1; }
  echo "ok: moe-ckpt verify $1 ($steps)"
  if ls -a "$1" | grep -q "tmp"; then test_fail "a half-written save in $1: $(ls -a "$1")"; fi
}

# 1. Truncated before the start: exit 1 on every rank, before the model.
cp "$CORPUS.bin" early.bin && cp "$CORPUS.idx" early.idx
truncate -s "$cut" early.bin
mpirun_counted 2 early "$BIN/moe-train" "${common[@]}" data.train_path="$TMP/early" train.run_dir="$TMP/early_run" \
  checkpoint.dir="$TMP/early_ckpt" train.steps=2
ranks_exited early 1 2 && echo "ok: exit 1 on 2 ranks for a .bin truncated before the start" && said early
expect_in early.out "$TMP/early.bin does not match $TMP/early.idx"
expect_in early.out "the .bin is truncated or belongs to another .idx"
[ "$(grep -c "moe-train failed: .*early.bin does not match" early.out)" = 2 ] ||
  test_fail "not every rank named the truncated file" early.out
no_model early
if ls early_ckpt/step_* > /dev/null 2>&1; then test_fail "a checkpoint was written: $(ls early_ckpt)"; fi

# 2. Truncated in place while training, the file shared by both ranks.
cp "$CORPUS.bin" live.bin && cp "$CORPUS.idx" live.idx
mpirun_counted 2 live "$BIN/moe-train" "${common[@]}" data.train_path="$TMP/live" train.run_dir="$TMP/live_run" \
  checkpoint.dir="$TMP/live_ckpt" checkpoint.save_every=2 checkpoint.keep_last=3 train.steps=100000 &
job=$!
wait_for live.out "checkpoint: saved"
wait_for live.out "step 3/"
truncate -s "$cut" live.bin
cut_at=$(date +%s)
wait $job
took=$(( $(date +%s) - cut_at ))
echo "live: the job ended ${took} s after the truncation"
ranks_exited live 1 2 && echo "ok: exit 1 on 2 ranks for a .bin truncated while training" && said live
expect_in live.out "$TMP/live.bin shrank from $size to $cut bytes while the job was reading it"
expect_in live.out "restore the file or write new data under another prefix"
[ "$(grep -c "moe-train failed: .*live.bin shrank from $size to $cut bytes" live.out)" = 2 ] ||
  test_fail "not every rank named the shrunk file" live.out
no_sigbus live
[ "$took" -le 30 ] || test_fail "the job took ${took} s to stop after the truncation" live.out
none_left "live_ckpt"
ckpt_ok live_ckpt
# The last checkpoint resumes once the file is back.
last=$(cd live_ckpt && ls -d step_* | sort | tail -1)
last_step=$((10#${last#step_}))
cp "$CORPUS.bin" live.bin
mpirun_counted 2 resume "$BIN/moe-train" "${common[@]}" data.train_path="$TMP/live" train.run_dir="$TMP/live_run" \
  checkpoint.dir="$TMP/live_ckpt" checkpoint.save_every=0 train.steps=$((last_step + 1))
ranks_exited resume 0 2 && expect_in resume.out "resumed from " && expect_in resume.out "$last at step $last_step"

# 3. Only rank 1's file shrinks: data/corpus is a copy in each rank's working
#    directory (the config, and so its hash, is the same on both ranks).
mkdir -p r0/data r1/data
for r in r0 r1; do cp "$CORPUS".* $r/data/; done
export EXITS="$TMP/one.exits" && mkdir -p "$EXITS"
one=("$BIN/moe-train" "${common[@]}" data.train_path=data/corpus train.run_dir="$TMP/one_run"
     checkpoint.dir="$TMP/one_ckpt" checkpoint.save_every=2 train.steps=100000)
test_mpirun --mca orte_abort_on_non_zero_status 0 -np 1 -wdir "$TMP/r0" bash "$TEST_LIB/record_exit.sh" "${one[@]}" : \
  -np 1 -wdir "$TMP/r1" bash "$TEST_LIB/record_exit.sh" "${one[@]}" > one.out 2>&1 &
job=$!
wait_for one.out "checkpoint: saved"
wait_for one.out "step 3/"
truncate -s "$cut" r1/data/corpus.bin
cut_at=$(date +%s)
wait $job
took=$(( $(date +%s) - cut_at ))
echo "one: the job ended ${took} s after the truncation"
ranks_exited one 1 2 && echo "ok: exit 1 on both ranks when only rank 1's file shrank" && said one
[ "$(grep -c "moe-train failed: rank 1: data/corpus.bin shrank from $size to $cut bytes" one.out)" = 2 ] ||
  test_fail "rank 0 did not report rank 1's message" one.out
no_sigbus one
[ "$took" -le 30 ] || test_fail "the job took ${took} s to stop after the truncation" one.out
none_left "one_ckpt"
ckpt_ok one_ckpt
test_done "data shrink test"
