"""Issue 11 item 6: hostile control clients. Each is answered or cut within a bound, the control
API keeps answering others, and (the live test) the daemon keeps capturing meanwhile.

The in-process tests run a `ControlServer` with a short request_timeout (1.5 s) so the bounds are
quick to check; the daemon test uses the daemon's own config path (`control.*` settings).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import require
from pcapbuild import Conversation

from streamtap.process.control import MAX_HEAD, ControlServer, Limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
import netns  # noqa: E402

T0 = 1700000000.0
TIMEOUT = 1.5  # the servers' request_timeout here
MB = 1 << 20


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sthost-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def make_server(root: Path, **kw: Any) -> ControlServer:
    (root / "ingest").mkdir(exist_ok=True)
    kw.setdefault("limits", Limits(max_connections=16, request_timeout=TIMEOUT))
    return ControlServer(str(root / "ctl.sock"), ingest_dirs=[str(root / "ingest")],
                         state=lambda: {"uptime": 1.0}, deliver=lambda s: None, **kw)


@pytest.fixture
def srv(short_dir: Path) -> Iterator[ControlServer]:
    s = make_server(short_dir, listen="127.0.0.1:0")
    s.start()
    yield s
    s.stop()


def connect(server: ControlServer, tcp: bool = False) -> socket.socket:
    if tcp:
        s = socket.create_connection(("127.0.0.1", server.port or 0), timeout=10)
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(server.address or "")
    return s


def read_answer(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers, body of one answer (or status 0: closed without one)."""
    data = b""
    with contextlib.suppress(ConnectionError):
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                return 0, {}, data
            data += chunk
    if b"\r\n\r\n" not in data:
        return 0, {}, data
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    hdrs = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    n = int(hdrs.get("content-length", "0"))
    with contextlib.suppress(ConnectionError):
        while len(body) < n:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(lines[0].split()[1]), hdrs, body


def raw(server: ControlServer, data: bytes, tcp: bool = False) -> tuple[int, dict, bytes]:
    with connect(server, tcp) as s:
        with contextlib.suppress(ConnectionError):
            s.sendall(data)
        return read_answer(s)


