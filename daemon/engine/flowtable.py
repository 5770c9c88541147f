# cython: annotation_typing=False
# (flowtable.pxd types the compiled module; the annotations here are for mypy and readers)
"""The flow table of one shard: connection lookup, TCP state, close, timeouts and limits.

Every capture batch goes through `FlowTable.feed`, whose loop is the hot path (DESIGN "Capture":
decode plus flow dict plus in-order append is most of the time budget), so it is written flat:
one dict lookup on the directional 4-tuple, a handful of compares, an append. Everything else
(handshake, FIN/RST, retransmission, out-of-order, new flows, timeouts) is in `_slow` and in
`reassembly`, which the common packet never reaches.
"""

from __future__ import annotations

import heapq
import os
import socket
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import cython

from streamtap.config import Config
from streamtap.engine import reassembly as ra
from streamtap.engine.decode import TH_ACK, TH_FIN, TH_PUSH, TH_RST, TH_SYN, TH_URG
from streamtap.engine.pcapfmt import META, META_LEN
from streamtap.engine.reassembly import MASK32, UNLIMITED, Half
from streamtap.engine.stream import Stream
from streamtap.engine.wheel import TimerEntry, TimerWheel

# flow states; each has its own idle timeout
HANDSHAKE = 0
ESTABLISHED = 1
CLOSING = 2      # one FIN seen
CLOSED = 3       # FIN both ways or RST: lingering for stragglers

# Zeek history letters; upper case for the client, lower for the server. Bit per letter so the
# hot path can test "already recorded" with one AND.
LETTERS = "SHADFRTGWQ"
BIT = {ch: 1 << i for i, ch in enumerate(LETTERS)}
BIT_A = BIT["A"]
BIT_D = BIT["D"]

# Per-flow state as the memory cap counts it (measured with tracemalloc on 10,000 flows, the
# table's dict entry and key included: tests/test_memory.py keeps these honest). A flow seen as
# one pure SYN is an `Embryo`; anything more makes it a full `Flow` with its two `Half`s.
EMBRYO_BYTES = 400
FLOW_BYTES = 1536
# A pure SYN: none of the other flags that change a flow (ECE/CWR, ECN negotiation, may be set)
SYN_ONLY_MASK = TH_FIN | TH_SYN | TH_RST | TH_PUSH | TH_ACK | TH_URG
# Emergency mode (Suricata's): once the memory cap is hit, idle timeouts are divided by this
# until the accounted memory falls back under EMERGENCY_EXIT of the cap.
EMERGENCY_DIVISOR = 10
EMERGENCY_EXIT = 0.7
# Past the cap, evictions free memory down to this fraction of it, so that a table at its cap
# does not evict on every packet.
EVICT_TARGET = 0.9


@dataclass(frozen=True)
class Limits:
    """The reassembly settings the table needs, decoupled from the config schema (Zeek's Z-note:
    pass a limits object in, never read globals)."""

    overlap: str = "first"
    emit_empty: bool = True
    keep_packets: bool = False
    handshake: float = 30.0
    established: float = 600.0
    closing: float = 60.0
    rst_linger: float = 5.0
    fin_linger: float = 5.0
    max_flows: int = 1_000_000
    depth: int = 0
    ooo_bytes: int = 1 << 20
    memory: int = 1 << 30
    # `memory` is the cap of all workers together: each of `workers` tables enforces
    # memory // workers (no shared counter: nothing to lock, and fanout spreads flows evenly)
    workers: int = 1
    part_bytes: int = 64 << 20
    part_interval: float = 600.0

    @classmethod
    def from_config(cls, cfg: Config, workers: int | None = None) -> Limits:
        """`workers`: how many tables share the memory cap; None = `capture.workers` as the
        supervisor reads it (0 = one per CPU core)."""
        r = cfg.reassembly
        t, lim = r.timeouts, r.limits
        if workers is None:
            workers = cfg.capture.workers or os.cpu_count() or 1
        return cls(
            overlap=r.overlap, emit_empty=r.emit_empty, keep_packets=r.keep_packets,
            handshake=t.handshake, established=t.established, closing=t.closing,
            rst_linger=t.rst_linger, fin_linger=t.fin_linger,
            max_flows=lim.max_flows, depth=lim.depth, ooo_bytes=lim.ooo_bytes,
            memory=lim.memory, workers=max(1, workers),
            part_bytes=r.part_bytes, part_interval=r.part_interval,
        )


