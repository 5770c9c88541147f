"""streamtap.engine.decode / streamtap.engine.defrag: hand-built frames for every link type and
path."""

from __future__ import annotations

import random
import struct

import pytest

from streamtap.engine.compiled import compiled_modules
from streamtap.engine.decode import (
    _FAST_LINKS,
    TH_ACK,
    TH_CWR,
    TH_ECE,
    TH_PUSH,
    TH_SYN,
    Decoder,
    UnsupportedLinkType,
)

SRC4 = bytes([10, 0, 0, 1])
DST4 = bytes([192, 168, 1, 2])
SRC6 = bytes.fromhex("20010db8000000000000000000000001")
DST6 = bytes.fromhex("20010db80000000000000000000000ff")
MAC = b"\x00\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb"


# --------------------------------------------------------------------------- frame builders
def tcp(
    payload: bytes = b"hello",
    *,
    sport: int = 40000,
    dport: int = 80,
    seq: int = 1000,
    ack: int = 2000,
    flags: int = TH_ACK | TH_PUSH,
    win: int = 512,
    opts: bytes = b"",
    doff: int | None = None,
) -> bytes:
    assert len(opts) % 4 == 0
    if doff is None:
        doff = (20 + len(opts)) // 4
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, win, 0, 0)
    return hdr + opts + payload


def ip4(
    payload: bytes,
    *,
    proto: int = 6,
    src: bytes = SRC4,
    dst: bytes = DST4,
    ident: int = 7,
    frag: int = 0,
    opts: bytes = b"",
    tlen: int | None = None,
    version: int = 4,
    ihl: int | None = None,
) -> bytes:
    if ihl is None:
        ihl = (20 + len(opts)) // 4
    if tlen is None:
        tlen = 20 + len(opts) + len(payload)
    hdr = struct.pack(
        "!BBHHHBBH4s4s", version << 4 | ihl, 0, tlen, ident, frag, 64, proto, 0, src, dst
    )
    return hdr + opts + payload


def ip6(payload: bytes, *, nh: int = 6, src: bytes = SRC6, dst: bytes = DST6, plen=None) -> bytes:
    if plen is None:
        plen = len(payload)
    return struct.pack("!IHBB16s16s", 6 << 28, plen, nh, 64, src, dst) + payload


def ext6(nh: int, units: int = 0) -> bytes:
    """Generic IPv6 extension header (hop-by-hop, routing, dest opts): 8 * (units + 1) bytes."""
    body = bytes(8 * (units + 1) - 2)
    return bytes([nh, units]) + body


def frag6(nh: int, offset: int, more: bool, ident: int) -> bytes:
    return struct.pack("!BBHI", nh, 0, offset | int(more), ident)


def eth(payload: bytes, etype: int = 0x0800) -> bytes:
    return MAC + struct.pack("!H", etype) + payload


def dec(linktype: int, frame: bytes, ts: float = 1.0, d: Decoder | None = None):
    d = d or Decoder(linktype)
    # Decode from the middle of a bigger buffer: off/end must be honoured.
    buf = b"\xee" * 5 + frame + b"\xdd" * 7
    return d.decode(buf, 5, 5 + len(frame), ts), d


def check(res, version=4, payload=b"hello", missing=0) -> None:
    assert res is not None
    assert len(res) == 12
    v, src, dst, sport, dport, seq, ack, flags, win, pl, miss, opts = res
    assert v == version
    assert (src, dst) == ((SRC4, DST4) if version == 4 else (SRC6, DST6))
    assert (sport, dport, seq, ack, flags, win) == (40000, 80, 1000, 2000, TH_ACK | TH_PUSH, 512)
    assert pl == payload and type(pl) is bytes
    assert miss == missing
    assert opts == b""


# --------------------------------------------------------------------------- basics
def test_ethernet_ipv4_tuple_layout():
    res, d = dec(1, eth(ip4(tcp())))
    check(res)
    assert not d.malformed and not d.skipped


def test_ethernet_ipv6():
    res, _ = dec(1, eth(ip6(tcp()), 0x86DD))
    check(res, 6)


