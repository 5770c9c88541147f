"""A small stdlib pcapng reader: the fallback for files libpcap refuses.

libpcap (1.10) requires every interface (IDB) of a pcapng file to have the first interface's link
type and snapshot length; on the first one that differs it fails with "an interface has a type
... different from the type of the first interface". tshark reads such files, and so must we:
`reader.Source` catches that libpcap error and, when the file is a regular pcapng file, hands
over to `PcapngReader`, which re-reads it from the start, skips the packets libpcap already
delivered and goes on to the end. It is only a fallback: the common case stays on libpcap's C
loop.

`PcapngReader.batches(n)` yields `(linktype, data, meta)` batches, the shape of `reader.Sources`:
`data` is the packets' bytes concatenated, `meta` one native `=IIII` record `(sec, usec, offset,
caplen)` per packet, offsets relative to the batch. A new batch starts whenever the link type
changes, so every batch carries its own link type (the API layer feeds each batch with the
batch's link type). Link types are reported as DLT values, as libpcap does (LINKTYPE_RAW 101
reads back as DLT_RAW 12).

Blocks: SHB (either byte order, several sections; each resets the interfaces), IDB (if_tsresol,
power of 10 or of 2, default 10^-6; if_tsoffset), EPB, SPB (the section's first interface, no
timestamp: 0.0, like libpcap), the obsolete PB; other blocks are skipped. Timestamps come out as
(sec, usec), the fraction truncated to microseconds as libpcap does, seconds wrapped to the
meta record's 32 bits; caplen is cut to a non-zero interface snaplen, as libpcap does. With a
BPF expression, it is compiled once per link type (`pcapy.compile`, netmask 0xffffffff like
libpcap's PCAP_NETMASK_UNKNOWN) when an interface of that type first appears; a compile error
raises `FilterError` (after the good batch).

Damage (truncated block, bad lengths, packet for an unknown interface, ...) ends the read: every
good packet before it is yielded, then a `CaptureError` names the file and the byte offset of the
bad block, "(packet N)" counting packet blocks, as the reader's own walker does.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from typing import Any

import pcapy

from streamtap.engine.pcapfmt import (
    MAX_SNAPLEN,
    META,
    PCAPNG_BYTE_ORDER_MAGIC,
    PCAPNG_BYTE_ORDER_SWAPPED,
    PCAPNG_EPB,
    PCAPNG_IDB,
    PCAPNG_MIN_BLOCK,
    PCAPNG_PB,
    PCAPNG_SHB,
    PCAPNG_SPB,
    CaptureError,
    FilterError,
    linktype_to_dlt,
)

__all__ = ["PcapngReader"]

OPT_ENDOFOPT = 0
OPT_IF_TSRESOL = 9
OPT_IF_TSOFFSET = 14
USEC = 1_000_000
BPF_NETMASK = 0xFFFFFFFF  # PCAP_NETMASK_UNKNOWN


class _Interface:
    __slots__ = ("linktype", "snaplen", "tsresol", "tsoffset")

    def __init__(self, linktype: int, snaplen: int, tsresol: int, tsoffset: int) -> None:
        self.linktype = linktype
        self.snaplen = snaplen
        self.tsresol = tsresol
        self.tsoffset = tsoffset


class _Stop(Exception):
    """Internal: the block at `offset` ends the read (damage or filter error)."""

    def __init__(self, problem: str, offset: int, number: int,
                 filter_error: bool = False) -> None:
        super().__init__(problem)
        self.problem = problem
        self.offset = offset
        self.number = number
        self.filter_error = filter_error


def _idb(mm: Any, pos: int, length: int, order: str) -> _Interface:
    """Parse an IDB (length already checked >= 20). Bad options end option parsing quietly
    (tshark is as lenient): the interface keeps what was read."""
    linktype, _reserved, snaplen = struct.unpack_from(order + "HHI", mm, pos + 8)
    tsresol, tsoffset = USEC, 0
    opt, end = pos + 16, pos + length - 4
    while opt + 4 <= end:
        code, olen = struct.unpack_from(order + "HH", mm, opt)
        opt += 4
        if code == OPT_ENDOFOPT or opt + olen > end:
            break
        if code == OPT_IF_TSRESOL and olen >= 1:
            v = mm[opt]
            tsresol = 1 << (v & 0x7F) if v & 0x80 else 10 ** v
        elif code == OPT_IF_TSOFFSET and olen == 8:
            tsoffset = struct.unpack_from(order + "q", mm, opt)[0]
        opt += olen + (-olen % 4)
    return _Interface(linktype_to_dlt(linktype), snaplen, tsresol, tsoffset)


class PcapngReader:
    """One regular pcapng file read in Python (mmap). `bytes_read` (end of the last block whose
    packets were yielded) and `packets_read` (packets yielded) drive a progress bar; `linktype`
    is the first interface's link type (DLT), None before any IDB was read."""

    def __init__(self, path: str, bpf: str | None = None, name: str | None = None) -> None:
        self.path = path
        self.name = path if name is None else name
        self.bpf = bpf
        self.bytes_read = 0
        self.packets_read = 0
        self.linktype: int | None = None
        self._programs: dict[int, Any] = {}

    def _program(self, dlt: int, offset: int, number: int) -> Any:
        prog = self._programs.get(dlt)
        if prog is None:
            try:
                prog = pcapy.compile(dlt, MAX_SNAPLEN, self.bpf, 1, BPF_NETMASK)
            except pcapy.PcapError as e:
                raise _Stop(f"{e} (link type {dlt})", offset, number, True) from None
            self._programs[dlt] = prog
        return prog

    def batches(self, n: int = 4096, skip: int = 0) -> Iterator[tuple[int, bytes, bytes]]:
        """`(linktype, data, meta)` batches of at most `n` packets, after skipping the first
        `skip` packets that pass the filter (those another reader already delivered)."""
        try:
            with open(self.path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size == 0:
                    raise CaptureError(f"{self.name}: empty file, not a pcap or pcapng file "
                                       f"at byte 0", self.path, 0)
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise CaptureError(f"cannot open {self.path}: {e.strerror}", self.path,
                               None) from None
        try:
            yield from self._batches(mm, size, n, skip)
        finally:
            mm.close()

    def _batches(self, mm: Any, size: int, n: int,
                 skip: int) -> Iterator[tuple[int, bytes, bytes]]:
        unpack_from = struct.unpack_from
        pack = META.pack
        chunks: list[bytes] = []
        metas: list[bytes] = []
        offset = 0
        current: int | None = None
        end_of_batch = 0  # file offset just past the last block of the pending batch
        order = "<"
        ifaces: list[_Interface] = []
        programs: dict[int, Any] = {}  # per interface index, this section
        filtering = self.bpf is not None
        number = 0  # packet blocks seen
        pos = 0
        stop: _Stop | None = None
        try:
            while pos < size:
                if size - pos < 8:
                    raise _Stop("truncated block header", pos, number + 1)
                btype = unpack_from("<I", mm, pos)[0]
                if btype == PCAPNG_SHB:
                    if size - pos < 12:
                        raise _Stop("truncated section header block", pos, number + 1)
                    bom = unpack_from("<I", mm, pos + 8)[0]
                    if bom == PCAPNG_BYTE_ORDER_MAGIC:
                        order = "<"
                    elif bom == PCAPNG_BYTE_ORDER_SWAPPED:
                        order = ">"
                    else:
                        raise _Stop(f"bad byte-order magic 0x{bom:08x}", pos, number + 1)
                    ifaces, programs = [], {}
                elif pos == 0:
                    raise _Stop("not a pcapng file (no section header block)", 0, 1)
                else:
                    btype = unpack_from(order + "I", mm, pos)[0]
                length = unpack_from(order + "I", mm, pos + 4)[0]
                if length < PCAPNG_MIN_BLOCK or length % 4:
                    raise _Stop(f"bad block length {length}", pos, number + 1)
                if pos + length > size:
                    raise _Stop("truncated block", pos, number + 1)
                if unpack_from(order + "I", mm, pos + length - 4)[0] != length:
                    raise _Stop("block length in header and trailer differ", pos, number + 1)

                if btype in (PCAPNG_EPB, PCAPNG_PB):
                    number += 1
                    if length < 32:
                        raise _Stop("truncated packet block", pos, number)
                    if btype == PCAPNG_EPB:
                        iface_id, hi, lo, caplen = unpack_from(order + "IIII", mm, pos + 8)
                    else:
                        iface_id, _drops, hi, lo, caplen = unpack_from(order + "HHIII", mm,
                                                                       pos + 8)
                    if iface_id >= len(ifaces):
                        raise _Stop(f"packet for unknown interface {iface_id}", pos, number)
                    if caplen > length - 32:
                        raise _Stop(f"captured length {caplen} exceeds its block", pos, number)
                    iface = ifaces[iface_id]
                    start = pos + 28
                    t = hi << 32 | lo
                    sec, frac = divmod(t, iface.tsresol)
                    sec += iface.tsoffset
                    usec = frac * USEC // iface.tsresol
                elif btype == PCAPNG_SPB:
                    number += 1
                    if length < 16:
                        raise _Stop("truncated simple packet block", pos, number)
                    if not ifaces:
                        raise _Stop("packet for unknown interface 0", pos, number)
                    iface_id = 0
                    iface = ifaces[0]
                    caplen = min(unpack_from(order + "I", mm, pos + 8)[0], length - 16)
                    start = pos + 12
                    sec = usec = 0
                elif btype == PCAPNG_IDB:
                    if length < 20:
                        raise _Stop("truncated interface description block", pos, number + 1)
                    iface = _idb(mm, pos, length, order)
                    if self.linktype is None:
                        self.linktype = iface.linktype
                    if filtering:
                        programs[len(ifaces)] = self._program(iface.linktype, pos, number + 1)
                    ifaces.append(iface)
                    pos += length
                    continue
                else:  # SHB (already handled) or a block we do not use
                    pos += length
                    continue

                pos += length
                if 0 < iface.snaplen < caplen:
                    caplen = iface.snaplen
                data = mm[start:start + caplen]
                if filtering and not programs[iface_id].filter(data):
                    continue
                if skip:
                    skip -= 1
                    continue
                dlt = iface.linktype
                if dlt != current or len(metas) == n:
                    if metas:
                        self._account(end_of_batch, len(metas))
                        yield current, b"".join(chunks), b"".join(metas)  # type: ignore[misc]
                        chunks, metas, offset = [], [], 0
                    current = dlt
                metas.append(pack(sec & 0xFFFFFFFF, usec, offset, caplen))
                chunks.append(data)
                offset += caplen
                end_of_batch = pos
        except _Stop as e:
            stop = e
        if metas:
            self._account(end_of_batch, len(metas))
            yield current, b"".join(chunks), b"".join(metas)  # type: ignore[misc]
        if stop is not None:
            if stop.filter_error:
                raise FilterError(stop.problem)
            raise CaptureError(f"{self.name}: {stop.problem} at byte {stop.offset} "
                               f"(packet {stop.number})", self.path, stop.offset)
        self.bytes_read = size

    def _account(self, end: int, count: int) -> None:
        self.bytes_read = end
        self.packets_read += count
