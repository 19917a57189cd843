#!/usr/bin/env python3
"""Checks of tests/launch/profile_test.sh.

  profile_check.py trace TRACE_DIR WORLD   every event valid, all ranks, no overlap per tid,
                                           every flow paired (all-to-all and
                                           point-to-point), all-to-alls labelled with phase and
                                           layer, per-op bytes = comm totals, bytes per peer =
                                           the transport's wire counter
  profile_check.py dom DUMPED_DOM          the report's DOM holds the summary, heatmap, matrix
"""
import collections, glob, html.parser, json, os, sys

def fail(msg):
    print("FAIL:", msg); sys.exit(1)

def check_trace(d, world):
    files = glob.glob(os.path.join(d, "rank_*.json"))
    if len(files) != world: fail(f"{len(files)} trace files, expected {world}")
    flows = collections.defaultdict(list)
    ranks = set()
    for p in files:
        t = json.load(open(p))
        md = t["metadata"]
        ranks.add(md["rank"])
        if not md["name"].startswith(f"rank {md['rank']} (tp "): fail(f"{p}: name {md['name']}")
        if not (md["clock_alignment_error_us"] >= 0): fail(f"{p}: no alignment error")
        per_tid = collections.defaultdict(list)
        op_bytes = collections.Counter()
        peer_sent = collections.defaultdict(collections.Counter)  # kind -> world peer -> bytes
        unlabeled = collections.Counter()
        names = set()
        for e in t["traceEvents"]:
            ph = e.get("ph")
            if ph not in ("X", "M", "C", "s", "f"): fail(f"{p}: bad ph {e}")
            if e.get("pid") != md["rank"]: fail(f"{p}: pid {e.get('pid')}")
            if ph == "M":
                if e["name"] == "process_name": names.add(e["args"]["name"])
                continue
            if not isinstance(e.get("ts"), (int, float)): fail(f"{p}: ts {e}")
            if ph == "X":
                if not (e["dur"] >= 0) or "tid" not in e or not e["name"]: fail(f"{p}: X {e}")
                per_tid[e["tid"]].append((e["ts"], e["ts"] + e["dur"], e["name"]))
                if e["cat"] == "comm_op":
                    a = e["args"]
                    op_bytes[e["name"]] += a["bytes_sent"]
                    if a["peer_bytes_sent"] and sum(a["peer_bytes_sent"].values()) != a["bytes_sent"]:
                        fail(f"{p}: per-peer bytes do not sum to bytes_sent: {e}")
                    for peer, b in a["peer_bytes_sent"].items():
                        if b: peer_sent[e["name"]][peer] += b
                    if not a["phase"]: unlabeled[e["name"]] += 1
                    if e["name"].startswith("AllToAll") and (not a["phase"] or a["layer"] < 0):
                        fail(f"{p}: an all-to-all without its phase and layer: {e}")
            elif ph in ("s", "f"):
                flows[e["id"]].append((ph, md["rank"], e["name"]))
            elif ph == "C" and not e["args"]: fail(f"{p}: empty counter")
        if names != {md["name"]}: fail(f"{p}: process name {names}")
        for tid, ev in per_tid.items():
            ev.sort(key=lambda x: (x[0], -x[1]))
            stack = []
            for b, en, n in ev:
                while stack and stack[-1][1] <= b + 1e-3: stack.pop()
                if stack and en > stack[-1][1] + 1e-3:
                    fail(f"{p}: tid {tid}: '{n}' [{b}, {en}] overlaps '{stack[-1][2]}' ending {stack[-1][1]}")
                stack.append((b, en, n))
        phases = {x[2] for ev in per_tid.values() for x in ev}
        for need in ("route", "permute", "LLEP plan", "dispatch a2a", "experts", "combine a2a", "unpermute",
                     "optimizer", "grad sync", "data", "forward L0", "backward L1", "AllToAllV"):
            if need not in phases: fail(f"{p}: no '{need}' span")
        totals = {k: v["bytes_sent"] for k, v in md["comm_totals"].items()}
        if dict(op_bytes) != totals: fail(f"{p}: trace bytes {dict(op_bytes)} != communicator totals {totals}")
        # The events' bytes per peer against the transport's own count of what it was handed.
        wire = md["wire_bytes_sent"]
        trace_peers = {k: dict(v) for k, v in peer_sent.items()}
        if trace_peers != wire: fail(f"{p}: bytes per peer in the trace {trace_peers} != wire counter {wire}")
        if not wire.get("AllToAllV"): fail(f"{p}: the wire counter saw no all-to-all bytes")
        if unlabeled: print(f"{os.path.basename(p)}: ops without a span around them: {dict(unlabeled)}")
    if ranks != set(range(world)): fail(f"ranks {ranks}")
    if not flows: fail("no flow events")
    kinds = collections.Counter()
    for i, ends in flows.items():
        if sorted(x[0] for x in ends) != ["f", "s"]: fail(f"flow {i} unpaired: {ends}")
        if ends[0][1] == ends[1][1]: fail(f"flow {i} does not leave its rank: {ends}")
        kinds[ends[0][2]] += 1
    if not kinds["p2p"]: fail("no point-to-point flow (LLEP weight moves)")
    print(f"trace ok: {world} ranks, {len(flows)} flows paired ({dict(kinds)}), bytes per peer equal the wire counter")

class Dom(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(); self.ids = set(); self.classes = collections.Counter(); self.text = []
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a: self.ids.add(a["id"])
        for c in (a.get("class") or "").split(): self.classes[c] += 1
    def handle_data(self, d): self.text.append(d)

def check_dom(path):
    d = Dom(); d.feed(open(path, encoding="utf-8").read())
    for need in ("summary", "heatmap", "matrix", "layers", "imbalance", "time", "curves", "memory"):
        if need not in d.ids: fail(f"DOM has no #{need}")
    if d.classes["cell"] < 8 or d.classes["mcell"] < 4 or d.classes["card"] < 4 or d.classes["heatmap"] < 1:
        fail(f"DOM lacks heatmap cells / matrix cells / summary cards: {d.classes}")
    text = " ".join(d.text)
    for need in ("Most imbalanced layer", "Slowest rank", "Busiest link", "Where time goes"):
        if need not in text: fail(f"summary has no '{need}'")
    print("dom ok:", d.classes["cell"], "heatmap cells,", d.classes["mcell"], "matrix cells")

if __name__ == "__main__":
    if sys.argv[1] == "trace": check_trace(sys.argv[2], int(sys.argv[3]))
    else: check_dom(sys.argv[2])
