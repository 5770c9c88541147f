"""Long connections in parts, offline: peak RSS and exactness (issue 11 item 3).

    .venv/bin/python bench/parts.py                      # 200 MB bulk capture, part_bytes 4MiB
    .venv/bin/python bench/parts.py --part-bytes 16MiB --max-rss 200
    .venv/bin/python bench/parts.py --pcap X.pcap --truth X.truth.jsonl

Generates the one-connection bulk capture (`gen_capture.py --shape bulk`: 200,000,000 bytes
from the server) into tmpfs unless given one, then runs, each in a fresh child whose peak RSS
is read with wait4 (bench/offline.py's launcher):

- cli: `streamtap -r CAP --config C --sink jsonl:TMPFS/…` with `reassembly.part_bytes` set;
- library: `streamtap.Pipeline` with the same config, hashing each part as it comes.

Checks: every connection of the truth comes out as parts 0, 1, … of one stream id, all but
the last with close_reason "part", whose bytes, concatenated, are the generator's (length and
SHA-256 per direction); where the record carries `source.offset`/`destination.offset`, each
part starts where the previous ones end. Exit status 1 when a check fails or a peak RSS is over
`--max-rss` (MiB; 150 by default, the issue's bound).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_capture  # noqa: E402
import offline  # noqa: E402

TMPFS = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()

LIB_CHILD = """\
import hashlib, json, sys
import streamtap
from streamtap.engine.pipeline import Pipeline
pcap, cfg = sys.argv[1], sys.argv[2]
acc = {}
for batch in Pipeline(pcap, cfg).batches():
    for s in batch:
        a = acc.setdefault(s.id, {"client": list(s.client), "server": list(s.server),
                                  "c": hashlib.sha256(), "s": hashlib.sha256(), "clen": 0,
                                  "slen": 0, "reasons": [], "offsets_ok": True, "parts": []})
        a["offsets_ok"] &= (s.client_offset, s.server_offset) == (a["clen"], a["slen"])
        a["parts"].append(s.part)
        a["c"].update(s.client_data); a["s"].update(s.server_data)
        a["clen"] += len(s.client_data); a["slen"] += len(s.server_data)
        a["reasons"].append(s.close_reason)
for a in acc.values():
    a["c"], a["s"] = a["c"].hexdigest(), a["s"].hexdigest()
