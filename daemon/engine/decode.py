"""Packet decoder: one captured frame in, one TCP segment tuple (or None) out.

This is the hot path (DESIGN "Decode": a flat struct decoder runs ~6.7x faster than impacket), so
it is written for CPython speed rather than elegance:

- precompiled `struct.Struct` unpackers at module level, one `unpack_from` per header, no slicing
  until the payload itself;
- no objects per packet beyond the returned tuple (no header classes, no exceptions on the
  common path: bad input is a counted `return None`, dpkt-style result codes, STYLE S1);
- the Ethernet→IPv4→TCP path is inlined into two calls (`_link_ether`, `_ip4`); everything else
  (VLAN stacks, tunnels, other link types, IPv6 extension headers, fragments) takes slower but
  still flat paths;
- `Decoder.decode` is rebound per instance to the link type's entry point, so a packet costs no
  dispatch on the link type.

Every length is checked before it is read, so `decode` never raises for any input bytes (a fuzz
test feeds random frames to every link type). Only the impacket fallback, which we do not
control, is wrapped in try/except.

Returned tuple (TCP segments only)::

    (version, src, dst, sport, dport, seq, ack, flags, win, payload, missing, opts)

`payload` is the captured TCP payload, `missing` the payload bytes the IP length says exist but
the capture cut (snaplen), `opts` the raw TCP option bytes. Trailer padding after the IP datagram
(Ethernet minimum frame size) is never payload. An IPv4 total length of 0 (TSO/GSO captures) and
an IPv6 payload length of 0 (jumbogram / GSO) mean "as captured", as Wireshark does. Checksums are
not verified (offloads leave partial sums).
"""

from __future__ import annotations

import struct
from collections import Counter
from typing import Any

import cython

from streamtap.engine.defrag import Defragmenter
from streamtap.errors import Error

# --- Link types (tcpdump.org/linktypes.html; pcapy reports the DLT value, which equals the
# LINKTYPE value except for raw IP: LINKTYPE_RAW 101 reads back as DLT_RAW 12, or 14 on OpenBSD).
DLT_NULL = 0  # BSD loopback: 4-byte address family, host byte order
DLT_EN10MB = 1  # Ethernet
DLT_PPP = 9  # PPP, optional HDLC 0xff03 prefix (RFC 1662)
DLT_FDDI = 10  # FDDI + 802.2 LLC/SNAP
DLT_RAW = 12  # raw IP (Linux, most BSDs)
DLT_RAW_OPENBSD = 14  # raw IP (OpenBSD)
DLT_PPP_SERIAL = 50  # PPP in HDLC-like framing (RFC 1662)
DLT_LINKTYPE_RAW = 101  # LINKTYPE_RAW as a DLT (some pcapy/libpcap builds pass it through)
DLT_C_HDLC = 104  # Cisco HDLC: address, control, ethertype
DLT_IEEE802_11 = 105  # 802.11 without radio header (impacket fallback)
DLT_LOOP = 108  # OpenBSD loopback: 4-byte address family, network byte order
DLT_LINUX_SLL = 113  # Linux cooked capture v1, 16-byte header
DLT_IEEE802_11_RADIO = 127  # radiotap + 802.11 (impacket fallback)
DLT_ARCNET_LINUX = 129  # ARCNET with Linux's 4-byte pseudo-header
DLT_JUNIPER_ETHER = 178  # Juniper "MGC" pseudo-header + Ethernet
DLT_IPV4 = 228  # raw IPv4
DLT_IPV6 = 229  # raw IPv6
DLT_NFLOG = 239  # Linux NFLOG: 4-byte header + TLVs
DLT_IPOIB = 242  # IP over InfiniBand (RFC 4391 §6): 40 bytes of addresses + 4-byte header
DLT_LINUX_SLL2 = 276  # Linux cooked capture v2, 20-byte header

# --- Ethertypes (IEEE registry; RFC noted where one defines the use)
ETH_HDR_LEN = 14
ETH_TYPE_MIN = 0x0600  # below: 802.3 length field, 802.2 LLC follows
ETH_TYPE_IP = 0x0800
ETH_TYPE_IP6 = 0x86DD
ETH_TYPE_VLAN = 0x8100  # IEEE 802.1Q
ETH_TYPE_QINQ = 0x88A8  # IEEE 802.1ad service tag
ETH_TYPE_QINQ_OLD = 0x9100  # pre-standard QinQ
ETH_TYPE_PPPOE_SESSION = 0x8864  # RFC 2516
ETH_TYPE_MPLS_UC = 0x8847  # RFC 3032
ETH_TYPE_MPLS_MC = 0x8848
ETH_TYPE_TEB = 0x6558  # transparent Ethernet bridging (GRE, Geneve; RFC 1701)
ETH_TYPE_ERSPAN2 = 0x88BE  # ERSPAN type I (no S bit) / II over GRE
ETH_TYPE_ERSPAN3 = 0x22EB  # ERSPAN type III over GRE
ETH_TYPE_PPP = 0x880B  # PPP over GRE (PPTP, RFC 2637)
ETH_TYPE_FABRICPATH = 0x8903  # Cisco FabricPath: 2-byte FTag/TTL, then the inner Ethernet frame
_VLAN_TYPES = frozenset((ETH_TYPE_VLAN, ETH_TYPE_QINQ, ETH_TYPE_QINQ_OLD))
_MPLS_TYPES = frozenset((ETH_TYPE_MPLS_UC, ETH_TYPE_MPLS_MC))

LLC_SNAP = b"\xaa\xaa\x03"  # DSAP/SSAP 0xAA, UI control: SNAP header with OUI + ethertype follows

# --- PPP protocol numbers (RFC 1661, RFC 1332, RFC 5072, RFC 3032)
PPP_ADDRESS_CONTROL = b"\xff\x03"  # RFC 1662 HDLC-like framing
PPP_IP = 0x0021
PPP_IP6 = 0x0057
PPP_MPLS_UC = 0x0281
PPP_MPLS_MC = 0x0283

# --- Address families in loopback headers (BSD null / loop)
AF_INET = 2
AF_INET6_SET = frozenset((10, 24, 28, 30))  # Linux, NetBSD/OpenBSD, FreeBSD, macOS

# --- NFLOG (linux/netfilter/nfnetlink_log.h); TLV length/type in the reader's host order
# (libpcap swaps them when reading a file of the other byte order).
NFULA_PAYLOAD = 9
NFLOG_TYPE_MASK = 0x7FFF  # top bit = NLA_F_NESTED

