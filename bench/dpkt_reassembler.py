#!/usr/bin/env python3
"""A small reference reassembler written with dpkt: a peer for bench/offline.py, like tcpflow.

    python bench/dpkt_reassembler.py CAPTURE [OUTDIR]

Reads a classic pcap with dpkt, decodes Ethernet -> IPv4/IPv6 -> TCP, and rebuilds each
direction's in-order payload: the sequence origin is the SYN (else the first segment seen),
segments ahead of the next expected byte wait in a dict (first copy wins), bytes behind it are
dropped. A direction ends on its FIN, on a RST from either side, or at the end of the capture;
with OUTDIR its bytes go to one file per direction (tcpflow's naming), otherwise they are only
counted. Prints "CONNECTIONS DIRECTIONS BYTES". No timeouts, no limits, no IP fragments: the
loop a Python programmer writes first, there for the ratio (streamtap is not checked against
it; the generator's truth does that).
"""

from __future__ import annotations

import os
import socket
import sys

import dpkt

MASK32 = 0xFFFFFFFF


class Direction:
    __slots__ = ("next", "data", "pending")

    def __init__(self) -> None:
        self.next: int | None = None
        self.data = bytearray()
        self.pending: dict[int, bytes] = {}

    def add(self, seq: int, syn: bool, payload: bytes) -> None:
        if syn:
            self.next = (seq + 1) & MASK32
            return
        if self.next is None:
            self.next = seq
        if not payload:
            return
        rel = (seq - self.next) & MASK32
        if rel >= 1 << 31:  # starts behind the next byte: keep only what is new
            cut = (self.next - seq) & MASK32
            if cut >= len(payload):
                return
            payload, seq, rel = payload[cut:], self.next, 0
        if rel:
            self.pending.setdefault(seq, payload)
            return
        self.data += payload
        self.next = (seq + len(payload)) & MASK32
        while self.pending:
            more = self.pending.pop(self.next, None)
            if more is None:
                break
            self.data += more
            self.next = (self.next + len(more)) & MASK32


def endpoint(ip: bytes, port: int) -> str:
    fam = socket.AF_INET6 if len(ip) == 16 else socket.AF_INET
    return f"{socket.inet_ntop(fam, ip)}.{port:05d}"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    path, outdir = argv[0], (argv[1] if len(argv) > 1 else None)
    flows: dict[tuple, Direction] = {}
    conns: set[tuple] = set()
    directions = total = 0

    def finish(key: tuple, d: Direction) -> None:
        nonlocal directions, total
        directions += 1
        total += len(d.data)
        if outdir and d.data:
            fn = f"{endpoint(key[0], key[1])}-{endpoint(key[2], key[3])}"
            with open(os.path.join(outdir, fn), "ab") as f:
                f.write(d.data)

    th_syn, th_fin, th_rst = dpkt.tcp.TH_SYN, dpkt.tcp.TH_FIN, dpkt.tcp.TH_RST
    with open(path, "rb") as f:
        for _ts, buf in dpkt.pcap.Reader(f):
            ip = dpkt.ethernet.Ethernet(buf).data
            if not isinstance(ip, (dpkt.ip.IP, dpkt.ip6.IP6)):
                continue
            tcp = ip.data
            if not isinstance(tcp, dpkt.tcp.TCP):
                continue
            key = (ip.src, tcp.sport, ip.dst, tcp.dport)
            d = flows.get(key)
            if d is None:
                d = flows[key] = Direction()
                conns.add(key if key[:2] <= key[2:] else key[2:] + key[:2])
            flags = tcp.flags
            d.add(tcp.seq, bool(flags & th_syn), bytes(tcp.data))
            if flags & (th_fin | th_rst):
                finish(key, flows.pop(key))
                back = key[2:] + key[:2]
                if flags & th_rst and back in flows:
                    finish(back, flows.pop(back))
    for key, d in flows.items():
        finish(key, d)
    print(len(conns), directions, total)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
