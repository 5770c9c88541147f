"""LiveHandle on a real veth pair in network namespaces (root only)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamtap.engine.api import Reassembler
from streamtap.process.capture import CaptureOpenError, LiveHandle, fanout_group_id

sys.path.insert(0, str(Path(__file__).parent))
import netns  # noqa: E402
import require  # noqa: E402

pytestmark = pytest.mark.requires(netns.available())


@pytest.fixture
def net():
    with netns.VethPair() as n:
        yield n


def _open(net, ns=None, **kw) -> LiveHandle:
    args = dict(snaplen=262144, buffer_size=4 << 20, promiscuous=True, bpf=None,
                fanout_group=None)
    args.update(kw)
    with net.inside(ns or net.ns_b):
        return LiveHandle(net.veth_b, **args)


def _collect(h: LiveHandle, idle: float = 0.3) -> list[tuple[bytes, bytes]]:
    out = []
    while h.wait(idle):
        out.extend(h.drain())
    return out


def _ports(batches, linktype=1) -> set[int]:
    r = Reassembler()
    for data, meta in batches:
        r.feed_batch(linktype, data, meta)
    return {s.client[1] for s in r.flush()}


def test_idle_wait_returns_and_traffic_is_captured(net):
    # "tcp": a fresh veth still carries IPv6 neighbour discovery and MLD reports, so only a
    # filtered handle sees a truly idle link
    h = _open(net, bpf="tcp")
    try:
        assert h.linktype == 1
        t = time.monotonic()
        assert h.wait(0.2) is False
        assert 0.15 < time.monotonic() - t < 1.0  # no hang on an idle link
        assert list(h.drain()) == []  # nonblocking empty read returns at once
        net.start_server()
        res = net.run_client([(net.ip4_b, 3000, 5000), (net.ip6_b, 100, 70000)])
        batches = _collect(h)
        npk = sum(len(m) // 16 for _, m in batches)
        assert npk >= 10
        assert _ports(batches) == {r["port"] for r in res}
        recv, drop, ifdrop = h.stats()
        assert recv >= npk and drop == 0
    finally:
        h.close()


def test_bpf_filter_applies_and_can_change(net):
    h = _open(net, bpf="tcp and ip6")
    try:
        net.start_server()
        r4 = net.run_client([(net.ip4_b, 1000, 1000)])
        assert _ports(_collect(h)) == set()
        r6 = net.run_client([(net.ip6_b, 1000, 1000)])
        assert _ports(_collect(h)) == {r6[0]["port"]}
        h.set_filter("tcp and ip")
        r4 = net.run_client([(net.ip4_b, 1000, 1000)])
        net.run_client([(net.ip6_b, 1000, 1000)])
        assert _ports(_collect(h)) == {r4[0]["port"]}
        h.set_filter(None)  # everything again
        r = net.run_client([(net.ip4_b, 10, 10), (net.ip6_b, 10, 10)])
        assert _ports(_collect(h)) == {x["port"] for x in r}
    finally:
        h.close()


def test_bad_bpf_is_exit_code_2_with_libpcap_text():
    with pytest.raises(CaptureOpenError) as e:
        LiveHandle("lo", snaplen=96, buffer_size=0, promiscuous=False, bpf="tcp and and",
                   fanout_group=None)
    assert e.value.exit_code == 2
    assert "syntax error" in str(e.value) and "tcp and and" in str(e.value)
    h = LiveHandle("lo", snaplen=96, buffer_size=0, promiscuous=False, bpf="tcp",
                   fanout_group=None)
    try:
        with pytest.raises(CaptureOpenError) as e:
            h.set_filter("port 99999999")
        assert e.value.exit_code == 2 and "port" in str(e.value)
    finally:
        h.close()


def test_missing_interface_is_exit_code_1_naming_it():
    with pytest.raises(CaptureOpenError) as e:
        LiveHandle("nosuch0", snaplen=96, buffer_size=0, promiscuous=False, bpf=None,
                   fanout_group=None)
    assert e.value.exit_code == 1
    assert "nosuch0" in str(e.value) and "no such device" in str(e.value)


def test_no_permission_is_exit_code_1_and_says_how_to_grant():
    code = (
        "from streamtap.process.capture import LiveHandle, CaptureOpenError\n"
        "try:\n"
        "    LiveHandle('lo', snaplen=96, buffer_size=0, promiscuous=False, bpf=None,"
        " fanout_group=None)\n"
        "except CaptureOpenError as e:\n"
        "    print(e.exit_code, e)\n"
    )
    p = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
         "--bounding-set=-all", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=30,
    )
    if p.returncode != 0 and "setpriv" in p.stderr:
        require.need(f"setpriv failed: {p.stderr.strip()}")
    assert p.stdout.startswith("1 "), p.stdout + p.stderr
    assert "permission denied" in p.stdout and "CAP_NET_RAW" in p.stdout
    assert "setcap" in p.stdout


def test_fanout_splits_connections_without_sharing_one(net):
    g = fanout_group_id(net.veth_b)
    h1 = _open(net, fanout_group=g)
    h2 = _open(net, fanout_group=g)
    try:
        net.start_server()
        res = net.run_client([(net.ip4_b if i % 2 else net.ip6_b, 2000, 3000)
                              for i in range(40)], parallel=8)
        b1, b2 = [], []
        while h1.wait(0.3) | h2.wait(0.05):
            b1.extend(h1.drain())
            b2.extend(h2.drain())
        p1, p2 = _ports(b1), _ports(b2)
        assert not p1 & p2, "a connection's packets landed on both handles"
        assert p1 | p2 == {r["port"] for r in res}
        assert p1 and p2, (len(p1), len(p2))
    finally:
        h1.close()
        h2.close()


def test_fanout_group_id_stable_and_distinct():
    assert fanout_group_id("eth0") == fanout_group_id("eth0")
    assert fanout_group_id("eth0") != fanout_group_id("eth1")
    assert 0 <= fanout_group_id("enp3s0f1") <= 0xFFFF
    # stable across processes (no hash randomisation)
    out = subprocess.run(
        [sys.executable, "-c", "from streamtap.process.capture import fanout_group_id as f;"
         "print(f('eth0'))"], capture_output=True, text=True, check=True,
    ).stdout
    assert int(out) == fanout_group_id("eth0")