# --- ARCNET protocol ids (Linux include/uapi/linux/if_arcnet.h)
ARC_P_IP_RFC1051 = 0xF0  # RFC 1051 framing: no split header
ARC_P_IP = 0xD4  # RFC 1201 framing: split flag + sequence follow
ARC_P_IPV6 = 0xC4  # RFC 1201 framing
ARC_SPLIT_EXCEPTION = 0xFF  # RFC 1201 exception packet: 4 more bytes of filler header

# --- Juniper pseudo-header (tcpdump print-juniper.c)
JUNIPER_MAGIC = b"MGC"
JUNIPER_FLAG_NO_L2 = 0x02  # no link header: 4-byte cookie then IP
JUNIPER_FLAG_EXT = 0x80  # extension TLVs follow, 2-byte length first

# --- IP protocol numbers (IANA)
IP_PROTO_HOPOPTS = 0  # RFC 8200
IP_PROTO_IPIP = 4  # RFC 2003
IP_PROTO_TCP = 6
IP_PROTO_UDP = 17
IP_PROTO_IPV6 = 41  # RFC 2473 / 4213
IP_PROTO_ROUTING = 43
IP_PROTO_FRAGMENT = 44
IP_PROTO_GRE = 47  # RFC 2784 / 2890
IP_PROTO_ESP = 50  # RFC 4303: encrypted, nothing to decode
IP_PROTO_AH = 51  # RFC 4302: length in 32-bit words minus 2
IP_PROTO_NONE = 59
IP_PROTO_DSTOPTS = 60
# Extension headers in the RFC 8200 §4 generic format (next header, length in 8-octet units - 1):
# hop-by-hop, routing, destination options, mobility (RFC 6275), HIP (RFC 7401), shim6 (RFC 5533),
# experimental (RFC 3692).
_IP6_EXT_GENERIC = frozenset((0, 43, 60, 135, 139, 140, 253, 254))

IP_MF = 0x2000  # RFC 791 more fragments
IP_OFFMASK = 0x1FFF  # fragment offset, in 8-byte units
IP_FRAG_BITS = IP_MF | IP_OFFMASK
IP6_FRAG_OFFMASK = 0xFFF8  # RFC 8200 §4.5: offset already in bytes once the 3 flag bits are cleared
IP6_FRAG_MF = 0x0001

# --- Tunnels
GRE_CSUM = 0x8000  # RFC 2784
GRE_ROUTING = 0x4000  # RFC 1701 (deprecated)
GRE_KEY = 0x2000  # RFC 2890
GRE_SEQ = 0x1000  # RFC 2890
GRE_ACK = 0x0080  # RFC 2637 (enhanced GRE, version 1)
GRE_VERSION_MASK = 0x0007
ERSPAN2_HDR_LEN = 8
ERSPAN3_HDR_LEN = 12
ERSPAN3_SUBHDR_LEN = 8  # platform specific sub-header, present when the O bit is set
UDP_PORT_VXLAN = 4789  # RFC 7348
UDP_PORT_GENEVE = 6081  # RFC 8926
UDP_PORT_TEREDO = 3544  # RFC 4380
VXLAN_FLAG_I = 0x08
MAX_TUNNEL_DEPTH = 8  # encapsulations decoded per packet; deeper = malformed (loops, bombs)

# --- TCP (RFC 9293; CWR/ECE RFC 3168)
TH_FIN = 0x01
TH_SYN = 0x02
TH_RST = 0x04
TH_PUSH = 0x08
TH_ACK = 0x10
TH_URG = 0x20
TH_ECE = 0x40
TH_CWR = 0x80
# The decoder hands TCP options on as raw bytes (segment field 11): nothing in the engine reads
# them, so no parser is kept for them.

# --- Precompiled unpackers (STYLE D3): one unpack_from per header.
_U16 = struct.Struct("!H").unpack_from
_U32 = struct.Struct("!I").unpack_from
_HH = struct.Struct("!HH").unpack_from
_NFLOG_TLV = struct.Struct("=HH").unpack_from  # native: see NFLOG above
# version/IHL, TOS, total length, id, flags/offset, TTL, protocol, checksum, src, dst
_IP4 = struct.Struct("!BBHHHBBH4s4s").unpack_from
# version/class/flow label, payload length, next header, hop limit, src, dst
_IP6 = struct.Struct("!IHBB16s16s").unpack_from
# sport, dport, seq, ack, data offset byte, flags byte, window (checksum, urgent not needed)
_TCP = struct.Struct("!HHIIBBH").unpack_from
_TS = struct.Struct("!II").unpack_from

Segment = tuple[int, bytes, bytes, int, int, int, int, int, int, bytes, int, bytes]


class UnsupportedLinkType(Error):
    """The link type is neither on the fast path nor decodable by an impacket fallback."""


# --- Compiled-build helpers. Under CPython these run as plain functions on `bytes` (indexing a
# bytes object gives an int), so the same source is the reference; compiled, `p` is the frame's
# byte pointer and each read is one C load. No bounds checks: every caller has checked the
# length first, exactly as the struct path needs (a short read there would raise).


@cython.cfunc
@cython.inline
@cython.exceptval(check=False)
def _be16(p: cython.p_uchar, i: cython.Py_ssize_t) -> cython.uint:
    return (cython.cast(cython.uint, p[i]) << 8) | p[i + 1]


@cython.cfunc
@cython.inline
@cython.exceptval(check=False)
def _be32(p: cython.p_uchar, i: cython.Py_ssize_t) -> cython.uint:
    return (
        (cython.cast(cython.uint, p[i]) << 24)
        | (cython.cast(cython.uint, p[i + 1]) << 16)
        | (cython.cast(cython.uint, p[i + 2]) << 8)
        | p[i + 3]
    )


# Compiled: the Python ints of every 16-bit value (ports, window), made once, so a segment's tuple
# takes a reference instead of allocating three ints (2.4 MB, once per process).
_U16_INTS = cython.declare(tuple, tuple(range(65536)) if cython.compiled else ())


@cython.cfunc
@cython.inline
@cython.boundscheck(False)  # v < 65536: a _be16 result
@cython.wraparound(False)
def _int16(v: cython.uint) -> object:
    return _U16_INTS[v]


@cython.cfunc
@cython.exceptval(-1)
def _check_frame(buf: bytes, off: cython.Py_ssize_t, end: cython.Py_ssize_t) -> cython.int:
    """The compiled entry points read `buf` through a C pointer: a caller's `off`/`end` outside
    the buffer would read past it, so they are refused (the Python source would raise
    IndexError, or decode a shorter frame)."""
    if buf is None:
        raise TypeError("frame buffer is None")
    if off < 0 or end < off or end > len(buf):
        raise ValueError(f"frame [{off}:{end}] is outside the {len(buf)}-byte buffer")
    return 0


