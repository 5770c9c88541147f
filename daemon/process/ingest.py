"""Ingestion jobs for `POST /pcaps`: a capture file reassembled through `pipeline.Pipeline`, its
streams handed to the daemon's sinks (`deliver`).

Jobs run one at a time, in order, on one background thread. At most `max_queued` jobs wait:
one more is refused (`IngestError`, status 503) instead of letting the queue grow without
bound. A refused request carries the HTTP status the control API answers with (400 bad path,
403 outside the ingest directories or ingestion disabled, 404 missing, 503 full or stopping):
the control API is the only caller, and a status is a plain, documented vocabulary.
"""

from __future__ import annotations

import logging
import os
import queue
import stat
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from streamtap.config import Config
from streamtap.engine.decode import UnsupportedLinkType
from streamtap.engine.pipeline import Pipeline
from streamtap.engine.reader import CaptureError
from streamtap.engine.stream import Stream

log = logging.getLogger("streamtap.process.control")

__all__ = ["IngestError", "IngestJob", "Ingestor", "MAX_QUEUED"]

MAX_QUEUED = 64  # jobs waiting (the running one not counted); one more answers 503
MAX_JOBS_KEPT = 1000  # finished jobs beyond this are forgotten, oldest first


class IngestError(Exception):
    """A job refused at submission; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class IngestJob:
    """One POST /pcaps request."""

    id: str
    path: str
    status: str = "queued"  # queued | running | done | failed
    packets: int = 0
    streams: int = 0
    error: str | None = None
    started: str = field(default_factory=_now)
    finished: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "status": self.status,
                "packets": self.packets, "streams": self.streams, "error": self.error,
                "started": self.started, "finished": self.finished}


class Ingestor:
    """The job queue and its thread. `deliver(streams)` is called from that thread with each
    batch of completed streams; `config()` gives the config a job reassembles with (None: the
    defaults), asked per job so a reload applies to the next one."""

    def __init__(
        self,
        dirs: Sequence[str],
        deliver: Callable[[list[Stream]], None],
        config: Callable[[], Config | None] | None = None,
        *,
        max_queued: int = MAX_QUEUED,
    ) -> None:
        self.dirs = tuple(os.path.realpath(d) for d in dirs)
        self.deliver = deliver
        self.config = config
        self._jobs: dict[str, IngestJob] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[IngestJob | None] = queue.Queue(max_queued + 1)  # + sentinel
        self._max_queued = max_queued
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="streamtap-ingest", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread: a running job stops at its next batch, it and the queued jobs are
        marked failed ("daemon stopped")."""
        with self._lock:
            self._stopping.set()
            while True:  # drop the queued jobs so the sentinel has room
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._queue.put_nowait(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            for job in self._jobs.values():
                if job.status in ("queued", "running"):
                    job.status, job.error, job.finished = "failed", "daemon stopped", _now()

    # ---------------------------------------------------------------- requests

    def submit(self, path: str) -> IngestJob:
        """Check `path` and queue a job for it; raises `IngestError` (400/403/404/503)."""
        if "\0" in path:
            raise IngestError(400, "path contains a NUL byte")
        if not os.path.isabs(path):
            raise IngestError(400, f"path must be absolute, got {path!r}")
        if not self.dirs:
            raise IngestError(403, "ingestion is disabled: control.ingest_dirs is empty")
        real = os.path.realpath(path)  # `..` and every symlink resolved, then checked
        if not self._inside(real):
            raise IngestError(403, f"{path} is not inside an ingest directory "
                              f"({', '.join(self.dirs)})")
        if not os.path.exists(real):
            raise IngestError(404, f"{path}: no such file")
        if not os.path.isfile(real):
            raise IngestError(400, f"{path}: not a regular file")
        job = IngestJob(id=uuid.uuid4().hex[:16], path=real)
        with self._lock:
            if self._stopping.is_set():
                raise IngestError(503, "the daemon is stopping")
            if self._queue.qsize() >= self._max_queued:
                raise IngestError(503, f"{self._max_queued} ingest jobs are already waiting: "
                                  "try again later")
            self._queue.put_nowait(job)  # cannot be full: checked under the lock
            self._jobs[job.id] = job
            self._prune()
        log.info("ingest %s: queued %s", job.id, real)
        return job

    def _inside(self, real: str) -> bool:
        return any(os.path.commonpath([real, d]) == d for d in self.dirs)

    def _open_checked(self, job: IngestJob) -> int:
        """Open the job's file and check again, on the open file, that it is a regular file
        inside an ingest directory: a path component swapped for a symlink between the request
        and the run (jobs wait in a queue) must not let the job read outside. Raises
        `IngestError` (its message names the requested path, not /proc)."""
        try:
            # O_NONBLOCK: a FIFO swapped in must not hang the ingest thread on open
            fd = os.open(job.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise IngestError(404, f"{job.path}: {e.strerror or e}") from None
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
            if not self._inside(real) or not stat.S_ISREG(os.fstat(fd).st_mode):
                raise IngestError(403, f"{job.path} changed since it was accepted: it is no "
                                  "longer a regular file inside an ingest directory")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _prune(self) -> None:
        extra = len(self._jobs) - MAX_JOBS_KEPT
        if extra > 0:
            for jid in [j.id for j in self._jobs.values() if j.finished][:extra]:
                del self._jobs[jid]

    def job(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return job.as_dict() if job else None

    def jobs(self) -> list[dict[str, Any]]:
        with self._lock:
            return [j.as_dict() for j in self._jobs.values()]

    # ---------------------------------------------------------------- the thread

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None or self._stopping.is_set():
                return
            try:
                self._run(job)
            except Exception as e:  # never kill the thread; the job says what went wrong
                log.exception("ingest %s: %s failed", job.id, job.path)
                self._finish(job, "failed", f"internal error: {e}")

    def _finish(self, job: IngestJob, status: str, error: str | None) -> None:
        with self._lock:
            job.status, job.error, job.finished = status, error, _now()

    def _run(self, job: IngestJob) -> None:
        with self._lock:
            job.status = "running"
        log.info("ingest %s: reading %s", job.id, job.path)
        try:
            fd = self._open_checked(job)
        except IngestError as e:
            log.warning("ingest %s: %s", job.id, e)
            self._finish(job, "failed", str(e))
            return
        try:
            self._read(job, fd)
        finally:
            os.close(fd)

    def _read(self, job: IngestJob, fd: int) -> None:
        # the readers open by name: /proc/self/fd/N is the file checked above, whatever the
        # path names now
        proc = f"/proc/self/fd/{fd}"
        pipe = Pipeline(proc, self.config() if self.config else None)
        try:
            for streams in pipe.batches():
                if self._stopping.is_set():
                    self._finish(job, "failed", "daemon stopped")
                    return
                if streams:
                    self.deliver(streams)
                with self._lock:
                    job.packets = pipe.packets
                    job.streams += len(streams)
        except (CaptureError, UnsupportedLinkType) as e:
            msg = str(e).replace(proc, job.path)
            log.warning("ingest %s: %s", job.id, msg)
            self._finish(job, "failed", msg)
            return
        self._finish(job, "done", None)
        log.info("ingest %s: done, %d packets, %d streams", job.id, job.packets, job.streams)
