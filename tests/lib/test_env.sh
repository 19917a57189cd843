#!/usr/bin/env bash
# The common set-up of the shell tests (tests/launch, tests/comm,
# tests/cluster), sourced by each. ctest runs a script as
# `bash SCRIPT BIN_DIR SOURCE_DIR` (moe_add_script_test in tests/CMakeLists.txt);
# run by hand, the same two arguments work (as root too).
#
#   source "$(dirname "${BASH_SOURCE[0]}")/../lib/test_env.sh"
#   test_init "$@"              # BIN, SRC (absolute), TMP (the working directory,
#                               # removed on exit, also on failure), fail=0
#   test_corpus 60              # a small text corpus, preprocessed: $CORPUS
#   test_mpirun -np 2 ARGS...   # mpirun --oversubscribe, killed after $TEST_MPI_LIMIT s
#   mpirun_counted 4 NAME ARGS...   # ARGS on 4 ranks, each rank's exit code recorded,
#   ranks_exited NAME 2 4       # ... and checked: every one of the 4 exited 2
#   expect_in FILE TEXT         # FILE holds TEXT ("ok: TEXT"), else a failure
#   expect_text "$out" TEXT     # the same for a string
#   test_fail MESSAGE [FILE...] # "FAIL: MESSAGE", the files shown, fail=1
#   test_at_exit COMMAND        # run at exit before TMP is removed (teardown)
#   test_done "NAME test"       # "NAME test passed" or FAILED, its time; exits $fail
#   skip_without_gpu CODE OUT   # a moe-train run that exited CODE with output OUT
#                               # for want of a usable GPU: "skipped: why", exit 77
#   compare_losses REF DIR TOL STEPS WHAT   # DIR's per-step training losses within
#                               # TOL relative of REF's (metrics.jsonl), all finite
set -uo pipefail

TEST_LIB="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TEST_MPI_LIMIT=${TEST_MPI_LIMIT:-120}  # seconds before test_mpirun kills mpirun (exit 137)
TEST_AT_EXIT=()

test_init() {
  BIN="$(cd "$1" && pwd)" || exit 1
  SRC="$(cd "$2" && pwd)" || exit 1
  TEST_T0=$(date +%s)
  TMP="$(mktemp -d "${TMPDIR:-/tmp}/moe-test.XXXXXX")" || exit 1
  trap _test_on_exit EXIT
  trap 'exit 143' TERM INT
  cd "$TMP" || exit 1
  fail=0
  export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
  if [ "$(id -u)" -eq 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
}

test_at_exit() { TEST_AT_EXIT+=("$*"); }

# The EXIT trap: the registered teardowns, last first, then TMP.
_test_on_exit() {
  local code=$? i
  for ((i = ${#TEST_AT_EXIT[@]} - 1; i >= 0; i--)); do eval "${TEST_AT_EXIT[i]}"; done
  cd / && [ -n "${TMP:-}" ] && rm -rf "$TMP"
  exit $code
}

# Seconds since test_init.
test_elapsed() { echo $(( $(date +%s) - TEST_T0 )); }

test_fail() {
  local message="$1" f
  shift
  echo "FAIL: $message"
  for f in "$@"; do cat "$f"; done
  fail=1
  return 1
}

expect_in() {
  if grep -qF -- "$2" "$1" 2>/dev/null; then echo "ok: $2"; else test_fail "no '$2' in $1:" "$1"; fi
}
expect_text() {
  if grep -qF -- "$2" <<<"$1"; then echo "ok: $2"; else echo "FAIL: no '$2' in:"; echo "$1"; fail=1; return 1; fi
}

test_done() {
  if [ "$fail" = 0 ]; then echo "$1 passed"; else echo "$1 FAILED"; fi
  echo "$1 took $(test_elapsed) s"
  exit "$fail"
}

# test_corpus DOCS: DOCS fortune-style documents in $TMP/text, preprocessed
# by moe-preprocess into $TMP/data/corpus ($CORPUS).
test_corpus() {
  local i
  mkdir -p "$TMP/text" "$TMP/data"
  : > "$TMP/text/a.txt"
  for i in $(seq 1 "$1"); do
    printf 'fortune %d: a penny saved is a penny earned.\n%%\nthe early bird catches the worm, number %d.\n%%\n' \
      "$i" "$i" >> "$TMP/text/a.txt"
  done
  CORPUS="$TMP/data/corpus"
  "$BIN/moe-preprocess" --quiet --output-prefix "$CORPUS" --split=percent "$TMP/text" ||
    test_fail "moe-preprocess of the test corpus"
}

test_mpirun() { timeout -s KILL "$TEST_MPI_LIMIT" mpirun --oversubscribe "$@"; }

# mpirun_counted RANKS NAME ARGS...: ARGS as every rank of a RANKS-rank job,
# output in $TMP/NAME.out, each rank's own exit code in $TMP/NAME.exits/
# (mpirun is told not to kill the others when one exits non-zero, so a rank
# that would hang or be aborted shows up as a missing or wrong code).
mpirun_counted() {
  local ranks=$1 name=$2
  shift 2
  export EXITS="$TMP/$name.exits"
  rm -rf "$EXITS" && mkdir -p "$EXITS"
  test_mpirun -np "$ranks" --mca orte_abort_on_non_zero_status 0 bash "$TEST_LIB/record_exit.sh" "$@" \
    > "$TMP/$name.out" 2>&1
}
# The recorded exit codes of NAME's ranks, sorted: "2 2 2 2 ".
rank_codes() { cat "$TMP/$1.exits"/rank.* 2>/dev/null | sort | tr '\n' ' '; }
# ranks_exited NAME WANT RANKS: every one of RANKS ranks exited WANT by itself.
ranks_exited() {
  local codes want="" i
  codes=$(rank_codes "$1")
  for i in $(seq 1 "$3"); do want+="$2 "; done
  [ "$codes" = "$want" ] ||
    test_fail "$1: rank exit codes '$codes', want $2 on each of $3 ranks" "$TMP/$1.out"
}

skip_without_gpu() {
  local code=$1 out=$2
  local why='(no usable CUDA device|no CUDA device|this build has no CUDA backend|this build trains on "cpu" only)'
  if [ "$code" != 0 ] && grep -q -E "$why" "$out"; then
    echo "skipped: $(grep -o -E "$why[^;]*" "$out" | head -1)"
    exit 77
  fi
}

compare_losses() {
  python3 - "$1/metrics.jsonl" "$2/metrics.jsonl" "$3" "$4" "$5" <<'PY'
import json, math, sys
def losses(p):
    return [json.loads(l)["loss"] for l in open(p) if '"event":"train"' in l]
ref, got, tol, steps, what = losses(sys.argv[1]), losses(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
assert len(ref) == len(got) == steps, (len(ref), len(got), steps)
worst = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(got, ref))
ok = all(math.isfinite(x) for x in got) and worst <= tol
print(("%s: %d steps, worst relative loss difference %.3g" % (what, steps, worst)) + ("" if ok else " > %g: FAIL" % tol))
sys.exit(0 if ok else 1)
PY
}
