"""File writing shared by the file sinks (jsonl, pcap, files): whole writes and a batch's undo.

Each helper calls ``os.write`` / ``os.writev`` / ``os.truncate`` through the ``os`` module at
call time, so tests that patch them (a torn write, ENOSPC) reach every sink.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

# buffers per os.writev call: the system's IOV_MAX (1024 on Linux), never more than 1024
IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 1024


def write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until every byte of `data` is written (a short write goes on from where it
    stopped). Raises OSError."""
    view = memoryview(data)
    write = os.write
    while view:
        view = view[write(fd, view):]


def writev_all(fd: int, bufs: Sequence[bytes]) -> int:
    """Write `bufs` in order with os.writev, in IOV_MAX slices; a short write finishes the cut
    buffer and the rest of its slice with os.write. Returns the bytes written (all of them).
    Raises OSError: the file may then hold part of `bufs` (see :func:`undo_writes`)."""
    writev = os.writev
    total = 0
    for i in range(0, len(bufs), IOV_MAX):
        part = bufs[i:i + IOV_MAX]
        want = sum(map(len, part))
        n = writev(fd, part)
        total += want
        if n == want:
            continue
        for b in part:  # short write: skip what went out, finish the rest
            if n >= len(b):
                n -= len(b)
                continue
            write_all(fd, memoryview(b)[n:])
            n = 0
    return total


def undo_writes(undo: Iterable[tuple[str, int]]) -> None:
    """Take back what a failed batch wrote: each (path, size before the batch) is truncated to
    that size, or removed when the size is -1 (the batch created it); newest first. Best
    effort: a file that cannot be cut or removed is left as it is."""
    for path, size in reversed(list(undo)):
        try:
            if size < 0:
                os.unlink(path)
            else:
                os.truncate(path, size)
        except OSError:
            pass


class MadeDirs:
    """The directories a sink has made or found: os.makedirs once per directory, not once per
    file. Forgotten all at once past 4096, so a template making a directory per day or per
    host does not grow it without end."""

    limit = 4096

    def __init__(self) -> None:
        self._known: set[str] = set()

    def ensure(self, path: str) -> None:
        """Make `path` and its parents unless already known. Raises OSError."""
        if path not in self._known:
            os.makedirs(path, exist_ok=True)
            if len(self._known) > self.limit:
                self._known.clear()
            self._known.add(path)
