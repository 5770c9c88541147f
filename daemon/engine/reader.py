"""Offline capture sources: pcap (µs/ns) and pcapng files, or stdin, through pcapy/libpcap.

`read(paths)` yields `(linktype, data, meta)` batches, the shape of pcapy's `next_batch`: `data`
is every packet's bytes concatenated, `meta` packs one native `=IIII` record per packet,
`(sec, usec, offset, caplen)`, offsets relative to `data`. There is no wire length. Timestamps
are microseconds even for nanosecond files: libpcap opens them at µs precision (truncating), and
pcapy has no precision option.

Damage is reported as a `CaptureError` naming the file and the byte offset of the first bad
record/block, raised only after every good packet before it was yielded. libpcap's `next_batch`
drops the good packets of the batch in which it meets the damage, so a regular file is reopened
on that (rare) path and re-read packet by packet up to the damage; the offset comes from a small
stdlib walker of the file's records/blocks (`_walk_pcap`, `_walk_pcapng`), also used when
libpcap stops without error before the end of a regular file. Stdin and other non-seekable
inputs cannot be re-read: there, the good packets of the damaged batch (fewer than `n`) are lost
and the error says so.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import stat
import struct
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

import pcapy

from streamtap.engine.pcapfmt import (
    MAX_SNAPLEN,
    META,
    META_LEN,
    PCAP_FILE_HEADER_LEN,
    PCAP_MAGICS,
    PCAP_RECORD_HEADER_LEN,
    PCAPNG_BYTE_ORDER_MAGIC,
    PCAPNG_BYTE_ORDER_SWAPPED,
    PCAPNG_EPB,
    PCAPNG_IDB,
    PCAPNG_MIN_BLOCK,
    PCAPNG_PACKET_BLOCKS,
    PCAPNG_SHB,
    CaptureError,
    FilterError,
)
from streamtap.engine.pcapng import PcapngReader

__all__ = [
    "COMPLEMENT_FILTER", "CaptureError", "FilterError", "ShardSource", "Source", "open_source",
    "read", "read_complement", "shard_filter", "shard_of", "with_filter",
]

STDIN = "-"
STDIN_NAME = "<stdin>"
WALK_CHUNK = 1 << 20
MIXED_LINKTYPES = "differs from the first"  # _walk_pcapng's problem: see Source._fallback


def _display(path: str) -> str:
    return STDIN_NAME if path == STDIN else path


# --------------------------------------------------------------------------- damage walkers
# Used only on error paths and for the end-of-file check (_walk_pcap also with a BPF filter).


def _walk_pcap(fh: BinaryIO, size: int) -> tuple[int, int, str] | None:
    """Walk classic pcap records. Returns (offset, packet_number, problem) of the first bad
    record, or None if the file is well formed to its last byte."""
    fh.seek(0)
    head = fh.read(PCAP_FILE_HEADER_LEN)
    if len(head) < PCAP_FILE_HEADER_LEN:
        return 0, 0, "truncated file header"
    order = "<" if struct.unpack_from("<I", head)[0] in PCAP_MAGICS else ">"
    snaplen = struct.unpack_from(order + "I", head, 16)[0]
    max_caplen = max(snaplen, MAX_SNAPLEN)
    unpack_caplen = struct.Struct(order + "8xI4x").unpack_from
    pos = PCAP_FILE_HEADER_LEN
    number = 0
    buf = b""
    base = pos  # file offset of buf[0]
    while True:
        rel = pos - base
        if rel + PCAP_RECORD_HEADER_LEN > len(buf):
            fh.seek(pos)
            buf = fh.read(WALK_CHUNK)
            base, rel = pos, 0
            if not buf:
                return None  # clean end
        number += 1
        if len(buf) - rel < PCAP_RECORD_HEADER_LEN:
            return pos, number, "truncated record header"
        caplen = unpack_caplen(buf, rel)[0]
        if caplen > max_caplen:
            return pos, number, f"invalid captured length {caplen}"
        end = pos + PCAP_RECORD_HEADER_LEN + caplen
        if end > size:
            return pos, number, "truncated record"
        pos = end


def _walk_pcapng(fh: BinaryIO, size: int) -> tuple[int, int, str] | None:
    """Walk pcapng blocks; returns (offset, packet_number, problem) of the first bad block
    (packet_number = packet blocks before it + 1), or None if every block is well formed."""
    pos = 0
    n = 0
    order = "<"
    linktype: int | None = None
    interfaces = 0
    while pos < size:
        fh.seek(pos)
        head = fh.read(12)
        if len(head) < 8:
            return pos, n + 1, "truncated block header"
        btype = struct.unpack_from("<I", head)[0]
        if btype == PCAPNG_SHB:
            if len(head) < 12:
                return pos, n + 1, "truncated section header block"
            bom = struct.unpack_from("<I", head, 8)[0]
            if bom == PCAPNG_BYTE_ORDER_MAGIC:
                order = "<"
            elif bom == PCAPNG_BYTE_ORDER_SWAPPED:
                order = ">"
            else:
                return pos, n + 1, f"bad byte-order magic 0x{bom:08x}"
            interfaces = 0
        else:
            btype = struct.unpack_from(order + "I", head)[0]
        length = struct.unpack_from(order + "I", head, 4)[0]
        if length < PCAPNG_MIN_BLOCK or length % 4:
            return pos, n + 1, f"bad block length {length}"
        if pos + length > size:
            return pos, n + 1, "truncated block"
        fh.seek(pos + length - 4)
        if struct.unpack(order + "I", fh.read(4))[0] != length:
            return pos, n + 1, "block length in header and trailer differ"
        if btype == PCAPNG_IDB:
            fh.seek(pos + 8)
            lt = struct.unpack(order + "H", fh.read(2))[0]
            if linktype is not None and lt != linktype:
                return pos, n + 1, f"interface link type {lt} {MIXED_LINKTYPES} ({linktype})"
            linktype = lt
            interfaces += 1
        elif btype in PCAPNG_PACKET_BLOCKS:
            n += 1
            if btype == PCAPNG_EPB:
                fh.seek(pos + 8)
                body = fh.read(20)
                if length < 32 or len(body) < 20:
                    return pos, n, "truncated enhanced packet block"
                iface, _hi, _lo, caplen = struct.unpack_from(order + "IIII", body)
                if iface >= interfaces:
                    return pos, n, f"packet for unknown interface {iface}"
                if caplen > length - 32:
                    return pos, n, f"captured length {caplen} exceeds its block"
        pos += length
    return None


def _pcapng_tail_ok(fh: BinaryIO, size: int) -> bool:
    """O(1) end-of-file check for pcapng: the last block's trailer length matches its header."""
    if size < PCAPNG_MIN_BLOCK:
        return False
    fh.seek(size - 4)
    tail = fh.read(4)
    for order in "<>":
        length = struct.unpack(order + "I", tail)[0]
        if PCAPNG_MIN_BLOCK <= length <= size and length % 4 == 0:
            fh.seek(size - length + 4)
            if struct.unpack(order + "I", fh.read(4))[0] == length:
                return True
    return False


