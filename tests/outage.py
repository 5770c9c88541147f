"""Sink outage scenarios shared by tests/test_sink_restart.py (short) and bench/sink_outage.py
(the issue's 60 s): a live daemon on `lo` with a CouchDB sink (pouchdb-server through
tests/couchserver.py), traffic before, during and after an outage, the daemon stopped with
SIGTERM and started again in the middle of it; and a CouchDB that answers each request only
after a delay (`SlowProxy`), beside a JSONL sink.

Everything runs on 127.0.0.1. Each scenario returns a dict of what it measured; the callers
assert (lost and duplicated must be 0).
"""

from __future__ import annotations

import http.client
import http.server
import json
import socketserver
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from couchserver import CouchServer
from daemonrun import EchoServer, LiveRun, connect, status, stop, wait, write_config
from daemonrun import stored as _stored


class SlowProxy:
    """An HTTP proxy on 127.0.0.1 that holds every request `delay` seconds, then forwards it
    to `target` (a CouchDB URL) and relays the answer."""

    def __init__(self, target: str, delay: float) -> None:
        self.delay = delay
        self.requests = 0
        self.active = 0
        self.peak_active = 0
        t = urlsplit(target)
        proxy = self
        lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                with lock:
                    proxy.requests += 1
                    proxy.active += 1
                    proxy.peak_active = max(proxy.peak_active, proxy.active)
                try:
                    time.sleep(proxy.delay)
                    c = http.client.HTTPConnection(t.hostname, t.port, timeout=60)
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in ("host", "connection")}
                    c.request(self.command, self.path, body=body, headers=headers)
                    r = c.getresponse()
                    data = r.read()
                    c.close()
                finally:
                    with lock:
                        proxy.active -= 1
                try:
                    self.send_response(r.status)
                    for k, v in r.getheaders():
                        if k.lower() not in ("transfer-encoding", "connection",
                                             "content-length"):
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (its timeout, or the daemon stopped)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._t = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._t.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _config(path: Path, port: int, sinks: str) -> Path:
    return write_config(path, port, sinks, shutdown_timeout="4s")


def stored(url: str) -> list[dict]:
    """The stored documents; none while the database does not exist yet (or is down)."""
    try:
        return _stored(url)
    except OSError:
        return []


def _streams(sock: Path) -> int:
    return sum(((status(sock) or {}).get("streams") or {}).values())


def _sink(sock: Path, name: str) -> dict[str, Any]:
    for s in (status(sock) or {}).get("sinks") or ():
        if s.get("name") == name:
            return s
    return {}


def _check_docs(docs: list[dict], expected: list[int]) -> dict[str, int]:
    ports = [d["source"]["port"] for d in docs]
    assert all(d["_id"] == d["stream"]["id"] for d in docs)
    return {"expected": len(expected), "stored": len(docs),
            "lost": len(set(expected) - set(ports)),
            "duplicated": len(ports) - len(set(ports)),
            "unexpected": len(set(ports) - set(expected))}


