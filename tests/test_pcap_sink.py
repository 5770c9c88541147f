"""The pcap sink: files tshark reads, the same streams back, true wire lengths, link types,
safe names, rotation, the LRU cap on open files, rollback on write errors (STYLE D3 + D4)."""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import require
from pcapbuild import LINKTYPE_RAW, Conversation, PcapWriter
from sinkrun import write_batches

import streamtap
from streamtap import config as cfgmod
from streamtap.sinks import pcap as pcapmod
from streamtap.sinks.base import FATAL, OK, RETRY
from streamtap.sinks.pcap import (
    PCAP_MAGIC_NS,
    PCAP_MAGIC_US,
    PcapSink,
    check_template,
    linktype_of,
)

TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.requires(require.tool("tshark"))

KEEP = cfgmod.loads("reassembly: {keep_packets: true}")


def read_pcap(path: Path) -> tuple[int, int, list[tuple[int, int, int, int, bytes]]]:
    """(magic, linktype, [(sec, frac, incl_len, orig_len, data)]): a reader independent of
    the sink's writer (little-endian only, which is what the sink writes)."""
    raw = Path(path).read_bytes()
    magic, major, minor, _z, _sf, _snap, lt = struct.unpack_from("<IHHiIII", raw)
    assert (major, minor) == (2, 4)
    out, off = [], 24
    while off < len(raw):
        sec, frac, incl, orig = struct.unpack_from("<IIII", raw, off)
        off += 16
        out.append((sec, frac, incl, orig, raw[off:off + incl]))
        off += incl
    assert off == len(raw), "trailing garbage"
    return magic, lt, out