# Link type -> name of the Decoder method that decodes a frame of it.
_FAST_LINKS: dict[int, str] = {
    DLT_EN10MB: "_link_ether",
    DLT_LINUX_SLL: "_link_sll",
    DLT_LINUX_SLL2: "_link_sll2",
    DLT_NULL: "_link_null",
    DLT_LOOP: "_link_null",
    DLT_RAW: "_link_raw",
    DLT_RAW_OPENBSD: "_link_raw",
    DLT_LINKTYPE_RAW: "_link_raw",
    DLT_IPV4: "_link_ipv4",
    DLT_IPV6: "_link_ipv6",
    DLT_PPP: "_link_ppp",
    DLT_PPP_SERIAL: "_link_ppp",
    DLT_C_HDLC: "_link_chdlc",
    DLT_NFLOG: "_link_nflog",
    DLT_FDDI: "_link_fddi",
    DLT_ARCNET_LINUX: "_link_arcnet",
    DLT_IPOIB: "_link_ipoib",
    DLT_JUNIPER_ETHER: "_link_juniper",
}
# Link types impacket's ImpactDecoder can take, with the decoder class name.
_IMPACKET_LINKS: dict[int, str] = {
    DLT_IEEE802_11_RADIO: "RadioTapDecoder",
    DLT_IEEE802_11: "Dot11Decoder",
}


