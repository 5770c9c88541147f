"""The control API: HTTP/1.1 on a unix socket (and optionally on 127.0.0.1:PORT).

Endpoints (every body is JSON except /metrics; every error is `{"error": "..."}`):

- ``GET /status``: the supervisor's state dict.
- ``GET /metrics``: Prometheus text format 0.0.4 (see `streamtap.metrics`).
- ``POST /pcaps`` with ``{"path": "/abs/file.pcap"}``: reassemble that capture with a flow table
  of its own and hand its streams to ``deliver`` (the running sinks). The path must resolve
  (symlinks followed) inside one of ``ingest_dirs``. Answers 202 with the job and
  ``Location: /pcaps/<id>``. Jobs run one at a time, in order, on one background thread
  (`streamtap.ingest`); when `ingest.MAX_QUEUED` jobs already wait, the answer is 503.
  ``POST /pcap`` is an alias (the Go reassembler streamtap replaces took paths there); POST only.
- ``GET /pcaps/<id>``: the job: ``{"id", "path", "status": queued|running|done|failed,
  "packets", "streams", "error", "started", "finished"}``. ``started`` is when the job was
  accepted; ``path`` is the resolved path that is read. ``GET /pcaps`` lists the kept jobs.

The server never sends a traceback: exceptions are logged on the ``streamtap.control`` logger and
the client gets a 500 with a one-line error. Request lines are logged at debug level.
"""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import json
import logging
import os
import socket
import socketserver
import stat
import threading
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from streamtap.config import Config

from . import metrics
from .errors import Error
from .ingest import MAX_QUEUED, IngestError, IngestJob, Ingestor
from .stream import Stream

log = logging.getLogger("streamtap.control")

__all__ = ["ControlError", "ControlServer", "IngestJob", "parse_listen"]

SOCKET_MODE = 0o660
SOCKET_DIR_MODE = 0o750
MAX_BODY = 64 * 1024
REQUEST_TIMEOUT = 30.0  # an idle keep-alive connection is closed after this
JSON_TYPE = "application/json"


class ControlError(Error):
    """The control server cannot start (bad listen address, socket in use...)."""


def parse_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:PORT"`` (or another loopback address, ``[::1]:PORT``, ``localhost:PORT``)
    -> (host, port). Anything that is not loopback is refused: the API has no authentication."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ControlError(f"control listen address {listen!r}: expected 127.0.0.1:PORT")
    host = host.strip("[]")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ControlError(f"control listen address {listen!r}: only a loopback address "
                           "(127.0.0.1) is allowed, the control API has no authentication")
    return host, int(port)


