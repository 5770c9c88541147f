"""pcap sink: each completed stream's packets, as captured, in classic pcap files.

Needs the raw packets: run the reassembler with ``reassembly.keep_packets: true``. A stream
without them (``Stream.packets is None``) makes write() return ``Result.fatal`` saying so.

Options (config ``sinks: [{type: pcap, ...}]``, declared with their defaults in
``PcapOptions``):

- ``dir`` (required): where files go (created if missing).
- ``mode``: ``per_stream`` (one file per stream, named by ``template``) or ``rotating`` (every
  stream appended to one file ``streamtap-%Y%m%d-%H%M%S.pcap``, UTC, the time the file was
  opened; ``-N`` added if that name exists).
- ``template`` (per_stream): ``str.format`` template of the path under ``dir``; ``/`` makes
  sub-directories. Default ``{start:%Y%m%d}/{client_ip}.{client_port}-{server_ip}.{server_port}-
  {stream_id}.pcap``. Fields: ``start``/``end`` (aware ``datetime``, UTC), ``client_ip``,
  ``client_port``, ``server_ip``, ``server_port``, ``stream_id``, ``community_id``,
  ``close_reason``, ``interface`` ("none" offline), ``ip_version``. Every text field is made
  safe for any filesystem (NTFS, SMB, FAT included): characters outside ``[A-Za-z0-9._-]`` become
  ``_``. So an IPv6 address ``2001:db8::1`` is ``2001_db8__1`` (``_``, not ``-``: ``-`` already
  separates the two endpoints in the default template) and a zone ``fe80::1%eth0`` is
  ``fe80__1_eth0``; ``community_id`` is ``1:hO+sN4H+MG5MY/8hIrXPqc4ZQz0=`` made base64url without
  padding and ``:`` -> ``_`` (``1_hO-sN4H-MG5MY_8hIrXPqc4ZQz0``). The template must stay under
  ``dir``: an absolute template or a ``..`` component is refused.
- Parts (a long connection emitted as several records with the same ``stream.id``, DESIGN
  "Parts"): each part carries the packets since the previous part, and with ``per_stream`` a
  later part maps to the same file, which it appends to (the header is written once), so the
  file ends up holding the whole connection. Templates using ``end`` or ``close_reason``, which
  change from part to part, split a stream's parts over several files instead.
- ``rotate_bytes`` / ``rotate_seconds`` (rotating): start a new file before a stream would take
  the file past that size / when the file is that old; 0 = never. A stream is never split
  across files. A stream of another link type than the open file's also starts a new file
  (a pcap file has one link type).
- ``max_open_files`` (default 256): LRU cap on open file descriptors. A file evicted from the
  LRU is closed and reopened for appending when a later stream maps to it (templates that put
  several streams in one file, e.g. ``{client_ip}.pcap``).
- ``nanosecond``: write nanosecond pcap (magic 0xa1b23c4d) instead of microsecond (0xa1b2c3d4).
  Stream timestamps are floats at microsecond precision (libpcap 1.9 reads every file at µs),
  so ns files carry the same instants with three trailing zero digits.
- ``snaplen``: the snaplen written in file headers (default 262144, libpcap's maximum).

Format: classic pcap, little-endian, version 2.4; each record has the true wire length
(``orig_len``) of the packet and ``incl_len`` = the bytes captured, so snaplen-cut packets
stay recognisable as such. The link type is the capture's: pcapy reports DLTs, which are mapped
back to LINKTYPE values the way libpcap's ``dlt_to_linktype`` does (raw IP: DLT 12 or 14 ->
LINKTYPE_RAW 101). A stream's packets are every frame that carried one of its segments, each
fragment of a fragmented IP datagram included (never a rebuilt datagram), so reading the files
back gives the same streams; fragments of a datagram that never completed are in no stream.
Packets are in capture order within a stream; in ``rotating`` mode streams
follow each other in completion order (so the file is not globally sorted by time: use
``reordercap`` if a tool needs that).

Existing files are appended to when their header matches (same magic and link type), so
writing the same capture twice into the same ``dir`` repeats its packets (stream ids are
deterministic): give each run an empty directory. A file whose header does not match is left
untouched and that stream is reported in a ``Result.fatal`` after the rest of the batch is
written. Files are created with mode 0640 (umask applies): they hold captured traffic.

Errors (F2): an OSError while writing (full disk, EIO) rolls the whole batch back (every file
written by the batch truncated to its previous size, files the batch created removed), closes
the open files and returns ``Result.retry``: a retry never duplicates packets.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import os
import re
import string
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from streamtap.config.schema import ConfigError, setting
from streamtap.engine.pcapfmt import MAX_SNAPLEN, PCAP_MAGIC_NS, PCAP_MAGIC_US, dlt_to_linktype
from streamtap.engine.stream import Stream
from streamtap.sinks.base import Result, Sink
from streamtap.sinks.fileio import MadeDirs, undo_writes, write_all, writev_all

# pcap file format (https://www.tcpdump.org/manpages/pcap-savefile.5.html)
PCAP_VERSION_MAJOR = 2
PCAP_VERSION_MINOR = 4
PCAP_FILE_HEADER = struct.Struct("<IHHiIII")  # magic, major, minor, thiszone, sigfigs, snaplen, lt
PCAP_RECORD_HEADER = struct.Struct("<IIII")  # ts_sec, ts_frac, incl_len, orig_len

DEFAULT_TEMPLATE = (
    "{start:%Y%m%d}/{client_ip}.{client_port}-{server_ip}.{server_port}-{stream_id}.pcap"
)
ROTATING_FORMAT = "streamtap-%Y%m%d-%H%M%S"

TEMPLATE_FIELDS = (
    "start", "end", "client_ip", "client_port", "server_ip", "server_port", "stream_id",
    "community_id", "close_reason", "interface", "ip_version",
)

NO_PACKETS = (
    "stream {sid} ({client} -> {server}) carries no packets: the pcap sink needs the raw "
    "packets; set `reassembly.keep_packets: true` in the config"
)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_CID_SAFE = str.maketrans({"+": "-", "/": "_", ":": "_", "=": None})


linktype_of = dlt_to_linktype  # the LINKTYPE value for a file header from pcapy's DLT value


def safe(text: str) -> str:
    """`text` usable as (part of) a file name on any filesystem."""
    return _UNSAFE.sub("_", text)


def file_header(linktype: int, nanosecond: bool = False, snaplen: int = MAX_SNAPLEN) -> bytes:
    magic = PCAP_MAGIC_NS if nanosecond else PCAP_MAGIC_US
    return PCAP_FILE_HEADER.pack(
        magic, PCAP_VERSION_MAJOR, PCAP_VERSION_MINOR, 0, 0, snaplen, linktype
    )


def encode_packets(packets: Sequence[tuple[float, int, bytes]], nanosecond: bool = False) -> bytes:
    """Packet records (no file header) for `(ts, wire_len, frame)` tuples."""
    return b"".join(packet_records(packets, nanosecond))


def packet_records(packets: Sequence[tuple[float, int, bytes]],
                   nanosecond: bool = False) -> list[bytes]:
    """[record header, frame, record header, frame, ...] ready for os.writev (D3: locals
    hoisted, one precompiled header packer; frames are never copied)."""
    pack = PCAP_RECORD_HEADER.pack
    mult = 1000 if nanosecond else 1
    out: list[bytes] = []
    append = out.append
    for ts, wire, frame in packets:
        # float seconds carry µs exactly up to 2**53 µs (year 2255)
        sec, usec = divmod(round(ts * 1_000_000), 1_000_000)
        caplen = len(frame)
        append(pack(sec, usec * mult, caplen, wire if wire >= caplen else caplen))
        append(frame)
    return out


def template_fields(s: Stream) -> dict[str, Any]:
    """The fields a per-stream template can use, all file-name safe."""
    utc = _dt.UTC
    return {
        "start": _dt.datetime.fromtimestamp(s.start, utc),
        "end": _dt.datetime.fromtimestamp(s.end, utc),
        "client_ip": safe(s.client[0]),
        "client_port": s.client[1],
        "server_ip": safe(s.server[0]),
        "server_port": s.server[1],
        "stream_id": s.id,
        "community_id": safe(s.community_id.translate(_CID_SAFE)),
        "close_reason": safe(s.close_reason),
        "interface": safe(s.interface or "none"),
        "ip_version": s.ip_version,
    }


def check_template(template: str) -> str:
    """Raise ValueError unless `template` is a relative path template with known fields."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ValueError(f"bad pcap template {template!r}: {exc}") from None
    for f in names:
        base = re.split(r"[.\[]", f, maxsplit=1)[0]
        if base not in TEMPLATE_FIELDS:
            raise ValueError(f"unknown field {{{f}}} in pcap template {template!r}; "
                             f"known: {', '.join(TEMPLATE_FIELDS)}")
    if template.startswith("/") or ".." in template.split("/"):
        raise ValueError(f"pcap template {template!r} must be a relative path without '..'")
    sample = Stream(("2001:db8::1", 1), ("2001:db8::2", 2), b"", b"", "fin", [], 0.0, 0.0, 6)
    try:
        template.format(**template_fields(sample))
    except (ValueError, KeyError, IndexError, AttributeError) as exc:
        raise ValueError(f"bad pcap template {template!r}: {exc}") from None
    return template


