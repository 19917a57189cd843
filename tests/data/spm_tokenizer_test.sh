#!/usr/bin/env bash
# moe-preprocess --tokenizer spm:MODEL on the fortunes corpus: a SentencePiece
# model trained with spm_train, the ids in the .bin/.idx equal SentencePiece's
# own Python binding (python3-sentencepiece) on the same documents, each
# document decodes back to its text (lossless model: identity normalisation,
# byte fallback), PREFIX.tokenizer names the vocabulary, and moe-train refuses a
# model.vocab_size smaller than it before any work.
# Arguments: <build>/bin <source dir>.
set -euo pipefail
BIN=$1
SRC=$2
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
F=/usr/share/games/fortunes
[ -f "$F/fortunes" ] || fail "the fortunes corpus is missing (apt-get install fortunes; launch/setup.sh does)"

grep -hv '^%$' "$F/fortunes" "$F/computers" "$F/science" > "$T/corpus.txt"
spm_train --input="$T/corpus.txt" --model_prefix="$T/fortunes" --vocab_size=1000 --model_type=unigram \
  --normalization_rule_name=identity --remove_extra_whitespaces=false --byte_fallback=true \
  --input_sentence_size=20000 --shuffle_input_sentence=true --num_threads=2 --minloglevel=2 \
  > "$T/spm_train.log" 2>&1 || fail "spm_train failed: $(tail -5 "$T/spm_train.log")"

"$BIN/moe-preprocess" --output-prefix "$T/spm" --tokenizer "spm:$T/fortunes.model" --split=percent \
  --workers=2 --quiet "$F/fortunes" "$F/computers" > "$T/stdout"
grep -q "vocabulary 1000, end of document 2" "$T/stdout" || fail "no tokenizer line: $(cat "$T/stdout")"
grep -qx "vocab_size 1000" "$T/spm.tokenizer" || fail "PREFIX.tokenizer: $(cat "$T/spm.tokenizer")"

/usr/bin/python3 "$SRC/tests/reference/megatron_writer.py" dump "$T/spm" > "$T/dump.json"
/usr/bin/python3 - "$T/dump.json" "$T/fortunes.model" "$F/fortunes" "$F/computers" <<'PY' || fail "ids differ"
import json, sys
import sentencepiece as spm

dump = json.load(open(sys.argv[1]))
sp = spm.SentencePieceProcessor(model_file=sys.argv[2])
eos = sp.eos_id()

def percent_docs(text):
    """The --split=percent rule: lines that are exactly '%' separate documents;
    blank documents are dropped (data/text_corpus.h)."""
    docs, cur = [], []
    for line in text.splitlines(keepends=True):
        if line.rstrip("\n").rstrip("\r") == "%":
            docs.append("".join(cur)); cur = []
        else:
            cur.append(line)
    docs.append("".join(cur))
    return [d for d in docs if d.strip()]

docs = []
for path in sys.argv[3:]:
    text = open(path, "rb").read().decode("utf-8")
    if text.startswith("\ufeff"):
        text = text[1:]
    docs += percent_docs(text)
seqs = dump["sequences"]
assert len(seqs) == len(docs), (len(seqs), len(docs))
for i, (seq, doc) in enumerate(zip(seqs, docs)):
    want = sp.encode(doc) + [eos]
    assert seq == want, f"document {i}: moe-preprocess {seq[:20]} python {want[:20]}"
    back = sp.decode(seq[:-1])
    assert back == doc, f"document {i} does not round-trip: {back!r} != {doc!r}"
tokens = sum(len(s) for s in seqs)
print(f"{len(docs)} documents, {tokens} tokens: ids equal python3-sentencepiece, every document round-trips")
PY

# Training checks model.vocab_size against the dataset's tokenizer before any work.
set +e
"$BIN/moe-train" --config="$SRC/configs/demo.textproto" data.train_path="$T/spm" train.steps=1 \
  train.run_dir="$T/run" checkpoint.dir= llep.enabled=false parallel.expert=1 optim.warmup_steps=0 \
  > "$T/train.out" 2>&1
code=$?
set -e
[ "$code" = 2 ] || fail "moe-train exit $code, want 2, for model.vocab_size 257 with a 1000-token vocabulary"
grep -q "model.vocab_size = 257 is smaller than the vocabulary of the tokenizer spm:" "$T/train.out" \
  || fail "no vocabulary message: $(tail -5 "$T/train.out")"
echo "ok: moe-train refuses model.vocab_size 257 (exit $code)"

# A byte dataset written over the same prefix drops the SentencePiece record.
"$BIN/moe-preprocess" --output-prefix "$T/spm" --split=percent --quiet "$F/fortunes" > /dev/null
[ ! -e "$T/spm.tokenizer" ] || fail "a stale spm.tokenizer survived a byte-tokenizer run"
echo "ok: the byte tokenizer leaves no PREFIX.tokenizer"