def test_flags_include_cwr_ece_and_options_returned_raw():
    opts = b"\x02\x04\x05\xb4\x01\x03\x03\x07"
    res, _ = dec(1, eth(ip4(tcp(b"", flags=TH_SYN | TH_ECE | TH_CWR, opts=opts))))
    assert res[7] == TH_SYN | TH_ECE | TH_CWR
    assert res[11] == opts
    assert res[9] == b""


def test_tcp_ns_bit_not_in_flags():
    frame = bytearray(eth(ip4(tcp())))
    frame[14 + 20 + 12] |= 1  # NS/AE bit, low bit of the data offset byte
    res, _ = dec(1, bytes(frame))
    assert res[7] == TH_ACK | TH_PUSH


def test_seq_ack_full_32_bits():
    res, _ = dec(1, eth(ip4(tcp(seq=0xFFFFFFFF, ack=0x80000000))))
    assert (res[5], res[6]) == (0xFFFFFFFF, 0x80000000)


# --------------------------------------------------------------------------- link types
def _null_le(p: bytes, v: int) -> bytes:
    return struct.pack("<I", 2 if v == 4 else 30) + p


def _loop_be(p: bytes, v: int) -> bytes:
    return struct.pack(">I", 2 if v == 4 else 24) + p


def _et(v: int) -> int:
    return 0x0800 if v == 4 else 0x86DD


def _nflog(p: bytes, v: int) -> bytes:
    hdr = bytes([2 if v == 4 else 10, 0]) + b"\x00\x01"
    prefix = struct.pack("=HH", 4 + 6, 10) + b"abcdef" + b"\x00\x00"  # padded TLV
    hwproto = struct.pack("=HH", 8, 1) + struct.pack("!H", _et(v)) + b"\x00\x00"
    pl = struct.pack("=HH", 4 + len(p), 9) + p
    return hdr + hwproto + prefix + pl + b"\x00" * (-len(pl) % 4)


LINK_BUILDERS = {
    1: lambda p, v: eth(p, _et(v)),
    113: lambda p, v: struct.pack("!HHH8sH", 0, 1, 6, b"\x00" * 8, _et(v)) + p,
    276: lambda p, v: struct.pack("!HHIHBB8s", _et(v), 0, 3, 1, 0, 6, b"\x00" * 8) + p,
    0: _null_le,
    108: _loop_be,
    12: lambda p, v: p,
    14: lambda p, v: p,
    101: lambda p, v: p,
    9: lambda p, v: struct.pack("!H", 0x21 if v == 4 else 0x57) + p,
    50: lambda p, v: b"\xff\x03" + struct.pack("!H", 0x21 if v == 4 else 0x57) + p,
    104: lambda p, v: b"\x0f\x00" + struct.pack("!H", _et(v)) + p,
    239: _nflog,
    10: lambda p, v: b"\x50" + MAC + b"\xaa\xaa\x03\x00\x00\x00" + struct.pack("!H", _et(v)) + p,
    129: lambda p, v: b"\x01\x02\x00\x00" + (b"\xf0" if v == 4 else b"\xc4\x00\x00\x01") + p,
    242: lambda p, v: b"\x00" * 40 + struct.pack("!HH", _et(v), 0) + p,
    178: lambda p, v: b"MGC\x80" + struct.pack("!H", 4) + b"\x01\x02\x03\x04" + eth(p, _et(v)),
}
LINK_V4_ONLY = {228: lambda p, v: p}
LINK_V6_ONLY = {229: lambda p, v: p}


@pytest.mark.parametrize("linktype", sorted(LINK_BUILDERS) + [228])
def test_link_types_ipv4(linktype):
    build = {**LINK_BUILDERS, **LINK_V4_ONLY}[linktype]
    res, d = dec(linktype, build(ip4(tcp()), 4))
    check(res, 4)
    assert not d.malformed


@pytest.mark.parametrize("linktype", sorted(LINK_BUILDERS) + [229])
def test_link_types_ipv6(linktype):
    build = {**LINK_BUILDERS, **LINK_V6_ONLY}[linktype]
    res, d = dec(linktype, build(ip6(tcp()), 6))
    check(res, 6)
    assert not d.malformed


