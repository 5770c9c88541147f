"""The control API: HTTP/1.1 on a unix socket (and optionally on 127.0.0.1:PORT).

Endpoints (every body is JSON except /metrics; every error is `{"error": "..."}`):

- ``GET /status``: the supervisor's state dict.
- ``GET /metrics``: Prometheus text format 0.0.4 (see `streamtap.process.metrics`).
- ``POST /pcaps`` with ``{"path": "/abs/file.pcap"}``: reassemble that capture with a flow table
  of its own and hand its streams to ``deliver`` (the running sinks). The path must resolve
  (symlinks followed) inside one of ``ingest_dirs``. Answers 202 with the job and
  ``Location: /pcaps/<id>``. Jobs run one at a time, in order, on one background thread
  (`streamtap.process.ingest`); when `ingest.MAX_QUEUED` jobs already wait, the answer is 503.
  ``POST /pcap`` is an alias (the Go reassembler streamtap replaces took paths there); POST only.
- ``GET /pcaps/<id>``: the job: ``{"id", "path", "status": queued|running|done|failed,
  "packets", "streams", "error", "started", "finished"}``. ``started`` is when the job was
  accepted; ``path`` is the resolved path that is read. ``GET /pcaps`` lists the kept jobs.

The server never sends a traceback: exceptions are logged on the ``streamtap.process.control``
logger and the client gets a 500 with a one-line error. Request lines are logged at debug level.

Hostile clients (see `Limits`): at most ``max_connections`` connections are served at once, each
on its own thread; one more is answered 503 by the listener thread and closed, so a flood costs a
bounded number of threads and never blocks the accept loop. A whole request (line, headers, body)
must arrive within ``request_timeout`` of the connection (or of the previous answer): the deadline
is not reset by each byte, so a client sending one byte a second is cut (408). The request line and
headers together are capped at `MAX_HEAD` bytes (414/431), the body at ``max_body`` (413, answered
from the headers: the body is never read). Malformed requests get a 400. None of these is logged
with a traceback, and none touches the supervisor: the control threads only read its state.
"""

from __future__ import annotations

import contextlib
import grp
import http.server
import io
import ipaddress
import json
import logging
import os
import socket
import socketserver
import stat
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from streamtap.config import Config
from streamtap.engine.stream import Stream
from streamtap.errors import Error
from streamtap.process import metrics
from streamtap.process.ingest import MAX_QUEUED, IngestError, IngestJob, Ingestor

log = logging.getLogger("streamtap.process.control")

__all__ = ["ControlError", "ControlServer", "IngestJob", "parse_listen"]

SOCKET_MODE = 0o660
SOCKET_DIR_MODE = 0o750
MAX_BODY = 64 * 1024
MAX_CONNECTIONS = 64
REQUEST_TIMEOUT = 10.0
MAX_HEAD = 16 * 1024  # request line + headers; ours are a few hundred bytes
LINGER = 1.0  # after an early answer, unread body bytes are drained this long (see _linger)
LINGER_BYTES = 1 << 20
JSON_TYPE = "application/json"
_BUSY_BODY = b'{"error": "too many control connections at once, retry later"}\n'
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
         b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s"
         % (len(_BUSY_BODY), _BUSY_BODY))


@dataclass(frozen=True)
class Limits:
    """What one control client may cost (the ``control.*`` settings of the same names)."""

    max_connections: int = MAX_CONNECTIONS
    request_timeout: float = REQUEST_TIMEOUT
    max_body: int = MAX_BODY

    @classmethod
    def of(cls, control: Any) -> Limits:
        """From a `ControlConfig`."""
        return cls(control.max_connections, control.request_timeout, control.max_body)


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


class _HeadTooLarge(Exception):
    pass


