"""files sink: tcpflow's output layout, one file per direction that carried bytes.

Made so that tcpflow users can switch without changing their scripts: ``streamtap -r x.pcap
--sink files:DIR`` writes what ``tcpflow -r x.pcap -o DIR`` writes, by the same names.

Names (tcpflow 1.6 ``flow::filename``, template ``%A.%a-%B.%b%C%c``):
``SRCIP.SRCPORT-DSTIP.DSTPORT`` for the bytes SRC sent to DST; IPv4 octets zero-padded to 3
digits, IPv6 as ``inet_ntop`` prints it (compressed), ports to 5 digits:
``010.000.000.001.40000-010.000.000.002.00080`` holds what the client 10.0.0.1:40000 sent,
``010.000.000.002.00080-010.000.000.001.40000`` the answer.
tcpflow's ``--VLAN`` part is not written (streams do not carry the VLAN id).

``cN``: like tcpflow (``flow::new_filename``), each file is created with ``O_EXCL`` and, when the
name is taken, ``c1``, ``c2``, … are appended to it (``…-010.000.000.002.00080c1``) until a free
name is found. So a later connection on a reused 4-tuple gets the next suffix, and a restart
(or a second run into the same DIR) never overwrites an earlier run's files: its files continue
the numbering. Each direction is numbered on its own, as tcpflow does.

Options (config ``sinks: [{type: files, ...}]``, ``--sink files:DIR``; declared with their
defaults in ``FilesOptions``):

- ``dir`` (required): where files go (created if missing).
- ``gaps``: ``skip`` (default: the direction's bytes, holes left out, as every other sink) or
  ``zero``: each missing byte is a zero byte, so file offsets equal sequence offsets, as in
  tcpflow's files. The zeros are written as holes (``ftruncate``): sparse, like tcpflow's. Unlike
  tcpflow, a hole at the end of a direction is written too (tcpflow's file stops at its last
  captured byte), so the file's length is the direction's sequence length.
- ``subdirs``: ``none`` (default, tcpflow's flat layout), ``day`` (``YYYYMMDD/``) or ``hour``
  (``YYYYMMDD/HH/``), UTC, from the stream's start. See the README for why ``none`` is the
  default; the ``cN`` numbering runs within a subdirectory.

Index: ``DIR/streams.jsonl`` gets one line per stream, written after its files: the stream's
record as the JSONL sink writes it with ``payload_encoding: none``
(``streamtap.engine.stream``), plus
``streamtap.files = {"source": PATH|null, "destination": PATH|null}``: the files holding what the
client (source) and the server (destination) sent, relative to DIR, null for a direction without
bytes.

Parts (a long connection emitted as several records with the same ``stream.id``): a record whose
``tcp.close_reason`` is ``part`` keeps its files open for the next part of the same stream id,
which appends to them instead of taking new names; the last part closes them. The link lives in
memory only: after a restart, the remaining parts of a stream go to new ``cN`` files.

Errors (F2): an OSError while writing (full disk, EIO) rolls the whole batch back (files it
created removed, files it appended to and the index truncated to their previous sizes) and
returns ``Result.retry``: a retry takes the same names and never duplicates bytes. ``open()``
raises OSError (``ENOTDIR`` when DIR is not a directory), which the CLI reports on one line.
Files are created with mode 0640 (umask applies): they hold captured traffic.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from json import dumps
from typing import Any, Literal

from streamtap.config.schema import setting
from streamtap.engine.stream import Stream, to_record
from streamtap.sinks.base import Result, Sink
from streamtap.sinks.fileio import MadeDirs, undo_writes, write_all

INDEX_NAME = "streams.jsonl"
SUBDIRS = {"none": "", "day": "%Y%m%d/", "hour": "%Y%m%d/%H/"}
PART = "part"  # tcp.close_reason of every part of a stream but the last

# Names already tried per base name: the next cN to try, so a tuple reused thousands of times
# costs one open per new file, not one per earlier connection. Cleared past this size.
_NEXT_CACHE_MAX = 65536
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
_APPEND = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC


def address(ip: str) -> str:
    """`ip` as tcpflow spells it in a file name: IPv4 zero-padded, IPv6 as inet_ntop prints."""
    if ":" not in ip:
        return ".".join(f"{int(octet):03d}" for octet in ip.split("."))
    addr, _, zone = ip.partition("%")
    try:
        text = socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, addr))
    except OSError:
        text = addr
    # a zone (fe80::1%eth0) is kept, made safe for a file name
    return text + ("%" + zone.replace("/", "_") if zone else "")


def flow_name(src: tuple[str, int], dst: tuple[str, int], counter: int = 0) -> str:
    """tcpflow's file name for the bytes `src` sent to `dst` (`counter` > 0 appends cN)."""
    name = f"{address(src[0])}.{src[1]:05d}-{address(dst[0])}.{dst[1]:05d}"
    return f"{name}c{counter}" if counter else name