def test_arcnet_rfc1201_ip_and_ipv6():
    res, _ = dec(129, b"\x01\x02\x00\x00\xd4\x00\x00\x01" + ip4(tcp()))
    check(res, 4)
    res, _ = dec(129, b"\x01\x02\x00\x00\xc4\x00\x00\x01" + ip6(tcp()))
    check(res, 6)
    # exception packet: split flag 0xff, 4 filler bytes more
    res, _ = dec(129, b"\x01\x02\x00\x00\xd4\xff\x00\x01\xff\xff\x00\x00" + ip4(tcp()))
    check(res, 4)


def test_null_big_endian_and_loop_little_endian_family():
    res, _ = dec(0, struct.pack(">I", 2) + ip4(tcp()))
    check(res, 4)
    res, _ = dec(108, struct.pack("<I", 28) + ip6(tcp()))
    check(res, 6)
    res, d = dec(0, struct.pack("<I", 7) + ip4(tcp()))
    assert res is None and d.skipped["not_ip"] == 1


def test_ppp_compressed_protocol_and_juniper_no_l2():
    res, _ = dec(9, b"\x21" + ip4(tcp()))
    check(res, 4)
    res, _ = dec(178, b"MGC\x02" + b"\x00\x00\x00\x02" + ip4(tcp()))
    check(res, 4)


def test_raw_ip_bad_version_counted():
    res, d = dec(101, b"\x55" + bytes(40))
    assert res is None and d.malformed["ip_version"] == 1


def test_vlan_qinq_stacks():
    inner = ip4(tcp())
    one = eth(struct.pack("!HH", 100, 0x0800) + inner, 0x8100)
    two = eth(struct.pack("!HHHH", 10, 0x8100, 20, 0x0800) + inner, 0x88A8)
    three = eth(struct.pack("!HHHHHH", 1, 0x9100, 2, 0x8100, 3, 0x86DD) + ip6(tcp()), 0x9100)
    check(dec(1, one)[0])
    check(dec(1, two)[0])
    check(dec(1, three)[0], 6)
    res, d = dec(1, eth(b"\x00", 0x8100))
    assert res is None and d.malformed["link_header"] == 1


def test_sll_vlan_and_llc_snap_ethernet():
    frame = struct.pack("!HHH8sH", 0, 1, 6, b"\x00" * 8, 0x8100) + struct.pack("!HH", 5, 0x0800)
    check(dec(113, frame + ip4(tcp()))[0])
    pkt = ip4(tcp())
    snap = b"\xaa\xaa\x03\x00\x00\x00\x08\x00" + pkt
    check(dec(1, MAC + struct.pack("!H", len(snap)) + snap)[0])


def test_non_ip_and_non_tcp_skipped():
    res, d = dec(1, eth(b"\x00" * 28, 0x0806))  # ARP
    assert res is None and d.skipped["not_ip"] == 1
    res, d = dec(1, eth(ip4(b"\x00" * 8, proto=1)))  # ICMP
    assert res is None and d.skipped["not_tcp"] == 1
    res, d = dec(1, eth(ip4(b"\x00" * 8, proto=17)))  # UDP, not a tunnel port
    assert res is None and d.skipped["not_tcp"] == 1


# --------------------------------------------------------------------------- IP details
def test_ipv4_options():
    opts = b"\x94\x04\x00\x00" + b"\x01\x01\x01\x00"  # router alert, NOPs, EOL
    res, _ = dec(1, eth(ip4(tcp(), opts=opts)))
    check(res)


def test_ipv4_total_length_zero_uses_captured_length():
    big = b"x" * 3000  # bigger than the MTU: TSO/GRO captures
    res, _ = dec(1, eth(ip4(tcp(big), tlen=0)))
    check(res, payload=big)


def test_ethernet_padding_not_payload():
    res, _ = dec(1, eth(ip4(tcp(b""))) + b"\x00" * 6)
    check(res, payload=b"")
    res, _ = dec(1, eth(ip4(tcp(b"ab"))) + b"\xff" * 4)
    check(res, payload=b"ab")


def test_truncated_capture_reports_missing():
    frame = eth(ip4(tcp(b"A" * 1000)))
    res, _ = dec(1, frame[: 14 + 40 + 100])
    check(res, payload=b"A" * 100, missing=900)
    frame6 = eth(ip6(tcp(b"B" * 500)), 0x86DD)
    res, _ = dec(1, frame6[: 14 + 60 + 10])
    check(res, 6, payload=b"B" * 10, missing=490)


