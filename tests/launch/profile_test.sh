#!/usr/bin/env bash
# profile.trace on a real 4-rank run (EP 2, DP 4, LLEP on and set to fire
# on any skew, so its weight moves are in the trace whatever the load): the trace schema
# (tests/launch/profile_check.py), moe-profile merge and report, the report
# opened in headless Chromium (no console errors, a screenshot, the DOM holds
# the summary, the heatmap and the matrix), and bad input (exit 2).
source "$(dirname "${BASH_SOURCE[0]}")/../lib/test_env.sh"
test_init "$@"
test_corpus 60 || exit 1
"$BIN/moe-launch" -n 4 -- --config="$SRC/configs/demo.textproto" data.train_path=data/corpus train.run_dir=run \
  checkpoint.dir= optim.warmup_steps=2 train.eval_every=3 train.eval_batches=1 model.num_layers=2 \
  model.seq_len=32 train.steps=6 profile.trace=true profile.trace_steps=3 \
  llep.cost_model=false llep.min_tokens_per_gemm=1 llep.trigger_ratio=1.1 > out 2>&1 || { echo "FAIL: run"; cat out; exit 1; }
python3 "$SRC/tests/launch/profile_check.py" trace run/trace 4 || fail=1
"$BIN/moe-profile" merge run > merge.out 2>&1 || { echo "FAIL: merge"; cat merge.out; fail=1; }
python3 -c "import json,sys; t=json.load(open('run/trace/merged.json')); assert {e['pid'] for e in t['traceEvents']} == {0,1,2,3}" \
  || { echo "FAIL: merged timeline lacks ranks"; fail=1; }
"$BIN/moe-profile" report run > report.out 2>&1 || { echo "FAIL: report"; cat report.out; fail=1; }
cat report.out
if command -v chromium >/dev/null; then
  flags=(--headless --no-sandbox --disable-gpu --no-first-run --enable-logging=stderr --v=0)
  chromium "${flags[@]}" --window-size=1300,2400 --screenshot="$TMP/report.png" "file://$TMP/run/report.html" \
    > shot.out 2>&1
  [ -s report.png ] || { echo "FAIL: no screenshot"; cat shot.out; fail=1; }
  chromium "${flags[@]}" --dump-dom "file://$TMP/run/report.html" > dom.html 2> dom.err
  # Console messages are logged as "CONSOLE(...)" / ":INFO:CONSOLE" lines.
  if grep -i "console" shot.out dom.err | grep -iq "error\|uncaught"; then
    echo "FAIL: console errors"; grep -i console shot.out dom.err; fail=1
  fi
  python3 "$SRC/tests/launch/profile_check.py" dom dom.html || fail=1
else
  echo "FAIL: chromium is not installed (launch/setup.sh installs it)"; fail=1
fi
# Bad input: exit 2 with a message naming the problem.
expect2() {  # expect2 WHAT PATTERN ARGS...
  local what="$1" pat="$2"; shift 2
  "$BIN/moe-profile" "$@" > bad.out 2>&1; local code=$?
  [ $code = 2 ] || { echo "FAIL: $what: exit $code"; cat bad.out; fail=1; }
  grep -q "$pat" bad.out || { echo "FAIL: $what: message"; cat bad.out; fail=1; }
}
mkdir nometrics empty
touch empty/metrics.jsonl
expect2 "no metrics" "metrics.jsonl' does not exist" report nometrics
expect2 "empty run" "no training step" report empty
expect2 "missing dir" "does not exist" report no_such_dir
cp -r run trunc && head -c 2000 run/trace/rank_2.json > trunc/trace/rank_2.json
expect2 "truncated trace" "rank_2.json' is not valid JSON" report trunc
expect2 "truncated trace (merge)" "rank_2.json' is not valid JSON" merge trunc
expect2 "no traces" "no per-rank traces" merge nometrics 2>/dev/null || true
test_done "profile test"
