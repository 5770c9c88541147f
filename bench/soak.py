#!/usr/bin/env python3
"""Soak: live traffic at a steady rate with faults on a schedule (issue 11 item 8).

    .venv/bin/python bench/soak.py [--duration 1800] [--rate 5] [--kill-every 120]
                                   [--hup-every 30] [--couch-every 300] [--couch-down 60] [--json]

A daemon on `lo` (2 workers, filter `tcp port P`) with a CouchDB sink (pouchdb-server on
127.0.0.1, tests/couchserver.py, on disk so it survives its restarts) and a JSONL sink. A client
makes RATE connections a second to a server on 127.0.0.1:P; each sends a unique tag and random
bytes, the server answers with random bytes; the client keeps the SHA-256 of both ways (the
truth). Faults: a worker `kill -9` every KILL_EVERY s (alternating workers), SIGHUP every
HUP_EVERY s (the same config: every sink is rebuilt), CouchDB down COUCH_DOWN s at the end of
every COUCH_EVERY s.

At the end (CouchDB up, the backlog delivered, SIGTERM): every connection must be in the JSONL
exactly once and byte-exact (matched by its tag), and in CouchDB exactly once (by `_id` =
the JSONL record's `stream.id`). A `kill -9` loses what the killed worker held in memory (its
open connections; DESIGN: records in memory are lost if the process dies), and while a worker is
restarting the kernel's fanout sends its flows to the other worker, then splits them when it is
back: connections that overlap [kill - 2 s, the new worker up + 0.5 s] are reported apart
(`at_kill`, with how many came out exact anyway) and not counted as lost. Reported besides: RSS
and open fds of the daemon's process tree at the start and the end, worker restarts, reloads,
CouchDB outages, the sinks' counters. tests/test_soak.py runs it for ~60 s.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import machine  # noqa: E402
from couchserver import CouchServer  # noqa: E402
from flood import fd_count, rss_bytes, status  # noqa: E402

STREAMTAP = str(Path(sys.executable).with_name("streamtap"))
MIB = 1 << 20
TAG = 18  # 8 digits of reply length + 10 digits of connection number


class Server:
    """127.0.0.1: reads until the client's FIN, answers with the length its first 8 bytes say."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(c,), daemon=True).start()

    @staticmethod
    def _one(c: socket.socket) -> None:
        with c:
            buf = bytearray()
            with contextlib.suppress(OSError):
                c.settimeout(30)
                while d := c.recv(65536):
                    buf += d
                c.sendall(os.urandom(int(bytes(buf[:8]) or b"0")))

    def close(self) -> None:
        self.sock.close()


class Traffic:
    """`rate` connections a second, each on its own pool thread; `conns` is the truth."""

    def __init__(self, port: int, rate: float, seed: int = 1) -> None:
        self.port, self.rate = port, rate
        self.rng = random.Random(seed)
        self.conns: list[dict] = []
        self.failed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(32)
        self._t = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Traffic:
        self._t.start()
        return self

    def _run(self) -> None:
        n = 0
        t0 = time.monotonic()
        while not self._stop.is_set():
            n += 1
            size, reply = self.rng.randint(0, 6000), self.rng.randint(0, 20000)
            self._pool.submit(self._one, n, size, reply)
            self._stop.wait(max(0.0, t0 + n / self.rate - time.monotonic()))

    def _one(self, n: int, size: int, reply: int) -> None:
        sent = b"%08d%010d" % (reply, n) + os.urandom(size)
        start = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
                port = s.getsockname()[1]
                s.sendall(sent)
                s.shutdown(socket.SHUT_WR)
                got = bytearray()
                while d := s.recv(65536):
                    got += d
        except OSError:
            with self._lock:
                self.failed += 1
            return
        with self._lock:
            self.conns.append({"n": n, "port": port, "start": start, "end": time.monotonic(),
                               "sent": hashlib.sha256(sent).hexdigest(), "sent_len": len(sent),
                               "recv": hashlib.sha256(got).hexdigest(), "recv_len": len(got)})

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)
        self._pool.shutdown(wait=True)


