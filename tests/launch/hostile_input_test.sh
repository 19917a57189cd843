#!/usr/bin/env bash
# moe-train against hostile input under a real 2-rank mpirun (issue 18): each
# case must stop every rank with its message and exit code 2 before any work,
# leave no run directory behind (a bad config) and lose nothing on disk (a
# previous run's config copy stays as it was).
source "$(dirname "${BASH_SOURCE[0]}")/../lib/test_env.sh"
test_init "$@"
D="--config=$SRC/configs/demo.textproto"
T="$BIN/moe-train"

check() {  # check WANT_CODE "message" EXIT_CODE
  local want="$1" message="$2" code="$3"
  if [ "$code" != "$want" ]; then echo "FAIL: exit $code, want $want for: $message"; cat "$TMP/out"; fail=1; return 1; fi
  if ! grep -qF -- "$message" "$TMP/out"; then echo "FAIL: no '$message'"; cat "$TMP/out"; fail=1; return 1; fi
  echo "ok: $message"
}
expect() {  # expect "message" args... (2 ranks, same arguments)
  local message="$1"; shift
  test_mpirun -np 2 "$T" "$@" >"$TMP/out" 2>&1
  check 2 "$message" $? || return
  if [ -e "$TMP/runs" ]; then echo "FAIL: a run directory was written for: $*"; fail=1; rm -rf "$TMP/runs"; fi
}

# Non-finite and out-of-range settings.
expect "optim.lr = inf must be a finite number" "$D" optim.lr=inf
expect "optim.weight_decay = inf must be a finite number" "$D" optim.weight_decay=inf
expect "optim.clip_grad = nan must be a finite number" "$D" optim.clip_grad=nan
expect "model.moe.aux_loss_coeff = nan must be a finite number" "$D" model.moe.aux_loss_coeff=nan
expect "model.moe.capacity_factor = nan must be a finite number" "$D" model.moe.capacity_factor=nan
expect "model.moe.z_loss_coeff = -1 must be >= 0" "$D" model.moe.z_loss_coeff=-1
expect "train.eval_batches = 0 must be positive" "$D" train.eval_batches=0
expect "train.threads_per_rank = -1 must be >= 0" "$D" train.threads_per_rank=-1
expect "model.moe.moe_layer_freq = 0 must be positive" "$D" model.moe.moe_layer_freq=0
expect "data.train_path is empty" "$D" data.train_path=
# Config files that are not configs.
: > empty.textproto
expect "config file 'empty.textproto' is empty" --config=empty.textproto
mkdir cfgdir
expect "--config='cfgdir' is a directory" --config=cfgdir
expect "--startup-timeout-s='x' must be a positive number of seconds" "$D" --startup-timeout-s=x

# Ranks that disagree (an MPMD launch): exit 2 naming the field and the ranks.
mpmd() {  # mpmd "message" rank1-overrides...
  local message="$1"; shift
  test_mpirun -np 1 "$T" "$D" : -np 1 "$T" "$D" "$@" >"$TMP/out" 2>&1
  check 2 "$message" $?
  if [ -e "$TMP/runs" ]; then echo "FAIL: a run directory was written for: $*"; fail=1; rm -rf "$TMP/runs"; fi
}
mpmd "model.hidden_size is 128 on rank 0 but 64 on rank 1" model.hidden_size=64
mpmd "model.num_layers is 4 on rank 0 but 2 on rank 1" model.num_layers=2
mpmd "train.seed is 1234 on rank 0 but 7 on rank 1" train.seed=7
mpmd "train.steps is 600 on rank 0 but 500 on rank 1" train.steps=500 optim.decay_steps=600
mpmd "rank 1: invalid config" model.moe.top_k=9

# A job that cannot fit in memory: the estimate and its largest terms.
expect "the job does not fit in memory: predicted peak" "$D" model.hidden_size=65536 model.num_layers=64
expect "AdamW exp_avg + exp_avg_sq" "$D" model.hidden_size=65536 model.num_layers=64
expect "the model does not fit: its weights alone need" "$D" model.hidden_size=2000000000 model.num_heads=1 model.num_kv_heads=1

# Directories that cannot be written, found before step 1; the previous run's
# config copy is kept.
mkdir -p prev && echo "previous run" > prev/config.textproto
: > afile
long="$(printf 'x%.0s' $(seq 300))"
for bad in "checkpoint.dir=afile/ckpt" "checkpoint.dir=$long" "train.run_dir=afile"; do
  test_mpirun -np 2 "$T" "$D" train.run_dir=prev "$bad" >"$TMP/out" 2>&1
  check 2 "${bad%%=*} = '" $?
  grep -qF "is not usable" "$TMP/out" || { echo "FAIL: no 'is not usable' for $bad"; fail=1; }
  [ "$(cat prev/config.textproto)" = "previous run" ] || { echo "FAIL: $bad overwrote the previous config"; fail=1; }
done

# A rank stalled before MPI initialisation: the start-up deadline ends the job.
start=$(date +%s)
test_mpirun -np 1 "$T" "$D" --startup-timeout-s=3 : \
  -np 1 env MOE_FAULT_STALL_BEFORE_INIT_S=60 "$T" "$D" --startup-timeout-s=3 >"$TMP/out" 2>&1
code=$?
took=$(( $(date +%s) - start ))
check 124 "start-up did not finish within 3 s" "$code"
[ "$took" -lt 40 ] || { echo "FAIL: the stalled start-up took $took s"; fail=1; }
test_done "hostile input test"
