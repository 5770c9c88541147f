"""The stdlib pcapng fallback (streamtap.engine.pcapng) for files libpcap refuses: interfaces of
different link types. Reached through reader.read()/open_source (libpcap first, then the
fallback from the packet where libpcap gave up) and directly through PcapngReader."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pcapy
import pytest
import require
from pcapbuild import PcapngWriter, frame, write_pcap

import streamtap
from streamtap.engine.pcapng import PcapngReader
from streamtap.engine.reader import META, CaptureError, FilterError, open_source, read

ETH, RAW, SLL = 1, 101, 113
DLT_RAW = pcapy.DLT_RAW  # LINKTYPE_RAW 101 reads back as DLT_RAW, as libpcap reports it
CORPUS_MIXED = "pcaps/pcapplusplus/Tests__Pcap++Test__PcapExamples__pcapng-example.pcapng"


def unpack(batches) -> list[tuple[int, int, int, bytes]]:
    """[(linktype, sec, usec, packet)], checking the batch shape (offsets relative)."""
    out = []
    for linktype, data, meta in batches:
        assert len(meta) % META.size == 0 and meta
        expect = 0
        for sec, usec, off, caplen in META.iter_unpack(meta):
            assert off == expect
            out.append((linktype, sec, usec, bytes(data[off:off + caplen])))
            expect += caplen
        assert expect == len(data)
    return out


def pkt(i: int, linktype: int = ETH, dport: int = 80) -> bytes:
    return frame("10.0.0.1", "10.0.0.2", 40000 + i, dport, 1000 + i, linktype=linktype,
                 payload=b"x" * i)


# --------------------------------------------------------------------------- raw block builder
# PcapngWriter writes little-endian EPBs only; these build any block in either byte order.


def block(order: str, btype: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    total = 12 + len(body)
    return struct.pack(order + "II", btype, total) + body + struct.pack(order + "I", total)


def shb(order: str) -> bytes:
    return block(order, 0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1))


def opt(order: str, code: int, value: bytes) -> bytes:
    return struct.pack(order + "HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def idb(order: str, linktype: int, snaplen: int = 0, tsresol: int | None = None,
        tsoffset: int | None = None) -> bytes:
    opts = b""
    if tsresol is not None:
        opts += opt(order, 9, bytes([tsresol]))
    if tsoffset is not None:
        opts += opt(order, 14, struct.pack(order + "q", tsoffset))
    if opts:
        opts += struct.pack(order + "HH", 0, 0)
    return block(order, 1, struct.pack(order + "HHI", linktype, 0, snaplen) + opts)


def epb(order: str, iface: int, units: int, data: bytes) -> bytes:
    return block(order, 6, struct.pack(order + "IIIII", iface, units >> 32, units & 0xFFFFFFFF,
                                       len(data), len(data)) + data)


def pb(order: str, iface: int, units: int, data: bytes) -> bytes:
    return block(order, 2, struct.pack(order + "HHIIII", iface, 0, units >> 32,
                                       units & 0xFFFFFFFF, len(data), len(data)) + data)


def spb(order: str, data: bytes) -> bytes:
    return block(order, 3, struct.pack(order + "I", len(data)) + data)


# --------------------------------------------------------------------------- fixtures


def mixed(path: Path, interfaces_first: bool = False) -> list[tuple[int, int, int, bytes]]:
    """Ethernet (µs), raw IP (ns) and SLL (µs) interfaces, the second and third declared
    after the first packets unless `interfaces_first`; packets interleaved. Returns the
    expected [(dlt, sec, usec, bytes)] in file order."""
    expected = []
    with PcapngWriter(path, ETH) as w:
        if interfaces_first:
            raw = w.add_interface(RAW, nanosecond=True)
            sll = w.add_interface(SLL)
        for i in range(3):
            w.write((100 + i, 1000 * i), pkt(i))
            expected.append((ETH, 100 + i, i, pkt(i)))
        if not interfaces_first:
            raw = w.add_interface(RAW, nanosecond=True)
            sll = w.add_interface(SLL)
        plan = [(raw, RAW), (raw, RAW), (0, ETH), (sll, SLL), (sll, SLL), (raw, RAW), (0, ETH)]
        for i, (iface, lt) in enumerate(plan, start=3):
            f = pkt(i, lt)
            w.write((200 + i, 123_456_789 + i), f, interface=iface)
            dlt = DLT_RAW if lt == RAW else lt
            expected.append((dlt, 200 + i, (123_456_789 + i) // 1000, f))
    return expected


# --------------------------------------------------------------------------- through the reader


@pytest.mark.parametrize("interfaces_first", [False, True])
def test_mixed_linktypes_read_in_file_order(tmp_path: Path, interfaces_first: bool) -> None:
    path = tmp_path / "m.pcapng"
    expected = mixed(path, interfaces_first)
    batches = list(read([str(path)], n=2))
    assert unpack(batches) == expected
    # a new batch whenever the link type changes, and at most n packets each
    assert [(lt, len(m) // META.size) for lt, _, m in batches] == [
        (ETH, 2), (ETH, 1), (DLT_RAW, 2), (ETH, 1), (SLL, 2), (DLT_RAW, 1), (ETH, 1)]


def test_mixed_linktypes_source_progress(tmp_path: Path) -> None:
    path = tmp_path / "m.pcapng"
    expected = mixed(path)
    src = open_source(str(path))
    assert src.linktype == ETH  # the first interface's; batches carry their own
    got = unpack(src.typed_batches(4))
    assert got == expected
    assert (src.packets_read, src.bytes_read) == (len(expected), path.stat().st_size)


def test_mixed_linktypes_direct_reader(tmp_path: Path) -> None:
    path = tmp_path / "m.pcapng"
    expected = mixed(path)
    r = PcapngReader(str(path))
    assert unpack(r.batches(3)) == expected
    assert (r.linktype, r.packets_read, r.bytes_read) == (ETH, 10, path.stat().st_size)
    assert unpack(PcapngReader(str(path)).batches(3, skip=4)) == expected[4:]


def test_mixed_file_in_a_merge(tmp_path: Path) -> None:
    m = tmp_path / "m.pcapng"
    expected = mixed(m)
    e = tmp_path / "e.pcap"
    write_pcap(e, [((150, 0), pkt(50))])
    got = unpack(read([str(m), str(e)], n=100))
    assert got == expected[:3] + [(ETH, 150, 0, pkt(50))] + expected[3:]


def test_bpf_applied_per_linktype(tmp_path: Path) -> None:
    path = tmp_path / "f.pcapng"
    want = []
    with PcapngWriter(path, ETH) as w:
        raw = w.add_interface(RAW)
        for i, (iface, lt, port) in enumerate([(0, ETH, 80), (0, ETH, 22), (raw, RAW, 22),
                                               (raw, RAW, 80), (0, ETH, 80)]):
            w.write((10 + i, 0), pkt(i, lt, port), interface=iface)
            if port == 80:
                want.append((DLT_RAW if lt == RAW else lt, 10 + i, 0, pkt(i, lt, port)))
    assert unpack(read([str(path)], bpf="tcp port 80")) == want
    assert unpack(PcapngReader(str(path), bpf="tcp port 80").batches()) == want


def test_bpf_that_does_not_compile_for_a_later_linktype(tmp_path: Path) -> None:
    path = tmp_path / "f.pcapng"
    with PcapngWriter(path, ETH) as w:
        w.write((1, 0), pkt(0))
        raw = w.add_interface(RAW)
        w.write((2, 0), pkt(1, RAW), interface=raw)
    got = []
    with pytest.raises(FilterError):
        for batch in read([str(path)], bpf="ether host 02:00:00:00:00:01"):
            got.append(batch)
    assert unpack(got) == [(ETH, 1, 0, pkt(0))]


def test_truncated_mixed_file(tmp_path: Path) -> None:
    good = tmp_path / "m.pcapng"
    expected = mixed(good)
    raw = good.read_bytes()
    cut = len(raw) - 10  # inside the last EPB
    last = raw.rfind(struct.pack("<I", 6), 0, cut)
    path = tmp_path / "t.pcapng"
    path.write_bytes(raw[:cut])
    got: list = []
    with pytest.raises(CaptureError) as ei:
        for batch in read([str(path)], n=2):
            got.append(batch)
    assert unpack(got) == expected[:-1]
    assert ei.value.offset == last and ei.value.path == str(path)
    assert str(ei.value) == f"{path}: truncated block at byte {last} (packet {len(expected)})"


def test_bad_block_length_direct(tmp_path: Path) -> None:
    o = "<"
    body = shb(o) + idb(o, ETH) + idb(o, SLL) + epb(o, 1, 5, pkt(0, SLL))
    bad_at = len(body)
    body += struct.pack("<II", 6, 13) + b"\0" * 20
    (tmp_path / "b.pcapng").write_bytes(body)
    r = PcapngReader(str(tmp_path / "b.pcapng"))
    got = []
    with pytest.raises(CaptureError, match=f"bad block length 13 at byte {bad_at} "
                                           r"\(packet 2\)"):
        for batch in r.batches():
            got.append(batch)
    assert unpack(got) == [(SLL, 0, 5, pkt(0, SLL))]


def test_unknown_interface_is_damage(tmp_path: Path) -> None:
    o = "<"
    body = shb(o) + idb(o, ETH) + idb(o, SLL)
    bad_at = len(body)
    (tmp_path / "u.pcapng").write_bytes(body + epb(o, 2, 0, pkt(0)))
    with pytest.raises(CaptureError, match=f"unknown interface 2 at byte {bad_at}"):
        list(read([str(tmp_path / "u.pcapng")]))


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("order", ["<", ">"])
def test_byte_orders_block_kinds_and_resolutions(tmp_path: Path, order: str) -> None:
    o = order
    f0, f1, f2 = (pkt(i) for i in range(3))
    s0, s1 = pkt(5, SLL), pkt(6, SLL)
    body = (shb(o)
            + idb(o, ETH)                                       # µs (default)
            + idb(o, SLL, tsresol=9, tsoffset=1_000_000)        # ns, +1e6 s
            + idb(o, RAW, tsresol=0x80 | 20)                    # 2^-20 s
            + block(o, 4, b"\0" * 8)                            # name resolution: skipped
            + block(o, 0x0BAD, b"custom")                       # unknown: skipped
            + epb(o, 0, 7 * 10**6 + 999_999, f0)
            + epb(o, 1, 5 * 10**9 + 123_456_789, s0)
            + epb(o, 2, (9 << 20) + (1 << 19) + 1, pkt(7, RAW))   # 9.5000009... s
            + pb(o, 0, 3 * 10**6 + 42, f1)
            + spb(o, f2)                                        # first interface, ts 0
            + epb(o, 1, 2 * 10**9 + 999_999_999, s1))
    path = tmp_path / "o.pcapng"
    path.write_bytes(body)
    expected = [(ETH, 7, 999_999, f0), (SLL, 1_000_005, 123_456, s0),
                (DLT_RAW, 9, 500_000, pkt(7, RAW)), (ETH, 3, 42, f1), (ETH, 0, 0, f2),
                (SLL, 1_000_002, 999_999, s1)]
    assert unpack(PcapngReader(str(path)).batches()) == expected
    assert unpack(read([str(path)])) == expected


def test_several_sections_of_both_byte_orders(tmp_path: Path) -> None:
    a, b, c = pkt(0), pkt(1, SLL), pkt(2, RAW)
    body = (shb("<") + idb("<", ETH) + idb("<", SLL) + epb("<", 0, 1, a) + epb("<", 1, 2, b)
            + shb(">") + idb(">", RAW, tsresol=9) + idb(">", ETH)
            + epb(">", 0, 3_000_004_000, c) + epb(">", 1, 5, a) + spb(">", c))
    path = tmp_path / "s.pcapng"
    path.write_bytes(body)
    assert unpack(read([str(path)])) == [(ETH, 0, 1, a), (SLL, 0, 2, b), (DLT_RAW, 3, 4, c),
                                         (ETH, 0, 5, a), (DLT_RAW, 0, 0, c)]


def test_caplen_cut_to_interface_snaplen(tmp_path: Path) -> None:
    long = pkt(60)
    o = "<"
    body = shb(o) + idb(o, ETH) + idb(o, SLL, snaplen=40) + epb(o, 1, 1, long)
    (tmp_path / "c.pcapng").write_bytes(body)
    assert unpack(PcapngReader(str(tmp_path / "c.pcapng")).batches()) == [(SLL, 0, 1, long[:40])]


# --------------------------------------------------------------------------- the corpus file


def _tshark_packets(path: Path) -> list[tuple[int, int, int]]:
    """[(sec, usec, caplen)] per frame from tshark."""
    out = subprocess.run(["tshark", "-n", "-r", str(path), "-T", "fields", "-e",
                          "frame.time_epoch", "-e", "frame.cap_len"], check=True,
                         capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        ts, caplen = line.split("\t")
        sec, frac = ts.split(".")
        # meta seconds are 32-bit: this file's SLL interface has absurd timestamps (year
        # 586524), which wrap as a C cast to uint32 would
        rows.append((int(sec) & 0xFFFFFFFF, int(frac.ljust(9, "0")[:6]), int(caplen)))
    return rows


def test_corpus_mixed_linktype_file_reads_fully(corpus_dir: Path) -> None:
    path = corpus_dir / CORPUS_MIXED
    got = unpack(read([str(path)]))
    assert {lt for lt, *_ in got} == {ETH, SLL}
    assert len(got) == 159  # capinfos -c / tshark -r | wc -l
    require.need(require.tool("tshark"))  # the rest compares with tshark's reading
    assert [(s, u, len(p)) for _, s, u, p in got] == _tshark_packets(path)
    src = open_source(str(path))
    assert src.linktype == ETH
    for _ in src.typed_batches():
        pass
    assert (src.packets_read, src.bytes_read) == (159, path.stat().st_size)


def test_corpus_mixed_linktype_file_reassembles(corpus_dir: Path) -> None:
    streams = list(streamtap.reassemble(str(corpus_dir / CORPUS_MIXED)))
    assert streams


def test_differing_snaplen_same_linktype(tmp_path: Path) -> None:
    """libpcap also refuses an interface whose snaplen differs from the first one's
    ("an interface has a snapshot length 100 different ..."); the walker finds nothing wrong,
    so the fallback takes over there too."""
    o = "<"
    a, b = pkt(0), pkt(1)
    body = shb(o) + idb(o, ETH, snaplen=65535) + epb(o, 0, 1, a) + idb(o, ETH, snaplen=100)
    (tmp_path / "s.pcapng").write_bytes(body + epb(o, 1, 2, b))
    assert unpack(read([str(tmp_path / "s.pcapng")], n=1)) == [(ETH, 0, 1, a), (ETH, 0, 2, b)]
