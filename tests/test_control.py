"""daemon/process/control.py, daemon/process/ctl.py, daemon/process/metrics.py: the control API
and its client."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pcapbuild import Conversation, write_pcap
from prometheus_client.parser import text_string_to_metric_families

from streamtap.process import ctl
from streamtap.process.control import ControlError, ControlServer, parse_listen
from streamtap.process.ctl import UnixHTTPConnection
from streamtap.process.metrics import render

T0 = 1700000000.0

STATE: dict[str, Any] = {
    "uptime": 12.5,
    "interface": "eth0",
    "workers": [
        {"index": 0, "pid": 101, "alive": True, "received": 1000, "kernel_drops": 3,
         "interface_drops": 1, "packets": 997, "flows_active": 4},
        {"index": 1, "pid": 102, "alive": False, "received": 2000, "kernel_drops": 0,
         "interface_drops": 2, "packets": 1998, "flows_active": 0},
    ],
    "flows_active": 4,
    "streams": {"fin": 10, "rst": 2, "timeout": 3, "evicted": 1, "shutdown": 0},
    "malformed": {"short_tcp": 5, "bad_ip_version": 1},
    "missed_bytes": 1234,
    "packets": 2995,
    "worker_restarts": 1,
    "channel_dropped": 7,
    "sinks": [
        {"name": "jsonl", "type": "jsonl", "healthy": True, "queue_depth": 2,
         "records": {"ok": 15, "retried": 1, "failed": 0, "spooled": 0, "dropped": 0}},
        {"name": "couchdb", "type": "couchdb", "healthy": False, "queue_depth": 9,
         "records": {"ok": 3, "retried": 4, "failed": 1, "spooled": 6, "dropped": 2}},
    ],
}


def conv(port: int, t0: float, req: bytes, resp: bytes) -> Conversation:
    return (Conversation(("10.0.0.1", port), ("10.0.0.2", 80), t0=t0).handshake()
            .send("client", req).send("server", resp).close())


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """AF_UNIX paths are limited to 107 bytes: pytest's tmp_path can be longer."""
    d = Path(tempfile.mkdtemp(prefix="stctl-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Harness:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ingest = root / "ingest"
        self.ingest.mkdir()
        self.sock = str(root / "run" / "eth0.sock")  # run/ does not exist yet
        self.delivered: list[list] = []
        self.server = ControlServer(self.sock, listen=None, ingest_dirs=[str(self.ingest)],
                                    state=lambda: STATE, deliver=self.delivered.append,
                                    config=lambda: None)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = UnixHTTPConnection(self.sock, timeout=5)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def post(self, path: str) -> tuple[int, dict[str, str], Any]:
        code, hdrs, body = self.request("POST", "/pcaps", json.dumps({"path": path}).encode(),
                                        {"Content-Type": "application/json"})
        return code, hdrs, json.loads(body)

    def wait(self, job_id: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            code, _, body = self.request("GET", f"/pcaps/{job_id}")
            assert code == 200
            job = json.loads(body)
            if job["status"] in ("done", "failed") or time.monotonic() > deadline:
                return job
            time.sleep(0.02)

    def streams(self) -> list:
        return [s for batch in self.delivered for s in batch]


@pytest.fixture
def h(short_dir: Path) -> Iterator[Harness]:
    harness = Harness(short_dir)
    harness.server.start()
    yield harness
    harness.server.stop()


# ----------------------------------------------------------------- metrics


def test_metrics_render_names_labels_values() -> None:
    fams = {f.name: f for f in text_string_to_metric_families(render(lambda: STATE).decode())}

    def samples(name: str) -> dict[tuple, float]:
        fam = fams[name.removesuffix("_total")]
        return {tuple(sorted(s.labels.items())): s.value for s in fam.samples
                if s.name == name}

    assert samples("streamtap_capture_packets_received_total") == {
        (("worker", "0"),): 1000, (("worker", "1"),): 2000}
    assert samples("streamtap_capture_kernel_drops_total") == {
        (("worker", "0"),): 3, (("worker", "1"),): 0}
    assert samples("streamtap_capture_interface_drops_total") == {
        (("worker", "0"),): 1, (("worker", "1"),): 2}
    assert samples("streamtap_decode_malformed_total") == {
        (("reason", "short_tcp"),): 5, (("reason", "bad_ip_version"),): 1}
    assert samples("streamtap_tcp_streams_active") == {(): 4}
    assert fams["streamtap_tcp_streams_active"].type == "gauge"
    assert samples("streamtap_tcp_streams_completed_total") == {
        (("reason", r),): v for r, v in STATE["streams"].items()}
    assert samples("streamtap_tcp_missed_bytes_total") == {(): 1234}
    rec = samples("streamtap_sink_records_total")
    assert len(rec) == 10
    assert rec[(("result", "ok"), ("sink", "jsonl"))] == 15
    assert rec[(("result", "spooled"), ("sink", "couchdb"))] == 6
    assert rec[(("result", "dropped"), ("sink", "couchdb"))] == 2
    assert samples("streamtap_sink_queue_depth") == {
        (("sink", "jsonl"),): 2, (("sink", "couchdb"),): 9}
    assert fams["streamtap_sink_queue_depth"].type == "gauge"
    assert samples("streamtap_worker_restarts_total") == {(): 1}
    assert samples("streamtap_channel_dropped_total") == {(): 7}
    for name in ("capture_packets_received", "capture_kernel_drops", "decode_malformed",
                 "tcp_streams_completed", "tcp_missed_bytes", "sink_records", "worker_restarts",
                 "channel_dropped"):
        assert fams["streamtap_" + name].type == "counter", name


def test_metrics_empty_state_and_private_registry() -> None:
    from prometheus_client import REGISTRY

    text = render(lambda: {}).decode()
    assert "streamtap_tcp_missed_bytes_total 0.0" in text
    assert "streamtap" not in "".join(n for n in REGISTRY._names_to_collectors)


# ----------------------------------------------------------------- server


def test_status_is_the_state(h: Harness) -> None:
    code, hdrs, body = h.request("GET", "/status")
    assert code == 200
    assert hdrs["content-type"] == "application/json"
    assert json.loads(body) == STATE


def test_metrics_endpoint(h: Harness) -> None:
    code, hdrs, body = h.request("GET", "/metrics")
    assert code == 200
    assert hdrs["content-type"].startswith("text/plain; version=0.0.4")
    names = {s.name for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert {"streamtap_capture_packets_received_total", "streamtap_sink_queue_depth",
            "streamtap_channel_dropped_total"} <= names


def test_socket_file(h: Harness) -> None:
    st = os.stat(h.sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert h.server.address == h.sock and h.server.port is None
    h.server.stop()
    assert not os.path.exists(h.sock)


def test_stale_socket_replaced_live_one_refused(short_dir: Path) -> None:
    path = str(short_dir / "s.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # file left behind, nobody listening
    kw: dict[str, Any] = {"listen": None, "ingest_dirs": [], "state": dict, "deliver": print}
    srv = ControlServer(path, **kw)
    srv.start()
    try:
        with pytest.raises(ControlError, match="another process is listening"):
            ControlServer(path, **kw).start()
    finally:
        srv.stop()
    Path(path).write_text("not a socket")
    with pytest.raises(ControlError, match="not a socket"):
        ControlServer(path, **kw).start()


def test_errors_are_json(h: Harness) -> None:
    cases = [
        ("GET", "/nope", None, 404),
        ("POST", "/status", b"{}", 405),
        ("DELETE", "/pcaps", None, 405),
        ("GET", "/pcaps/0123456789abcdef", None, 404),
        ("POST", "/pcaps", b"{not json", 400),
        ("POST", "/pcaps", b"{}", 400),
        ("POST", "/pcaps", b'{"path": 42}', 400),
        ("POST", "/pcaps", b'["x"]', 400),
        ("POST", "/pcaps", b'{"path": "relative.pcap"}', 400),
        ("BREW", "/status", None, 501),
    ]
    for method, path, body, want in cases:
        code, hdrs, raw = h.request(method, path, body)
        assert code == want, (method, path, raw)
        assert hdrs["content-type"] == "application/json", (method, path)
        err = json.loads(raw)["error"]
        assert isinstance(err, str) and err and "Traceback" not in err
    code, hdrs, _ = h.request("PUT", "/status")
    assert code == 405 and hdrs["allow"] == "GET"


def test_state_exception_is_500_and_logged(short_dir: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> dict:
        raise RuntimeError("boom")

    srv = ControlServer(str(short_dir / "b.sock"), listen=None, ingest_dirs=[], state=broken,
                        deliver=print)
    with srv:
        conn = UnixHTTPConnection(srv.address or "", timeout=5)
        conn.request("GET", "/status")
        r = conn.getresponse()
        body = json.loads(r.read())
        conn.close()
    assert r.status == 500 and "boom" not in body["error"]
    assert any(rec.name == "streamtap.process.control" and rec.exc_info for rec in caplog.records)


def test_ingest(h: Harness) -> None:
    a = conv(40000, T0, b"GET /a HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\nA")
    b = conv(40001, T0 + 1, b"GET /b HTTP/1.1\r\n\r\n", b"HTTP/1.1 404 Not Found\r\n\r\n")
    p = h.ingest / "two.pcap"
    write_pcap(p, a.packets + b.packets)
    code, hdrs, job = h.post(str(p))
    assert code == 202
    assert job["status"] == "queued" and hdrs["location"] == f"/pcaps/{job['id']}"
    job = h.wait(job["id"])
    assert job["status"] == "done", job
    assert job["error"] is None and job["finished"] and job["started"]
    assert job["path"] == os.path.realpath(p)
    assert job["packets"] == len(a.packets) + len(b.packets)
    assert job["streams"] == 2
    got = {s.client[1]: s for s in h.streams()}
    assert got[40000].client_data == b"GET /a HTTP/1.1\r\n\r\n"
    assert got[40000].server_data == b"HTTP/1.1 200 OK\r\n\r\nA"
    assert got[40001].client_data == b"GET /b HTTP/1.1\r\n\r\n"
    assert got[40001].server_data == b"HTTP/1.1 404 Not Found\r\n\r\n"
    assert {s.close_reason for s in got.values()} == {"fin"}
    code, _, listing = h.request("GET", "/pcaps")
    assert code == 200 and [j["id"] for j in json.loads(listing)] == [job["id"]]


def test_go_reassemblers_post_pcap_is_an_alias(h: Harness, short_dir: Path) -> None:
    # what the Go reassembler's users send: POST /pcap {"path": ...}
    p = h.ingest / "go.pcap"
    conv(40000, T0, b"hello", b"world").write(p)
    code, hdrs, raw = h.request("POST", "/pcap", json.dumps({"path": str(p)}).encode(),
                                {"Content-Type": "application/json"})
    job = json.loads(raw)
    assert code == 202 and hdrs["location"] == f"/pcaps/{job['id']}"
    done = h.wait(job["id"])
    assert done["status"] == "done" and done["streams"] == 1, done
    (s,) = h.streams()
    assert s.client_data == b"hello" and s.server_data == b"world"
    # the same checks as /pcaps: outside the ingest dirs, missing, bad JSON
    outside = short_dir / "outside.pcap"
    conv(40000, T0, b"x", b"y").write(outside)
    for body, want in ((json.dumps({"path": str(outside)}).encode(), 403),
                       (json.dumps({"path": str(h.ingest / "nope.pcap")}).encode(), 404),
                       (b"{not json", 400)):
        code, _, raw = h.request("POST", "/pcap", body, {"Content-Type": "application/json"})
        assert code == want and "error" in json.loads(raw), (body, code)
    code, hdrs, _ = h.request("GET", "/pcap")
    assert code == 405 and hdrs["allow"] == "POST"


def test_ingest_jobs_queue_in_order(h: Harness) -> None:
    ids = []
    for i in range(3):
        p = h.ingest / f"c{i}.pcap"
        conv(41000 + i, T0, b"q%d" % i, b"r%d" % i).write(p)
        ids.append(h.post(str(p))[2]["id"])
    jobs = [h.wait(i) for i in ids]
    assert [j["status"] for j in jobs] == ["done"] * 3
    assert [s.client_data for s in h.streams()] == [b"q0", b"q1", b"q2"]


def test_ingest_path_checks(h: Harness, short_dir: Path) -> None:
    outside = short_dir / "outside.pcap"
    conv(40000, T0, b"x", b"y").write(outside)
    (h.ingest / "sub").mkdir()
    link = h.ingest / "escape.pcap"
    link.symlink_to(outside)
    dotdot = f"{h.ingest}/sub/../../outside.pcap"
    prefix = short_dir / "ingest2"  # shares a string prefix with ingest/, is not inside it
    prefix.mkdir()
    conv(40000, T0, b"x", b"y").write(prefix / "p.pcap")
    for path in (str(outside), str(link), dotdot, str(prefix / "p.pcap"), "/etc/passwd"):
        code, hdrs, body = h.post(path)
        assert code == 403, path
        assert "ingest directory" in body["error"]
    code, _, body = h.post(str(h.ingest / "missing.pcap"))
    assert code == 404 and "missing.pcap" in body["error"]
    code, _, body = h.post(str(h.ingest / "sub"))
    assert code == 400
    # a symlink inside the ingest dir to a file inside it is fine
    conv(40000, T0, b"x", b"y").write(h.ingest / "sub" / "real.pcap")
    (h.ingest / "alias.pcap").symlink_to(h.ingest / "sub" / "real.pcap")
    code, _, job = h.post(str(h.ingest / "alias.pcap"))
    assert code == 202 and h.wait(job["id"])["status"] == "done"
    assert h.streams()[0].client_data == b"x"


def test_ingest_disabled_without_dirs(short_dir: Path) -> None:
    p = short_dir / "a.pcap"
    conv(40000, T0, b"x", b"y").write(p)
    with ControlServer(str(short_dir / "n.sock"), listen=None, ingest_dirs=(), state=dict,
                       deliver=print) as srv:
        conn = UnixHTTPConnection(srv.address or "", timeout=5)
        conn.request("POST", "/pcaps", body=json.dumps({"path": str(p)}))
        r = conn.getresponse()
        assert r.status == 403 and "disabled" in json.loads(r.read())["error"]
        conn.close()


def test_ingest_damaged_capture(h: Harness) -> None:
    first = conv(40000, T0, b"hello", b"world")
    second = Conversation(("10.0.0.1", 40001), ("10.0.0.2", 80), t0=T0 + 10).handshake()
    second.send("client", b"kept").send("client", b"cut")
    pkts = first.packets + second.packets
    p = h.ingest / "damaged.pcap"
    write_pcap(p, pkts)
    offset = 24 + sum(16 + len(f) for _, f in pkts[:-1])
    p.write_bytes(p.read_bytes()[: offset + 20])
    _, _, job = h.post(str(p))
    job = h.wait(job["id"])
    assert job["status"] == "failed"
    assert f"byte {offset}" in job["error"] and "damaged.pcap" in job["error"]
    assert job["finished"] is not None
    got = {s.client[1]: s for s in h.streams()}
    assert got[40000].client_data == b"hello" and got[40000].server_data == b"world"
    assert got[40001].client_data == b"kept"


def test_ingest_not_a_capture(h: Harness) -> None:
    p = h.ingest / "text.pcap"
    p.write_text("hello, this is not a capture\n")
    _, _, job = h.post(str(p))
    job = h.wait(job["id"])
    assert job["status"] == "failed" and job["error"]
    assert h.delivered == []


def test_tcp_listener(short_dir: Path) -> None:
    srv = ControlServer(str(short_dir / "t.sock"), listen="127.0.0.1:0", ingest_dirs=[],
                        state=lambda: STATE, deliver=print)
    with srv:
        assert srv.port
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        conn.request("GET", "/status")
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read()) == STATE
        conn.request("GET", "/metrics")  # same keep-alive connection
        r = conn.getresponse()
        assert r.status == 200 and b"streamtap_tcp_streams_active 4.0" in r.read()
        conn.close()
    # TCP only, no unix socket
    with ControlServer(None, listen="127.0.0.1:0", ingest_dirs=[], state=dict,
                       deliver=print) as srv2:
        assert srv2.address is None and srv2.port


@pytest.mark.parametrize("listen", ["0.0.0.0:8080", "10.1.2.3:80", ":80", "[::]:80",
                                    "example.com:80", "127.0.0.1", "127.0.0.1:99999"])
def test_non_loopback_listen_refused(short_dir: Path, listen: str) -> None:
    with pytest.raises(ControlError):
        ControlServer(str(short_dir / "x.sock"), listen=listen, ingest_dirs=[], state=dict,
                      deliver=print)
    assert not (short_dir / "x.sock").exists()


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert parse_listen("localhost:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:9100") == ("::1", 9100)


def test_stop_interrupts_queued_jobs(short_dir: Path) -> None:
    ingest = short_dir / "in"
    ingest.mkdir()
    gate = threading.Event()
    got: list = []

    def slow_deliver(streams: list) -> None:
        gate.wait(5)
        got.extend(streams)

    srv = ControlServer(str(short_dir / "q.sock"), listen=None, ingest_dirs=[str(ingest)],
                        state=dict, deliver=slow_deliver)
    srv.start()
    for i in range(2):
        conv(40000 + i, T0, b"a", b"b").write(ingest / f"{i}.pcap")
        srv.submit(str(ingest / f"{i}.pcap"))
    gate.set()
    srv.stop()
    statuses = {j["status"] for j in srv.jobs()}
    assert statuses <= {"done", "failed"}


def test_ingest_full_queue_answers_503(short_dir: Path) -> None:
    # one job running (held in deliver), max_queued jobs waiting: the next POST is refused
    # with 503 instead of growing the queue; once the queue drains, POSTs are accepted again
    gate = threading.Event()
    running = threading.Event()
    got: list = []

    def held_deliver(streams: list) -> None:
        running.set()
        gate.wait(10)
        got.extend(streams)

    h = Harness(short_dir)
    ingest = h.ingest
    h.server = ControlServer(h.sock, listen=None, ingest_dirs=[str(ingest)], state=dict,
                             deliver=held_deliver, max_queued=2)
    for i in range(5):
        conv(40000 + i, T0, b"a", b"b").write(ingest / f"{i}.pcap")
    with h.server:
        code, _, first = h.post(str(ingest / "0.pcap"))
        assert code == 202
        assert running.wait(10)  # job 0 is running, not waiting
        accepted = [h.post(str(ingest / f"{i}.pcap")) for i in (1, 2)]
        assert [c for c, _, _ in accepted] == [202, 202]
        code, _, body = h.post(str(ingest / "3.pcap"))
        assert code == 503 and "2 ingest jobs are already waiting" in body["error"]
        assert len(h.server.jobs()) == 3  # the refused request left no job behind
        gate.set()
        for job in [first, *(j for _, _, j in accepted)]:
            assert h.wait(job["id"])["status"] == "done"
        code, _, job = h.post(str(ingest / "4.pcap"))
        assert code == 202 and h.wait(job["id"])["status"] == "done"
    assert sorted(s.client[1] for s in got) == [40000, 40001, 40002, 40004]


# ----------------------------------------------------------------- ctl


def test_ctl_status_and_metrics(h: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["--socket", h.sock, "status"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == STATE and out.startswith("{\n  ")
    assert ctl.main(["--socket", h.sock, "metrics"]) == 0
    out = capsys.readouterr().out
    names = {f.name for f in text_string_to_metric_families(out)}
    assert "streamtap_tcp_streams_completed" in names


def test_ctl_ingest_wait(h: Harness, capsys: pytest.CaptureFixture[str],
                         monkeypatch: pytest.MonkeyPatch) -> None:
    conv(40000, T0, b"ping", b"pong").write(h.ingest / "a.pcap")
    monkeypatch.chdir(h.ingest)
    assert ctl.main(["--socket", h.sock, "ingest", "a.pcap", "--wait"]) == 0  # relative path
    job = json.loads(capsys.readouterr().out)
    assert job["status"] == "done" and job["streams"] == 1
    assert h.streams()[0].server_data == b"pong"
    # without --wait: the queued job, exit 0
    assert ctl.main(["--socket", h.sock, "ingest", str(h.ingest / "a.pcap")]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["status"] in ("queued", "running", "done")
    h.wait(job["id"])


def test_ctl_ingest_failures(h: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    (h.ingest / "bad.pcap").write_bytes(b"\xd4\xc3\xb2\xa1" + b"\0" * 10)
    assert ctl.main(["--socket", h.sock, "ingest", str(h.ingest / "bad.pcap"), "--wait"]) == 1
    assert json.loads(capsys.readouterr().out)["status"] == "failed"
    assert ctl.main(["--socket", h.sock, "ingest", "/etc/passwd"]) == 1
    cap = capsys.readouterr()
    assert cap.out == "" and "ingest directory" in cap.err and "403" in cap.err
    assert len(cap.err.strip().splitlines()) == 1


def test_ctl_no_daemon(short_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(short_dir / "gone.sock")
    assert ctl.main(["--socket", path, "status"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and path in err and "no daemon" in err
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)  # a stale socket file: connection refused
    s.close()
    assert ctl.main(["--socket", path, "metrics"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and path in err


def test_ctl_socket_resolution(short_dir: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(short_dir))
    assert ctl.resolve_socket("eth1", None) == str(short_dir / "eth1.sock")
    assert ctl.resolve_socket("eth1", "/x.sock") == "/x.sock"
    assert ctl.main(["status"]) == 2  # no socket at all
    assert "-i" in capsys.readouterr().err
    with ControlServer(str(short_dir / "eth0.sock"), listen=None, ingest_dirs=[],
                       state=lambda: STATE, deliver=print):
        assert ctl.main(["status"]) == 0  # the only socket
        assert json.loads(capsys.readouterr().out) == STATE
        assert ctl.main(["-i", "eth0", "status"]) == 0
        capsys.readouterr()
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(short_dir / "eth9.sock"))
        s.close()
        assert ctl.main(["status"]) == 2
        err = capsys.readouterr().err
        assert "-i" in err and "eth0" in err and "eth9" in err
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    assert ctl.resolve_socket("eth0", None) == "/run/streamtap/eth0.sock"


def test_ctl_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main([]) == 2
    assert ctl.main(["-i", "eth0", "--socket", "/x", "status"]) == 2
    assert ctl.main(["frobnicate"]) == 2
    assert ctl.main(["ingest"]) == 2
    capsys.readouterr()


def test_cli_dispatches_ctl(short_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from streamtap.cli import main

    assert main(["ctl", "--socket", str(short_dir / "none.sock"), "status"]) == 1
    assert "no daemon" in capsys.readouterr().err