@dataclass(frozen=True)
class FilesOptions:
    """tcpflow's layout: one file per direction that carried bytes, streams.jsonl beside them."""

    dir: str = setting(help="Directory the flow files and streams.jsonl go to (required).")
    gaps: Literal["skip", "zero"] = setting(
        "skip", help="Missing bytes: skip = left out; zero = zero bytes (sparse), so file "
        "offsets equal sequence offsets, as in tcpflow's files."
    )
    subdirs: Literal["none", "day", "hour"] = setting(
        "none", help="none = every file in dir (tcpflow's layout); day = YYYYMMDD/; hour = "
        "YYYYMMDD/HH/ (UTC, stream start)."
    )


def direction_chunks(data: bytes, gaps: Sequence[tuple[int, int]]) -> list[bytes | int]:
    """The direction as pieces: bytes to write and ints (hole lengths) between them.

    `gaps` are (position in `data`, length) pairs, any order (the stream's gaps of one side).
    """
    out: list[bytes | int] = []
    pos = 0
    view = memoryview(data)
    for at, length in sorted(gaps):
        if at > pos:
            out.append(bytes(view[pos:at]))
            pos = at
        if length > 0:
            out.append(length)
    if pos < len(data):
        out.append(bytes(view[pos:]) if pos else data)
    return out


