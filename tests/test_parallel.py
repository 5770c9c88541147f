"""Parallel offline reads (README "Command line": --workers for -r): shard k of N per worker
process, the same records for any N, a deterministic order for a given N."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pcapy
import pytest
from pcapbuild import (
    ETHERTYPE_QINQ,
    IPPROTO_HOPOPTS,
    IPPROTO_TCP,
    IPPROTO_UDP,
    LINKTYPE_ETHERNET,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_RAW,
    Conversation,
    eth,
    ipv4,
    ipv6,
    ipv6_ext,
    write_pcap,
)

import streamtap.config as cfgmod
from streamtap.engine.decode import Decoder
from streamtap.engine.pcapfmt import META
from streamtap.engine.pipeline import Pipeline
from streamtap.engine.reader import Sources, shard_filter, shard_of
from streamtap.engine.stream import to_json
from streamtap.process.offline import plan, run_parallel

STREAMTAP = Path(sys.executable).parent / "streamtap"
T0 = 1_700_000_000.0


def _conv(i: int, v6: bool = False, **kw) -> Conversation:
    if v6:
        client, server = (f"2001:db8::{i + 1:x}", 40000 + i), (f"2001:db8:1::{i % 3 + 1:x}", 443)
    else:
        client, server = (f"10.0.{i // 200}.{i % 200 + 1}", 40000 + i), ("192.0.2.80", 80)
    return Conversation(client, server, t0=T0 + i * 0.0137, **kw)


def _talk(c: Conversation, i: int) -> Conversation:
    c.handshake()
    c.send("client", b"GET /%d HTTP/1.1\r\n\r\n" % i)
    c.send("server", bytes(range(256)) * (3 + i % 5))
    return c.close()


def _gre(frame_ip: bytes) -> bytes:
    """A raw-IP frame wrapped in Ethernet + outer IPv4 + GRE (RFC 2784, no options)."""
    return eth() + ipv4("198.18.0.1", "198.18.0.2", b"\x00\x00\x08\x00" + frame_ip, proto=47)


def _hop_by_hop(frame_ip: bytes) -> bytes:
    """A raw IPv6 frame with a hop-by-hop options header inserted before TCP."""
    src = _ntop6(frame_ip[8:24])
    dst = _ntop6(frame_ip[24:40])
    return eth(ethertype=0x86DD) + ipv6(src, dst, ipv6_ext(IPPROTO_TCP) + frame_ip[40:],
                                        next_header=IPPROTO_HOPOPTS)


def _ntop6(b: bytes) -> str:
    import ipaddress

    return str(ipaddress.IPv6Address(b))


def _complement_capture(path: Path) -> int:
    """Ethernet: plain IPv4/IPv6 connections and the kinds the shard filters cannot place:
    connections whose data segments are IP fragments (handshake and ACKs are not), 802.1Q
    tags on one direction only, QinQ, GRE, IPv6 hop-by-hop headers on some packets, UDP
    noise; one connection idle past its timeout before the capture ends, one left open."""
    packets: list[tuple[float, bytes]] = []
    n = 0
    for i in range(12):
        packets += _talk(_conv(n, v6=i % 2 == 1), n).packets
        n += 1
    for i in range(6):  # fragmented data, plain handshake
        c = _conv(n, v6=i % 2 == 1)
        c.handshake()
        c.fragment_size = 64 + 8 * i
        c.send("client", b"x" * 300 + bytes([i]))
        c.fragment_size = 0
        c.send("server", b"ok" * 40)
        packets += c.close().packets
        n += 1
    for i in range(4):  # one direction tagged
        c = _conv(n)
        c.handshake()
        c.vlans = (100 + i,)
        c.send("client", b"tagged %d" % i)
        c.vlans = ()
        c.send("server", b"untagged %d" % i)
        packets += c.close().packets
        n += 1
    for i in range(3):  # QinQ throughout
        packets += _talk(_conv(n, v6=i == 1, vlans=((ETHERTYPE_QINQ, 10 + i), 20)), n).packets
        n += 1
    for _ in range(4):  # GRE
        c = _talk(_conv(n, linktype=LINKTYPE_RAW), n)
        packets += [(ts, _gre(f)) for ts, f in c.packets]
        n += 1
    for _ in range(3):  # IPv6 hop-by-hop on every other packet
        c = _talk(_conv(n, v6=True, linktype=LINKTYPE_RAW), n)
        packets += [(ts, _hop_by_hop(f) if j % 2 else eth(ethertype=0x86DD) + f)
                    for j, (ts, f) in enumerate(c.packets)]
        n += 1
    idle = _conv(n)  # data, then silence past the established timeout (600 s)
    idle.handshake().send("client", b"then silence")
    packets += idle.packets
    n += 1
    late = _conv(n, v6=True)
    late.wait(700)
    packets += late.handshake().send("client", b"still open at the end").packets
    n += 1
    for i in range(5):  # UDP noise
        packets.append((T0 + i * 0.05, eth() + ipv4("10.9.9.9", "10.9.9.10",
                                                    bytes(8) + b"dns?", proto=IPPROTO_UDP)))
    packets.sort(key=lambda p: p[0])  # stable: each connection keeps its order
    write_pcap(path, packets, LINKTYPE_ETHERNET)
    return n


def _cli(args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(STREAMTAP), *args], capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _records(pcap: Path, workers: int, out: Path, *extra: str) -> tuple[list[str], str]:
    if out.exists():
        out.unlink()
    proc = _cli(["-r", str(pcap), "--workers", str(workers), "--sink", f"jsonl:{out}", *extra])
    summary = proc.stderr.strip().splitlines()[-1]
    return out.read_text().splitlines(), summary.split(" in ")[0] + summary.split(" s,", 1)[1]


@pytest.fixture(scope="module")
def complement_pcap(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    path = tmp_path_factory.mktemp("parallel") / "complement.pcap"
    return path, _complement_capture(path)


def test_shard_filter_agrees_with_shard_of(complement_pcap: tuple[Path, int]):
    """Every packet libpcap puts in shard k has a decoded tuple whose Python sum says k, and
    the shards are disjoint."""
    path, _ = complement_pcap
    for n in (2, 3):
        seen: list[bytes] = []
        for k in range(n):
            rd = pcapy.open_offline(str(path))
            rd.setfilter(shard_filter(n, k))
            dec = Decoder(rd.datalink())
            got = 0
            while True:
                data, meta = rd.next_batch(4096)
                if not meta:
                    break
                for sec, usec, off, caplen in META.iter_unpack(meta):
                    seg = dec.decode(data, off, off + caplen, sec + usec * 1e-6)
                    assert seg is not None
                    assert shard_of(seg[1], seg[2], seg[3], seg[4], n) == k
                    seen.append(data[off:off + caplen])
                    got += 1
            assert got > 10
        assert len(seen) == len(set(seen))


@pytest.mark.parametrize("workers", [2, 3])
def test_same_records_for_any_n_on_the_complement_kinds(complement_pcap, tmp_path, workers):
    path, conns = complement_pcap
    one, summary1 = _records(path, 1, tmp_path / "one.jsonl")
    many, summary = _records(path, workers, tmp_path / "many.jsonl")
    assert len(one) == conns
    assert sorted(one) == sorted(many)
    assert summary == summary1  # packets, streams by reason, gaps, malformed: counted once
    reasons = {json.loads(r)["tcp"]["close_reason"] for r in many}
    assert {"fin", "timeout", "shutdown"} <= reasons


def test_order_is_deterministic_for_a_given_n(complement_pcap, tmp_path):
    path, _ = complement_pcap
    a, _ = _records(path, 2, tmp_path / "a.jsonl")
    b, _ = _records(path, 2, tmp_path / "b.jsonl")
    assert a == b


@pytest.mark.parametrize("linktype", [LINKTYPE_LINUX_SLL, LINKTYPE_RAW])
def test_other_link_types(tmp_path, linktype):
    packets = []
    for i in range(10):
        packets += _talk(_conv(i, v6=i % 3 == 0, linktype=linktype), i).packets
    packets.sort(key=lambda p: p[0])
    pcap = tmp_path / "x.pcap"
    write_pcap(pcap, packets, linktype)
    assert plan([str(pcap)], None, 2) == 2
    one, _ = _records(pcap, 1, tmp_path / "one.jsonl")
    two, _ = _records(pcap, 2, tmp_path / "two.jsonl")
    assert len(one) == 10 and sorted(one) == sorted(two)


def test_user_filter_combines_with_the_shards(complement_pcap, tmp_path):
    path, _ = complement_pcap
    one, _ = _records(path, 1, tmp_path / "one.jsonl", "tcp", "port", "80")
    two, _ = _records(path, 2, tmp_path / "two.jsonl", "tcp", "port", "80")
    assert len(one) > 0 and sorted(one) == sorted(two)
    bad = _cli(["-r", str(path), "--workers", "2", "tcp", "port", "eighty"], check=False)
    assert bad.returncode == 2 and "bad filter expression" in bad.stderr


def test_single_worker_cases(complement_pcap, tmp_path):
    path, _ = complement_pcap
    p = str(path)
    assert plan([p], None, 2) == 2
    assert plan([p], None, 1) == 1
    assert plan(["-"], None, 4) == 1          # stdin
    assert plan([p, p], None, 4) == 1         # a merge of several files
    assert plan([p], None, 4, count=10) == 1  # -c COUNT: the first packets in file order


def test_corpus_same_records_for_n_1_2_3(corpus_dir: Path):
    """Every corpus capture: the records of 2 and 3 shard workers are those of one worker,
    and so is the error of a damaged file. Parts by time are off, and a capture whose time goes
    backwards may differ: a shard's clock advances on its own packets (README)."""
    cfg = cfgmod.load(None, {"reassembly": {"part_interval": 0}})
    captures = sorted(q for q in (corpus_dir / "pcaps").rglob("*")
                      if q.suffix in (".pcap", ".pcapng", ".cap") and q.is_file())
    assert len(captures) > 100
    sharded = unordered = 0
    for cap in captures:
        one: list[str] = []
        err1 = None
        pipe = Pipeline(str(cap), cfg)
        try:
            for batch in pipe.batches():
                one += [to_json(s) for s in batch]
        except Exception as e:  # noqa: BLE001 - compared with the sharded run's error
            err1 = str(e)
        for n in (2, 3):
            try:
                if plan([str(cap)], None, n) == 1:
                    continue
            except Exception as e:  # noqa: BLE001
                assert str(e) == err1 or err1 is not None, cap
                continue
            many: list[str] = []
            _, err = run_parallel(str(cap), cfg, None, n,
                                  lambda b, acc=many: acc.extend(to_json(s) for s in b))
            if sorted(many) != sorted(one):
                # README: where time goes backwards, a shard's clock is not the file's
                assert not _monotonic(cap), (cap, n)
                unordered += 1
            assert err == err1, cap
            sharded += 1
    assert sharded > 150
    assert unordered <= 6  # kday3, kday4, kday7 with 3 workers