def tshark_count(path: Path) -> int:
    assert TSHARK is not None
    p = subprocess.run([TSHARK, "-r", str(path), "-T", "fields", "-e", "tcp.stream"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return len(p.stdout.splitlines())


def streams_of(tmp_path: Path, *convs: Conversation, name: str = "in.pcap") -> list:
    """Write the conversations to one capture, reassemble it keeping packets."""
    packets = sorted((p for c in convs for p in c.packets), key=lambda p: p[0])
    path = tmp_path / name
    with PcapWriter(path, convs[0].linktype) as w:
        for ts, frame in packets:
            w.write(ts, frame)
    return list(streamtap.reassemble(path, config=KEEP))


def conv(client=("10.0.0.1", 40000), server=("10.0.0.2", 80), t0=1700000000.0, **kw):
    c = Conversation(client, server, t0=t0, **kw).handshake()
    c.send("client", b"GET / HTTP/1.0\r\n\r\n").send("server", b"HTTP/1.0 200 OK\r\n\r\nhi")
    return c.close()


def files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*.pcap") if p.is_file())


@needs_tshark
def test_per_stream_files_read_back_as_the_same_streams(tmp_path):
    streams = streams_of(
        tmp_path,
        conv(),
        conv(("10.0.0.3", 40001), ("10.0.0.4", 443), t0=1700000000.5),
    )
    assert len(streams) == 2 and all(s.packets for s in streams)
    out = tmp_path / "out"
    write_batches(PcapSink("pcap", {"dir": str(out)}), streams)
    written = files(out)
    assert len(written) == 2
    for s in streams:
        name = (f"20231114/{s.client[0]}.{s.client[1]}-{s.server[0]}.{s.server[1]}-{s.id}.pcap")
        f = out / name
        assert f in written
        magic, lt, recs = read_pcap(f)
        assert (magic, lt) == (PCAP_MAGIC_US, 1)
        assert len(recs) == len(s.packets) == tshark_count(f)
        for (sec, usec, incl, orig, data), (ts, wire, frame) in zip(recs, s.packets, strict=True):
            assert sec * 1_000_000 + usec == round(ts * 1_000_000)
            assert (incl, orig, data) == (len(frame), wire, frame)
        (back,) = streamtap.reassemble(f)
        assert (back.client, back.server) == (s.client, s.server)
        assert (back.client_data, back.server_data) == (s.client_data, s.server_data)
        assert back.id == s.id


@needs_tshark
def test_wire_length_of_a_snaplen_cut_packet_is_kept(tmp_path):
    c = Conversation().handshake().send("client", b"x" * 400).send("server", b"ok").close()
    cap = tmp_path / "cut.pcap"
    with PcapWriter(cap, snaplen=100) as w:
        for ts, frame in c.packets:
            w.write(ts, frame[:100], wire_len=len(frame))
    (s,) = streamtap.reassemble(cap, config=KEEP)
    assert s.truncated
    out = tmp_path / "out"
    write_batches(PcapSink("pcap", {"dir": str(out)}), [s])
    (f,) = files(out)
    _m, _lt, recs = read_pcap(f)
    assert [(incl, orig) for _s, _u, incl, orig, _d in recs] == [
        (min(len(fr), 100), len(fr)) for _t, fr in c.packets
    ]
    p = subprocess.run([TSHARK, "-r", str(f), "-T", "fields", "-e", "frame.len",
                        "-e", "frame.cap_len"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert "454\t100" in p.stdout.splitlines()  # 14 + 20 + 20 + 400 on the wire


@needs_tshark
def test_raw_ip_is_written_as_linktype_raw(tmp_path):
    streams = streams_of(tmp_path, conv(linktype=LINKTYPE_RAW))
    (s,) = streams
    assert s.linktype in (12, 14, 101)  # pcapy reports LINKTYPE_RAW as DLT_RAW
    assert linktype_of(12) == linktype_of(14) == linktype_of(101) == 101
    out = tmp_path / "out"
    write_batches(PcapSink("pcap", {"dir": str(out)}), streams)
    (f,) = files(out)
    assert read_pcap(f)[1] == 101
    assert tshark_count(f) == len(s.packets)
    (back,) = streamtap.reassemble(f)
    assert (back.client_data, back.server_data) == (s.client_data, s.server_data)


def test_ipv6_and_template_names_are_safe(tmp_path):
    streams = streams_of(tmp_path, conv(("2001:db8::1", 40000), ("2001:db8::2", 80)))
    (s,) = streams
    out = tmp_path / "out"
    tpl = "{interface}/{community_id}-{client_ip}.{client_port}-{start:%H%M%S}.pcap"
    write_batches(PcapSink("pcap", {"dir": str(out), "template": tpl}), streams)
    (f,) = files(out)
    rel = f.relative_to(out).as_posix()
    assert re.fullmatch(r"[A-Za-z0-9._/-]+", rel), rel
    cid = s.community_id.replace("+", "-").replace("/", "_").replace(":", "_").rstrip("=")
    assert rel == f"none/{cid}-2001_db8__1.40000-221320.pcap"
    # the default template too
    out2 = tmp_path / "out2"
    write_batches(PcapSink("pcap", {"dir": str(out2)}), streams)
    (f2,) = files(out2)
    assert f2.name == f"2001_db8__1.40000-2001_db8__2.80-{s.id}.pcap"
    (back,) = streamtap.reassemble(f2)
    assert back.client == ("2001:db8::1", 40000)


@pytest.mark.parametrize("tpl", ["/abs/{stream_id}.pcap", "../{stream_id}.pcap",
                                 "{nope}.pcap", "{start:%Y", "a/../../{stream_id}"])
def test_bad_templates_are_refused(tmp_path, tpl):
    with pytest.raises(ValueError):
        check_template(tpl)
    with pytest.raises(cfgmod.ConfigError, match=r"^template: .*pcap template"):
        PcapSink("pcap", {"dir": str(tmp_path), "template": tpl})


def test_unknown_option_and_missing_dir_are_refused(tmp_path):
    with pytest.raises(cfgmod.ConfigError,
                       match=r"unknown key 'rotate' for sink type pcap \(did you mean"):
        PcapSink("pcap", {"dir": str(tmp_path), "rotate": 1})
    with pytest.raises(cfgmod.ConfigError, match="missing required key 'dir' for sink type pcap"):
        PcapSink("pcap", {})
    with pytest.raises(cfgmod.ConfigError, match="max_open_files: must be greater than 0"):
        PcapSink("pcap", {"dir": str(tmp_path), "max_open_files": 0})


def test_nanosecond_files(tmp_path):
    streams = streams_of(tmp_path, conv(t0=1700000000.123456))
    out = tmp_path / "out"
    write_batches(PcapSink("pcap", {"dir": str(out), "nanosecond": True}), streams)
    (f,) = files(out)
    magic, _lt, recs = read_pcap(f)
    assert magic == PCAP_MAGIC_NS
    assert (recs[0][0], recs[0][1]) == (1700000000, 123456000)
    (back,) = streamtap.reassemble(f)  # libpcap reads ns files (at µs)
    assert back.start == streams[0].start


def _many(base, n: int, clients: int | None = None) -> list:
    """n copies of stream `base`, each another connection (distinct client port / ip)."""
    out = []
    for i in range(n):
        ip = f"10.1.{(i % clients) // 250 if clients else i // 250}.{(i % (clients or 250)) % 250}"
        out.append(dataclasses.replace(base, client=(ip, 1024 + i), start=base.start + i))
    return out


def test_rotating_mode_rotates_by_size_and_linktype(tmp_path):
    (base,) = streams_of(tmp_path, conv())
    size = 24 + sum(16 + len(f) for _t, _w, f in base.packets)
    streams = _many(base, 10)
    clock = iter(range(1700000000, 1700001000)).__next__
    out = tmp_path / "out"
    sink = PcapSink("pcap", {"dir": str(out), "mode": "rotating", "rotate_bytes": 3 * size},
                    clock=clock)
    sink.open()
    assert sink.write(streams[:5]).status == OK
    assert sink.write(streams[5:]).status == OK
    (raw,) = streams_of(tmp_path, conv(linktype=LINKTYPE_RAW), name="raw.pcap")
    assert sink.write([raw]).status == OK
    sink.close()
    written = files(out)
    assert [f.name for f in written][0].startswith("streamtap-20231114-2213")
    counts = [len(read_pcap(f)[2]) for f in written]
    assert sum(counts) == 10 * len(base.packets) + len(raw.packets)
    assert len(written) == 5  # 3 + 3 + 3 + 1 streams of Ethernet, then the raw-IP one
    for f in written:
        assert f.stat().st_size <= 3 * size
    assert [read_pcap(f)[1] for f in written] == [1, 1, 1, 1, 101]
    assert sink.health()["rotations"] == 4


def test_rotating_mode_rotates_by_time(tmp_path):
    (base,) = streams_of(tmp_path, conv())
    now = [1700000000.0]
    out = tmp_path / "out"
    sink = PcapSink("pcap", {"dir": str(out), "mode": "rotating", "rotate_seconds": 60},
                    clock=lambda: now[0])
    sink.open()
    for i in range(4):
        assert sink.write(_many(base, 2)).status == OK
        now[0] += 30 if i % 2 == 0 else 31
    sink.close()
    assert len(files(out)) == 2


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_lru_caps_open_files_over_1000_streams(tmp_path, monkeypatch):
    (base,) = streams_of(tmp_path, conv())
    streams = _many(base, 1000)
    out = tmp_path / "out"
    cap = 16
    sink = PcapSink("pcap", {"dir": str(out), "max_open_files": cap})
    sink.open()
    before = _fds()
    peak = [0]
    real_open = os.open

    def counting_open(*a, **kw):
        fd = real_open(*a, **kw)
        peak[0] = max(peak[0], _fds() - 1 - before)  # -1: listdir's own descriptor
        return fd

    monkeypatch.setattr(pcapmod.os, "open", counting_open)
    for i in range(0, 1000, 100):
        assert sink.write(streams[i:i + 100]).status == OK
        assert sink.open_files <= cap
    monkeypatch.setattr(pcapmod.os, "open", real_open)
    assert peak[0] <= cap
    assert sink.peak_open_files == cap
    assert sink.health()["evictions"] == 1000 - cap
    sink.close()
    assert _fds() == before
    assert len(files(out)) == 1000


@needs_tshark
def test_evicted_files_are_reopened_for_append(tmp_path):
    (base,) = streams_of(tmp_path, conv())
    streams = _many(base, 200, clients=20)
    out = tmp_path / "out"
    sink = PcapSink("pcap", {"dir": str(out), "max_open_files": 4,
                             "template": "{client_ip}.pcap"})
    sink.open()
    for i in range(0, 200, 50):
        assert sink.write(streams[i:i + 50]).status == OK
    sink.close()
    written = files(out)
    assert len(written) == 20
    for f in written:
        _m, _lt, recs = read_pcap(f)  # one header, then records only
        assert len(recs) == 10 * len(base.packets)
    assert tshark_count(written[0]) == 10 * len(base.packets)
    assert sink.health()["evictions"] > 0


def test_existing_file_with_another_linktype_is_not_touched(tmp_path):
    (eth,) = streams_of(tmp_path, conv())
    (raw,) = streams_of(tmp_path, conv(linktype=LINKTYPE_RAW), name="raw.pcap")
    out = tmp_path / "out"
    sink = PcapSink("pcap", {"dir": str(out), "template": "all.pcap"})
    sink.open()
    assert sink.write([eth]).status == OK
    before = (out / "all.pcap").read_bytes()
    res = sink.write([raw, eth])
    assert res.status == FATAL and "link type" in (res.error or "")
    sink.close()
    _m, lt, recs = read_pcap(out / "all.pcap")
    assert lt == 1 and len(recs) == 2 * len(eth.packets)
    assert (out / "all.pcap").read_bytes().startswith(before)


def test_stream_without_packets_is_fatal_with_the_fix(tmp_path):
    (s,) = streamtap.reassemble(_capture(tmp_path))  # keep_packets off
    assert s.packets is None
    sink = PcapSink("pcap", {"dir": str(tmp_path / "out")})
    sink.open()
    res = sink.write([s])
    assert res.status == FATAL
    assert "reassembly.keep_packets: true" in (res.error or "")
    assert sink.health()["last_error"] == res.error
    sink.close()
    assert files(tmp_path / "out") == []


def _capture(tmp_path: Path) -> Path:
    path = tmp_path / "c.pcap"
    conv().write(path)
    return path


def test_write_error_rolls_the_batch_back_and_retries(tmp_path, monkeypatch):
    (base,) = streams_of(tmp_path, conv())
    streams = _many(base, 6)
    out = tmp_path / "out"
    sink = PcapSink("pcap", {"dir": str(out), "template": "{client_port}.pcap"})
    sink.open()
    assert sink.write(streams[:2]).status == OK
    size_before = {f.name: f.stat().st_size for f in files(out)}
    real = os.writev
    calls = [0]

    def flaky(fd, bufs):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, bufs)

    monkeypatch.setattr(pcapmod.os, "writev", flaky)
    res = sink.write(streams[:4])  # two appends to existing files, then two new files
    assert res.status == RETRY and "No space left" in (res.error or "")
    assert {f.name: f.stat().st_size for f in files(out)} == size_before  # rolled back
    assert sink.open_files == 0
    res = sink.write(streams[:4])  # the retry
    assert res.status == OK
    sink.close()
    counts = {f.name: len(read_pcap(f)[2]) for f in files(out)}
    n = len(base.packets)
    assert counts == {"1024.pcap": 2 * n, "1025.pcap": 2 * n, "1026.pcap": n, "1027.pcap": n}
