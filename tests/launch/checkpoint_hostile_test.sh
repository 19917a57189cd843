#!/usr/bin/env bash
# Checkpoints and run directories against hostile use and faults (issue 18),
# under a real 2-rank mpirun on the demo model. Each case asserts the message,
# the exit code and that nothing on disk was lost:
#   - a rank stalled inside a save: the watchdog ends the job (exit 124) at
#     checkpoint.timeout_s, naming it; the previous checkpoint still verifies;
#   - two jobs on one checkpoint.dir: the second stops (exit 2) naming the
#     holder's host and pid, the first finishes; a dead job's lock is taken over;
#   - resuming into a smaller model: refused naming the tensors (the previous
#     run's config copy kept), loaded with checkpoint.partial_load naming each
#     tensor skipped;
#   - model.h5 truncated: verify and resume refuse it naming the file;
#   - a read-only train.run_dir: exit 2 before any work, no "config written";
#   - moe-ckpt verify on a plain file, moe-launch with an empty hostfile or an
#     option without its value: exit 2 with the message.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/test_env.sh"
test_init "$@"
mkdir text data
for i in $(seq 1 40); do printf 'line %d of a small corpus for the checkpoint test.\n%%\n' "$i" >> text/a.txt; done
"$BIN/moe-preprocess" --quiet --output-prefix data/corpus --split=percent text || { echo "FAIL: preprocess"; exit 1; }
common=(--config="$SRC/configs/demo.textproto" data.train_path=data/corpus optim.warmup_steps=1 train.log_every=1
        train.eval_every=0 train.eval_batches=1 model.num_layers=2 model.seq_len=32 parallel.expert=2)
train() { TEST_MPI_LIMIT=180 test_mpirun -np 2 "$BIN/moe-train" "${common[@]}" "$@"; }
has() { expect_in "$@"; }  # has FILE "text": the text is in FILE
hasnt() {
  if grep -qF -- "$2" "$1"; then echo "FAIL: '$2' in $1:"; tail -30 "$1"; fail=1; else echo "ok: not '$2'"; fi
}
code_is() {  # code_is WANT GOT WHAT
  if [ "$2" = "$1" ]; then echo "ok: $3 exit $2"; else echo "FAIL: $3 exit $2, want $1"; fail=1; fi
}

# A finished run with checkpoints at steps 1 and 2 (the base of what follows).
train train.run_dir=run checkpoint.dir=run/ckpt train.steps=2 checkpoint.save_every=1 > base.out 2>&1
code_is 0 $? "base run"
# Every checkpoint file and manifest (not .lock: it names whichever job holds the directory).
snapshot() { (cd run/ckpt && find . -type f ! -name .lock -printf '%p %s\n' | sort && cat */manifest.pb | md5sum); }

# 1. A rank stalled inside a save (its first checkpoint collective of step 3's
#    save, sequence 15 of the checkpoint group after the resume's load, hangs
#    on rank 1): the watchdog ends the job at checkpoint.timeout_s.
start=$(date +%s)
MOE_COMM_FAULT="rank=1,kind=AllReduce,seq=${CKPT_SEQ:-15},action=hang,group=checkpoint" \
  train train.run_dir=run checkpoint.dir=run/ckpt train.steps=3 checkpoint.save_every=1 checkpoint.timeout_s=3 \
  > stall.out 2>&1
code=$?; took=$(( $(date +%s) - start ))
code_is 124 $code "stalled save"
[ "$took" -le 90 ] || { echo "FAIL: the stalled save took $took s"; fail=1; }
has stall.out "group 'checkpoint'"
has stall.out "past its deadline of 3.0 s (checkpoint.timeout_s)"
"$BIN/moe-ckpt" verify run/ckpt/step_00000002 > verify2.out 2>&1
code_is 0 $? "verify of the checkpoint before the stall"
[ ! -e run/ckpt/step_00000003 ] || { echo "FAIL: a step 3 checkpoint appeared"; fail=1; }
# Unset, the deadline is comm.timeout_s plus the bytes at 50 MB/s.
MOE_COMM_FAULT="rank=1,kind=AllReduce,seq=${CKPT_SEQ:-15},action=hang,group=checkpoint" \
  train train.run_dir=run checkpoint.dir=run/ckpt train.steps=3 checkpoint.save_every=1 comm.timeout_s=4 \
  > stall2.out 2>&1