class FilesSink(Sink):
    """Writes each direction's bytes to its own file, named as tcpflow names them."""

    type = "files"
    options_class = FilesOptions
    spec_key = "dir"

    def __init__(
        self,
        name: str = "files",
        options: Mapping[str, Any] | None = None,
        *,
        interface: str | None = None,
        state_dir: str | None = None,
    ) -> None:
        o: FilesOptions = self.parse_options(options)
        super().__init__(name, dataclasses.asdict(o), interface=interface, state_dir=state_dir)
        self.dir: str = o.dir
        self.zero_fill: bool = o.gaps == "zero"
        self.subdirs: str = o.subdirs
        self._subdir_format = SUBDIRS[self.subdirs]
        self.index_path = os.path.join(self.dir, INDEX_NAME)
        self._index_fd: int | None = None
        self._index_size = 0
        self._dirs = MadeDirs()
        self._next: dict[str, int] = {}  # base name (relative) -> first cN worth trying
        # stream.id -> (source file, destination file), relative to dir, while more parts come
        self._ongoing: dict[str, tuple[str | None, str | None]] = {}
        # counters for health()
        self.streams = 0
        self.files_created = 0
        self.bytes_written = 0
        self.errors = 0
        self.last_error: str | None = None

    # ------------------------------------------------------------------ contract

    def open(self) -> None:
        """Create DIR if needed and open the index. Raises OSError (ENOTDIR: not a directory)."""
        if self._index_fd is not None:
            return
        try:
            os.makedirs(self.dir, exist_ok=True)
        except FileExistsError:
            # makedirs says "File exists" about a regular file in the way: say what is wrong
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR),
                                     self.dir) from None
        if not os.path.isdir(self.dir):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), self.dir)
        fd = os.open(self.index_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                     0o640)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file", self.index_path)
        self._index_fd, self._index_size = fd, st.st_size

    def write(self, batch: Sequence[Stream]) -> Result:
        if not batch:
            return Result.ok()
        undo: list[tuple[str, int]] = []  # (absolute path, size before the batch; -1 = created)
        ongoing_before = dict(self._ongoing)
        index_start = self._index_size
        lines: list[bytes] = []
        try:
            if self._index_fd is None:
                self.open()
            index_start = self._index_size
            for s in batch:
                lines.append(self._write_stream(s, undo))
            data = b"".join(lines)
            write_all(self._index_fd, data)  # type: ignore[arg-type]
            self._index_size += len(data)
        except OSError as exc:
            self._rollback(undo, index_start)
            self._ongoing = ongoing_before
            self.errors += 1
            self.last_error = f"{exc.filename or self.dir}: {exc.strerror or exc}"
            return Result.retry(error=self.last_error, errno=exc.errno)
        self.streams += len(batch)
        return Result.ok()

    def close(self) -> None:
        if self._index_fd is not None:
            fd, self._index_fd = self._index_fd, None
            os.close(fd)

    def health(self) -> dict[str, Any]:
        return {
            "dir": self.dir,
            "gaps": "zero" if self.zero_fill else "skip",
            "subdirs": self.subdirs,
            "streams": self.streams,
            "files_created": self.files_created,
            "bytes_written": self.bytes_written,
            "ongoing_streams": len(self._ongoing),
            "errors": self.errors,
            "last_error": self.last_error,
        }

    # ------------------------------------------------------------------ internals

    def _write_stream(self, s: Stream, undo: list[tuple[str, int]]) -> bytes:
        """Write both directions of `s`; return its index line."""
        sid = s.id
        earlier = self._ongoing.pop(sid, None)
        if earlier is not None:  # a later part: new files go beside the earlier parts' ones
            known = earlier[0] or earlier[1] or ""
            prefix = os.path.dirname(known) + "/" if os.path.dirname(known) else ""
        elif self._subdir_format:
            prefix = time.strftime(self._subdir_format, time.gmtime(s.start))
        else:
            prefix = ""
        names: list[str | None] = []
        for side, src, dst, data in (("client", s.client, s.server, s.client_data),
                                     ("server", s.server, s.client, s.server_data)):
            gaps = [(at, n) for at, n, d in s.gaps if d == side] if self.zero_fill else []
            chunks = direction_chunks(data, gaps) if data else []
            rel = earlier[len(names)] if earlier is not None else None
            if not chunks:
                names.append(rel)
                continue
            appending = rel is not None
            if rel is not None:
                path = os.path.join(self.dir, rel)
                fd = os.open(path, _APPEND)
            else:
                rel, fd = self._create(prefix + flow_name(src, dst))
                path = os.path.join(self.dir, rel)
                undo.append((path, -1))  # before anything else can fail
            try:
                size = os.fstat(fd).st_size
                if appending:
                    undo.append((path, size))
                self._write_chunks(fd, chunks, size)
            finally:
                os.close(fd)
            names.append(rel)
        if s.close_reason == PART:
            self._ongoing[sid] = (names[0], names[1])
        rec = to_record(s, "none")
        rec["streamtap"]["files"] = {"source": names[0], "destination": names[1]}
        return dumps(rec, separators=(",", ":")).encode("utf-8") + b"\n"

    def _create(self, base: str) -> tuple[str, int]:
        """Create the first free name of `base`, `base`c1, `base`c2 … (O_EXCL, as tcpflow)."""
        parent = os.path.dirname(base)
        if parent:
            self._dirs.ensure(os.path.join(self.dir, parent))
        n = self._next.get(base, 0)
        while True:
            rel = f"{base}c{n}" if n else base
            try:
                fd = os.open(os.path.join(self.dir, rel), _CREATE, 0o640)
            except FileExistsError:
                n += 1
                continue
            if len(self._next) >= _NEXT_CACHE_MAX:
                self._next.clear()
            self._next[base] = n + 1
            self.files_created += 1
            return rel, fd

    def _write_chunks(self, fd: int, chunks: list[bytes | int], size: int) -> int:
        for chunk in chunks:
            if isinstance(chunk, int):
                # a hole: extend the file (sparse zeros); O_APPEND writes go past it
                size += chunk
                os.ftruncate(fd, size)
            else:
                write_all(fd, chunk)
                size += len(chunk)
                self.bytes_written += len(chunk)
        return size

    def _rollback(self, undo: list[tuple[str, int]], index_size: int) -> None:
        """Undo a failed batch: remove the files it created, truncate the rest and the index."""
        undo_writes(undo)
        self._next.clear()  # names freed by the unlinks must be found again
        fd = self._index_fd
        if fd is not None:
            try:
                if os.fstat(fd).st_size > index_size:
                    os.ftruncate(fd, index_size)
            except OSError:
                pass
            self._index_fd = None
            try:
                os.close(fd)
            except OSError:
                pass
        self._index_size = index_size
