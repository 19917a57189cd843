#!/usr/bin/env bash
# moe-bench llep-plan: reads a JSON count table, prints the plan as JSON.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/test_env.sh"
test_init "$@"
echo '{"counts": [[3000, 10, 10, 10], [3000, 10, 10, 10]], "min_tokens_per_gemm": 64}' > "$TMP/c.json"
out=$("$BIN/moe-bench" llep-plan counts="$TMP/c.json" 2>&1) || { echo "FAIL: exit $?"; echo "$out"; fail=1; }
for want in '"active":true' '"load_before":[6020,40]' '"weight_moves":[{"expert":0,"src":0,"dst":1},{"expert":1,"src":0,"dst":1}]'; do
  grep -qF "$want" <<<"$out" || { echo "FAIL: no $want in $out"; fail=1; }
done
# The same table under a high trigger ratio stays standard EP.
out=$("$BIN/moe-bench" llep-plan counts="$TMP/c.json" trigger_ratio=5 2>&1)
grep -qF '"active":false' <<<"$out" || { echo "FAIL: trigger_ratio=5 fired: $out"; fail=1; }
# Bad input: a clear message and a non-zero exit.
echo '{"counts": [[1, 2], [1]]}' > "$TMP/bad.json"
out=$("$BIN/moe-bench" llep-plan counts="$TMP/bad.json" 2>&1) && { echo "FAIL: ragged table accepted"; fail=1; }
grep -qF "rank 1 has 1 expert counts" <<<"$out" || { echo "FAIL: message: $out"; fail=1; }
out=$("$BIN/moe-bench" llep-plan counts="$TMP/none.json" 2>&1) && { echo "FAIL: missing file accepted"; fail=1; }
grep -qF "cannot open counts file" <<<"$out" || { echo "FAIL: message: $out"; fail=1; }
test_done "llep-plan tool test"
