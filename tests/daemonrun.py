"""A live daemon on `lo` for a test: its config, the echo server it captures, its control API,
and the clean-up (`LiveRun`) that stops every daemon and server a test started, whatever
happened. Shared by tests/test_sink_outage.py, tests/outage.py (and through it
tests/test_sink_restart.py, bench/sink_outage.py) and tests/test_full_disk.py.

Everything runs on 127.0.0.1 in this machine's namespace; the daemon captures only the echo
server's port.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

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


def write_config(path: Path, port: int, sinks: str, *, extra: str = "",
                 shutdown_timeout: str | None = None) -> Path:
    """The daemon's config: capture `port` only, end streams 0.5 s after their FINs, `sinks`
    (the YAML list items, indented), `extra` sections before them."""
    stop = f", shutdown_timeout: {shutdown_timeout}" if shutdown_timeout else ""
    path.write_text(
        f"capture: {{filter: 'tcp port {port}'{stop}}}\n"
        f"reassembly: {{timeouts: {{fin_linger: 0.5s}}}}\n"
        f"{extra}"
        f"sinks:\n{sinks}"
    )
    return path


def control_get(sock: Path, path: str, timeout: float = 2) -> bytes:
    """GET `path` from the daemon's control socket; raises OSError."""

    class Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(str(sock))

    c = Conn("localhost", timeout=timeout)
    try:
        c.request("GET", path)
        return c.getresponse().read()
    finally:
        c.close()


def status(sock: Path) -> dict | None:
    """GET /status; None while the daemon does not answer."""
    try:
        return json.loads(control_get(sock, "/status"))
    except OSError:
        return None


def wait(pred: Callable[[], Any], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.1)
    return False


def start_daemon(tmp: Path, cfg: Path, run: int) -> subprocess.Popen:
    """`streamtap -i lo` with one worker, state under tmp/state, control socket tmp/ctl.sock,
    stderr in tmp/stderr-RUN.txt."""
    env = dict(os.environ, STATE_DIRECTORY=str(tmp / "state"))
    env.pop("NOTIFY_SOCKET", None)
    err = open(tmp / f"stderr-{run}.txt", "w")  # noqa: SIM115
    return subprocess.Popen([STREAMTAP, "-i", "lo", "--workers", "1", "--config", str(cfg),
                             "--control-socket", str(tmp / "ctl.sock")],
                            env=env, stdout=subprocess.DEVNULL, stderr=err)


def stop(d: subprocess.Popen, timeout: float = 30) -> tuple[int, float]:
    """SIGTERM, then wait for the exit: (exit code, seconds it took)."""
    t = time.monotonic()
    d.send_signal(signal.SIGTERM)
    code = d.wait(timeout)
    return code, time.monotonic() - t


def stored(url: str) -> list[dict]:
    """The documents of the `streamtap` database at CouchDB `url` (design docs left out)."""
    with urllib.request.urlopen(f"{url}/streamtap/_all_docs?include_docs=true") as r:
        rows = json.loads(r.read())["rows"]
    return [row["doc"] for row in rows if not row["id"].startswith("_design/")]


class _Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=_Closable)


class LiveRun(contextlib.ExitStack):
    """What a live test started, undone at the end whatever happened: daemons still running
    are killed, then the servers are closed, newest first.

        with LiveRun(tmp_path) as run:
            echo = run.closing(EchoServer())
            d = run.start(cfg)
    """

    def __init__(self, tmp: Path) -> None:
        super().__init__()
        self.tmp = tmp

    def closing(self, thing: C) -> C:
        self.callback(thing.close)
        return thing

    def start(self, cfg: Path, run: int = 1) -> subprocess.Popen:
        """A daemon (`start_daemon`), killed at the end if it is still running."""
        d = start_daemon(self.tmp, cfg, run)
        self.callback(_kill, d)
        return d


def _kill(d: subprocess.Popen) -> None:
    if d.poll() is None:
        d.kill()
        d.wait(5)
