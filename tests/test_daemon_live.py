"""The live daemon end to end: real TCP between two network namespaces, real sd_notify socket.

Needs root (namespaces, AF_PACKET). The daemon runs as `ip netns exec NS_A streamtap -i VETH_A`
with NOTIFY_SOCKET pointing at a datagram socket bound here (SO_PASSCRED: every message must come
from the daemon's own pid) and WATCHDOG_USEC=2 s; traffic comes from tests/netns.py's client
(in NS_A) and server (in NS_B), whose SHA-256 of every byte sent and received is the oracle.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import netns  # noqa: E402
from notifysock import NotifySocket  # noqa: E402

STREAMTAP = str(Path(sys.executable).with_name("streamtap"))
MIB = 1 << 20

pytestmark = pytest.mark.requires(netns.available())


@pytest.fixture(scope="module")
def net():
    with netns.VethPair() as n:
        n.server = n.start_server()
        yield n


class Daemon:
    """One `streamtap -i` run inside net.ns_a, with its notify socket, JSONL file and stderr."""

    def __init__(self, net, tmp: Path, *extra: str, workers: int = 1,
                 iface: str | None = None, env: dict | None = None) -> None:
        self.net = net
        self.out = tmp / "streams.jsonl"
        self.sock = tmp / "ctl.sock"
        self.err_path = tmp / "stderr.txt"
        self.notify_path = str(tmp / "notify.sock")
        self.notify = NotifySocket(self.notify_path)
        self.msgs = self.notify.msgs
        self.err = open(self.err_path, "w")  # noqa: SIM115
        argv = [STREAMTAP, "-i", iface or net.veth_a, "--workers", str(workers),
                "--sink", f"jsonl:{self.out}", "--control-socket", str(self.sock), *extra]
        e = dict(os.environ, NOTIFY_SOCKET=self.notify_path, WATCHDOG_USEC="2000000",
                 STATE_DIRECTORY=str(tmp / "state"))
        e.pop("JOURNAL_STREAM", None)
        e.update(env or {})
        self.proc = net.popen(net.ns_a, argv, env=e, stdout=subprocess.DEVNULL,
                              stderr=self.err)
        self.pid = self.proc.pid

    # -- sd_notify ---------------------------------------------------------------------------

    def pump(self, timeout: float = 0.0) -> None:
        time.sleep(timeout)

    def lines(self) -> list[str]:
        return [m for _p, m in self.msgs]

    def wait_msg(self, prefix: str, timeout: float = 10.0, after: int = 0) -> int:
        """Index of the first message starting with `prefix` at index >= after."""
        end = time.monotonic() + timeout
        while True:
            self.pump(0.05)
            for i, (_p, m) in enumerate(list(self.msgs)[after:], after):
                if m.startswith(prefix):
                    return i
            if time.monotonic() > end or self.proc.poll() is not None:
                raise AssertionError(f"no {prefix!r} in {self.lines()}; stderr: {self.stderr()}")

    # -- outputs ---------------------------------------------------------------------------

    def stderr(self) -> str:
        self.err.flush()
        return self.err_path.read_text()

    def records(self) -> list[dict]:
        if not self.out.exists():
            return []
        out = []
        for line in self.out.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def wait_records(self, n: int, timeout: float = 20.0) -> list[dict]:
        netns.wait_for(lambda: len(self.records()) >= n, timeout, every=0.2)
        return self.records()

    def status(self) -> dict:
        """GET /status over the control socket."""
        assert netns.wait_for(self.sock.exists, 5), self.stderr()

        class Conn(http.client.HTTPConnection):
            def connect(conn):  # noqa: N805
                conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.sock.settimeout(5)
                conn.sock.connect(str(self.sock))

        c = Conn("localhost")
        try:
            c.request("GET", "/status")
            r = c.getresponse()
            return json.loads(r.read()) if r.status == 200 else None
        finally:
            c.close()

    def descendants(self) -> list[int]:
        """Every process under the daemon: the forkserver, and the workers it forked."""
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as fh:
                        kids = [int(x) for x in fh.read().split()]
                    out.extend(kids)
                    todo.extend(kids)
        return sorted(out)

    def stop(self, timeout: float = 15.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.pump(0.1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.notify.close()
        self.err.close()


@pytest.fixture
def daemon(net, tmp_path):
    started: list[Daemon] = []

    def start(*extra: str, **kw) -> Daemon:
        d = Daemon(net, tmp_path, *extra, **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()


def sha(rec_side: dict) -> str:
    return hashlib.sha256(base64.b64decode(rec_side.get("payload") or "")).hexdigest()


def assert_exact(results: list[dict], records: list[dict]) -> None:
    """Every connection the client made is in the records exactly once, byte for byte."""
    for c in results:
        key = (c["ip"], c["port"])
        recs = [r for r in records if r["source"]["port"] == c["port"]
                and (":" in r["destination"]["ip"]) == (":" in c["ip"])]
        assert len(recs) == 1, (key, len(recs))
        r = recs[0]
        assert r["destination"]["port"] == 5000, key
        assert r["source"]["bytes"] == c["sent_len"], key
        assert r["destination"]["bytes"] == c["recv_len"], key
        assert sha(r["source"]) == c["sent"], key
        assert sha(r["destination"]) == c["recv"], key
        assert r["tcp"]["missed_bytes"] == 0, key


def mix(net, n: int, big: int = 0, seed: int = 7) -> list[tuple[str, int, int]]:
    rnd = random.Random(seed)
    conns = [(net.ip4_b if i % 2 else net.ip6_b, rnd.randint(8, 40_000), rnd.randint(0, 60_000))
             for i in range(n)]
    for i in range(big):
        conns.append((net.ip4_b if i % 2 else net.ip6_b, MIB, MIB - i * 1000))
    return conns


def assert_from_daemon_pid(d: Daemon) -> None:
    d.pump(0.1)
    assert d.msgs and all(pid == d.pid for pid, _m in d.msgs), d.msgs[:5]


# --------------------------------------------------------------------------- tests


def test_capture_ipv4_ipv6_exact_bytes_and_notify(daemon, net):
    d = daemon()
    ready = d.wait_msg("READY=1")
    # the first READY=1 brings a STATUS= in the same datagram: systemctl status shows it at once
    assert d.notify.ready_datagram() == f"READY=1\nSTATUS=capturing on {net.veth_a}, 1 worker"
    d.wait_msg("WATCHDOG=1", timeout=3)
    results = net.run_client(mix(net, 216, big=4), parallel=8, timeout=90)
    assert len(results) == 220 and sum(r["recv_len"] for r in results) > 4 * MIB
    records = d.wait_records(len(results))
    assert_exact(results, records)
    assert all(r["tcp"]["close_reason"] == "fin" for r in records)
    assert {r["network"]["type"] for r in records} == {"ipv4", "ipv6"}
    d.wait_msg("STATUS=", timeout=8, after=ready + 2)  # a periodic one, with rates
    st = d.status()
    assert st["packets"] > 0 and st["interface"] == net.veth_a
    assert d.stop() == 0
    lines = d.lines()
    assert lines.count("READY=1") == 1 and lines[-1] == "STOPPING=1"
    assert any("packets/s" in m for m in lines if m.startswith("STATUS="))
    assert_from_daemon_pid(d)
    assert len(d.records()) == len(results)  # nothing more, nothing twice


def test_sighup_spanning_stream_once_and_sigterm_flushes_open_one(daemon, net, tmp_path):
    conf = tmp_path / "conf.yaml"
    conf.write_text("capture:\n  filter: tcp\n")
    d = daemon("--config", str(conf))
    d.wait_msg("READY=1")
    spanning = net.client_popen([(net.ip4_b, 30_000, 50_000), (net.ip6_b, 200_000, 1000)],
                                hold=2.0)
    time.sleep(0.8)
    # a valid reload, with a changed filter, while both connections are open
    conf.write_text("capture:\n  filter: tcp port 5000\n")
    d.proc.send_signal(signal.SIGHUP)
    i = d.wait_msg("RELOADING=1")
    d.wait_msg("READY=1", after=i)
    out, _ = spanning.communicate(timeout=30)
    results = json.loads(out)
    records = d.wait_records(2)
    assert_exact(results, records)
    # an invalid config on SIGHUP: logged, the old one (and capture) keep going
    conf.write_text("capture:\n  snaplen: lots\n")
    n_msgs = len(d.lines())
    d.proc.send_signal(signal.SIGHUP)
    assert netns.wait_for(lambda: "keeping the running configuration" in d.stderr(), 5)
    assert not any(m.startswith("RELOADING") for m in d.lines()[n_msgs:])
    # a connection still open at SIGTERM: flushed with close_reason "shutdown"
    payload = (0).to_bytes(8, "big") + bytes(range(256)) * 400
    holder = net.python(net.ns_a, (
        "import socket, sys, time\n"
        f"s = socket.create_connection(({net.ip4_b!r}, 5000))\n"
        "s.sendall((0).to_bytes(8, 'big') + bytes(range(256)) * 400)\n"
        "print(s.getsockname()[1], flush=True)\n"
        "time.sleep(60)\n"), stdout=subprocess.PIPE, text=True)
    port = int(holder.stdout.readline())
    time.sleep(0.8)
    t0 = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - t0 < 10
    holder.kill()
    recs = [r for r in d.records() if r["source"]["port"] == port]
    assert len(recs) == 1
    assert recs[0]["tcp"]["close_reason"] == "shutdown"
    assert base64.b64decode(recs[0]["source"]["payload"]) == payload
    assert len(d.records()) == 3
    lines = d.lines()
    assert lines[-1] == "STOPPING=1"
    assert_from_daemon_pid(d)


def test_two_workers_survive_kill_9(daemon, net):
    d = daemon(workers=2)
    d.wait_msg("READY=1")
    kids = [w["pid"] for w in d.status()["workers"]]
    assert len(kids) == 2, kids
    before = net.run_client(mix(net, 20, seed=1), parallel=4)
    d.wait_records(len(before))
    os.kill(kids[1], signal.SIGKILL)
    assert netns.wait_for(lambda: d.stderr().count("worker 1 capturing on") >= 2, 10), d.stderr()
    new_kids = [w["pid"] for w in d.status()["workers"]]
    assert kids[0] == new_kids[0] and new_kids[1] != kids[1]
    assert set(new_kids) <= set(d.descendants()) and kids[1] not in d.descendants()
    time.sleep(0.3)
    after = net.run_client(mix(net, 40, seed=2), parallel=4)
    records = d.wait_records(len(before) + len(after))
    assert_exact(before + after, records)
    st = d.status()
    assert st["worker_restarts"] == 1
    assert all(w["alive"] for w in st["workers"])
    assert "restarting worker 1 (restart #1)" in d.stderr()
    assert d.stop() == 0
    assert_from_daemon_pid(d)
    assert d.lines().count("READY=1") == 1


def ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


def test_worker_respawned_while_sinks_and_control_are_busy_captures(daemon, net):
    """Fork safety: while the sink runner writes and the control server answers (threads of the
    supervisor), a worker killed and respawned comes up and captures. Workers are forked by the
    forkserver, never by the supervisor: their parent is the forkserver, the daemon's child."""
    d = daemon(workers=2)
    d.wait_msg("READY=1")
    kids = [w["pid"] for w in d.status()["workers"]]
    server = {ppid(k) for k in kids}
    assert len(server) == 1 and d.pid not in server and ppid(server.pop()) == d.pid
    stop, answered = threading.Event(), [0]

    def hammer() -> None:  # keep the control server's thread busy
        while not stop.is_set():
            assert d.status() is not None
            answered[0] += 1

    pollers = [threading.Thread(target=hammer, daemon=True) for _ in range(2)]
    for t in pollers:
        t.start()
    busy = net.client_popen(mix(net, 80, big=2, seed=3), parallel=4)  # keep the sink busy
    try:
        time.sleep(0.5)
        os.kill(kids[1], signal.SIGKILL)
        assert netns.wait_for(lambda: d.stderr().count("worker 1 capturing on") >= 2, 10), \
            d.stderr()
        busy.communicate(timeout=60)
    finally:
        stop.set()
        for t in pollers:
            t.join(10)
    assert answered[0] > 10
    st = d.status()
    new = st["workers"][1]["pid"]
    assert new != kids[1] and ppid(new) == ppid(kids[0])  # from the same forkserver
    base = st["workers"][1]["received"]
    after = net.run_client(mix(net, 30, seed=4), parallel=4)
    ports = {c["port"] for c in after}
    netns.wait_for(lambda: ports <= {r["source"]["port"] for r in d.records()}, 20, every=0.2)
    assert_exact(after, d.records())
    assert netns.wait_for(lambda: d.status()["workers"][1]["received"] > base, 5)
    assert d.status()["worker_restarts"] == 1
    assert d.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_missing_interface_exits_1(daemon, workers):
    d = daemon(workers=workers, iface="nosuchdev0")
    assert d.proc.wait(15) == 1
    assert "nosuchdev0" in d.stderr()
    assert "READY=1" not in d.lines()


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_filter_exits_2(daemon, workers):
    d = daemon("tcp", "port", "nonsense", workers=workers)
    assert d.proc.wait(15) == 2
    assert "filter" in d.stderr().lower()
    assert "READY=1" not in d.lines()
