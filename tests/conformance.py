"""Compare streamtap with the corpus's tshark oracle, direction by direction.

Used by tests/test_conformance.py; run it directly to see every difference with a suggested
category (for reviewing `conformance_expected.tsv` by hand):

    python tests/conformance.py [CORPUS_DIR] [--only SUBSTR]

A direction is (file, tshark stream, side). We compare with tshark's bytes *with its gap marker
records removed* (`*_gaps_skipped`): streamtap skips gaps instead of writing marker text.
Streams are matched by unordered 4-tuple; several streams on one tuple (port reuse) are paired
in time order.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXPECTED = HERE / "conformance_expected.tsv"

# Categories a listed difference may carry; each names a documented policy (README "Policies").
CATEGORIES = {
    "overlap-first": "held out-of-order bytes kept against a later in-order overlap "
                     "(tshark 4.0 keeps the later bytes)",
    "unacked-gap": "held data after a never-acknowledged hole is delivered at close "
                   "(tshark drops it)",
    "late-fill": "data captured after the ACK that covers it fills its hole (DESIGN \"Late "
                 "fill\"); tshark 4.0 has already declared the range lost and drops it, tcpflow "
                 "keeps it",
    "split": "connection boundaries differ (idle/closing timeouts, port reuse, SYN heuristics)",
    "synack-isn": "a second SYN-ACK with another ISN does not restart the server's sequence "
                  "space (tshark re-bases on it and drops the server's data)",
    "rst-data": "payload carried on a RST is not stream data",
    "linktype": "link type streamtap does not decode",
    "encapsulation": "encapsulation streamtap does not decode",
    "midstream-order": "mid-stream pickup whose first captured segment is not the earliest",
    "fragments": "IP fragments tshark reassembles differently",
    "truncated": "snaplen-truncated capture",
    "other": "explained in the note column",
}


@dataclass
class Direction:
    file: str
    stream: int
    side: str
    src: tuple[str, int]
    dst: tuple[str, int]
    length: int
    sha256: str
    analysis: dict
    gap_markers: bool


def load_oracle(corpus: Path, only: str | None = None) -> dict[str, list[dict]]:
    by_file: dict[str, list[dict]] = defaultdict(list)
    with open(corpus / "oracle_tshark.jsonl", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if only and only not in rec["file"]:
                continue
            by_file[rec["file"]].append(rec)
    return by_file


def _tuple_key(a: tuple, b: tuple) -> tuple:
    return tuple(sorted([tuple(a), tuple(b)]))


def ours_for_file(path: Path) -> tuple[list, str | None]:
    import streamtap
    from streamtap.engine.decode import UnsupportedLinkType
    from streamtap.engine.reader import CaptureError

    out = []
    try:
        for s in streamtap.reassemble(str(path)):
            out.append(s)
    except (UnsupportedLinkType, CaptureError) as e:
        return out, f"{type(e).__name__}: {e}"
    return out, None


def compare_file(corpus: Path, file: str, oracle: list[dict]) -> list[tuple[Direction, str]]:
    """Every tshark direction of `file` that streamtap does not reproduce, with a reason."""
    ours, error = ours_for_file(corpus / file)
    mine: dict[tuple, list] = defaultdict(list)
    for s in ours:
        mine[_tuple_key(s.client, s.server)].append(s)
    for v in mine.values():
        v.sort(key=lambda s: s.start)
    theirs: dict[tuple, list[dict]] = defaultdict(list)
    for rec in oracle:
        theirs[_tuple_key(rec["client"], rec["server"])].append(rec)
    diffs = []
    for key, recs in theirs.items():
        recs.sort(key=lambda r: r["stream"])
        streams = mine.get(key, [])
        for i, rec in enumerate(recs):
            s = streams[i] if i < len(streams) else None
            for side, src, dst in (("client", rec["client"], rec["server"]),
                                   ("server", rec["server"], rec["client"])):
                d = Direction(file, rec["stream"], side, tuple(src), tuple(dst),
                              rec[f"{side}_len_gaps_skipped"],
                              rec[f"{side}_sha256_gaps_skipped"], rec.get("analysis", {}),
                              rec["gap_markers"])
                if not src[0]:
                    continue      # tshark's follow saw no usable packet for this index
                data = None
                if s is not None:
                    if (s.client[0], s.client[1]) == (src[0], src[1]):
                        data = s.client_data
                    else:
                        data = s.server_data
                if data is None:
                    if d.length == 0:
                        continue
                    why = error or ("no stream" if not streams else
                                    f"stream count {len(streams)} vs tshark {len(recs)}")
                    diffs.append((d, why))
                elif hashlib.sha256(data).hexdigest() != d.sha256:
                    why = f"len {len(data)} vs tshark {d.length}"
                    if len(streams) != len(recs):
                        why += f"; stream count {len(streams)} vs tshark {len(recs)}"
                    diffs.append((d, why))
    return diffs


def all_differences(corpus: Path, only: str | None = None) -> tuple[int, list]:
    oracle = load_oracle(corpus, only)
    total = sum(2 * len(v) for v in oracle.values())
    diffs = []
    for file in sorted(oracle):
        diffs.extend(compare_file(corpus, file, oracle[file]))
    return total, diffs


def load_expected() -> dict[tuple[str, int, str], tuple[str, str]]:
    out = {}
    if not EXPECTED.exists():
        return out
    for line in EXPECTED.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        file, stream, side, category, note = (line.split("\t") + [""] * 5)[:5]
        out[(file, int(stream), side)] = (category, note)
    return out


def main(argv: list[str]) -> int:
    corpus = Path(argv[0]) if argv and not argv[0].startswith("--") else \
        HERE.parent.parent / "shared" / "corpus"
    only = argv[argv.index("--only") + 1] if "--only" in argv else None
    total, diffs = all_differences(corpus, only)
    expected = load_expected()
    for d, why in diffs:
        cat = expected.get((d.file, d.stream, d.side), ("?", ""))[0]
        flags = ",".join(sorted(d.analysis))
        print(f"{d.file}\t{d.stream}\t{d.side}\t{cat}\t{why}; tshark flags: {flags}")
    exact = total - len(diffs)
    print(f"# {exact}/{total} directions exact ({100.0 * exact / max(total, 1):.2f}%), "
          f"{len(diffs)} differ", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