code_is 124 $? "stalled save, default deadline"
has stall2.out "past its deadline of 4.4 s (checkpoint.timeout_s)"  # 4 s + 20875776 bytes / 50 MB/s
rm -rf run/ckpt/*.tmp-*  # what the killed saves left (the next save would remove them too)

# 2. Two jobs on one checkpoint.dir.
train train.run_dir=runA checkpoint.dir=shared train.steps=100000 checkpoint.save_every=0 > a.out 2>&1 &
a=$!
for _ in $(seq 1 240); do grep -q "step 1/" a.out 2>/dev/null && break; sleep 0.5; done
train train.run_dir=runB checkpoint.dir=shared train.steps=2 > b.out 2>&1
code_is 2 $? "second job on a held checkpoint.dir"
has b.out "checkpoint.dir = 'shared' is in use by another job (host $(hostname) pid "
has b.out "two jobs must not share a checkpoint directory"
[ ! -e runB/config.textproto ] || { echo "FAIL: the refused job wrote its config"; fail=1; }
kill -0 $a 2>/dev/null || { echo "FAIL: the first job died"; cat a.out; fail=1; }
# The holder dies without cleaning up (kill -9): its lock is taken over.
pids=$(pgrep -f "^$BIN/moe-train .*checkpoint.dir=shared" || true)
[ -n "$pids" ] && kill -9 $pids
wait $a 2>/dev/null
train train.run_dir=runB checkpoint.dir=shared train.steps=2 > b2.out 2>&1
code_is 0 $? "job after the holder died"
has b2.out "taking over the lock shared/.lock left by a job that ended (host $(hostname) pid"

# 3. Resuming into a smaller model (one layer instead of two).
cp run/config.textproto config_before
snapshot > ckpt_before
train train.run_dir=run checkpoint.dir=run/ckpt train.steps=3 model.num_layers=1 > small.out 2>&1
code=$?
[ "$code" != 0 ] || { echo "FAIL: resume into a smaller model succeeded"; fail=1; }
has small.out "tensor(s) this model does not: model.layers.1."
has small.out "checkpoint.partial_load"
cmp -s run/config.textproto config_before || { echo "FAIL: the failed run overwrote the config copy"; fail=1; }
snapshot > ckpt_after
cmp -s ckpt_before ckpt_after || { echo "FAIL: the checkpoints changed"; diff ckpt_before ckpt_after; fail=1; }
train train.run_dir=run_partial checkpoint.dir=run_partial/ckpt train.resume=run/ckpt/step_00000002 \
  train.steps=3 model.num_layers=1 checkpoint.partial_load=true > partial.out 2>&1
code_is 0 $? "partial load"
has partial.out "partial load (checkpoint.partial_load) skipped model.layers.1.mlp.router.weight [8,128]: not in this model, ignored"
has partial.out "resumed from run/ckpt/step_00000002 at step 2"

# 4. model.h5 truncated: verify and resume name it; the shards stay.
cp -r run/ckpt/step_00000002 damaged
truncate -s 100 damaged/model.h5
"$BIN/moe-ckpt" verify damaged > verify_damaged.out 2>&1
code=$?; [ "$code" != 0 ] || { echo "FAIL: verify passed a truncated model.h5"; fail=1; }
has verify_damaged.out "model.h5 is damaged (100 bytes"
train train.run_dir=run_damaged checkpoint.dir=run_damaged/ckpt train.resume=damaged train.steps=3 > resume_damaged.out 2>&1
code=$?; [ "$code" != 0 ] || { echo "FAIL: resumed from a truncated model.h5"; fail=1; }
has resume_damaged.out "model.h5 is damaged"
"$BIN/moe-ckpt" verify base.out > plain.out 2>&1
code_is 2 $? "verify of a plain file"
has plain.out "base.out is not a checkpoint directory (a plain file)"

# 5. A read-only train.run_dir (a read-only bind mount: root ignores modes).
mkdir ro && echo "earlier" > ro/config.textproto
ro_run() { train train.run_dir=ro checkpoint.dir= train.steps=2 > ro.out 2>&1; }
if [ "$(id -u)" = 0 ]; then
  export -f train ro_run test_mpirun; export BIN SRC TEST_MPI_LIMIT
  COMMON="${common[*]}" unshare -m bash -c 'mount --bind ro ro && mount -o remount,bind,ro ro && common=($COMMON) && ro_run'
else
  chmod a-w ro; ro_run
fi
code=$?
chmod u+w ro 2>/dev/null
code_is 2 $code "read-only run_dir"
has ro.out "train.run_dir = 'ro'"
hasnt ro.out "config written"
[ "$(cat ro/config.textproto)" = earlier ] || { echo "FAIL: ro/config.textproto changed"; fail=1; }

# 6. The launcher: an empty hostfile, an option without its value.
: > empty_hosts
"$BIN/moe-launch" -n 2 --hostfile empty_hosts -- "${common[@]}" > launch1.out 2>&1
code_is 2 $? "empty hostfile"
has launch1.out "--hostfile 'empty_hosts' names no host"
"$BIN/moe-launch" -n > launch2.out 2>&1
code_is 2 $? "-n without a value"
has launch2.out "-n needs a value"
test_done "checkpoint hostile test"
