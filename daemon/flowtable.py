"""The flow table of one shard: connection lookup, TCP state, close, timeouts and limits.

Every capture batch goes through `FlowTable.feed`, whose loop is the hot path (DESIGN "Capture":
decode plus flow dict plus in-order append is most of the time budget), so it is written flat:
one dict lookup on the directional 4-tuple, a handful of compares, an append. Everything else
(handshake, FIN/RST, retransmission, out-of-order, new flows, timeouts) is in `_slow` and in
`reassembly`, which the common packet never reaches.
"""

from __future__ import annotations

import heapq
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from streamtap.config import Config

from . import reassembly as ra
from .decode import TH_ACK, TH_FIN, TH_RST, TH_SYN
from .pcapfmt import META
from .reassembly import MASK32, UNLIMITED, Half
from .stream import Stream
from .wheel import TimerEntry, TimerWheel

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

    @classmethod
    def from_config(cls, cfg: Config) -> Limits:
        r = cfg.reassembly
        t, lim = r.timeouts, r.limits
        return cls(
            overlap=r.overlap, emit_empty=r.emit_empty, keep_packets=r.keep_packets,
            handshake=t.handshake, established=t.established, closing=t.closing,
            rst_linger=t.rst_linger, fin_linger=t.fin_linger,
            max_flows=lim.max_flows, depth=lim.depth, ooo_bytes=lim.ooo_bytes,
            memory=lim.memory,
        )


