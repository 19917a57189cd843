#!/usr/bin/env bash
# moe-train under a real 4-rank mpirun: the demo config prints the layout; each
# bad config fails with its message and exit code 2 on every rank, before any
# work (no run directory is created). Each rank's own exit code is recorded by a
# wrapper (mpirun is told not to kill the others when one exits non-zero), so
# a rank that hangs, is aborted or exits otherwise shows up.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/test_env.sh"
test_init "$@"
run() { mpirun_counted 4 cfg "$BIN/moe-train" "$@"; }

run --config="$SRC/configs/demo.textproto" --print-config
ranks_exited cfg 0 4 && expect_in cfg.out "EP groups   {0,1} {2,3}"

expect() {  # expect "message" args...
  local message="$1"; shift
  run "$@"  # (mpirun's own code is 0 when told not to abort: count the ranks')
  expect_in cfg.out "$message" || return
  ranks_exited cfg 2 4 || return  # every rank exits 2 by itself
  if [ -d runs ]; then test_fail "a run directory was written for: $*"; fi
}
D="--config=$SRC/configs/demo.textproto"
expect "parallel.expert = 3 must divide model.moe.num_experts = 8" "$D" parallel.expert=3
expect "parallel.tensor = 3 must divide model.num_heads = 4" "$D" parallel.tensor=3 parallel.data=1 parallel.expert=1
expect "world size 4 is not parallel.tensor x parallel.data = 2 x 4" "$D" parallel.tensor=2 parallel.data=4
expect "model.moe.top_k = 9 must be at most model.moe.num_experts = 8" "$D" model.moe.top_k=9
expect "model has no field 'hiden_size'" "$D" model.hiden_size=3
expect 'model.moe.score_function = "tanh" must be "softmax" or "sigmoid"' "$D" model.moe.score_function=tanh
expect "model.moe.group_topk = 3 must be at most model.moe.num_expert_groups = 2" "$D" model.moe.group_topk=3 parallel.expert=2
expect "model.moe.num_expert_groups = 65 is more than the router's 64 groups" "$D" model.moe.num_experts=130 model.moe.num_expert_groups=65 model.moe.group_topk=2
expect 'comm.backend = "nccl" moves device buffers, but train.device = "cpu" keeps tensors on the host; set comm.backend = "mpi" or "auto"' "$D" comm.backend=nccl
# A GPU this machine cannot use: a CPU-only build refuses train.device = "cuda"
# at validation; a CUDA build without a usable GPU (as on CI) names it at
# start-up (before that check it was a raw CUDA error, exit 1, after creating
# the run directory). Either way: exit 2 on every rank, nothing written.
if nvidia-smi -L > /dev/null 2>&1; then
  echo "skipped: train.device = cuda (a GPU is visible here)"
else
  expect 'train.device = "cuda": ' "$D" train.device=cuda
  grep -qE 'train.device = "cuda": (this build trains on "cpu" only|no usable CUDA device|no CUDA device)' cfg.out ||
    test_fail "train.device = cuda: neither the build nor the device named" cfg.out
fi
MOE_COMM_FAULT="rank=1,kind=Gather,seq=0,action=hang" \
  expect 'MOE_COMM_FAULT="rank=1,kind=Gather,seq=0,action=hang": kind=Gather is not an operation' "$D"
expect "cannot open config file" --config=/nonexistent.textproto
printf 'model {\n  hidden_size: 12\n  bogus: 1\n}\n' > bad.textproto
expect "bad.textproto:3:" --config=bad.textproto
expect "--config=FILE is required"
test_done "bad config test"
