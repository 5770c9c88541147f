#!/usr/bin/env python3
"""Deterministic generator of a large, realistic TCP capture for benchmarks.

    python bench/gen_capture.py OUT.pcap [--shape mixed] [--packets 150000] [--connections 1600]
                                [--seed 1] [--truth FILE]

Shapes (`--shape`; `--packets`/`--connections` apply to `mixed` only):

- `mixed` (the default, described below): many interleaved realistic connections.
- `short`: 50,000 short connections of 9 packets each (handshake, one request, one response,
  an ACK, a 3-way FIN close), 50 open at any time, IPv4 (450,000 packets).
- `synflood`: 500,000 unanswered SYNs from distinct sources (100.64.0.0/10, random ports) to
  one server, with 200 real connections (handshake, a request, a 4-40 KB response, FIN close)
  spread through the flood.
- `bulk`: one connection carrying 200,000,000 bytes from the server (138,122 full segments, a
  delayed ACK per two: ~207,000 packets).

The three extra shapes are written by a fast path (per-direction header templates patched with
struct.pack_into, checksums from the mod-0xFFFF identity) straight in timestamp order.

`mixed` writes a classic pcap (Ethernet, microsecond timestamps) of many interleaved TCP
connections, IPv4 and IPv6 (about 70/30), with 3-way handshakes, MTU-sized segments (1500-byte
IP packets, TCP timestamp option on every segment), delayed ACKs (one per two segments),
request/response, upload and chatty shapes, FIN close on most, RST on a few, refused
connections, a few left open, ~1 % of data segments swapped with the next one and ~1 % sent
twice, ~0.5 % of acknowledged data segments captured just after the ACK that covers them (the
two directions of a SPAN port or an aggregating tap reach the sensor by different paths), random
ISNs (some just below 2**32 so the sequence numbers wrap). Checksums (IPv4 header, TCP) are
correct.

`--truth FILE` also writes what every connection really carried, one JSON object per line
(client, server as [ip, port]; client_len, client_sha256, server_len, server_sha256), so a
reassembler's output can be checked byte-exact (bench/offline.py does). A shape with
payload-less flows that are not worth a line each (the SYN flood) ends with one line
{"empty_flows": N}: that many further streams, each with no bytes either way.

Stdlib only; the same seed gives the same bytes. Payloads are slices of a 1 MiB random block.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
EPOCH = 1_700_000_000  # first packet's second (2023-11-14)
M32 = 0xFFFFFFFF
BLOCK_SIZE = 1 << 20
MTU = 1500
PAYLOAD4 = MTU - 20 - 32  # 1448: IPv4 + TCP with NOP NOP TS
PAYLOAD6 = MTU - 40 - 32  # 1428: IPv6 + TCP with NOP NOP TS
REORDER = 0.01  # a data segment swapped with the next one
RETRANSMIT = 0.01  # a data segment sent twice
LATE = 0.005  # an acknowledged data segment captured after the ACK that covers it
SPAN_US = 20_000_000  # connection start times are spread over 20 s

_ETH = struct.Struct("!6s6sH")
_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIHHHH")
_TSOPT = struct.Struct("!BBBBII")  # NOP NOP kind=8 len=10 TSval TSecr
_SYNOPT = struct.Struct("!BBHBBBBIIBBBB")  # MSS, SACK_PERM, TS, NOP, WS
_PSEUDO4 = struct.Struct("!xBH")
_PSEUDO6 = struct.Struct("!IxxxB")
_CSUM = struct.Struct("!H")
_REC = struct.Struct("<IIII")
_PCAP_HDR = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1)


def _csum(data: bytes) -> int:
    """Internet checksum: the one's-complement sum of 16-bit words is the number mod 0xFFFF."""
    if len(data) & 1:
        data += b"\0"
    x = int.from_bytes(data, "big")
    s = x % 0xFFFF
    if s:
        return 0xFFFF - s
    return 0 if x else 0xFFFF


@dataclass(slots=True)
class _Side:
    mac: bytes
    ip: bytes
    port: int
    isn: int
    ts_base: int  # TSval clock origin (ms)
    ttl: int
    flow: int  # IPv6 flow label
    win: int
    nxt: int = 0  # payload bytes sent so far
    sent: Any = field(default_factory=hashlib.sha256)  # of those bytes: the truth
    fin: int = 0  # 1 once a FIN was sent (consumes one sequence number)
    ip_id: int = 0


