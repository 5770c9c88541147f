"""A disk spool: an append-only log of opaque records, read back oldest first.

Layout of the spool directory::

    000000000000.seg  000000000001.seg ...   segments, zero-padded increasing sequence numbers
    .cursor                                  {"segment": N, "offset": N}: where delivery resumes

A segment is a series of records ``[4-byte big-endian length][4-byte big-endian CRC32][payload]``.
Writes go to the newest segment (the *head*), which rolls to a new one past `segment_bytes`.
A spool found on disk is resumed: the old segments are kept (a new head is started, so a torn
tail of the previous run stays where it is) and delivery resumes at the cursor.

Durability: every `append` is flushed to the OS (a crash of the process loses nothing); a
segment is fsynced when it rolls and at `close` (a power loss may lose the head's last records).
`commit` writes the cursor atomically (temp file, fsync, `os.replace`), so after a crash at most
the batches read but not yet committed are read again: at-least-once delivery. (On a full disk
the cursor file may not be writable: it then stays in memory until a later commit can write it,
and a crash meanwhile replays from the last one written.)

The cap (`max_bytes`, bytes of segment files on disk) is enforced by dropping the OLDEST
segments, whole, before an append would exceed it (Vector's `when_full` as a fixed, documented
choice: drop oldest, so the spool keeps the most recent data); the undelivered records they held
are counted in `dropped_records`. A single record larger than `max_bytes` is dropped and counted.

A full disk (ENOSPC, EDQUOT) or another write error never raises either: the torn bytes of
the failed record are cut off again (the segment keeps only whole records), then the spool
makes room the way the cap does, dropping the OLDEST sealed segments (counted in
`dropped_records`) and trying again; with nothing left to drop, the new record is dropped and
counted. Each failed write is counted in `enospc` (full disk) or `write_errors`; the first one
of an episode is logged, and so is its end (the spool grows past the size it had when writes
began to fail, or is delivered to empty).

Corruption never raises: a record with a bad CRC, an impossible length or a truncated tail ends
the readable part of its segment; the rest of that segment is skipped, the event is counted in
`corrupt_records` (one per corrupt record found; the records after it in the segment cannot be
counted) and logged on "streamtap.spool". Later segments are read normally.

Thread safety: one writer thread (`append`) and one reader thread (`read_batches`, `commit`) may
run concurrently; the reader only reads bytes the writer has completely written.
"""

from __future__ import annotations

import bisect
import errno
import json
import logging
import os
import re
import struct
import threading
import zlib
from collections.abc import Generator
from typing import IO

__all__ = ["Spool", "Token"]

log = logging.getLogger("streamtap.spool")

HEADER = struct.Struct(">II")  # payload length, CRC32 of the payload
SEGMENT_SUFFIX = ".seg"
CURSOR_NAME = ".cursor"
_SEGMENT_RE = re.compile(r"^(\d{12})\.seg$")
_READ_BUFFER = 1 << 20
# "the file system is full" in its two forms: no blocks left, or the user's quota spent
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})

