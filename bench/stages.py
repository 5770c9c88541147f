#!/usr/bin/env python3
"""Where the time goes: a per-stage profile of the offline pipeline on one capture.

    python bench/stages.py [--pcap FILE | --capture mixed|short|synflood|bulk] [--repeat 3]

Per packet (µs): read (the reader alone), decode (reader + decoder), flow lookup (+ building the
4-tuple key and one dict lookup per packet, what the flow table does first), reassembly (the
whole flow table, minus lookup, minus flow set-up and close). Per flow (µs): set-up (opening a
flow), close (closing it and building its Stream), the same two for an embryo (a lone SYN's
compact flow), record (`to_record`), encode (`to_json` minus `to_record`), write (the JSON
Lines sink's `write()` to tmpfs minus `to_json`).

The packet stages run cumulatively, each the best of --repeat runs, and each stage is the
difference from the previous one (record and encode: the best of 3 x --repeat). Set-up and close
happen inside the flow table's loop, where a profiler cannot see them once the table is compiled
(and where cProfile's share overstated them before): so they are timed on their own, opening and
then closing 20,000 flows (and 20,000 embryos) in a fresh table, and the capture's own counts of
each apply them to its run. Then the top 25 functions by cProfile tottime over the whole pipeline
(read to write), with the stage each belongs to (compiled functions are not seen: their time
is their caller's). Without --pcap, the capture is generated into /dev/shm
(bench/gen_capture.py) and deleted afterwards.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

# The engine, in one place: when the modules move (issue 9), only these lines change.
from streamtap import config as st_config
from streamtap.engine.decode import TH_SYN, Decoder
from streamtap.engine.flowtable import META, FlowTable, Limits
from streamtap.engine.reader import read
from streamtap.engine.stream import to_json, to_record
from streamtap.sinks.jsonl import JsonlSink

HERE = Path(__file__).resolve().parent
TMPFS = "/dev/shm"
BATCH = 500  # streams per sink write, as the CLI's runner batches them

# cProfile's file names -> stage, for the top-25 table (first match wins)
STAGE_OF_FILE = (
    ("reader.py", "read"), ("pcapng.py", "read"), ("pcapy", "read"),
    ("decode.py", "decode"), ("defrag.py", "decode"),
    ("flowtable.py", "reassembly"), ("reassembly.py", "reassembly"), ("wheel.py", "reassembly"),
    ("stream.py", "record"), ("communityid.py", "record"), ("jsonl.py", "write"),
    ("json", "encode"), ("base64", "record"),
)


def _best(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


class Pipeline:
    def __init__(self, pcap: str) -> None:
        self.pcap = pcap
        self.cfg = st_config.default()
        self.limits = Limits.from_config(self.cfg)

    def decoder(self, linktype: int) -> Decoder:
        frag = self.cfg.reassembly.fragments
        return Decoder(linktype, frag_max_pending=frag.max_pending, frag_timeout=frag.timeout)

    def read_only(self) -> int:
        n = 0
        for _lt, _data, meta in read([self.pcap]):
            n += len(meta) // 16
        return n

    def decoded_batches(self) -> Iterator[tuple[int, Callable, bytes, bytes]]:
        """(linktype, its decoder's decode, data, meta) per batch read; one decoder per link
        type, as the reassembler keeps them."""
        decs: dict[int, Callable] = {}
        for lt, data, meta in read([self.pcap]):
            dec = decs.get(lt)
            if dec is None:
                dec = decs[lt] = self.decoder(lt).decode
            yield lt, dec, data, meta

    def table(self) -> list:
        t = FlowTable(self.limits)
        for lt, dec, data, meta in self.decoded_batches():
            t.linktype = lt
            t.feed(dec, data, meta)
        t.flush("shutdown")
        return t.done


def _decode(p: Pipeline) -> Callable[[], int]:
    def run() -> int:
        n = 0
        for _lt, dec, data, meta in p.decoded_batches():
            for sec, usec, off, caplen in META.iter_unpack(meta):
                if dec(data, off, off + caplen, sec + usec * 1e-6) is not None:
                    n += 1
        return n
    return run


def _lookup(p: Pipeline) -> Callable[[], int]:
    def run() -> int:
        flows: dict[tuple, int] = {}
        get = flows.get
        for _lt, dec, data, meta in p.decoded_batches():
            for sec, usec, off, caplen in META.iter_unpack(meta):
                d = dec(data, off, off + caplen, sec + usec * 1e-6)
                if d is None:
                    continue
                key = (d[1], d[3], d[2], d[4])
                if get(key) is None:
                    flows[key] = 1
        return len(flows)
    return run


PER_FLOW_N = 20_000


def per_flow(limits: Limits, n: int = PER_FLOW_N) -> dict[str, float]:
    """Seconds per flow of opening and closing `n` full flows, then `n` embryos, in a fresh
    table (each close builds the flow's Stream, as at the end of a connection)."""
    keys = [((0x0A000000 + i).to_bytes(4, "big"), 1024 + i % 60000, b"\xc0\xa8\x00\x01", 80)
            for i in range(n)]
    def discard(_s: object) -> None:
        pass  # a consumer that keeps nothing: retained streams would slow the GC, not the table

    gc.collect()
    t = FlowTable(limits, emit=discard)
    t.advance(1.0)
    t0 = time.perf_counter()
    flows = [t._new_flow(1.0, 4, src, sport, dst, dport, TH_SYN).flow
             for src, sport, dst, dport in keys]
    t1 = time.perf_counter()
    for f in flows:
        t._close(f, "fin")
    t2 = time.perf_counter()
    t = FlowTable(limits, emit=discard)
    t.advance(1.0)
    t3 = time.perf_counter()
    for i, key in enumerate(keys):
        t._new_embryo(1.0, key, i)
    t4 = time.perf_counter()
    for e in list(t.flows.values()):
        t._close_embryo(e, "timeout")
    t5 = time.perf_counter()
    return {"setup": (t1 - t0) / n, "close": (t2 - t1) / n,
            "embryo_setup": (t4 - t3) / n, "embryo_close": (t5 - t4) / n}


def sink_write(streams: list, path: str) -> None:
    if os.path.exists(path):  # a fresh file each run; the unlink is not what is measured
        os.unlink(path)
    sink = JsonlSink("stages", {"path": path})
    sink.open()
    for i in range(0, len(streams), BATCH):
        sink.write(streams[i : i + BATCH])
    sink.flush()
    sink.close()


def profile(p: Pipeline, out: str) -> pstats.Stats:
    prof = cProfile.Profile()
    prof.enable()
    streams = p.table()
    sink_write(streams, out)
    prof.disable()
    return pstats.Stats(prof)


def stage_of(filename: str) -> str:
    for part, stage in STAGE_OF_FILE:
        if part in filename:
            return stage
    return "other"


def stage_of_entry(fn: tuple, stats: dict, depth: int = 0) -> str:
    """A function's stage by its file; a built-in (no file) takes its main caller's stage."""
    stage = stage_of(fn[0])
    if stage != "other" or fn[0] != "~" or depth > 3:
        return stage
    callers = stats[fn][4]
    if not callers:
        return stage
    main_caller = max(callers, key=lambda c: callers[c][2])  # by tottime spent for it
    return stage_of_entry(main_caller, stats, depth + 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pcap", help="capture to profile (default: generate --capture)")
    ap.add_argument("--capture", default="mixed",
                    choices=("mixed", "short", "synflood", "bulk"),
                    help="generated capture's shape (mixed)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per stage; the best counts (3)")
    ap.add_argument("--top", type=int, default=25, help="cProfile functions listed (25)")
    args = ap.parse_args(argv)
    generated = None
    if args.pcap:
        pcap = args.pcap
        if not os.path.isfile(pcap):
            ap.error(f"--pcap: {pcap}: no such file")
    else:
        sys.path.insert(0, str(HERE))
        import gen_capture

        fd, pcap = tempfile.mkstemp(prefix="streamtap-stages-", suffix=".pcap", dir=TMPFS)
        os.close(fd)
        generated = pcap
        print(f"generating {args.capture} capture {pcap} ...", file=sys.stderr, flush=True)
        gen_capture.generate(pcap, shape=args.capture)
    try:
        return report(pcap, max(1, args.repeat), args.top)
    finally:
        if generated:
            os.unlink(generated)


def report(pcap: str, repeat: int, top: int) -> int:
    p = Pipeline(pcap)
    # first: later stages keep the capture's streams alive, and the GC's walks of them would
    # be counted against the flows timed here
    pf = min((per_flow(p.limits) for _ in range(repeat)), key=lambda d: sum(d.values()))
    t_read, packets = _best(p.read_only, repeat)
    t_dec, _ = _best(_decode(p), repeat)
    t_look, _ = _best(_lookup(p), repeat)
    t_table, streams = _best(p.table, repeat)
    assert isinstance(streams, list)
    flows = max(1, len(streams))
    # encode is a difference of two short timings: more runs, so noise does not swamp it
    t_rec, _ = _best(lambda: [to_record(s) for s in streams], 3 * repeat)
    t_json, _ = _best(lambda: [to_json(s) for s in streams], 3 * repeat)
    out = os.path.join(TMPFS, f"streamtap-stages-{os.getpid()}.jsonl")
    t_write, _ = _best(lambda: sink_write(streams, out), repeat)
    os.unlink(out)

    stats = profile(p, out).stats  # type: ignore[attr-defined]
    os.unlink(out)
    # set-up and close: timed on their own (per_flow), times this capture's flows of each kind
    embryos = sum(1 for s in streams if s.history == "S" and s.client_packets == 1
                  and not s.server_packets)
    full = len(streams) - embryos
    t_setup = full * pf["setup"] + embryos * pf["embryo_setup"]
    t_close = full * pf["close"] + embryos * pf["embryo_close"]
    t_reasm = max(0.0, t_table - t_look - t_setup - t_close)

    us = 1e6
    print(f"capture: {pcap}: {packets:,} packets, {len(streams):,} streams; "
          f"best of {repeat} runs per stage")
    print()
    rows = [
        ("read", "packet", t_read, packets, "reader.read(): the capture's batches"),
        ("decode", "packet", t_dec - t_read, packets, "Decoder.decode per frame"),
        ("flow lookup", "packet", t_look - t_dec, packets, "4-tuple key + one dict lookup"),
        ("reassembly", "packet", t_reasm, packets,
         "FlowTable.feed + flush, minus lookup, set-up, close"),
        ("set-up", "flow", t_setup, flows, "opening the flow (full flow or embryo)"),
        ("close", "flow", t_close, flows, "closing it, its Stream built"),
        ("  full", "flow", pf["setup"] + pf["close"], 1,
         f"set-up {pf['setup'] * 1e6:.2f} + close {pf['close'] * 1e6:.2f} µs; {full:,} here"),
        ("  embryo", "flow", pf["embryo_setup"] + pf["embryo_close"], 1,
         f"set-up {pf['embryo_setup'] * 1e6:.2f} + close {pf['embryo_close'] * 1e6:.2f} µs; "
         f"{embryos:,} here"),
        ("record", "flow", t_rec, flows, "record.to_record"),
        ("encode", "flow", max(0.0, t_json - t_rec), flows, "record.to_json - to_record"),
        ("write", "flow", max(0.0, t_write - t_json), flows,
         f"JsonlSink.write (batches of {BATCH}, tmpfs) - to_json"),
    ]
    print(f"{'stage':<12} {'per':<7} {'µs each':>9} {'total s':>8}  what")
    print(f"{'-' * 12} {'-' * 7} {'-' * 9} {'-' * 8}  {'-' * 40}")
    for name, per, secs, n, what in rows:
        print(f"{name:<12} {per:<7} {secs / n * us:>9.3f} {secs:>8.3f}  {what}")
    total = t_table + t_write
    print(f"{'pipeline':<12} {'packet':<7} {total / packets * us:>9.3f} {total:>8.3f}  "
          "read to JSON Lines on tmpfs (flow table + sink write)")
    print()
    print(f"top {top} functions by cProfile tottime (one profiled run, read to write):")
    print(f"{'tottime s':>9} {'cumtime s':>9} {'calls':>10}  {'stage':<10} function")
    ranked = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    for (fname, line, func), (_cc, nc, tt, ct, _callers) in ranked:
        where = f"{Path(fname).name}:{line}({func})" if line else func
        stage = stage_of_entry((fname, line, func), stats)
        print(f"{tt:>9.3f} {ct:>9.3f} {nc:>10,}  {stage:<10} {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
