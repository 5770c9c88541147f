"""Worker and worker_process on a real veth pair in network namespaces (root only)."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import sys
import time
from pathlib import Path

import pytest

from streamtap import config
from streamtap.process.capture import CaptureOpenError
from streamtap.process.messages import (
    Eof,
    Failed,
    Ready,
    Reload,
    Reloaded,
    ReloadFailed,
    Stats,
    Stop,
    Stopped,
    Streams,
)
from streamtap.process.worker import Worker, worker_process

sys.path.insert(0, str(Path(__file__).parent))
import netns  # noqa: E402

pytestmark = pytest.mark.requires(netns.available())

FAST = {"reassembly.timeouts.fin_linger": "0.2s", "capture.buffer_size": "16MiB"}


def _cfg(**over):
    return config.loads("", overrides={**FAST, **over})


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def net():
    with netns.VethPair() as n:
        yield n


def _worker(net, cfg, **kw) -> Worker:
    w = Worker(0, cfg, interface=net.veth_b, fanout=False, **kw)
    with net.inside(net.ns_b):
        w.start()
    return w


def _run_until(w: Worker, pred, timeout: float) -> list:
    out: list = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out.extend(w.step(0.1))
        if pred(out):
            break
    return out


def test_worker_streams_exact_ipv4_ipv6(net):
    w = _worker(net, _cfg())
    try:
        net.start_server()
        sizes = [(100, 1 << 20), (1 << 20, 10), (300_000, 700_000), (8, 0), (5000, 123_457)]
        conns = [(net.ip4_b if i % 2 else net.ip6_b, *sizes[i % len(sizes)]) for i in range(54)]
        client = net.client_popen(conns, parallel=6)
        streams = _run_until(w, lambda out: client.poll() is not None and len(out) >= 54, 40)
        import json

        res = json.loads(client.stdout.read())
        by_port = {s.client[1]: s for s in streams}
        assert len(res) == 54 and len(by_port) == 54, (len(res), len(by_port))
        for r in res:
            s = by_port[r["port"]]
            assert s.ip_version == (6 if ":" in r["ip"] else 4)
            assert s.close_reason == "fin"
            assert (len(s.client_data), len(s.server_data)) == (r["sent_len"], r["recv_len"])
            assert _sha(s.client_data) == r["sent"] and _sha(s.server_data) == r["recv"]
            assert not s.gaps
        st = w.stats()
        assert st["kernel_drops"] == 0 and st["received"] >= st["packets"] > 54 * 5
        assert st["streams"].get("fin") == 54 and st["flows_active"] == 0
        assert set(st) >= {"index", "pid", "interface_drops", "malformed", "missed_bytes",
                           "gaps", "last_progress"}
    finally:
        w.stop()


def test_idle_stream_times_out_by_wall_clock(net):
    w = _worker(net, _cfg(**{"reassembly.timeouts.established": "2s"}))
    try:
        net.start_server()
        client = net.client_popen([(net.ip4_b, 4000, 10)], hold=30, parallel=1)
        got = _run_until(w, lambda out: w.reassembler.stats["flows_active"] == 1, 5)
        assert got == []
        t0 = time.monotonic()
        out = _run_until(w, lambda out: bool(out), 6)  # no packets on the link meanwhile
        waited = time.monotonic() - t0
        client.kill()
        assert len(out) == 1 and out[0].close_reason == "timeout"
        assert len(out[0].client_data) == 4000 and out[0].server_data == b""
        assert 1.0 < waited < 4.5, waited
    finally:
        w.stop()


def test_stop_flushes_open_connection_as_shutdown(net):
    w = _worker(net, _cfg())
    try:
        net.start_server()
        client = net.client_popen([(net.ip6_b, 2500, 10)], hold=30, parallel=1)
        _run_until(w, lambda out: w.reassembler.stats["flows_active"] == 1
                   and w.reassembler.packets >= 4, 5)
        time.sleep(0.2)
        _run_until(w, lambda out: False, 0.2)
    finally:
        out = w.stop()
    client.kill()
    assert len(out) == 1 and out[0].close_reason == "shutdown"
    assert len(out[0].client_data) == 2500
    assert w.handle is None
    assert w.stats()["received"] >= 4  # final pcap stats kept after close


def test_reload_applies_new_filter_and_limits(net):
    w = _worker(net, _cfg(**{"capture.filter": "tcp and ip6"}))
    try:
        net.start_server()
        r = net.run_client([(net.ip4_b, 100, 100)])
        assert _run_until(w, lambda out: False, 0.6) == []
        new = _cfg(**{"capture.filter": "tcp and ip", "reassembly.timeouts.established": "7s",
                      "reassembly.limits.depth": "1KiB"})
        w.reload(new)
        assert w.reassembler.table.timeouts[1] == 7.0 and w.reassembler.table.depth == 1024
        r = net.run_client([(net.ip4_b, 5000, 100), (net.ip6_b, 100, 100)])
        out = _run_until(w, lambda out: len(out) >= 1, 5)
        out += _run_until(w, lambda out: False, 0.5)
        assert [s.client[1] for s in out] == [r[0]["port"]]
        assert len(out[0].client_data) == 1024 and out[0].truncated  # new depth applied
        with pytest.raises(CaptureOpenError) as e:
            w.reload(_cfg(**{"capture.filter": "tcp and and"}))
        assert e.value.exit_code == 2
        assert w.cfg is new  # a failed reload changes nothing
    finally:
        w.stop()


def test_reload_keeps_open_streams(net):
    w = _worker(net, _cfg())
    try:
        net.start_server()
        client = net.client_popen([(net.ip4_b, 3000, 10)], hold=1.5, parallel=1)
        _run_until(w, lambda out: w.reassembler.stats["flows_active"] == 1, 5)
        w.reload(_cfg(**{"reassembly.timeouts.established": "20s"}))
        out = _run_until(w, lambda out: bool(out), 6)
        client.wait(5)
        assert len(out) == 1 and out[0].close_reason == "fin"
        assert len(out[0].client_data) == 3000 and out[0].server_data.__len__() == 10
    finally:
        w.stop()


def _recv(conn, kind: type, timeout: float = 5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if conn.poll(0.05):
            msg = conn.recv()
            if isinstance(msg, kind):
                return msg
            if isinstance(msg, Failed):
                raise AssertionError(msg)
    raise AssertionError(f"no {kind.__name__} within {timeout}s")


def test_worker_process_protocol(net):
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    q = ctx.Queue(maxsize=16)
    with net.inside(net.ns_b):  # the child inherits the namespace
        p = ctx.Process(target=worker_process,
                        args=(3, _cfg(), net.veth_b, True, child, q))
        p.start()
    try:
        ready = _recv(parent, Ready)
        assert ready == Ready(3, p.pid)
        stats = _recv(parent, Stats).stats
        assert stats["index"] == 3 and stats["pid"] == p.pid
        net.start_server()
        res = net.run_client([(net.ip4_b, 70_000, 90_000), (net.ip6_b, 10, 20)])
        streams = []
        end = time.monotonic() + 5
        while len(streams) < 2 and time.monotonic() < end:
            try:
                item = q.get(timeout=0.2)
            except Exception:
                continue
            assert isinstance(item, Streams) and item.index == 3
            streams.extend(item.streams)
        by_port = {s.client[1]: s for s in streams}
        for r in res:
            assert _sha(by_port[r["port"]].client_data) == r["sent"]
            assert _sha(by_port[r["port"]].server_data) == r["recv"]
        # an open connection comes back as "shutdown" after stop
        client = net.client_popen([(net.ip4_b, 500, 10)], hold=30, parallel=1)
        time.sleep(0.5)
        parent.send(Reload(_cfg(**{"capture.filter": "tcp"})))
        assert _recv(parent, Reloaded) == Reloaded(3)
        parent.send(Reload(_cfg(**{"capture.filter": "tcp and and"})))
        failed = _recv(parent, ReloadFailed)
        assert failed.index == 3 and "syntax error" in failed.message
        parent.send(Stop())
        assert _recv(parent, Stopped) == Stopped(3)
        final = []
        while True:
            item = q.get(timeout=5)
            if isinstance(item, Eof):
                assert item == Eof(3)
                break
            final.extend(item.streams)
        client.kill()
        assert [s.close_reason for s in final] == ["shutdown"]
        assert len(final[0].client_data) == 500
        p.join(5)
        assert p.exitcode == 0
    finally:
        if p.is_alive():
            p.kill()
            p.join()


def test_worker_process_open_error_exit_code():
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    q = ctx.Queue(maxsize=4)
    p = ctx.Process(target=worker_process, args=(0, _cfg(), "nosuch0", False, child, q))
    p.start()
    p.join(10)
    assert p.exitcode == 1
    msg = parent.recv()
    assert isinstance(msg, Failed) and msg.exit_code == 1 and "nosuch0" in msg.message


def test_worker_process_count_stops_by_itself(net):
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    q = ctx.Queue(maxsize=16)
    with net.inside(net.ns_b):
        p = ctx.Process(target=worker_process,
                        args=(0, _cfg(**{"capture.filter": "tcp"}), net.veth_b, False, child, q),
                        kwargs={"count": 5})
        p.start()
    try:
        _recv(parent, Ready)
        net.start_server()
        net.run_client([(net.ip4_b, 1000, 1000)])
        assert _recv(parent, Stopped) == Stopped(0)
        items = [q.get(timeout=5)]
        while not isinstance(items[-1], Eof):
            items.append(q.get(timeout=5))
        p.join(5)
        assert p.exitcode == 0
        streams = [s for it in items if isinstance(it, Streams) for s in it.streams]
        assert sum(s.client_packets + s.server_packets for s in streams) == 5
    finally:
        if p.is_alive():
            p.kill()
            p.join()


def test_worker_process_interface_lost_flushes_and_exits_3(net):
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    q = ctx.Queue(maxsize=16)
    with net.inside(net.ns_b):
        p = ctx.Process(target=worker_process, args=(1, _cfg(), net.veth_b, False, child, q))
        p.start()
    try:
        _recv(parent, Ready)
        net.start_server()
        client = net.client_popen([(net.ip4_b, 700, 10)], hold=30, parallel=1)
        time.sleep(0.5)
        net.run(net.ns_b, ["ip", "link", "del", net.veth_b])
        client.kill()
        end = time.monotonic() + 5
        msg = None
        while time.monotonic() < end and parent.poll(0.1):
            msg = parent.recv()
            if isinstance(msg, Failed):
                break
        assert isinstance(msg, Failed) and msg.exit_code == 3, msg
        assert "went down" in msg.message or "capture failed" in msg.message
        items = [q.get(timeout=5)]
        while not isinstance(items[-1], Eof):
            items.append(q.get(timeout=5))
        streams = [s for it in items if isinstance(it, Streams) for s in it.streams]
        assert [(s.close_reason, len(s.client_data)) for s in streams] == [("shutdown", 700)]
        p.join(5)
        assert p.exitcode == 3
    finally:
        if p.is_alive():
            p.kill()
            p.join()
