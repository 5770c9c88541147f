"""IPv4 and IPv6 fragment reassembly for the decoder (`streamtap.engine.decode`).

Bounded on every axis, because fragments are a classic way to make a sniffer hold memory:

- at most `max_pending` datagrams are held; a new one past that evicts the oldest
  (counted ``fragment_limit``);
- a datagram still incomplete `timeout` seconds after its first fragment (packet time, not the
  wall clock) is dropped (``fragment_timeout``);
- overlapping fragments drop the whole datagram, including fragments that arrive later
  (``fragment_overlap``). RFC 5722 requires this for IPv6; we apply the same rule to IPv4 on
  purpose: the OS stacks disagree on which bytes of an IPv4 overlap win (first, last, BSD-right…),
  so any choice could hand the reassembler bytes the receiver never saw. Exact duplicates of a
  fragment (same offset, length and bytes, e.g. captured twice) are not overlaps: RFC 8200 §4.5
  allows ignoring them, and we do (``fragment_duplicate`` in `skipped`);
- invalid geometry (a non-final fragment whose length is not a multiple of 8, data past the
  final fragment's end, more than 65,535 bytes) drops the datagram (``fragment_invalid``);
- a fragment cut by the capture's snaplen cannot be reassembled: `discard` drops its datagram
  (the caller counts ``fragment_truncated``).

A dropped datagram leaves a tombstone under its key until it expires, so its remaining fragments
are discarded quietly (``fragment_discarded`` in `skipped`) instead of starting a new datagram that
could only time out.

Frames (``reassembly.keep_packets``, for the pcap sink): `add` may be given the captured frames a
fragment came in; the datagram holds them beside its pieces and hands them back, in capture order,
when it completes, so every frame of a fragmented segment can be written out. Frames of duplicates
are not held (they add nothing, and a flood of copies must not grow memory), and a dropped
datagram's frames go with it: fragments of a datagram that never completes are in no stream.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable

import cython

#: IPv4 total length and IPv6 payload length are 16-bit fields (RFC 791, RFC 8200; jumbograms
#: cannot be fragmented, RFC 2675 §3), so no reassembled payload can exceed this.
MAX_DATAGRAM = 65535


@cython.cclass
class _Datagram:
    """One datagram being reassembled: its fragments as (start, end, bytes), no overlaps.

    A C struct when compiled (public: tests and the decoder's callers inspect them)."""

    first_ts = cython.declare(cython.double, visibility="public")
    pieces = cython.declare(list, visibility="public")
    size = cython.declare(cython.Py_ssize_t, visibility="public")
    total = cython.declare(object, visibility="public")
    max_end = cython.declare(cython.Py_ssize_t, visibility="public")
    meta = cython.declare(object, visibility="public")
    dead = cython.declare(cython.bint, visibility="public")
    frames = cython.declare(list, visibility="public")

    def __init__(self, first_ts: float) -> None:
        self.first_ts = first_ts
        self.pieces = []  # (start, end, bytes)
        self.size = 0  # bytes held (no overlaps, so == covered bytes)
        self.total = None  # payload length, known once the last fragment (MF=0) came
        self.max_end = 0
        self.meta = None  # from the offset-0 fragment (IPv6: its next header)
        self.dead = False  # tombstone: dropped, swallow the rest of its fragments
        self.frames = []  # captured (ts, wire_len, frame), when asked to keep them


@cython.cclass
class Defragmenter:
    """Reassembles fragmented IP payloads keyed by (src, dst, id, proto).

    `add` returns ``(payload, meta, frames)`` when the fragment completes its datagram, else
    None (the fragment is held, or dropped and counted); `frames` are the frames given to `add`
    for its fragments, in the order they were added (empty when none were given). Drops go to
    `malformed`, holds to `skipped`: the decoder's own counters, passed in.
    """

    max_pending = cython.declare(cython.Py_ssize_t, visibility="public")
    timeout = cython.declare(cython.double, visibility="public")
    malformed = cython.declare(object, visibility="public")
    skipped = cython.declare(object, visibility="public")
    _pending = cython.declare(dict, visibility="public")

    def __init__(
        self,
        max_pending: int,
        timeout: float,
        malformed: Counter[str],
        skipped: Counter[str],
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"frag_max_pending must be >= 1, got {max_pending}")
        if timeout <= 0:
            raise ValueError(f"frag_timeout must be > 0, got {timeout}")
        self.max_pending = max_pending
        self.timeout = timeout
        self.malformed = malformed
        self.skipped = skipped
        # Insertion order == creation order: the first key is the oldest datagram, which makes
        # both expiry and eviction O(1) per datagram.
        self._pending = {}  # key -> _Datagram

    @property
    def pending(self) -> int:
        """Datagrams held (incomplete, or tombstones of dropped ones)."""
        return len(self._pending)

    def expire(self, now: float) -> None:
        """Drop datagrams whose first fragment is older than `timeout` at packet time `now`."""
        pending = self._pending
        limit: cython.double = now - self.timeout
        dg: _Datagram
        while pending:
            key = next(iter(pending))
            dg = pending[key]
            if dg.first_ts >= limit:
                break
            del pending[key]
            if not dg.dead:
                self.malformed["fragment_timeout"] += 1

    @cython.cfunc
    def _get(self, key: Hashable, ts: float) -> _Datagram:
        pending = self._pending
        dg: _Datagram | None = pending.get(key)
        if dg is None:
            if len(pending) >= self.max_pending:
                oldest = next(iter(pending))
                old: _Datagram = pending.pop(oldest)
                if not old.dead:
                    self.malformed["fragment_limit"] += 1
            dg = pending[key] = _Datagram(ts)
        return dg

    @cython.cfunc
    def _kill(self, dg: _Datagram, reason: str) -> None:
        dg.dead = True
        dg.pieces = []  # free the bytes now; the tombstone stays until it expires
        dg.frames = []
        self.malformed[reason] += 1

    def discard(self, key: Hashable, ts: float, reason: str) -> None:
        """Drop the datagram `key` (e.g. one of its fragments was truncated), counting `reason`."""
        if self._pending:
            self.expire(ts)
        dg: _Datagram = self._get(key, ts)
        if dg.dead:
            self.skipped["fragment_discarded"] += 1
        else:
            self._kill(dg, reason)

    def add(
        self,
        key: Hashable,
        ts: float,
        offset: cython.Py_ssize_t,
        more: cython.bint,
        data: bytes,
        meta: object,
        frames: list[tuple[float, int, bytes]] | None = None,
    ) -> tuple[bytes, object, list[tuple[float, int, bytes]]] | None:
        """Add one fragment: payload bytes `data` at byte `offset`; `more` = MF flag set;
        `frames`: the `(ts, wire_len, frame)` records it was captured in, held with it."""
        n: cython.Py_ssize_t
        end: cython.Py_ssize_t
        s: cython.Py_ssize_t
        e: cython.Py_ssize_t
        if self._pending:
            self.expire(ts)
        dg: _Datagram = self._get(key, ts)
        if dg.dead:
            self.skipped["fragment_discarded"] += 1
            return None
        n = len(data)
        end = offset + n
        total = dg.total
        if (
            (more and n & 7)
            or end > MAX_DATAGRAM
            or (total is not None and (end > total or (not more and end != total)))
            or (not more and end < dg.max_end)
        ):
            self._kill(dg, "fragment_invalid")
            return None
        for s, e, d in dg.pieces:
            if offset < e and s < end:
                if s == offset and e == end and d == data:
                    self.skipped["fragment_duplicate"] += 1
                    return None
                self._kill(dg, "fragment_overlap")
                return None
        dg.pieces.append((offset, end, data))
        if frames:
            dg.frames += frames
        dg.size += n
        if end > dg.max_end:
            dg.max_end = end
        if not more:
            dg.total = total = end
        if offset == 0:
            dg.meta = meta
        # No overlaps and nothing past `total`, so size == total means every byte is covered.
        if total is not None and dg.size == total:
            del self._pending[key]
            pieces = dg.pieces
            pieces.sort()
            return b"".join([p[2] for p in pieces]), dg.meta, dg.frames
        self.skipped["fragment_pending"] += 1
        return None