class Embryo:
    """A flow seen as one pure SYN, nothing else: the compact form a SYN flood's flows stay in.

    The table maps the SYN's key to it; every field of the full flow it would be is implied
    (client = the SYN's sender, history "S", one packet). Its idle test in the hot path always
    fails (`timeout` is -inf), so the next packet of the flow reaches `FlowTable._slow`, which
    turns it into a full `Flow` (`_hatch`) before handling the packet as usual. Its timer is
    the table's FIFO of embryos (they all share the handshake timeout), not a wheel entry.

    It holds its key's four parts, not the key tuple: addresses and numbers can be in no
    reference cycle, so the compiled type is not tracked by the cyclic GC (a SYN flood holds
    hundreds of thousands of embryos; tracked, collections were a third of the run).
    """

    __slots__ = ("src", "sport", "dst", "dport", "live", "first", "isn", "linktype")
    last = 0.0
    timeout = float("-inf")

    def __init__(self, key: tuple, first: float, isn: int, linktype: int) -> None:
        self.src, self.sport, self.dst, self.dport = key
        self.live = True        # False once hatched or closed (its FIFO entry is then stale)
        self.first = first
        self.isn = isn
        self.linktype = linktype

    @property
    def key(self) -> tuple | None:
        """Its key in the table; None once hatched or closed."""
        return (self.src, self.sport, self.dst, self.dport) if self.live else None

    @property
    def flow(self) -> Embryo:
        return self


class Flow:
    __slots__ = (
        "c", "s", "version", "first", "last", "state", "timeout", "entry", "reason",
        "hist", "rule", "pkts", "linktype", "trunc", "part", "pstart",
    )

    def __init__(self, c: Half, s: Half, version: int, ts: float, rule: str) -> None:
        self.c = c
        self.s = s
        self.version = version
        self.first = ts
        self.last = ts
        self.state = ESTABLISHED
        self.timeout = 0.0
        self.entry = TimerEntry(self)
        self.reason = ""
        self.hist = ""         # history letters (a str: most flows have two or three)
        self.rule = rule
        self.pkts: list | None = None
        self.linktype = 1
        self.trunc = False     # snaplen cut some payload (recorded as a gap too)
        self.part = 0          # number of the part being filled (DESIGN "Parts")
        self.pstart = ts       # when it started: the flow's first packet, then each part's emit


def _ip(b: bytes) -> str:
    """The address as text. IPv4 is formatted here (inet_ntop's dotted quad exactly): twice
    per stream, a SYN flood's half a million streams felt the call."""
    if len(b) == 4:
        return f"{b[0]}.{b[1]}.{b[2]}.{b[3]}"
    return socket.inet_ntop(socket.AF_INET6, b)


ALWAYS_REPORTED = ("flows", "empty_dropped", "gaps", "memory_limit_hits", "depth_dropped_bytes",
                   "ooo_limit_hits", "late_filled_segments", "late_filled_bytes",
                   "late_dropped_bytes", "part_late_bytes",
                   "evicted_max_flows", "evicted_memory", "evicted_emergency",
                   "emergency_entered")


