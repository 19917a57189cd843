#!/usr/bin/python3
"""An independent writer (and reader) of Megatron-LM's mmap indexed dataset.

It follows megatron/core/datasets/indexed_dataset.py (IndexedDatasetBuilder,
_IndexWriter, _IndexReader) and shares no code with data/indexed_dataset.cc:

  PREFIX.bin  the token arrays of all sequences, concatenated, raw little-endian
  PREFIX.idx  b"MMIDIDX\\x00\\x00"            9 bytes
              <Q version = 1
              <B dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                             6 float64, 7 float32, 8 uint16)
              <Q sequence_count
              <Q document_count = len(document_indices)  (documents + 1)
              int32[sequence_count]   sequence lengths
              int64[sequence_count]   sequence byte pointers into .bin
              int64[document_count]   document indices, starting with 0

Usage:
  megatron_writer.py fixtures OUTDIR   writes OUTDIR/<name>.{bin,idx} for a set of
                                       cases plus OUTDIR/expected.txt (see below)
  megatron_writer.py write PREFIX DTYPE < docs.json
                                       docs.json: [[seq, ...], ...], one list of
                                       sequences (token lists) per document
  megatron_writer.py dump PREFIX       prints {"dtype_code", "sequences",
                                       "document_indices"} as JSON

expected.txt, one case per block, plain integers so a C++ test parses it easily:
  case NAME DTYPE_CODE NUM_SEQUENCES NUM_DOCUMENT_INDICES
  doc I0 I1 ...            (the document indices)
  seq T0 T1 ...            (one line per sequence)
"""
import json
import struct
import sys

import numpy

_INDEX_HEADER = b"MMIDIDX\x00\x00"

# Megatron's DType enum: code -> numpy dtype.
DTYPES = {
    1: numpy.uint8,
    2: numpy.int8,
    3: numpy.int16,
    4: numpy.int32,
    5: numpy.int64,
    6: numpy.float64,
    7: numpy.float32,
    8: numpy.uint16,
}
CODES = {numpy.dtype(v).name: k for k, v in DTYPES.items()}


class Builder:
    """Mirrors Megatron's IndexedDatasetBuilder (add_item / end_document / finalize)."""

    def __init__(self, prefix, dtype):
        self.prefix = prefix
        self.dtype = numpy.dtype(dtype)
        self.data_file = open(prefix + ".bin", "wb")
        self.sequence_lengths = []
        self.document_indices = [0]

    def add_item(self, tokens):
        arr = numpy.array(tokens, dtype=self.dtype)
        self.data_file.write(arr.astype(self.dtype.newbyteorder("<")).tobytes(order="C"))
        self.sequence_lengths.append(arr.size)

    def end_document(self):
        self.document_indices.append(len(self.sequence_lengths))

    def finalize(self):
        self.data_file.close()
        itemsize = self.dtype.itemsize
        pointers, cur = [], 0
        for length in self.sequence_lengths:
            pointers.append(cur)
            cur += length * itemsize
        with open(self.prefix + ".idx", "wb") as f:
            f.write(_INDEX_HEADER)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", CODES[self.dtype.name]))
            f.write(struct.pack("<Q", len(self.sequence_lengths)))
            f.write(struct.pack("<Q", len(self.document_indices)))
            f.write(numpy.array(self.sequence_lengths, dtype="<i4").tobytes(order="C"))
            f.write(numpy.array(pointers, dtype="<i8").tobytes(order="C"))
            f.write(numpy.array(self.document_indices, dtype="<i8").tobytes(order="C"))


def write(prefix, dtype, documents):
    b = Builder(prefix, dtype)
    for doc in documents:
        for seq in doc:
            b.add_item(seq)
        b.end_document()
    b.finalize()
    return b