Token = tuple[int, int]
"""A position in the spool: (segment sequence number, byte offset in that segment)."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Spool:
    """Disk spool in `directory` (created if missing); see the module docstring."""

    def __init__(
        self, directory: str, max_bytes: int = 1 << 30, segment_bytes: int = 16 << 20
    ) -> None:
        if max_bytes <= 0 or segment_bytes <= 0:
            raise ValueError("max_bytes and segment_bytes must be > 0")
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.dropped_records = 0
        self.corrupt_records = 0
        self.enospc = 0  # appends that found the file system full
        self.write_errors = 0  # appends that failed for another reason (EIO ...)
        self._failing = False  # in an episode of failed appends (logged once)
        self._failed_at = 0  # bytes held when it began: growing past them means room is back
        self._lock = threading.Lock()
        self._segs: list[int] = []  # sorted sequence numbers of existing segments
        self._sizes: dict[int, int] = {}  # complete bytes per segment
        self._total = 0
        self._head: int | None = None  # segment being written, None until the first append
        self._head_file: IO[bytes] | None = None
        self._closed = False
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(directory):
            m = _SEGMENT_RE.match(name)
            if m:
                seq = int(m.group(1))
                self._segs.append(seq)
                self._sizes[seq] = os.path.getsize(self._path(seq))
        self._segs.sort()
        self._total = sum(self._sizes.values())
        self._next_seq = self._segs[-1] + 1 if self._segs else 0
        self._cursor = self._load_cursor()
        # Segments before the cursor were delivered (a crash between cursor and unlink).
        while self._segs and self._segs[0] < self._cursor[0]:
            self._remove(self._segs[0])
        seq, off = self._cursor
        # Never reuse a sequence number at or before the cursor for new data.
        self._next_seq = max(self._next_seq, seq + 1)
        if seq not in self._sizes:
            nxt = self._next_after(seq)
            self._cursor = (nxt if nxt is not None else self._next_seq, 0)
        elif off > self._sizes[seq]:
            log.warning("spool %s: cursor offset %d past the end of segment %d; resuming at "
                        "its end", directory, off, seq)
            self._cursor = (seq, self._sizes[seq])

    # -- helpers (callers hold the lock where it matters) ------------------------------------

    def _path(self, seq: int) -> str:
        return os.path.join(self.directory, f"{seq:012d}{SEGMENT_SUFFIX}")

    def _load_cursor(self) -> Token:
        start: Token = (self._segs[0], 0) if self._segs else (self._next_seq, 0)
        path = os.path.join(self.directory, CURSOR_NAME)
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            seq, off = int(d["segment"]), int(d["offset"])
            if seq < 0 or off < 0:
                raise ValueError("negative position")
        except FileNotFoundError:
            return start
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("spool %s: unreadable cursor (%s); replaying from the oldest segment",
                        self.directory, exc)
            return start
        return (seq, off)

    def _write_cursor(self) -> None:
        path = os.path.join(self.directory, CURSOR_NAME)
        tmp = path + ".tmp"
        seq, off = self._cursor
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({"segment": seq, "offset": off}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _remove(self, seq: int) -> None:
        i = bisect.bisect_left(self._segs, seq)
        if i < len(self._segs) and self._segs[i] == seq:
            del self._segs[i]
        self._total -= self._sizes.pop(seq, 0)
        try:
            os.unlink(self._path(seq))
        except FileNotFoundError:
            pass

    def _next_after(self, seq: int) -> int | None:
        i = bisect.bisect_right(self._segs, seq)
        return self._segs[i] if i < len(self._segs) else None

    def _count_records(self, seq: int, start: int) -> int:
        """Records from `start` to the end of segment `seq`, walking headers only."""
        n, off, size = 0, start, self._sizes.get(seq, 0)
        try:
            with open(self._path(seq), "rb") as f:
                while off + HEADER.size <= size:
                    f.seek(off)
                    length, _ = HEADER.unpack(f.read(HEADER.size))
                    off += HEADER.size + length
                    if off > size:
                        break
                    n += 1
        except OSError:
            pass
        return n

    def _roll(self) -> None:
        if self._head_file is not None:
            f, self._head_file = self._head_file, None
            try:
                os.fsync(f.fileno())
            except OSError:
                pass  # the records were written; a power loss may lose them (as at close)
            f.close()
        self._head = None  # until the new segment exists (its open may fail: ENOSPC, EMFILE)
        seq = self._next_seq
        self._next_seq += 1
        # unbuffered: a failed write must not stay in a buffer and come out later, after a
        # record written when space came back
        self._head_file = open(self._path(seq), "wb", buffering=0)  # noqa: SIM115 (held open)
        self._head = seq
        self._segs.append(seq)
        self._sizes[seq] = 0
        _fsync_dir(self.directory)

    def _drop_oldest(self) -> None:
        seq = self._segs[0]
        cseq, coff = self._cursor
        if seq >= cseq:
            lost = self._count_records(seq, coff if seq == cseq else 0)
            if lost:
                self.dropped_records += lost
                log.warning("spool %s full (%d bytes): dropped segment %d with %d undelivered "
                            "records", self.directory, self.max_bytes, seq, lost)
        self._remove(seq)
        if seq == cseq:
            nxt = self._next_after(seq)
            self._cursor = (nxt if nxt is not None else self._next_seq, 0)

    # -- writer ---------------------------------------------------------------------------------

    def append(self, payload: bytes) -> bool:
        """Add one record at the end; False when it was dropped (counted). Raises ValueError
        once closed, never OSError (see the module docstring)."""
        rec = HEADER.pack(len(payload), zlib.crc32(payload)) + payload
        n = len(rec)
        with self._lock:
            if self._closed:
                raise ValueError("spool is closed")
            if n > self.max_bytes:
                self.dropped_records += 1
                log.warning("spool %s: record of %d bytes exceeds max_bytes %d; dropped",
                            self.directory, n, self.max_bytes)
                return False
            while self._segs and self._total + n > self.max_bytes:
                if self._segs[0] == self._head:
                    self._roll_quietly()  # the head is the oldest: seal it so it can go
                self._drop_oldest()
            while True:
                try:
                    self._write_locked(rec)
                except OSError as exc:
                    self._write_failed(exc)
                    # room the way the cap makes it: the oldest sealed segment goes; a head
                    # holding records is sealed first, so that it can go too
                    head = self._head
                    if head is not None and self._segs and self._segs[0] == head \
                            and self._sizes[head]:
                        self._roll_quietly()
                    if self._segs and self._segs[0] != self._head:
                        self._drop_oldest()
                        continue
                    self.dropped_records += 1
                    return False
                if self._failing and self._total > self._failed_at:
                    self._failing = False
                    log.warning("spool %s: writing again", self.directory)
                return True

    def _write_locked(self, rec: bytes) -> None:
        n = len(rec)
        head = self._head
        if head is None or (self._sizes[head] and self._sizes[head] + n > self.segment_bytes):
            self._roll()
            head = self._head
        assert head is not None and self._head_file is not None
        f = self._head_file
        try:
            view = memoryview(rec)
            while view:
                k = f.write(view)
                if not k:  # unbuffered FileIO: None would mean EAGAIN, not on a file
                    raise OSError(errno.EIO, "short write", self._path(head))
                view = view[k:]
        except OSError:
            try:  # cut the torn record off: the segment holds whole records only
                f.truncate(self._sizes[head])
                f.seek(self._sizes[head])
            except OSError:
                # cannot cut it: seal the segment where its whole records end (readers stop
                # at _sizes) and write on in a new one
                self._roll_quietly()
            raise
        self._sizes[head] += n
        self._total += n

    def _roll_quietly(self) -> None:
        try:
            self._roll()
        except OSError as exc:  # no new segment file: the next append tries again
            self._head = None
            self._write_failed(exc)

    def _write_failed(self, exc: OSError) -> None:
        full = exc.errno in DISK_FULL
        if full:
            self.enospc += 1
        else:
            self.write_errors += 1
        self._failed_at = self._total
        if not self._failing:
            self._failing = True
            log.warning("spool %s: cannot write (%s); dropping the oldest records to make "
                        "room, else the new ones, until it works again", self.directory,
                        exc.strerror or exc)

    def close(self) -> None:
        """fsync and close the head; an empty head segment is removed. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._head_file is not None:
                f, self._head_file = self._head_file, None
                try:
                    os.fsync(f.fileno())
                except OSError as exc:
                    log.warning("spool %s: fsync at close: %s", self.directory, exc)
                f.close()
                head = self._head
                if head is not None and self._sizes.get(head) == 0 and self._cursor[0] != head:
                    self._remove(head)

    # -- state ----------------------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        """Bytes of segment files on disk (including a delivered prefix of the oldest)."""
        return self._total

    def is_empty(self) -> bool:
        """True when every record appended so far has been committed (or dropped/skipped)."""
        with self._lock:
            return self._empty_locked()

    def _empty_locked(self) -> bool:
        cseq, coff = self._cursor
        for seq in self._segs:
            size = self._sizes[seq]
            if (seq > cseq and size) or (seq == cseq and size > coff):
                return False
        return True

    def end_token(self) -> Token:
        """The position after the last appended record: committing it skips everything."""
        with self._lock:
            if self._head is not None:
                return (self._head, self._sizes[self._head])
            return (self._next_seq, 0)

    # -- reader ---------------------------------------------------------------------------------

    def _corrupt(self, seq: int, off: int, limit: int, why: str) -> None:
        self.corrupt_records += 1
        log.warning("spool %s: corrupt record in segment %d at offset %d (%s); skipping the "
                    "rest of the segment (%d bytes)", self.directory, seq, off, why, limit - off)

    def read_batches(
        self, max_records: int, max_bytes: int | None = None
    ) -> Generator[tuple[list[bytes], Token], None, None]:
        """Yield (payloads, token) oldest first, starting at the committed cursor, until the end
        of what has been written. A batch holds at most `max_records` records (and stops once
        it reaches `max_bytes` of payload). `commit(token)` marks the batch delivered.

        Skipped corrupt data can yield an empty batch: commit its token as well.
        """
        if max_records < 1:
            raise ValueError("max_records must be >= 1")
        with self._lock:
            seq, off = self._cursor
        start: Token = (seq, off)
        f: IO[bytes] | None = None
        fseq = -1
        batch: list[bytes] = []
        nbytes = 0
        try:
            while True:
                with self._lock:
                    if self._closed:
                        return
                    if seq not in self._sizes:
                        nxt = self._next_after(seq)
                        if nxt is None:
                            break
                        seq, off = nxt, 0
                    limit = self._sizes[seq]
                    sealed = seq != self._head
                    nxt = self._next_after(seq)
                if off >= limit:
                    if sealed and nxt is not None:
                        seq, off = nxt, 0
                        continue
                    break
                if fseq != seq:
                    if f is not None:
                        f.close()
                        f = None
                    try:
                        f = open(self._path(seq), "rb", buffering=_READ_BUFFER)  # noqa: SIM115
                    except FileNotFoundError:  # dropped by the cap meanwhile
                        fseq = -1
                        continue
                    fseq = seq
                assert f is not None
                if f.tell() != off:
                    f.seek(off)
                if limit - off < HEADER.size:
                    self._corrupt(seq, off, limit, "truncated header")
                    off = limit
                    continue
                length, crc = HEADER.unpack(f.read(HEADER.size))
                if off + HEADER.size + length > limit:
                    self._corrupt(seq, off, limit, f"length {length} past the end")
                    off = limit
                    continue
                payload = f.read(length)
                if len(payload) != length:
                    self._corrupt(seq, off, limit, "short read")
                    off = limit
                    continue
                if zlib.crc32(payload) != crc:
                    self._corrupt(seq, off, limit, "CRC mismatch")
                    off = limit
                    continue
                off += HEADER.size + length
                batch.append(payload)
                nbytes += length
                if len(batch) >= max_records or (max_bytes is not None and nbytes >= max_bytes):
                    yield batch, (seq, off)
                    start = (seq, off)
                    batch, nbytes = [], 0
            if batch or (seq, off) != start:
                yield batch, (seq, off)
        finally:
            if f is not None:
                f.close()

    def commit(self, token: Token) -> None:
        """Everything before `token` is delivered: move the cursor there (persisted atomically)
        and delete the segments that are now fully delivered."""
        seq, off = token
        with self._lock:
            if self._closed:
                return
            if (seq, off) < self._cursor:
                return  # stale token (the cap moved the cursor past it)
            # A sealed segment read to its end is delivered too.
            if seq in self._sizes and seq != self._head and off >= self._sizes[seq]:
                nxt = self._next_after(seq)
                seq, off = (nxt if nxt is not None else self._next_seq), 0
            self._cursor = (seq, off)
            while self._segs and self._segs[0] < seq:
                self._remove(self._segs[0])
            if self._failing and self._empty_locked():
                self._failing = False  # the backlog is out: the episode is over
                log.warning("spool %s: delivered; writing again", self.directory)
            try:
                self._write_cursor()
            except OSError as exc:
                # a full disk: the cursor stays in memory (a restart would replay from the
                # last cursor written: at-least-once) and the next commit writes it
                self._write_failed(exc)
                try:
                    os.unlink(os.path.join(self.directory, CURSOR_NAME + ".tmp"))
                except OSError:
                    pass