# --------------------------------------------------------------------------- sources


class Source:
    """One offline capture (a path, or "-" for stdin), opened by `open_source`."""

    def __init__(self, path: str, reader: Any, magic: int | None, size: int | None,
                 bpf: str | None) -> None:
        self.path = path
        self.name = _display(path)
        self.linktype: int = reader.datalink()
        self.size = size
        self.bytes_read = PCAP_FILE_HEADER_LEN if magic in PCAP_MAGICS else 0
        self.packets_read = 0
        self._reader = reader
        self._bpf = bpf
        self._pcapng = magic == PCAPNG_SHB
        # exact position = 24 + Σ(16+caplen) only when every record reaches us (no filter)
        self._exact = magic in PCAP_MAGICS and bpf is None
        self._seekable = size is not None

    def close(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(Exception):
                self._reader.close()
            self._reader = None

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _position(self) -> int | None:
        """libpcap's file position (read-ahead included), None if not seekable."""
        try:
            return os.lseek(self._reader.getfd(), 0, os.SEEK_CUR)
        except (OSError, pcapy.PcapError):
            return None

    def batches(self, n: int = 4096) -> Iterator[tuple[bytes, bytes]]:
        """pcapy `next_batch(n)` results until EOF. On damage: yields every good packet before
        it, then raises CaptureError with the byte offset of the damage. Drops each batch's
        link type: use `typed_batches` for pcapng files with several link types."""
        for _linktype, data, meta in self.typed_batches(n):
            yield data, meta

    def typed_batches(self, n: int = 4096) -> Iterator[tuple[int, bytes, bytes]]:
        """`(linktype, data, meta)` batches. The link type is `self.linktype` except after a
        fallback to `pcapng.PcapngReader` (interfaces of several link types, which libpcap
        refuses): then each batch carries its own, and a new batch starts when it changes."""
        reader = self._reader
        if reader is None:
            raise ValueError("source is closed")
        next_batch = reader.next_batch
        exact = self._exact
        while True:
            try:
                data, meta = next_batch(n)
            except pcapy.PcapError as e:
                yield from self._damaged(str(e), n)
                return  # _damaged always raises
            if not meta:
                break
            count = len(meta) // META_LEN
            self.packets_read += count
            if exact:
                self.bytes_read += PCAP_RECORD_HEADER_LEN * count + len(data)
            else:
                pos = self._position()
                if pos is not None and self.size is not None:
                    self.bytes_read = min(pos, self.size)
                else:
                    self.bytes_read += PCAP_RECORD_HEADER_LEN * count + len(data)
            yield self.linktype, data, meta
        self._check_end()
        if self.size is not None:
            self.bytes_read = self.size
        self.close()

    def _check_end(self) -> None:
        """Did libpcap stop before the end of a regular file without an error? Classic pcap
        without a filter: exact (consumed bytes vs size, free). pcapng: O(1) check that the last
        block's header and trailer lengths agree, full block walk only if not. A pcapng or pcap
        cut exactly on a block/record boundary is indistinguishable from a complete file."""
        if self.size is None:
            return
        if self._exact and self.bytes_read == self.size:
            return
        if not self._exact and not self._pcapng and self._position() == self.size:
            # Classic pcap with a filter: we cannot count the records libpcap skipped, and
            # walking them costs as much as the read itself (0.1 s per 150k records). libpcap
            # 1.10 raises on truncated records (tested); here we only catch an early stop.
            return
        with open(self.path, "rb") as fh:
            if self._pcapng:
                if _pcapng_tail_ok(fh, self.size):
                    return
                bad = _walk_pcapng(fh, self.size)
            else:  # with a filter, or records longer than the snaplen (libpcap cuts them)
                bad = _walk_pcap(fh, self.size)
        if bad is None:
            return
        offset, number, problem = bad
        self.close()
        raise CaptureError(f"{self.name}: {problem} at byte {offset} (packet {number})",
                           self.path, offset)

    def _damaged(self, libpcap_msg: str, n: int) -> Iterator[tuple[int, bytes, bytes]]:
        """Error path: recover the good packets libpcap's failed batch dropped, yield them,
        then raise CaptureError with the offset of the damage."""
        self.close()
        if not self._seekable:
            raise CaptureError(
                f"{self.name}: {libpcap_msg} after packet {self.packets_read} "
                f"(near byte {self.bytes_read}; up to {n - 1} good packets before the damage "
                f"are lost: a stream cannot be re-read)", self.path, None)
        recovered = self._recover(n)
        if recovered is not None:
            yield self.linktype, *recovered
        with open(self.path, "rb") as fh:
            size = self.size or 0
            bad = _walk_pcapng(fh, size) if self._pcapng else _walk_pcap(fh, size)
        if self._pcapng and (bad is None or MIXED_LINKTYPES in bad[2]):
            # libpcap refuses an interface whose link type (or snaplen) differs from the
            # first one's; the stdlib reader goes on from the packets delivered so far.
            yield from self._fallback(n)
            return
        if bad is None:  # libpcap objects to something the walker accepts
            raise CaptureError(f"{self.name}: {libpcap_msg} after packet {self.packets_read} "
                               f"(near byte {self.bytes_read})", self.path, None)
        offset, number, problem = bad
        raise CaptureError(f"{self.name}: {problem} at byte {offset} (packet {number})",
                           self.path, offset)

    def _fallback(self, n: int) -> Iterator[tuple[int, bytes, bytes]]:
        rest = PcapngReader(self.path, self._bpf, self.name)
        for linktype, data, meta in rest.batches(n, skip=self.packets_read):
            self.packets_read += len(meta) // META_LEN
            self.bytes_read = rest.bytes_read
            yield linktype, data, meta
        self.bytes_read = rest.bytes_read

    def _recover(self, n: int) -> tuple[bytes, bytes] | None:
        """Reopen, skip the packets already yielded (same batches, at C speed), then read one
        packet at a time up to the damage."""
        try:
            reader = pcapy.open_offline(self.path)
            if self._bpf is not None:
                reader.setfilter(self._bpf)
            skip = self.packets_read
            while skip:
                _, meta = reader.next_batch(min(n, skip))
                if not meta:
                    return None
                skip -= len(meta) // META_LEN
        except pcapy.PcapError:
            return None
        chunks: list[bytes] = []
        metas: list[bytes] = []
        offset = 0
        try:
            while True:
                hdr, pkt = reader.next()
                if hdr is None:
                    break
                sec, usec = hdr.getts()
                metas.append(META.pack(sec, usec, offset, len(pkt)))
                chunks.append(pkt)
                offset += len(pkt)
        except pcapy.PcapError:
            pass
        finally:
            with contextlib.suppress(Exception):
                reader.close()
        if not metas:
            return None
        self.packets_read += len(metas)
        if self._exact:
            self.bytes_read += PCAP_RECORD_HEADER_LEN * len(metas) + offset
        return b"".join(chunks), b"".join(metas)


def open_source(path: str, bpf: str | None = None) -> Source:
    """Open one capture ("-" = stdin). Raises CaptureError (unreadable, empty, not a capture,
    bad file header) or FilterError (bad BPF expression)."""
    name = _display(path)
    magic: int | None = None
    size: int | None = None
    if path != STDIN:
        try:
            with open(path, "rb") as fh:
                st = os.fstat(fh.fileno())
                if stat.S_ISREG(st.st_mode):
                    size = st.st_size
                    head = fh.read(4)
                else:
                    head = None  # FIFO, device: do not consume it
        except OSError as e:
            raise CaptureError(f"cannot open {path}: {e.strerror}", path, None) from None
        if head is not None:
            if not head:
                raise CaptureError(f"{path}: empty file, not a pcap or pcapng file at byte 0",
                                   path, 0)
            if len(head) < 4:
                raise CaptureError(f"{path}: truncated file header at byte 0 "
                                   f"({len(head)} bytes)", path, 0)
            magic = struct.unpack("<I", head)[0]
            swapped = struct.unpack(">I", head)[0]
            if magic not in PCAP_MAGICS and magic != PCAPNG_SHB:
                if swapped in PCAP_MAGICS:
                    magic = swapped
                else:
                    raise CaptureError(f"{path}: not a pcap or pcapng file (magic "
                                       f"0x{swapped:08x}) at byte 0", path, 0)
    try:
        reader = pcapy.open_offline(path)
    except pcapy.PcapError as e:
        msg = str(e)
        if "truncated" in msg:
            raise CaptureError(f"{name}: truncated file header at byte 0: {msg}",
                               path, 0) from None
        raise CaptureError(f"{name}: {msg} at byte 0", path, 0) from None
    if bpf is not None:
        try:
            reader.setfilter(bpf)
        except pcapy.PcapError as e:
            with contextlib.suppress(Exception):
                reader.close()
            raise FilterError(str(e)) from None
    return Source(path, reader, magic, size, bpf)


# --------------------------------------------------------------------------- merge


def _packets(src: Source, index: int, n: int,
             errors: list[CaptureError]) -> Iterator[tuple[int, int, int, int, memoryview]]:
    """(sec, usec, file index, linktype, packet) for every packet of one source; a damaged
    source ends early and leaves its error in `errors`."""
    iter_meta = META.iter_unpack
    try:
        for linktype, data, meta in src.typed_batches(n):
            view = memoryview(data)
            for sec, usec, off, caplen in iter_meta(meta):
                yield sec, usec, index, linktype, view[off:off + caplen]
    except CaptureError as e:
        errors.append(e)


class Sources:
    """Several captures read as one, opened up front (a missing file or a bad filter fails
    before any output). Iterating yields `(linktype, data, meta)` batches; `total_size` and
    `bytes_read` drive a progress bar."""

    def __init__(self, paths: Sequence[str], bpf: str | None = None, n: int = 4096) -> None:
        if isinstance(paths, str):
            paths = [paths]
        self.n = n
        self.sources: list[Source] = []
        try:
            for p in paths:
                self.sources.append(open_source(p, bpf))
        except BaseException:
            self.close()
            raise

    @property
    def total_size(self) -> int | None:
        sizes = [s.size for s in self.sources]
        return None if None in sizes else sum(sizes)  # type: ignore[arg-type]

    @property
    def bytes_read(self) -> int:
        return sum(s.bytes_read for s in self.sources)

    def close(self) -> None:
        for s in self.sources:
            s.close()

    def __iter__(self) -> Iterator[tuple[int, bytes, bytes]]:
        try:
            yield from self._batches()
        finally:
            self.close()

    def _batches(self) -> Iterator[tuple[int, bytes, bytes]]:
        sources, n = self.sources, self.n
        if not sources:
            return
        if len(sources) == 1:
            yield from sources[0].typed_batches(n)
            return
        errors: list[CaptureError] = []
        merged = heapq.merge(*(_packets(s, i, n, errors) for i, s in enumerate(sources)))
        pack = META.pack
        chunks: list[memoryview] = []
        metas: list[bytes] = []
        offset = 0
        current = -1
        for sec, usec, _i, linktype, pkt in merged:
            if linktype != current or len(metas) == n:
                if metas:
                    yield current, b"".join(chunks), b"".join(metas)
                    chunks, metas, offset = [], [], 0
                current = linktype
            caplen = len(pkt)
            metas.append(pack(sec, usec, offset, caplen))
            chunks.append(pkt)
            offset += caplen
        if metas:
            yield current, b"".join(chunks), b"".join(metas)
        if errors:
            first = errors[0]
            for other in errors[1:]:
                first.add_note(str(other))
            raise first


def read(paths: Sequence[str], bpf: str | None = None,
         n: int = 4096) -> Iterator[tuple[int, bytes, bytes]]:
    """Yield `(linktype, data, meta)` batches from one or several captures.

    One path: `Source.batches` passed through. Several: merged in timestamp order as one
    capture (ties: file order), repacked into batches of at most `n` packets with meta offsets
    relative to the batch; a new batch starts when the link type changes. A damaged file ends
    early and the merge goes on; the first CaptureError is raised after the last batch (others
    as notes).
    """
    yield from Sources(paths, bpf, n)


# --------------------------------------------------------------------------- shards
# DESIGN "Capture": worker k of N reads one shard of a file. The BPF sum of addresses and ports
# is the same both ways, so a connection stays in one shard. Packets the expressions cannot
# place (VLAN/QinQ tags, IPv4 fragments (first pieces too, so one decoder sees a whole
# datagram), IPv6 extension headers, tunnels, anything not TCP) form the complement: every
# worker reads it through a second handle, decodes it fully and keeps what `shard_of` puts in
# its shard (`Reassembler.feed_complement`).

_PLAIN4 = "ip and tcp and ip[6:2] & 0x3fff = 0"
_PLAIN6 = "ip6 and ip6[6] = 6"
_SUM4 = "ip[12:4] + ip[16:4] + tcp[0:2] + tcp[2:2]"
_SUM6 = " + ".join([f"ip6[{o}:4]" for o in range(8, 40, 4)] + ["ip6[40:2]", "ip6[42:2]"])


def shard_filter(n: int, k: int) -> str:
    """The BPF expression of shard k of n: plain IPv4/IPv6 TCP whose address+port sum (32-bit,
    wrapping, as BPF adds) is k modulo n."""
    if not 0 <= k < n:
        raise ValueError(f"shard {k} of {n}")
    return f"({_PLAIN4} and ({_SUM4}) % {n} = {k}) or ({_PLAIN6} and ({_SUM6}) % {n} = {k})"


COMPLEMENT_FILTER = f"not (({_PLAIN4}) or ({_PLAIN6}))"


def with_filter(user: str | None, expr: str) -> str:
    """`(user) and (expr)`: the user's filter still decides what is read at all."""
    return f"({user}) and ({expr})" if user else expr


_U32 = struct.Struct(">4I")


def shard_of(src: bytes, dst: bytes, sport: int, dport: int, n: int) -> int:
    """`shard_filter`'s sum for a decoded segment (packed addresses): its shard of n."""
    if len(src) == 4:
        total = int.from_bytes(src, "big") + int.from_bytes(dst, "big")
    else:
        total = sum(_U32.unpack(src)) + sum(_U32.unpack(dst))
    return ((total + sport + dport) & 0xFFFFFFFF) % n


def _guarded(src: Source, n: int, errors: list[CaptureError],
             ) -> Iterator[tuple[int, bytes, bytes]]:
    try:
        yield from src.typed_batches(n)
    except CaptureError as e:
        errors.append(e)


Batches = list[tuple[int, bytes, bytes]]


def read_complement(path: str, bpf: str | None, limit: int) -> Batches | None:
    """The complement's packets of a file, read once for every shard (a parallel reader's
    parent does this before its workers start: each libpcap handle costs a read of the whole
    file). None when they hold more than `limit` bytes, or the file is damaged: then each
    shard reads them through its own handle."""
    out: Batches = []
    size = 0
    try:
        with open_source(path, with_filter(bpf, COMPLEMENT_FILTER)) as src:
            for batch in src.typed_batches():
                size += len(batch[1]) + len(batch[2])
                if size > limit:
                    return None
                out.append(batch)
    except CaptureError:
        return None
    return out


class _Complement:
    """The complement's packets, head first: `find` locates the head in a batch of the shard
    handle, which reads the same packets (and the shard's) in the file's order."""

    def __init__(self, batches: Iterator[tuple[int, bytes, bytes]]) -> None:
        self._batches = batches
        self.data, self.meta, self.i = b"", b"", 0
        self.alive = True
        self._needle, self._caplen, self._packet = b"", 0, b""
        self._load()

    def _load(self) -> None:
        for _linktype, data, meta in self._batches:
            if meta:
                self.data, self.meta, self.i = data, meta, 0
                self._head()
                return
        self.alive = False

    def _head(self) -> None:
        sec, usec, off, caplen = META.unpack_from(self.meta, self.i)
        self._needle = self.meta[self.i:self.i + 8]  # (sec, usec) as the meta record packs them
        self._caplen = caplen
        self._packet = self.data[off:off + caplen]

    def advance(self) -> None:
        self.i += META_LEN
        if self.i >= len(self.meta):
            self._load()
        else:
            self._head()

    def matches(self, data: bytes, meta: bytes, j: int) -> bool:
        """Is the record at byte `j` of `meta` the head (same time, length and bytes)?"""
        if meta[j:j + 8] != self._needle:
            return False
        _sec, _usec, off, caplen = META.unpack_from(meta, j)
        return caplen == self._caplen and data[off:off + caplen] == self._packet

    def find(self, data: bytes, meta: bytes, pos: int) -> int:
        """Byte offset in `meta` of the head's record at or after `pos`, or -1."""
        j = meta.find(self._needle, pos)
        while j >= 0:
            if j % META_LEN == 0 and self.matches(data, meta, j):
                return j
            j = meta.find(self._needle, j + 1)
        return -1


class ShardSource:
    """Shard k of n of one capture file: `(linktype, data, meta, complement)` batches in the
    file's order, the shard's packets (`complement` False) and those of the complement (True).

    One handle reads `(user) and (shard or complement)`: every packet this worker needs, in
    order; a second reads `(user) and complement`, which tells which of them are the
    complement's (the same packets, in the same order: a packet's class is a function of its
    bytes). Both are opened up front: a bad filter or file fails before any packet is read."""

    def __init__(self, path: str, bpf: str | None, n: int, k: int, batch: int = 4096,
                 complement: Batches | None = None) -> None:
        """`complement`: the complement's packets as `read_complement` returned them (no
        second handle; none at all: the shard handle reads the shard alone)."""
        self.batch = batch
        self._given = complement
        expr = shard_filter(n, k)
        if complement is None or complement:
            expr = f"({expr}) or ({COMPLEMENT_FILTER})"
        self.shard = open_source(path, with_filter(bpf, expr))
        self.complement: Source | None = None
        if complement is None:
            try:
                self.complement = open_source(path, with_filter(bpf, COMPLEMENT_FILTER))
            except BaseException:
                self.shard.close()
                raise
        self.size = self.shard.size

    @property
    def bytes_read(self) -> int:
        return self.shard.bytes_read

    def close(self) -> None:
        self.shard.close()
        if self.complement is not None:
            self.complement.close()

    def __iter__(self) -> Iterator[tuple[int, bytes, bytes, bool]]:
        try:
            yield from self._split()
        finally:
            self.close()

    def _split(self) -> Iterator[tuple[int, bytes, bytes, bool]]:
        errors: list[CaptureError] = []
        b_errors: list[CaptureError] = []
        if self.complement is not None:
            comp = _Complement(_guarded(self.complement, self.batch, b_errors))
        else:
            comp = _Complement(iter(self._given or ()))
        for linktype, data, meta in _guarded(self.shard, self.batch, errors):
            start = 0
            while comp.alive:  # the common case, no complement packet in the batch: one find
                i = comp.find(data, meta, start)
                if i < 0:
                    break
                if i > start:
                    yield linktype, data, meta[start:i], False
                j = i + META_LEN
                comp.advance()
                while j < len(meta) and comp.alive and comp.matches(data, meta, j):
                    j += META_LEN
                    comp.advance()
                yield linktype, data, meta[i:j], True
                start = j
            if start < len(meta):
                yield linktype, data, meta[start:], False
        errors.extend(b_errors)
        if errors:
            raise errors[0]
