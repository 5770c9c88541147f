"""Reassembly engine, fed decoded segments directly (no capture files).

Table tests in Suricata's style (STYLE S5): each scenario is a list of steps
(side, relative seq, bytes, flags) run at ISN 0, 1, 2^32-11 and 2^32-1 so every wrap-around
position of the sequence space is crossed.
"""

from __future__ import annotations

import pytest

from streamtap.engine.flowtable import FLOW_BYTES, FlowTable, Limits
from streamtap.engine.stream import Stream

C_IP, S_IP = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
C_PORT, S_PORT = 40000, 80
ISNS = [0, 1, 2**32 - 11, 2**32 - 1]
FLAGS = {"S": 0x02, "SA": 0x12, "A": 0x10, "PA": 0x18, "FA": 0x11, "R": 0x04, "RA": 0x14}


class Conn:
    """Drives one connection through a FlowTable with relative sequence numbers."""

    def __init__(self, isn_c: int, isn_s: int = 7000, limits: Limits | None = None,
                 table: FlowTable | None = None, t0: float = 1000.0,
                 client=(C_IP, C_PORT), server=(S_IP, S_PORT)) -> None:
        self.t = table or FlowTable(limits or Limits())
        self.isn = {"c": isn_c, "s": isn_s}
        self.ts = t0
        self.ep = {"c": client, "s": server}

    def seg(self, side: str, rel: int, data: bytes = b"", flags: str = "PA",
            ack_rel: int | None = None, dt: float = 0.001, missing: int = 0,
            win: int = 65535) -> Conn:
        other = "s" if side == "c" else "c"
        seq = (self.isn[side] + 1 + rel) & 0xFFFFFFFF
        if flags in ("S", "SA"):
            seq = self.isn[side]
        ack = 0 if ack_rel is None else (self.isn[other] + 1 + ack_rel) & 0xFFFFFFFF
        fl = FLAGS[flags] if ack_rel is not None or flags in ("S", "R") else FLAGS[flags]
        (sip, sport), (dip, dport) = self.ep[side], self.ep[other]
        self.ts += dt
        self.t.packet(self.ts, (4, sip, dip, sport, dport, seq, ack, fl, win, data, missing, b""))
        return self

    def handshake(self) -> Conn:
        self.seg("c", 0, flags="S")
        self.seg("s", 0, flags="SA", ack_rel=0)
        self.seg("c", 0, flags="A", ack_rel=0)
        return self

    def streams(self) -> list[Stream]:
        self.t.flush()
        out, self.t.done = self.t.done, []
        return out

    def one(self) -> Stream:
        out = self.streams()
        assert len(out) == 1, out
        return out[0]


@pytest.mark.parametrize("isn", ISNS)
def test_in_order_both_directions(isn: int) -> None:
    c = Conn(isn, isn_s=isn ^ 0x5555).handshake()
    c.seg("c", 0, b"GET / HTTP/1.1\r\n\r\n", ack_rel=0)
    c.seg("s", 0, b"HTTP/1.1 200 OK\r\n", ack_rel=18)
    c.seg("s", 17, b"\r\nbody", ack_rel=18)
    c.seg("c", 18, flags="FA", ack_rel=23).seg("s", 23, flags="FA", ack_rel=19)
    c.seg("c", 19, flags="A", ack_rel=24)
    s = c.one()
    assert s.client == ("10.0.0.1", 40000) and s.server == ("10.0.0.2", 80)
    assert s.client_data == b"GET / HTTP/1.1\r\n\r\n"
    assert s.server_data == b"HTTP/1.1 200 OK\r\n\r\nbody"
    assert s.close_reason == "fin" and s.client_rule == "syn"
    assert s.gaps == [] and s.state == "SF"
    assert s.history.startswith("ShA") and "F" in s.history and "f" in s.history
    assert s.client_packets == 5 and s.server_packets == 4


@pytest.mark.parametrize("isn", ISNS)
def test_out_of_order_is_reordered(isn: int) -> None:
    c = Conn(isn).handshake()
    c.seg("c", 10, b"klmnopqrst", ack_rel=0)
    c.seg("c", 5, b"fghij", ack_rel=0)
    c.seg("c", 0, b"abcde", ack_rel=0)
    s = c.one()
    assert s.client_data == b"abcdefghijklmnopqrst"
    assert s.gaps == [] and s.close_reason == "shutdown"