class _HttpError(Exception):
    def __init__(self, code: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "streamtap"
    sys_version = ""
    timeout = REQUEST_TIMEOUT
    control: ControlServer  # set on the subclass made per server

    # ---------------------------------------------------------------- plumbing

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("control %s: " + format, self._peer(), *args)

    def log_error(self, format: str, *args: Any) -> None:
        log.debug("control %s: " + format, self._peer(), *args)

    def _peer(self) -> str:
        addr = self.client_address
        if isinstance(addr, tuple) and addr:
            return f"{addr[0]}:{addr[1]}" if len(addr) > 1 else str(addr[0])
        return "unix"

    def _send(self, code: int, body: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        body = (json.dumps(obj, indent=2, default=str) + "\n").encode()
        self._send(code, body, JSON_TYPE, headers)

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """The stdlib's errors (bad request line, unsupported method...) as JSON too."""
        try:
            short, _long = self.responses.get(code, ("error", ""))
        except Exception:
            short = "error"
        self.close_connection = True
        try:
            self._json(code, {"error": message or short}, {"Connection": "close"})
        except OSError:
            pass

    def _dispatch(self) -> None:
        try:
            self._route()
        except _HttpError as e:
            self._json(e.code, {"error": e.message}, e.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:
            log.exception("control: %s %s failed", self.command, self.path)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._json(500, {"error": "internal error (see the daemon's log)"},
                           {"Connection": "close"})

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    # ---------------------------------------------------------------- routes

    def _route(self) -> None:
        path = urlsplit(self.path).path
        method = "GET" if self.command == "HEAD" else self.command
        if path == "/pcap":  # the Go reassembler's endpoint
            self._allow(method, "POST")
            path = "/pcaps"
        if not (method == "POST" and path == "/pcaps"):
            self._discard_body()  # keep the connection usable for the next request
        if path == "/status":
            self._allow(method, "GET")
            self._json(200, self.control.state())
        elif path == "/metrics":
            self._allow(method, "GET")
            self._send(200, metrics.render(self.control._registry), metrics.CONTENT_TYPE)
        elif path == "/pcaps":
            self._allow(method, "GET, POST")
            if method == "POST":
                try:
                    job = self.control.submit(self._read_path())
                except IngestError as e:
                    raise _HttpError(e.status, str(e)) from None
                self._json(202, job.as_dict(), {"Location": f"/pcaps/{job.id}"})
            else:
                self._json(200, self.control.jobs())
        elif path.startswith("/pcaps/") and "/" not in path[len("/pcaps/"):]:
            self._allow(method, "GET")
            job_id = path[len("/pcaps/"):]
            found = self.control.job(job_id)
            if found is None:
                raise _HttpError(404, f"no ingest job {job_id!r}")
            self._json(200, found)
        else:
            raise _HttpError(404, f"no such resource: {path}")

    def _allow(self, method: str, allowed: str) -> None:
        if method not in allowed.split(", "):
            raise _HttpError(405, f"method {self.command} not allowed on {urlsplit(self.path).path}"
                             f" (allowed: {allowed})", {"Allow": allowed})

    def _discard_body(self) -> None:
        n = self._content_length()
        if n:
            if n > MAX_BODY:
                self.close_connection = True
            else:
                self.rfile.read(n)

    def _content_length(self) -> int:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise _HttpError(411, "chunked bodies are not supported: send Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            return 0
        try:
            n = int(raw)
        except ValueError:
            n = -1
        if n < 0:
            self.close_connection = True
            raise _HttpError(400, f"bad Content-Length {raw!r}")
        return n

    def _read_path(self) -> str:
        n = self._content_length()
        if n > MAX_BODY:
            self.close_connection = True
            raise _HttpError(413, f"request body over {MAX_BODY} bytes")
        raw = self.rfile.read(n) if n else b""
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise _HttpError(400, f"request body is not JSON: {e}") from None
        if not isinstance(body, dict) or "path" not in body:
            raise _HttpError(400, 'expected a JSON object {"path": "/abs/file.pcap"}')
        path = body["path"]
        if not isinstance(path, str) or not path:
            raise _HttpError(400, '"path" must be a non-empty string')
        return path


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False


class _TcpServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True


class _Tcp6Server(_TcpServer):
    address_family = socket.AF_INET6


class ControlServer:
    """The control API in background threads (one per listener, one per connection, one for
    ingest jobs).

    ``state()`` must be callable from any thread and return the state dict; ``deliver(streams)``
    is called from the ingest thread with each batch of completed streams of an ingested file;
    ``config()`` returns the config an ingest job reassembles with (None: the defaults).
    """

    def __init__(
        self,
        socket_path: str | None,
        *,
        listen: str | None = None,
        ingest_dirs: Sequence[str] = (),
        state: Callable[[], dict],
        deliver: Callable[[list[Stream]], None],
        config: Callable[[], Config | None] | None = None,
        max_queued: int = MAX_QUEUED,
    ) -> None:
        if socket_path is None and listen is None:
            raise ControlError("the control server needs a unix socket path or a listen address")
        self.address = os.path.abspath(socket_path) if socket_path else None
        self._listen = parse_listen(listen) if listen else None
        self.state = state
        self.ingest = Ingestor(ingest_dirs, deliver, config, max_queued=max_queued)
        self.port: int | None = None
        self._registry = metrics.registry(state)
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []
        self._socket_ino: tuple[int, int] | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        handler = type("Handler", (_Handler,), {"control": self})
        try:
            if self.address is not None:
                self._servers.append(self._bind_unix(handler))
            if self._listen is not None:
                host, port = self._listen
                cls = _Tcp6Server if ":" in host else _TcpServer
                try:
                    srv = cls((host, port), handler)
                except OSError as e:
                    raise ControlError(f"control API: cannot listen on {host}:{port}: "
                                       f"{e.strerror or e}") from None
                self.port = srv.server_address[1]
                self._servers.append(srv)
        except BaseException:
            self._close_servers()
            raise
        for server in self._servers:
            t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                 name="streamtap-control", daemon=True)
            t.start()
            self._threads.append(t)
        self.ingest.start()
        where = [self.address] if self.address else []
        if self.port is not None and self._listen:
            where.append(f"{self._listen[0]}:{self.port}")
        log.info("control API on %s", " and ".join(str(w) for w in where))

    def _bind_unix(self, handler: type) -> _UnixServer:
        path = self.address
        assert path is not None
        parent = os.path.dirname(path)
        try:
            os.makedirs(parent, mode=SOCKET_DIR_MODE, exist_ok=True)
        except OSError as e:
            raise ControlError(f"control socket directory {parent}: {e.strerror or e}") from None
        self._remove_stale(path)
        try:
            srv = _UnixServer(path, handler)
        except OSError as e:
            raise ControlError(f"control socket {path}: {e.strerror or e}") from None
        try:
            os.chmod(path, SOCKET_MODE)
            st = os.stat(path)
            self._socket_ino = (st.st_dev, st.st_ino)
        except OSError as e:
            srv.server_close()
            raise ControlError(f"control socket {path}: {e.strerror or e}") from None
        return srv

    @staticmethod
    def _remove_stale(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"control socket {path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: a leftover of a daemon that died
            log.info("control socket %s: removed a stale socket file", path)
            return
        finally:
            probe.close()
        raise ControlError(f"control socket {path}: another process is listening on it "
                           "(is another streamtap running for this interface?)")

    def stop(self) -> None:
        """Stop listening, remove the socket file, end the ingest thread (a running job stops
        at its next batch and is marked failed, queued jobs too)."""
        for srv in self._servers:
            srv.shutdown()
        self._close_servers()
        for t in self._threads:
            t.join(timeout=5.0)
        self._threads = []
        self.ingest.stop()

    def _close_servers(self) -> None:
        for srv in self._servers:
            with contextlib.suppress(OSError):
                srv.server_close()
        self._servers = []
        if self.address and self._socket_ino:
            try:
                st = os.lstat(self.address)
                if (st.st_dev, st.st_ino) == self._socket_ino:
                    os.unlink(self.address)
            except OSError:
                pass
            self._socket_ino = None

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- ingest jobs

    def submit(self, path: str) -> IngestJob:
        """Queue an ingest job for `path`; raises `IngestError` (400/403/404/503)."""
        return self.ingest.submit(path)

    def job(self, job_id: str) -> dict[str, Any] | None:
        return self.ingest.job(job_id)

    def jobs(self) -> list[dict[str, Any]]:
        return self.ingest.jobs()