def restart_mid_outage(tmp: Path, outage: float = 10.0, conns: int = 10) -> dict[str, Any]:
    """Traffic before the outage (A), during it under the first daemon (B), which is then
    stopped with SIGTERM halfway through; a second daemon started while CouchDB is still
    down gets traffic (C); CouchDB comes back; more traffic (D). Every stream must be stored
    exactly once."""
    sock = tmp / "ctl.sock"
    out: dict[str, Any] = {"outage_s": outage}
    with LiveRun(tmp) as run:
        couch = run.closing(CouchServer(data_dir=tmp / "couch"))
        echo = run.closing(EchoServer())
        cfg = _config(tmp / "cfg.yaml", echo.port, f"  - type: couchdb\n    url: {couch.url}\n")
        couch.start()
        d1 = run.start(cfg, 1)
        assert wait(lambda: status(sock) is not None, 20), "daemon 1 not up"
        time.sleep(0.5)
        ports = connect(echo.port, conns)  # A
        assert wait(lambda: len(stored(couch.url)) >= conns, 30), "A not stored"
        couch.stop()
        t0 = time.monotonic()
        ports += connect(echo.port, conns)  # B
        assert wait(lambda: _streams(sock) >= 2 * conns, 20), "B not captured"
        time.sleep(max(0.0, t0 + outage / 2 - time.monotonic()))
        out["daemon1_sink"] = _sink(sock, "couchdb")
        code, took = stop(d1)
        out["daemon1_exit"], out["daemon1_stop_s"] = code, round(took, 2)
        assert code == 0, f"daemon 1 exited {code}"
        out["spool_segments_at_restart"] = len(list(
            (tmp / "state" / "lo" / "spool" / "couchdb").glob("*.seg")))

        d2 = run.start(cfg, 2)
        assert wait(lambda: status(sock) is not None, 20), "daemon 2 not up"
        time.sleep(0.5)
        ports += connect(echo.port, conns)  # C, CouchDB still down
        assert wait(lambda: _streams(sock) >= conns, 20), "C not captured"
        time.sleep(max(0.0, t0 + outage - time.monotonic()))
        couch.start()
        out["outage_measured_s"] = round(time.monotonic() - t0, 1)
        ports += connect(echo.port, conns)  # D
        t1 = time.monotonic()
        # the runner's backoff is capped at 60 s: the backlog goes out within that after
        assert wait(lambda: len(stored(couch.url)) >= 4 * conns, 90), \
            f"stored {len(stored(couch.url))} of {4 * conns}"
        out["recovered_after_s"] = round(time.monotonic() - t1, 1)
        time.sleep(1.0)  # anything stored twice would show up now
        out["daemon2_sink"] = _sink(sock, "couchdb")
        code, took = stop(d2)
        out["daemon2_exit"] = code
        out.update(_check_docs(stored(couch.url), ports))
        out["log_retry_lines"] = sum(
            (tmp / f"stderr-{i}.txt").read_text().count("sink couchdb: retry") for i in (1, 2))
    return out


def slow_couchdb(tmp: Path, delay: float = 10.0, rounds: int = 3,
                 conns: int = 5) -> dict[str, Any]:
    """CouchDB behind a proxy that answers after `delay` s per request, and a JSONL sink: the
    JSONL records, the capture and /status must keep their pace. Then the daemon is stopped
    (the CouchDB sink is inside a slow request) and a second run against CouchDB directly
    replays the spool: every stream stored exactly once."""
    jsonl = tmp / "out.jsonl"
    sock = tmp / "ctl.sock"
    out: dict[str, Any] = {"delay_s": delay}
    ports: list[int] = []
    lags: list[float] = []
    status_ms: list[float] = []
    with LiveRun(tmp) as run:
        couch = run.closing(CouchServer())
        echo = run.closing(EchoServer())
        couch.start()
        proxy = run.closing(SlowProxy(couch.url, delay))
        sinks = (f"  - type: couchdb\n    url: {proxy.url}\n"
                 f"  - type: jsonl\n    path: {jsonl}\n")
        cfg = _config(tmp / "cfg.yaml", echo.port, sinks)
        d1 = run.start(cfg, 1)
        assert wait(lambda: status(sock) is not None, 20), "daemon not up"
        time.sleep(0.5)

        def lines() -> int:
            return len(jsonl.read_bytes().splitlines()) if jsonl.exists() else 0

        for k in range(rounds):
            ports += connect(echo.port, conns)
            t = time.monotonic()
            assert wait(lambda k=k: lines() >= conns * (k + 1), 30), "JSONL stalled"
            lags.append(time.monotonic() - t)
            for _ in range(5):
                t = time.monotonic()
                assert status(sock) is not None
                status_ms.append((time.monotonic() - t) * 1000)
                time.sleep(0.2)
        out["jsonl_lag_max_s"] = round(max(lags), 2)
        out["status_max_ms"] = round(max(status_ms), 1)
        out["captured"] = _streams(sock)
        out["proxy_requests"], out["proxy_active"] = proxy.requests, proxy.active
        out["couchdb_sink"] = _sink(sock, "couchdb")
        code, took = stop(d1)
        out["exit"], out["stop_s"] = code, round(took, 2)
        out["jsonl_records"] = lines()

        # second run, straight to CouchDB: the spool is replayed
        _config(tmp / "cfg.yaml", echo.port, f"  - type: couchdb\n    url: {couch.url}\n")
        d2 = run.start(cfg, 2)
        assert wait(lambda: status(sock) is not None, 20), "daemon 2 not up"
        wait(lambda: len(stored(couch.url)) >= len(ports), 60)
        time.sleep(1.0)
        code, _took = stop(d2)
        out.update(_check_docs(stored(couch.url), ports))
    return out


def dump(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=1, default=str)