@pytest.mark.parametrize("isn", ISNS)
@pytest.mark.parametrize("policy,expect", [("first", b"abcdefgh"), ("last", b"abXYZfgh")])
def test_overlap_on_delivered_bytes(isn: int, policy: str, expect: bytes) -> None:
    c = Conn(isn, limits=Limits(overlap=policy)).handshake()
    c.seg("c", 0, b"abcdefgh", ack_rel=0)
    c.seg("c", 2, b"XYZ", ack_rel=0)
    s = c.one()
    assert s.client_data == expect
    assert s.overlaps == 1 and s.retransmitted_bytes == 3


@pytest.mark.parametrize("isn", ISNS)
@pytest.mark.parametrize("policy,expect", [("first", b"abcdefghij"), ("last", b"abcdeFGHIj")])
def test_overlap_between_held_segments(isn: int, policy: str, expect: bytes) -> None:
    c = Conn(isn, limits=Limits(overlap=policy)).handshake()
    c.seg("c", 5, b"fghij", ack_rel=0)      # held out of order
    c.seg("c", 5, b"FGHI", ack_rel=0)       # conflicting copy, also held
    c.seg("c", 0, b"abcde", ack_rel=0)      # fills the hole
    assert c.one().client_data == expect


@pytest.mark.parametrize("isn", ISNS)
def test_first_keeps_held_bytes_against_in_order_overlap(isn: int) -> None:
    # the documented difference from tshark 4.0: held bytes stay under `first`
    c = Conn(isn).handshake()
    c.seg("c", 4, b"EFGH", ack_rel=0)
    c.seg("c", 0, b"abcdefgh", ack_rel=0)
    s = c.one()
    assert s.client_data == b"abcdEFGH" and s.overlaps == 1
    c = Conn(isn, limits=Limits(overlap="last")).handshake()
    c.seg("c", 4, b"EFGH", ack_rel=0)
    c.seg("c", 0, b"abcdefgh", ack_rel=0)
    assert c.one().client_data == b"abcdefgh"


@pytest.mark.parametrize("isn", ISNS)
def test_duplicate_and_keepalive_never_corrupt(isn: int) -> None:
    for policy in ("first", "last"):
        c = Conn(isn, limits=Limits(overlap=policy)).handshake()
        c.seg("c", 0, b"hello", ack_rel=0)
        c.seg("c", 0, b"hello", ack_rel=0)       # duplicate
        c.seg("c", 4, b"\x00", ack_rel=0)        # keep-alive: one garbage byte below next
        c.seg("c", 5, b" world", ack_rel=0)
        s = c.one()
        assert s.client_data == b"hello world", policy
        assert s.overlaps == 0
        assert "T" in s.history


@pytest.mark.parametrize("isn", ISNS)
def test_gap_skipped_when_acked_past(isn: int) -> None:
    c = Conn(isn).handshake()
    c.seg("c", 0, b"aaaa", ack_rel=0)
    c.seg("c", 8, b"cccc", ack_rel=0)        # 4 bytes never captured
    c.seg("s", 0, flags="A", ack_rel=12)     # server acked past the hole
    c.seg("c", 12, b"dddd", ack_rel=0)
    s = c.one()
    assert s.client_data == b"aaaaccccdddd"
    assert s.gaps == [(4, 4, "client")]
    assert s.missed_bytes == 4 and "G" in s.history


@pytest.mark.parametrize("isn", ISNS)
def test_gap_skipped_at_close(isn: int) -> None:
    c = Conn(isn).handshake()
    c.seg("c", 0, b"aaaa", ack_rel=0)
    c.seg("c", 10, b"cccc", ack_rel=0)
    s = c.one()
    assert s.client_data == b"aaaacccc" and s.gaps == [(4, 6, "client")]


