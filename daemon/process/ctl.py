"""`streamtap ctl`: talk to a running daemon's control socket.

    streamtap ctl [-i IFACE | --socket PATH] status
    streamtap ctl [-i IFACE | --socket PATH] metrics
    streamtap ctl [-i IFACE | --socket PATH] ingest PATH [--wait]

The socket is `--socket PATH`, else `<runtime>/<IFACE>.sock` with runtime = $RUNTIME_DIRECTORY
else /run/streamtap; with neither flag, the runtime directory's only `*.sock`.

Exit codes: 0 ok (ingest --wait: the job is done), 1 daemon not reachable, request refused
(HTTP 4xx/5xx) or ingest job failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import glob
import http.client
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

from streamtap.config.paths import runtime_dir
from streamtap.errors import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, Error

POLL_INTERVAL = 0.2
TIMEOUT = 10.0


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over an AF_UNIX stream socket."""

    def __init__(self, socket_path: str, timeout: float = TIMEOUT) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class NotRunning(Error):
    """No daemon answers on the socket."""


class HttpError(Error):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def resolve_socket(interface: str | None, socket_path: str | None) -> str:
    """The socket to talk to; raises ValueError (usage error) when it cannot be chosen."""
    if socket_path:
        return socket_path
    rt = runtime_dir()
    if interface:
        return os.path.join(rt, f"{interface}.sock")
    found = sorted(glob.glob(os.path.join(glob.escape(rt), "*.sock")))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(f"no control socket in {rt} (is the daemon running?): "
                         "pass -i IFACE or --socket PATH")
    names = ", ".join(os.path.basename(f)[: -len(".sock")] for f in found)
    raise ValueError(f"several daemons run ({names}): pass -i IFACE to pick one")


class Client:
    def __init__(self, socket_path: str, timeout: float = TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, str, bytes]:
        """(status, content type, body). Raises NotRunning, HttpError (>= 400)."""
        conn = UnixHTTPConnection(self.socket_path, self.timeout)
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            try:
                conn.request(method, path, body=data, headers=headers)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise NotRunning(f"streamtap ctl: no daemon listening on {self.socket_path} "
                                 f"({e.strerror})") from None
            except PermissionError:
                raise NotRunning(f"streamtap ctl: permission denied on {self.socket_path} "
                                 "(run as root or as a member of the socket's group)") from None
            except OSError as e:
                raise NotRunning(f"streamtap ctl: cannot connect to {self.socket_path}: "
                                 f"{e.strerror or e}") from None
            try:
                resp = conn.getresponse()
                payload = resp.read()
            except (OSError, http.client.HTTPException) as e:
                raise NotRunning(f"streamtap ctl: the daemon on {self.socket_path} did not "
                                 f"answer: {e}") from None
            ctype = resp.getheader("Content-Type", "")
        finally:
            conn.close()
        if resp.status >= 400:
            message = payload.decode("utf-8", "replace").strip()
            try:
                message = json.loads(payload)["error"]
            except (ValueError, KeyError, TypeError):
                pass
            raise HttpError(resp.status, f"streamtap ctl: {message} (HTTP {resp.status})")
        return resp.status, ctype, payload

    def json(self, method: str, path: str, body: Any = None) -> Any:
        return json.loads(self.request(method, path, body)[2])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamtap ctl",
                                description="Talk to a running streamtap daemon.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-i", dest="interface", metavar="IFACE",
                       help="the daemon capturing on IFACE (socket <runtime>/IFACE.sock)")
    where.add_argument("--socket", metavar="PATH", help="the control socket's path")
    p.add_argument("--timeout", type=float, default=TIMEOUT, metavar="SECONDS",
                   help=f"per-request timeout (default {TIMEOUT:g})")
    sub = p.add_subparsers(dest="command", required=True, metavar="status|metrics|ingest")
    sub.add_parser("status", help="print the daemon's state as JSON")
    sub.add_parser("metrics", help="print the Prometheus metrics")
    ing = sub.add_parser("ingest", help="reassemble a capture file through the daemon's sinks")
    ing.add_argument("path", metavar="PATH",
                     help="capture file, inside one of the daemon's control.ingest_dirs")
    ing.add_argument("--wait", action="store_true",
                     help="wait until the job ends; exit 0 if done, 1 if failed")
    return p


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[2:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: usage error (2) or --help (0)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        path = resolve_socket(args.interface, args.socket)
    except ValueError as e:
        print(f"streamtap ctl: {e}", file=sys.stderr)
        return EXIT_USAGE
    client = Client(path, args.timeout)
    try:
        if args.command == "status":
            _print_json(client.json("GET", "/status"))
        elif args.command == "metrics":
            sys.stdout.write(client.request("GET", "/metrics")[2].decode("utf-8", "replace"))
        else:
            return _ingest(client, os.path.abspath(args.path), args.wait)
    except (NotRunning, HttpError) as e:
        print(e, file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return 130
    return EXIT_OK


def _ingest(client: Client, path: str, wait: bool) -> int:
    job = client.json("POST", "/pcaps", {"path": path})
    if not wait:
        _print_json(job)
        return EXIT_OK
    while job.get("status") not in ("done", "failed"):
        time.sleep(POLL_INTERVAL)
        job = client.json("GET", f"/pcaps/{job['id']}")
    _print_json(job)
    return EXIT_OK if job["status"] == "done" else EXIT_RUNTIME