class _DeadlineSocket(io.RawIOBase):
    """The connection's reads, each bounded by what is left before `deadline` (monotonic): a
    client trickling one byte a second is cut when the deadline passes, since no byte resets it."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        self.deadline = float("inf")
        self.got = 0  # bytes received since the deadline was set

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request deadline passed")
        self.sock.settimeout(left)
        n = self.sock.recv_into(b)
        self.got += n
        return n


class _RequestReader:
    """``rfile``: a buffered reader whose ``readline`` (the request line and headers, as the
    stdlib reads them) draws on a byte budget; past it, `_HeadTooLarge`."""

    def __init__(self, raw: _DeadlineSocket) -> None:
        self.raw = raw
        self._buf = io.BufferedReader(raw)
        self.head_left = MAX_HEAD

    def readline(self, size: int = -1) -> bytes:
        cap = self.head_left + 1
        line = self._buf.readline(cap if size < 0 else min(size, cap))
        self.head_left -= len(line)
        if self.head_left < 0:
            raise _HeadTooLarge
        return line

    def read(self, n: int = -1) -> bytes:
        return self._buf.read(n)

    @property
    def closed(self) -> bool:
        return self._buf.closed

    def close(self) -> None:
        self._buf.close()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "streamtap"
    sys_version = ""
    # errors before the version is parsed are answered with a status line and headers: the
    # stdlib's default (HTTP/0.9) would send a bare body no HTTP/1 client can read
    default_request_version = "HTTP/1.1"
    control: ControlServer  # set on the subclass made per server
    _error_code = 0  # the last send_error's
    _unread = False  # an answer was sent before the body was read: drain it before closing

    # ---------------------------------------------------------------- plumbing

    def setup(self) -> None:
        super().setup()
        self._raw = _DeadlineSocket(self.connection)
        self.rfile = _RequestReader(self._raw)  # type: ignore[assignment]

    def handle_one_request(self) -> None:
        """The stdlib's, with a deadline and a head budget; a cut connection logs one line."""
        limits = self.control.limits
        self._raw.deadline = time.monotonic() + limits.request_timeout
        self._raw.got = 0
        self.rfile.head_left = MAX_HEAD  # type: ignore[attr-defined]
        # send_error may run before parse_request has set these (a cut request line)
        self.command = None  # type: ignore[assignment]
        self.request_version, self.requestline = "HTTP/1.1", ""
        try:
            self.raw_requestline = self.rfile.readline(MAX_HEAD + 1)
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            self.rfile.head_left = 1 << 62  # type: ignore[attr-defined]  # the body is not head
            if not hasattr(self, "do_" + self.command):
                self.send_error(501, f"unsupported method {self.command!r}")
                return
            getattr(self, "do_" + self.command)()
            self.wfile.flush()
        except _HeadTooLarge:
            self._cut("too_large", 431, f"request line and headers over {MAX_HEAD} bytes")
        except TimeoutError:
            # an idle keep-alive connection (nothing of a new request yet) just closes
            self._cut("timeout", 408 if self._raw.got else 0,
                      f"request not received within {limits.request_timeout:g} s")
        except (ConnectionError, ValueError):  # ValueError: I/O on a closed file
            self.close_connection = True

    def parse_request(self) -> bool:
        self._error_code = 0
        ok = super().parse_request()
        if ok and len(self.requestline.split()) == 2:  # "GET /path": HTTP/0.9, no headers
            self.send_error(400, "HTTP/0.9 requests are not supported")
            ok = False
        if not ok and self._error_code:  # answered by the stdlib: count it as ours
            self.control._count("too_large" if self._error_code == 431 else "malformed")
        return ok

    def _cut(self, reason: str, code: int, message: str) -> None:
        self.close_connection = True
        self.control._count(reason)
        log.debug("control %s: cut (%s): %s", self._peer(), reason, message)
        if code:
            with contextlib.suppress(OSError):
                self._unread = True
                self.send_error(code, message)

    def handle_expect_100(self) -> bool:
        """``Expect: 100-continue`` with too large a body: 413 instead of "go on"."""
        try:
            n = self._content_length()
        except _HttpError as e:
            self._json(e.code, {"error": e.message}, {"Connection": "close"})
            return False
        if n > self.control.limits.max_body:
            self.control._count("too_large")
            self._unread = True
            self.send_error(413, f"request body over {self.control.limits.max_body} bytes")
            return False
        return super().handle_expect_100()

    def finish(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            super().finish()
        if self._unread:
            self._linger()

    def _linger(self) -> None:
        """Read and drop what the client still sends (bounded by `LINGER` seconds and
        `LINGER_BYTES`) after our write side is shut: closing with unread bytes makes the
        kernel send a TCP reset, which can destroy the answer before the client reads it."""
        sock = self.connection
        end = time.monotonic() + LINGER
        got = 0
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
            while got < LINGER_BYTES and (left := end - time.monotonic()) > 0:
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                got += len(chunk)

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
        # sendall's timeout bounds the whole answer: a client that does not read is cut too
        self.connection.settimeout(self.control.limits.request_timeout)
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
        self._error_code = code
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
        except TimeoutError:
            self._cut("timeout", 408 if self._raw.got else 0,
                      f"request not received within {self.control.limits.request_timeout:g} s")
        except ConnectionError:
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
            if n > self.control.limits.max_body:
                self.close_connection = True
                self._unread = True
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
        if n < 0 or len(self.headers.get_all("Content-Length") or ()) > 1:
            self.close_connection = True
            self._unread = True
            self.control._count("malformed")
            raise _HttpError(400, f"bad Content-Length {raw!r}")
        return n

    def _read_path(self) -> str:
        n = self._content_length()
        max_body = self.control.limits.max_body
        if n > max_body:
            self.close_connection = True
            self._unread = True
            self.control._count("too_large")
            raise _HttpError(413, f"request body over {max_body} bytes")
        raw = self.rfile.read(n) if n else b""
        if len(raw) < n:  # the client closed mid-body
            self.close_connection = True
            raise _HttpError(400, f"request body shorter than Content-Length ({len(raw)} < {n})")
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


class _Bounded(socketserver.ThreadingMixIn):
    """One thread per connection, at most ``control.limits.max_connections`` of them across
    the server's listeners; one more is answered 503 from the accept thread and closed."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 256  # a burst of connects waits in the kernel, not in SYN retries
    control: ControlServer

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.control._slots.acquire(blocking=False):
            self.control._refuse(request)
            return
        self.control._admitted()
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread: its slot is ours to give back
            self.control._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            self.control._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """The stdlib prints a traceback to stderr; one line in the log instead."""
        e = sys.exc_info()[1]
        log.warning("control: connection failed: %s: %s", type(e).__name__, e)


class _UnixServer(_Bounded, socketserver.UnixStreamServer):
    pass


class _TcpServer(_Bounded, socketserver.TCPServer):
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
        group: str | None = None,
        limits: Limits | None = None,
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
        self.group = group
        self.limits = limits or Limits()
        self._slots = threading.BoundedSemaphore(self.limits.max_connections)
        self._lock = threading.Lock()
        # connections refused (busy) and requests cut (timeout, too_large, malformed)
        self.counters: dict[str, int] = {"busy": 0, "timeout": 0, "too_large": 0,
                                         "malformed": 0}
        self._refusing = 0  # refused in the current episode (0: not refusing)

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
                    srv = cls((host, port), handler, bind_and_activate=False)
                    srv.control = self
                    try:
                        srv.server_bind()
                        srv.server_activate()
                    except BaseException:
                        srv.server_close()
                        raise
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
        gid = -1
        if self.group is not None:
            try:
                gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                raise ControlError(f"control.group {self.group!r}: no such group") from None
        srv = _UnixServer(path, handler, bind_and_activate=False)
        srv.control = self
        try:
            # Linux creates the socket file with the unbound socket's mode (less the umask):
            # 0660 from the first instant, never the umask's wider default until a chmod
            os.fchmod(srv.socket.fileno(), SOCKET_MODE)
            srv.server_bind()
            st = os.stat(path)
            self._socket_ino = (st.st_dev, st.st_ino)
            os.chmod(path, SOCKET_MODE)  # the umask may have taken bits away
            if gid != -1:
                os.chown(path, -1, gid)  # before listen(): no one connects under the old group
            srv.server_activate()
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

    # ---------------------------------------------------------------- hostile clients

    def _count(self, reason: str) -> None:
        with self._lock:
            self.counters[reason] += 1

    def _refuse(self, request: socket.socket) -> None:
        """503 and close, on the accept thread: never blocks (a new socket's send buffer is
        empty), reads nothing but what has already arrived (see `_Handler._linger`)."""
        with self._lock:
            self.counters["busy"] += 1
            self._refusing += 1
            first = self._refusing == 1
        if first:
            log.warning("control: %d connections at once, refusing more (503) until one "
                        "ends (control.max_connections)", self.limits.max_connections)
        with contextlib.suppress(OSError):
            request.setblocking(False)
            request.send(_BUSY)
            with contextlib.suppress(OSError):
                request.recv(65536)
            request.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            request.close()

    def _admitted(self) -> None:
        if self._refusing:
            with self._lock:
                n, self._refusing = self._refusing, 0
            if n:
                log.warning("control: serving again, %d connections were refused", n)

    # ---------------------------------------------------------------- ingest jobs

    def submit(self, path: str) -> IngestJob:
        """Queue an ingest job for `path`; raises `IngestError` (400/403/404/503)."""
        return self.ingest.submit(path)

    def job(self, job_id: str) -> dict[str, Any] | None:
        return self.ingest.job(job_id)

    def jobs(self) -> list[dict[str, Any]]:
        return self.ingest.jobs()