def test_ooo_limit_forces_gap() -> None:
    c = Conn(5, limits=Limits(ooo_bytes=100)).handshake()
    c.seg("c", 0, b"a" * 10, ack_rel=0)
    for i in range(5):
        c.seg("c", 20 + 30 * i, b"b" * 30, ack_rel=0)   # hole at 10..20 never filled
    t = c.t
    half = next(iter(t.flows.values()))
    assert half.flow.c.ooo_bytes <= 100
    s = c.one()
    assert s.client_data == b"a" * 10 + b"b" * 150
    assert s.gaps == [(10, 10, "client")]


def test_depth_limit_truncates_and_counts() -> None:
    c = Conn(5, limits=Limits(depth=6)).handshake()
    c.seg("c", 0, b"abcd", ack_rel=0).seg("c", 4, b"efgh", ack_rel=0)
    c.seg("c", 8, b"ijkl", ack_rel=0)
    s = c.one()
    assert s.client_data == b"abcdef" and s.truncated


def test_snaplen_truncation_is_a_gap() -> None:
    c = Conn(5).handshake()
    c.seg("c", 0, b"abcd", ack_rel=0, missing=96)   # 100-byte segment, 4 captured
    c.seg("c", 100, b"next", ack_rel=0)
    s = c.one()
    assert s.client_data == b"abcdnext"
    assert s.gaps == [(4, 96, "client")] and s.truncated


def test_syn_data_kept() -> None:
    c = Conn(77)
    c.seg("c", 0, b"fastopen", flags="S")
    c.seg("s", 0, flags="SA", ack_rel=8)
    c.seg("c", 8, b"more", ack_rel=0)
    assert c.one().client_data == b"fastopenmore"


def test_midstream_pickup_uses_port_rule() -> None:
    c = Conn(1000)
    c.seg("s", 50, b"response", ack_rel=30)
    c.seg("c", 30, b"req", ack_rel=58)
    s = c.one()
    assert s.client == ("10.0.0.1", 40000) and s.client_rule == "port"
    assert s.server_data == b"response" and s.client_data == b"req"
    assert s.state == "OTH"


def test_synack_receiver_is_client() -> None:
    c = Conn(1000)
    c.seg("s", 0, flags="SA", ack_rel=0)
    c.seg("c", 0, b"x", ack_rel=0)
    s = c.one()
    assert s.client_rule == "synack" and s.client == ("10.0.0.1", 40000)


def test_equal_ports_first_sender_is_client() -> None:
    c = Conn(1000, client=(C_IP, 179), server=(S_IP, 179))
    c.seg("s", 0, b"open", ack_rel=0)
    s = c.one()
    assert s.client_rule == "first" and s.client == ("10.0.0.2", 179)


def test_rst_closes_after_linger() -> None:
    c = Conn(9).handshake()
    c.seg("c", 0, b"data", ack_rel=0)
    c.seg("s", 0, flags="R")
    c.seg("c", 4, b"late", ack_rel=0, dt=1.0)     # straggler inside the 5 s linger
    c.seg("c", 8, b"x", ack_rel=0, dt=10.0)       # well after: the old stream is gone
    out = c.streams()
    assert [s.close_reason for s in out] == ["rst", "shutdown"]
    assert out[0].client_data == b"datalate" and out[0].state == "RSTR"
    assert out[1].client_data == b"x"


@pytest.mark.parametrize("state,idle,expect_split", [
    ("handshake", 29.0, False), ("handshake", 31.0, True),
    ("established", 599.0, False), ("established", 601.0, True),
])
def test_idle_timeouts_by_state(state: str, idle: float, expect_split: bool) -> None:
    c = Conn(3)
    c.seg("c", 0, flags="S")
    if state == "established":
        c.seg("s", 0, flags="SA", ack_rel=0).seg("c", 0, flags="A", ack_rel=0)
    c.seg("c", 0, b"x", ack_rel=0, dt=idle)
    out = c.streams()
    assert (len(out) == 2) == expect_split
    if expect_split:
        assert out[0].close_reason == "timeout"


def test_closing_timeout() -> None:
    c = Conn(3).handshake()
    c.seg("c", 0, flags="FA", ack_rel=0)
    c.seg("s", 0, b"x", ack_rel=1, dt=61.0)
    out = c.streams()
    assert [s.close_reason for s in out] == ["timeout", "shutdown"]


