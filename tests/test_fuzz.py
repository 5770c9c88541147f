"""Property-based tests (hypothesis) of decode and reassembly, through the public API only.

Reassembly is checked against an independent model (`Model`): per direction a map
offset -> byte filled by every captured data byte under the overlap policy (`first`: the first
captured byte for an offset stays; `last`: the newest wins). Delivered bytes must be the bytes of
the covered offsets in order; gaps the maximal uncovered runs of the span, which runs from offset
0 (the SYN is always captured) to the highest captured byte or the FIN, whichever is further.
That is the README's contract once holes stay fillable until emit ("Late fill"): when a hole is
skipped (ACK, out-of-order limit, close) does not change what is delivered.

Documented exceptions, and how the generator handles them:
- keep-alives (0 or 1 byte at next-1) are never data: under `last` no segment is shorter than 2
  bytes (a 1-byte retransmission at next-1 with new bytes would be a keep-alive to the engine, and
  the newest byte to the model); under `first` 1-byte segments are fine (next-1 is always a
  delivered byte, which `first` keeps anyway);
- RST payload is not stream data: RSTs carry random payload, which the model ignores;
- depth and snaplen: not generated here (depth unlimited, frames never cut); the decode fuzz
  below covers cut frames for "no exception, closed once";
- the handshake (SYN, SYN-ACK) is captured first, so offsets count from ISN + 1 (no mid-stream
  pickup), and timestamps stay well inside every idle timeout, so only FIN, RST, port reuse and
  the final flush close a connection.
"""

from __future__ import annotations

import random
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pcapbuild as pb
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import streamtap
from streamtap import config as cfgmod

SEQ_MOD = 1 << 32
T0 = 1_700_000_000.0
DT = 0.001  # seconds between packets: far below every timeout and linger

# ISNs anywhere, and often just below the wrap so the stream crosses 2^32
isns = st.one_of(
    st.integers(0, SEQ_MOD - 1),
    st.integers(SEQ_MOD - 4096, SEQ_MOD - 1),
    st.sampled_from([0, 1, SEQ_MOD - 11, SEQ_MOD - 1]),
)


def _config(overlap: str, ooo_bytes: int):
    return cfgmod.loads(
        "", overrides={"reassembly": {"overlap": overlap, "limits": {"ooo_bytes": ooo_bytes}}}
    )


# --------------------------------------------------------------------------- the model


@dataclass
class Half:
    """What one direction sent and what the model expects of it."""

    isn: int
    data: bytes
    cover: dict[int, int] = field(default_factory=dict)   # offset -> byte, after the policy
    fin: bool = False

    def put(self, off: int, payload: bytes, last: bool) -> None:
        cover = self.cover
        for i, b in enumerate(payload, off):
            if i >= 0 and (last or i not in cover):
                cover[i] = b

    def expected(self) -> tuple[bytes, list[tuple[int, int]]]:
        """Delivered bytes, and gaps as (position in the delivered bytes, length)."""
        end = max(self.cover, default=-1) + 1
        if self.fin:
            end = max(end, len(self.data))
        out = bytearray()
        gaps: list[tuple[int, int]] = []
        run = 0
        for i in range(end):
            b = self.cover.get(i)
            if b is None:
                run += 1
                continue
            if run:
                gaps.append((len(out), run))
                run = 0
            out.append(b)
        if run:
            gaps.append((len(out), run))
        return bytes(out), gaps


@dataclass
class Conn:
    """One connection (one incarnation of a 4-tuple) and the packets the capture holds for it."""

    v6: bool
    client: tuple[str, int]
    server: tuple[str, int]
    c: Half
    s: Half
    packets: list[tuple[str, int, int, str, bytes]] = field(default_factory=list)
    # (side, seq, ack, flags, payload); side "c" or "s" = sender


def _ack(h: Half, off: int) -> int:
    return (h.isn + 1 + off) % SEQ_MOD