def _records(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for line in path.read_bytes().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def _stored(url: str) -> list[dict]:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/streamtap/_all_docs", timeout=30) as r:
            rows = json.loads(r.read())["rows"]
    except OSError:
        return []
    return [row for row in rows if not row["id"].startswith("_design/")]


def check(conns: list[dict], recs: list[dict], docs: list[dict], port: int,
          windows: list[tuple[float, float]]) -> dict[str, Any]:
    """Lost, duplicated, inexact per sink; connections overlapping a kill window apart."""
    by_n: dict[int, list[dict]] = {}
    untagged = 0
    for r in recs:
        if r["destination"]["port"] != port:
            continue
        data = base64.b64decode(r["source"].get("payload") or "")
        try:
            n = int(data[8:TAG])
        except ValueError:
            untagged += 1  # picked up mid-stream after a kill: no tag
            continue
        by_n.setdefault(n, []).append(r)
    doc_ids = [d["id"] for d in docs]
    doc_set = set(doc_ids)

    def at_kill(c: dict) -> bool:
        return any(c["start"] < b and c["end"] > a for a, b in windows)

    out = {"connections": len(conns), "at_kill": 0, "at_kill_exact": 0, "jsonl_lost": 0,
           "jsonl_duplicated": 0, "jsonl_inexact": 0, "couchdb_lost": 0,
           "couchdb_duplicated": len(doc_ids) - len(doc_set), "untagged_records": untagged}
    lost: list[dict] = []
    for c in conns:
        got = by_n.get(c["n"], [])
        exact = [r for r in got
                 if (_digest(r, "source") == (c["sent_len"], c["sent"])
                     and _digest(r, "destination") == (c["recv_len"], c["recv"]))]
        if at_kill(c):
            out["at_kill"] += 1
            out["at_kill_exact"] += bool(exact)
            out["jsonl_duplicated"] += len(got) > 1
            continue
        if not got:
            out["jsonl_lost"] += 1
            lost.append(c)
        elif len(got) > 1:
            out["jsonl_duplicated"] += 1
        elif not exact:
            out["jsonl_inexact"] += 1
        if got and got[0]["stream"]["id"] not in doc_set:
            out["couchdb_lost"] += 1
    out["lost_detail"] = [{k: c[k] for k in ("n", "port", "start", "end")} for c in lost[:10]]
    return out


def _digest(r: dict, side: str) -> tuple[int, str]:
    data = base64.b64decode(r[side].get("payload") or "")
    return len(data), hashlib.sha256(data).hexdigest()


def run(tmp: Path, *, duration: float, rate: float = 5.0, kill_every: float = 120,
        hup_every: float = 30, couch_every: float = 300, couch_down: float = 60,
        log: Any = None) -> dict[str, Any]:
    say = log or (lambda *a: None)
    couch = CouchServer(data_dir=tmp / "couch")
    server = Server()
    out = tmp / "streams.jsonl"
    cfg = tmp / "soak.yaml"
    sock = tmp / "ctl.sock"
    cfg.write_text(
        f"capture: {{filter: 'tcp port {server.port}', workers: 2, buffer_size: 8MiB, "
        f"shutdown_timeout: 4s}}\n"
        f"reassembly: {{timeouts: {{fin_linger: 0.5s}}}}\n"
        f"sinks:\n  - type: couchdb\n    url: {couch.url}\n"
        f"  - type: jsonl\n    path: {out}\n    max_payload: 0\n")
    env = dict(os.environ, STATE_DIRECTORY=str(tmp / "state"))
    env.pop("NOTIFY_SOCKET", None)
    err = open(tmp / "stderr.txt", "w")  # noqa: SIM115
    res: dict[str, Any] = {"duration_s": duration, "rate": rate, "kill_every_s": kill_every,
                           "hup_every_s": hup_every, "couch_down_s": f"{couch_down}/{couch_every}"}
    couch.start()
    d = subprocess.Popen([STREAMTAP, "-i", "lo", "--config", str(cfg), "--control-socket",
                          str(sock)], env=env, stdout=subprocess.DEVNULL, stderr=err)
    traffic: Traffic | None = None
    windows: list[tuple[float, float]] = []
    kills = hups = outages = 0
    hup_times: list[float] = []
    t0 = time.monotonic()
    try:
        deadline = time.monotonic() + 30
        while not ((st := status(sock)) and all(w["alive"] for w in st["workers"])):
            if time.monotonic() > deadline or d.poll() is not None:
                raise RuntimeError(f"daemon not up: {(tmp / 'stderr.txt').read_text()[-2000:]}")
            time.sleep(0.2)
        # "alive" is not "capturing": probe until a connection comes out in the JSONL (the
        # probes are not part of the truth)
        while not any(r["destination"]["port"] == server.port for r in _records(out)):
            if time.monotonic() > deadline + 30:
                raise RuntimeError("the daemon captures nothing")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", server.port), timeout=5) as s:
                s.sendall(b"%08d%010d" % (0, 0))  # connection 0: not in the truth
                s.shutdown(socket.SHUT_WR)
                s.recv(1)
            time.sleep(1.0)
        traffic = Traffic(server.port, rate).start()
        time.sleep(3.0)
        res["rss_start_mib"] = round(rss_bytes(d.pid) / MIB, 1)
        res["fds_start"] = fd_count(d.pid)
        t0 = time.monotonic()
        next_kill, next_hup = t0 + kill_every, t0 + hup_every
        period = 0
        while (now := time.monotonic()) < t0 + duration:
            if d.poll() is not None:
                raise RuntimeError(f"daemon exited {d.returncode}")
            # CouchDB down for the last `couch_down` s of every `couch_every`
            phase = (now - t0) % couch_every
            if phase >= couch_every - couch_down and couch.running:
                couch.stop()
                outages += 1
                say(f"+{now - t0:.0f} s: CouchDB down")
            elif phase < couch_every - couch_down and not couch.running:
                couch.start()
                say(f"+{now - t0:.0f} s: CouchDB up")
            if now >= next_hup:
                d.send_signal(signal.SIGHUP)
                hup_times.append(now)
                hups += 1
                next_hup += hup_every
            if now >= next_kill:
                next_kill += kill_every
                st = status(sock) or {}
                pids = [w["pid"] for w in st.get("workers", []) if w.get("alive")]
                if pids:
                    victim = pids[kills % len(pids)]
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(victim, signal.SIGKILL)
                    kills += 1
                    k_t = time.monotonic()
                    up = _wait_replaced(sock, victim, 30)
                    windows.append((k_t - 2.0, up + 0.5))
                    say(f"+{k_t - t0:.0f} s: kill -9 {victim}, replaced in {up - k_t:.1f} s")
            period += 1
            time.sleep(0.2)
        traffic.stop()
        if not couch.running:
            couch.start()
        time.sleep(2.0)
        res["rss_end_mib"] = round(rss_bytes(d.pid) / MIB, 1)
        res["fds_end"] = fd_count(d.pid)
        time.sleep(1.5)  # fin_linger + the JSONL runner's batch age
        expected = sum(1 for r in _records(out) if r["destination"]["port"] == server.port)
        # the CouchDB backlog (every JSONL record has its document): the runner's backoff is
        # capped at 60 s
        t1 = time.monotonic()
        while time.monotonic() - t1 < 120 and len(_stored(couch.url)) < expected:
            time.sleep(1.0)
        res["backlog_s"] = round(time.monotonic() - t1, 1)
        time.sleep(1.0)
        st = status(sock) or {}
        res["worker_restarts"] = st.get("worker_restarts")
        res["kernel_drops"] = st.get("kernel_drops")
        res["sinks"] = {s.get("name"): s.get("records") for s in st.get("sinks", [])}
        d.send_signal(signal.SIGTERM)
        res["exit"] = d.wait(60)
    finally:
        if traffic is not None:
            traffic.stop()
        if d.poll() is None:
            d.kill()
            d.wait(10)
        err.close()
        server.close()
    try:
        docs = _stored(couch.url)
    finally:
        couch.close()
    res.update({"kills": kills, "sighups": hups, "couch_outages": outages,
                "client_failed": traffic.failed if traffic else None,
                "reloads_logged": (tmp / "stderr.txt").read_text().count("configuration reloaded")})
    res.update(check(traffic.conns if traffic else [], _records(out), docs, server.port, windows))
    for c in res["lost_detail"]:  # times relative to the start, and the faults around them
        c["start"], c["end"] = round(c["start"] - t0, 2), round(c["end"] - t0, 2)
        c["hups_near"] = [round(h - t0, 2) for h in hup_times if c["start"] - 3 < h - t0 <
                          c["end"] + 3]
        c["kill_windows_near"] = [(round(a - t0, 1), round(b - t0, 1)) for a, b in windows
                                  if c["start"] - 10 < a - t0 < c["end"] + 10]
    return res


def _wait_replaced(sock: Path, victim: int, timeout: float) -> float:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = status(sock) or {}
        ws = st.get("workers", [])
        if ws and all(w.get("alive") and w.get("pid") != victim for w in ws):
            return time.monotonic()
        time.sleep(0.1)
    return time.monotonic()


def verdict(res: dict[str, Any]) -> list[str]:
    bad = [f"{k} = {res[k]}" for k in ("jsonl_lost", "jsonl_duplicated", "jsonl_inexact",
                                       "couchdb_lost", "couchdb_duplicated") if res[k]]
    if res.get("exit") != 0:
        bad.append(f"daemon exited {res.get('exit')}")
    if res["connections"] == 0:
        bad.append("no traffic")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=1800, help="seconds (1800)")
    ap.add_argument("--rate", type=float, default=5.0, help="connections per second (5)")
    ap.add_argument("--kill-every", type=float, default=120, help="worker kill -9 period (120)")
    ap.add_argument("--hup-every", type=float, default=30, help="SIGHUP period (30)")
    ap.add_argument("--couch-every", type=float, default=300, help="CouchDB outage period (300)")
    ap.add_argument("--couch-down", type=float, default=60, help="CouchDB outage length (60)")
    ap.add_argument("--dir", default=None, help="work directory (a temporary one)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="soak-") as d:
        res = run(Path(d), duration=args.duration, rate=args.rate, kill_every=args.kill_every,
                  hup_every=args.hup_every, couch_every=args.couch_every,
                  couch_down=args.couch_down, log=lambda m: print(m, file=sys.stderr))
    return machine.print_verdict(res, verdict(res), args.json)


if __name__ == "__main__":
    sys.exit(main())
