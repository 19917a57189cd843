#!/usr/bin/env bash
# moe-launch --max-restarts on a 3-host x 2-rank namespace cluster (tensor 2
# inside a host, expert 3 across hosts, data 3, grad_accum 2, micro_batch 2:
# a global batch of 12 sequences):
# 1. host 3 is deleted mid-run: the launcher drops it (health probe), picks
#    tensor 2, expert 1, data 2, grad_accum 3, resumes from the newest valid
#    checkpoint and finishes on 2 hosts; the losses after the checkpoint equal
#    those of a fresh run on 2 hosts from the same checkpoint;
# 2. when the global batch cannot be kept on 2 hosts (grad_accum 1: 6
#    sequences over data 2 x micro_batch 2) the launcher stops and names the
#    host counts that would keep it;
# 3. with --allow-batch-change it rounds grad_accum to the nearest whole one
#    instead (2: a batch of 8), logs the change and finishes.
source "$(dirname "${BASH_SOURCE[0]}")/cluster_lib.sh"
cluster_init "$1" "$2"
cluster_corpus || exit 1
cluster_up 3 2 || exit 1
common=(--config="$SRC/configs/demo.textproto" data.train_path="$CLUSTER_CORPUS" parallel.tensor=2
        parallel.expert=3 model.moe.num_experts=6 model.num_layers=1 model.seq_len=32 model.hidden_size=64
        model.ffn_hidden_size=128 model.moe.expert_ffn_hidden_size=128 train.micro_batch=2 train.log_every=1
        train.eval_every=0 train.eval_batches=1 optim.warmup_steps=1 comm.timeout_s=10)
restart=(--max-restarts 1 --probe-timeout 3)
expect() { grep -qF -- "$2" "$1" || { echo "FAIL: $1 lacks: $2"; cat "$1"; fail=1; }; }

# 1. Host 3 deleted mid-run: the job finishes on 2 hosts.
cluster_launch -n 6 "${restart[@]}" -- "${common[@]}" train.grad_accum=2 train.steps=8 train.run_dir=auto \
  checkpoint.dir=auto/ckpt checkpoint.save_every=2 > auto.out 2>&1 &
pid=$!
cluster_wait_for "step 5/" 120 auto.out || { echo "FAIL: auto: no step 5"; cat auto.out; }
cluster_delete_host 3
wait $pid; code=$?
[ "$code" -eq 0 ] || { echo "FAIL: auto: exit code $code"; cat auto.out; fail=1; }
grep "moe-launch: " auto.out | grep -v "moe-launch: mpirun"
expect auto.out "host $(cluster_ip 3) (ranks 4-5) did not answer within 3 s: unreachable, dropped"
expect auto.out "expert 3 does not divide data 2: expert size lowered to 1"
expect auto.out "layout for restart 1: tensor 2, expert 1, data 2, grad_accum 3 (global batch 12)"
expect auto.out "finished after 1 restart(s)"
ckpt=$(sed -n 's/.*restart 1 resumes from \(.*\) (newest valid checkpoint).*/\1/p' auto.out)
[ -n "$ckpt" ] || { echo "FAIL: auto: no resume decision logged"; fail=1; }
step=$((10#${ckpt##*step_}))
[ "$step" -ge 4 ] || { echo "FAIL: auto: resumed from step $step, expected >= 4"; fail=1; }
grep -q "step 8/8" auto.out || { echo "FAIL: auto: no step 8"; fail=1; }

# A fresh run on 2 hosts from that checkpoint, laid out as the launcher chose.
head -2 "$CLUSTER_HOSTFILE" > two_hosts
mkdir -p fresh/ckpt && cp -r "$ckpt" fresh/ckpt/
ip netns exec "$(cluster_ns 1)" unshare --uts /bin/sh -c 'hostname "$0" && exec "$@"' "$(cluster_ns 1)" \
  "$BIN/moe-launch" -n 4 --hostfile two_hosts --rsh-agent "$CLUSTER_AGENT" --net "$CLUSTER_CIDR" -- \
  "${common[@]}" parallel.expert=1 train.grad_accum=3 train.steps=8 train.run_dir=fresh checkpoint.dir=fresh/ckpt \
  > fresh.out 2>&1 || { echo "FAIL: the fresh run"; cat fresh.out; fail=1; }
cluster_compare_losses fresh/metrics.jsonl auto/metrics.jsonl 1e-5 $((step + 1)) || fail=1

# 2. The batch cannot be kept: with grad_accum 1 (6 sequences) no whole
# accumulation keeps it on the 2 hosts left; the launcher stops and names the
# host counts that would. (Host 3 is gone: the first launch fails at once.)
cluster_launch -n 6 "${restart[@]}" -- "${common[@]}" train.grad_accum=1 train.steps=4 train.run_dir=nobatch \
  checkpoint.dir=nobatch/ckpt > nobatch.out 2>&1
code=$?
[ "$code" -ne 0 ] || { echo "FAIL: nobatch: exit 0"; fail=1; }
expect nobatch.out "host $(cluster_ip 3) (ranks 4-5) did not answer"
expect nobatch.out "no whole grad_accum keeps the global batch of 6 sequences on data 2 x micro_batch 2; host counts that would: 1 3"
grep "moe-launch: no whole" nobatch.out

# 3. The same with --allow-batch-change: the launcher rounds the accumulation
# to the nearest whole one (6 sequences over data 2 x micro_batch 2 = 4 per
# accumulation step: 1.5, so grad_accum 2 and a batch of 8), says so, and the
# run finishes on the 2 hosts left with that layout.
cluster_launch -n 6 "${restart[@]}" --allow-batch-change -- "${common[@]}" train.grad_accum=1 train.steps=2 \
  train.run_dir=changed checkpoint.dir=changed/ckpt > changed.out 2>&1
code=$?
[ "$code" -eq 0 ] || { echo "FAIL: changed: exit code $code"; cat changed.out; fail=1; }
expect changed.out "global batch changes from 6 to 8 sequences (--allow-batch-change)"
expect changed.out "layout for restart 1: tensor 2, expert 1, data 2, grad_accum 2 (global batch 8)"
expect changed.out "finished after 1 restart(s)"
grep -q "step 2/2" changed.out || { echo "FAIL: changed: no step 2"; cat changed.out; fail=1; }
grep "moe-launch: global batch changes" changed.out

test_done "cluster restart test"
