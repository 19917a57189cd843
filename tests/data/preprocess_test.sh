#!/usr/bin/env bash
# moe-preprocess end to end: a small fortune-style folder and a JSON-lines file
# become .bin/.idx pairs, read back by the independent Python reader
# (tests/reference/megatron_writer.py dump) and compared with the input text.
# Arguments: <build>/bin <source dir>.
set -euo pipefail
BIN=$1
SRC=$2
PRE="$BIN/moe-preprocess"
REF="/usr/bin/python3 $SRC/tests/reference/megatron_writer.py"
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

mkdir -p "$T/fortunes"
printf 'First fortune.\n\t-- Someone\n%%\nSecond, with UTF-8: caf\xc3\xa9.\n%%\n' > "$T/fortunes/alpha"
printf 'Third.\n%%\n\n%%\nFourth\nhas two lines.\n' > "$T/fortunes/beta"
printf '\x00\x01binary index' > "$T/fortunes/alpha.dat"
ln -s alpha "$T/fortunes/alpha.u8"

"$PRE" --output-prefix "$T/out" --split=percent --workers=3 "$T/fortunes" 2> "$T/stderr" > "$T/stdout"
grep -q "2/2 files" "$T/stderr" || fail "no progress line: $(cat "$T/stderr")"
grep -q "skipped 2 files" "$T/stderr" || fail "the .dat and .u8 files were not skipped"
grep -q "4 documents" "$T/stdout" || fail "expected 4 documents: $(cat "$T/stdout")"
grep -q "unigram entropy" "$T/stdout" || fail "no entropy line"
ls "$T" | grep -q 'tmp' && fail "temporary files left behind: $(ls "$T")"

$REF dump "$T/out" > "$T/dump.json"
/usr/bin/python3 - "$T/dump.json" <<'PY' || fail "tokens differ from the input text"
import json, sys
d = json.load(open(sys.argv[1]))
docs = [b"First fortune.\n\t-- Someone\n", "Second, with UTF-8: café.\n".encode(),
        b"Third.\n", b"Fourth\nhas two lines.\n"]
want = [list(x) + [256] for x in docs]
assert d["dtype_code"] == 8, d["dtype_code"]
assert d["sequences"] == want, d["sequences"]
assert d["document_indices"] == [0, 1, 2, 3, 4], d["document_indices"]
PY

# The output does not depend on the number of workers.
"$PRE" --output-prefix "$T/one" --split=percent --workers=1 --quiet "$T/fortunes" > /dev/null
cmp "$T/out.bin" "$T/one.bin" && cmp "$T/out.idx" "$T/one.idx" || fail "output depends on --workers"

# JSON lines with escapes; --append-eod=false.
printf '{"id": 1, "text": "tab\\there \\u00e9\\ud83d\\ude00"}\n\n{"text": "line\\nbreak \\"q\\""}\n' > "$T/docs.jsonl"
"$PRE" --output-prefix "$T/js" --append-eod=false --quiet "$T/docs.jsonl" > /dev/null
$REF dump "$T/js" > "$T/js.json"
/usr/bin/python3 - "$T/js.json" <<'PY' || fail "JSON lines decoded wrongly"
import json, sys
d = json.load(open(sys.argv[1]))
want = [list("tab\there é😀".encode()), list(b'line\nbreak "q"')]
assert d["sequences"] == want, d["sequences"]
PY

# --check: passes with the byte vocabulary, names file and offset when too small.
"$PRE" --check "$T/out" --vocab-size 257 | grep -q "all < vocab_size 257" || fail "--check failed"
if "$PRE" --check "$T/out" --vocab-size 200 2> "$T/check.err"; then fail "--check accepted vocab 200"; fi
grep -q "out.bin: token 2[0-9][0-9] at token offset" "$T/check.err" || fail "bad --check message: $(cat "$T/check.err")"

# A malformed JSON line fails the run (exit 1), names file:line, and leaves no output.
printf '{"text": "ok"}\n{"text": oops}\n' > "$T/bad.jsonl"
set +e
"$PRE" --output-prefix "$T/bad" --quiet "$T/bad.jsonl" 2> "$T/bad.err"
rc=$?
set -e
[ "$rc" = 1 ] || fail "malformed JSON: exit $rc, want 1"
grep -q "bad.jsonl:2: column 10" "$T/bad.err" || fail "bad JSON message: $(cat "$T/bad.err")"
ls "$T" | grep -Eq '^bad\.(bin|idx)|tmp' && fail "files left behind: $(ls "$T")"

# Usage errors exit 2.
set +e
"$PRE" --split=paragraph --output-prefix "$T/x" "$T/fortunes" 2> /dev/null; rc1=$?
"$PRE" "$T/fortunes" 2> /dev/null; rc2=$?
set -e
[ "$rc1" = 2 ] && [ "$rc2" = 2 ] || fail "usage errors: exit $rc1 / $rc2, want 2"

# The real corpus of the demo (the fortunes package is one of launch/setup.sh's):
# thousands of documents, every token a byte or the end-of-document token.
[ -d /usr/share/games/fortunes ] || fail "/usr/share/games/fortunes is missing: install the fortunes package (launch/setup.sh)"
"$PRE" --output-prefix "$T/fortunes_corpus" --split=percent --quiet /usr/share/games/fortunes > "$T/real.out" ||
  fail "moe-preprocess of the fortunes corpus"
"$PRE" --check "$T/fortunes_corpus" --vocab-size 257 > "$T/real.check" || fail "--check of the fortunes corpus"
docs=$(sed -n 's/.* \([0-9]*\) documents, .*all < vocab_size 257.*/\1/p' "$T/real.check")
[ -n "$docs" ] && [ "$docs" -gt 1000 ] || fail "fortunes corpus: '$(cat "$T/real.check")', want > 1000 documents all < 257"
echo "preprocess_test: OK"