def test_timeout_fires_from_the_wheel_without_packets_of_that_flow() -> None:
    t = FlowTable(Limits())
    a = Conn(3, table=t).handshake()
    a.seg("c", 0, b"x", ack_rel=0)
    # another connection keeps time moving for 700 s
    b = Conn(9, table=t, client=(C_IP, 50000))
    b.ts = a.ts
    for _ in range(70):
        b.seg("c", 0, b"", flags="A", ack_rel=0, dt=10.0)
    done = t.done
    assert len(done) == 1 and done[0].close_reason == "timeout"
    assert done[0].client_data == b"x"


def test_port_reuse_new_isn_starts_new_stream() -> None:
    t = FlowTable(Limits())
    a = Conn(100, table=t).handshake()
    a.seg("c", 0, b"one", ack_rel=0)
    a.seg("c", 3, flags="FA", ack_rel=0).seg("s", 0, flags="FA", ack_rel=4)
    b = Conn(900000, table=t)
    b.ts = a.ts
    b.handshake().seg("c", 0, b"two", ack_rel=0)
    out = b.streams()
    assert [s.client_data for s in out] == [b"one", b"two"]
    assert out[0].close_reason == "fin"


def test_syn_retransmission_is_not_port_reuse() -> None:
    c = Conn(100)
    c.seg("c", 0, flags="S").seg("c", 0, flags="S", dt=1.0)
    c.seg("s", 0, flags="SA", ack_rel=0).seg("c", 0, b"x", ack_rel=0)
    s = c.one()
    assert s.client_data == b"x" and s.client_packets == 3


def test_max_flows_evicts_oldest_idle() -> None:
    t = FlowTable(Limits(max_flows=10))
    for i in range(12):
        Conn(i, table=t, t0=1000.0 + i, client=(C_IP, 1000 + i)).handshake()
    assert t.nflows <= 10
    ev = [s for s in t.done if s.close_reason == "evicted"]
    assert ev and ev[0].client[1] == 1000
    assert t.stats["evicted_max_flows"] == len(ev)


def test_memory_cap_evicts() -> None:
    t = FlowTable(Limits(memory=10_000))
    for i in range(5):
        Conn(i, table=t, t0=1000.0 + i, client=(C_IP, 2000 + i)).handshake().seg(
            "c", 0, b"z" * 3000, ack_rel=0)
    assert t.mem <= 10_000
    assert t.stats["evicted_memory"] >= 1
    assert all(s.close_reason == "evicted" for s in t.done)


def test_emit_empty_false_drops_payloadless() -> None:
    c = Conn(1, limits=Limits(emit_empty=False))
    c.seg("c", 0, flags="S").seg("s", 0, flags="RA", ack_rel=0)
    assert c.streams() == []
    c = Conn(1)
    c.seg("c", 0, flags="S").seg("s", 0, flags="RA", ack_rel=0)
    s = c.one()
    assert s.close_reason == "rst" and s.state == "REJ"


def test_ipv6_flow() -> None:
    src = bytes(15) + b"\x01"
    dst = bytes(15) + b"\x02"
    t = FlowTable(Limits())
    t.packet(1.0, (6, src, dst, 5555, 443, 10, 0, 0x02, 100, b"", 0, b""))
    t.packet(1.1, (6, src, dst, 5555, 443, 11, 0, 0x18, 100, b"hi6", 0, b""))
    t.flush()
    s = t.done[0]
    assert s.client == ("::1", 5555) and s.ip_version == 6 and s.client_data == b"hi6"


def test_zero_linger_closes_at_the_next_advance() -> None:
    t = FlowTable(Limits(rst_linger=0.0))
    a = Conn(5, table=t).handshake()
    a.seg("c", 0, b"bye", ack_rel=0).seg("s", 0, flags="R")
    assert t.done == []          # the RST's own packet does not close it
    t.advance(a.ts + 0.001)
    assert [s.close_reason for s in t.done] == ["rst"] and t.nflows == 0
    assert t.done[0].client_data == b"bye"