@cython.cclass
class _DecoderCore:
    """The decoding methods of `Decoder`, a C extension type when compiled: the internal steps
    are C functions (`cython.cfunc`) with C-typed offsets; the per-link-type entry points stay
    Python methods, since `Decoder` binds one of them as `decode`."""

    # Public: read by `Decoder`, the pipeline and tests, which are Python.
    linktype = cython.declare(object, visibility="public")
    malformed = cython.declare(object, visibility="public")
    skipped = cython.declare(object, visibility="public")
    defrag = cython.declare(object, visibility="public")
    frag_frames = cython.declare(object, visibility="public")
    _impacket = cython.declare(object, visibility="public")
    _entry = cython.declare(object, visibility="public")
    # The frame being decoded is _fbuf[_foff:_fend] (kept frames only).
    _fbuf = cython.declare(bytes)
    _foff = cython.declare(cython.Py_ssize_t)
    _fend = cython.declare(cython.Py_ssize_t)

    def _decode_keeping_frames(
        self, buf: bytes, off: cython.Py_ssize_t, end: cython.Py_ssize_t, ts: float
    ) -> Segment | None:
        self._fbuf = buf
        self._foff = off
        self._fend = end
        if self.frag_frames:
            self.frag_frames.clear()  # left by a datagram that completed without a TCP segment
        return self._entry(buf, off, end, ts)

    @cython.cfunc
    def _fragment_frames(self, ts: float) -> list[tuple[float, int, bytes]] | None:
        """The frames a fragment being added contributes: the frame being decoded, after the
        frames of any outer datagram this frame completed (a fragment inside a reassembled
        tunnel packet came in all of them). None when frames are not kept."""
        held = self.frag_frames
        if held is None:
            return None
        off = self._foff
        end = self._fend
        frames = held[:]
        held.clear()
        # A fragment is never cut by the snaplen (see `_frag4`), so the wire length is the
        # captured length.
        frames.append((ts, end - off, self._fbuf[off:end]))
        return frames

    @cython.cfunc
    def _fragment_done(self, frames: list[tuple[float, int, bytes]]) -> None:
        """A datagram completed: hand the frames of its earlier fragments to the caller; the
        last frame is the one being decoded, which the caller keeps itself."""
        held = self.frag_frames
        if held is not None:
            held[:] = frames[:-1]

    # ------------------------------------------------------------------ fast path: Ethernet/IPv4
    def _link_ether(
        self, buf: bytes, off: cython.Py_ssize_t, end: cython.Py_ssize_t, ts: float
    ) -> Segment | None:
        # The one path worth duplicating code for: untagged Ethernet, IPv4 without options or
        # fragmentation, TCP. One call per packet instead of three. Anything else (or anything
        # odd: bad lengths, TSO zero length) falls through to the general path, which decodes
        # the frame again from the start and counts what it finds.
        p: cython.p_uchar
        tlen: cython.uint
        ip_off: cython.Py_ssize_t
        ip_end: cython.Py_ssize_t
        toff: cython.Py_ssize_t
        thl: cython.Py_ssize_t
        missing: cython.Py_ssize_t
        if cython.compiled:
            _check_frame(buf, off, end)
        p = buf
        if end - off >= 54 and p[off + 12] == 8 and p[off + 13] == 0:
            ip_off = off + 14
            # version/IHL 0x45, protocol 6 (TCP), no MF and offset 0, total length >= 40
            if cython.compiled:
                ok = (
                    p[ip_off] == 0x45 and p[ip_off + 9] == 6
                    and not _be16(p, ip_off + 6) & 0x3FFF  # IP_FRAG_BITS
                )  # fmt: skip
                tlen = _be16(p, ip_off + 2)
            else:
                vhl, _tos, tlen, _id, frag, _ttl, proto, _sum, src, dst = _IP4(buf, ip_off)
                ok = vhl == 0x45 and proto == IP_PROTO_TCP and not frag & IP_FRAG_BITS
            if ok and tlen >= 40:
                if tlen <= end - ip_off:
                    ip_end = ip_off + tlen
                    missing = 0
                else:
                    ip_end = end
                    missing = tlen - (end - ip_off)
                toff = ip_off + 20
                thl = (p[toff + 12] >> 4) << 2
                if 20 <= thl <= ip_end - toff:
                    if cython.compiled:
                        return (
                            4, p[ip_off + 12 : ip_off + 16], p[ip_off + 16 : ip_off + 20],
                            _int16(_be16(p, toff)), _int16(_be16(p, toff + 2)),
                            _be32(p, toff + 4), _be32(p, toff + 8), p[toff + 13],
                            _int16(_be16(p, toff + 14)),
                            p[toff + thl : ip_end], missing,
                            p[toff + 20 : toff + thl] if thl > 20 else b"",
                        )  # fmt: skip
                    sport, dport, seq, ack, _doff, flags, win = _TCP(buf, toff)
                    return (
                        4, src, dst, sport, dport, seq, ack, flags, win,
                        buf[toff + thl : ip_end], missing,
                        buf[toff + 20 : toff + thl] if thl > 20 else b"",
                    )  # fmt: skip
        if end - off < 14:  # ETH_HDR_LEN (literals here: a C constant when compiled)
            self.malformed["link_header"] += 1
            return None
        # Two byte reads beat an unpack_from call for one 16-bit field.
        etype: cython.uint = p[off + 12] << 8 | p[off + 13]
        if etype == 0x0800:  # ETH_TYPE_IP
            return self._ip4(buf, off + 14, end, ts, 0)
        if etype == 0x86DD:  # ETH_TYPE_IP6
            return self._ip6(buf, off + 14, end, ts, 0)
        return self._ether_slow(buf, off, end, ts, 0)

    @cython.cfunc
    def _ip4(
        self, buf: bytes, off: cython.Py_ssize_t, end: cython.Py_ssize_t, ts: float,
        depth: cython.int,
    ) -> Segment | None:  # fmt: skip
        p: cython.p_uchar = buf
        cap: cython.Py_ssize_t = end - off
        vhl: cython.uint
        tlen: cython.Py_ssize_t
        ident: cython.uint
        frag: cython.uint
        proto: cython.int
        hl: cython.Py_ssize_t
        ip_end: cython.Py_ssize_t
        missing: cython.Py_ssize_t
        if cap < 20:
            self._short_ip4(buf, off, cap)
            return None
        if cython.compiled:
            vhl = p[off]
            tlen = _be16(p, off + 2)
            ident = _be16(p, off + 4)
            frag = _be16(p, off + 6)
            proto = p[off + 9]
            src = p[off + 12 : off + 16]
            dst = p[off + 16 : off + 20]
        else:
            vhl, _tos, tlen, ident, frag, _ttl, proto, _sum, src, dst = _IP4(buf, off)
        hl = (vhl & 15) << 2
        if vhl >> 4 != 4 or hl < 20:
            self.malformed["ipv4_header"] += 1
            return None
        if tlen == 0:
            tlen = cap  # TSO/GSO capture: the stack had not filled the length in (Wireshark)
        elif tlen < hl:
            self.malformed["ipv4_header"] += 1
            return None
        if hl > cap:
            self.malformed["truncated_header" if tlen > cap else "ipv4_header"] += 1
            return None
        # ip_end bounds the datagram: trailer padding after it is not payload; if the capture
        # ends first (snaplen), `missing` says how much is gone.
        if tlen <= cap:
            ip_end = off + tlen
            missing = 0
        else:
            ip_end = end
            missing = tlen - cap
        if frag & 0x3FFF:  # IP_FRAG_BITS
            return self._frag4(
                buf, off + hl, ip_end, missing, ts, depth, src, dst, ident, proto, frag
            )
        if proto != 6:  # IP_PROTO_TCP
            return self._ip_proto(4, src, dst, proto, buf, off + hl, ip_end, missing, ts, depth)
        # Plain Ethernet/IPv4/TCP never gets here (_link_ether's inlined path); one call more
        # for the other link types is cheaper than a second copy of the TCP code.
        return self._tcp(4, src, dst, buf, off + hl, ip_end, missing)

    # ------------------------------------------------------------------ TCP and counters
    @cython.cfunc
    def _tcp(
        self, version: cython.int, src: bytes, dst: bytes, buf: bytes, off: cython.Py_ssize_t,
        ip_end: cython.Py_ssize_t, missing: cython.Py_ssize_t,
    ) -> Segment | None:  # fmt: skip
        p: cython.p_uchar = buf
        avail: cython.Py_ssize_t = ip_end - off
        thl: cython.Py_ssize_t
        if avail < 20:
            self._short_tcp(avail, missing)
            return None
        thl = (p[off + 12] >> 4) << 2
        if thl < 20 or thl > avail:
            self._bad_tcp(thl, avail, missing)
            return None
        if cython.compiled:
            return (
                version, src, dst, _int16(_be16(p, off)), _int16(_be16(p, off + 2)),
                _be32(p, off + 4), _be32(p, off + 8), p[off + 13], _int16(_be16(p, off + 14)),
                p[off + thl : ip_end], missing,
                p[off + 20 : off + thl] if thl > 20 else b"",
            )  # fmt: skip
        sport, dport, seq, ack, _doff, flags, win = _TCP(buf, off)
        return (
            version, src, dst, sport, dport, seq, ack, flags, win,
            buf[off + thl : ip_end], missing,
            buf[off + 20 : off + thl] if thl > 20 else b"",
        )  # fmt: skip

    @cython.cfunc
    def _short_tcp(self, avail: cython.Py_ssize_t, missing: cython.Py_ssize_t) -> None:
        # The header runs past what we have: cut by the snaplen if the IP length says more exists
        # (and enough for a minimal header), else the datagram itself is too short.
        self.malformed[
            "truncated_header" if missing and avail + missing >= 20 else "tcp_header"
        ] += 1

    @cython.cfunc
    def _bad_tcp(
        self, thl: cython.Py_ssize_t, avail: cython.Py_ssize_t, missing: cython.Py_ssize_t
    ) -> None:
        if thl >= 20 and missing and thl <= avail + missing:
            self.malformed["truncated_header"] += 1
        else:
            self.malformed["tcp_header"] += 1

    @cython.cfunc
    def _short_ip4(self, buf: bytes, off: cython.Py_ssize_t, cap: cython.Py_ssize_t) -> None:
        # Fewer than 20 bytes: cut by the snaplen if the total length field (when we have it)
        # claims more than we captured, else just short.
        if cap >= 4 and buf[off] >> 4 == 4 and _U16(buf, off + 2)[0] > cap:
            self.malformed["truncated_header"] += 1
        else:
            self.malformed["ipv4_header"] += 1

    # ------------------------------------------------------------------ IP payload dispatch
    @cython.cfunc
    def _ip_proto(
        self,
        version: cython.int,
        src: bytes,
        dst: bytes,
        proto: cython.int,
        buf: bytes,
        off: cython.Py_ssize_t,
        ip_end: cython.Py_ssize_t,
        missing: cython.Py_ssize_t,
        ts: float,
        depth: cython.int,
    ) -> Segment | None:
        """Transport payload of an IP datagram (after extension headers / reassembly)."""
        if proto == IP_PROTO_TCP:
            return self._tcp(version, src, dst, buf, off, ip_end, missing)
        if proto in (IP_PROTO_IPIP, IP_PROTO_IPV6, IP_PROTO_GRE, IP_PROTO_UDP):
            if depth >= MAX_TUNNEL_DEPTH:
                self.malformed["tunnel_depth"] += 1
                return None
            depth += 1
            if proto == IP_PROTO_IPIP:
                return self._ip4(buf, off, ip_end, ts, depth)
            if proto == IP_PROTO_IPV6:
                return self._ip6(buf, off, ip_end, ts, depth)
            if proto == IP_PROTO_GRE:
                return self._gre(buf, off, ip_end, ts, depth)
            return self._udp(buf, off, ip_end, ts, depth)
        self.skipped["not_tcp"] += 1
        return None

    @cython.cfunc
    def _ip_any(
        self,
        buf: bytes,
        off: cython.Py_ssize_t,
        end: cython.Py_ssize_t,
        ts: float,
        depth: cython.int,
    ) -> Segment | None:
        """IP of either version, from the first nibble (raw IP, MPLS, NFLOG…)."""
        if off >= end:
            self.malformed["link_header"] += 1
            return None
        v = buf[off] >> 4
        if v == 4:
            return self._ip4(buf, off, end, ts, depth)
        if v == 6:
            return self._ip6(buf, off, end, ts, depth)
        self.malformed["ip_version"] += 1
        return None

    # ------------------------------------------------------------------ IPv4 fragments
    @cython.cfunc
    def _frag4(
        self,
        buf: bytes,
        off: cython.Py_ssize_t,
        ip_end: cython.Py_ssize_t,
        missing: cython.Py_ssize_t,
        ts: float,
        depth: cython.int,
        src: bytes,
        dst: bytes,
        ident: cython.uint,
        proto: cython.int,
        frag: cython.uint,
    ) -> Segment | None:
        key = (src, dst, ident, proto)
        if missing:
            self.defrag.discard(key, ts, "fragment_truncated")
            return None
        got = self.defrag.add(
            key, ts, (frag & IP_OFFMASK) << 3, bool(frag & IP_MF), buf[off:ip_end], None,
            self._fragment_frames(ts),
        )  # fmt: skip
        if got is None:
            return None
        data = got[0]
        if got[2]:
            self._fragment_done(got[2])
        return self._ip_proto(4, src, dst, proto, data, 0, len(data), 0, ts, depth)

    # ------------------------------------------------------------------ IPv6
    @cython.cfunc
    def _ip6(
        self, buf: bytes, off: cython.Py_ssize_t, end: cython.Py_ssize_t, ts: float,
        depth: cython.int,
    ) -> Segment | None:  # fmt: skip
        p: cython.p_uchar = buf
        cap: cython.Py_ssize_t = end - off
        plen: cython.Py_ssize_t
        nh: cython.int
        ip_end: cython.Py_ssize_t
        missing: cython.Py_ssize_t
        if cap < 40:
            if cap >= 6 and p[off] >> 4 == 6 and _be16(p, off + 4) + 40 > cap:
                self.malformed["truncated_header"] += 1
            else:
                self.malformed["ipv6_header"] += 1
            return None
        if p[off] >> 4 != 6:
            self.malformed["ipv6_header"] += 1
            return None
        if cython.compiled:
            plen = _be16(p, off + 4)
            nh = p[off + 6]
            src = p[off + 8 : off + 24]
            dst = p[off + 24 : off + 40]
        else:
            _vfl, plen, nh, _hlim, src, dst = _IP6(buf, off)
        cap -= 40
        if plen == 0:
            plen = cap  # jumbogram (RFC 2675) or GSO capture: use what was captured
        if plen <= cap:
            ip_end = off + 40 + plen
            missing = 0
        else:
            ip_end = end
            missing = plen - cap
        off += 40
        if nh == 6:  # IP_PROTO_TCP
            return self._tcp(6, src, dst, buf, off, ip_end, missing)
        return self._ip6_ext(src, dst, nh, buf, off, ip_end, missing, ts, depth, False)

    @cython.cfunc
    def _ip6_ext(
        self,
        src: bytes,
        dst: bytes,
        nh: cython.int,
        buf: bytes,
        off: cython.Py_ssize_t,
        ip_end: cython.Py_ssize_t,
        missing: cython.Py_ssize_t,
        ts: float,
        depth: cython.int,
        reassembled: cython.bint,
    ) -> Segment | None:
        """Walk IPv6 extension headers (RFC 8200 §4) to the upper-layer header."""
        malformed = self.malformed
        while True:
            if nh in _IP6_EXT_GENERIC or nh == IP_PROTO_AH:
                if ip_end - off < 2:
                    malformed["truncated_header" if missing else "ipv6_ext_header"] += 1
                    return None
                if nh == IP_PROTO_AH:
                    hlen = (buf[off + 1] + 2) << 2  # RFC 4302 §2.2: 32-bit words, minus 2
                else:
                    hlen = (buf[off + 1] + 1) << 3  # 8-octet units, not counting the first 8
                if hlen > ip_end - off:
                    malformed[
                        "truncated_header" if hlen <= ip_end - off + missing else "ipv6_ext_header"
                    ] += 1
                    return None
                nh = buf[off]
                off += hlen
                continue
            if nh == IP_PROTO_FRAGMENT:
                if ip_end - off < 8:
                    malformed["truncated_header" if missing else "ipv6_ext_header"] += 1
                    return None
                fnh = buf[off]
                offlg = _U16(buf, off + 2)[0]
                ident = _U32(buf, off + 4)[0]
                off += 8
                if not offlg & (IP6_FRAG_OFFMASK | IP6_FRAG_MF):
                    nh = fnh  # atomic fragment (RFC 6946): a whole datagram, process in place
                    continue
                if reassembled:
                    malformed["ipv6_ext_header"] += 1  # a fragment header inside a fragment
                    return None
                key = (src, dst, ident, IP_PROTO_FRAGMENT)
                if missing:
                    self.defrag.discard(key, ts, "fragment_truncated")
                    return None
                got = self.defrag.add(
                    key, ts, offlg & IP6_FRAG_OFFMASK, bool(offlg & IP6_FRAG_MF),
                    buf[off:ip_end], fnh, self._fragment_frames(ts),
                )  # fmt: skip
                if got is None:
                    return None
                buf, nh, frames = got  # type: ignore[assignment]
                if frames:
                    self._fragment_done(frames)
                off = 0
                ip_end = len(buf)
                reassembled = True
                continue
            if nh in (IP_PROTO_ESP, IP_PROTO_NONE):
                self.skipped["not_tcp"] += 1
                return None
            return self._ip_proto(6, src, dst, nh, buf, off, ip_end, missing, ts, depth)

    # ------------------------------------------------------------------ link layers
    @cython.cfunc
    def _ether_slow(
        self,
        buf: bytes,
        off: cython.Py_ssize_t,
        end: cython.Py_ssize_t,
        ts: float,
        depth: cython.int,
    ) -> Segment | None:
        """An Ethernet frame at `off` (outer link, or inside VXLAN/GRE/MPLS…), any ethertype."""
        if end - off < ETH_HDR_LEN:
            self.malformed["link_header"] += 1
            return None
        etype = buf[off + 12] << 8 | buf[off + 13]
        off += ETH_HDR_LEN
        if etype < ETH_TYPE_MIN:
            # 802.3 length + 802.2 LLC: only SNAP with an ethertype can carry IP.
            if end - off >= 8 and buf[off : off + 3] == LLC_SNAP:
                return self._ethertype(buf, off + 8, end, _U16(buf, off + 6)[0], ts, depth)
            self.skipped["not_ip"] += 1
            return None
        return self._ethertype(buf, off, end, etype, ts, depth)

    @cython.cfunc
    def _ethertype(
        self,
        buf: bytes,
        off: cython.Py_ssize_t,
        end: cython.Py_ssize_t,
        etype: cython.int,
        ts: float,
        depth: cython.int,
    ) -> Segment | None:
        """Payload `buf[off:end]` of ethertype `etype`: IP, or VLAN/PPPoE/MPLS around it."""
        while etype in _VLAN_TYPES:
            if end - off < 4:
                self.malformed["link_header"] += 1
                return None
            etype = buf[off + 2] << 8 | buf[off + 3]
            off += 4
        if etype == ETH_TYPE_IP:
            return self._ip4(buf, off, end, ts, depth)
        if etype == ETH_TYPE_IP6:
            return self._ip6(buf, off, end, ts, depth)
        if etype == ETH_TYPE_PPPOE_SESSION:
            # RFC 2516: ver/type, code, session id, length (of the PPP frame), then PPP. The
            # length is not used as a bound: some stacks get it wrong (zeek's pppoe-over-qinq
            # trace: 42 for 48 bytes present) and the IP length already excludes the padding.
            if end - off < 6:
                self.malformed["link_header"] += 1
                return None
            return self._ppp(buf, off + 6, end, ts, depth)
        if etype in _MPLS_TYPES:
            return self._mpls(buf, off, end, ts, depth)
        if etype == ETH_TYPE_FABRICPATH:
            if depth >= MAX_TUNNEL_DEPTH:
                self.malformed["tunnel_depth"] += 1
                return None
            return self._ether_slow(buf, off + 2, end, ts, depth + 1)
        self.skipped["not_ip"] += 1
        return None

    @cython.cfunc
    def _ppp(
        self,
        buf: bytes,
        off: cython.Py_ssize_t,
        end: cython.Py_ssize_t,
        ts: float,
        depth: cython.int,
    ) -> Segment | None:
        if end - off >= 2 and buf[off] == 0xFF and buf[off + 1] == 0x03:
            off += 2  # RFC 1662 address/control
        if end - off < 1:
            self.malformed["link_header"] += 1
            return None
        if buf[off] & 1:
            proto = buf[off]  # protocol field compression (RFC 1661 §6.5): one odd byte
            off += 1
        elif end - off < 2:
            self.malformed["link_header"] += 1
            return None
        else:
            proto = buf[off] << 8 | buf[off + 1]
            off += 2
        if proto == PPP_IP:
            return self._ip4(buf, off, end, ts, depth)
        if proto == PPP_IP6:
            return self._ip6(buf, off, end, ts, depth)
        if proto in (PPP_MPLS_UC, PPP_MPLS_MC):
            return self._mpls(buf, off, end, ts, depth)
        self.skipped["not_ip"] += 1
        return None

    @cython.cfunc
    def _mpls(
        self,
        buf: bytes,
        off: cython.Py_ssize_t,
        end: cython.Py_ssize_t,
        ts: float,
        depth: cython.int,
    ) -> Segment | None:
        # RFC 3032 label stack entries: label(20) TC(3) S(1) TTL(8); pop to bottom of stack.
        while True:
            if end - off < 4:
                self.malformed["mpls_header"] += 1
                return None
            bos = buf[off + 2] & 1
            off += 4
            if bos:
                break
        if off >= end:
            self.malformed["mpls_header"] += 1
            return None
        # No protocol field: guess from the first nibble (as Wireshark and tcpdump do).
        nib = buf[off] >> 4
        if nib == 4:
            return self._ip4(buf, off, end, ts, depth)
        if nib == 6:
            return self._ip6(buf, off, end, ts, depth)
        if depth >= MAX_TUNNEL_DEPTH:
            self.malformed["tunnel_depth"] += 1
            return None
        if nib == 0:
            off += 4  # pseudowire control word (RFC 4385), then the Ethernet frame
        return self._ether_slow(buf, off, end, ts, depth + 1)

    @cython.cfunc
    def _gre(
        self,
        buf: bytes,
        off: cython.Py_ssize_t,
        end: cython.Py_ssize_t,
        ts: float,
        depth: cython.int,
    ) -> Segment | None:
        if end - off < 4:
            self.malformed["gre_header"] += 1
            return None
        flags, proto = _HH(buf, off)
        ver = flags & GRE_VERSION_MASK
        hl = 4
        if ver == 0:
            if flags & GRE_ROUTING:
                self.skipped["not_tcp"] += 1  # RFC 1701 source routing: obsolete, not decoded
                return None
            if flags & GRE_CSUM:
                hl += 4  # checksum + reserved
            if flags & GRE_KEY:
                hl += 4
            if flags & GRE_SEQ:
                hl += 4
        elif ver == 1:
            hl = 8  # RFC 2637: key (payload length, call id) always present
            if flags & GRE_SEQ:
                hl += 4
            if flags & GRE_ACK:
                hl += 4
        else:
            self.malformed["gre_header"] += 1
            return None
        off += hl
        if off > end:
            self.malformed["gre_header"] += 1
            return None
        if proto == ETH_TYPE_TEB:
            return self._ether_slow(buf, off, end, ts, depth)
        if proto == ETH_TYPE_ERSPAN2:
            if flags & GRE_SEQ:
                off += ERSPAN2_HDR_LEN  # type II; type I has no sequence number and no header
            return self._ether_slow(buf, off, end, ts, depth)
        if proto == ETH_TYPE_ERSPAN3:
            if end - off < ERSPAN3_HDR_LEN:
                self.malformed["gre_header"] += 1
                return None
            # Third word: SGT(16) P(1) FT(5) HW ID(6) D(1) Gra(2) O(1).
            w = _U32(buf, off + 8)[0]
            off += ERSPAN3_HDR_LEN + (ERSPAN3_SUBHDR_LEN if w & 1 else 0)
            if (w >> 10) & 0x1F:  # frame type 0 = Ethernet; others not decoded
                self.skipped["not_ip"] += 1
                return None
            return self._ether_slow(buf, off, end, ts, depth)
        if proto == ETH_TYPE_PPP:
            return self._ppp(buf, off, end, ts, depth)
        return self._ethertype(buf, off, end, proto, ts, depth)

    @cython.cfunc
    def _udp(
        self,
        buf: bytes,
        off: cython.Py_ssize_t,
        end: cython.Py_ssize_t,
        ts: float,
        depth: cython.int,
    ) -> Segment | None:
        """UDP: only tunnels (VXLAN, Geneve, Teredo) interest us."""
        if end - off < 8:
            self.skipped["not_tcp"] += 1
            return None
        sport, dport = _HH(buf, off)
        ulen = _U16(buf, off + 4)[0]
        if ulen >= 8 and off + ulen < end:
            end = off + ulen
        off += 8
        if dport == UDP_PORT_VXLAN:
            if end - off >= 8 and buf[off] & VXLAN_FLAG_I:
                return self._ether_slow(buf, off + 8, end, ts, depth)
        elif dport == UDP_PORT_GENEVE:
            # RFC 8926: ver(2) opt len(6, 4-byte units), flags, protocol type, VNI, reserved.
            if end - off >= 8 and buf[off] >> 6 == 0:
                ptype = _U16(buf, off + 2)[0]
                off += 8 + ((buf[off] & 0x3F) << 2)
                if ptype == ETH_TYPE_TEB:
                    return self._ether_slow(buf, off, end, ts, depth)
                return self._ethertype(buf, off, end, ptype, ts, depth)
        elif sport == UDP_PORT_TEREDO or dport == UDP_PORT_TEREDO:
            # RFC 4380 §5.1.1: optional authentication (0x0001) then origin indication (0x0000)
            # headers before the IPv6 packet.
            if end - off >= 4 and buf[off] == 0 and buf[off + 1] == 1:
                off += 13 + buf[off + 2] + buf[off + 3]  # 4 + id + auth + nonce(8) + conf(1)
            if end - off >= 8 and buf[off] == 0 and buf[off + 1] == 0:
                off += 8
            if end - off >= 40 and buf[off] >> 4 == 6:
                return self._ip6(buf, off, end, ts, depth)
        self.skipped["not_tcp"] += 1
        return None

    def _link_sll(
        self, buf: bytes, off: cython.Py_ssize_t, end: cython.Py_ssize_t, ts: float
    ) -> Segment | None:
        if cython.compiled:
            _check_frame(buf, off, end)
        # pkttype(2) hatype(2) halen(2) addr(8) protocol(2)
        if end - off < 16:
            self.malformed["link_header"] += 1
            return None
        etype = buf[off + 14] << 8 | buf[off + 15]
        if etype == ETH_TYPE_IP:
            return self._ip4(buf, off + 16, end, ts, 0)
        return self._ethertype(buf, off + 16, end, etype, ts, 0)

    def _link_sll2(
        self, buf: bytes, off: cython.Py_ssize_t, end: cython.Py_ssize_t, ts: float
    ) -> Segment | None:
        if cython.compiled:
            _check_frame(buf, off, end)
        # protocol(2) reserved(2) ifindex(4) hatype(2) pkttype(1) halen(1) addr(8)
        if end - off < 20:
            self.malformed["link_header"] += 1
            return None
        etype = buf[off] << 8 | buf[off + 1]
        if etype == ETH_TYPE_IP:
            return self._ip4(buf, off + 20, end, ts, 0)
        return self._ethertype(buf, off + 20, end, etype, ts, 0)

    def _link_null(
        self, buf: bytes, off: cython.Py_ssize_t, end: cython.Py_ssize_t, ts: float
    ) -> Segment | None:
        if cython.compiled:
            _check_frame(buf, off, end)
        if end - off < 4:
            self.malformed["link_header"] += 1
            return None
        # The family is < 256, so it sits in the first byte (little-endian host) or the last
        # (big-endian host, or DLT_LOOP's network order): no need to guess the writer's order.
        af = buf[off] or buf[off + 3]
        if af == AF_INET:
            return self._ip4(buf, off + 4, end, ts, 0)
        if af in AF_INET6_SET:
            return self._ip6(buf, off + 4, end, ts, 0)
        self.skipped["not_ip"] += 1
        return None

    def _link_raw(
        self, buf: bytes, off: cython.Py_ssize_t, end: cython.Py_ssize_t, ts: float
    ) -> Segment | None:
        if cython.compiled:
            _check_frame(buf, off, end)
        return self._ip_any(buf, off, end, ts, 0)

    def _link_ipv4(
        self, buf: bytes, off: cython.Py_ssize_t, end: cython.Py_ssize_t, ts: float
    ) -> Segment | None:
        if cython.compiled:
            _check_frame(buf, off, end)
        return self._ip4(buf, off, end, ts, 0)

    def _link_ipv6(
        self, buf: bytes, off: cython.Py_ssize_t, end: cython.Py_ssize_t, ts: float
    ) -> Segment | None:
        if cython.compiled:
            _check_frame(buf, off, end)
        return self._ip6(buf, off, end, ts, 0)

    def _link_ppp(
        self, buf: bytes, off: cython.Py_ssize_t, end: cython.Py_ssize_t, ts: float
    ) -> Segment | None:
        if cython.compiled:
            _check_frame(buf, off, end)
        return self._ppp(buf, off, end, ts, 0)

    def _link_chdlc(
        self, buf: bytes, off: cython.Py_ssize_t, end: cython.Py_ssize_t, ts: float
    ) -> Segment | None:
        if cython.compiled:
            _check_frame(buf, off, end)
        # address(1) control(1) protocol(2, an ethertype)
        if end - off < 4:
            self.malformed["link_header"] += 1
            return None
        return self._ethertype(buf, off + 4, end, buf[off + 2] << 8 | buf[off + 3], ts, 0)

    def _link_nflog(
        self, buf: bytes, off: cython.Py_ssize_t, end: cython.Py_ssize_t, ts: float
    ) -> Segment | None:
        if cython.compiled:
            _check_frame(buf, off, end)
        # family(1) version(1) resource id(2), then TLVs: length(2) type(2) value, padded to 4;
        # the length counts the 4-byte TLV header. The packet is the NFULA_PAYLOAD TLV.
        if end - off < 4:
            self.malformed["link_header"] += 1
            return None
        p = off + 4
        while end - p >= 4:
            tlen, ttype = _NFLOG_TLV(buf, p)
            if tlen < 4:
                self.malformed["link_header"] += 1
                return None
            if ttype & NFLOG_TYPE_MASK == NFULA_PAYLOAD:
                vend = p + tlen
                return self._ip_any(buf, p + 4, vend if vend < end else end, ts, 0)
            p += (tlen + 3) & ~3
        self.skipped["not_ip"] += 1
        return None

    def _link_fddi(
        self, buf: bytes, off: cython.Py_ssize_t, end: cython.Py_ssize_t, ts: float
    ) -> Segment | None:
        if cython.compiled:
            _check_frame(buf, off, end)
        # frame control(1) dst(6) src(6), then 802.2 LLC; IP rides in SNAP (RFC 1390).
        if end - off < 21:
            self.malformed["link_header"] += 1
            return None
        if buf[off + 13 : off + 16] != LLC_SNAP:
            self.skipped["not_ip"] += 1
            return None
        return self._ethertype(buf, off + 21, end, buf[off + 19] << 8 | buf[off + 20], ts, 0)

    def _link_arcnet(
        self, buf: bytes, off: cython.Py_ssize_t, end: cython.Py_ssize_t, ts: float
    ) -> Segment | None:
        if cython.compiled:
            _check_frame(buf, off, end)
        # Linux pseudo-header: src(1) dst(1) offset(2) protocol id(1); RFC 1201 protocols add
        # split flag(1) sequence(2), and exception packets 4 filler bytes more.
        if end - off < 5:
            self.malformed["link_header"] += 1
            return None
        proto = buf[off + 4]
        if proto == ARC_P_IP_RFC1051:
            return self._ip4(buf, off + 5, end, ts, 0)
        if proto in (ARC_P_IP, ARC_P_IPV6):
            if end - off < 8:
                self.malformed["link_header"] += 1
                return None
            p = off + 8
            if buf[off + 5] == ARC_SPLIT_EXCEPTION:
                p += 4
            if proto == ARC_P_IP:
                return self._ip4(buf, p, end, ts, 0)
            return self._ip6(buf, p, end, ts, 0)
        self.skipped["not_ip"] += 1
        return None

    def _link_ipoib(
        self, buf: bytes, off: cython.Py_ssize_t, end: cython.Py_ssize_t, ts: float
    ) -> Segment | None:
        if cython.compiled:
            _check_frame(buf, off, end)
        # destination hw address(20) source hw address(20) protocol(2) reserved(2)
        if end - off < 44:
            self.malformed["link_header"] += 1
            return None
        return self._ethertype(buf, off + 44, end, buf[off + 40] << 8 | buf[off + 41], ts, 0)

    def _link_juniper(
        self, buf: bytes, off: cython.Py_ssize_t, end: cython.Py_ssize_t, ts: float
    ) -> Segment | None:
        if cython.compiled:
            _check_frame(buf, off, end)
        # "MGC" magic(3) flags(1) [ext length(2) ext TLVs] then Ethernet, or with NO_L2 a
        # 4-byte cookie and IP (tcpdump print-juniper.c, juniper_parse_header).
        if end - off < 4 or buf[off : off + 3] != JUNIPER_MAGIC:
            self.malformed["link_header"] += 1
            return None
        flags = buf[off + 3]
        p = off + 4
        if flags & JUNIPER_FLAG_EXT:
            if end - p < 2:
                self.malformed["link_header"] += 1
                return None
            p += 2 + _U16(buf, p)[0]
        if flags & JUNIPER_FLAG_NO_L2:
            return self._ip_any(buf, p + 4, end, ts, 0)
        return self._ether_slow(buf, p, end, ts, 0)

    # ------------------------------------------------------------------ impacket fallback
    def _link_impacket(
        self, buf: bytes, off: cython.Py_ssize_t, end: cython.Py_ssize_t, ts: float
    ) -> Segment | None:
        """Link types we have no struct path for: impacket finds the IP layer, we do the rest."""
        if cython.compiled:
            _check_frame(buf, off, end)
        try:
            from impacket import IP6, ImpactPacket

            layer = self._impacket.decode(buf[off:end])
            ip_bytes = None
            while layer is not None:
                if isinstance(layer, (ImpactPacket.IP, IP6.IP6)):
                    parent = layer.parent()
                    # The parent's raw body is the IP datagram as captured (get_packet() on the
                    # IP layer would re-serialize it and recompute fields).
                    ip_bytes = parent.body_string if parent is not None else layer.get_packet()
                    break
                layer = layer.child()
        except Exception:  # impacket raises assorted errors on short or odd frames
            self.malformed["link_header"] += 1
            return None
        if ip_bytes is None:
            self.skipped["not_ip"] += 1
            return None
        return self._ip_any(bytes(ip_bytes), 0, len(ip_bytes), ts, 0)


