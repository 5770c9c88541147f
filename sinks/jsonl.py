"""JSON Lines sink: one stream record per line (`streamtap.engine.stream.to_json_chunks`), to a file
or stdout.

Options (config `sinks: [{type: jsonl, ...}]`, declared with their defaults in `JsonlOptions`):

- ``path``: output file; ``"-"`` = stdout.
- ``payload_encoding``: base64 | hex | utf8 (lossy) | none.
- ``max_payload``: payload bytes encoded per direction and record (default 1 MiB); 0 = no cap.
  A capped record has ``streamtap.payload_truncated: true``; ``source.bytes`` /
  ``destination.bytes`` stay the true totals.
- ``rotate_bytes``: rotate before a batch would take the file past this size; 0 = never. A
  batch is never split, so a file can exceed the size by at most one batch (a file holding a
  single batch larger than the limit is allowed).
- ``rotate_seconds``: rotate before writing when the file was opened this long ago; 0 = never.
- ``compress_rotated``: gzip each rotated file (in the sink's thread, during the write that
  rotates), then delete the uncompressed copy.
- ``fsync``: never | batch (one fsync after each write() call) | always (each record is
  written and fsynced on its own: slow, for low-volume audit logs).

Rotated file names: the live file keeps ``path``; a rotated file is renamed to
``PATH.YYYYMMDDTHHMMSSZ`` (UTC, the time the file was opened, i.e. of its first record, so names
sort chronologically and old files are never renamed again, unlike logrotate's ``.1 .2``),
plus ``.N`` if that name is taken (two rotations within a second), plus ``.gz`` when
compressed. Rotation, ``rotate_*`` and ``fsync`` do not apply to stdout or to non-regular files
(``/dev/null``, FIFOs).

Errors (F2): an OSError while writing (full disk, EIO) returns ``Result.retry`` with the
error; the bytes of the failed batch are truncated away (when the file allows it) so the retry
never leaves a torn or duplicated line, and the file is closed, to be reopened by the next
open() or write(). A broken pipe on stdout is ``Result.fatal``; a record that cannot be
encoded is ``Result.fatal``.

Construction: ``JsonlSink(name, options, *, interface=None, state_dir=None)`` (the sink
contract); options missing from ``options`` take their defaults, and bad ones raise
``streamtap.config.ConfigError``, checked as a config entry is (`Sink.parse_options`).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
import stat
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from streamtap.config.schema import setting
from streamtap.engine.stream import Stream, to_json_chunks
from streamtap.sinks.base import Result, Sink
from streamtap.sinks.fileio import writev_all

MIB = 1024**2

_STAMP = "%Y%m%dT%H%M%SZ"


@dataclass(frozen=True)
class JsonlOptions:
    """JSON Lines: one stream record per line."""

    path: str = setting("-", help='Output file; "-" = stdout.')
    payload_encoding: Literal["base64", "hex", "utf8", "none"] = setting(
        "base64",
        help="How payload bytes go into the record (utf8 = lossy, none = no payload fields).",
    )
    max_payload: int = setting(
        1 * MIB,
        unit="size",
        help="Payload bytes encoded per direction and record; 0 = unlimited.",
    )
    rotate_bytes: int = setting(
        0, unit="size", help="Rotate the file before it would grow past this; 0 = never."
    )
    rotate_seconds: float = setting(
        0, unit="duration", help="Rotate the file when it is this old; 0 = never."
    )
    compress_rotated: bool = setting(False, help="gzip rotated files (PATH.<UTC time>.gz).")
    fsync: Literal["never", "batch", "always"] = setting(
        "never", help="fsync after nothing, every batch, or every record."
    )


class JsonlSink(Sink):
    """Writes one JSON record per completed stream, as bytes, to a file or stdout."""

    type = "jsonl"
    options_class = JsonlOptions
    spec_key = "path"

    def __init__(
        self,
        name: str = "jsonl",
        options: Mapping[str, Any] | None = None,
        *,
        interface: str | None = None,
        state_dir: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        o: JsonlOptions = self.parse_options(options)
        super().__init__(name, dataclasses.asdict(o), interface=interface, state_dir=state_dir)
        self.path: str = o.path
        self.payload_encoding: str = o.payload_encoding
        self.max_payload: int | None = o.max_payload or None
        self.rotate_bytes: int = o.rotate_bytes
        self.rotate_seconds: float = o.rotate_seconds
        self.compress_rotated: bool = o.compress_rotated
        self.fsync: str = o.fsync
        self._clock = clock
        self._fd: int | None = None
        self._regular = False  # a regular file: rotation, truncation on error and fsync apply
        self._size = 0
        self._opened_at = 0.0
        # counters for health()
        self.records = 0
        self.bytes_written = 0
        self.rotations = 0
        self.errors = 0
        self.last_error: str | None = None
        self.rotated_files: list[str] = []  # the latest few, newest last

    # ------------------------------------------------------------------ contract

    def open(self) -> None:
        """Open (or reopen after an error) the output file for appending. Raises OSError."""
        if self.path == "-" or self._fd is not None:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        st = os.fstat(fd)
        self._fd = fd
        self._regular = stat.S_ISREG(st.st_mode)
        self._size = st.st_size if self._regular else 0
        # An existing file counts its age from now: its first record's time is unknown.
        self._opened_at = self._clock()

    def encode(self, batch: Sequence[Stream]) -> bytes:
        """The batch as JSON Lines bytes (F1: testable without any file)."""
        return b"".join(self._lines(batch))

    def _lines(self, batch: Sequence[Stream]) -> list[bytes]:
        """The batch's lines as chunks for os.writev: each record's text around its payloads,
        and each large payload's base64 as the encoder returned it (copied once, by the
        encoder: on bulk captures every extra copy of the batch showed up)."""
        enc, cap = self.payload_encoding, self.max_payload
        out: list[bytes] = []
        extend = out.extend
        for s in batch:
            extend(to_json_chunks(s, enc, cap, "\n"))
        return out

    def write(self, batch: Sequence[Stream]) -> Result:
        if not batch:
            return Result.ok()
        try:
            if self.fsync == "always" and self.path != "-":
                chunks = [self._lines([s]) for s in batch]
            else:
                chunks = [self._lines(batch)]
        except (ValueError, TypeError) as exc:
            return self._fail(Result.fatal(f"cannot encode a record: {exc}"))
        if self.path == "-":
            return self._write_stdout(b"".join(chunks[0]), len(batch))
        try:
            if self._fd is None:
                self.open()
            self._maybe_rotate(sum(len(b) for chunk in chunks for b in chunk))
        except OSError as exc:
            self._close_quietly()
            return self._fail(Result.retry(error=_describe(exc, self.path), errno=exc.errno))
        start = self._size
        try:
            for chunk in chunks:
                n = writev_all(self._fd, chunk)  # type: ignore[arg-type]
                self._size += n
                self.bytes_written += n
                if self.fsync == "always" and self._regular:
                    os.fsync(self._fd)  # type: ignore[arg-type]
            if self.fsync == "batch" and self._regular:
                os.fsync(self._fd)  # type: ignore[arg-type]
        except OSError as exc:
            self._undo(start)
            self._close_quietly()
            return self._fail(Result.retry(error=_describe(exc, self.path), errno=exc.errno))
        self.records += len(batch)
        return Result.ok()

    def flush(self) -> None:
        """Writes are unbuffered; flush() makes them durable unless `fsync: never`."""
        if self._fd is not None and self._regular and self.fsync != "never":
            os.fsync(self._fd)

    def close(self) -> None:
        if self.path == "-":
            sys.stdout.flush()
            return
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                if self._regular and self.fsync != "never":
                    os.fsync(fd)
            finally:
                os.close(fd)

    def health(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "open": self.path == "-" or self._fd is not None,
            "file_bytes": self._size,
            "records": self.records,
            "bytes_written": self.bytes_written,
            "rotations": self.rotations,
            "errors": self.errors,
            "last_error": self.last_error,
        }

    # ------------------------------------------------------------------ internals

    def _fail(self, result: Result) -> Result:
        self.errors += 1
        self.last_error = result.error
        return result

    def _write_stdout(self, data: bytes, n: int) -> Result:
        out = sys.stdout
        try:
            out.flush()  # whatever was printed as text first stays first
            buf = getattr(out, "buffer", None)
            if buf is None:  # a text-only stream (some test harnesses)
                out.write(data.decode("utf-8"))
            else:
                buf.write(data)
            out.flush()
        except BrokenPipeError:
            return self._fail(Result.fatal("stdout closed (broken pipe)"))
        except OSError as exc:
            return self._fail(Result.retry(error=_describe(exc, "stdout")))
        self.records += n
        self.bytes_written += len(data)
        return Result.ok()

    def _undo(self, size: int) -> None:
        """Cut a failed batch off the file so that the retry starts on a line boundary."""
        if self._fd is not None and self._regular:
            try:  # the file's own size: a failed write may have left bytes we did not count
                if os.fstat(self._fd).st_size > size:
                    os.ftruncate(self._fd, size)
                self._size = size
            except OSError:
                pass

    def _close_quietly(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass

    def _maybe_rotate(self, incoming: int) -> None:
        if not self._regular or self._size == 0:
            return
        due = (self.rotate_bytes and self._size + incoming > self.rotate_bytes) or (
            self.rotate_seconds and self._clock() - self._opened_at >= self.rotate_seconds
        )
        if due:
            self.rotate()

    def rotate(self) -> str | None:
        """Close the live file, rename it to its timestamped name (gzip it if asked) and open
        a new one. Returns the rotated file's final name (None when there was nothing)."""
        if self.path == "-" or self._fd is None or not self._regular or self._size == 0:
            return None
        stamp = time.strftime(_STAMP, time.gmtime(self._opened_at))
        self.close()
        target = _free_name(f"{self.path}.{stamp}", ".gz" if self.compress_rotated else "")
        os.rename(self.path, target)
        final = target
        if self.compress_rotated:
            try:
                final = _gzip_file(target)
            except OSError as exc:  # keep the plain file; the data is safe
                self.errors += 1
                self.last_error = f"gzip {target}: {_describe(exc, target)}"
        self.rotations += 1
        self.rotated_files = [*self.rotated_files[-9:], final]
        self.open()
        return final


def _free_name(base: str, suffix: str) -> str:
    """`base` (or base.1, base.2 …) such that neither it nor it + suffix exists."""
    name, n = base, 0
    while os.path.lexists(name) or (suffix and os.path.lexists(name + suffix)):
        n += 1
        name = f"{base}.{n}"
    return name


def _gzip_file(path: str) -> str:
    """`path` -> `path.gz` (written to a temporary name, then renamed), plain file deleted."""
    final = path + ".gz"
    tmp = final + ".tmp"
    try:
        with open(path, "rb") as src, gzip.open(tmp, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.rename(tmp, final)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    os.unlink(path)
    return final


def _describe(exc: OSError, what: str) -> str:
    return f"{exc.filename or what}: {exc.strerror or exc}"