def test_truncated_headers_counted():
    frame = eth(ip4(tcp(b"A" * 100)))
    res, d = dec(1, frame[: 14 + 20 + 10])  # TCP header cut by the snaplen
    assert res is None and d.malformed["truncated_header"] == 1
    res, d = dec(1, frame[: 14 + 12])  # IP header cut by the snaplen
    assert res is None and d.malformed["truncated_header"] == 1


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"\x00" * 10, "link_header"),
        (eth(ip4(tcp(), version=5)), "ipv4_header"),
        (eth(ip4(tcp(), ihl=4)), "ipv4_header"),
        (eth(ip4(tcp(), tlen=12)), "ipv4_header"),
        (eth(b"\x45\x00"), "ipv4_header"),
        (eth(ip4(tcp(doff=4))), "tcp_header"),
        (eth(ip4(tcp(doff=15))), "tcp_header"),  # header longer than the datagram
        (eth(ip4(b"\x00" * 10)), "tcp_header"),
        (eth(ip6(tcp(), nh=0)[:40] + b"\x06\x05" + bytes(6), 0x86DD), "ipv6_ext_header"),
        (eth(b"\x70" + bytes(50), 0x86DD), "ipv6_header"),
    ],
)
def test_malformed_reasons(frame, reason):
    res, d = dec(1, frame)
    assert res is None
    assert d.malformed == {reason: 1}


# --------------------------------------------------------------------------- IPv6 extensions
@pytest.mark.parametrize("ext", [0, 43, 60])
def test_ipv6_generic_extension_headers(ext):
    res, _ = dec(1, eth(ip6(ext6(6, 1) + tcp(), nh=ext), 0x86DD))
    check(res, 6)


def test_ipv6_extension_chain_with_ah():
    ah = bytes([6, 4]) + bytes(22)  # AH: (4 + 2) * 4 = 24 bytes
    chain = bytes([43, 0]) + bytes(6)  # hop-by-hop -> routing
    chain += bytes([60, 0]) + bytes(6)  # routing -> dest opts
    chain += bytes([51, 1]) + bytes(14)  # dest opts -> AH
    res, _ = dec(1, eth(ip6(chain + ah + tcp(), nh=0), 0x86DD))
    check(res, 6)


def test_ipv6_esp_and_no_next_header_skipped():
    for nh in (50, 59):
        res, d = dec(229, ip6(b"\x00" * 32, nh=nh))
        assert res is None and d.skipped["not_tcp"] == 1


def test_ipv6_atomic_fragment_decoded_in_place():
    res, d = dec(229, ip6(frag6(6, 0, False, 99) + tcp(), nh=44))
    check(res, 6)
    assert d.defrag.pending == 0


