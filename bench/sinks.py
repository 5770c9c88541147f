#!/usr/bin/env python3
"""Sink throughput benchmark: JSONL, pcap, CouchDB, the disk spool and the SinkRunner.

    python bench/sinks.py [--pcap FILE] [--repeat 3] [--json] [--keep]

The capture (default /dev/shm/bench.pcap, generated with bench/gen_capture.py when missing and
then deleted at the end unless --keep) is reassembled ONCE, with `keep_packets: true`, into a
list of Streams held in memory. Each benchmark then times only the sink work (never the
reassembly), best of --repeat runs, each run into a fresh directory under /dev/shm (or /var/tmp
for the on-disk spool) that is removed afterwards. See bench/README.md ("Sinks").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import machine  # bench/machine.py: the scripts run from bench/
from machine import results_table

import streamtap
import streamtap.config
from streamtap.engine.stream import Stream
from streamtap.sinks import codec, registry
from streamtap.sinks.base import OK, Sink
from streamtap.sinks.runner import SinkRunner
from streamtap.sinks.spool import Spool

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TMPFS = "/dev/shm"
DISK = "/var/tmp"
DEFAULT_PCAP = os.path.join(TMPFS, "bench.pcap")
BATCH = 500  # records per write() call, as the runner's default batch_records
SPOOL_MAX = 16 << 30  # never drop in the benchmark


@dataclass
class Result:
    sink: str
    unit: str = "records"
    records: int = 0
    bytes: int = 0  # what the benchmark counts as moved (see bench/README.md)
    runs: list[float] = field(default_factory=list)
    seconds: float | None = None
    records_per_s: float | None = None
    mb_per_s: float | None = None  # MB = 10**6 bytes
    note: str = ""
    error: str | None = None

    def finish(self) -> Result:
        if self.runs:
            self.seconds = min(self.runs)
            self.records_per_s = self.records / self.seconds if self.seconds else None
            self.mb_per_s = self.bytes / 1e6 / self.seconds if self.seconds else None
        return self


# -- helpers -----------------------------------------------------------------------------------

def sink_from_yaml(options_yaml: str) -> Sink:
    """A sink built the way the daemon builds it: config -> SinkConfig -> registry.create."""
    cfg = streamtap.config.loads(f"sinks:\n  - {options_yaml}\n")
    return registry.create(cfg.sinks[0])


def batches(streams: Sequence[Stream], n: int = BATCH) -> list[Sequence[Stream]]:
    return [streams[i:i + n] for i in range(0, len(streams), n)]


def tree_bytes(path: str) -> int:
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(d, f))
    return total


def tree_files(path: str) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def write_all(sink: Sink, streams: Sequence[Stream]) -> None:
    for b in batches(streams):
        r = sink.write(b)
        if r.status != OK:
            raise RuntimeError(f"{sink.type} sink: write returned {r.status}: {r.error}")


def timed_run(sink: Sink, streams: Sequence[Stream]) -> float:
    """Seconds to open `sink`, write `streams` in batches, flush and close it."""
    t0 = time.perf_counter()
    sink.open()
    write_all(sink, streams)
    sink.flush()
    sink.close()
    return time.perf_counter() - t0


def fresh_dir(base: str) -> str:
    return tempfile.mkdtemp(prefix="streamtap-bench-sinks-", dir=base)


# -- benchmarks --------------------------------------------------------------------------------

def bench_jsonl(streams: list[Stream], repeat: int) -> Result:
    res = Result("jsonl (base64, 1 MiB cap)", records=len(streams))
    for _ in range(repeat):
        d = fresh_dir(TMPFS)
        try:
            path = os.path.join(d, "out.jsonl")
            sink = sink_from_yaml(f"{{type: jsonl, path: {path}}}")
            res.runs.append(timed_run(sink, streams))
            res.bytes = os.path.getsize(path)
            lines = sum(1 for _ in open(path, "rb"))  # noqa: SIM115
            if lines != len(streams):
                raise RuntimeError(f"jsonl: {lines} lines for {len(streams)} streams")
        finally:
            shutil.rmtree(d, ignore_errors=True)
    return res.finish()


def bench_pcap(streams: list[Stream], repeat: int, mode: str) -> Result:
    res = Result(f"pcap {mode}", unit="streams", records=len(streams))
    for _ in range(repeat):
        d = fresh_dir(TMPFS)
        try:
            out = os.path.join(d, "pcap")
            sink = sink_from_yaml(f"{{type: pcap, dir: {out}, mode: {mode}}}")
            res.runs.append(timed_run(sink, streams))
            res.bytes = tree_bytes(out)
            nfiles = tree_files(out)
            res.note = f"{nfiles:,} file{'s' if nfiles != 1 else ''}"
        finally:
            shutil.rmtree(d, ignore_errors=True)
    return res.finish()


def bench_couchdb(streams: list[Stream], repeat: int) -> Result:
    res = Result("couchdb (pouchdb-server, in-memory)", unit="docs", records=len(streams))
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from couchserver import CouchServer, PouchdbMissing
    finally:
        sys.path.remove(str(ROOT / "tests"))
    try:
        server = CouchServer()  # in memory, 127.0.0.1, a free port
    except PouchdbMissing:
        res.error = "run make test to install pouchdb-server"
        return res
    from streamtap.sinks.couchdb import encode_doc

    res.bytes = sum(len(encode_doc(s)[1]) for s in streams)  # JSON docs, base64 attachments
    with server:
        for i in range(repeat):
            sink = sink_from_yaml(
                f"{{type: couchdb, url: '{server.url}', database: bench{i}}}")
            sink.open()  # creates the database and its index: setup, not timed
            t0 = time.perf_counter()
            write_all(sink, streams)
            sink.flush()
            res.runs.append(time.perf_counter() - t0)
            sink.close()
            n = server.get(f"/bench{i}")["doc_count"]
            if n < len(streams):
                raise RuntimeError(f"couchdb: {n} docs stored for {len(streams)} streams")
            server.request("DELETE", f"/bench{i}")
    res.note = "batches of 500, open() not timed"
    return res.finish()


def bench_spool(streams: list[Stream], repeat: int, base: str, where: str) -> list[Result]:
    app = Result(f"spool append ({where})", records=len(streams))
    rep = Result(f"spool replay ({where})", records=len(streams))
    app.note = "codec.encode + Spool.append + close (fsync)"
    rep.note = "read_batches(500) + codec.decode + commit"
    for _ in range(repeat):
        d = fresh_dir(base)
        try:
            spool_dir = os.path.join(d, "spool")
            t0 = time.perf_counter()
            sp = Spool(spool_dir, max_bytes=SPOOL_MAX)
            append, encode = sp.append, codec.encode
            for s in streams:
                append(encode(s))
            sp.close()
            app.runs.append(time.perf_counter() - t0)
            app.bytes = rep.bytes = tree_bytes(spool_dir)

            t0 = time.perf_counter()
            sp = Spool(spool_dir, max_bytes=SPOOL_MAX)
            decode, n = codec.decode, 0
            for payloads, token in sp.read_batches(BATCH):
                for p in payloads:
                    decode(p)
                n += len(payloads)
                sp.commit(token)
            sp.close()
            rep.runs.append(time.perf_counter() - t0)
            if n != len(streams):
                raise RuntimeError(f"spool: replayed {n} records of {len(streams)}")
        finally:
            shutil.rmtree(d, ignore_errors=True)
    return [app.finish(), rep.finish()]


def bench_runner(streams: list[Stream], repeat: int) -> Result:
    res = Result("SinkRunner -> jsonl (end to end)", records=len(streams))
    res.note = "submit all + stop(); no spool"
    for _ in range(repeat):
        d = fresh_dir(TMPFS)
        try:
            path = os.path.join(d, "out.jsonl")
            sink = sink_from_yaml(f"{{type: jsonl, path: {path}}}")
            runner = SinkRunner(sink, spool_dir=None, queue_max=max(10_000, len(streams)))
            t0 = time.perf_counter()
            runner.start()
            runner.submit(streams)
            runner.stop(timeout=120.0)
            res.runs.append(time.perf_counter() - t0)
            # runner.counts, not stats()["records"]: stats() merges sink.health() over its own
            # keys, and the JSONL sink's health has an int "records" that replaces the dict.
            counts = dict(runner.counts)
            if counts["ok"] != len(streams):
                raise RuntimeError(f"runner: {counts} for {len(streams)} streams")
            res.bytes = os.path.getsize(path)
        finally:
            shutil.rmtree(d, ignore_errors=True)
    return res.finish()


# -- machine, capture, report ------------------------------------------------------------------

def machine_figures() -> dict:
    return {**machine.machine_figures(),
            "streamtap": getattr(streamtap, "__version__", "unknown")}


def load_streams(pcap: str) -> tuple[list[Stream], float]:
    cfg = streamtap.config.loads("reassembly: {keep_packets: true}")
    t0 = time.perf_counter()
    streams = list(streamtap.reassemble(pcap, config=cfg))
    return streams, time.perf_counter() - t0


def format_report(machine: dict, capture: dict, results: list[Result], repeat: int) -> str:
    lines = [
        f"machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable), "
        f"Linux {machine['kernel']}, Python {machine['python']}, streamtap "
        f"{machine['streamtap']}, {machine['date']}",
        f"capture: {capture['path']} ({capture['bytes'] / 2**20:.1f} MiB"
        f"{', generated' if capture['generated'] else ''}): {capture['streams']:,} streams, "
        f"{capture['packets']:,} packets kept, {capture['payload_bytes'] / 1e6:.1f} MB payload; "
        f"reassembled once in {capture['reassembly_s']:.2f} s (not timed below)",
        f"best of {repeat} run{'s' if repeat > 1 else ''}; sink time only; MB = 10^6 bytes; "
        f"outputs in {TMPFS} unless the row says disk ({DISK})",
        "",
    ]
    head = ("sink", "records", "seconds", "records/s", "MB/s", "notes")
    rows: list[tuple[str, ...]] = []
    for r in results:
        if r.error:
            rows.append((r.sink, f"n/a ({r.error})"))
            continue
        rows.append((r.sink, f"{r.records:,} {r.unit}", f"{r.seconds:.3f}",
                     f"{r.records_per_s:,.0f}", f"{r.mb_per_s:,.1f}", r.note))
    lines += results_table(head, rows)
    return "\n".join(lines)


def run_safely(fn: Callable[[], Result | list[Result]], name: str) -> list[Result]:
    try:
        out = fn()
    except Exception as exc:  # one failing sink must not hide the others
        return [Result(name, error=f"error: {type(exc).__name__}: {exc}")]
    return out if isinstance(out, list) else [out]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pcap", help=f"capture to use (default {DEFAULT_PCAP}, generated if missing)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per benchmark, best kept (3)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--keep", action="store_true", help="keep a generated capture")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")

    pcap = args.pcap or DEFAULT_PCAP
    generated = False
    if not os.path.exists(pcap):
        if args.pcap:
            ap.error(f"{pcap}: no such file")
        print(f"generating {pcap} ...", file=sys.stderr)
        subprocess.run([sys.executable, str(HERE / "gen_capture.py"), pcap], check=True,
                       stdout=subprocess.DEVNULL)
        generated = True
    try:
        print(f"reassembling {pcap} ...", file=sys.stderr)
        streams, reassembly_s = load_streams(pcap)
        capture = {
            "path": pcap,
            "bytes": os.path.getsize(pcap),
            "generated": generated,
            "streams": len(streams),
            "packets": sum(len(s.packets or ()) for s in streams),
            "payload_bytes": sum(len(s.client_data) + len(s.server_data) for s in streams),
            "reassembly_s": round(reassembly_s, 3),
        }
        rep = args.repeat
        plan: list[tuple[str, Callable[[], Result | list[Result]]]] = [
            ("jsonl", lambda: bench_jsonl(streams, rep)),
            ("pcap per_stream", lambda: bench_pcap(streams, rep, "per_stream")),
            ("pcap rotating", lambda: bench_pcap(streams, rep, "rotating")),
            ("couchdb", lambda: bench_couchdb(streams, rep)),
            ("spool (tmpfs)", lambda: bench_spool(streams, rep, TMPFS, "tmpfs")),
            ("spool (disk)", lambda: bench_spool(streams, rep, DISK, f"disk {DISK}")),
            ("SinkRunner -> jsonl", lambda: bench_runner(streams, rep)),
        ]
        results: list[Result] = []
        for name, fn in plan:
            print(f"  {name} ...", file=sys.stderr)
            results += run_safely(fn, name)
    finally:
        if generated and not args.keep:
            os.unlink(pcap)

    machine = machine_figures()
    if args.json:
        print(json.dumps({"machine": machine, "capture": capture, "repeat": args.repeat,
                          "results": [asdict(r) for r in results]}, indent=2))
    else:
        print(format_report(machine, capture, results, args.repeat))
    return 0 if not any(r.error and not r.error.startswith("run make") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