def status_ok(server: ControlServer, bound: float = 1.0, tcp: bool = False) -> None:
    t0 = time.monotonic()
    code, _, body = raw(server, b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n", tcp)
    assert code == 200 and json.loads(body) == {"uptime": 1.0}
    assert time.monotonic() - t0 < bound


def no_traceback(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert "Traceback" not in capfd.readouterr().err


# ----------------------------------------------------------------------------- malformed HTTP

def post_raw(body: bytes) -> bytes:
    return b"POST /pcaps HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


MALFORMED = [
    (b"\x00\x01\x02garbage\r\n\r\n", 400),
    (b"GET\r\n\r\n", 400),
    (b"GET /status HTTP/9.9\r\n\r\n", 505),
    (b"GET /status HTTP/1.x\r\n\r\n", 400),
    (b"GET /status HTTP/1.1 extra\r\n\r\n", 400),
    (b"GET /status HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
    (b"GET /status HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400),
    (b"POST /pcaps HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 9\r\n\r\n{}", 400),
    (b"POST /pcaps HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
    (post_raw(b"\xff\xfe\xfd\x00{[}]"), 400),
    (post_raw(b'{"path": "/a\\u0000b"}'), 400),
    (post_raw(b'{"path": "/a/b"'), 400),
    (b"GET /" + b"a" * (MAX_HEAD + 10) + b" HTTP/1.1\r\n\r\n", 431),
    (b"GET /status HTTP/1.1\r\n" + b"X-Pad: " + b"p" * 900 + b"\r\n" * 0
     + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 200) for i in range(90)) + b"\r\n", 431),
    (b"GET /status HTTP/1.1\r\n" + b"".join(b"X%d: 1\r\n" % i for i in range(150)) + b"\r\n",
     431),
    (b"BREW /status HTTP/1.1\r\n\r\n", 501),
    (b"GET /\xff\xfe HTTP/1.1\r\n\r\n", 404),
]


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_malformed_http_is_answered_400ish_at_once(srv: ControlServer, tcp: bool,
                                                    caplog: pytest.LogCaptureFixture,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    for data, want in MALFORMED:
        t0 = time.monotonic()
        code, hdrs, body = raw(srv, data, tcp)
        assert code == want, (data[:60], code, body[:200])
        assert time.monotonic() - t0 < 1.0, data[:60]  # answered, not left to the timeout
        assert hdrs["content-type"] == "application/json"
        assert "Traceback" not in json.loads(body)["error"]
    assert srv.counters["malformed"] >= 8 and srv.counters["too_large"] >= 3
    status_ok(srv, tcp=tcp)
    no_traceback(caplog, capfd)


# ----------------------------------------------------------------------------- a 10 MB body


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_10mb_body_refused_413_without_reading_it(srv: ControlServer, tcp: bool,
                                                   caplog: pytest.LogCaptureFixture,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    for path in (b"/pcaps", b"/status"):
        s = connect(srv, tcp)
        s.sendall(b"POST %s HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (path, 10 * MB))
        sent = [0]

        def push(sock: socket.socket = s, sent: list[int] = sent) -> None:
            with contextlib.suppress(OSError):
                while sent[0] < 10 * MB:
                    sent[0] += sock.send(b"x" * 65536)

        t = threading.Thread(target=push, daemon=True)
        t0 = time.monotonic()
        t.start()
        code, _hdrs, body = read_answer(s)
        elapsed = time.monotonic() - t0
        want = 413 if path == b"/pcaps" else 405
        assert code == want, (path, body)
        assert elapsed < 1.0
        t.join(5)
        s.close()
        # the server read at most the linger allowance of the body, never the 10 MB
        assert not t.is_alive() and sent[0] < 10 * MB, sent[0]
    # Expect: 100-continue (curl's habit for big bodies): 413 before any body byte is sent
    code, _, body = raw(srv, b"POST /pcaps HTTP/1.1\r\nContent-Length: %d\r\n"
                        b"Expect: 100-continue\r\n\r\n" % (10 * MB), tcp)
    assert code == 413 and b"65536" in body
    assert srv.counters["too_large"] >= 2
    status_ok(srv, tcp=tcp)
    no_traceback(caplog, capfd)


# ----------------------------------------------------------------------------- 1,000 connections


def raise_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))


def flood(address: str, n: int, request: bytes | None) -> tuple[dict[int, int], float]:
    """`n` unix connections opened at once (each sends `request`, or nothing); returns
    {status: count} (0 = closed without an answer) and the time until every one ended."""
    raise_nofile(n + 200)
    t0 = time.monotonic()
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(address)  # blocking: a full backlog makes it wait, not fail with EAGAIN
        s.settimeout(15)
        if request:
            with contextlib.suppress(OSError):
                s.sendall(request)
        socks.append(s)
    counts: dict[int, int] = {}
    try:
        for s in socks:
            code = read_answer(s)[0]
            counts[code] = counts.get(code, 0) + 1
    finally:
        for s in socks:
            s.close()
    return counts, time.monotonic() - t0


def test_1000_connections_at_once_bounded_threads(short_dir: Path,
                                                  caplog: pytest.LogCaptureFixture,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    srv = make_server(short_dir, limits=Limits(max_connections=64, request_timeout=TIMEOUT))
    base = threading.active_count()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], threading.active_count())
            time.sleep(0.005)

    with srv:
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            # silent clients: 64 hold a slot until the request timeout, the rest get 503 at once
            counts, elapsed = flood(srv.address or "", 1000, None)
            assert counts.get(503, 0) >= 1000 - 64, counts
            assert sum(counts.values()) == 1000
            assert set(counts) <= {0, 408, 503}, counts
            assert elapsed < TIMEOUT + 3.0, elapsed
            status_ok(srv)
            # clients that do ask: each one answered 200 or 503, none left hanging
            counts, elapsed = flood(srv.address or "", 1000,
                                    b"GET /status HTTP/1.1\r\nConnection: close\r\n\r\n")
            assert sum(counts.values()) == 1000 and set(counts) <= {200, 503}, counts
            assert counts.get(200, 0) >= 64, counts
            assert elapsed < 10.0, elapsed
        finally:
            stop.set()
            sampler.join()
        # one thread per served connection, at most max_connections of them (+ listener, ingest,
        # the sampler)
        assert peak[0] - base <= 64 + 4, (base, peak[0])
        assert srv.counters["busy"] >= 936
        status_ok(srv)
    assert any("refusing more (503)" in r.getMessage() for r in caplog.records)
    no_traceback(caplog, capfd)


# ----------------------------------------------------------------------------- slow clients


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_one_byte_a_second_is_cut_at_the_deadline(srv: ControlServer, tcp: bool,
                                                   caplog: pytest.LogCaptureFixture,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    """A byte every 0.5 s is well inside a per-read timeout (1.5 s), which would never fire:
    the deadline covers the whole request."""
    s = connect(srv, tcp)
    request = b"GET /status HTTP/1.1\r\nX-Slow: " + b"z" * 100
    t0 = time.monotonic()
    cut_at = None
    for b in request:
        try:
            s.send(bytes([b]))
        except OSError:
            cut_at = time.monotonic() - t0
            break
        # others are served meanwhile
        if b == ord("S"):
            status_ok(srv, tcp=tcp)
        time.sleep(0.5)
        s.setblocking(False)
        try:
            peek = s.recv(65536, socket.MSG_PEEK)
        except BlockingIOError:
            peek = None
        s.setblocking(True)
        if peek is not None:
            cut_at = time.monotonic() - t0
            break
    s.settimeout(5)
    code, _, body = read_answer(s)
    s.close()
    assert cut_at is not None and TIMEOUT - 0.1 <= cut_at <= TIMEOUT + 1.0, cut_at
    assert code == 408 and "1.5 s" in json.loads(body)["error"]
    # slow body: headers at once, the body a byte at a time
    s = connect(srv, tcp)
    s.sendall(b'POST /pcaps HTTP/1.1\r\nContent-Length: 40\r\n\r\n{"pa')
    t0 = time.monotonic()
    code = 0
    for _ in range(10):
        with contextlib.suppress(OSError):
            s.send(b"t")
        s.settimeout(0.5)
        with contextlib.suppress(TimeoutError):
            code = read_answer(s)[0]
            break
    s.close()
    assert code == 408 and time.monotonic() - t0 <= TIMEOUT + 1.0
    # an idle keep-alive connection: closed without an answer at the deadline
    s = connect(srv, tcp)
    t0 = time.monotonic()
    assert s.recv(10) == b""
    assert TIMEOUT - 0.1 <= time.monotonic() - t0 <= TIMEOUT + 1.0
    s.close()
    assert srv.counters["timeout"] >= 2
    status_ok(srv, tcp=tcp)
    no_traceback(caplog, capfd)


# ----------------------------------------------------------------------------- ingest paths


def post(srv: ControlServer, path: str) -> tuple[int, dict]:
    body = json.dumps({"path": path}).encode()
    code, _, raw_body = raw(srv, b"POST /pcaps HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s"
                            % (len(body), body))
    return code, json.loads(raw_body)


def wait_job(srv: ControlServer, job_id: str) -> dict:
    assert netns.wait_for(lambda: (srv.job(job_id) or {}).get("status") in ("done", "failed"),
                          10)
    return srv.job(job_id) or {}


def test_ingest_dotdot_symlinks_nul_fifo(short_dir: Path) -> None:
    delivered: list = []
    srv = make_server(short_dir)
    srv.ingest.deliver = delivered.extend
    ingest = short_dir / "ingest"
    outside = short_dir / "secret"
    outside.mkdir()
    Conversation(("10.0.0.1", 1), ("10.0.0.2", 2), t0=T0).handshake().send(
        "client", b"secret").close().write(outside / "s.pcap")
    (ingest / "linkdir").symlink_to(outside)  # a directory symlink out
    (ingest / "loop").symlink_to(ingest / "loop")
    os.mkfifo(ingest / "fifo.pcap")
    with srv:
        for path, want in [
            (f"{ingest}/../secret/s.pcap", 403),
            (f"{ingest}/linkdir/s.pcap", 403),
            (f"{ingest}/./linkdir/../../secret/s.pcap", 403),
            (f"{ingest}/loop", 404),  # a symlink loop: answered at once, not a hang
            (f"{ingest}/a\0/../../secret/s.pcap", 400),
            (f"{ingest}/fifo.pcap", 400),
            (f"{ingest}/" + "x/" * 3000 + "f.pcap", 404),
        ]:
            code, body = post(srv, path)
            assert code == want, (path[:80], body)
            assert "Traceback" not in body["error"]
        status_ok(srv)
    assert delivered == []


def test_ingest_path_swapped_after_acceptance_is_not_read(short_dir: Path) -> None:
    """A job waits in the queue; meanwhile its directory is replaced by a symlink out. The run
    checks the opened file again and reads nothing from outside."""
    delivered: list = []
    gate = threading.Event()
    srv = make_server(short_dir)
    ingest = short_dir / "ingest"
    (ingest / "d").mkdir()
    outside = short_dir / "secret"
    outside.mkdir()
    for d in (ingest / "d", outside):
        Conversation(("10.0.0.1", 1), ("10.0.0.2", 2), t0=T0).handshake().send(
            "client", d.name.encode()).close().write(d / "x.pcap")
    Conversation(("10.0.0.1", 3), ("10.0.0.2", 2), t0=T0).handshake().send(
        "client", b"first").close().write(ingest / "first.pcap")

    def held(streams: list) -> None:
        gate.wait(10)
        delivered.extend(streams)

    srv.ingest.deliver = held
    with srv:
        code, first = post(srv, str(ingest / "first.pcap"))
        assert code == 202
        code, job = post(srv, str(ingest / "d" / "x.pcap"))
        assert code == 202
        (ingest / "d").rename(ingest / "old")
        (ingest / "d").symlink_to(outside)
        gate.set()
        assert wait_job(srv, first["id"])["status"] == "done"
        result = wait_job(srv, job["id"])
    assert result["status"] == "failed" and "no longer" in result["error"], result
    assert [s.client_data for s in delivered] == [b"first"]


# ----------------------------------------------------------------------------- socket access


def as_nobody(socket_path: str, groups: str | None) -> subprocess.CompletedProcess:
    """A tiny client run as nobody (root bypasses file permissions: it must be dropped)."""
    code = ("import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n"
            "    s.connect(sys.argv[1])\n"
            "except PermissionError:\n"
            "    print('EACCES'); sys.exit(0)\n"
            "s.sendall(b'GET /status HTTP/1.1\\r\\nConnection: close\\r\\n\\r\\n')\n"
            "print(s.recv(100).split(b'\\r\\n')[0].decode())\n")
    grp_args = ["--groups", groups] if groups else ["--clear-groups"]
    return subprocess.run(["setpriv", "--reuid", "nobody", "--regid", "nogroup", *grp_args,
                           "/usr/bin/python3", "-c", code, socket_path],
                          capture_output=True, text=True, timeout=20)


def test_socket_mode_group_and_a_caller_outside_the_group(short_dir: Path) -> None:
    require.need(require.tool("setpriv", "util-linux"))
    require.need(None if os.geteuid() == 0 else "needs root (to drop to nobody and chown)")
    os.chmod(short_dir, 0o755)  # the directory lets anyone through: the socket decides
    old = os.umask(0)  # the widest umask: the socket must still be 0660 from its creation
    try:
        srv = make_server(short_dir)
        srv.start()
    finally:
        os.umask(old)
    try:
        st = os.stat(srv.address or "")
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == os.getegid()  # no control.group: the daemon's own group
        r = as_nobody(srv.address or "", None)
        assert r.stdout.strip() == "EACCES", (r.stdout, r.stderr)
        status_ok(srv)  # root (the group's owner) is still served
    finally:
        srv.stop()
    # control.group: the socket's group is that one, and its members are served
    import grp

    nogroup = grp.getgrnam("nogroup").gr_gid
    srv = make_server(short_dir, group="nogroup")
    with srv:
        st = os.stat(srv.address or "")
        assert st.st_gid == nogroup and stat.S_IMODE(st.st_mode) == 0o660
        r = as_nobody(srv.address or "", str(nogroup))
        assert r.stdout.strip() == "HTTP/1.1 200 OK", (r.stdout, r.stderr)


def test_unknown_group_refused(short_dir: Path) -> None:
    from streamtap.config import ConfigError, loads
    from streamtap.process.control import ControlError

    with pytest.raises(ControlError, match="no such group"):
        make_server(short_dir, group="no-such-group-xyz").start()
    with pytest.raises(ConfigError) as e:
        loads("control:\n  group: no-such-group-xyz\n")
    assert str(e.value) == "<string>:2: control.group: no such group 'no-such-group-xyz'"


@pytest.mark.parametrize("listen", ["0.0.0.0:9100", "10.1.2.3:9100", "[::]:9100"])
def test_non_loopback_listen_exits_2_naming_key_and_line(short_dir: Path, listen: str) -> None:
    conf = short_dir / "c.yaml"
    conf.write_text(f"# control\ncontrol:\n  listen: '{listen}'\n")
    r = subprocess.run([str(Path(sys.executable).with_name("streamtap")), "--config", str(conf),
                        "-i", "lo"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert "c.yaml:3: control.listen: only 127.0.0.1:PORT is allowed" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- a live daemon


def hostile_round(ctl: Any, ingest: Path) -> dict[str, Any]:
    """Every hostile client above, against `ctl` (.address): what each got."""
    got: dict[str, Any] = {}
    got["malformed"] = [raw(ctl, data)[0] for data, _want in MALFORMED]
    s = connect(ctl)
    s.sendall(b"POST /pcaps HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (10 * MB))
    with contextlib.suppress(OSError):
        s.sendall(b"x" * MB)
    got["body_10mb"] = read_answer(s)[0]
    s.close()
    slow = connect(ctl)
    t0 = time.monotonic()
    for b in b"GET /status HTTP/1.1\r\n":
        with contextlib.suppress(OSError):
            slow.send(bytes([b]))
        readable, _, _ = select.select([slow], [], [], 0.5)  # a byte every 0.5 s until cut
        if readable:
            break
    cut_at = time.monotonic() - t0
    slow.settimeout(5)
    got["slow"] = (read_answer(slow)[0], cut_at)
    slow.close()
    got["flood"] = flood(ctl.address, 1000, b"GET /status HTTP/1.1\r\n\r\n")[0]
    got["ingest"] = [post(ctl, p)[0] for p in (f"{ingest}/../secret/s.pcap",
                                               f"{ingest}/out/s.pcap")]
    return got


@pytest.mark.requires(netns.available())
def test_live_daemon_keeps_capturing_under_hostile_clients(tmp_path: Path) -> None:
    from test_daemon_live import Daemon, assert_exact, mix

    ingest = tmp_path / "ingest"
    ingest.mkdir()
    (tmp_path / "secret").mkdir()
    (ingest / "out").symlink_to(tmp_path / "secret")
    conf = tmp_path / "c.yaml"
    conf.write_text(f"control:\n  request_timeout: 2s\n  ingest_dirs: ['{ingest}']\n")
    with netns.VethPair() as net:
        net.server = net.start_server()
        d = Daemon(net, tmp_path, "--config", str(conf), workers=2)
        try:
            d.wait_msg("READY=1")
            ctl = type("Ctl", (), {"address": str(d.sock), "port": None})()
            before = net.run_client(mix(net, 20, seed=1), parallel=4)
            # traffic all through the hostile round (100 rounds of 2 connections, 50 ms each)
            during = net.client_popen(mix(net, 200, seed=2), parallel=2, hold=0.05)
            got = hostile_round(ctl, ingest)
            out, _ = during.communicate(timeout=120)
            during_results = json.loads(out)
            after = net.run_client(mix(net, 20, seed=3), parallel=4)
            results = before + during_results + after
            records = d.wait_records(len(results), timeout=30)
            assert_exact(results, records)
            assert len(d.records()) == len(results)
            t0 = time.monotonic()
            st = d.status()
            assert st is not None and st["packets"] > 0 and time.monotonic() - t0 < 1.0
            assert got["malformed"] == [want for _d, want in MALFORMED], got
            assert got["body_10mb"] == 413
            assert got["slow"][0] == 408 and 1.9 <= got["slow"][1] <= 3.5, got["slow"]
            assert sum(got["flood"].values()) == 1000 and set(got["flood"]) <= {200, 503}
            assert got["flood"].get(200, 0) >= 64, got["flood"]
            assert got["ingest"] == [403, 403]
            assert all(w["alive"] for w in st["workers"]) and st["worker_restarts"] == 0
            assert d.stop() == 0
            err = d.stderr()
            assert "Traceback" not in err, err[-3000:]
            print("hostile round:", {k: v for k, v in got.items() if k != "malformed"},
                  f"streams {len(results)} exact")
        finally:
            d.close()
