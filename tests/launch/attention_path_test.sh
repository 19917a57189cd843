#!/usr/bin/env bash
# The attention path (MOE_ATTENTION, runtime/core/attention_gemm.h) end to end
# on the CPU: 10 steps of the demo model (2 layers) with the fused kernel and
# with the chunked GEMM driver (the algorithm the CUDA backend runs on cuBLAS)
# give the same per-step losses within 1e-4 relative (the two sum scores in
# other orders, and AdamW's first steps amplify ulp-level differences), at 1
# rank and at tp 2 (each rank's heads, grouped KV heads split across ranks);
# and in bf16; MOE_ATTENTION=flash on the CPU is the fused kernel. A bad MOE_ATTENTION or MOE_ATTENTION_WORKSPACE_MB is refused at
# start-up naming the variable, before any file is written.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/test_env.sh"
test_init "$@"
TEST_MPI_LIMIT=${TEST_MPI_LIMIT:-240}
test_corpus 80 || exit 1
common=(--config="$SRC/configs/demo.textproto" data.train_path=data/corpus train.device=cpu
        optim.warmup_steps=2 train.log_every=1 train.eval_every=0 train.steps=10 checkpoint.save_every=0
        model.num_layers=2 model.seq_len=64 train.micro_batch=2 parallel.expert=1 llep.enabled=false)
run() {  # run NAME RANKS ARGS...
  local name=$1 ranks=$2; shift 2
  test_mpirun -np "$ranks" "$BIN/moe-train" "${common[@]}" train.run_dir="$name" checkpoint.dir="$name/ckpt" "$@" \
    > "$name.out" 2>&1 || test_fail "$name: exit code $?" "$name.out"
}
run fused 1
MOE_ATTENTION=gemm run gemm 1
expect_in gemm.out "attention path: gemm (MOE_ATTENTION)"
expect_in fused.out "attention path: fused (MOE_ATTENTION)"
compare_losses fused gemm 1e-4 10 "gemm vs fused attention, 1 rank (fp32)" || fail=1
MOE_ATTENTION=gemm run gemm_tp2 2 parallel.tensor=2
compare_losses fused gemm_tp2 1e-4 10 "gemm attention at tp 2 vs fused at 1 rank (fp32)" || fail=1
run fused_bf16 1 train.precision=bf16
MOE_ATTENTION=gemm run gemm_bf16 1 train.precision=bf16
compare_losses fused_bf16 gemm_bf16 2e-2 10 "gemm vs fused attention, 1 rank (bf16)" || fail=1
# MOE_ATTENTION=flash is CUDA's tensor-core kernel; the CPU backend runs its
# fused kernel for it: the same losses as the fused run, bit for bit.
MOE_ATTENTION=flash run flash_bf16 1 train.precision=bf16
expect_in flash_bf16.out "attention path: flash (MOE_ATTENTION)"
compare_losses fused_bf16 flash_bf16 0 10 "flash (CPU: the fused kernel) vs fused attention (bf16)" || fail=1

# Bad values: usage errors (exit 2) naming the variable, no run directory made.
for bad in "MOE_ATTENTION=flash2" "MOE_ATTENTION_WORKSPACE_MB=0" "MOE_ATTENTION_WORKSPACE_MB=lots"; do
  env "$bad" "$BIN/moe-train" "${common[@]}" train.run_dir=bad checkpoint.dir=bad/ckpt > bad.out 2>&1
  code=$?
  [ "$code" = 2 ] || test_fail "$bad: exit code $code, want 2 (usage)" bad.out
  expect_in bad.out "${bad%%=*}"
  [ ! -e bad ] || test_fail "$bad: the run directory was created before the refusal"
done
expect_in bad.out "want a whole number of MiB"
test_done "attention path test"