class Flow:
    __slots__ = (
        "c", "s", "version", "first", "last", "state", "timeout", "entry", "reason",
        "hist", "rule", "pkts", "linktype", "trunc",
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
        self.hist: list[str] = []
        self.rule = rule
        self.pkts: list | None = None
        self.linktype = 1
        self.trunc = False     # snaplen cut some payload (recorded as a gap too)


def _ip(b: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(b) == 4 else socket.AF_INET6, b)


ALWAYS_REPORTED = ("flows", "empty_dropped", "gaps", "memory_limit_hits", "depth_dropped_bytes",
                   "ooo_limit_hits", "late_filled_segments", "late_filled_bytes",
                   "late_dropped_bytes")


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
        self.flows: dict[tuple, Half] = {}
        self.nflows = 0
        self.mem = 0                 # bytes held in every buffer of this table (Zeek's total_size)
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
        self.mem_cap = lim.memory or UNLIMITED
        self.max_flows = lim.max_flows or UNLIMITED
        self.depth = lim.depth or UNLIMITED
        self.last = lim.overlap == "last"
        self.timeouts = {
            HANDSHAKE: lim.handshake, ESTABLISHED: lim.established, CLOSING: lim.closing,
        }

    def _collect(self, s: Stream) -> None:
        self.done.append(s)

    # -- the hot path -------------------------------------------------------------------------

    def feed(self, decode: Callable, data: bytes, meta: bytes) -> None:
        """A capture batch: `meta` holds (sec, usec, offset, caplen) records into `data`, and
        `decode(data, start, end, ts)` turns a frame into a TCP tuple (or None).

        This loop is the fast path of the whole program, so it is written flat on purpose:
        attributes hoisted into locals, the in-order append inlined, and everything rare
        (handshake, FIN/RST, retransmission, out of order, new flows) sent to `_slow` or
        `_data`. Those may change `_next_advance`, hence the reloads after them.
        """
        flows_get = self.flows.get
        slow = self._slow
        keep = self.limits.keep_packets
        held = self.frag_frames
        mem_cap = self.mem_cap
        next_adv = self._next_advance
        bit_a, bit_d, mask = BIT_A, BIT_D, MASK32
        for sec, usec, off, caplen in META.iter_unpack(meta):
            ts = sec + usec * 1e-6
            end = off + caplen
            dec = decode(data, off, end, ts)
            if dec is None:
                continue
            if ts >= next_adv:
                self.advance(ts)
                next_adv = self._next_advance
            _v, src, dst, sport, dport, seq, ack, flags, _win, payload, missing, _o = dec
            h = flows_get((src, sport, dst, dport))
            if h is None or flags & 0x07 or missing:
                slow(ts, dec, h, data[off:end] if keep else None)
                next_adv = self._next_advance
                continue
            f = h.flow
            if ts - f.last >= f.timeout:
                slow(ts, dec, h, data[off:end] if keep else None)
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
                if f.state == HANDSHAKE and h.next >= 0:
                    self._set_state(f, ESTABLISHED)
                    next_adv = self._next_advance
            if payload:
                n = len(payload)
                if seq == h.next and n <= h.room and not h.ooo:
                    h.buf += payload
                    h.room -= n
                    h.off += n
                    h.next = (seq + n) & mask
                    self.mem += n
                    if self.mem > mem_cap:
                        self._over_memory()
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
            h.flow.hist.append(ch if h.is_client else ch.lower())

    def unletter(self, h: Half, ch: str) -> None:
        """Take back a letter that no longer holds (a `G` whose gaps were all filled late); it
        is recorded again, at its new place, if it happens again."""
        bit = BIT[ch]
        if h.seen & bit:
            h.seen &= ~bit
            h.flow.hist.remove(ch if h.is_client else ch.lower())

    def _data(self, h: Half, seq: int, payload: bytes, missing: int) -> None:
        if h.next < 0:
            # first bytes of a direction picked up mid-stream: they define its start
            h.next = seq
            h.off = 0
        if missing:
            h.flow.trunc = True
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
        if self.mem > self.mem_cap:
            self._over_memory()

    def _slow(self, ts: float, dec: tuple, h: Half | None, frame: bytes | None) -> None:
        version, src, dst, sport, dport, seq, ack, flags, win, payload, missing, _o = dec
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

    def _new_flow(
        self, ts: float, version: int, src: bytes, sport: int, dst: bytes, dport: int, flags: int
    ) -> Half:
        if self.nflows >= self.max_flows:
            self._evict(max(1, self.max_flows // 100), "max_flows")
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
        self.stats["flows"] += 1
        self._set_state(f, HANDSHAKE if flags & TH_SYN else ESTABLISHED)
        return self.flows[(src, sport, dst, dport)]

    def _set_state(self, f: Flow, state: int, timeout: float | None = None) -> None:
        f.state = state
        f.timeout = self.timeouts[state] if timeout is None else timeout
        deadline = f.last + f.timeout
        if self.wheel is not None and (
            not f.entry.scheduled or deadline < f.entry.deadline
        ) and not self.wheel.schedule(f.entry, deadline):
            # already due (a zero linger): the next advance closes it
            self._due.append(f)
            self._next_advance = float("-inf")

    def advance(self, now: float) -> None:
        """Move time forward (packet time offline, wall clock live) and close what expired.
        Expiry is lazy: an entry that fires before its flow's real deadline is re-armed."""
        wheel = self.wheel
        if wheel is None:
            self.wheel = wheel = TimerWheel(tick=1.0, slots=64, start=now)
            for h in self.flows.values():
                if h.is_client:
                    wheel.schedule(h.flow.entry, h.flow.last + h.flow.timeout)
        if now > self.now:
            self.now = now
        self._next_advance = now + 0.5
        for e in wheel.advance(now):
            f: Flow = e.payload  # type: ignore[assignment]
            deadline = f.last + f.timeout
            if deadline <= now:
                self._close(f, f.reason if f.state == CLOSED else "timeout")
            else:
                wheel.schedule(e, deadline)
        # flows whose timeout was already due when set (see _set_state); a flow closed since,
        # or scheduled again by a later state change, needs nothing more
        due, self._due = self._due, []
        for f in due:
            if f.c.flow is not f or f.entry.scheduled:
                continue
            if f.last + f.timeout <= now:
                self._close(f, f.reason if f.state == CLOSED else "timeout")
            else:
                wheel.schedule(f.entry, f.last + f.timeout)

    def _evict(self, count: int, why: str) -> None:
        """Close the `count` flows idle the longest (counted by why: Suricata's memcap habit)."""
        flows = [h.flow for h in self.flows.values() if h.is_client]
        for f in heapq.nsmallest(count, flows, key=lambda f: f.last):
            self.stats["evicted_" + why] += 1
            self._close(f, "evicted")

    def _over_memory(self) -> None:
        self.stats["memory_limit_hits"] += 1
        target = self.mem_cap * 9 // 10
        flows = sorted((h.flow for h in self.flows.values() if h.is_client), key=lambda f: f.last)
        for f in flows:
            if self.mem <= target:
                break
            self.stats["evicted_memory"] += 1
            self._close(f, "evicted")

    def flush(self, reason: str = "shutdown") -> None:
        """End of input or shutdown: every open flow is closed. Flows already closed by FIN or
        RST and only lingering keep their own reason."""
        for h in list(self.flows.values()):
            if h.is_client and h.flow.c is h:
                f = h.flow
                self._close(f, f.reason if f.state == CLOSED else reason)

    def _close(self, f: Flow, reason: str) -> None:
        c, s = f.c, f.s
        flows = self.flows
        if flows.get((c.ip, c.port, s.ip, s.port)) is c:
            del flows[(c.ip, c.port, s.ip, s.port)]
        if flows.get((s.ip, s.port, c.ip, c.port)) is s:
            del flows[(s.ip, s.port, c.ip, c.port)]
        self.nflows -= 1
        if self.wheel is not None:
            self.wheel.cancel(f.entry)
        for h in (c, s):
            ra.flush(h, self)
            if h.fin and 0 < h.fin_off - h.off < ra.HALF32:
                # bytes before the FIN that the capture never saw
                ra.skip_gap(h, h.fin_off - h.off, self)
            self.mem -= len(h.buf)
        self.stats["streams_" + reason] += 1
        if not self.limits.emit_empty and not c.buf and not s.buf:
            self.stats["empty_dropped"] += 1
            _release(f)
            return
        gaps = [(pos, n, "client") for pos, n in ra.delivered_gaps(c)]
        gaps += [(pos, n, "server") for pos, n in ra.delivered_gaps(s)]
        self.stats["gaps"] += len(gaps)
        # counted at emit, not when skipped: a hole may still be filled late until then, and a
        # Prometheus counter must not go down
        self.gap_bytes += sum(n for _, n, _ in gaps)
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
            client_packets=c.packets,
            server_packets=s.packets,
            client_rule=f.rule,
            history="".join(f.hist),
            state=conn_state(f),
            retransmitted_bytes=c.retrans + s.retrans,
            overlaps=c.overlaps + s.overlaps,
            truncated=f.trunc or bool(c.depth_dropped or s.depth_dropped),
            interface=self.interface,
            packets=f.pkts,
            linktype=f.linktype,
        )
        _release(f)
        self.emit(stream)


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
        h.ooo = []
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