# -- late fill (DESIGN "Pinned details": a skipped hole stays fillable until emit) -------------

LATE_ISNS = [*ISNS, 2**32 - 6]   # 2^32-6: the hole at offsets 4..8 straddles the wrap


def client_half(c: Conn):
    return c.t.flows[(C_IP, C_PORT, S_IP, S_PORT)]


def skipped_hole(isn: int, policy: str = "first", **limits) -> Conn:
    """aaaa, a 4-byte hole at 4..8 the server ACKs past, then cccc: the hole is skipped."""
    c = Conn(isn, limits=Limits(overlap=policy, **limits)).handshake()
    c.seg("c", 0, b"aaaa", ack_rel=0)
    c.seg("c", 8, b"cccc", ack_rel=0)
    c.seg("s", 0, flags="A", ack_rel=12)
    assert client_half(c).gaps == [(4, 4, 4)]        # skipped, not waited on
    return c


@pytest.mark.parametrize("isn", LATE_ISNS)
@pytest.mark.parametrize("policy", ["first", "last"])
def test_segment_after_the_ack_that_covers_it_is_filled_in_place(isn: int, policy: str) -> None:
    c = skipped_hole(isn, policy)
    c.seg("c", 4, b"bbbb", ack_rel=0)                # the SPAN port delivered it after the ACK
    c.seg("c", 12, b"dddd", ack_rel=0)
    assert c.t.stats["late_filled_segments"] == 1 and c.t.stats["late_filled_bytes"] == 4
    s = c.one()
    assert s.client_data == b"aaaabbbbccccdddd"
    assert s.gaps == [] and s.missed_bytes == 0
    assert "G" not in s.history and "T" not in s.history
    assert s.retransmitted_bytes == 0 and c.t.gap_bytes == 0


@pytest.mark.parametrize("isn", LATE_ISNS)
@pytest.mark.parametrize("rel,data,gaps,expect", [
    (8, b"XXXX", [(4, 4, "client"), (8, 4, "client")], b"aaaaXXXXcccc"),     # middle: split
    (4, b"XXXX", [(8, 8, "client")], b"aaaaXXXXcccc"),                       # head
    (12, b"XXXX", [(4, 8, "client")], b"aaaaXXXXcccc"),                      # tail
    (6, b"XXXXXXXX", [(4, 2, "client"), (12, 2, "client")], b"aaaaXXXXXXXXcccc"),
])
def test_partial_late_fill_shrinks_the_gap(isn: int, rel: int, data: bytes, gaps: list,
                                           expect: bytes) -> None:
    c = Conn(isn).handshake()
    c.seg("c", 0, b"aaaa", ack_rel=0)
    c.seg("c", 16, b"cccc", ack_rel=0)
    c.seg("s", 0, flags="A", ack_rel=20)             # hole 4..16 skipped
    c.seg("c", rel, data, ack_rel=0)
    s = c.one()
    assert s.client_data == expect and s.gaps == gaps
    assert s.missed_bytes == 12 - len(data) and "G" in s.history


@pytest.mark.parametrize("isn", LATE_ISNS)
def test_filling_an_earlier_gap_moves_the_offsets_of_later_ones(isn: int) -> None:
    c = Conn(isn).handshake()
    c.seg("c", 0, b"aaaa", ack_rel=0)
    c.seg("c", 8, b"bbbb", ack_rel=0)
    c.seg("s", 0, flags="A", ack_rel=12)             # hole 4..8
    c.seg("c", 16, b"cccc", ack_rel=0)
    c.seg("s", 0, flags="A", ack_rel=20)             # hole 12..16
    assert [g[2] for g in client_half(c).gaps] == [4, 8]
    c.seg("c", 4, b"XXXX", ack_rel=0)
    s = c.one()
    assert s.client_data == b"aaaaXXXXbbbbcccc"
    assert s.gaps == [(12, 4, "client")]             # was at 8 in the delivered bytes


