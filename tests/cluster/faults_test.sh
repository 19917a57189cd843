#!/usr/bin/env bash
# Faults across hosts on a 2-host x 2-rank namespace cluster (comm.timeout_s=5):
# 1. host 2's link goes down mid-step: the job ends within timeout + 10 s, the
#    watchdog names the operation, the group and the unreachable peers (host
#    2's ranks did not answer its probe), the launcher the unreachable host;
# 2. kill -9 of host 2's ranks mid-step, 3. mid-checkpoint-save: every rank
#    exits within the timeout, the job fails (the launcher, after its health
#    probe, within timeout + 10 s), the previous checkpoint verifies and a new
#    run resumes from it and finishes;
# 4. SIGSTOP of host 2's ranks: the watchdog ends the job naming the
#    operation, the group and the stopped peers.
source "$(dirname "${BASH_SOURCE[0]}")/cluster_lib.sh"
cluster_init "$1" "$2"
cluster_corpus || exit 1
cluster_up 2 2 || exit 1
timeout_s=5
common=(--config="$SRC/configs/demo.textproto" data.train_path="$CLUSTER_CORPUS" parallel.tensor=2
        parallel.expert=2 model.num_layers=1 model.seq_len=32 model.hidden_size=64 model.ffn_hidden_size=128
        model.moe.expert_ffn_hidden_size=128 train.log_every=1 train.eval_every=0 train.eval_batches=1
        optim.warmup_steps=1 comm.timeout_s=$timeout_s checkpoint.save_every=2)
# A cut-off host holds mpirun until moe-launch stops it (--exit-grace s after
# this host's ranks ended); the launcher then probes every host (--probe-timeout).
launch_opts=(--exit-grace 3 --probe-timeout 3)

