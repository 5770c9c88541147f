"""A tiny capture builder for tests (stdlib only).

Builds frames (Ethernet / SLL / null / raw IP, IPv4 and IPv6, TCP with correct checksums) and
writes them as classic pcap (µs or ns, little-endian) or pcapng. `Conversation` scripts a TCP
connection and keeps the seq/ack bookkeeping, including sequence numbers that wrap mod 2**32.

    from pcapbuild import Conversation
    c = Conversation().handshake().send("client", b"GET / HTTP/1.0\\r\\n\\r\\n")
    c.send("server", b"HTTP/1.0 200 OK\\r\\n\\r\\n").close().write(tmp_path / "x.pcap")

Relative sequence numbers (`segment(side, rel_seq, ...)`, `send(..., seq_offset=...)`) count from
the first data byte, i.e. ISN + 1, like Wireshark's relative seqs.

Timestamps given to the writers are float seconds, or `(sec, nsec)` tuples when a test needs
exact nanoseconds (a float near 1.7e9 only carries ~0.2 µs).
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections.abc import Iterable, Sequence
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import IO, Literal, Self

# Link types (https://www.tcpdump.org/linktypes.html)
LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
ETHERTYPE_VLAN = 0x8100  # IEEE 802.1Q
ETHERTYPE_QINQ = 0x88A8  # IEEE 802.1ad

IPPROTO_HOPOPTS = 0
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_NONE = 59
IPPROTO_DSTOPTS = 60

AF_INET_NULL = 2  # BSD loopback (DLT_NULL) address families, host byte order
AF_INET6_NULL = 24  # NetBSD/OpenBSD value; Wireshark and libpcap also accept 28 and 30

TCP_FLAG_BITS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10, "U": 0x20, "E": 0x40,
                 "C": 0x80}

PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D

SEQ_MOD = 1 << 32
NS = 1_000_000_000

DEFAULT_SRC_MAC = "02:00:00:00:00:01"
DEFAULT_DST_MAC = "02:00:00:00:00:02"

Timestamp = float | int | tuple[int, int]
Packet = tuple[Timestamp, bytes] | tuple[Timestamp, bytes, int]


# --------------------------------------------------------------------------- headers


def _mac(mac: str | bytes) -> bytes:
    if isinstance(mac, bytes):
        if len(mac) != 6:
            raise ValueError(f"MAC must be 6 bytes, got {len(mac)}")
        return mac
    return bytes(int(part, 16) for part in mac.split(":"))


def eth(src_mac: str | bytes = DEFAULT_SRC_MAC, dst_mac: str | bytes = DEFAULT_DST_MAC,
        ethertype: int = ETHERTYPE_IPV4, vlans: Iterable[int | tuple[int, int]] = ()) -> bytes:
    """Ethernet II header only. `vlans`: outermost first; an int is an 802.1Q VLAN id, a
    `(tpid, vid)` pair sets the tag type too (e.g. `(ETHERTYPE_QINQ, 100)` for 802.1ad)."""
    out = bytearray(_mac(dst_mac) + _mac(src_mac))
    for tag in vlans:
        tpid, vid = (ETHERTYPE_VLAN, tag) if isinstance(tag, int) else tag
        out += struct.pack("!HH", tpid, vid & 0x0FFF)
    out += struct.pack("!H", ethertype)
    return bytes(out)


def sll(protocol: int = ETHERTYPE_IPV4, pkttype: int = 0, src_mac: str | bytes = DEFAULT_SRC_MAC,
        arphrd: int = 1) -> bytes:
    """Linux cooked capture (SLL, linktype 113) header, 16 bytes."""
    addr = _mac(src_mac)
    return struct.pack("!HHH8sH", pkttype, arphrd, len(addr), addr.ljust(8, b"\0"), protocol)


def sll2(protocol: int = ETHERTYPE_IPV4, pkttype: int = 0, src_mac: str | bytes = DEFAULT_SRC_MAC,
         arphrd: int = 1, ifindex: int = 1) -> bytes:
    """Linux cooked capture v2 (SLL2, linktype 276, the `any` device) header, 20 bytes."""
    addr = _mac(src_mac)
    return struct.pack("!HHIHBB8s", protocol, 0, ifindex, arphrd, pkttype, len(addr),
                       addr.ljust(8, b"\0"))


def null_header(v6: bool = False) -> bytes:
    """BSD loopback (linktype 0) header: address family, 4 bytes, little-endian (the byte order
    of the pcap files written here)."""
    return struct.pack("<I", AF_INET6_NULL if v6 else AF_INET_NULL)


def checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(src: str, dst: str, payload: bytes, proto: int = IPPROTO_TCP, ttl: int = 64,
         ident: int = 0, flags_df: bool = True, frag_offset: int = 0,
         more_fragments: bool = False, options: bytes = b"",
         total_length: int | None = None) -> bytes:
    """IPv4 header + payload, header checksum computed. `frag_offset` is in bytes (multiple of
    8). `options` is padded to 4 bytes. `total_length` overrides the field (0 = TSO style)."""
    if frag_offset % 8:
        raise ValueError("frag_offset must be a multiple of 8 bytes")
    options = options + b"\0" * (-len(options) % 4)
    ihl = 5 + len(options) // 4
    if total_length is None:
        total_length = ihl * 4 + len(payload)
    flags = (0x4000 if flags_df else 0) | (0x2000 if more_fragments else 0) | (frag_offset // 8)
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total_length & 0xFFFF, ident & 0xFFFF,
                         flags, ttl, proto, 0, ipaddress.IPv4Address(src).packed,
                         ipaddress.IPv4Address(dst).packed) + options
    csum = checksum(header)
    return header[:10] + struct.pack("!H", csum) + header[12:] + payload


def ipv4_fragments(src: str, dst: str, payload: bytes, fragment_size: int,
                   proto: int = IPPROTO_TCP, ident: int = 1, ttl: int = 64) -> list[bytes]:
    """Split an IP payload (e.g. a whole `tcp(...)` segment) into IPv4 fragments of at most
    `fragment_size` payload bytes (rounded down to a multiple of 8), in order."""
    step = max(8, fragment_size - fragment_size % 8)
    out = []
    for off in range(0, len(payload), step):
        chunk = payload[off:off + step]
        out.append(ipv4(src, dst, chunk, proto=proto, ttl=ttl, ident=ident, flags_df=False,
                        frag_offset=off, more_fragments=off + step < len(payload)))
    return out


def ipv6_fragments(src: str, dst: str, payload: bytes, fragment_size: int,
                   next_header: int = IPPROTO_TCP, ident: int = 1,
                   hop_limit: int = 64) -> list[bytes]:
    """Split an IPv6 payload (e.g. a whole `tcp(...)` segment) into IPv6 packets with a fragment
    header, at most `fragment_size` payload bytes each (rounded down to a multiple of 8), in
    order."""
    step = max(8, fragment_size - fragment_size % 8)
    return [ipv6(src, dst, payload[off:off + step], IPPROTO_FRAGMENT,
                 ipv6_frag(next_header, off, off + step < len(payload), ident), hop_limit)
            for off in range(0, len(payload), step)]


def ipv6(src: str, dst: str, payload: bytes, next_header: int = IPPROTO_TCP,
         ext_headers: bytes = b"", hop_limit: int = 64) -> bytes:
    """IPv6 header + `ext_headers` + payload. `next_header` is the fixed header's field: with
    extension headers, pass the first one's type (build them with `ipv6_ext`, which chains)."""
    plen = len(ext_headers) + len(payload)
    return struct.pack("!IHBB16s16s", 6 << 28, plen, next_header, hop_limit,
                       ipaddress.IPv6Address(src).packed,
                       ipaddress.IPv6Address(dst).packed) + ext_headers + payload