def _pcap_template(value: str, path: str) -> str:
    try:
        check_template(value)
    except ValueError as e:
        raise ConfigError(str(e), path) from None
    return value


@dataclass(frozen=True)
class PcapOptions:
    """pcap files of each stream's packets (reassembly.keep_packets is turned on for it)."""

    dir: str = setting(help="Directory the pcap files are written to (required).")
    mode: Literal["per_stream", "rotating"] = setting(
        "per_stream", help="One file per stream (named by template), or one rotating file."
    )
    template: str = setting(
        DEFAULT_TEMPLATE,
        check=_pcap_template,
        help="per_stream file name under dir; fields start, end, client_ip, client_port, "
        "server_ip, server_port, stream_id, community_id, close_reason, interface, ip_version.",
    )
    rotate_bytes: int = setting(0, unit="size", help="rotating mode: size limit; 0 = never.")
    rotate_seconds: float = setting(
        0, unit="duration", help="rotating mode: age limit; 0 = never."
    )
    max_open_files: int = setting(256, positive=True, help="Open file handles kept (LRU).")
    nanosecond: bool = setting(False, help="Write nanosecond-magic files (µs-precise times).")
    snaplen: int = setting(MAX_SNAPLEN, positive=True, max=MAX_SNAPLEN,
                           help="snaplen in file headers.")


