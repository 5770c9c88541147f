"""Round trips for the test capture builder: what we write, tshark and pcapy read back (D4)."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pcapy
import pytest
import require
from pcapbuild import (
    SEQ_MOD,
    Conversation,
    PcapngWriter,
    PcapWriter,
    frame,
    ipv4_fragments,
    tcp,
    write_pcap,
    write_pcapng,
)

needs_tshark = pytest.mark.requires(require.tool("tshark"))

FIELDS = ["frame.time_epoch", "ip.src", "ip.dst", "ipv6.src", "ipv6.dst", "tcp.srcport",
          "tcp.dstport", "tcp.seq_raw", "tcp.ack_raw", "tcp.flags", "tcp.payload",
          "tcp.checksum.status", "ip.checksum.status", "frame.len", "frame.cap_len", "vlan.id"]


def tshark_rows(path: Path) -> list[dict[str, str]]:
    cmd = ["tshark", "-n", "-r", str(path), "-o", "tcp.check_checksum:TRUE",
           "-o", "ip.check_checksum:TRUE", "-T", "fields", "-E", "occurrence=a",
           "-E", "aggregator=,"]
    for f in FIELDS:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [dict(zip(FIELDS, line.split("\t"), strict=True)) for line in out.splitlines()]


def pcapy_read(path: Path) -> list[tuple[int, int, int, bytes]]:
    """(sec, usec, caplen, bytes) per packet, through next()."""
    r = pcapy.open_offline(str(path))
    out = []
    while True:
        hdr, data = r.next()
        if hdr is None:
            return out
        sec, usec = hdr.getts()
        out.append((sec, usec, hdr.getcaplen(), data))


def script(conv: Conversation) -> Conversation:
    return (conv.handshake()
            .send("client", b"GET / HTTP/1.0\r\n\r\n")
            .send("server", b"HTTP/1.0 200 OK\r\n\r\nhello")
            .close())


EXPECTED_FLAGS = [0x002, 0x012, 0x010, 0x018, 0x018, 0x011, 0x011, 0x010]


@needs_tshark
@pytest.mark.parametrize("fmt", ["pcap_us", "pcap_ns", "pcapng"])
@pytest.mark.parametrize("isn_c", [1000, SEQ_MOD - 3])
def test_tshark_reads_conversation(tmp_path: Path, fmt: str, isn_c: int) -> None:
    conv = script(Conversation(isn_c=isn_c, isn_s=SEQ_MOD - 1))
    path = tmp_path / "c.cap"
    conv.write(path, nanosecond=fmt == "pcap_ns", pcapng=fmt == "pcapng")
    rows = tshark_rows(path)
    assert len(rows) == 8
    assert [int(r["tcp.flags"], 16) for r in rows] == EXPECTED_FLAGS
    assert [r["frame.time_epoch"] for r in rows] == [f"1700000000.00{i}000000" for i in range(8)]
    for r in rows:
        assert r["tcp.checksum.status"] == "1" and r["ip.checksum.status"] == "1"  # 1 = good
        assert {r["ip.src"], r["ip.dst"]} == {"10.0.0.1", "10.0.0.2"}
    c, s = rows[0], rows[1]
    assert (c["ip.src"], c["tcp.srcport"], c["tcp.dstport"]) == ("10.0.0.1", "40000", "80")
    assert (s["ip.src"], s["tcp.srcport"]) == ("10.0.0.2", "80")
    assert int(c["tcp.seq_raw"]) == isn_c
    assert int(s["tcp.seq_raw"]) == SEQ_MOD - 1 and int(s["tcp.ack_raw"]) == (isn_c + 1) % SEQ_MOD
    req, resp = rows[3], rows[4]
    assert int(req["tcp.seq_raw"]) == (isn_c + 1) % SEQ_MOD
    assert int(req["tcp.ack_raw"]) == 0  # ISN_s + 1 wraps to 0
    assert bytes.fromhex(req["tcp.payload"].replace(":", "")) == b"GET / HTTP/1.0\r\n\r\n"
    assert bytes.fromhex(resp["tcp.payload"].replace(":", "")) == b"HTTP/1.0 200 OK\r\n\r\nhello"
    assert int(resp["tcp.ack_raw"]) == (isn_c + 1 + 18) % SEQ_MOD
    fin_c, fin_s, last = rows[5], rows[6], rows[7]
    assert int(fin_c["tcp.seq_raw"]) == (isn_c + 1 + 18) % SEQ_MOD
    assert int(fin_s["tcp.ack_raw"]) == (isn_c + 1 + 18 + 1) % SEQ_MOD
    assert int(last["tcp.ack_raw"]) == (SEQ_MOD - 1 + 1 + 24 + 1) % SEQ_MOD


@needs_tshark
@pytest.mark.parametrize("linktype", [0, 1, 101, 113])
def test_tshark_ipv6_and_link_types(tmp_path: Path, linktype: int) -> None:
    conv = script(Conversation(client=("2001:db8::1", 50000), server=("2001:db8::2", 443),
                               linktype=linktype))
    conv.write(tmp_path / "v6.pcap")
    rows = tshark_rows(tmp_path / "v6.pcap")
    assert len(rows) == 8
    assert (rows[0]["ipv6.src"], rows[0]["ipv6.dst"]) == ("2001:db8::1", "2001:db8::2")
    assert rows[0]["tcp.srcport"] == "50000" and rows[0]["tcp.dstport"] == "443"
    assert all(r["tcp.checksum.status"] == "1" for r in rows)
    assert bytes.fromhex(rows[3]["tcp.payload"].replace(":", "")) == b"GET / HTTP/1.0\r\n\r\n"
    conv4 = script(Conversation(linktype=linktype))
    conv4.write(tmp_path / "v4.pcap")
    rows4 = tshark_rows(tmp_path / "v4.pcap")
    assert rows4[0]["ip.src"] == "10.0.0.1" and rows4[3]["tcp.checksum.status"] == "1"


@needs_tshark
def test_tshark_vlans_segments_and_wire_len(tmp_path: Path) -> None:
    conv = Conversation(vlans=(100, 7)).handshake()
    conv.segment("client", 5, b"world")           # out of order: leaves a gap at 0..5
    conv.segment("client", 0, b"hello", advance=False)
    conv.send("client", b"!", seq_offset=-1)       # overlaps the last byte
    conv.rst("server", ack=False)
    conv.write(tmp_path / "v.pcap")
    rows = tshark_rows(tmp_path / "v.pcap")
    assert rows[0]["vlan.id"] == "100,7"
    assert [int(r["tcp.seq_raw"]) - 1001 for r in rows[3:6]] == [5, 0, 9]
    assert int(rows[6]["tcp.flags"], 16) == 0x004 and rows[6]["tcp.ack_raw"] == "0"
    assert int(rows[6]["tcp.seq_raw"]) == 5001

    f = frame("10.0.0.1", "10.0.0.2", 1, 2, 0, payload=b"x" * 100)
    write_pcap(tmp_path / "w.pcap", [(1.0, f[:60], len(f))])
    row = tshark_rows(tmp_path / "w.pcap")[0]
    assert (row["frame.len"], row["frame.cap_len"]) == (str(len(f)), "60")


@needs_tshark
def test_tshark_reassembles_ipv4_fragments(tmp_path: Path) -> None:
    seg = tcp(1234, 80, 7, 0, "PA", b"A" * 100, src="10.0.0.1", dst="10.0.0.2")
    frags = ipv4_fragments("10.0.0.1", "10.0.0.2", seg, 48)
    assert len(frags) == 3
    eth_hdr = frame("10.0.0.1", "10.0.0.2", 1, 2, 0)[:14]
    write_pcap(tmp_path / "f.pcap", [(1.0 + i, eth_hdr + p) for i, p in enumerate(frags)])
    rows = tshark_rows(tmp_path / "f.pcap")
    assert rows[-1]["tcp.payload"].replace(":", "") == "41" * 100
    assert rows[-1]["tcp.checksum.status"] == "1"


@pytest.mark.parametrize("fmt", ["pcap_us", "pcap_ns", "pcapng", "pcapng_ns"])
def test_pcapy_round_trip(tmp_path: Path, fmt: str) -> None:
    conv = script(Conversation(client=("2001:db8::1", 50000), server=("2001:db8::2", 443)))
    conv.wait(0.000_000_7)  # sub-µs: floored to µs (by the writer, or by libpcap for ns files)
    conv.ack("client")
    path = tmp_path / "c.cap"
    ns = fmt.endswith("_ns")
    if fmt.startswith("pcapng"):
        write_pcapng(path, conv.packets, nanosecond=ns)
    else:
        write_pcap(path, conv.packets, nanosecond=ns)
    got = pcapy_read(path)
    assert [g[3] for g in got] == [f for _, f in conv.packets]
    assert [g[2] for g in got] == [len(f) for _, f in conv.packets]
    assert [(g[0], g[1]) for g in got[:8]] == [(1700000000, 1000 * i) for i in range(8)]
    assert got[8][:2] == (1700000000, 8000)


def test_exact_nanosecond_timestamps(tmp_path: Path) -> None:
    f = frame("10.0.0.1", "10.0.0.2", 1, 2, 0)
    with PcapWriter(tmp_path / "n.pcap", nanosecond=True) as w:
        w.write((1700001100, 800037), f)
    raw = (tmp_path / "n.pcap").read_bytes()
    assert struct.unpack_from("<I", raw)[0] == 0xA1B23C4D
    assert struct.unpack_from("<II", raw, 24) == (1700001100, 800037)
    assert pcapy_read(tmp_path / "n.pcap")[0][:2] == (1700001100, 800)


@needs_tshark
def test_pcapng_multiple_interfaces(tmp_path: Path) -> None:
    f_eth = frame("10.0.0.1", "10.0.0.2", 1, 2, 0)
    f_raw = frame("10.0.0.1", "10.0.0.2", 1, 2, 0, linktype=101)
    with PcapngWriter(tmp_path / "m.pcapng") as w:
        raw_if = w.add_interface(101)
        w.write(1.0, f_eth)
        w.write(2.0, f_raw, interface=raw_if)
    out = subprocess.run(["tshark", "-r", str(tmp_path / "m.pcapng"), "-T", "fields",
                          "-e", "frame.interface_id", "-e", "ip.src"],
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0", "10.0.0.1", "1", "10.0.0.1"]


def test_conversation_bookkeeping() -> None:
    conv = Conversation(isn_c=SEQ_MOD - 1, isn_s=0).handshake()
    assert conv.seq("client", 0) == 0 and conv.seq("server", 0) == 1
    conv.send("client", b"abc").send("client", b"zz", seq_offset=10)
    assert conv.next_rel["client"] == 15
    conv.send("client", b"q", seq_offset=-5)  # retransmission never lowers the mark
    assert conv.next_rel["client"] == 15
    conv.fin("client")
    assert conv.next_rel["client"] == 16 and conv.ack_number("server") == 16
    with pytest.raises(ValueError):
        conv.send("middle", b"x")  # type: ignore[arg-type]
