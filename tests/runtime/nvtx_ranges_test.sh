#!/usr/bin/env bash
# nvtx_ranges_test.sh BIN SRC INJECTION_LIB (CUDA builds): a real 2-step
# moe-train on the CPU with NVTX's injection hook pointing at a counting
# library (tests/runtime/nvtx_inject.c), as Nsight Systems attaches: every
# trace span is an NVTX range of the "moe" domain, pushes and pops balance, the
# kinds are named categories and layer spans carry the layer as payload.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/test_env.sh"
inject="$(cd "$(dirname "$3")" && pwd)/$(basename "$3")"
test_init "$1" "$2"
test_corpus 40 || exit 1
NVTX_INJECTION64_PATH="$inject" test_mpirun -np 1 -x NVTX_INJECTION64_PATH "$BIN/moe-train" \
  --config="$SRC/configs/demo.textproto" data.train_path="$CORPUS" train.run_dir=run checkpoint.dir= \
  model.num_layers=2 model.seq_len=32 train.steps=2 train.eval_every=0 optim.warmup_steps=1 parallel.expert=1 \
  train.device=cpu comm.backend=mpi > out 2>&1 || test_fail "moe-train under the NVTX hook" out
grep "nvtx-inject" out
expect_in out "nvtx-inject: domain 'moe'"
expect_in out "nvtx-inject: category 2 = comm"
expect_in out "nvtx-inject:   forward cat 1 layer 0"
read -r pushes pops unbalanced layered < <(sed -n \
  's/.*pushes \([0-9]*\) pops \([0-9]*\) unbalanced \([0-9]*\) .* payload \([0-9]*\).*/\1 \2 \3 \4/p' out)
if [ "${pushes:-0}" -gt 0 ] && [ "$pushes" = "$pops" ] && [ "$unbalanced" = 0 ] && [ "${layered:-0}" -gt 0 ]; then
  echo "ok: $pushes ranges, balanced, $layered with a layer"
else
  test_fail "ranges: pushes '${pushes:-}' pops '${pops:-}' unbalanced '${unbalanced:-}' with a layer '${layered:-}'" out
fi
test_done "nvtx ranges test"