@st.composite
def segments(draw, data: bytes, min_len: int) -> list[tuple[int, bytes]]:
    """`data` cut at random points into segments of at least `min_len` bytes."""
    n = len(data)
    if n == 0:
        return []
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, n - 1)), max_size=12))))
    bounds = [0]
    for c in cuts:
        if c - bounds[-1] >= min_len and n - c >= min_len:
            bounds.append(c)
    bounds.append(n)
    return [(a, data[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]


@st.composite
def direction_packets(draw, me: Half, peer: Half, side: str, last: bool):
    """Data segments of one direction: split, duplicated, overlapped with conflicting bytes,
    dropped; pure ACKs of the peer's data; maybe a FIN."""
    min_len = 2 if last else 1
    segs = draw(segments(me.data, min_len))
    out: list[tuple[str, int, int, str, bytes]] = []
    n = len(me.data)

    def ack_value() -> int:
        return _ack(peer, draw(st.integers(0, len(peer.data))))

    for off, payload in segs:
        if draw(st.integers(0, 9)) == 0:
            continue   # dropped: never captured
        out.append((side, _ack(me, off), ack_value(), "PA", payload))
        if draw(st.integers(0, 5)) == 0:
            out.append((side, _ack(me, off), ack_value(), "PA", payload))   # retransmission
    if n >= min_len:
        for _ in range(draw(st.integers(0, 3))):
            a = draw(st.integers(0, n - min_len))
            b = draw(st.integers(a + min_len, min(n, a + 64)))
            junk = draw(st.binary(min_size=b - a, max_size=b - a))   # conflicting bytes
            out.append((side, _ack(me, a), ack_value(), "PA", junk))
    for _ in range(draw(st.integers(0, 3))):
        out.append((side, _ack(me, draw(st.integers(0, n))), ack_value(), "A", b""))
    if draw(st.booleans()):
        out.append((side, _ack(me, n), ack_value(), "FA", b""))
    return out


@st.composite
def connections(draw, last: bool, client: tuple[str, int], server: tuple[str, int], v6: bool,
                isn_c_not: int | None = None) -> Conn:
    isn_c = draw(isns)
    if isn_c == isn_c_not:
        isn_c = (isn_c + 1) % SEQ_MOD
    c = Half(isn_c, draw(st.binary(max_size=600)))
    s = Half(draw(isns), draw(st.binary(max_size=600)))
    conn = Conn(v6, client, server, c, s)
    body = draw(direction_packets(c, s, "c", last)) + draw(direction_packets(s, c, "s", last))
    body.append(("c", _ack(c, 0), _ack(s, 0), "A", b""))   # the handshake's third packet
    if draw(st.booleans()):
        body.append(("c", (c.isn) % SEQ_MOD, 0, "S", b""))     # retransmitted SYN
    if draw(st.integers(0, 3)) == 0:
        side = draw(st.sampled_from("cs"))
        me, peer = (c, s) if side == "c" else (s, c)
        junk = draw(st.binary(max_size=20))  # RST text: diagnostic, never stream data
        body.append((side, _ack(me, draw(st.integers(0, len(me.data)))), _ack(peer, 0), "RA",
                     junk))
    draw(st.randoms(use_true_random=False)).shuffle(body)
    conn.packets = [("c", c.isn, 0, "S", b""), ("s", s.isn, _ack(c, 0), "SA", b"")] + body
    return conn


@st.composite
def scenarios(draw):
    """A few connections on distinct tuples, interleaved; one may reuse its tuple afterwards."""
    last = draw(st.booleans())
    ooo = draw(st.sampled_from([1 << 20, 64, 300]))
    conns: list[list[Conn]] = []
    for k in range(draw(st.integers(1, 3))):
        v6 = draw(st.booleans())
        cli = ("2001:db8::1" if v6 else "10.0.0.1", 40000 + k)
        srv = ("2001:db8::2" if v6 else "10.0.0.2", draw(st.sampled_from([80, 443, 40000 + k])))
        first = draw(connections(last, cli, srv, v6))
        incarnations = [first]
        if draw(st.integers(0, 3)) == 0:   # port reuse: a new SYN with another ISN
            incarnations.append(draw(connections(last, cli, srv, v6, isn_c_not=first.c.isn)))
        conns.append(incarnations)
    # interleave connections, keeping each connection's own packet order
    queues = [[(conn, p) for conn in inc for p in conn.packets] for inc in conns]
    rng = draw(st.randoms(use_true_random=False))
    order: list[tuple[Conn, tuple]] = []
    while any(queues):
        q = rng.choice([q for q in queues if q])
        order.append(q.pop(0))
    return last, ooo, conns, order


def _frame(conn: Conn, pkt: tuple) -> bytes:
    side, seq, ack, flags, payload = pkt
    src, dst = (conn.client, conn.server) if side == "c" else (conn.server, conn.client)
    return pb.frame(src[0], dst[0], src[1], dst[1], seq, ack, flags, payload,
                    linktype=pb.LINKTYPE_RAW)


def _expected_reasons(conns: list[list[Conn]], order) -> dict[int, str]:
    """close_reason of every incarnation, in the engine's documented rules: both FINs -> fin,
    a RST before that -> rst, else shutdown at flush; a connection ended by port reuse takes
    its reason, or rst/fin if it saw one, else timeout."""
    state: dict[int, dict] = {}
    for conn, (side, _seq, _ack, flags, _p) in order:
        st_ = state.setdefault(id(conn), {"fins": set(), "rst": False, "reason": ""})
        if "R" in flags:
            st_["rst"] = True
            st_["reason"] = st_["reason"] or "rst"
        elif "F" in flags:
            st_["fins"].add(side)
            if len(st_["fins"]) == 2:
                st_["reason"] = st_["reason"] or "fin"
    out = {}
    for inc in conns:
        for i, conn in enumerate(inc):
            s = state[id(conn)]
            if s["reason"]:
                out[id(conn)] = s["reason"]
            elif i + 1 < len(inc):
                out[id(conn)] = "rst" if s["rst"] else "fin" if s["fins"] else "timeout"
            else:
                out[id(conn)] = "shutdown"
    return out


def _check_stream_shape(s) -> None:
    """Invariants that hold for any stream: gaps well formed, the record agrees."""
    for d, data in (("client", s.client_data), ("server", s.server_data)):
        prev = -1
        for pos, n, gd in s.gaps:
            if gd != d:
                continue
            assert n > 0, s.gaps                    # no empty or negative gap
            assert prev < pos <= len(data), s.gaps  # in order, apart (adjacent gaps merge)
            prev = pos
    rec = s.record()
    assert rec["tcp"]["missed_bytes"] == sum(n for _, n, _ in s.gaps)
    assert rec["source"]["bytes"] == len(s.client_data)
    assert rec["destination"]["bytes"] == len(s.server_data)


def _run(frames, config) -> tuple[list, dict]:
    r = streamtap.Reassembler(config)
    out = []
    for ts, linktype, frame in frames:
        r.feed(ts, linktype, frame)
        out += r.completed()
    out += r.flush()
    return out, r.stats


# --------------------------------------------------------------------------- reassembly


@given(scenarios())
def test_reassembly_matches_model(sc) -> None:
    last, ooo, conns, order = sc
    frames = [(T0 + i * DT, pb.LINKTYPE_RAW, _frame(conn, p)) for i, (conn, p) in
              enumerate(order)]
    # the model: every captured data byte under the policy, RST text excluded
    for conn, (side, seq, _ack, flags, payload) in order:
        h = conn.c if side == "c" else conn.s
        if "S" in flags or "R" in flags:
            continue
        off = (seq - h.isn - 1) % SEQ_MOD
        if off >= SEQ_MOD // 2:
            off -= SEQ_MOD
        h.put(off, payload, last)
        if "F" in flags:
            h.fin = True
    reasons = _expected_reasons(conns, order)

    streams, stats = _run(frames, _config("last" if last else "first", ooo))
    # what the examples exercised (--hypothesis-show-statistics)
    event(f"late fill: {stats['late_filled_bytes'] > 0}")
    event(f"gaps: {stats['gaps'] > 0}")
    event(f"overlaps: {any(s.overlaps for s in streams)}")
    event(f"port reuse: {any(len(inc) > 1 for inc in conns)}")

    # every connection closed exactly once: one stream per incarnation, no stream twice
    ids = [s.id for s in streams]
    assert len(ids) == len(set(ids))
    assert stats["flows_active"] == 0
    assert len(streams) == sum(len(inc) for inc in conns)
    for inc in conns:
        mine = sorted(
            (s for s in streams if s.client == inc[0].client and s.server == inc[0].server),
            key=lambda s: s.start,
        )
        assert len(mine) == len(inc)
        for conn, s in zip(inc, mine, strict=True):
            _check_stream_shape(s)
            assert s.close_reason == reasons[id(conn)]
            assert s.ip_version == (6 if conn.v6 else 4)
            for h, data, d in ((conn.c, s.client_data, "client"), (conn.s, s.server_data,
                                                                  "server")):
                want, want_gaps = h.expected()
                got_gaps = [(pos, n) for pos, n, gd in s.gaps if gd == d]
                assert data == want, (d, conn)
                assert got_gaps == want_gaps, (d, conn)
                span = max(max(h.cover, default=-1) + 1, len(h.data) if h.fin else 0)
                assert len(data) + sum(n for _, n in got_gaps) == span


# --------------------------------------------------------------------------- decode fuzz

LINKTYPES = [0, 1, 12, 101, 113, 228, 229, 276]


def _link(linktype: int, v6: bool) -> bytes:
    if linktype in (0, 1, 113):
        return pb.link_header(linktype, v6)
    if linktype == 276:   # SLL2: protocol, reserved, ifindex, arphrd, pkttype, addr len, addr
        return struct.pack("!HHIHBB8s", 0x86DD if v6 else 0x0800, 0, 1, 1, 0, 6, b"\2" * 6)
    return b""


@st.composite
def valid_frames(draw, linktype: int) -> bytes:
    v6 = draw(st.booleans()) if linktype not in (228, 229) else linktype == 229
    src, dst = ("2001:db8::1", "2001:db8::2") if v6 else ("10.0.0.1", "10.0.0.2")
    if draw(st.integers(0, 9)) == 0:
        dst = src   # with equal ports, a "land" packet: both halves share one key
    sport, dport = draw(st.sampled_from([(40000, 80), (80, 40000), (5000, 5000)]))
    payload = draw(st.binary(max_size=80))
    flags = draw(st.sampled_from(["S", "SA", "A", "PA", "FA", "RA", "R", "SF", 0xFF]))
    seq = draw(isns)
    seg = pb.tcp(sport, dport, seq, draw(isns), flags, payload,
                 options=draw(st.sampled_from([b"", b"\x02\x04\x05\xb4", b"\x01" * 7])),
                 src=src, dst=dst)
    link = _link(linktype, v6)
    if draw(st.integers(0, 4)) == 0:
        # fragments, maybe overlapping or out of order; one of them is the frame
        size = draw(st.integers(8, 64))
        if v6:
            step = size - size % 8 or 8
            frags = []
            for off in range(0, len(seg), step):
                ext = pb.ipv6_frag(pb.IPPROTO_TCP, draw(st.sampled_from([off, off + 8, 0])),
                                   off + step < len(seg), 7)
                frags.append(pb.ipv6(src, dst, seg[off:off + step], pb.IPPROTO_FRAGMENT, ext))
        else:
            frags = pb.ipv4_fragments(src, dst, seg, size, ident=draw(st.integers(0, 3)))
        return link + draw(st.sampled_from(frags))
    ip = pb.ipv6(src, dst, seg) if v6 else pb.ipv4(src, dst, seg)
    return link + ip


@st.composite
def mutated(draw, linktype: int) -> bytes:
    """A valid frame, then cuts, bit flips in the headers, bogus length fields; or noise."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=120))
    frame = bytearray(draw(valid_frames(linktype)))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["cut", "flip", "word", "grow"]))
        if not frame:
            break
        i = draw(st.integers(0, min(len(frame), 80) - 1))
        if kind == "cut":
            del frame[i:]
        elif kind == "flip":
            frame[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "word" and i + 2 <= len(frame):   # lengths, offsets, ports: any 16 bits
            frame[i:i + 2] = struct.pack("!H", draw(st.sampled_from([0, 1, 20, 0xFFFF,
                                                                     len(frame)])))
        else:
            frame += draw(st.binary(max_size=40))
    return bytes(frame)


@st.composite
def fuzz_captures(draw):
    linktype = draw(st.sampled_from(LINKTYPES))
    return linktype, draw(st.lists(mutated(linktype), max_size=40))


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(fuzz_captures(), st.sampled_from(["first", "last"]))
def test_decode_fuzz_no_exception_closed_once(cap, overlap) -> None:
    linktype, frames = cap
    streams, stats = _run(
        [(T0 + i * DT, linktype, f) for i, f in enumerate(frames)], _config(overlap, 64)
    )
    ids = [s.id for s in streams]
    assert len(ids) == len(set(ids))                  # no stream emitted twice
    assert stats["flows_active"] == 0
    assert len(streams) == stats["flows"]             # every flow closed, exactly once
    assert sum(stats["streams"].values()) == stats["flows"]
    for s in streams:
        _check_stream_shape(s)


def test_decode_fuzz_reaches_tcp() -> None:
    """The mutation strategy is not all noise: unmutated frames of every link type decode."""
    rng = random.Random(5)
    for linktype in LINKTYPES:
        v6 = linktype == 229
        src, dst = ("2001:db8::1", "2001:db8::2") if v6 else ("10.0.0.1", "10.0.0.2")
        seg = pb.tcp(40000, 80, rng.randrange(SEQ_MOD), 0, "S", src=src, dst=dst)
        ip = pb.ipv6(src, dst, seg) if v6 else pb.ipv4(src, dst, seg)
        streams, _ = _run([(T0, linktype, _link(linktype, v6) + ip)], None)
        assert [s.client for s in streams] == [(src, 40000)], linktype


@pytest.mark.parametrize("flags", ["S", "SA", "PA"])
def test_land_packet_flow_is_closed(flags: str) -> None:
    """Regression (found by bench/fuzz.py --atheris): a segment whose source and destination are
    the same address and port made a flow that flush never found: never emitted, never closed."""
    frames = [(T0 + i * DT, pb.LINKTYPE_RAW,
               pb.frame("10.0.0.1", "10.0.0.1", 5000, 5000, 7, 0, flags, b"xy",
                        linktype=pb.LINKTYPE_RAW))
              for i in range(3)]
    streams, stats = _run(frames, None)
    assert stats["flows_active"] == 0
    assert len(streams) == stats["flows"] == 1
    assert streams[0].client == streams[0].server == ("10.0.0.1", 5000)


@pytest.mark.parametrize("last", [False, True])
def test_model_sanity(last: bool) -> None:
    """The model itself: a hole, a conflicting overlap, a FIN past the data."""
    h = Half(0, b"abcdefgh")
    h.put(0, b"ab", last)
    h.put(1, b"XY", last)
    h.put(5, b"fg", last)
    h.fin = True
    want = (b"aXYfg" if last else b"abYfg")
    assert h.expected() == (want, [(3, 2), (5, 1)])


def test_bench_fuzz_smoke() -> None:
    """bench/fuzz.py keeps working: a short run, pure-Python engine, no exception, exit 0."""
    script = Path(__file__).resolve().parents[1] / "bench" / "fuzz.py"
    p = subprocess.run([sys.executable, str(script), "--packets", "3000", "--scenes", "2",
                        "--engine", "python"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "exceptions 0" in p.stdout and "closed exactly once: True" in p.stdout, p.stdout
