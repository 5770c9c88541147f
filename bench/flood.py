#!/usr/bin/env python3
"""A SYN flood into a live daemon (issue 11 item 2).

    sudo .venv/bin/python bench/flood.py [--syns 1000000] [--pps 20000] [--cap 256MiB]
                                         [--workers 2] [--real 200] [--tcp 60] [--json]

Two network namespaces joined by a veth pair (tests/netns.py). The daemon captures on the veth
in namespace B with `--workers 2`, `reassembly.limits.memory: CAP`, a JSONL sink. From namespace
A, `tcpreplay --pps PPS` replays a built capture of SYNS unanswered SYNs from distinct sources
(100.64.0.0/10, random ports; `bench/gen_capture.py --shape synflood`, scaled) with REAL
complete connections inside (known truth: lengths and SHA-256 each way); at the same time a
client in A makes TCP real connections to a server in B (their SHA-256 is the truth too).

Held (the script exits 1 otherwise):
- RSS of the daemon (supervisor + workers, VmRSS from /proc sampled every 0.2 s, summed; the
  capture rings, `--buffer` per worker, count in it) stays under CAP + 150 MiB; the whole tree
  (+ multiprocessing's forkserver and resource tracker, ~45 MiB) is reported beside it;
- capture never stops: every worker's `received` counter grows in every 3 s window of the
  replay, and no worker restarts;
- every real connection (replayed and live TCP) comes out exactly once, byte-exact;
- evictions show in `/metrics` (`streamtap_tcp_evictions_total{reason=...}`).

The handshake timeout is 300 s (default 30 s) so that no flood SYN expires on its own during
the replay: the table must hold or evict them all (10 times shorter in emergency mode).
Reported: peak and final RSS, kernel and interface drops (`/status`), evictions by reason, and
the flow table's memory counters. Payload-less streams (the flood's) are not written
(`reassembly.emit_empty: false`, `--emit-empty` to write them): the JSONL then holds only
the real connections. Needs root, `tcpreplay`, `ip netns`. tests/test_flood.py runs it small.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import http.client
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import gen_capture as gc  # noqa: E402
import machine  # noqa: E402
import netns  # noqa: E402

STREAMTAP = str(Path(sys.executable).with_name("streamtap"))
MIB = 1 << 20
RSS_SLACK = 150 * MIB


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B?)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MiB)")
    unit = (m.group(2) or "").upper()[:1]
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[unit]


# -- the capture --------------------------------------------------------------------------------


def build_capture(path: str, syns: int, real: int, seed: int = 1) -> list[dict]:
    """`syns` unanswered SYNs from distinct sources to one server, 10 µs apart, with `real`
    complete connections to the same server through them (gen_capture's synflood, scaled).
    Returns the real connections' truth."""
    rng = random.Random(seed)
    block = rng.randbytes(gc.BLOCK_SIZE)
    w = gc._FastWriter(path)
    try:
        truth, _ = gc.generate_synflood(w, rng, block, syns=syns, real=real)
    finally:
        w.close()
    return truth


# -- the daemon ---------------------------------------------------------------------------------


def tree_pids(pid: int) -> list[int]:
    """`pid` and its descendants (from /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
    return out


def rss_bytes(pid: int, pids: list[int] | None = None) -> int:
    """VmRSS summed over `pids`, or the process tree rooted at `pid`."""
    total = 0
    for p in pids if pids is not None else tree_pids(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


def fd_count(pid: int) -> int:
    n = 0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            n += len(os.listdir(f"/proc/{p}/fd"))
    return n


def control_get(sock: Path, path: str, timeout: float = 5) -> str | None:
    class Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(str(sock))

    try:
        c = Conn("localhost", timeout=timeout)
        c.request("GET", path)
        r = c.getresponse()
        body = r.read().decode()
        c.close()
        return body if r.status == 200 else None
    except OSError:
        return None


def status(sock: Path) -> dict | None:
    body = control_get(sock, "/status")
    return json.loads(body) if body else None


def evictions(sock: Path) -> dict[str, float] | None:
    """streamtap_tcp_evictions_total by reason, from /metrics."""
    body = control_get(sock, "/metrics")
    if body is None:
        return None
    out = {}
    for m in re.finditer(r'^streamtap_tcp_evictions_total\{reason="(\w+)"\} (\S+)$', body, re.M):
        out[m.group(1)] = float(m.group(2))
    return out


class Sampler:
    """RSS of the daemon's tree and the workers' `received`, every `every` seconds."""

    def __init__(self, pid: int, sock: Path, every: float = 0.2) -> None:
        self.pid, self.sock, self.every = pid, sock, every
        self.rss: list[tuple[float, int]] = []  # supervisor + workers (their pids in /status)
        self.tree: list[tuple[float, int]] = []  # every process: + forkserver, resource tracker
        self.workers: list[int] = []
        self.received: list[tuple[float, list[int]]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Sampler:
        self._t.start()
        return self

    def _run(self) -> None:
        k = 0
        while not self._stop.is_set():
            now = time.monotonic()
            if k % 5 == 0:
                st = status(self.sock)
                if st:
                    self.received.append((now, [w["received"] for w in st["workers"]]))
                    self.workers = [w["pid"] for w in st["workers"] if w["pid"]]
            self.rss.append((now, rss_bytes(self.pid, [self.pid, *self.workers])))
            self.tree.append((now, rss_bytes(self.pid)))
            k += 1
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)

    def stalls(self, t0: float, t1: float, window: float = 3.0) -> list[str]:
        """Windows of `window` s within [t0, t1] in which a worker's `received` did not grow
        (workers report their counters about once a second)."""
        pts = [(t, r) for t, r in self.received if t0 <= t <= t1]
        bad = []
        j = 0
        for i, (t, r) in enumerate(pts):
            # j: the latest sample at least `window` s before this one
            while j + 1 < i and pts[j + 1][0] <= t - window:
                j += 1
            if pts[j][0] > t - window:
                continue
            r0 = pts[j][1]
            for w, (a, b) in enumerate(zip(r0, r, strict=False)):
                if b <= a:
                    bad.append(f"worker {w} received nothing in {t - pts[j][0]:.1f} s "
                               f"at +{t - t0:.1f} s")
        return bad


def write_config(path: Path, out: Path, cap: int, emit_empty: bool, workers: int,
                 buffer: int) -> None:
    path.write_text(
        f"capture: {{workers: {workers}, buffer_size: {buffer}, shutdown_timeout: 10s}}\n"
        f"reassembly:\n"
        f"  emit_empty: {'true' if emit_empty else 'false'}\n"
        f"  timeouts: {{fin_linger: 0.5s, handshake: 300s}}\n"
        f"  limits: {{memory: {cap}}}\n"
        f"sinks:\n  - type: jsonl\n    path: {out}\n    max_payload: 0\n"
    )


def records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def _sha(rec: dict, side: str) -> tuple[int, str]:
    data = base64.b64decode(rec[side].get("payload") or "")
    return len(data), hashlib.sha256(data).hexdigest()


def check_replayed(recs: list[dict], truth: list[dict]) -> dict[str, int]:
    by_key: dict[tuple, list[dict]] = {}
    for r in recs:
        key = (r["source"]["ip"], r["source"]["port"], r["destination"]["ip"],
               r["destination"]["port"])
        by_key.setdefault(key, []).append(r)
    exact = lost = dup = 0
    for t in truth:
        got = by_key.get((*t["client"], *t["server"]), [])
        if not got:
            lost += 1
            continue
        if len(got) > 1:
            dup += 1
        r = got[0]
        if (_sha(r, "source") == (t["client_len"], t["client_sha256"])
                and _sha(r, "destination") == (t["server_len"], t["server_sha256"])):
            exact += 1
    return {"expected": len(truth), "exact": exact, "lost": lost, "duplicated": dup}


def check_live(recs: list[dict], conns: list[dict], server_port: int) -> dict[str, int]:
    by_port: dict[int, list[dict]] = {}
    for r in recs:
        if r["destination"]["port"] == server_port:
            by_port.setdefault(r["source"]["port"], []).append(r)
    exact = lost = dup = 0
    for c in conns:
        got = by_port.get(c["port"], [])
        if not got:
            lost += 1
            continue
        if len(got) > 1:
            dup += 1
        r = got[0]
        if (_sha(r, "source") == (c["sent_len"], c["sent"])
                and _sha(r, "destination") == (c["recv_len"], c["recv"])):
            exact += 1
    return {"expected": len(conns), "exact": exact, "lost": lost, "duplicated": dup}


def run(tmp: Path, *, syns: int, pps: int, cap: int, workers: int = 2, real: int = 200,
        tcp: int = 60, emit_empty: bool = False, seed: int = 1, buffer: int = 16 * MIB,
        log: Any = None) -> dict[str, Any]:
    """Build, replay, measure; returns the figures (the caller asserts)."""
    say = log or (lambda *a: None)
    pcap = tmp / "flood.pcap"
    t = time.monotonic()
    truth = build_capture(str(pcap), syns, real, seed)
    say(f"built {pcap} ({pcap.stat().st_size / MIB:.0f} MiB) in {time.monotonic() - t:.1f} s")
    out = tmp / "streams.jsonl"
    cfg = tmp / "flood.yaml"
    write_config(cfg, out, cap, emit_empty, workers, buffer)
    sock = tmp / "ctl.sock"
    res: dict[str, Any] = {"syns": syns, "pps": pps, "cap_mib": cap / MIB, "workers": workers,
                           "buffer_mib": buffer / MIB}
    with netns.VethPair() as net:
        server = net.start_server(ns=net.ns_b)
        env = dict(os.environ, STATE_DIRECTORY=str(tmp / "state"))
        env.pop("NOTIFY_SOCKET", None)
        err = open(tmp / "stderr.txt", "w")  # noqa: SIM115
        d = net.popen(net.ns_b, [STREAMTAP, "-i", net.veth_b, "--config", str(cfg),
                                 "--control-socket", str(sock)],
                      env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            ok = netns.wait_for(lambda: (st := status(sock)) is not None
                                and all(w["alive"] for w in st["workers"]), 30, every=0.2)
            if not ok:
                raise RuntimeError(f"daemon not up: {(tmp / 'stderr.txt').read_text()[-2000:]}")
            time.sleep(1.0)
            pids0 = [w["pid"] for w in status(sock)["workers"]]  # type: ignore[index]
            res["rss_start_mib"] = round(rss_bytes(d.pid, [d.pid, *pids0]) / MIB, 1)
            res["rss_tree_start_mib"] = round(rss_bytes(d.pid) / MIB, 1)
            sampler = Sampler(d.pid, sock).start()
            t0 = time.monotonic()
            replay = net.popen(net.ns_a, ["tcpreplay", "-q", "-i", net.veth_a, "--pps", str(pps),
                                          str(pcap)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            # real TCP through the namespaces during the flood: a few batches spread over it
            rng = random.Random(seed)
            expect_s = syns / pps
            batches = max(1, min(6, tcp // 10))
            live: list[dict] = []
            for b in range(batches):
                n = tcp // batches + (1 if b < tcp % batches else 0)
                spec = [(net.ip4_b, rng.randint(8, 150_000), rng.randint(0, 300_000))
                        for _ in range(n)]
                live += net.run_client(spec, ns=net.ns_a, parallel=4, timeout=120)
                time.sleep(max(0.0, t0 + (b + 1) * expect_s / (batches + 1) - time.monotonic()))
            rout, _ = replay.communicate(timeout=expect_s * 3 + 120)
            t1 = time.monotonic()
            res["replay_s"] = round(t1 - t0, 1)
            res["tcpreplay"] = " ".join(rout.split())[-300:]
            # the last streams: fin_linger + the sink's batch age
            netns.wait_for(lambda: len(records(out)) >= real + len(live), 30, every=0.5)
            time.sleep(2.0)
            sampler.stop()
            st = status(sock) or {}
            res["evictions"] = evictions(sock)
            res["rss_peak_mib"] = round(max(r for _, r in sampler.rss) / MIB, 1)
            res["rss_end_mib"] = round(sampler.rss[-1][1] / MIB, 1)
            res["rss_tree_peak_mib"] = round(max(r for _, r in sampler.tree) / MIB, 1)
            res["rss_bound_mib"] = round((cap + RSS_SLACK) / MIB, 1)
            res["stalls"] = sampler.stalls(t0, t1 - 1.0)
            res["worker_restarts"] = st.get("worker_restarts")
            res["worker_pids_same"] = [w["pid"] for w in st.get("workers", [])] == pids0
            res["received"] = st.get("received")
            res["packets"] = st.get("packets")
            res["kernel_drops"] = st.get("kernel_drops")
            res["interface_drops"] = st.get("interface_drops")
            res["channel_dropped"] = st.get("channel_dropped")
            res["streams"] = st.get("streams")
            for k in ("memory_limit_hits", "emergency_entered", "memory_used", "flows_active"):
                if k in st:
                    res[k] = st[k]
        finally:
            with contextlib.suppress(Exception):
                d.terminate()
                d.wait(30)
            if d.poll() is None:
                d.kill()
            err.close()
            server.kill()
    res["exit"] = d.returncode
    recs = records(out)
    res["replayed"] = check_replayed(recs, truth)
    res["live_tcp"] = check_live(recs, live, 5000)
    return res


def verdict(res: dict[str, Any]) -> list[str]:
    """What failed, in words; [] = everything held."""
    bad = []
    if res["rss_peak_mib"] >= res["rss_bound_mib"]:
        bad.append(f"peak RSS {res['rss_peak_mib']} MiB >= {res['rss_bound_mib']} MiB")
    if res["stalls"]:
        bad.append(f"capture stalled: {res['stalls'][:3]}")
    if res["worker_restarts"] or not res["worker_pids_same"]:
        bad.append(f"workers restarted ({res['worker_restarts']})")
    for k in ("replayed", "live_tcp"):
        c = res[k]
        if c["exact"] != c["expected"] or c["duplicated"]:
            bad.append(f"{k}: {c}")
    if not res["evictions"] or not sum(res["evictions"].values()):
        bad.append(f"no evictions in /metrics: {res['evictions']}")
    if res["exit"] != 0:
        bad.append(f"daemon exited {res['exit']}")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--syns", type=int, default=1_000_000, help="flood SYNs (1000000)")
    ap.add_argument("--pps", type=int, default=20_000, help="replay rate, packets/s (20000)")
    ap.add_argument("--cap", type=parse_size, default=256 * MIB,
                    help="reassembly.limits.memory (256MiB)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--buffer", type=parse_size, default=16 * MIB,
                    help="capture.buffer_size, the kernel ring per worker (16MiB; it counts "
                         "in the RSS)")
    ap.add_argument("--real", type=int, default=200, help="real connections in the capture")
    ap.add_argument("--tcp", type=int, default=60, help="real TCP connections made live")
    ap.add_argument("--emit-empty", action="store_true",
                    help="also write the flood's payload-less streams")
    ap.add_argument("--dir", default="/dev/shm", help="where the capture and outputs go")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if (why := netns.available()) is not None:
        print(f"flood: {why}", file=sys.stderr)
        return 2
    import tempfile

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="flood-") as d:
        res = run(Path(d), syns=args.syns, pps=args.pps, cap=args.cap, workers=args.workers,
                  real=args.real, tcp=args.tcp, emit_empty=args.emit_empty, buffer=args.buffer,
                  log=lambda m: print(m, file=sys.stderr))
    return machine.print_verdict(res, verdict(res), args.json)


if __name__ == "__main__":
    sys.exit(main())