# start NAME STEPS [CKPT_DIR]: a run in the background ($run_pid), output in NAME.out.
start() {
  cluster_launch -n 4 "${launch_opts[@]}" -- "${common[@]}" train.run_dir="$1" checkpoint.dir="${3-$1/ckpt}" \
    train.steps="$2" > "$1.out" 2>&1 &
  run_pid=$!
}
# finish NAME LIMIT: waits for the run; sets $code and $took (seconds since $t0).
finish() {
  local i
  for i in $(seq 1 $(( $2 * 10 ))); do kill -0 "$run_pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$run_pid" 2>/dev/null; then
    echo "FAIL: $1: still running $2 s after the fault"; cat "$1.out"; fail=1
    kill -9 "$run_pid" 2>/dev/null
  fi
  wait "$run_pid"; code=$?
  took=$(( $(date +%s) - t0 ))
  echo "$1: exit code $code, $took s after the fault"
}
# ranks_exit NAME LIMIT: every rank on every host has exited within LIMIT s of the fault.
ranks_exit() {
  local i k left
  for i in $(seq 1 $(( $2 * 10 ))); do
    left=""
    for k in 1 2; do left+=$(cluster_rank_pids $k); done
    [ -z "$left" ] && break
    sleep 0.1
  done
  [ -z "$left" ] || { echo "FAIL: $1: ranks still alive $2 s after the fault"; fail=1; }
  echo "$1: every rank exited $(( $(date +%s) - t0 )) s after the fault"
}
# names_peer NAME: a watchdog message names host 2's ranks (2, 3), and only
# them, as the peers that did not answer its probe (unreachable or stopped).
names_peer() {
  local silent
  silent=$(grep -oE "world ranks? [0-9, ]+ did not answer the watchdog's probe" "$1.out" | head -1)
  if [ -z "$silent" ] || grep -qE "[^0-9][01][, ]" <<<"${silent% did not*} "; then
    echo "FAIL: $1: the watchdog does not name host 2's ranks as silent: '${silent}'"; cat "$1.out"; fail=1
  else
    echo "$1: the watchdog names the peer: $silent"
  fi
}
# resume NAME: the newest checkpoint verifies and a new run resumes from it and finishes.
resume_check() {
  local newest
  newest=$(ls -1d "$1"/ckpt/step_* 2>/dev/null | grep -v '\.tmp' | sort | tail -1)
  [ -n "$newest" ] || { echo "FAIL: $1: no checkpoint"; fail=1; return; }
  "$BIN/moe-ckpt" verify "$newest" > "$1.verify" 2>&1 || { echo "FAIL: $1: $newest does not verify"; cat "$1.verify"; fail=1; }
  local step=$((10#${newest##*step_}))
  cluster_launch -n 4 -- "${common[@]}" train.run_dir="$1" checkpoint.dir="$1/ckpt" train.steps=$((step + 2)) \
    > "$1.resume.out" 2>&1 || { echo "FAIL: $1: the resumed run"; cat "$1.resume.out"; fail=1; }
  grep -q "resumed from $1/ckpt/step_$(printf %08d "$step")" "$1.resume.out" ||
    { echo "FAIL: $1: did not resume from step $step"; cat "$1.resume.out"; fail=1; }
  echo "$1: $newest verifies; resumed from it and finished step $((step + 2))"
}

# 1. Link down mid-step (no checkpoints: a save's collectives have a longer deadline).
start linkdown 100000 ""
cluster_wait_for "step 3/" 120 linkdown.out || { echo "FAIL: linkdown: no step 3"; cat linkdown.out; }
cluster_link_down 2; t0=$(date +%s)
finish linkdown $((timeout_s + 10))
[ "$code" -ne 0 ] || { echo "FAIL: linkdown: exit code 0"; fail=1; }
[ "$took" -le $((timeout_s + 10)) ] || { echo "FAIL: linkdown: took $took s > timeout + 10"; fail=1; }
grep -q "moe comm watchdog.*of group '.*operation [A-Za-z]" linkdown.out ||
  { echo "FAIL: linkdown: no watchdog message naming the operation and group"; cat linkdown.out; fail=1; }
grep -q "host $(cluster_ip 2) (ranks 2-3) did not answer within 3 s: unreachable" linkdown.out ||
  { echo "FAIL: linkdown: the unreachable host is not named"; cat linkdown.out; fail=1; }
names_peer linkdown
grep -m1 "moe comm watchdog" linkdown.out; grep "did not answer within" linkdown.out
ip -n "$(cluster_ns 2)" link set moe0 up
for k in 1 2; do for p in $(cluster_rank_pids $k); do kill -9 "$p"; done; done  # the cut-off host's leftovers

# 2. kill -9 of host 2's ranks mid-step.
start kill 100000
cluster_wait_for "step 5/" 120 kill.out || { echo "FAIL: kill: no step 5"; cat kill.out; }
kill -9 $(cluster_rank_pids 2); t0=$(date +%s)
ranks_exit kill "$timeout_s"
finish kill $((timeout_s + 10))
[ "$code" -ne 0 ] || { echo "FAIL: kill: exit code 0"; fail=1; }
resume_check kill

# 3. kill -9 of host 2's ranks mid-checkpoint-save: they are stopped the
# moment a save's temporary directory appears (inotify), then killed.
start killsave 100000
cluster_wait_for "step 1/" 120 killsave.out || { echo "FAIL: killsave: no step 1"; cat killsave.out; }
mkdir -p killsave/ckpt
/usr/bin/python3 - killsave/ckpt 4 $(cluster_rank_pids 2) <<'PY'
# Waits for the temporary directory of the save of step >= argv[2], then
# SIGSTOPs and SIGKILLs the given pids.
import ctypes, os, signal, struct, sys
libc = ctypes.CDLL("libc.so.6", use_errno=True)
fd = libc.inotify_init()
libc.inotify_add_watch(fd, sys.argv[1].encode(), 0x100)  # IN_CREATE
pids = [int(p) for p in sys.argv[3:]]
while True:
    buf = os.read(fd, 4096); off = 0
    while off < len(buf):
        _, _, _, n = struct.unpack_from("iIII", buf, off)
        name = buf[off + 16: off + 16 + n].rstrip(b"\0").decode(); off += 16 + n
        if name.startswith("step_") and ".tmp" in name and int(name[5:13]) >= int(sys.argv[2]):
            for p in pids: os.kill(p, signal.SIGSTOP)
            for p in pids: os.kill(p, signal.SIGKILL)
            print(f"killed host 2's ranks as {name} appeared"); sys.exit(0)
PY
t0=$(date +%s)
ranks_exit killsave "$timeout_s"
finish killsave $((timeout_s + 10))
[ "$code" -ne 0 ] || { echo "FAIL: killsave: exit code 0"; fail=1; }
ls killsave/ckpt | grep -q '\.tmp' || { echo "FAIL: killsave: no save was in progress"; ls killsave/ckpt; fail=1; }
resume_check killsave

# 4. SIGSTOP of host 2's ranks: the watchdog of host 1's ranks ends the job.
start stop 100000 ""
cluster_wait_for "step 3/" 120 stop.out || { echo "FAIL: stop: no step 3"; cat stop.out; }
stopped=$(cluster_rank_pids 2)
kill -STOP $stopped; t0=$(date +%s)
finish stop $((timeout_s + 10))
[ "$code" -ne 0 ] || { echo "FAIL: stop: exit code 0"; fail=1; }
[ "$took" -le $((timeout_s + 10)) ] || { echo "FAIL: stop: took $took s > timeout + 10"; fail=1; }
grep -q "moe comm watchdog.*of group '.*operation [A-Za-z]" stop.out ||
  { echo "FAIL: stop: no watchdog message naming the operation and group"; cat stop.out; fail=1; }
names_peer stop
grep -m1 "moe comm watchdog" stop.out
kill -9 $stopped 2>/dev/null

test_done "cluster faults test"
