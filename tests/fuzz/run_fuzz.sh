#!/usr/bin/env bash
# Runs the libFuzzer harnesses (issue 18): first every saved regression input
# once (tests/fuzz/regressions/NAME/, inputs that once crashed), then each
# harness for SECONDS from its seed corpus (tests/fuzz/corpus/NAME/, read
# only: new inputs go to a temporary folder).
#
#   bash tests/fuzz/run_fuzz.sh FUZZ_BIN_DIR [SECONDS=30] [NAME ...]
#
# A crash, sanitizer report, leak or timeout fails the run and keeps the
# input in FUZZ_BIN_DIR/artifacts/; fix the bug, then add the input to
# tests/fuzz/regressions/NAME/ so it is replayed every time. The random seed
# is fixed (MOE_FUZZ_SEED, default 1) so a run can be repeated; the inputs a
# time-bounded run reaches still depend on the machine's speed.
set -uo pipefail
BIN="$1"; SECS="${2:-30}"; shift; [ $# -gt 0 ] && shift
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(indexed_dataset hdf5_dataset manifest config json_text llep_counts)
# Every sanitizer finding stops the harness with a non-zero exit.
export ASAN_OPTIONS="halt_on_error=1:abort_on_error=1:detect_leaks=1:allocator_may_return_null=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
mkdir -p "$BIN/artifacts"
fail=0
for name in "${names[@]}"; do
  exe="$BIN/fuzz_$name"
  if [ ! -x "$exe" ]; then echo "FAIL: $exe is not built"; fail=1; continue; fi
  work="$(mktemp -d)"
  regressions=("$HERE/regressions/$name"/*)
  if [ -e "${regressions[0]}" ]; then
    if ! "$exe" "${regressions[@]}" >"$work/log" 2>&1; then
      echo "FAIL: $name: a regression input crashes again"; tail -40 "$work/log"; fail=1; rm -rf "$work"; continue
    fi
  fi
  mkdir "$work/corpus"
  "$exe" -seed="${MOE_FUZZ_SEED:-1}" -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048 \
    -artifact_prefix="$BIN/artifacts/${name}-" -print_final_stats=1 "$work/corpus" "$HERE/corpus/$name" \
    >"$work/log" 2>&1
  code=$?
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$work/log" | grep -o '[0-9]*$')
  if [ "$code" -ne 0 ]; then
    echo "FAIL: fuzz_$name (exit $code); input kept in $BIN/artifacts/:"; grep -E "ERROR|SUMMARY|runtime error|Test unit written" "$work/log" | head -10
    tail -60 "$work/log"
    fail=1
  else
    echo "ok: fuzz_$name ${SECS}s, ${runs:-?} inputs, corpus $(ls "$work/corpus" | wc -l) new"
  fi
  rm -rf "$work"
done
exit $fail