def _monotonic(cap: Path) -> bool:
    last = (0, 0)
    try:
        for _lt, _data, meta in Sources([str(cap)]):
            for sec, usec, _, _ in META.iter_unpack(meta):
                if (sec, usec) < last:
                    return False
                last = (sec, usec)
    except Exception:  # noqa: BLE001 - damage: what was read before it was in order
        pass
    return True


def test_pcap_and_files_sinks_get_the_same_output(complement_pcap, tmp_path):
    """The sinks that need every packet (pcap) or per-direction files see the same streams:
    fragments' frames travel with the stream in whichever shard keeps it."""
    path, _ = complement_pcap
    out = {}
    for n in (1, 2):
        pcaps, files = tmp_path / f"pcap{n}", tmp_path / f"files{n}"
        _cli(["-q", "-r", str(path), "--workers", str(n), "--sink", f"pcap:{pcaps}",
              "--sink", f"files:{files}"])
        out[n] = (
            {str(p.relative_to(pcaps)): p.read_bytes() for p in pcaps.rglob("*") if p.is_file()},
            {p.name: p.read_bytes() for p in files.iterdir() if p.name != "streams.jsonl"},
        )
    assert len(out[1][0]) > 20 and len(out[1][1]) > 20
    assert out[1] == out[2]