class _Incompatible(Exception):
    """An existing file's header does not match what would be appended."""


class PcapSink(Sink):
    """Writes streams' packets to pcap files (see the module docstring)."""

    type = "pcap"
    options_class = PcapOptions
    spec_key = "dir"
    needs_packets = True  # it writes each stream's packets as captured

    def __init__(
        self,
        name: str = "pcap",
        options: Mapping[str, Any] | None = None,
        *,
        interface: str | None = None,
        state_dir: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        o: PcapOptions = self.parse_options(options)
        super().__init__(name, dataclasses.asdict(o), interface=interface, state_dir=state_dir)
        self.dir: str = o.dir
        self.mode: str = o.mode
        self.template: str = o.template
        self.rotate_bytes: int = o.rotate_bytes
        self.rotate_seconds: float = o.rotate_seconds
        self.max_open_files: int = o.max_open_files
        self.nanosecond: bool = o.nanosecond
        self.snaplen: int = o.snaplen
        self._magic = PCAP_MAGIC_NS if self.nanosecond else PCAP_MAGIC_US
        self._clock = clock
        # path -> [fd, size, linktype]; most recently used last
        self._lru: OrderedDict[str, list[int]] = OrderedDict()
        self._dirs = MadeDirs()
        self._current: str | None = None  # rotating mode: the live file
        self._current_opened = 0.0
        # counters for health() and tests
        self.streams = 0
        self.packets = 0
        self.bytes_written = 0
        self.files_created = 0
        self.evictions = 0
        self.peak_open_files = 0
        self.rotations = 0
        self.errors = 0
        self.last_error: str | None = None

    # ------------------------------------------------------------------ contract

    def open(self) -> None:
        """Create `dir` if missing. Raises OSError (the OS's answer, with the path)."""
        if os.path.exists(self.dir) and not os.path.isdir(self.dir):
            # makedirs would say "File exists", which reads as success
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), self.dir)
        os.makedirs(self.dir, exist_ok=True)

    def write(self, batch: Sequence[Stream]) -> Result:
        for s in batch:
            if s.packets is None:
                msg = NO_PACKETS.format(sid=s.id, client=s.client, server=s.server)
                self.errors += 1
                self.last_error = msg
                return Result.fatal(msg)
        undo: list[tuple[str, int]] = []  # (path, size before the batch; -1 = created)
        touched: set[str] = set()
        problems: list[str] = []
        nano = self.nanosecond
        per_stream = self.mode == "per_stream"
        try:
            for s in batch:
                pkts = s.packets
                if not pkts:
                    continue
                lt = linktype_of(s.linktype)
                data = packet_records(pkts, nano)  # type: ignore[arg-type]
                nbytes = sum(map(len, data))
                try:
                    if per_stream:
                        path = os.path.join(self.dir, self.template.format(**template_fields(s)))
                    else:
                        path = self._rotating_path(nbytes, lt)
                    entry = self._handle(path, lt, undo, touched)
                except _Incompatible as exc:
                    problems.append(str(exc))
                    continue
                writev_all(entry[0], data)
                entry[1] += nbytes
                self.bytes_written += nbytes
                self.streams += 1
                self.packets += len(pkts)  # type: ignore[arg-type]
        except OSError as exc:
            self._rollback(undo)
            self.errors += 1
            self.last_error = f"{exc.filename or self.dir}: {exc.strerror or exc}"
            return Result.retry(error=self.last_error, errno=exc.errno)
        if problems:
            self.errors += 1
            self.last_error = problems[0]
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            return Result.fatal(problems[0] + more)
        return Result.ok()

    def flush(self) -> None:
        for fd, _size, _lt in self._lru.values():
            os.fsync(fd)

    def close(self) -> None:
        errors = []
        while self._lru:
            _path, (fd, _size, _lt) = self._lru.popitem(last=False)
            try:
                os.close(fd)
            except OSError as exc:
                errors.append(exc)
        self._current = None
        if errors:
            raise errors[0]

    def health(self) -> dict[str, Any]:
        return {
            "dir": self.dir,
            "mode": self.mode,
            "open_files": len(self._lru),
            "peak_open_files": self.peak_open_files,
            "max_open_files": self.max_open_files,
            "current_file": self._current,
            "streams": self.streams,
            "packets": self.packets,
            "bytes_written": self.bytes_written,
            "files_created": self.files_created,
            "evictions": self.evictions,
            "rotations": self.rotations,
            "errors": self.errors,
            "last_error": self.last_error,
        }

    @property
    def open_files(self) -> int:
        return len(self._lru)

    # ------------------------------------------------------------------ internals

    def _rotating_path(self, incoming: int, linktype: int) -> str:
        cur = self._current
        if cur is not None:
            entry = self._lru.get(cur)
            size = entry[1] if entry is not None else os.path.getsize(cur)
            lt = entry[2] if entry is not None else linktype
            has_data = size > PCAP_FILE_HEADER.size
            if not (
                lt != linktype
                or (has_data and self.rotate_bytes and size + incoming > self.rotate_bytes)
                or (self.rotate_seconds
                    and self._clock() - self._current_opened >= self.rotate_seconds)
            ):
                return cur
            self._close_path(cur)
            self.rotations += 1
        now = self._clock()
        base = os.path.join(self.dir, time.strftime(ROTATING_FORMAT, time.gmtime(now)))
        path, n = base + ".pcap", 0
        while os.path.lexists(path):
            n += 1
            path = f"{base}-{n}.pcap"
        self._current, self._current_opened = path, now
        return path

    def _handle(self, path: str, linktype: int, undo: list[tuple[str, int]],
                touched: set[str]) -> list[int]:
        """The LRU entry [fd, size, linktype] for `path`, opened (and the header written or
        checked) if needed; records the pre-batch size in `undo` on first touch."""
        lru = self._lru
        entry = lru.get(path)
        if entry is not None:
            lru.move_to_end(path)
            if entry[2] != linktype:
                raise _Incompatible(f"{path}: holds link type {entry[2]}, "
                                    f"stream has {linktype}")
            if path not in touched:
                touched.add(path)
                undo.append((path, entry[1]))
            return entry
        if len(lru) >= self.max_open_files:
            _old, (fd, _s, _l) = lru.popitem(last=False)
            self.evictions += 1
            os.close(fd)
        self._dirs.ensure(os.path.dirname(path))
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        created = not os.path.lexists(path)
        fd = os.open(path, flags, 0o640)
        try:
            size = os.fstat(fd).st_size
            if size:
                head = os.pread(fd, PCAP_FILE_HEADER.size, 0)
                if len(head) < PCAP_FILE_HEADER.size:
                    raise _Incompatible(f"{path}: exists and is not a pcap file")
                magic, _ma, _mi, _z, _sf, _sn, lt = PCAP_FILE_HEADER.unpack(head)
                if magic != self._magic or lt != linktype:
                    raise _Incompatible(
                        f"{path}: exists with another format (magic {magic:#x}, link type "
                        f"{lt}); stream has magic {self._magic:#x}, link type {linktype}")
            if path not in touched:
                touched.add(path)
                undo.append((path, -1 if created else size))
            if not size:
                header = file_header(linktype, self.nanosecond, self.snaplen)
                write_all(fd, header)
                size = len(header)
                self.files_created += 1
        except BaseException:
            os.close(fd)
            raise
        entry = lru[path] = [fd, size, linktype]
        if len(lru) > self.peak_open_files:
            self.peak_open_files = len(lru)
        return entry

    def _close_path(self, path: str) -> None:
        entry = self._lru.pop(path, None)
        if entry is not None:
            os.close(entry[0])

    def _rollback(self, undo: list[tuple[str, int]]) -> None:
        """Undo a failed batch: truncate or delete what it wrote, close every file."""
        for path, _e in list(self._lru.items()):
            self._close_path(path)
        undo_writes(undo)
        if self._current is not None and not os.path.lexists(self._current):
            self._current = None