def ipv6_ext(next_header: int, data: bytes = b"") -> bytes:
    """A generic IPv6 extension header (hop-by-hop, routing, destination options): next header,
    length, `data` padded with zeros so the header is a multiple of 8 bytes."""
    body = data + b"\0" * (-(len(data) + 2) % 8)
    return struct.pack("!BB", next_header, (len(body) + 2) // 8 - 1) + body


def ipv6_frag(next_header: int, frag_offset: int, more_fragments: bool, ident: int) -> bytes:
    """IPv6 fragment extension header (8 bytes); `frag_offset` in bytes, multiple of 8."""
    return struct.pack("!BBHI", next_header, 0, (frag_offset & ~7) | int(more_fragments), ident)


def tcp_flags(flags: str | int) -> int:
    if isinstance(flags, int):
        return flags
    bits = 0
    for letter in flags.upper():
        try:
            bits |= TCP_FLAG_BITS[letter]
        except KeyError:
            raise ValueError(f"unknown TCP flag letter {letter!r} in {flags!r}") from None
    return bits


def _pseudo_header(src: str, dst: str, length: int, proto: int) -> bytes:
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if a.version == 4:
        return a.packed + b.packed + struct.pack("!BBH", 0, proto, length)
    return a.packed + b.packed + struct.pack("!IxxxB", length, proto)


def tcp(sport: int, dport: int, seq: int, ack: int = 0, flags: str | int = "A",
        payload: bytes = b"", win: int = 65535, options: bytes = b"", *,
        src: str | None = None, dst: str | None = None, urg: int = 0) -> bytes:
    """TCP header + payload. Flags as letters (S=SYN A=ACK P=PSH F=FIN R=RST U=URG E=ECE C=CWR).
    With `src`/`dst` (IP addresses) the checksum is computed, else it is 0."""
    options = options + b"\0" * (-len(options) % 4)  # pad with EOL
    offset = (5 + len(options) // 4) << 4
    header = struct.pack("!HHIIBBHHH", sport, dport, seq % SEQ_MOD, ack % SEQ_MOD, offset,
                         tcp_flags(flags), win, 0, urg) + options
    segment = header + payload
    if src is not None and dst is not None:
        csum = checksum(_pseudo_header(src, dst, len(segment), IPPROTO_TCP) + segment)
        segment = segment[:16] + struct.pack("!H", csum) + segment[18:]
    return segment


def _is_v6(addr: str) -> bool:
    return ipaddress.ip_address(addr).version == 6


def link_header(linktype: int, v6: bool, vlans: Iterable[int | tuple[int, int]] = (),
                src_mac: str | bytes = DEFAULT_SRC_MAC,
                dst_mac: str | bytes = DEFAULT_DST_MAC) -> bytes:
    ethertype = ETHERTYPE_IPV6 if v6 else ETHERTYPE_IPV4
    if linktype == LINKTYPE_ETHERNET:
        return eth(src_mac, dst_mac, ethertype, vlans)
    if vlans:
        raise ValueError("vlans need linktype 1 (Ethernet)")
    if linktype == LINKTYPE_RAW:
        return b""
    if linktype == LINKTYPE_LINUX_SLL:
        return sll(ethertype, src_mac=src_mac)
    if linktype == LINKTYPE_LINUX_SLL2:
        return sll2(ethertype, src_mac=src_mac)
    if linktype == LINKTYPE_NULL:
        return null_header(v6)
    raise ValueError(f"unsupported linktype {linktype}")


def frame(src: str, dst: str, sport: int, dport: int, seq: int, ack: int = 0,
          flags: str | int = "A", payload: bytes = b"", *, v6: bool | None = None,
          vlans: Iterable[int | tuple[int, int]] = (), linktype: int = LINKTYPE_ETHERNET,
          win: int = 65535, options: bytes = b"", ttl: int = 64, ident: int = 0,
          src_mac: str | bytes = DEFAULT_SRC_MAC, dst_mac: str | bytes = DEFAULT_DST_MAC) -> bytes:
    """A whole frame: link header + IPv4/IPv6 (by address family unless `v6` says) + TCP with
    correct checksums. linktype 1 (Ethernet), 101 (raw IP), 113 (SLL), 276 (SLL2), 0 (null)."""
    return fragmented_frames(src, dst, sport, dport, seq, ack, flags, payload, v6=v6,
                             vlans=vlans, linktype=linktype, win=win, options=options, ttl=ttl,
                             ident=ident, src_mac=src_mac, dst_mac=dst_mac)[0]


def fragmented_frames(src: str, dst: str, sport: int, dport: int, seq: int, ack: int = 0,
                      flags: str | int = "A", payload: bytes = b"", *, fragment_size: int = 0,
                      v6: bool | None = None, vlans: Iterable[int | tuple[int, int]] = (),
                      linktype: int = LINKTYPE_ETHERNET, win: int = 65535,
                      options: bytes = b"", ttl: int = 64, ident: int = 0,
                      src_mac: str | bytes = DEFAULT_SRC_MAC,
                      dst_mac: str | bytes = DEFAULT_DST_MAC) -> list[bytes]:
    """Like `frame`, but with `fragment_size` > 0 the TCP segment is cut into IP fragments of at
    most that many payload bytes (IPv4, or IPv6 fragment headers), one frame each, in order."""
    if v6 is None:
        v6 = _is_v6(src)
    seg = tcp(sport, dport, seq, ack, flags, payload, win, options, src=src, dst=dst)
    head = link_header(linktype, v6, vlans, src_mac, dst_mac)
    if fragment_size:
        if v6:
            ips = ipv6_fragments(src, dst, seg, fragment_size, ident=ident, hop_limit=ttl)
        else:
            ips = ipv4_fragments(src, dst, seg, fragment_size, ident=ident, ttl=ttl)
        return [head + ip for ip in ips]
    ip = ipv6(src, dst, seg, hop_limit=ttl) if v6 else ipv4(src, dst, seg, ttl=ttl, ident=ident)
    return [head + ip]


# --------------------------------------------------------------------------- files


def _split_ts(ts: Timestamp, nanosecond: bool) -> tuple[int, int]:
    """(sec, fraction) in the file's precision. Tuples are (sec, nsec); µs files floor them."""
    if isinstance(ts, tuple):
        sec, nsec = ts
        return sec, nsec if nanosecond else nsec // 1000
    scale = 1_000_000_000 if nanosecond else 1_000_000
    return divmod(_ts_units(ts, scale), scale)


def _ts_units(ts: Timestamp, resolution: int) -> int:
    """Timestamp in 1/resolution s, floored (as libpcap reads ns files at µs). A float is taken
    at its shortest decimal repr, so 1700000000.001 is exactly .001000000 in a nanosecond file
    (not .000999936)."""
    if isinstance(ts, tuple):
        sec, nsec = ts
        return sec * resolution + nsec * resolution // 1_000_000_000
    return int((Decimal(repr(ts)) * resolution).to_integral_value(ROUND_FLOOR))


class _CaptureFile:
    """The file a writer writes to: opened (and closed) here when given a path, left open when
    given a file object. A context manager."""

    def __init__(self, path_or_file: str | Path | IO[bytes]) -> None:
        if isinstance(path_or_file, str | Path):
            self._fh: IO[bytes] = open(path_or_file, "wb")  # noqa: SIM115
            self._owned = True
        else:
            self._fh = path_or_file
            self._owned = False

    def close(self) -> None:
        if self._owned:
            self._fh.close()
        else:
            self._fh.flush()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PcapWriter(_CaptureFile):
    """Classic pcap, little-endian; µs or ns timestamps. A context manager; a file object passed
    in is left open."""

    _record = struct.Struct("<IIII")

    def __init__(self, path_or_file: str | Path | IO[bytes], linktype: int = LINKTYPE_ETHERNET,
                 nanosecond: bool = False, snaplen: int = 262144) -> None:
        super().__init__(path_or_file)
        self.linktype = linktype
        self.nanosecond = nanosecond
        self.snaplen = snaplen
        magic = PCAP_MAGIC_NS if nanosecond else PCAP_MAGIC_US
        self._fh.write(struct.pack("<IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype))

    def write(self, ts: Timestamp, frame: bytes, wire_len: int | None = None) -> None:
        """caplen = len(frame); wire_len defaults to len(frame) (pass more to fake a snaplen)."""
        sec, frac = _split_ts(ts, self.nanosecond)
        wire = len(frame) if wire_len is None else wire_len
        self._fh.write(self._record.pack(sec, frac, len(frame), wire) + frame)


def write_pcap(path: str | Path | IO[bytes], packets: Iterable[Packet],
               linktype: int = LINKTYPE_ETHERNET, nanosecond: bool = False,
               snaplen: int = 262144) -> None:
    """packets: (ts, frame) or (ts, frame, wire_len)."""
    with PcapWriter(path, linktype, nanosecond, snaplen) as w:
        for p in packets:
            w.write(*p)


PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_IDB = 0x00000001
PCAPNG_EPB = 0x00000006
PCAPNG_BYTE_ORDER_MAGIC = 0x1A2B3C4D
PCAPNG_OPT_ENDOFOPT = 0
PCAPNG_OPT_IF_TSRESOL = 9


def _pcapng_block(block_type: int, body: bytes) -> bytes:
    body = body + b"\0" * (-len(body) % 4)
    total = 12 + len(body)
    return struct.pack("<II", block_type, total) + body + struct.pack("<I", total)


class PcapngWriter(_CaptureFile):
    """pcapng, little-endian: SHB, one IDB per `add_interface` (the first is added by the
    constructor from `linktype`), EPBs. `nanosecond` writes if_tsresol = 9 on that interface;
    otherwise if_tsresol = 6 (the default µs) is written explicitly."""

    def __init__(self, path_or_file: str | Path | IO[bytes], linktype: int = LINKTYPE_ETHERNET,
                 nanosecond: bool = False, snaplen: int = 262144) -> None:
        super().__init__(path_or_file)
        self._resolutions: list[int] = []
        shb = struct.pack("<IHHq", PCAPNG_BYTE_ORDER_MAGIC, 1, 0, -1)
        self._fh.write(_pcapng_block(PCAPNG_SHB, shb))
        self.add_interface(linktype, nanosecond, snaplen)

    def add_interface(self, linktype: int, nanosecond: bool = False,
                      snaplen: int = 262144) -> int:
        """Append an IDB; returns its interface id for `write(..., interface=)`."""
        tsresol = 9 if nanosecond else 6
        opts = struct.pack("<HHB3x", PCAPNG_OPT_IF_TSRESOL, 1, tsresol)
        opts += struct.pack("<HH", PCAPNG_OPT_ENDOFOPT, 0)
        self._fh.write(_pcapng_block(PCAPNG_IDB, struct.pack("<HHI", linktype, 0, snaplen) + opts))
        self._resolutions.append(10 ** tsresol)
        return len(self._resolutions) - 1

    def write(self, ts: Timestamp, frame: bytes, wire_len: int | None = None,
              interface: int = 0) -> None:
        units = _ts_units(ts, self._resolutions[interface])
        wire = len(frame) if wire_len is None else wire_len
        body = struct.pack("<IIIII", interface, units >> 32, units & 0xFFFFFFFF, len(frame),
                           wire) + frame
        self._fh.write(_pcapng_block(PCAPNG_EPB, body))


def write_pcapng(path: str | Path | IO[bytes], packets: Iterable[Packet],
                 linktype: int = LINKTYPE_ETHERNET, nanosecond: bool = False) -> None:
    """SHB, one IDB (if_tsresol 6 = µs, or 9 with `nanosecond`), one EPB per packet."""
    with PcapngWriter(path, linktype, nanosecond) as w:
        for p in packets:
            w.write(*p)


# --------------------------------------------------------------------------- conversations

Side = Literal["client", "server"]


class Conversation:
    """Script one TCP connection; seq/ack numbers are kept for you.

    Each side has a high-water mark `next_rel[side]`: the relative offset (from ISN + 1) just
    past the highest byte it has sent (a FIN counts as one). Every segment carrying ACK
    acknowledges the peer's high-water mark. Each step appends one packet to `packets`, the
    first at `t0`, each next one `dt` later (per-call `dt=` overrides; `wait()` skips time).
    """

    def __init__(self, client: tuple[str, int] = ("10.0.0.1", 40000),
                 server: tuple[str, int] = ("10.0.0.2", 80), isn_c: int = 1000,
                 isn_s: int = 5000, t0: float = 1700000000.0,
                 linktype: int = LINKTYPE_ETHERNET, *, dt: float = 0.001,
                 vlans: Sequence[int | tuple[int, int]] = (), win: int = 65535) -> None:
        self.client = client
        self.server = server
        self.isn = {"client": isn_c % SEQ_MOD, "server": isn_s % SEQ_MOD}
        self.next_rel: dict[str, int] = {"client": 0, "server": 0}
        self.linktype = linktype
        self.vlans = tuple(vlans)
        self.win = win
        self.dt = dt
        self._t_ns = _ts_units(t0, NS)  # integer clock: no float drift over many steps
        self.packets: list[tuple[float, bytes]] = []
        # set these to fragment the packets added next (see `packet`)
        self.fragment_size = 0
        self.fragment_order = "forward"
        self._ident = 0

    # -- helpers
    @staticmethod
    def peer(side: Side) -> Side:
        if side not in ("client", "server"):
            raise ValueError(f"side must be 'client' or 'server', got {side!r}")
        return "server" if side == "client" else "client"

    def seq(self, side: Side, rel: int) -> int:
        """Absolute 32-bit sequence number of relative offset `rel` in `side`'s stream."""
        return (self.isn[side] + 1 + rel) % SEQ_MOD

    def ack_number(self, side: Side) -> int:
        """What `side` acknowledges: the peer's high-water mark."""
        peer = self.peer(side)
        return self.seq(peer, self.next_rel[peer])

    def wait(self, seconds: float) -> Conversation:
        """Advance the clock (e.g. past a timeout) before the next packet."""
        self._t_ns += _ts_units(seconds, NS)
        return self

    @property
    def t(self) -> float:
        """Current time (the last packet's timestamp), float seconds."""
        return self._t_ns / NS

    def packet(self, side: Side, seq: int, ack: int, flags: str | int, payload: bytes = b"",
               *, dt: float | None = None, options: bytes = b"") -> Conversation:
        """Append one raw packet from `side` with absolute seq/ack; no bookkeeping. While
        `fragment_size` is set, the packet is cut into IP fragments, one packet each, `dt`
        apart, in the order `fragment_order` says ("forward", "reverse", or "shuffle": seeded by
        the IP id, so the same every run); each fragmented packet gets the next IP id."""
        src, dst = (self.client, self.server) if side == "client" else (self.server, self.client)
        mac_c, mac_s = DEFAULT_SRC_MAC, DEFAULT_DST_MAC
        macs = (mac_c, mac_s) if side == "client" else (mac_s, mac_c)
        if self.fragment_size:
            self._ident += 1
        frames = fragmented_frames(
            src[0], dst[0], src[1], dst[1], seq, ack, flags, payload,
            fragment_size=self.fragment_size, vlans=self.vlans, linktype=self.linktype,
            win=self.win, options=options, ident=self._ident, src_mac=macs[0],
            dst_mac=macs[1])
        order = list(range(len(frames)))
        if self.fragment_order == "reverse":
            order.reverse()
        elif self.fragment_order == "shuffle":
            random.Random(self._ident).shuffle(order)
        for i in order:
            if self.packets:
                self._t_ns += _ts_units(self.dt if dt is None else dt, NS)
            self.packets.append((self.t, frames[i]))
        return self

    def _flags(self, flags: str | int, ack: bool) -> tuple[str | int, bool]:
        if isinstance(flags, int):
            return flags, bool(flags & TCP_FLAG_BITS["A"])
        if not ack:
            flags = flags.replace("A", "").replace("a", "")
        return flags, "A" in flags.upper()

    def _data(self, side: Side, rel: int, data: bytes, flags: str | int, ack: bool,
              advance: bool, consumes: int, dt: float | None) -> Conversation:
        self.peer(side)  # validates
        flags, has_ack = self._flags(flags, ack)
        ackno = self.ack_number(side) if has_ack else 0
        self.packet(side, self.seq(side, rel), ackno, flags, data, dt=dt)
        if advance:
            self.next_rel[side] = max(self.next_rel[side], rel + len(data) + consumes)
        return self

    # -- steps
    def handshake(self, *, dt: float | None = None, options: bytes = b"") -> Conversation:
        """SYN, SYN-ACK, ACK."""
        self.packet("client", self.isn["client"], 0, "S", dt=dt, options=options)
        self.packet("server", self.isn["server"], self.seq("client", 0), "SA", dt=dt,
                    options=options)
        self.packet("client", self.seq("client", 0), self.seq("server", 0), "A", dt=dt)
        return self

    def syn(self, *, dt: float | None = None) -> Conversation:
        self.packet("client", self.isn["client"], 0, "S", dt=dt)
        return self

    def synack(self, *, dt: float | None = None) -> Conversation:
        self.packet("server", self.isn["server"], self.seq("client", 0), "SA", dt=dt)
        return self

    def send(self, side: Side, data: bytes, *, seq_offset: int = 0, ack: bool = True,
             flags: str | int = "PA", advance: bool = True,
             dt: float | None = None) -> Conversation:
        """One data segment at `side`'s high-water mark + `seq_offset` (negative: retransmit /
        overlap, positive: leave a gap). `ack=False` drops the ACK flag (ack number 0).
        `advance`: raise the high-water mark to the segment's end (never lowers it)."""
        self.peer(side)  # validates
        rel = self.next_rel[side] + seq_offset
        return self._data(side, rel, data, flags, ack, advance, 0, dt)

    def segment(self, side: Side, rel_seq: int, data: bytes, flags: str | int = "PA", *,
                advance: bool = True, dt: float | None = None) -> Conversation:
        """A segment at relative offset `rel_seq` (out of order, overlaps, gaps). Like send,
        it raises the high-water mark to its end unless `advance=False`."""
        return self._data(side, rel_seq, data, flags, True, advance, 0, dt)

    def ack(self, side: Side, *, dt: float | None = None) -> Conversation:
        """A pure ACK from `side` of everything the peer sent."""
        return self._data(side, self.next_rel[side], b"", "A", True, False, 0, dt)

    def fin(self, side: Side, *, dt: float | None = None, data: bytes = b"") -> Conversation:
        """FIN|ACK (optionally carrying data); the FIN takes one sequence number."""
        flags = "FPA" if data else "FA"
        return self._data(side, self.next_rel[side], data, flags, True, True, 1, dt)

    def rst(self, side: Side, *, ack: bool = True, dt: float | None = None) -> Conversation:
        """RST|ACK (or a bare RST with `ack=False`) at `side`'s high-water mark."""
        return self._data(side, self.next_rel[side], b"", "RA", ack, False, 0, dt)

    def close(self, *, dt: float | None = None) -> Conversation:
        """Client FIN|ACK, server FIN|ACK, client ACK."""
        return self.fin("client", dt=dt).fin("server", dt=dt).ack("client", dt=dt)

    # -- output
    def write(self, path: str | Path | IO[bytes], nanosecond: bool = False,
              pcapng: bool = False) -> None:
        if pcapng:
            write_pcapng(path, self.packets, self.linktype, nanosecond)
        else:
            write_pcap(path, self.packets, self.linktype, nanosecond)
