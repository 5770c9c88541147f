"""A throwaway pouchdb-server (a CouchDB-compatible server from npm) for the CouchDB sink tests.

`make test` installs it with `npm install --prefix build/node pouchdb-server`; the binary is
`build/node/node_modules/.bin/pouchdb-server` (or `$STREAMTAP_POUCHDB_SERVER`).

    with CouchServer() as server:          # in memory, 127.0.0.1, a free port
        server.url                         # "http://127.0.0.1:PORT"
        server.stop(); server.start()      # an outage: same port, down then up again

`CouchServer(data_dir=...)` keeps the databases on disk (LevelDB) instead, so they survive
`stop()`/`start()`. `CouchServer(admins={"admin": "pw"})` ends the admin party: a request with
other credentials gets `401 unauthorized` ("Name or password is incorrect."). (pouchdb-server
4.2 crashes on an anonymous PUT /{db} once admins exist: send credentials, right or wrong.)
The server's working directory (its config.json and log.txt) is a temporary
directory, removed at exit. A missing binary raises `PouchdbMissing`; the pytest fixtures turn
that into a failure, never a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BINARY = ROOT / "build" / "node" / "node_modules" / ".bin" / "pouchdb-server"
ENV_BINARY = "STREAMTAP_POUCHDB_SERVER"
INSTALL_HINT = (
    "pouchdb-server is not installed: run `make test` (it runs "
    "`npm install --prefix build/node pouchdb-server`), or set $STREAMTAP_POUCHDB_SERVER"
)
START_TIMEOUT = 30.0


class PouchdbMissing(RuntimeError):
    pass


def binary() -> str:
    path = os.environ.get(ENV_BINARY) or str(BINARY)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise PouchdbMissing(f"{INSTALL_HINT} (looked for {path})")
    if shutil.which("node") is None:
        raise PouchdbMissing("node is not on the PATH: pouchdb-server needs Node.js")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CouchServer:
    """One pouchdb-server process; restartable on the same port."""

    def __init__(self, port: int | None = None, data_dir: str | os.PathLike[str] | None = None,
                 admins: dict[str, str] | None = None):
        self.binary = binary()
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = None if data_dir is None else str(data_dir)
        self._workdir = tempfile.mkdtemp(prefix="pouchdb-")
        if admins:
            # plain passwords: pouchdb-server hashes them into this file at start
            with open(os.path.join(self._workdir, "config.json"), "w") as fh:
                json.dump({"admins": admins}, fh)
        self._proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> CouchServer:
        if self._proc is not None:
            return self
        args = [self.binary, "--port", str(self.port), "--host", "127.0.0.1",
                "--config", os.path.join(self._workdir, "config.json"),
                "--no-stdout-logs", "--no-color"]
        if self.data_dir is None:
            args.append("--in-memory")
        else:
            os.makedirs(self.data_dir, exist_ok=True)
            args += ["--dir", self.data_dir.rstrip("/") + "/"]
        with open(os.path.join(self._workdir, "stdout.log"), "ab") as out:
            self._proc = subprocess.Popen(
                args, cwd=self._workdir, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise RuntimeError(f"pouchdb-server exited ({code}) at start:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"pouchdb-server did not answer on {self.url} within {START_TIMEOUT} s:\n"
                    f"{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> CouchServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_tail(self, n: int = 4000) -> str:
        text = ""
        for name in ("stdout.log", "log.txt"):
            try:
                text += Path(self._workdir, name).read_text(errors="replace")[-n:]
            except OSError:
                pass
        return text

    # -- plain HTTP for test assertions ---------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """(status, decoded JSON or raw bytes) of one request to the server."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        if status != 200:
            raise AssertionError(f"GET {path}: HTTP {status} {body!r}")
        return body

    def doc_ids(self, db: str) -> list[str]:
        """Ids of the documents in `db`, design documents left out."""
        rows = self.get(f"/{db}/_all_docs")["rows"]
        return [r["id"] for r in rows if not r["id"].startswith("_design/")]
