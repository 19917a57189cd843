#!/usr/bin/env bash
# Never hang: a rank that skips a collective makes the watchdog abort the job
# with exit code 124 (comm/watchdog.h kWatchdogExitCode) within timeout + 10 s,
# printing rank, group, operation, sequence, bytes and the wait, and the peers
# its probe found silent (a stopped rank) or running something else (the one
# that skipped); a rank that calls abort() or exits without finalising takes
# the job down too, non-zero.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/test_env.sh"
test_init "$@"
run() {  # run NAME RANKS LIMIT_S WANT_CODE ARGS...: sets out, code, took (WANT_CODE "nonzero": any but 0)
  local name=$1 ranks=$2 limit=$3 want=$4; shift 4
  local start=$(date +%s.%N)
  # SIGKILL on the test's own deadline (exit 137), so 124 can only be the watchdog's.
  out=$(test_mpirun -np "$ranks" "$BIN/comm_fault_job" "$@" 2>&1); code=$?
  took=$(echo "$(date +%s.%N) - $start" | bc)
  echo "== $name: exit $code after ${took}s (limit ${limit}s)"
  if [ "$code" -eq 0 ]; then echo "FAIL: $name exited 0"; echo "$out"; fail=1; fi
  if [ "$code" -eq 137 ]; then echo "FAIL: $name hit the test's own timeout"; fail=1; fi
  if [ "$want" != nonzero ] && [ "$code" -ne "$want" ]; then echo "FAIL: $name exited $code, want $want"; echo "$out"; fail=1; fi
  if (( $(echo "$took > $limit" | bc) )); then echo "FAIL: $name took ${took}s > ${limit}s"; echo "$out"; fail=1; fi
  if ! grep -q "^ready" <<<"$out"; then echo "FAIL: $name never got ready"; echo "$out"; fail=1; fi
}
check() { expect_text "$@"; }

run skip 2 13 124 skip 3
check "$out" "[moe comm watchdog] world rank 0, rank 0 of group 'world' (2 ranks; world ranks 0,1), backend mpi"
check "$out" "operation AllReduce (sequence 1, 4096 bytes sent, 4096 bytes received) has waited"
check "$out" "past its deadline of 3.0 s"
# Rank 1 answers the probe at once: the abort still waits for the deadline
# (it once came up to the probe's 1 s early, "waited 2.0 s, past 3.0 s").
waited=$(grep -o 'has waited [0-9.]* s, past its deadline of 3.0 s' <<<"$out" | head -1 | cut -d' ' -f3)
if [ -z "$waited" ] || awk -v w="$waited" 'BEGIN { exit !(w < 3.0) }'; then
  echo "FAIL: the watchdog aborted after ${waited:-?} s, before the 3.0 s deadline"; echo "$out"; fail=1
fi
# The watchdog probed rank 1: alive, in no operation (it skipped the collective).
check "$out" "world rank 1 runs no communicator operation. Aborting the job."

run skip3 3 13 124 skip 3
check "$out" "world ranks 0,1,2"
check "$out" "operation AllReduce (sequence 1"
check "$out" "world rank 1 runs no communicator operation"
# Rank 0 and 2 probe each other while both wait in the same collective.
check "$out" "runs AllReduce (sequence 1) on group 'world' for"

# A stopped rank does not answer the probe: the message names it.
run stop 3 13 124 stop 3
check "$out" "world rank 1 did not answer the watchdog's probe within 1.0 s (unreachable or stopped)"

# abort() and exit without finalize: mpirun ends the job; 30 s is the deadline here.
run abort 3 40 nonzero abort 30
run exit 3 40 nonzero exit 30
test_done "watchdog test"