def read(prefix):
    """Mirrors Megatron's _IndexReader and IndexedDataset.get()."""
    with open(prefix + ".idx", "rb") as f:
        assert f.read(9) == _INDEX_HEADER, "bad magic"
        (version,) = struct.unpack("<Q", f.read(8))
        assert version == 1
        (code,) = struct.unpack("<B", f.read(1))
        (n,) = struct.unpack("<Q", f.read(8))
        (d,) = struct.unpack("<Q", f.read(8))
        offset = f.tell()
    idx = numpy.memmap(prefix + ".idx", mode="r", order="C")
    lengths = numpy.frombuffer(idx, dtype="<i4", count=n, offset=offset)
    pointers = numpy.frombuffer(idx, dtype="<i8", count=n, offset=offset + lengths.nbytes)
    docs = numpy.frombuffer(idx, dtype="<i8", count=d, offset=offset + lengths.nbytes + pointers.nbytes)
    dtype = numpy.dtype(DTYPES[code]).newbyteorder("<")
    bin_ = numpy.memmap(prefix + ".bin", mode="r", order="C")
    seqs = [
        numpy.frombuffer(bin_, dtype=dtype, count=int(lengths[i]), offset=int(pointers[i])).tolist()
        for i in range(n)
    ]
    return code, seqs, docs.tolist()


def _lcg(state=[8]):
    """A fixed generator (64-bit LCG, Knuth's MMIX constants), so the fixtures do not
    depend on numpy's random streams."""
    state[0] = (state[0] * 6364136223846793005 + 1442695040888963407) % 2**64
    return state[0] >> 33


def fixture_cases():
    """Multi-document cases, several sequences per document, every dtype."""
    cases = []
    bounds = {1: 256, 2: 128, 3: 32768, 4: 2**31 - 1, 5: 2**31 - 1, 6: 2**24, 7: 2**24, 8: 65536}
    for code, dtype in DTYPES.items():
        hi = bounds[code]
        docs = []
        for doc_i in range(5):
            doc = []
            for s in range([1, 3, 2, 1, 4][doc_i]):
                length = 0 if (doc_i == 2 and s == 1) else 1 + _lcg() % 11  # one empty sequence
                seq = [_lcg() % hi for _ in range(length)]
                if seq:
                    seq[0] = hi - 1  # the largest value of the range
                doc.append(seq)
            docs.append(doc)
        docs.insert(3, [])  # an empty document (two equal document indices)
        cases.append(("megatron_" + numpy.dtype(dtype).name, dtype, docs))
    # Signed values must come back sign-extended (they are not valid token ids).
    cases.append(("megatron_int16_negative", numpy.int16, [[[3, -1, -32768, 32767]], [[-7]]]))
    # A realistic byte-token case: two documents ending in the end-of-document token 256.
    text = [list(b"Hello, world!\n") + [256], list(b"Second document.\n") + [256]]
    cases.append(("megatron_bytes", numpy.uint16, [[text[0]], [text[1]]]))
    return cases


def main(argv):
    if len(argv) >= 3 and argv[1] == "fixtures":
        out = argv[2]
        lines = []
        for name, dtype, docs in fixture_cases():
            b = write(f"{out}/{name}", dtype, docs)
            code, seqs, doc_idx = read(f"{out}/{name}")
            flat = [seq for doc in docs for seq in doc]
            assert code == CODES[numpy.dtype(dtype).name] and doc_idx == b.document_indices
            assert [[int(t) for t in s] for s in seqs] == flat, name  # read back what was written
            lines.append(f"case {name} {code} {len(b.sequence_lengths)} {len(b.document_indices)}")
            lines.append("doc " + " ".join(str(i) for i in b.document_indices))
            for seq in flat:
                lines.append("seq " + " ".join(str(int(t)) for t in seq))
        with open(f"{out}/expected.txt", "w") as f:
            f.write("\n".join(lines) + "\n")
        return 0
    if len(argv) == 4 and argv[1] == "write":
        write(argv[2], numpy.dtype(argv[3]), json.load(sys.stdin))
        return 0
    if len(argv) == 3 and argv[1] == "dump":
        code, seqs, docs = read(argv[2])
        json.dump({"dtype_code": code, "sequences": [[int(t) for t in s] for s in seqs],
                   "document_indices": docs}, sys.stdout)
        return 0
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