print(json.dumps(acc))
"""


def parse_size(text: str) -> int:
    from streamtap.config.units import parse_size as parse

    return int(parse(text))


def check(acc: dict, truth_path: str) -> list[str]:
    """Compare accumulated streams ({id: {client, server, c, s, clen, slen, reasons, parts,
    offsets_ok}}) with the truth; returns what is wrong."""
    wrong = []
    by_key = {(tuple(a["client"]), tuple(a["server"])): a for a in acc.values()
              if a["clen"] or a["slen"]}
    with open(truth_path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if "empty_flows" in rec:
                continue
            key = (tuple(rec["client"]), tuple(rec["server"]))
            a = by_key.get(key)
            if a is None:
                wrong.append(f"{key}: missing")
                continue
            if (a["clen"], a["c"], a["slen"], a["s"]) != (
                    rec["client_len"], rec["client_sha256"], rec["server_len"],
                    rec["server_sha256"]):
                wrong.append(f"{key}: bytes differ ({a['clen']}/{a['slen']} vs "
                             f"{rec['client_len']}/{rec['server_len']})")
            reasons = a["reasons"]
            if any(r != "part" for r in reasons[:-1]) or reasons[-1] == "part":
                wrong.append(f"{key}: close reasons {reasons[:3]}…{reasons[-2:]}")
            if a["parts"] and a["parts"] != list(range(len(reasons))):
                wrong.append(f"{key}: part numbers {a['parts'][:5]}…")
            if not a["offsets_ok"]:
                wrong.append(f"{key}: a part's offsets are not where the previous ones end")
    return wrong


def run_cli(pcap: str, cfg: str) -> tuple[float, float, dict]:
    fd, sink = tempfile.mkstemp(prefix="streamtap-parts-", suffix=".jsonl", dir=TMPFS)
    os.close(fd)
    os.unlink(sink)
    try:
        # the sink in a config of its own: the payloads uncapped (max_payload 0), to check them
        with open(cfg, encoding="utf-8") as f:
            text = f.read()
        cli_cfg = cfg[: -len(".yaml")] + "-cli.yaml"
        with open(cli_cfg, "w", encoding="utf-8") as f:
            f.write(text + f"sinks:\n  - type: jsonl\n    path: {sink}\n    max_payload: 0\n")
        try:
            wall, rss, rc, _, err, _u, _s = offline.run_child(
                [offline.streamtap_cli(), "-r", pcap, "--config", cli_cfg])
        finally:
            os.unlink(cli_cfg)
        if rc != 0:
            raise offline.ToolError(offline._error(rc, err))
        acc: dict = {}
        with open(sink, "rb") as f:
            for line in f:
                r = json.loads(line)
                src, dst = r["source"], r["destination"]
                a = acc.setdefault(r["stream"]["id"], {
                    "client": [src["ip"], src["port"]], "server": [dst["ip"], dst["port"]],
                    "c": hashlib.sha256(), "s": hashlib.sha256(), "clen": 0, "slen": 0,
                    "reasons": [], "offsets_ok": True, "parts": []})
                if "offset" in src:
                    a["offsets_ok"] &= (src["offset"], dst["offset"]) == (a["clen"], a["slen"])
                if "part" in r["stream"]:
                    a["parts"].append(r["stream"]["part"])
                cdata = base64.b64decode(src.get("payload") or "")
                sdata = base64.b64decode(dst.get("payload") or "")
                a["c"].update(cdata)
                a["s"].update(sdata)
                a["clen"] += len(cdata)
                a["slen"] += len(sdata)
                a["reasons"].append(r["tcp"]["close_reason"])
        for a in acc.values():
            a["c"], a["s"] = a["c"].hexdigest(), a["s"].hexdigest()
        return wall, rss, acc
    finally:
        if os.path.exists(sink):
            os.unlink(sink)


def run_library(pcap: str, cfg: str) -> tuple[float, float, dict]:
    wall, rss, rc, out, err, _u, _s = offline.run_child([sys.executable, "-c", LIB_CHILD, pcap,
                                                         cfg])
    if rc != 0:
        raise offline.ToolError(offline._error(rc, err))
    return wall, rss, json.loads(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part-bytes", default="4MiB", help="reassembly.part_bytes (4MiB)")
    ap.add_argument("--max-rss", type=float, default=150.0, help="peak RSS bound, MiB (150)")
    ap.add_argument("--pcap", help="capture to use (default: generate the bulk one)")
    ap.add_argument("--truth", help="with --pcap: its generator's truth file")
    ap.add_argument("--tools", default="cli,library", help="subset of cli,library")
    ap.add_argument("--keep", action="store_true", help="keep the generated capture")
    args = ap.parse_args(argv)
    part_bytes = parse_size(args.part_bytes)
    made = []
    if args.pcap:
        if not args.truth:
            ap.error("--pcap needs --truth")
        pcap, truth = args.pcap, args.truth
    else:
        pcap = os.path.join(TMPFS, f"streamtap-parts-bulk-{os.getpid()}.pcap")
        truth = pcap[: -len(".pcap")] + ".truth.jsonl"
        made = [pcap, truth]
        fig = gen_capture.generate_fast("bulk", pcap, truth_path=truth)
        print(f"capture: {pcap}, {fig['packets']} packets, "
              f"{os.path.getsize(pcap) / 1e6:.0f} MB", flush=True)
    fd, cfg = tempfile.mkstemp(prefix="streamtap-parts-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(f"reassembly:\n  part_bytes: {part_bytes}\n")
    failed = False
    try:
        print(f"part_bytes {part_bytes}, bound {args.max_rss:.0f} MiB peak RSS")
        print("| tool | wall s | peak RSS MiB | parts | exact |")
        print("|---|---|---|---|---|")
        for tool in args.tools.split(","):
            wall, rss, acc = (run_cli if tool == "cli" else run_library)(pcap, cfg)
            wrong = check(acc, truth)
            parts = sum(len(a["reasons"]) for a in acc.values() if a["clen"] or a["slen"])
            ok = not wrong and rss <= args.max_rss
            failed |= not ok
            print(f"| {tool} | {wall:.2f} | {rss:.0f} | {parts} | "
                  f"{'yes' if not wrong else 'NO'} |", flush=True)
            for w in wrong[:5]:
                print(f"  wrong: {w}")
            if rss > args.max_rss:
                print(f"  peak RSS {rss:.0f} MiB is over the {args.max_rss:.0f} MiB bound")
    finally:
        os.unlink(cfg)
        if not args.keep:
            for p in made:
                if os.path.exists(p):
                    os.unlink(p)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