@pytest.mark.parametrize("isn", LATE_ISNS)
@pytest.mark.parametrize("policy,expect,overlaps", [
    ("first", b"aaaaXXXXcccc", 1), ("last", b"aaaaYYYYcccc", 1),
])
def test_overlap_policy_applies_to_late_bytes(isn: int, policy: str, expect: bytes,
                                              overlaps: int) -> None:
    c = skipped_hole(isn, policy)
    c.seg("c", 4, b"XXXX", ack_rel=0)                # late: fills the hole
    c.seg("c", 4, b"YYYY", ack_rel=0)                # a second, conflicting late copy
    s = c.one()
    assert s.client_data == expect and s.gaps == [] and s.overlaps == overlaps
    assert c.t.stats["late_filled_segments"] == 1


@pytest.mark.parametrize("isn", LATE_ISNS)
@pytest.mark.parametrize("policy,expect", [
    ("first", b"aaaabbbbcccc"), ("last", b"aaZZbbbbcccc"),
])
def test_late_segment_straddling_delivered_bytes_and_the_hole(isn: int, policy: str,
                                                               expect: bytes) -> None:
    c = skipped_hole(isn, policy)
    c.seg("c", 2, b"ZZbbbb", ack_rel=0)              # 2..4 delivered (conflicts), 4..8 late
    s = c.one()
    assert s.client_data == expect and s.gaps == [] and s.overlaps == 1
    assert s.retransmitted_bytes == 2


def test_late_bytes_for_an_emitted_stream_change_nothing() -> None:
    c = skipped_hole(5)
    c.seg("c", 12, flags="FA", ack_rel=0).seg("s", 0, flags="FA", ack_rel=13)
    c.seg("c", 13, flags="A", ack_rel=1)
    c.seg("s", 1, flags="A", ack_rel=13, dt=6.0)     # past the FIN linger: the stream is emitted
    assert len(c.t.done) == 1
    first = c.t.done[0]
    c.seg("c", 4, b"bbbb", ack_rel=0)                # far too late: a straggler of its own
    out = c.streams()
    assert out[0] is first and first.client_data == b"aaaacccc"
    assert first.gaps == [(4, 4, "client")] and "G" in first.history
    assert c.t.stats["late_filled_segments"] == 0
    assert [s.client_data for s in out[1:]] == [b"bbbb"]


def test_late_fill_counts_against_memory() -> None:
    c = skipped_hole(5)
    before = c.t.mem
    c.seg("c", 4, b"bbbb", ack_rel=0)
    assert c.t.mem == before + 4
    c.one()
    assert c.t.mem == 0


def test_late_fill_past_the_memory_cap_evicts_an_idle_flow() -> None:
    # the cap counts each flow at FLOW_BYTES plus its bytes: two flows, 2 + 8 bytes held
    t = FlowTable(Limits(memory=2 * FLOW_BYTES + 12))
    Conn(9, table=t, t0=900.0, client=(C_IP, 999)).handshake().seg("c", 0, b"zz", ack_rel=0)
    c = Conn(5, table=t).handshake()
    c.seg("c", 0, b"aaaa", ack_rel=0).seg("c", 8, b"cccc", ack_rel=0).seg("s", 0, flags="A",
                                                                          ack_rel=12)
    assert t.stats["evicted_memory"] == 0
    c.seg("c", 4, b"bbbb", ack_rel=0)                # 14 > 12: checked before, the idle one goes
    assert t.stats["evicted_memory"] == 1
    assert [(s.client[1], s.close_reason, s.client_data) for s in t.done] == [
        (999, "evicted", b"zz")]
    assert t.mem == FLOW_BYTES + 12
    t.done.clear()
    assert c.one().client_data == b"aaaabbbbcccc" and t.mem == 0


def test_late_fill_respects_the_depth_and_counts_what_it_refuses() -> None:
    c = skipped_hole(5, depth=10)                    # 8 bytes held, 2 of room
    c.seg("c", 4, b"bbbb", ack_rel=0)
    assert c.t.stats["late_filled_bytes"] == 2
    assert c.t.stats["late_dropped_bytes"] == 2
    s = c.one()
    assert s.client_data == b"aaaabbcccc" and len(s.client_data) == 10
    assert s.gaps == [(6, 2, "client")] and s.truncated