def test_damaged_file_same_records_and_error(complement_pcap, tmp_path):
    path, _ = complement_pcap
    cut = tmp_path / "cut.pcap"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    res = {}
    for n in (1, 2, 3):
        out = tmp_path / f"cut{n}.jsonl"
        proc = _cli(["-q", "-r", str(cut), "--workers", str(n), "--sink", f"jsonl:{out}"],
                    check=False)
        assert proc.returncode == 1
        res[n] = (sorted(out.read_text().splitlines()), proc.stderr)
    assert "truncated" in res[1][1] and len(res[1][0]) > 10
    assert res[1] == res[2] == res[3]


def test_reader_leaving_early_is_not_an_error(complement_pcap):
    path, _ = complement_pcap
    proc = subprocess.run(f"{STREAMTAP} -q -r {path} --workers 2 | head -c 100",
                          shell=True, capture_output=True, text=True, timeout=60)
    assert len(proc.stdout) == 100
    assert "Traceback" not in proc.stderr and proc.stderr == ""


@pytest.mark.parametrize("in_memory", [0, 16 << 20])
def test_payload_channel_reuse(complement_pcap, monkeypatch, in_memory):
    """Payloads travel through a memfd the worker starts over once the parent has read it:
    with a tiny reuse size every batch waits for the acknowledgements, and nothing is lost.
    The complement comes from the parent's one read, or (over the limit) from a second
    handle in each worker."""
    import streamtap.process.offline as offline

    path, conns = complement_pcap
    cfg = cfgmod.default()
    one = [to_json(s) for b in Pipeline(str(path), cfg).batches() for s in b]
    monkeypatch.setattr(offline, "SHM_REUSE", 100)
    monkeypatch.setattr(offline, "COMPLEMENT_IN_MEMORY", in_memory)
    many: list[str] = []
    stats, err = run_parallel(str(path), cfg, None, 2,
                              lambda b: many.extend(to_json(s) for s in b))
    assert err is None and len(one) == conns
    assert sorted(many) == sorted(one)
    assert sum(stats["streams"].values()) == conns


def test_forkserver_when_a_thread_runs(complement_pcap):
    """With a thread running, fork is unsafe: the workers come from a forkserver, get their
    arguments pickled and send payloads through the pipe. Same records."""
    import threading

    path, conns = complement_pcap
    cfg = cfgmod.default()
    one = [to_json(s) for b in Pipeline(str(path), cfg).batches() for s in b]
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        many: list[str] = []
        _, err = run_parallel(str(path), cfg, None, 2,
                              lambda b: many.extend(to_json(s) for s in b))
    finally:
        stop.set()
        thread.join()
    assert err is None and len(many) == conns
    assert sorted(many) == sorted(one)
