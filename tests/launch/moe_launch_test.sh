#!/usr/bin/env bash
# moe-launch: the command it prints, oversubscription, thread counts, errors,
# and a real 2-rank launch of moe-train.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/test_env.sh"
test_init "$@"
check() { expect_text "$@"; }
cores=$(nproc)
many=$((cores * 2))
out=$("$BIN/moe-launch" -n "$many" --dry-run -- --config=x 2>&1)
check "$out" "mpirun -np $many --oversubscribe"
check "$out" "OPENBLAS_NUM_THREADS=1"
check "$out" "moe-train --config=x"
out=$("$BIN/moe-launch" -n 1 --dry-run -- a b 2>&1)
check "$out" "OPENBLAS_NUM_THREADS=$cores"
if grep -q -- "--oversubscribe" <<<"$out"; then echo "FAIL: 1 rank oversubscribed"; fail=1; fi
out=$("$BIN/moe-launch" -n 0 2>&1); code=$?
[ $code -eq 2 ] || { echo "FAIL: -n 0 exit $code"; fail=1; }
check "$out" "-n RANKS is required"
out=$("$BIN/moe-launch" -n 2 --hostfile /nonexistent 2>&1); code=$?
[ $code -eq 2 ] || { echo "FAIL: bad hostfile exit $code"; fail=1; }
check "$out" "cannot be read"
out=$("$BIN/moe-launch" -n 2 --program no-such-tool -- x 2>&1); code=$?
[ $code -eq 2 ] || { echo "FAIL: bad program exit $code"; fail=1; }
# A real launch: the layout of 2 ranks with expert parallelism 2.
out=$("$BIN/moe-launch" -n 2 -- --config="$SRC/configs/demo.textproto" --print-config 2>&1); code=$?
[ $code -eq 0 ] || { echo "FAIL: real launch exit $code"; echo "$out"; fail=1; }
check "$out" "EP groups   {0,1}"
test_done "moe-launch test"