class _Conn:
    """One TCP connection; emits frames into the generator's event list."""

    def __init__(self, gen: Generator, v6: bool, client: _Side, server: _Side, rtt: int) -> None:
        self.gen = gen
        self.rng = gen.rng
        self.v6 = v6
        self.c = client
        self.s = server
        self.rtt = rtt
        self.mss = PAYLOAD6 if v6 else PAYLOAD4
        self.gap_lo, self.gap_hi = gen.rng.choice(((15, 60), (40, 200), (100, 600)))
        self.t_first = -1
        self.t_max = 0

    # -- frames --------------------------------------------------------------------------------
    def emit(
        self, t: int, from_client: bool, flags: int, seq: int, ack: int, payload: bytes = b""
    ) -> None:
        snd, rcv = (self.c, self.s) if from_client else (self.s, self.c)
        if flags & SYN:
            tsval = snd.ts_base + t // 1000
            tsecr = 0 if not flags & ACK else rcv.ts_base + max(0, t - self.rtt) // 1000
            opts = _SYNOPT.pack(
                2, 4, self.mss + 12, 4, 2, 8, 10, tsval & M32, tsecr & M32, 1, 3, 3, 7
            )
            win = 64240 if from_client else 65160
        elif flags & RST:
            opts = b""
            win = 0
        else:
            tsval = snd.ts_base + t // 1000
            tsecr = rcv.ts_base + max(0, t - self.rtt) // 1000
            opts = _TSOPT.pack(1, 1, 8, 10, tsval & M32, tsecr & M32)
            win = snd.win
        doff = 20 + len(opts)
        tcp_len = doff + len(payload)
        tcp = _TCP.pack(
            snd.port, rcv.port, seq & M32, ack & M32, (doff << 10) | flags, win, 0, 0
        ) + opts
        if self.v6:
            pseudo = snd.ip + rcv.ip + _PSEUDO6.pack(tcp_len, 6)
        else:
            pseudo = snd.ip + rcv.ip + _PSEUDO4.pack(6, tcp_len)
        tcp = tcp[:16] + _CSUM.pack(_csum(pseudo + tcp + payload)) + tcp[18:]
        if self.v6:
            ip = _IP6.pack(0x60000000 | snd.flow, tcp_len, 6, snd.ttl, snd.ip, rcv.ip)
            eth = _ETH.pack(rcv.mac, snd.mac, 0x86DD)
        else:
            snd.ip_id = (snd.ip_id + 1) & 0xFFFF
            hdr = _IP4.pack(0x45, 0, 20 + tcp_len, snd.ip_id, 0x4000, snd.ttl, 6, 0, snd.ip, rcv.ip)
            ip = hdr[:10] + _CSUM.pack(_csum(hdr)) + hdr[12:]
            eth = _ETH.pack(rcv.mac, snd.mac, 0x0800)
        self.gen.add(t, eth + ip + tcp + payload)
        if self.t_first < 0 or t < self.t_first:
            self.t_first = t
        if t > self.t_max:
            self.t_max = t

    def seq(self, side: _Side) -> int:
        return side.isn + 1 + side.nxt + side.fin

    def pure_ack(self, t: int, from_client: bool) -> None:
        snd, rcv = (self.c, self.s) if from_client else (self.s, self.c)
        self.emit(t, from_client, ACK, self.seq(snd), self.seq(rcv))

    # -- phases --------------------------------------------------------------------------------
    def handshake(self, t: int, refused: bool = False) -> int:
        c, s = self.c, self.s
        self.emit(t, True, SYN, c.isn, 0)
        t += self.rtt
        if refused:
            self.emit(t, False, RST | ACK, 0, c.isn + 1)
            return t
        self.emit(t, False, SYN | ACK, s.isn, c.isn + 1)
        t += max(1, self.rtt // 4)
        self.emit(t, True, ACK, c.isn + 1, s.isn + 1)
        return t + self.rng.randint(5, 200)

    def send(self, t: int, from_client: bool, data: bytes, acks: bool = True) -> int:
        """Send one message as MSS-sized segments starting at t; the receiver ACKs every second
        segment (and the last one) one RTT later when `acks`. Returns the last segment's time."""
        rng = self.rng
        snd, rcv = (self.c, self.s) if from_client else (self.s, self.c)
        mss = self.mss
        segs: list[list[int]] = []  # [time, relative offset, length]
        off, tt, n = 0, t, len(data)
        while off < n:
            ln = min(mss, n - off)
            segs.append([tt, off, ln])
            off += ln
            tt += rng.randint(self.gap_lo, self.gap_hi)
        i = 0
        while i < len(segs) - 1:
            if rng.random() < REORDER:
                segs[i][0], segs[i + 1][0] = segs[i + 1][0], segs[i][0]
                i += 2
            else:
                i += 1
        base = self.seq(snd)
        ack = self.seq(rcv)
        last = len(segs) - 1
        # the receiver's ACKs: every second segment and the last, one RTT after the latest
        # segment so far; planned before any segment is delayed, since only the sensor sees late
        acks_at: list[tuple[int, int]] = []  # (time, relative offset acknowledged)
        tmax = 0
        for k, (ts, o, ln) in enumerate(segs):
            tmax = max(tmax, ts)
            if acks and (k & 1 or k == last):
                acks_at.append((tmax + self.rtt, o + ln))
        t_last = max([t] + [ts for ts, _, _ in segs])
        if acks_at:
            # late capture: its own RNG, so the rest of the capture is the same as without it
            late_rng = self.gen.late_rng
            ai = 0
            for seg in segs:
                while acks_at[ai][1] < seg[1] + seg[2]:
                    ai += 1
                if late_rng.random() < LATE:
                    seg[0] = acks_at[ai][0] + late_rng.randint(1, 300)
                    self.gen.late += 1
        view = memoryview(data)
        for k, (ts, o, ln) in enumerate(segs):
            flags = ACK | PSH if k == last else ACK
            chunk = bytes(view[o : o + ln])
            self.emit(ts, from_client, flags, base + o, ack, chunk)
            if rng.random() < RETRANSMIT:
                self.emit(ts + max(1, self.rtt // 2), from_client, flags, base + o, ack, chunk)
        snd.nxt += n
        snd.sent.update(data)
        rseq = self.seq(rcv)
        for ts, end in acks_at:
            self.emit(ts, not from_client, ACK, rseq, base + end)
        return t_last

    def close_fin(self, t: int, client_first: bool) -> None:
        rng = self.rng
        a, b = (self.c, self.s) if client_first else (self.s, self.c)
        self.emit(t, client_first, FIN | ACK, self.seq(a), self.seq(b))
        a.fin = 1
        t += self.rtt
        if rng.random() < 0.7:
            self.emit(t, not client_first, FIN | ACK, self.seq(b), self.seq(a))
        else:
            self.emit(t, not client_first, ACK, self.seq(b), self.seq(a))
            t += rng.randint(100, 20_000)
            self.emit(t, not client_first, FIN | ACK, self.seq(b), self.seq(a))
        b.fin = 1
        self.emit(t + self.rtt, client_first, ACK, self.seq(a), self.seq(b))

    def close_rst(self, t: int, from_client: bool) -> None:
        snd, rcv = (self.c, self.s) if from_client else (self.s, self.c)
        self.emit(t, from_client, RST | ACK, self.seq(snd), self.seq(rcv))


class Generator:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.late_rng = random.Random(seed + 0x1A7E)
        self.late = 0  # segments captured after the ACK that covers them
        self.block = self.rng.randbytes(BLOCK_SIZE)
        self.hexblock = self.block[:4096].hex().encode()
        self.events: list[tuple[int, int, bytes]] = []
        self.conns: list[_Conn] = []
        self.used: set[tuple[bytes, int]] = set()
        rng = self.rng
        self.clients4 = [bytes((10, rng.randrange(256), rng.randrange(256), rng.randrange(1, 255)))
                         for _ in range(300)]
        nets4 = ((192, 0, 2), (198, 51, 100), (203, 0, 113))  # RFC 5737 documentation nets
        self.servers4 = [bytes((*rng.choice(nets4), rng.randrange(1, 255))) for _ in range(40)]
        self.clients6 = [b"\x20\x01\x0d\xb8\x00\x01" + rng.randbytes(10) for _ in range(150)]
        self.servers6 = [b"\x20\x01\x0d\xb8\xff\x00" + rng.randbytes(10) for _ in range(20)]
        self.gw_mac = b"\x02\x00\x5e\x00\x00\x01"

    def add(self, t: int, frame: bytes) -> None:
        self.events.append((t, len(self.events), frame))

    def rand(self, n: int) -> bytes:
        """n pseudo-random bytes: slices of the pre-generated block."""
        rng = self.rng
        parts = []
        while n > 0:
            off = rng.randrange(BLOCK_SIZE)
            take = min(n, BLOCK_SIZE - off)
            parts.append(self.block[off : off + take])
            n -= take
        return b"".join(parts)

    def _side(self, v6: bool, client: bool) -> _Side:
        rng = self.rng
        if client:
            pool = self.clients6 if v6 else self.clients4
            while True:
                ip, port = rng.choice(pool), rng.randint(32768, 60999)
                if (ip, port) not in self.used:
                    self.used.add((ip, port))
                    break
            mac = b"\x02\x00" + ip[-4:]
            ttl = 64
        else:
            ip = rng.choice(self.servers6 if v6 else self.servers4)
            port = rng.choice((443, 443, 443, 80, 80, 8080, 22, 5432, 6379, 8443))
            mac = self.gw_mac
            ttl = rng.choice((52, 55, 57, 58, 116))
        if rng.random() < 0.05:
            isn = (1 << 32) - rng.randint(1, 300_000)  # wraps during the transfer
        else:
            isn = rng.getrandbits(32)
        return _Side(mac, ip, port, isn, rng.getrandbits(32), ttl, rng.getrandbits(20),
                     rng.choice((501, 1024, 2048, 4096, 8192)))

    # -- connection shapes ---------------------------------------------------------------------
    def request(self, n: int, method: bytes = b"GET", body: int = 0) -> bytes:
        rng = self.rng
        head = (b"%s /api/v1/objects/%d?page=%d HTTP/1.1\r\nHost: svc%d.example.net\r\n"
                b"User-Agent: streamtap-bench/1.0\r\nAccept: */*\r\n"
                % (method, rng.getrandbits(31), rng.randrange(100), rng.randrange(50)))
        if body:
            head += b"Content-Length: %d\r\n" % body
        pad = max(0, n - len(head) - 12)
        off = rng.randrange(len(self.hexblock) - pad) if pad < len(self.hexblock) else 0
        head += b"Cookie: " + self.hexblock[off : off + pad] + b"\r\n\r\n"
        return head + (self.rand(body) if body else b"")

    def response(self, n: int) -> bytes:
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Length: %d\r\n\r\n")
        body = max(0, n - len(head) - 6)
        return head % body + self.rand(body)

    def connection(self, budget: int) -> int:
        """Generate one connection aiming at about `budget` packets; returns packets emitted."""
        rng = self.rng
        before = len(self.events)
        v6 = rng.random() < 0.3
        rtt = int(rng.choice((rng.uniform(200, 2000), rng.uniform(2000, 30_000),
                              rng.uniform(30_000, 150_000))))
        conn = _Conn(self, v6, self._side(v6, True), self._side(v6, False), rtt)
        self.conns.append(conn)
        t = rng.randrange(SPAN_US)
        r = rng.random()
        if r < 0.01:
            conn.handshake(t, refused=True)
            return len(self.events) - before
        t = conn.handshake(t)
        mss = conn.mss
        data_budget = max(2, budget - 7)
        shape = rng.random()
        if shape < 0.70:  # HTTP-like: small request, large response; some keep-alive rounds
            rounds = 1 if rng.random() < 0.6 else rng.randint(2, 5)
            per_round = max(2, data_budget // rounds)
            for _ in range(rounds):
                post = rng.random() < 0.1
                req = self.request(rng.randint(200, 900), b"POST" if post else b"GET",
                                   rng.randint(100, 2500) if post else 0)
                think = rng.choice((rng.randint(50, 2000), rng.randint(2000, 80_000)))
                t_req = conn.send(t, True, req, acks=False)
                if think > 40_000:  # the server's delayed ACK fires before the response
                    conn.pure_ack(t_req + conn.rtt + 40_000, False)
                segs = max(1, int((per_round - 2) / 1.5))
                size = segs * mss - rng.randrange(mss)
                t = conn.send(t_req + conn.rtt + think, False, self.response(size))
                t += conn.rtt + rng.randint(100, 500_000)
        elif shape < 0.80:  # upload: large request, small response
            segs = max(1, int((data_budget - 2) / 1.5))
            size = segs * mss - rng.randrange(mss)
            t = conn.send(t, True, self.request(400, b"PUT", size))
            t = conn.send(t + conn.rtt + rng.randint(100, 5000), False,
                          self.response(rng.randint(80, 400)), acks=False)
            conn.pure_ack(t + conn.rtt, True)
            t += conn.rtt + rng.randint(100, 5000)
        else:  # chatty bidirectional: small messages both ways, replies carry the ACKs
            exchanges = max(1, min(300, data_budget // 2))
            from_client = True
            for k in range(exchanges):
                msg = self.rand(rng.choice((rng.randint(20, 200), rng.randint(200, 1400),
                                            rng.randint(1400, 4000))))
                t = conn.send(t, from_client, msg, acks=False)
                think = rng.choice((rng.randint(50, 1000), rng.randint(1000, 100_000)))
                if k < exchanges - 1 and rng.random() < 0.85:
                    from_client = not from_client  # the peer replies, its data carries the ACK
                else:  # the same side sends again, or the end: the peer ACKs on its own
                    conn.pure_ack(t + conn.rtt, not from_client)
                t += conn.rtt + think
        t = max(t, conn.t_max + 1)
        end = rng.random()
        if end < 0.90:
            conn.close_fin(t, rng.random() < 0.6)
        elif end < 0.95:
            conn.close_rst(t, rng.random() < 0.8)
        # else: left open
        return len(self.events) - before

    def generate(self, packets: int, connections: int) -> None:
        rng = self.rng
        weights = [min(rng.lognormvariate(0.0, 1.0), 12.0) for _ in range(connections)]
        scale = 1.06 * packets / sum(weights)  # the shapes land ~6 % under their budget
        for w in weights:
            self.connection(max(10, int(w * scale)))
        avg = max(10, packets // connections)
        while len(self.events) < packets:
            self.connection(max(10, min(avg, packets - len(self.events))))

    def write(self, path: str) -> int:
        self.events.sort()
        size = len(_PCAP_HDR)
        with open(path, "wb") as f:
            f.write(_PCAP_HDR)
            buf: list[bytes] = []
            rec = _REC.pack
            for t, _, frame in self.events:
                sec, usec = divmod(t, 1_000_000)
                n = len(frame)
                buf.append(rec(EPOCH + sec, usec, n, n))
                buf.append(frame)
                size += 16 + n
                if len(buf) >= 8192:
                    f.write(b"".join(buf))
                    buf.clear()
            f.write(b"".join(buf))
        return size

    def max_concurrent(self) -> int:
        marks = sorted([(c.t_first, 1) for c in self.conns] + [(c.t_max, -1) for c in self.conns])
        best = cur = 0
        for _, d in marks:
            cur += d
            best = max(best, cur)
        return best


# -- the fast shapes: short, synflood, bulk --------------------------------------------------------
_HDR_LEN = 14 + 20 + 32  # Ethernet, IPv4, TCP with NOP NOP TS
_IP_LEN_ID = struct.Struct("!HH")  # IPv4 total length, identification (offset 16 in the frame)
_TCP_SEQ = struct.Struct("!IIH")  # seq, ack, data offset + flags (offset 38)
_TS_VALS = struct.Struct("!II")  # TSval, TSecr (offset 58)


class _FastConn:
    """One IPv4 connection with precomputed frames: a 66-byte template per direction, patched
    in place for each packet. Tracks the bytes each side sent (the truth)."""

    __slots__ = ("c", "s", "isn", "nxt", "data", "sha", "tmpl", "pseudo", "ip_id", "ts_base")

    def __init__(self, c: tuple[bytes, int], s: tuple[bytes, int], isn_c: int, isn_s: int,
                 ts_base: int = 0) -> None:
        self.c, self.s = c, s
        self.isn = (isn_c, isn_s)
        self.nxt = [0, 0]  # sequence space used (payload, SYN, FIN), per side (0 client, 1 server)
        self.data = [0, 0]  # payload bytes sent, per side
        self.sha = [hashlib.sha256(), hashlib.sha256()]
        self.ip_id = [0, 0]
        self.ts_base = ts_base
        mac_c, mac_s = b"\x02\x00" + c[0], b"\x02\x00\x5e\x00\x00\x01"
        self.tmpl = []
        self.pseudo = []
        for (sip, sport, smac), (dip, dport, dmac), ttl in (
            ((c[0], c[1], mac_c), (s[0], s[1], mac_s), 64),
            ((s[0], s[1], mac_s), (c[0], c[1], mac_c), 57),
        ):
            t = bytearray(_HDR_LEN)
            _ETH.pack_into(t, 0, dmac, smac, 0x0800)
            _IP4.pack_into(t, 14, 0x45, 0, 0, 0, 0x4000, ttl, 6, 0, sip, dip)
            _TCP.pack_into(t, 34, sport, dport, 0, 0, 0, 64240, 0, 0)
            _TSOPT.pack_into(t, 54, 1, 1, 8, 10, 0, 0)
            self.tmpl.append(bytes(t))
            # the pseudo header's constant part (addresses, protocol), mod 0xFFFF
            self.pseudo.append((int.from_bytes(sip + dip, "big") + 6) % 0xFFFF)

    def frame(self, t: int, side: int, flags: int, payload: bytes = b"") -> bytearray:
        """The next packet from `side` (0 client, 1 server) at time t (µs): seq is what that
        side has sent so far, ack what the peer has (when ACK is set)."""
        peer = 1 - side
        seq = (self.isn[side] + self.nxt[side]) & M32
        ack = (self.isn[peer] + self.nxt[peer]) & M32 if flags & ACK else 0
        f = bytearray(self.tmpl[side])
        n = len(payload)
        if n:
            f += payload
        self.ip_id[side] = ip_id = (self.ip_id[side] + 1) & 0xFFFF
        _IP_LEN_ID.pack_into(f, 16, 20 + 32 + n, ip_id)
        ip_sum = int.from_bytes(f[14:34], "big") % 0xFFFF
        _CSUM.pack_into(f, 24, 0xFFFF - ip_sum if ip_sum else 0)
        _TCP_SEQ.pack_into(f, 38, seq, ack, (8 << 12) | flags)
        tsval = (self.ts_base + t // 1000) & M32
        _TS_VALS.pack_into(f, 58, tsval, tsval - 1 & M32 if flags & ACK else 0)
        # one's-complement sum = the number mod 0xFFFF; an odd length is padded with a zero
        body = int.from_bytes(f[34:], "big")
        if n & 1:
            body <<= 8
        tcp_sum = (self.pseudo[side] + 32 + n + body) % 0xFFFF
        _CSUM.pack_into(f, 50, 0xFFFF - tcp_sum if tcp_sum else 0)
        if n:
            self.sha[side].update(payload)
            self.data[side] += n
        self.nxt[side] += n + (1 if flags & (SYN | FIN) else 0)
        return f

    def truth(self) -> dict:
        return {
            "client": [socket.inet_ntoa(self.c[0]), self.c[1]],
            "server": [socket.inet_ntoa(self.s[0]), self.s[1]],
            "client_len": self.data[0], "client_sha256": self.sha[0].hexdigest(),
            "server_len": self.data[1], "server_sha256": self.sha[1].hexdigest(),
        }


class _FastWriter:
    """Writes (time µs, frame) in order to a classic pcap, buffering the joins."""

    def __init__(self, path: str) -> None:
        self.f = open(path, "wb")  # noqa: SIM115  (closed by close())
        self.f.write(_PCAP_HDR)
        self.buf: list[bytes | bytearray] = []
        self.packets = 0
        self.size = len(_PCAP_HDR)
        self.first = self.last = -1

    def add(self, t: int, frame: bytes | bytearray) -> None:
        n = len(frame)
        self.buf.append(_REC.pack(EPOCH + t // 1_000_000, t % 1_000_000, n, n))
        self.buf.append(frame)
        self.packets += 1
        self.size += 16 + n
        if self.first < 0:
            self.first = t
        self.last = t
        if len(self.buf) >= 16384:
            self.f.write(b"".join(self.buf))
            self.buf.clear()

    def close(self) -> None:
        self.f.write(b"".join(self.buf))
        self.buf.clear()
        self.f.close()


def _ip4(base: tuple[int, int], i: int) -> bytes:
    """The i-th address of a /16 (or wider, carrying into the second octet)."""
    return bytes((base[0], base[1] + (i >> 16), (i >> 8) & 255, i & 255))


def _conn_packets(conn: _FastConn, t: int, req: bytes, resp: bytes, mss: int,
                  gap: int) -> list[tuple[int, bytearray]]:
    """Handshake, a request, a response in MSS segments (a delayed ACK per two), FIN close."""
    out = [(t, conn.frame(t, 0, SYN))]
    t += gap
    out.append((t, conn.frame(t, 1, SYN | ACK)))
    t += gap
    out.append((t, conn.frame(t, 0, ACK)))
    t += gap
    out.append((t, conn.frame(t, 0, PSH | ACK, req)))
    view = memoryview(resp)
    for k, off in enumerate(range(0, len(resp), mss)):
        t += gap
        out.append((t, conn.frame(t, 1, ACK, bytes(view[off : off + mss]))))
        if k & 1:
            t += gap
            out.append((t, conn.frame(t, 0, ACK)))
    for side in (0, 1):
        t += gap
        out.append((t, conn.frame(t, side, FIN | ACK)))
    t += gap
    out.append((t, conn.frame(t, 0, ACK)))
    return out


def generate_short(w: _FastWriter, rng: random.Random, block: bytes) -> list[dict]:
    """50,000 connections of 9 packets, 50 open at a time: 50 lanes take turns, one packet each;
    a lane starts its next connection when its current one has sent its 9 packets."""
    lanes, total, per_lane = 50, 50_000, 1000
    truth = []
    t = 0
    server = [_ip4((192, 0), 2 * 256 + 1 + k % 10) for k in range(lanes)]
    plans: list[list[tuple[int, bytes]]] = [[] for _ in range(lanes)]
    done = [0] * lanes
    conns: list[_FastConn | None] = [None] * lanes
    while any(d < per_lane for d in done) or any(plans):
        for lane in range(lanes):
            if not plans[lane]:
                if conns[lane] is not None:
                    truth.append(conns[lane].truth())  # type: ignore[union-attr]
                    conns[lane] = None
                if done[lane] == per_lane:
                    continue
                n = done[lane]
                done[lane] += 1
                c = _FastConn((_ip4((10, 1), lane * 256 + 1), 10_000 + n),
                              (server[lane], 80), rng.getrandbits(32), rng.getrandbits(32),
                              rng.getrandbits(32))
                conns[lane] = c
                req = b"GET /item/%d HTTP/1.1\r\nHost: short.example\r\n\r\n" % (lane * 1000 + n)
                off = rng.randrange(len(block) - 1400)
                body = block[off : off + rng.randint(100, 1300)]
                plans[lane] = [(0, SYN), (1, SYN | ACK), (0, ACK), (0, PSH | ACK, req),
                               (1, PSH | ACK, body), (0, ACK), (0, FIN | ACK), (1, FIN | ACK),
                               (0, ACK)][::-1]  # type: ignore[list-item]
            step = plans[lane].pop()
            t += rng.randint(5, 35)
            w.add(t, conns[lane].frame(t, *step))  # type: ignore[union-attr, arg-type]
    truth += [c.truth() for c in conns if c is not None]
    assert len(truth) == total
    return truth


def generate_synflood(w: _FastWriter, rng: random.Random, block: bytes, *, syns: int = 500_000,
                      real: int = 200) -> tuple[list[dict], int]:
    """`syns` SYNs from distinct sources to one server, none answered, 10 µs apart; `real`
    connections to the same server start at random times through them (bench/flood.py scales
    both)."""
    if syns >= 1 << 22:
        raise ValueError("at most 4,194,304 SYNs (distinct sources in 100.64.0.0/10)")
    victim = (_ip4((192, 0), 2 * 256 + 80), 80)
    span = max(syns * 10, 200_000)
    reals: list[tuple[int, int, bytearray]] = []
    truth = []
    for k in range(real):
        c = _FastConn((_ip4((10, 2), k + 1), 40_000 + k), victim, rng.getrandbits(32),
                      rng.getrandbits(32), rng.getrandbits(32))
        off = rng.randrange(len(block) - 41_000)
        resp = block[off : off + rng.randint(4_000, 40_000)]
        req = b"GET /real/%d HTTP/1.1\r\nHost: victim.example\r\n\r\n" % k
        for t, f in _conn_packets(c, rng.randrange(span - 100_000), req, resp, PAYLOAD4,
                                  rng.randint(50, 500)):
            reals.append((t, len(reals), f))
        truth.append(c.truth())
    reals.sort()
    ri = 0
    # one flood SYN's frame: the template of a throwaway connection, patched per source
    for i in range(syns):
        t = i * 10
        while ri < len(reals) and reals[ri][0] <= t:
            w.add(reals[ri][0], reals[ri][2])
            ri += 1
        src = bytes((100, 64 + (i >> 16), (i >> 8) & 255, i & 255))
        w.add(t, _FastConn((src, rng.randint(1024, 65535)), victim, rng.getrandbits(32), 0,
                           rng.getrandbits(32)).frame(t, 0, SYN))
    for t, _, f in reals[ri:]:
        w.add(t, f)
    return truth, syns


def generate_bulk(w: _FastWriter, rng: random.Random, block: bytes) -> list[dict]:
    """One connection: a request, then 200,000,000 bytes from the server in full segments, a
    delayed ACK per two, ~1.2 Gb/s (10 µs per segment), FIN close."""
    total = 200_000_000
    c = _FastConn((_ip4((10, 3), 1), 51_000), (_ip4((198, 51), 100 * 256 + 7), 443),
                  rng.getrandbits(32), (1 << 32) - 100_000, rng.getrandbits(32))  # seq wraps
    req = b"GET /big.iso HTTP/1.1\r\nHost: bulk.example\r\n\r\n"
    t = 0
    for step in ((0, SYN), (1, SYN | ACK), (0, ACK), (0, PSH | ACK, req)):
        t += 200
        w.add(t, c.frame(t, *step))  # type: ignore[arg-type]
    size = len(block)
    off = 0
    sent = 0
    k = 0
    while sent < total:
        n = min(PAYLOAD4, total - sent)
        if off + n > size:
            off = rng.randrange(size // 2)
        t += 10
        w.add(t, c.frame(t, 1, ACK, block[off : off + n]))
        off += n
        sent += n
        k += 1
        if k & 1 or sent == total:
            w.add(t + 5, c.frame(t + 5, 0, ACK))
    for side in (1, 0):
        t += 200
        w.add(t, c.frame(t, side, FIN | ACK))
    t += 200
    w.add(t, c.frame(t, 1, ACK))
    return [c.truth()]


FAST_SHAPES = {"short": generate_short, "synflood": generate_synflood, "bulk": generate_bulk}
SHAPES = ("mixed", *FAST_SHAPES)


def generate_fast(shape: str, path: str, seed: int = 1, truth_path: str | None = None) -> dict:
    """Write one of the fast shapes (and its truth); returns its figures like generate()."""
    t0 = time.perf_counter()
    rng = random.Random(seed)
    block = rng.randbytes(BLOCK_SIZE)
    w = _FastWriter(path)
    try:
        res = FAST_SHAPES[shape](w, rng, block)
    finally:
        w.close()
    truth, empty = res if isinstance(res, tuple) else (res, 0)
    if truth_path:
        with open(truth_path, "w", encoding="utf-8") as f:
            for rec in truth:
                f.write(json.dumps(rec) + "\n")
            if empty:
                f.write(json.dumps({"empty_flows": empty}) + "\n")
    return {
        "path": path, "shape": shape, "packets": w.packets,
        "connections": len(truth) + empty, "ipv4_connections": len(truth) + empty,
        "ipv6_connections": 0,
        "max_concurrent": {"short": 50, "bulk": 1}.get(shape, len(truth) + empty),
        "bytes": w.size, "duration_s": round((w.last - w.first) / 1e6, 3), "seed": seed,
        "late_segments": 0, "generation_s": round(time.perf_counter() - t0, 3),
    }


def truth(gen: Generator) -> list[dict]:
    """What each connection carried, both directions: lengths and SHA-256 of the bytes."""
    out = []
    for conn in gen.conns:
        fam = socket.AF_INET6 if conn.v6 else socket.AF_INET
        c, s = conn.c, conn.s
        out.append({
            "client": [socket.inet_ntop(fam, c.ip), c.port],
            "server": [socket.inet_ntop(fam, s.ip), s.port],
            "client_len": c.nxt, "client_sha256": c.sent.hexdigest(),
            "server_len": s.nxt, "server_sha256": s.sent.hexdigest(),
        })
    return out


def generate(path: str, packets: int = 150_000, connections: int = 1600, seed: int = 1,
             truth_path: str | None = None, shape: str = "mixed") -> dict:
    """Write the capture to `path` (and the truth to `truth_path`); returns its figures."""
    if shape != "mixed":
        return generate_fast(shape, path, seed, truth_path)
    t0 = time.perf_counter()
    gen = Generator(seed)
    gen.generate(packets, connections)
    size = gen.write(path)
    if truth_path:
        with open(truth_path, "w", encoding="utf-8") as f:
            for rec in truth(gen):
                f.write(json.dumps(rec) + "\n")
    v6 = sum(1 for c in gen.conns if c.v6)
    return {
        "path": path,
        "shape": "mixed",
        "packets": len(gen.events),
        "connections": len(gen.conns),
        "ipv4_connections": len(gen.conns) - v6,
        "ipv6_connections": v6,
        "max_concurrent": gen.max_concurrent(),
        "bytes": size,
        "duration_s": round((gen.events[-1][0] - gen.events[0][0]) / 1e6, 3),
        "seed": seed,
        "late_segments": gen.late,
        "generation_s": round(time.perf_counter() - t0, 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output pcap path")
    ap.add_argument("--shape", choices=SHAPES, default="mixed",
                    help="what the capture holds (mixed; see the module docstring)")
    ap.add_argument("--packets", type=int, default=150_000, help="minimum packets (150000)")
    ap.add_argument("--connections", type=int, default=1600, help="minimum connections (1600)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--truth", metavar="FILE",
                    help="also write every connection's true bytes (lengths, SHA-256) as JSONL")
    args = ap.parse_args(argv)
    info = generate(args.out, args.packets, args.connections, args.seed, args.truth,
                    args.shape)
    print(
        f"{info['path']}: {info['shape']}, {info['packets']} packets, {info['connections']} "
        f"connections ({info['ipv4_connections']} IPv4, {info['ipv6_connections']} IPv6, "
        f"max {info['max_concurrent']} open at once), {info['bytes'] / 2**20:.1f} MiB, "
        f"{info['duration_s']} s of traffic, {info['late_segments']} segments captured after "
        f"their ACK, generated in {info['generation_s']} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
