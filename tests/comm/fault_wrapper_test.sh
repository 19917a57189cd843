#!/usr/bin/env bash
# The communicator wrapper (comm/comm_wrapper.h) on a real training job: the
# demo model on 2 ranks (EP 2) where world rank 1 hangs its first token
# all-to-all (sequence 3 of the EP group, after the LLEP rates and the
# counts). The watchdog must end the whole job with exit 124 within the
# deadline, naming the operation, the group and the sequence number; a
# bad MOE_COMM_FAULT is a usage error (exit 2) on every rank; an injected
# failure stops the job non-zero with the op named.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/test_env.sh"
test_init "$@"
test_corpus 40 || exit 1
common=(--config="$SRC/configs/demo.textproto" data.train_path=data/corpus train.run_dir=run
        checkpoint.dir=run/ckpt checkpoint.save_every=0 optim.warmup_steps=1 train.log_every=1
        train.eval_every=0 model.num_layers=2 model.seq_len=32 parallel.expert=2 train.steps=3 comm.timeout_s=4)
run() { start=$(date +%s); test_mpirun -np 2 "$BIN/moe-train" "${common[@]}" >out 2>&1; code=$?; took=$(( $(date +%s) - start )); }
check() { expect_in out "$1"; }

MOE_COMM_FAULT="rank=1,kind=AllToAllV,seq=3,action=hang,group=ep" run
echo "== hang: exit $code after ${took}s"
[ "$code" = 124 ] || { echo "FAIL: exit $code, want 124 (watchdog)"; cat out; fail=1; }
[ "$took" -le 60 ] || { echo "FAIL: took ${took}s"; fail=1; }
check "[moe comm watchdog] world rank 1"
check "group 'ep0'"
check "operation AllToAllV (sequence 3"
check "past its deadline of 4.0 s"

MOE_COMM_FAULT="rank=0,kind=AllToAllV,seq=3,action=fail,group=ep" run
echo "== fail: exit $code after ${took}s"
[ "$code" != 0 ] && [ "$code" != 124 ] || { echo "FAIL: exit $code, want a failure that is not a timeout"; cat out; fail=1; }
check "injected failure (MOE_COMM_FAULT) of AllToAllV #3 on group 'ep0', world rank 0"

MOE_COMM_FAULT="rank=1,kind=AllToAllV,seq=1,action=explode" run
echo "== bad spec: exit $code"
[ "$code" = 2 ] || { echo "FAIL: exit $code, want 2"; cat out; fail=1; }
check "action=explode must be fail, delay or hang"
test_done "fault wrapper test"
