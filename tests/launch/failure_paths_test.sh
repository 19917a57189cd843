#!/usr/bin/env bash
# moe-train's failure paths end to end under a real 4-rank mpirun, counting
# each rank's own exit code (a wrapper records it; mpirun is told not to kill
# the other ranks when one exits non-zero, so a rank that would hang or be
# aborted shows up as a missing or wrong code):
#   - a bad config: exit 2 on every rank, nothing written;
#   - bad data (missing prefix, corrupt index): exit 1 on every rank, with the
#     problem named, before the model is built;
#   - a stalled collective (one rank stopped mid-run): the job ends with 124
#     within comm.timeout_s + 10 s, naming rank, group, op, sequence and bytes.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/test_env.sh"
test_init "$@"
# run_counted WANT ARGS...: every one of the 4 ranks must exit WANT by itself.
run_counted() {
  local want=$1; shift
  rm -rf runs
  mpirun_counted 4 run "$BIN/moe-train" "$@"
  ranks_exited run "$want" 4
}
expect_in_out() { expect_in run.out "$1"; }

D="--config=$SRC/configs/demo.textproto"
# Config errors: exit 2 on every rank, no run directory.
for args in "parallel.expert=3" "model.hiden_size=3"; do
  run_counted 2 "$D" $args train.run_dir=runs && [ ! -e runs ] && echo "ok: exit 2 on 4 ranks for $args"
  [ -e runs ] && { echo "FAIL: a run directory was written for $args"; fail=1; }
done
expect_in_out "model has no field 'hiden_size'"

# Data errors: exit 1 on every rank before the model is built.
run_counted 1 "$D" data.train_path="$TMP/missing" train.run_dir=runs &&
  expect_in_out "missing.idx: no such file" && echo "ok: exit 1 on 4 ranks for a missing prefix"
[ "$(grep -c 'moe-train failed: .*missing.idx: no such file' run.out)" = 4 ] ||
  { echo "FAIL: not every rank named the missing file"; cat run.out; fail=1; }
grep -q "model: .* parameters" run.out && { echo "FAIL: the model was built before the data error"; fail=1; }
# The ranks agree on a data error over the control plane (the host world),
# not the data plane, which on GPUs is NCCL and takes device buffers only:
# with every early AllReduce of the data plane's world failing, the data
# error still reaches every rank.
faults=$(for s in $(seq 0 31); do printf 'rank=-1,kind=AllReduce,seq=%d,action=fail,group=world;' "$s"; done)
MOE_COMM_FAULT="${faults%;}" run_counted 1 "$D" data.train_path="$TMP/missing" train.run_dir=runs &&
  expect_in_out "missing.idx: no such file" && echo "ok: the data error is agreed on the control plane"
grep -q "injected failure" run.out && { echo "FAIL: the data-error agreement ran on the data plane"; fail=1; }
test_corpus 40 || exit 1
cp "$CORPUS.bin" bad.bin; head -c 40 "$CORPUS.idx" > bad.idx  # a truncated index
run_counted 1 "$D" data.train_path="$TMP/bad" train.run_dir=runs &&
  expect_in_out "bad.idx" && echo "ok: exit 1 on 4 ranks for a truncated index"
grep -q "model: .* parameters" run.out && { echo "FAIL: the model was built before the data error"; fail=1; }

# A stalled collective: stop rank 1 (SIGSTOP) mid-run; the others' watchdog
# must end the job with 124 and say what was waiting.
start=$(date +%s)
test_mpirun -np 4 "$BIN/moe-train" "$D" data.train_path="$CORPUS" \
  train.run_dir=stall model.num_layers=2 model.seq_len=32 train.steps=100000 train.log_every=1 \
  train.eval_every=0 optim.warmup_steps=1 checkpoint.dir= comm.timeout_s=3 > run.out 2>&1 &
job=$!
for _ in $(seq 1 240); do grep -q "step 2/" run.out 2>/dev/null && break; sleep 0.25; done
victim=""
for pid in $(pgrep -f "^$BIN/moe-train .*train.run_dir=stall"); do
  if tr '\0' '\n' < /proc/$pid/environ 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=1"; then victim=$pid; fi
done
if [ -z "$victim" ]; then echo "FAIL: no rank 1 to stop"; cat run.out; fail=1; kill -KILL $job; fi
stopped_at=$(date +%s)
[ -n "$victim" ] && kill -STOP "$victim" && echo "stopped rank 1 (pid $victim): $(ps -o stat= -p "$victim")"
wait $job; code=$?
took=$(( $(date +%s) - stopped_at ))
[ -n "$victim" ] && kill -KILL "$victim" 2>/dev/null
echo "stalled run: exit $code, ${took}s after the stop"
[ "$code" = 124 ] || { echo "FAIL: exit $code, want 124 from the watchdog"; cat run.out; fail=1; }
[ "$took" -le 13 ] || { echo "FAIL: took ${took}s > timeout 3 s + 10 s"; fail=1; }
expect_in_out "[moe comm watchdog] world rank"
grep -qE "rank [0-9]+ of group '[a-z_0-9]+' \([0-9]+ ranks; world ranks [0-9,]+\)" run.out ||
  { echo "FAIL: no rank and group in the watchdog message"; cat run.out; fail=1; }
grep -qE "operation [A-Za-z]+ \(sequence [0-9]+, [0-9]+ bytes sent, [0-9]+ bytes received\) has waited" run.out ||
  { echo "FAIL: no operation, sequence and bytes in the watchdog message"; cat run.out; fail=1; }
echo "the stall took $(( $(date +%s) - start )) s"
test_done "failure paths test"
