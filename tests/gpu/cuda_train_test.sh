#!/usr/bin/env bash
# 20 training steps of the demo model (1 rank) on cuda and on cpu from the same
# seed and data: the per-step training loss must agree to 1e-4 relative in
# fp32, and to 1e-2 in bf16 (both devices round at the same points, to bf16 of
# f32 results; cuBLAS and the CPU sum in other orders, and a sum that differs
# in its last f32 bit can round to the neighbouring bf16 value).
# Without a usable GPU (a build without CUDA, no device, driver too old) it
# prints one line and exits 77 (ctest: skipped). MOE_TEST_CUDA_TRAIN names
# the binary of the cuda runs (default moe-train; emulated_cuda_train_test
# gives moe-train-cuda-emulated, the CPU suite's emulated CUDA backend).
source "$(dirname "${BASH_SOURCE[0]}")/../lib/test_env.sh"
test_init "$@"
test_corpus 80 || exit 1
common=(--config="$SRC/configs/demo.textproto" data.train_path=data/corpus parallel.expert=1 llep.enabled=false
        optim.warmup_steps=2 train.log_every=1 train.eval_every=0 train.steps=20 checkpoint.save_every=0
        model.num_layers=2 model.seq_len=64)
CUDA_TRAIN="$BIN/${MOE_TEST_CUDA_TRAIN:-moe-train}"
"$CUDA_TRAIN" "${common[@]}" train.device=cuda comm.backend=mpi train.run_dir=cuda checkpoint.dir=cuda/ckpt \
  > cuda.out 2>&1
code=$?
skip_without_gpu $code cuda.out
[ $code = 0 ] || { echo "FAIL: cuda run exit $code"; cat cuda.out; exit 1; }
"$BIN/moe-train" "${common[@]}" train.device=cpu train.run_dir=cpu checkpoint.dir=cpu/ckpt > cpu.out 2>&1 \
  || { echo "FAIL: cpu run"; cat cpu.out; exit 1; }
compare_losses cpu cuda 1e-4 20 "cuda vs cpu (fp32)" || fail=1
for dev in cuda cpu; do
  train="$BIN/moe-train"
  [ $dev = cuda ] && train="$CUDA_TRAIN"
  "$train" "${common[@]}" train.device=$dev train.precision=bf16 comm.backend=mpi train.run_dir=${dev}_bf16 \
    checkpoint.dir=${dev}_bf16/ckpt > ${dev}_bf16.out 2>&1 || { echo "FAIL: $dev bf16 run"; cat ${dev}_bf16.out; exit 1; }
done
compare_losses cpu_bf16 cuda_bf16 1e-2 20 "cuda vs cpu (bf16)" || fail=1
test_done "cuda train test"
