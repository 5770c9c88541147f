"""A real outage in a live run: the CouchDB-compatible server is down while the daemon captures,
the daemon stops with its records in the disk spool, the server comes back, a new daemon run
replays the leftover spool; afterwards every stream is stored exactly once.

The daemon captures on `lo` (filtered to the test's own port) so that it and pouchdb-server
share 127.0.0.1; both run in this machine's namespace and are stopped at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from couchserver import CouchServer

STREAMTAP = str(Path(sys.executable).with_name("streamtap"))


class EchoServer:
    """Answers each connection with a reply whose length the client chose."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._t = threading.Thread(target=self._serve, daemon=True)
        self._t.start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                want = int(c.recv(8))
                c.sendall(b"r" * want)

    def close(self) -> None:
        self.sock.close()


def connect(port: int, n: int) -> list[int]:
    """n connections, each asking for a reply of a different size; their client ports."""
    ports = []
    for i in range(n):
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(b"%08d" % (1000 + i))
            got = b""
            while len(got) < 1000 + i:
                chunk = c.recv(65536)
                if not chunk:
                    break
                got += chunk
            ports.append(c.getsockname()[1])
    return ports


def status(sock: Path) -> dict | None:
    import http.client

    class Conn(http.client.HTTPConnection):
        def connect(self) -> None:  # noqa: D102
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(str(sock))

    try:
        c = Conn("localhost", timeout=2)
        c.request("GET", "/status")
        return json.loads(c.getresponse().read())
    except OSError:
        return None


def wait(pred, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.1)
    return False


def start_daemon(tmp: Path, cfg: Path, run: int) -> subprocess.Popen:
    env = dict(os.environ, STATE_DIRECTORY=str(tmp / "state"))
    env.pop("NOTIFY_SOCKET", None)
    err = open(tmp / f"stderr-{run}.txt", "w")  # noqa: SIM115
    return subprocess.Popen([STREAMTAP, "-i", "lo", "--workers", "1", "--config", str(cfg),
                             "--control-socket", str(tmp / "ctl.sock")],
                            env=env, stdout=subprocess.DEVNULL, stderr=err)


def stored(url: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/streamtap/_all_docs?include_docs=true") as r:
        rows = json.loads(r.read())["rows"]
    return [row["doc"] for row in rows if not row["id"].startswith("_design/")]


@pytest.fixture
def couch(tmp_path: Path):
    srv = CouchServer(data_dir=tmp_path / "couch")
    yield srv
    srv.close()


def test_outage_and_leftover_spool_store_every_stream_once(couch, tmp_path: Path) -> None:
    echo = EchoServer()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"capture: {{filter: 'tcp port {echo.port}'}}\n"
        f"reassembly: {{timeouts: {{fin_linger: 0.5s}}}}\n"
        f"sinks:\n  - type: couchdb\n    url: {couch.url}\n"
    )
    procs = []
    try:
        # run 1: the server is down for the whole run
        d1 = start_daemon(tmp_path, cfg, 1)
        procs.append(d1)
        assert wait(lambda: status(tmp_path / "ctl.sock") is not None, 20), "daemon not up"
        time.sleep(0.5)
        first = connect(echo.port, 20)
        assert wait(lambda: sum((status(tmp_path / "ctl.sock") or {}).get("streams", {})
                                .values()) >= 20, 20)
        d1.send_signal(signal.SIGTERM)
        assert d1.wait(30) == 0
        spool = tmp_path / "state" / "lo" / "spool" / "couchdb"
        assert any(spool.glob("*.seg")), "records should have been spooled"
        assert not couch.running

        # run 2: the server is back; the leftover spool is replayed, new streams follow
        couch.start()
        d2 = start_daemon(tmp_path, cfg, 2)
        procs.append(d2)
        assert wait(lambda: status(tmp_path / "ctl.sock") is not None, 20)
        time.sleep(0.5)
        second = connect(echo.port, 10)
        assert wait(lambda: len(stored(couch.url)) >= 30, 30), len(stored(couch.url))
        d2.send_signal(signal.SIGTERM)
        assert d2.wait(30) == 0
        docs = stored(couch.url)
        ports = sorted(d["source"]["port"] for d in docs)
        assert ports == sorted(first + second), "every stream exactly once"
        for d in docs:
            assert d["_id"] == d["stream"]["id"]
            assert d["destination"]["bytes"] == 1000 + (
                first.index(d["source"]["port"]) if d["source"]["port"] in first
                else second.index(d["source"]["port"]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        echo.close()


def test_sink_that_cannot_open_logs_one_line_per_attempt_and_spools(tmp_path: Path) -> None:
    """The daemon (supervisor + sink runner) with a CouchDB answering 401: capture goes on; each
    failed attempt is one log line naming the sink and the server's answer (no traceback, no
    password); the records wait in the spool."""
    couch = CouchServer(admins={"admin": "right-pw"})
    couch.start()
    echo = EchoServer()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"capture: {{filter: 'tcp port {echo.port}'}}\n"
        f"reassembly: {{timeouts: {{fin_linger: 0.5s}}}}\n"
        f"logging: {{format: json}}\n"
        f"sinks:\n  - type: couchdb\n"
        f"    url: {couch.url.replace('://', '://admin:wrong-pw@')}/streams\n"
    )
    d = start_daemon(tmp_path, cfg, 1)
    try:
        sock = tmp_path / "ctl.sock"
        assert wait(lambda: status(sock) is not None, 20), "daemon not up"
        time.sleep(0.5)
        connect(echo.port, 5)
        assert wait(lambda: "401" in json.dumps((status(sock) or {}).get("sinks")), 20)
        d.send_signal(signal.SIGTERM)
        assert d.wait(30) == 0
    finally:
        if d.poll() is None:
            d.kill()
            d.wait(5)
        echo.close()
        couch.close()
    text = (tmp_path / "stderr-1.txt").read_text()
    assert "wrong-pw" not in text
    lines = [json.loads(line) for line in text.splitlines()]  # a traceback would not parse
    assert not any("exception" in x for x in lines)
    mine = [x["message"] for x in lines if "sink couchdb" in x["message"]]
    failed = [m for m in mine if "401" in m]
    assert failed, mine
    for m in failed:
        assert "retry" in m and (f"{couch.url}/streams: HTTP 401 unauthorized: "
                                 "Name or password is incorrect.") in m
    assert len(failed) == len([m for m in mine if "retry" in m])  # no second line per attempt
    spool = tmp_path / "state" / "lo" / "spool" / "couchdb"
    assert any(spool.glob("*.seg")), "records should have been spooled"