class Decoder(_DecoderCore):
    """Decodes frames of one link type to TCP segments; counts everything else.

    `malformed`: reason -> count of frames dropped as bad or cut (``link_header``,
    ``ipv4_header``, ``ipv6_header``, ``ipv6_ext_header``, ``ip_version``, ``tcp_header``,
    ``truncated_header``, ``gre_header``, ``mpls_header``, ``tunnel_depth``, ``fragment_*``).
    `skipped`: reason -> count of frames that are fine but not for us (``not_ip``, ``not_tcp``,
    ``fragment_pending``, ``fragment_duplicate``, ``fragment_discarded``).
    """

    def __init__(
        self,
        linktype: int,
        *,
        frag_max_pending: int = 8192,
        frag_timeout: float = 30.0,
        frag_frames: list[tuple[float, int, bytes]] | None = None,
    ) -> None:
        self.linktype = linktype
        self.malformed: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.defrag = Defragmenter(frag_max_pending, frag_timeout, self.malformed, self.skipped)
        # keep_packets (the pcap sink): when a frame completes a fragmented datagram, the frames
        # of its other fragments, `(ts, wire_len, frame)` in capture order, are put in this
        # list, which the caller drains into the stream's packets (it owns the list). A frame
        # that completes nothing leaves it empty. None: fragment frames are not held at all.
        self.frag_frames = frag_frames
        self._impacket: Any = None
        name = _FAST_LINKS.get(linktype)
        if name is None:
            cls = _IMPACKET_LINKS.get(linktype)
            if cls is None:
                raise UnsupportedLinkType(
                    f"link type {linktype} (DLT/LINKTYPE number) is not supported: the fast "
                    f"decoder handles {sorted(_FAST_LINKS)}, the impacket fallback handles "
                    f"{sorted(_IMPACKET_LINKS)}"
                )
            from impacket import ImpactDecoder

            self._impacket = getattr(ImpactDecoder, cls)()
            if linktype == DLT_IEEE802_11:
                # DLT 105 frames carry no FCS; impacket's Dot11Decoder assumes one by default.
                self._impacket.FCS_at_end(False)
            name = "_link_impacket"
        # Rebind per instance: callers pay no link-type dispatch per packet.
        self.decode = getattr(self, name)  # type: ignore[method-assign]
        if frag_frames is not None:
            # Only when frames are kept does a packet pay for remembering where its frame is.
            self._entry = self.decode
            self.decode = self._decode_keeping_frames  # type: ignore[method-assign]

    def decode(self, buf: bytes, off: int, end: int, ts: float) -> Segment | None:
        """Decode the frame `buf[off:end]` captured at packet time `ts` (seconds).

        Returns ``(version, src, dst, sport, dport, seq, ack, flags, win, payload, missing,
        opts)`` for a TCP segment, else None with the frame counted in `malformed` or `skipped`.
        (Replaced per instance by the link type's entry point; this body documents it.)
        """
        return getattr(self, _FAST_LINKS.get(self.linktype, "_link_impacket"))(buf, off, end, ts)
