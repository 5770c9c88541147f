#!/usr/bin/env python3
"""Live capture benchmark: replay a capture into a veth at rising rates, count kernel drops.

    sudo .venv/bin/python bench/live.py                  # rates 5k..200k pps + top speed
    sudo .venv/bin/python bench/live.py --rates 10000,50000 --seconds 3 --workers 1,2 --json

Two network namespaces joined by a veth pair (tests/netns.py); `tcpreplay --pps=N` sends the
bench capture (bench/gen_capture.py, generated into /dev/shm if missing) from one end while
streamtap workers capture on the other end: `worker_process` children (fork), exactly as the
daemon runs them, 1 worker without fanout and 2 workers in a PACKET_FANOUT_HASH group. Each
(workers, rate) run starts fresh workers, replays `rate * seconds` packets, waits until every
worker has processed what its handle received, then stops them (streams flushed and received
through the queue, as the supervisor would).

Columns: sent (tcpreplay's count) and the rate it achieved; received = sum of the handles'
pcap_stats ps_recv; kernel drops = ps_drop (ring full: the worker fell behind); CPU per worker
= utime + stime from /proc/<pid>/stat from "ready" until caught up, in % of one core over the
replay's wall time (a worker still catching up after the replay ends pushes it past the real
share), and CPU µs per processed packet (all workers). `received` is ps_recv, which on Linux
includes the packets the kernel then dropped.
Needs root and `tcpreplay`. Kernel ring per handle: --buffer (default 8 MiB, smaller than the
daemon's 64 MiB default so a sustained overload shows up within a few seconds).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue as queue_mod
import re
import subprocess
import sys
import time
from pathlib import Path

import machine  # bench/machine.py: the scripts run from bench/

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import netns  # noqa: E402

from streamtap import config  # noqa: E402
from streamtap.process.messages import Eof, Ready, Stats, Stop, Stopped, Streams  # noqa: E402
from streamtap.process.worker import worker_process  # noqa: E402

PCAP = Path("/dev/shm/streamtap-live-bench.pcap")
CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK  # utime, stime (fields 14, 15)


def ensure_pcap(path: Path) -> None:
    if path.exists():
        return
    subprocess.run([sys.executable, str(ROOT / "bench" / "gen_capture.py"), str(path)],
                   check=True, stdout=subprocess.DEVNULL)


def pcap_packets(path: Path) -> int:
    import struct

    n = 0
    with open(path, "rb") as f:
        f.read(24)
        while True:
            hdr = f.read(16)
            if len(hdr) < 16:
                return n
            incl = struct.unpack("<IIII", hdr)[2]
            f.seek(incl, 1)
            n += 1


class Run:
    def __init__(self, net: netns.VethPair, nworkers: int, cfg) -> None:
        self.ctx = mp.get_context("fork")
        self.queue = self.ctx.Queue(maxsize=64)
        self.procs: list = []
        self.conns: list = []
        self.stats: dict[int, dict] = {}
        self.streams = 0
        with net.inside(net.ns_b):
            for i in range(nworkers):
                parent, child = self.ctx.Pipe()
                p = self.ctx.Process(target=worker_process,
                                     args=(i, cfg, net.veth_b, nworkers > 1, child, self.queue))
                p.start()
                self.procs.append(p)
                self.conns.append(parent)
        for c in self.conns:
            msg = c.recv()
            if not isinstance(msg, Ready):
                raise RuntimeError(f"worker failed: {msg}")
        self.cpu0 = [cpu_seconds(p.pid) for p in self.procs]

    def pump(self, timeout: float = 0.05) -> None:
        end = time.monotonic() + timeout
        while True:
            for i, c in enumerate(self.conns):
                while c.poll(0):
                    msg = c.recv()
                    if isinstance(msg, Stats):
                        self.stats[i] = msg.stats
            try:
                item = self.queue.get(timeout=0.01)
                if isinstance(item, Streams):
                    self.streams += len(item.streams)
            except queue_mod.Empty:
                pass
            if time.monotonic() >= end:
                return

    def caught_up(self) -> bool:
        return len(self.stats) == len(self.procs) and all(
            s["packets"] + s["kernel_drops"] >= s["received"] for s in self.stats.values()
        )

    def finish(self, max_wait: float = 10.0) -> tuple[list[float], dict]:
        self.stats.clear()
        end = time.monotonic() + max_wait
        while time.monotonic() < end:
            self.pump(0.2)
            if self.caught_up():
                # one more heartbeat to make sure nothing is still arriving
                before = {i: s["received"] for i, s in self.stats.items()}
                self.stats.clear()
                while len(self.stats) < len(self.procs) and time.monotonic() < end:
                    self.pump(0.2)
                if self.caught_up() and before == {
                    i: s["received"] for i, s in self.stats.items()
                }:
                    break
        cpu = [cpu_seconds(p.pid) - c0 for p, c0 in zip(self.procs, self.cpu0, strict=True)]
        for c in self.conns:
            c.send(Stop())
        eofs = 0
        final: dict[int, dict] = {}
        stopped: set[int] = set()

        def read(i: int, c, wait: float) -> None:
            try:
                while i not in stopped and c.poll(wait):
                    msg = c.recv()
                    if isinstance(msg, Stats):
                        final[i] = msg.stats  # the last one is sent just before Stopped
                    elif isinstance(msg, Stopped):
                        stopped.add(i)
            except (EOFError, OSError):
                stopped.add(i)

        deadline = time.monotonic() + 15
        while eofs < len(self.procs) and time.monotonic() < deadline:
            for i, c in enumerate(self.conns):
                read(i, c, 0)
            try:
                item = self.queue.get(timeout=0.05)
            except queue_mod.Empty:
                continue
            if isinstance(item, Eof):
                eofs += 1
            elif isinstance(item, Streams):
                self.streams += len(item.streams)
        for i, c in enumerate(self.conns):
            read(i, c, 1)
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        return cpu, final


def replay(net: netns.VethPair, pcap: Path, rate: int | None, count: int) -> tuple[int, float]:
    argv = ["tcpreplay", "-i", net.veth_a, f"--limit={count}"]
    argv += ["--topspeed"] if rate is None else [f"--pps={rate}"]
    p = net.run(net.ns_a, [*argv, str(pcap)], timeout=120)
    out = p.stdout + p.stderr
    sent = re.search(r"Actual: (\d+) packets", out)
    pps = re.search(r"Rated: [\d.]+ Bps, [\d.]+ Mbps, ([\d.]+) pps", out)
    return (int(sent.group(1)) if sent else 0), (float(pps.group(1)) if pps else 0.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pcap", type=Path, default=PCAP)
    ap.add_argument("--rates", default="5000,10000,20000,40000,60000,80000,120000,200000,top",
                    help="comma-separated packets/s; 'top' = tcpreplay --topspeed")
    ap.add_argument("--seconds", type=float, default=3.0, help="replay time per rate")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--buffer", default="8MiB", help="kernel ring per handle")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if (why := netns.available()) is not None:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    ensure_pcap(args.pcap)
    total = pcap_packets(args.pcap)
    cfg = config.loads("", overrides={"capture.buffer_size": args.buffer,
                                      "reassembly.timeouts.fin_linger": "0.5s"})
    rates = [None if r == "top" else int(r) for r in args.rates.split(",")]
    results = []
    t_start = time.monotonic()
    with netns.VethPair() as net:
        for nw in [int(x) for x in args.workers.split(",")]:
            for rate in rates:
                count = total if rate is None else min(total, int(rate * args.seconds))
                run = Run(net, nw, cfg)
                t0 = time.monotonic()
                sent, pps = replay(net, args.pcap, rate, count)
                wall = time.monotonic() - t0
                cpu, final = run.finish()
                row = {
                    "workers": nw, "rate": rate or "top", "sent": sent, "achieved_pps": pps,
                    "received": sum(s["received"] for s in final.values()),
                    "kernel_drops": sum(s["kernel_drops"] for s in final.values()),
                    "processed": sum(s["packets"] for s in final.values()),
                    "per_worker": [final[i]["received"] for i in sorted(final)],
                    "streams": run.streams,
                    "replay_s": round(wall, 2),
                    "cpu_s": [round(c, 2) for c in cpu],
                    "cpu_pct": [round(100 * c / wall, 1) for c in cpu],
                    "cpu_us_per_packet": round(1e6 * sum(cpu) / max(1, sum(
                        s["packets"] for s in final.values())), 1),
                }
                results.append(row)
                if not args.json:
                    print(_line(row), flush=True)
    best = {}
    for nw in {r["workers"] for r in results}:
        ok = [r["achieved_pps"] for r in results if r["workers"] == nw and r["kernel_drops"] == 0]
        best[nw] = max(ok) if ok else 0
    host = machine.machine_line()
    if args.json:
        print(json.dumps({"machine": host, "capture": str(args.pcap), "packets": total,
                          "buffer": args.buffer, "results": results, "best_zero_drop_pps": best},
                         indent=1))
    else:
        print()
        print(f"machine: {host}; ring {args.buffer} per handle; capture {args.pcap} "
              f"({total} packets); {time.monotonic() - t_start:.0f} s")
        for nw, pps in sorted(best.items()):
            print(f"highest achieved rate with 0 kernel drops, {nw} worker(s): {pps:,.0f} pps")
    return 0


HEADER = ("| workers | target pps | achieved pps | sent | received | kernel drops | per worker "
          "| streams | CPU % per worker | CPU µs/packet |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
_printed = False


def _line(r: dict) -> str:
    global _printed
    head = "" if _printed else HEADER + "\n"
    _printed = True
    return (f"{head}| {r['workers']} | {r['rate']} | {r['achieved_pps']:,.0f} | {r['sent']:,} | "
            f"{r['received']:,} | {r['kernel_drops']:,} | "
            f"{' / '.join(f'{x:,}' for x in r['per_worker'])} | {r['streams']:,} | "
            f"{' / '.join(str(x) for x in r['cpu_pct'])} | {r['cpu_us_per_packet']} |")


if __name__ == "__main__":
    sys.exit(main())