# --------------------------------------------------------------------------- fragments
def _v4_frags(segment: bytes, size: int, ident: int = 42) -> list[bytes]:
    out = []
    for o in range(0, len(segment), size):
        more = o + size < len(segment)
        out.append(eth(ip4(segment[o : o + size], ident=ident, frag=(o // 8) | (0x2000 * more))))
    return out


def _v6_frags(segment: bytes, size: int, ident: int = 42, pre: bytes = b"") -> list[bytes]:
    out = []
    for o in range(0, len(segment), size):
        more = o + size < len(segment)
        body = frag6(6, o, more, ident) + segment[o : o + size]
        out.append(eth(ip6(pre + body, nh=0 if pre else 44), 0x86DD))
    return out


SEG = tcp(bytes(range(256)) * 4)


@pytest.mark.parametrize("order", ["in", "reverse", "shuffled"])
@pytest.mark.parametrize("version", [4, 6])
def test_fragments_reassembled(order, version):
    frags = _v4_frags(SEG, 256) if version == 4 else _v6_frags(SEG, 256)
    if order == "reverse":
        frags.reverse()
    elif order == "shuffled":
        random.Random(3).shuffle(frags)
    d = Decoder(1)
    results = [d.decode(f, 0, len(f), 1.0) for f in frags]
    assert all(r is None for r in results[:-1])
    check(results[-1], version, payload=bytes(range(256)) * 4)
    assert d.skipped["fragment_pending"] == len(frags) - 1
    assert d.defrag.pending == 0 and not d.malformed


def test_ipv6_fragment_after_hop_by_hop_and_dest_opts_inside():
    seg = bytes([6, 0]) + bytes(6) + SEG  # destination options in the fragmentable part
    pre = bytes([44, 0]) + bytes(6)  # hop-by-hop -> fragment
    frags = []
    for o in range(0, len(seg), 512):
        more = o + 512 < len(seg)
        frags.append(ip6(pre + frag6(60, o, more, 5) + seg[o : o + 512], nh=0))
    d = Decoder(229)
    out = [d.decode(f, 0, len(f), 1.0) for f in frags]
    check(out[-1], 6, payload=bytes(range(256)) * 4)


@pytest.mark.parametrize("version", [4, 6])
def test_overlapping_fragments_drop_datagram(version):
    frags = _v4_frags(SEG, 256) if version == 4 else _v6_frags(SEG, 256)
    if version == 4:
        overlap = eth(ip4(SEG[8:264], ident=42, frag=1 | 0x2000))
    else:
        overlap = eth(ip6(frag6(6, 8, True, 42) + SEG[8:264], nh=44), 0x86DD)
    d = Decoder(1)
    d.decode(frags[0], 0, len(frags[0]), 1.0)
    assert d.decode(overlap, 0, len(overlap), 1.0) is None
    results = [d.decode(f, 0, len(f), 1.0) for f in frags[1:]]
    assert results == [None] * len(results)  # later fragments discarded too (RFC 5722)
    assert d.malformed["fragment_overlap"] == 1
    assert d.skipped["fragment_discarded"] == len(frags) - 1


def test_duplicate_fragment_ignored():
    frags = _v4_frags(SEG, 256)
    d = Decoder(1)
    d.decode(frags[0], 0, len(frags[0]), 1.0)
    d.decode(frags[0], 0, len(frags[0]), 1.0)
    out = [d.decode(f, 0, len(f), 1.0) for f in frags[1:]]
    check(out[-1], payload=bytes(range(256)) * 4)
    assert d.skipped["fragment_duplicate"] == 1 and not d.malformed


# --------------------------------------------------------------------------- fragment frames
def _keeping(linktype: int = 1) -> tuple[Decoder, list]:
    held: list = []
    return Decoder(linktype, frag_frames=held), held


@pytest.mark.parametrize("version", [4, 6])
def test_completed_datagram_hands_back_its_other_fragment_frames(version):
    frags = _v4_frags(SEG, 256) if version == 4 else _v6_frags(SEG, 256)
    order = [2, 0, 3, 1, 4][: len(frags)]
    d, held = _keeping()
    d.decode(frags[0], 0, len(frags[0]), 0.5)  # a duplicate first: its frame is not held twice
    ts = {i: 1.0 + n for n, i in enumerate(order)}
    out = []
    for i in order:
        out.append(d.decode(frags[i], 0, len(frags[i]), ts[i]))
        if out[-1] is None:
            assert held == []  # nothing completed yet
    check(out[-1], version, payload=bytes(range(256)) * 4)
    # capture order, original timestamps and wire lengths; the completing frame is the caller's
    first = [(0.5, len(frags[0]), frags[0])]
    rest = [(ts[i], len(frags[i]), frags[i]) for i in order[:-1] if i != 0]
    assert held == sorted(first + rest)
    # the next frame, whatever it is, starts with an empty list
    d.decode(frags[1], 0, len(frags[1]), 9.0)
    assert held == []


def test_batch_frames_are_sliced_from_the_batch():
    """In a capture batch a frame is buf[off:end] of the whole batch's bytes."""
    frags = _v4_frags(SEG, 528)
    assert len(frags) == 2
    batch = b"junk" + frags[0] + frags[1]
    d, held = _keeping()
    assert d.decode(batch, 4, 4 + len(frags[0]), 1.0) is None
    res = d.decode(batch, 4 + len(frags[0]), len(batch), 2.0)
    check(res, payload=bytes(range(256)) * 4)
    assert held == [(1.0, len(frags[0]), frags[0])]


def test_fragments_inside_a_fragmented_tunnel_packet_keep_every_outer_frame():
    """IPv6 fragments carried in IPv4 (proto 41) whose first packet is itself fragmented: the
    inner datagram came in all three frames."""
    inner = ip6(frag6(6, 0, True, 7) + SEG[:512], nh=44)
    last = ip6(frag6(6, 512, False, 7) + SEG[512:], nh=44)
    o1 = eth(ip4(inner[:256], proto=41, ident=3, frag=0x2000))
    o2 = eth(ip4(inner[256:], proto=41, ident=3, frag=256 // 8))
    o3 = eth(ip4(last, proto=41, ident=4))
    d, held = _keeping()
    assert d.decode(o1, 0, len(o1), 1.0) is None
    assert d.decode(o2, 0, len(o2), 2.0) is None  # outer complete, inner still pending
    res = d.decode(o3, 0, len(o3), 3.0)
    check(res, 6, payload=bytes(range(256)) * 4)
    assert held == [(1.0, len(o1), o1), (2.0, len(o2), o2)]


def test_dropped_datagram_frames_are_freed():
    frags = _v4_frags(SEG, 256)
    overlap = eth(ip4(SEG[8:264], ident=42, frag=1 | 0x2000))
    d, held = _keeping()
    d.decode(frags[0], 0, len(frags[0]), 1.0)
    d.decode(overlap, 0, len(overlap), 1.0)
    for f in frags[1:]:
        assert d.decode(f, 0, len(f), 1.0) is None
    (dg,) = d.defrag._pending.values()
    assert dg.dead and dg.frames == [] and held == []


def test_fragment_timeout():
    frags = _v4_frags(SEG, 256)
    d = Decoder(1, frag_timeout=5.0)
    d.decode(frags[0], 0, len(frags[0]), 100.0)
    d.decode(frags[1], 0, len(frags[1]), 104.0)
    assert d.defrag.pending == 1
    # 6 s after the first fragment: the datagram expired, the rest cannot complete it.
    out = [d.decode(f, 0, len(f), 106.0) for f in frags[2:]]
    assert out == [None] * len(out)
    assert d.malformed["fragment_timeout"] == 1


def test_fragment_pending_limit_evicts_oldest():
    d = Decoder(1, frag_max_pending=3)
    firsts = {i: _v4_frags(SEG, 256, ident=i) for i in range(5)}
    for i in range(5):
        f = firsts[i][0]
        d.decode(f, 0, len(f), 1.0)
    assert d.defrag.pending == 3
    assert d.malformed["fragment_limit"] == 2
    # datagram 4 still completes; datagram 0 was evicted and cannot
    out = [d.decode(f, 0, len(f), 1.0) for f in firsts[4][1:]]
    assert out[-1] is not None
    out = [d.decode(f, 0, len(f), 1.0) for f in firsts[0][1:]]
    assert out[-1] is None


def test_truncated_fragment_dropped():
    frags = _v4_frags(SEG, 256)
    d = Decoder(1)
    d.decode(frags[0], 0, len(frags[0]), 1.0)
    d.decode(frags[1], 0, len(frags[1]) - 10, 1.0)  # snaplen cut
    out = [d.decode(f, 0, len(f), 1.0) for f in frags[2:]]
    assert out == [None] * len(out)
    assert d.malformed["fragment_truncated"] == 1


def test_invalid_fragment_geometry():
    d = Decoder(1)
    f = eth(ip4(b"x" * 13, frag=0x2000))  # non-final fragment not a multiple of 8
    assert d.decode(f, 0, len(f), 1.0) is None
    assert d.malformed["fragment_invalid"] == 1
    f = eth(ip4(b"x" * 16, ident=9, frag=0x1FFF))  # past 65,535 bytes
    assert d.decode(f, 0, len(f), 1.0) is None
    assert d.malformed["fragment_invalid"] == 2


# --------------------------------------------------------------------------- tunnels
def gre(inner: bytes, proto: int, flags: int = 0, extra: bytes = b"") -> bytes:
    return struct.pack("!HH", flags, proto) + extra + inner


def udp(payload: bytes, dport: int, sport: int = 55555) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


OUTER_SRC = b"\x01\x01\x01\x01"


def _outer(p: bytes, proto: int) -> bytes:
    return eth(ip4(p, proto=proto, src=OUTER_SRC))


@pytest.mark.parametrize(
    "frame",
    [
        _outer(ip4(tcp()), 4),  # IPv4 in IPv4
        eth(ip6(ip4(tcp()), nh=4), 0x86DD),  # IPv4 in IPv6
        _outer(ip6(tcp()), 41),  # 6in4
        _outer(gre(ip4(tcp()), 0x0800), 47),
        _outer(gre(ip4(tcp()), 0x0800, 0xB000, b"\x00" * 12), 47),  # checksum + key + seq
        _outer(gre(eth(ip4(tcp())), 0x6558, 0x2000, b"\x00" * 4), 47),  # TEB
        # ERSPAN II
        _outer(gre(b"\x10" + bytes(7) + eth(ip4(tcp())), 0x88BE, 0x1000, bytes(4)), 47),
        _outer(gre(bytes(12) + eth(ip4(tcp())), 0x22EB, 0x1000, bytes(4)), 47),  # ERSPAN III
        _outer(udp(b"\x08\x00\x00\x00\x00\x00\x01\x00" + eth(ip4(tcp())), 4789), 17),  # VXLAN
        _outer(udp(b"\x02\x00\x65\x58" + bytes(4) + bytes(8) + eth(ip4(tcp())), 6081), 17),
        _outer(udp(b"\x00\x00\x08\x00" + bytes(4) + ip4(tcp()), 6081), 17),  # Geneve, IPv4
        eth(struct.pack("!I", 100 << 12 | 0x40) + struct.pack("!I", 200 << 12 | 0x140)
            + ip4(tcp()), 0x8847),  # MPLS, 2 labels
        eth(struct.pack("!I", 100 << 12 | 0x140) + bytes(4) + eth(ip4(tcp())), 0x8847),  # PW+CW
        eth(b"\x11\x00\x00\x01" + struct.pack("!HH", 22 + len(tcp()), 0x0021) + ip4(tcp())
            + b"\x00" * 8, 0x8864),  # PPPoE, with Ethernet padding after
        eth(ip4(udp(bytes(8) + ip6(tcp()), 50000, 3544), proto=17)),  # Teredo, origin indication
        eth(b"\x00\x07" + eth(ip4(tcp())), 0x8903),  # Cisco FabricPath
    ],
)  # fmt: skip
def test_tunnels_decode_inner_tcp(frame):
    res, d = dec(1, frame)
    assert res is not None, (dict(d.malformed), dict(d.skipped))
    v = res[0]
    check(res, v)
    assert res[1] != OUTER_SRC


def test_tunnel_depth_limited():
    pkt = ip4(tcp())
    for _ in range(20):
        pkt = ip4(pkt, proto=4)
    res, d = dec(228, pkt)
    assert res is None and d.malformed["tunnel_depth"] == 1


def test_fragmented_tunnel_inner_tcp():
    inner = ip4(tcp(b"z" * 600))
    outer_payload = gre(inner, 0x0800)
    frags = []
    for o in range(0, len(outer_payload), 304):
        more = o + 304 < len(outer_payload)
        frags.append(eth(ip4(outer_payload[o : o + 304], proto=47, frag=(o // 8) | 0x2000 * more)))
    d = Decoder(1)
    out = [d.decode(f, 0, len(f), 1.0) for f in frags]
    check(out[-1], payload=b"z" * 600)


# --------------------------------------------------------------------------- TCP options
def test_options_in_decoded_segment_are_the_raw_bytes():
    opts = b"\x02\x04\x05\xb4\x04\x02\x08\x0a" + struct.pack("!II", 5, 6) + b"\x01\x03\x03\x02"
    res, _ = dec(1, eth(ip4(tcp(b"", opts=opts))))
    assert res[11] == opts


# --------------------------------------------------------------------------- robustness
def test_unsupported_link_type_message():
    with pytest.raises(UnsupportedLinkType) as exc:
        Decoder(147)
    msg = str(exc.value)
    assert "147" in msg and "113" in msg and "127" in msg


def test_supported_linktypes_construct():
    for lt in (0, 1, 9, 10, 12, 101, 104, 108, 113, 129, 178, 228, 229, 239, 242, 276, 127):
        assert Decoder(lt).linktype == lt


def _fuzz_frames(linktype: int, n: int, rng: random.Random):
    """Random bytes, and valid frames with random bytes flipped/cut (reach deeper code)."""
    build = {**LINK_BUILDERS, **LINK_V4_ONLY, **LINK_V6_ONLY}.get(linktype, lambda p, v: p)
    seeds = [
        build(ip4(tcp()), 4),
        build(ip6(bytes([44, 0, 0, 9, 0, 0, 0, 1]) + tcp(), nh=0), 6),
        build(ip4(gre(eth(ip4(tcp())), 0x6558), proto=47), 4),
        build(ip4(udp(b"\x08" + bytes(7) + eth(ip6(tcp()), 0x86DD), 4789), proto=17), 4),
        build(ip4(b"abcdefgh" * 4, frag=0x2000), 4),
    ]
    for i in range(n):
        if i % 2:
            yield rng.randbytes(rng.randrange(0, 120))
        else:
            f = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 6)):
                f[rng.randrange(len(f))] = rng.randrange(256)
            yield bytes(f[: rng.randrange(len(f) + 1)])


@pytest.mark.parametrize("linktype", sorted(set(LINK_BUILDERS) | {228, 229}) + [127, 105])
def test_fuzz_never_raises(linktype):
    rng = random.Random(linktype)
    d = Decoder(linktype, frag_max_pending=64)
    n = 20_000 if linktype not in (127, 105) else 2_000  # impacket is ~10x slower
    got = 0
    for i, frame in enumerate(_fuzz_frames(linktype, n, rng)):
        if d.decode(frame, 0, len(frame), float(i)) is not None:
            got += 1
    total = sum(d.malformed.values()) + sum(d.skipped.values())
    # every None is counted once (fragment bookkeeping may add extra counts)
    assert got + total >= n


def test_fuzz_never_raises_keeping_fragment_frames():
    rng = random.Random(7)
    held: list = []
    d = Decoder(1, frag_max_pending=64, frag_frames=held)
    seen = set()
    for i, frame in enumerate(_fuzz_frames(1, 20_000, rng)):
        seen.add(frame)
        d.decode(frame, 0, len(frame), float(i))
        assert all(f in seen and w == len(f) for _t, w, f in held)


def test_pppoe_wrong_length_field_trusts_ip_length():
    seg = ip4(tcp(b"abcdef"))
    frame = eth(b"\x11\x00\x00\x01" + struct.pack("!HH", len(seg) - 4, 0x0021) + seg, 0x8864)
    res, d = dec(1, frame)
    check(res, payload=b"abcdef")


def test_fast_and_general_ethernet_paths_agree():
    # untagged IPv4 takes the inlined fast path; the same packet behind a VLAN tag, the general
    # one: identical tuples, including for a snaplen-truncated frame.
    pkt = ip4(tcp(b"q" * 300, opts=b"\x01\x01\x04\x02"))
    for cut in (None, 14 + 40 + 4 + 100):
        plain = eth(pkt)
        tagged = eth(struct.pack("!HH", 7, 0x0800) + pkt, 0x8100)
        a, _ = dec(1, plain[:cut])
        b, _ = dec(1, tagged[: cut + 4] if cut else tagged)
        assert a is not None and a == b
        assert (a[10], len(a[9])) == ((0, 300) if cut is None else (200, 100))


@pytest.mark.parametrize("linktype", sorted(_FAST_LINKS))
def test_frame_bounds_outside_the_buffer_refused_by_the_compiled_engine(linktype):
    # The compiled decoder reads frames through a C pointer, so a caller's off/end past the
    # buffer must be refused, not read (the Python source raises IndexError or struct.error,
    # or reads less).
    buf = eth(ip4(tcp(b"x" * 40)))
    d = Decoder(linktype)
    compiled = compiled_modules()["streamtap.engine.decode"]
    for off, end in ((0, len(buf) + 1), (-1, 10), (10, 5), (len(buf) + 100, len(buf) + 200)):
        if compiled:
            with pytest.raises(ValueError, match="outside the"):
                d.decode(buf, off, end, 1.0)
        else:
            try:
                d.decode(buf, off, end, 1.0)
            except (IndexError, struct.error):
                pass
    assert d.decode(buf, 0, len(buf), 1.0) is not None or linktype != 1