class FlowTable:
    """One shard's connections. `packet()` per decoded TCP segment; completed streams are
    handed to `emit`."""

    def __init__(
        self,
        limits: Limits | None = None,
        emit: Callable[[Stream], None] | None = None,
        interface: str | None = None,
    ) -> None:
        self.limits = lim = limits or Limits()
        self.emit = emit or self._collect
        self.done: list[Stream] = []
        self.interface = interface
        # key -> Half, or an Embryo (which the hot path can treat as a half: its idle test fails)
        self.flows: dict[tuple, Any] = {}
        self.embryos: deque[Embryo] = deque()   # in creation order = handshake deadline order
        self._servers: dict[tuple, tuple] = {}  # (addr, port) -> itself: shared by embryo keys
        self.nflows = 0
        # bytes accounted to this table: every buffer (Zeek's total_size) plus each open flow
        # at its measured size (EMBRYO_BYTES, FLOW_BYTES)
        self.mem = 0
        self.emergency = False
        self.gap_bytes = 0           # missed bytes of emitted streams
        self.set_limits(lim)
        self.wheel: TimerWheel | None = None
        self.now = float("-inf")
        self._next_advance = float("-inf")
        self._due: list[Flow] = []   # flows whose timeout was already due when set
        # counters that are rare on purpose start at 0, so stats() and /metrics show them before
        # the first event (a Counter key appears only once incremented)
        self.stats: Counter[str] = Counter(dict.fromkeys(ALWAYS_REPORTED, 0))
        self.linktype = 1
        # keep_packets: the decoders put here the frames of a reassembled IP datagram's earlier
        # fragments (see `Decoder.frag_frames`); the segment's flow takes them with its frame.
        self.frag_frames: list[tuple[float, int, bytes]] = []

    def set_limits(self, lim: Limits) -> None:
        """Derive the values the hot path reads (0 = unlimited) from `lim`. Called again on a
        reload: open flows get the new timeouts as their state next changes (or now, via
        `Reassembler.reconfigure`); new flows get the new depth."""
        self.limits = lim
        self.ooo_limit = lim.ooo_bytes or UNLIMITED
        self.mem_cap = lim.memory // max(1, lim.workers) if lim.memory else UNLIMITED
        self.max_flows = lim.max_flows or UNLIMITED
        self.depth = lim.depth or UNLIMITED
        self.part_max = lim.part_bytes or UNLIMITED
        self.part_interval = lim.part_interval or 0.0
        self.last = lim.overlap == "last"
        self.normal_timeouts = {
            HANDSHAKE: lim.handshake, ESTABLISHED: lim.established, CLOSING: lim.closing,
        }
        self.timeouts = self._scaled_timeouts()
        # a pure SYN may stay an Embryo only if nothing needs its frame
        self.embryo_ok = not lim.keep_packets

    def _scaled_timeouts(self) -> dict[int, float]:
        if not getattr(self, "emergency", False):
            return dict(self.normal_timeouts)
        return {k: v / EMERGENCY_DIVISOR for k, v in self.normal_timeouts.items()}

    def _collect(self, s: Stream) -> None:
        self.done.append(s)

    # -- the hot path -------------------------------------------------------------------------

    @cython.locals(
        nrec=cython.Py_ssize_t, i=cython.Py_ssize_t, mi=cython.p_uint, mp=cython.p_uchar,
        sec=cython.double, usec=cython.double, off=cython.Py_ssize_t, caplen=cython.Py_ssize_t,
        end=cython.Py_ssize_t, ts=cython.double, next_adv=cython.double, seq=cython.longlong,
        ack=cython.longlong, flags=cython.int, missing=cython.longlong, n=cython.longlong,
        mem=cython.longlong, mem_cap=cython.longlong, part_max=cython.longlong,
        keep=cython.bint, h=Half, f=Flow, mask=cython.longlong, dec=tuple, bit_a=cython.int,
        bit_d=cython.int, handshake=cython.int, established=cython.int,
    )
    def feed(self, decode: Callable, data: bytes, meta: bytes) -> None:
        """A capture batch: `meta` holds (sec, usec, offset, caplen) records into `data`, and
        `decode(data, start, end, ts)` turns a frame into a TCP tuple (or None).

        This loop is the fast path of the whole program, so it is written flat on purpose:
        attributes hoisted into locals, the in-order append inlined, and everything rare
        (handshake, FIN/RST, retransmission, out of order, new flows, embryos) sent to `_slow`
        or `_data`. Those may change `_next_advance`, hence the reloads after them. Compiled,
        the halves and flows are C structs and the batch's records are read in place.
        """
        flows: dict = self.flows
        keep = self.limits.keep_packets
        held = self.frag_frames
        mem_cap = self.mem_cap
        part_max = self.part_max
        next_adv = self._next_advance
        mask = MASK32
        bit_a, bit_d = BIT_A, BIT_D
        handshake, established = HANDSHAKE, ESTABLISHED
        nrec = len(meta) // META_LEN
        unpack = META.unpack_from
        if cython.compiled:
            if type(meta) is not bytes:
                meta = bytes(meta)
            mp = meta
            mi = cython.cast(cython.p_uint, mp)
        for i in range(nrec):
            if cython.compiled:
                sec = mi[4 * i]
                usec = mi[4 * i + 1]
                off = mi[4 * i + 2]
                caplen = mi[4 * i + 3]
            else:
                sec, usec, off, caplen = unpack(meta, i * META_LEN)
            ts = sec + usec * 1e-6
            end = off + caplen
            dec = decode(data, off, end, ts)
            if dec is None:
                continue
            if ts >= next_adv:
                self.advance(ts)
                next_adv = self._next_advance
            _v, src, dst, sport, dport, seq, ack, flags, _win, payload, missing, _o = dec
            o = flows.get((src, sport, dst, dport))
            if o is None or flags & 0x07 or missing or type(o) is Embryo:
                self._slow(ts, dec, o, data[off:end] if keep else None)
                next_adv = self._next_advance
                continue
            h = o
            f = h.flow
            if ts - f.last >= f.timeout:
                self._slow(ts, dec, h, data[off:end] if keep else None)
                next_adv = self._next_advance
                continue
            f.last = ts
            h.packets += 1
            if keep:
                if held:
                    _insert_frames(f.pkts, held)
                f.pkts.append((ts, caplen, data[off:end]))
            if flags & 0x10:  # ACK
                if h.peer.ooo:
                    ra.ack_passed(h.peer, ack, self)
                if f.state == handshake and h.next >= 0:
                    self._set_state(f, established)
                    next_adv = self._next_advance
            if payload:
                n = len(payload)
                mem = self.mem + n
                # the memory cap is checked before the bytes are taken; over it, `_data` evicts
                if seq == h.next and n <= h.room and not h.ooo and mem <= mem_cap:
                    h.buf += payload
                    h.room -= n
                    h.off += n
                    h.next = (seq + n) & mask
                    self.mem = mem
                    if len(h.buf) >= part_max:
                        self._part(f, ts)
                        next_adv = self._next_advance
                else:
                    self._data(h, seq, payload, 0)
                    next_adv = self._next_advance
                if not h.seen & bit_d:
                    self.letter(h, "D")
                if h.next < 0:
                    h.next = (seq + n) & mask
                    h.off = n
            else:
                if not h.seen & bit_a and flags & 0x10:
                    self.letter(h, "A")
                if h.next < 0:
                    h.next = seq
                    h.off = 0

    def packet(self, ts: float, dec: tuple, frame: bytes | None = None) -> None:
        """One already decoded segment (library `feed`, tests): a batch of one, so the fast
        path above stays the only implementation."""
        frame = frame or b""
        sec = int(ts)
        usec = min(round((ts - sec) * 1e6), 999_999)
        self.feed(lambda *_: dec, frame, META.pack(sec, usec, 0, len(frame)))

    # -- everything else ----------------------------------------------------------------------

    def letter(self, h: Half, ch: str) -> None:
        bit = BIT[ch]
        if not h.seen & bit:
            h.seen |= bit
            h.flow.hist += ch if h.is_client else ch.lower()

    def unletter(self, h: Half, ch: str) -> None:
        """Take back a letter that no longer holds (a `G` whose gaps were all filled late); it
        is recorded again, at its new place, if it happens again."""
        bit = BIT[ch]
        if h.seen & bit:
            h.seen &= ~bit
            h.flow.hist = h.flow.hist.replace(ch if h.is_client else ch.lower(), "", 1)

    def _data(self, h: Half, seq: int, payload: bytes, missing: int) -> None:
        if h.next < 0:
            # first bytes of a direction picked up mid-stream: they define its start
            h.next = seq
            h.off = 0
        f = h.flow
        if missing:
            f.trunc = True
        if self.mem + len(payload) > self.mem_cap:
            self._over_memory(len(payload), f)
        before = h.retrans
        if (
            len(payload) <= 1 and not missing and h.off > 0
            and ((h.next - seq) & MASK32) == 1
        ):
            # keep-alive: one garbage byte (or none) just below the window; never stream data
            h.retrans += len(payload)
        else:
            ra.segment(h, seq, payload, missing, self.last, self)
        if h.retrans > before:
            self.letter(h, "T")
        if len(h.buf) >= self.part_max:
            self._part(f, f.last)

    def _slow(self, ts: float, dec: tuple, h: Half | None, frame: bytes | None) -> None:
        version, src, dst, sport, dport, seq, ack, flags, win, payload, missing, _o = dec
        if h is None:
            # the answer to a flow seen as one SYN: its key is the other direction's
            e = self.flows.get((dst, dport, src, sport))
            if type(e) is Embryo:
                self._hatch(e)
                h = self.flows[(src, sport, dst, dport)]
            elif (
                flags & SYN_ONLY_MASK == TH_SYN and not payload and not missing and self.embryo_ok
                and (src != dst or sport != dport)
            ):
                # a flood's SYNs go to few servers: their end of the key is shared
                srv = self._servers.get((dst, dport))
                if srv is None:
                    if len(self._servers) >= 4096:
                        self._servers.clear()
                    srv = self._servers[(dst, dport)] = (dst, dport)
                self._new_embryo(ts, (src, sport, srv[0], srv[1]), seq)
                return
        elif type(h) is Embryo:
            h = self._hatch(h)
        syn = flags & TH_SYN
        pure_syn = syn and not flags & TH_ACK
        if h is not None:
            f = h.flow
            if ts - f.last >= f.timeout:
                self._close(f, f.reason if f.state == CLOSED else "timeout")
                h = None
            elif pure_syn and (
                (h.isn >= 0 and seq != h.isn)
                or (h.isn < 0 and h.next >= 0 and seq != ((h.next - 1) & MASK32))
                or (h.next < 0 and f.state == CLOSED)
            ):
                # port reuse: a new SYN with another ISN starts a new connection (tshark does too)
                self._close(f, f.reason or self._implicit_reason(f))
                h = None
        if h is None:
            h = self._new_flow(ts, version, src, sport, dst, dport, flags)
        f = h.flow
        if ts > f.last:
            f.last = ts
        h.packets += 1
        if f.pkts is not None and frame is not None:
            if self.frag_frames:
                _insert_frames(f.pkts, self.frag_frames)
            f.pkts.append((ts, len(frame) + missing, frame))
        peer = h.peer
        if syn:
            if flags & TH_FIN or flags & TH_RST:
                self.letter(h, "Q")
            self.letter(h, "H" if flags & TH_ACK else "S")
            if h.isn < 0 and (h.next < 0 or h.off == 0 and not h.buf):
                h.isn = seq
                h.syn = True
                h.next = (seq + 1) & MASK32
                h.off = 0
            seq = (seq + 1) & MASK32
        if flags & TH_ACK:
            if peer.ooo:
                ra.ack_passed(peer, ack, self)
            if f.state == HANDSHAKE and not syn and h.next >= 0:
                self._set_state(f, ESTABLISHED)
            if not payload and not flags & (TH_SYN | TH_FIN | TH_RST):
                self.letter(h, "A")
        if win == 0 and not flags & (TH_SYN | TH_RST):
            self.letter(h, "W")
        if flags & TH_RST:
            # RFC 1122 4.2.2.12: data on a RST is diagnostic text, not stream data
            self.letter(h, "R")
            h.rst = True
            if f.state != CLOSED:
                f.reason = "rst"
                self._set_state(f, CLOSED, self.limits.rst_linger)
            return
        if payload or missing:
            self._data(h, seq, payload, missing)
            self.letter(h, "D")
        elif h.next < 0:
            h.next = seq
            h.off = 0
        if flags & TH_FIN:
            self.letter(h, "F")
            if not h.fin:
                h.fin = True
                h.fin_off = ra.rel_offset(h, (seq + len(payload) + missing) & MASK32)
                if peer.fin:
                    if f.state != CLOSED:
                        f.reason = "fin"
                        self._set_state(f, CLOSED, self.limits.fin_linger)
                elif f.state != CLOSED:
                    self._set_state(f, CLOSING)

    @staticmethod
    def _implicit_reason(f: Flow) -> str:
        if f.c.rst or f.s.rst:
            return "rst"
        if f.c.fin or f.s.fin:
            return "fin"
        return "timeout"

    def _new_embryo(self, ts: float, key: tuple, isn: int) -> None:
        if self.nflows >= self.max_flows:
            self._evict(max(1, self.max_flows // 100), "max_flows")
        if self.mem + EMBRYO_BYTES > self.mem_cap:
            self._over_memory(EMBRYO_BYTES, None)
        e = Embryo(key, ts, isn, self.linktype)
        self.flows[key] = e
        self.embryos.append(e)
        self.nflows += 1
        self.mem += EMBRYO_BYTES
        self.stats["flows"] += 1

    def _hatch(self, e: Embryo) -> Half:
        """Turn an embryo into the full flow its SYN would have made (the SYN's effects,
        replayed); returns the client half."""
        key = (e.src, e.sport, e.dst, e.dport)
        del self.flows[key]
        e.live = False   # its FIFO entry is now stale (skipped when reached)
        self.nflows -= 1
        self.mem -= EMBRYO_BYTES
        src, sport, dst, dport = key
        linktype, self.linktype = self.linktype, e.linktype
        try:
            h = self._new_flow(e.first, 4 if len(src) == 4 else 6, src, sport, dst, dport,
                               TH_SYN, hatch=True)
        finally:
            self.linktype = linktype
        h.packets = 1
        self.letter(h, "S")
        h.isn = e.isn
        h.syn = True
        h.next = (e.isn + 1) & MASK32
        h.off = 0
        return h

    def _close_embryo(self, e: Embryo, reason: str) -> None:
        key = (e.src, e.sport, e.dst, e.dport)
        del self.flows[key]
        e.live = False
        self.nflows -= 1
        self.mem -= EMBRYO_BYTES
        self.stats["streams_" + reason] += 1
        if not self.limits.emit_empty:
            self.stats["empty_dropped"] += 1
            return
        src, sport, dst, dport = key
        # what `_close` makes of the full flow (tests/test_memory.py compares the two)
        self.emit(Stream(
            client=(_ip(src), sport), server=(_ip(dst), dport),
            client_data=b"", server_data=b"", close_reason=reason, gaps=[],
            start=e.first, end=e.first, ip_version=4 if len(src) == 4 else 6,
            client_packets=1, server_packets=0, client_rule="syn", history="S", state="S0",
            interface=self.interface, linktype=e.linktype,
        ))

    def _new_flow(
        self, ts: float, version: int, src: bytes, sport: int, dst: bytes, dport: int, flags: int,
        hatch: bool = False,
    ) -> Half:
        if self.nflows >= self.max_flows and not hatch:
            self._evict(max(1, self.max_flows // 100), "max_flows")
        if self.mem + FLOW_BYTES > self.mem_cap:
            self._over_memory(FLOW_BYTES, None)
        room = self.depth
        a = Half(src, sport, room)
        b = Half(dst, dport, room)
        a.peer, b.peer = b, a
        # Who opened the connection (DESIGN "Pinned details": client without a SYN)
        if flags & TH_SYN and not flags & TH_ACK:
            client, rule = a, "syn"
        elif flags & TH_SYN:
            client, rule = b, "synack"
        elif sport != dport:
            client, rule = (a if sport > dport else b), "port"
        else:
            client, rule = a, "first"
        server = b if client is a else a
        client.is_client = True
        f = Flow(client, server, version, ts, rule)
        f.linktype = self.linktype
        a.flow = b.flow = f
        if self.limits.keep_packets:
            f.pkts = []
        # A "land" packet (same address and port at both ends) gives both halves one key: the
        # client must hold it, or flush and eviction (which look for client halves) never find
        # the flow and it is never emitted.
        self.flows[(server.ip, server.port, client.ip, client.port)] = server
        self.flows[(client.ip, client.port, server.ip, server.port)] = client
        self.nflows += 1
        self.mem += FLOW_BYTES
        if not hatch:
            self.stats["flows"] += 1
        self._set_state(f, HANDSHAKE if flags & TH_SYN else ESTABLISHED)
        return self.flows[(src, sport, dst, dport)]

    def _set_state(self, f: Flow, state: int, timeout: float | None = None) -> None:
        f.state = state
        f.timeout = self.timeouts[state] if timeout is None else timeout
        deadline = self._deadline(f)
        if self.wheel is not None and (
            not f.entry.scheduled or deadline < f.entry.deadline
        ) and not self.wheel.schedule(f.entry, deadline):
            # already due (a zero linger): the next advance closes it
            self._due.append(f)
            self._next_advance = float("-inf")

    def _deadline(self, f: Flow) -> float:
        """When the flow's timer must next fire: its idle timeout, or its part interval."""
        deadline = f.last + f.timeout
        if self.part_interval and f.state != CLOSED:
            deadline = min(deadline, f.pstart + self.part_interval)
        return deadline

    def _timeout_reason(self, f: Flow | Embryo, idle: float) -> str:
        """"timeout", or "evicted" for a flow that expired only because emergency mode
        shortened its timeout (counted as an eviction for the memory cap)."""
        state = f.state if type(f) is Flow else HANDSHAKE  # type: ignore[union-attr]
        if self.emergency and idle < self.normal_timeouts[state]:
            self.stats["evicted_emergency"] += 1
            return "evicted"
        return "timeout"

    def advance(self, now: float) -> None:
        """Move time forward (packet time offline, wall clock live) and close what expired.
        Expiry is lazy: an entry that fires before its flow's real deadline is re-armed."""
        wheel = self.wheel
        if wheel is None:
            self.wheel = wheel = TimerWheel(tick=1.0, slots=64, start=now)
            for open_flow in self.open_flows():
                wheel.schedule(open_flow.entry, self._deadline(open_flow))
        if now > self.now:
            self.now = now
        self._next_advance = now + 0.5
        for e in wheel.advance(now):
            f: Flow = e.payload  # type: ignore[assignment]
            if f.last + f.timeout <= now:
                if f.state == CLOSED:
                    self._close(f, f.reason)
                else:
                    self._close(f, self._timeout_reason(f, now - f.last))
                continue
            if self.part_interval and f.pstart + self.part_interval <= now and (
                    f.state != CLOSED):
                self._part(f, now)
            wheel.schedule(e, self._deadline(f))
        # flows whose timeout was already due when set (see _set_state); a flow closed since,
        # or scheduled again by a later state change, needs nothing more
        due, self._due = self._due, []
        for f in due:
            if f.c.flow is not f or f.entry.scheduled:
                continue
            if f.last + f.timeout <= now:
                self._close(f, f.reason if f.state == CLOSED else "timeout")
                continue
            if self.part_interval and f.pstart + self.part_interval <= now and (
                    f.state != CLOSED):
                self._part(f, now)
            wheel.schedule(f.entry, self._deadline(f))
        # embryos expire in creation order: they share the handshake timeout
        embryos = self.embryos
        limit = now - self.timeouts[HANDSHAKE]
        while embryos:
            em = embryos[0]
            if not em.live:       # hatched or closed already
                embryos.popleft()
                continue
            if em.first > limit:
                break
            embryos.popleft()
            self._close_embryo(em, self._timeout_reason(em, now - em.first))
        if self.emergency and self.mem <= self.mem_cap * EMERGENCY_EXIT:
            self._set_emergency(False)

    def open_flows(self) -> list[Flow]:
        """The full flows open in this table (embryos aside), in the table's order."""
        return [h.flow for h in self.flows.values()
                if type(h) is not Embryo and h.is_client and h.flow.c is h]

    def _evict(self, count: int, why: str, keep: Flow | None = None) -> int:
        """Close up to `count` flows, counted by why (Suricata's memcap habit): half-open
        flows first (embryos oldest first, then flows still in their handshake), then those
        idle the longest. `keep` (the flow being fed) is spared. Returns how many went."""
        n = 0
        embryos = self.embryos
        while n < count and embryos:
            e = embryos.popleft()
            if not e.live:
                continue
            self.stats["evicted_" + why] += 1
            self._close_embryo(e, "evicted")
            n += 1
        if n < count:
            flows = [f for f in self.open_flows() if f is not keep]
            for f in heapq.nsmallest(count - n, flows, key=_eviction_order):
                self.stats["evicted_" + why] += 1
                self._close(f, "evicted")
                n += 1
        return n

    def _over_memory(self, need: int, keep: Flow | None) -> None:
        """`need` more bytes would pass the cap: enter emergency mode and evict (half-open
        first, then longest idle) down to EVICT_TARGET of the cap, so they fit. If nothing is
        left to evict but `keep`, it goes over: one flow's part is the slack of the cap."""
        self.stats["memory_limit_hits"] += 1
        if not self.emergency:
            self._set_emergency(True)
        target = int(self.mem_cap * EVICT_TARGET) - need
        embryos = self.embryos
        while self.mem > target and embryos:
            e = embryos.popleft()
            if e.live:
                self.stats["evicted_memory"] += 1
                self._close_embryo(e, "evicted")
        if self.mem > target:
            flows = sorted((f for f in self.open_flows() if f is not keep), key=_eviction_order)
            for f in flows:
                if self.mem <= target:
                    break
                self.stats["evicted_memory"] += 1
                self._close(f, "evicted")

    def _set_emergency(self, on: bool) -> None:
        """Emergency mode (Suricata's): while the table is at its memory cap, idle timeouts
        are EMERGENCY_DIVISOR times shorter, so idle and half-open flows go sooner. Open flows
        get the new timeouts at once (lengthened ones are re-armed lazily by the wheel)."""
        self.emergency = on
        if on:
            self.stats["emergency_entered"] += 1
        self.timeouts = self._scaled_timeouts()
        for f in self.open_flows():
            if f.state != CLOSED:
                self._set_state(f, f.state)

    def flush(self, reason: str = "shutdown") -> None:
        """End of input or shutdown: every open flow is closed. Flows already closed by FIN or
        RST and only lingering keep their own reason."""
        for _ in self.flush_iter(reason, 0):
            pass

    def flush_iter(self, reason: str = "shutdown", chunk: int = 10_000) -> Iterator[None]:
        """`flush`, a step at a time: yields after every `chunk` flows closed (0 = only at the
        end), so a caller can hand their streams over before the next ones are built (at the
        end of a SYN flood, half a million streams at once would double the peak memory)."""
        n = 0
        # The streams built here trigger full collections, and each walked the table, its
        # snapshot and the embryo FIFO: in a SYN flood, 500,000 entries each, two thirds of
        # the flush. Every live embryo is in `flows`, so the FIFO goes; the table and the
        # snapshot are untracked (everything they hold stays alive while they do; the table
        # is tracked again by the next flow it takes).
        self.embryos.clear()
        snapshot = tuple(self.flows.values())
        _untrack(snapshot)
        _untrack(self.flows)
        for h in snapshot:
            if type(h) is Embryo:
                if not h.live:
                    continue
                self._close_embryo(h, reason)
            elif h.is_client and h.flow.c is h:
                f = h.flow
                self._close(f, f.reason if f.state == CLOSED else reason)
            else:
                continue
            n += 1
            if chunk and n % chunk == 0:
                yield
        yield

    def _part(self, f: Flow, now: float) -> None:
        """Emit what the flow holds as a part (DESIGN "Parts") and go on with the same stream:
        holes already skipped become the part's gaps; held out-of-order blocks and the holes
        before them stay for the next part."""
        c, s = f.c, f.s
        f.pstart = now
        if not (c.buf or s.buf or c.gaps or s.gaps):
            return   # the interval passed with nothing held: no empty part
        stream = self._stream(f, "part")
        for h in (c, s):
            n = len(h.buf)
            self.mem -= n
            h.base += n
            h.pbase = h.off
            h.pkt0 = h.packets
            h.buf = bytearray()
            h.gaps = ()
        f.part += 1
        if f.pkts is not None:
            f.pkts = []
        self.stats["streams_part"] += 1
        self.emit(stream)

    def _close(self, f: Flow, reason: str) -> None:
        c, s = f.c, f.s
        flows = self.flows
        if flows.get((c.ip, c.port, s.ip, s.port)) is c:
            del flows[(c.ip, c.port, s.ip, s.port)]
        if flows.get((s.ip, s.port, c.ip, c.port)) is s:
            del flows[(s.ip, s.port, c.ip, c.port)]
        self.nflows -= 1
        self.mem -= FLOW_BYTES
        if self.wheel is not None:
            self.wheel.cancel(f.entry)
        for h in (c, s):
            ra.flush(h, self)
            if h.fin and 0 < h.fin_off - h.off < ra.HALF32:
                # bytes before the FIN that the capture never saw
                ra.skip_gap(h, h.fin_off - h.off, self)
            self.mem -= len(h.buf)
        self.stats["streams_" + reason] += 1
        if not self.limits.emit_empty and not c.buf and not s.buf and not f.part:
            self.stats["empty_dropped"] += 1
            _release(f)
            return
        stream = self._stream(f, reason)
        _release(f)
        self.emit(stream)

    def _stream(self, f: Flow, reason: str) -> Stream:
        """The record of what the flow holds now: the whole stream, or its current part."""
        c, s = f.c, f.s
        gaps = [(pos, n, "client") for pos, n in ra.delivered_gaps(c)]
        gaps += [(pos, n, "server") for pos, n in ra.delivered_gaps(s)]
        self.stats["gaps"] += len(gaps)
        # counted at emit, not when skipped: a hole may still be filled late until then, and a
        # Prometheus counter must not go down
        self.gap_bytes += sum([g[1] for g in gaps])
        stream = Stream(
            client=(_ip(c.ip), c.port),
            server=(_ip(s.ip), s.port),
            client_data=bytes(c.buf),
            server_data=bytes(s.buf),
            close_reason=reason,
            gaps=gaps,
            start=f.first,
            end=f.last,
            ip_version=f.version,
            client_packets=c.packets - c.pkt0,
            server_packets=s.packets - s.pkt0,
            client_rule=f.rule,
            history=f.hist,
            state=conn_state(f),
            retransmitted_bytes=c.retrans + s.retrans,
            overlaps=c.overlaps + s.overlaps,
            truncated=f.trunc or bool(c.depth_dropped or s.depth_dropped),
            interface=self.interface,
            packets=f.pkts,
            linktype=f.linktype,
        )
        # parts (DESIGN "Parts"): every part keeps the stream's id (its start is the flow's
        # first packet); part 0 with offsets 0 is a stream emitted whole
        stream.part = f.part
        stream.client_offset = c.base
        stream.server_offset = s.base
        return stream


def _untrack(obj: object) -> None:
    """Take a container out of the cyclic GC's lists (compiled only: the Python engine keeps
    CPython's behaviour). Safe for a container whose contents are alive anyway: the GC then
    counts its references as external ones, and nothing it holds is collected early."""
    if cython.compiled:
        PyObject_GC_UnTrack(obj)  # type: ignore[name-defined]  # noqa: F821 (flowtable.pxd)


def _eviction_order(f: Flow) -> tuple[bool, float]:
    """Half-open flows (still in their handshake) before the others, then longest idle."""
    return (f.state != HANDSHAKE, f.last)


def _insert_frames(pkts: list, frames: list[tuple[float, int, bytes]]) -> None:
    """Move `frames` (a reassembled datagram's earlier fragments, in capture order) into the
    flow's packet list where their timestamps put them: the stream's other packets may have
    come between its fragments."""
    for p in frames:
        ts = p[0]
        i = len(pkts)
        while i and pkts[i - 1][0] > ts:
            i -= 1
        pkts.insert(i, p)
    frames.clear()


def _release(f: Flow) -> None:
    """Break the flow <-> half <-> timer cycles now. Left to the cyclic GC, closed flows reach
    the old generation and their buffers outlive them by minutes (memory then grew with the
    capture size, not with the open connections)."""
    for h in (f.c, f.s):
        h.buf = bytearray()
        h.ooo = ()
        h.peer = None
        h.flow = None
    f.entry.payload = None
    f.pkts = None


def conn_state(f: Flow) -> str:
    """Zeek's conn_state summary of how the connection began and ended."""
    c, s = f.c, f.s
    c_syn, s_synack = c.seen & BIT["S"], s.seen & BIT["H"]
    if c.rst or s.rst:
        if c_syn and not s_synack and c.rst and not s.packets:
            return "RSTOS0"
        if c_syn and not s_synack and s.rst:
            return "REJ"
        if s_synack and not c_syn and s.rst:
            return "RSTRH"
        return "RSTO" if c.rst else "RSTR"
    if c.fin and s.fin:
        return "SF" if c_syn else "OTH"
    if c_syn and not s_synack and not s.packets:
        return "SH" if c.fin else "S0"
    if s_synack and not c_syn:
        return "SHR" if s.fin else "OTH"
    if not c_syn:
        return "OTH"
    if c.fin:
        return "S2"
    if s.fin:
        return "S3"
    return "S1"
