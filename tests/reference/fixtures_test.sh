#!/usr/bin/env bash
# The NumPy reference (tests/reference/model_ref.py) checks itself: every
# gradient of every config against central finite differences in float64 (a
# NaN or Inf fails). Then it regenerates the fixtures that
# tests/model/reference_test.cc reads, and each must equal the committed file in
# tests/data (h5diff: every dataset and attribute, exactly), and no config may
# lack its committed fixture. Regenerate the fixtures with
#   python3 tests/reference/model_ref.py --check --write tests/data
source "$(dirname "${BASH_SOURCE[0]}")/../lib/test_env.sh"
test_init "$@"
PY=""
for p in /usr/bin/python3 python3; do
  if "$p" -c "import numpy, h5py" 2>/dev/null; then PY=$p; break; fi
done
[ -n "$PY" ] || { echo "FAIL: the reference needs python3-numpy and python3-h5py (launch/setup.sh installs them)"; exit 1; }
# 20 elements per tensor (the default is 60) keeps the check near a minute on 2 cores.
"$PY" "$SRC/tests/reference/model_ref.py" --check --max-per-tensor 20 --write "$TMP" || { echo "FAIL: the reference's own check"; fail=1; }
n=0
for f in "$TMP"/model_ref_*.h5; do
  b=$(basename "$f"); n=$((n + 1))
  if [ ! -f "$SRC/tests/data/$b" ]; then echo "FAIL: $b is not committed in tests/data"; fail=1; continue; fi
  h5diff "$f" "$SRC/tests/data/$b" > "$TMP/diff" 2>&1 || { echo "FAIL: regenerated $b differs from tests/data/$b"; head -20 "$TMP/diff"; fail=1; }
done
committed=$(ls "$SRC"/tests/data/model_ref_*.h5 | wc -l)
[ "$n" -gt 0 ] && [ "$n" = "$committed" ] || { echo "FAIL: regenerated $n fixtures, $committed committed"; fail=1; }
echo "$n fixtures"
test_done "reference fixtures test"
