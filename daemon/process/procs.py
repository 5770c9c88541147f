"""Process plumbing: start a worker, talk to it, kill it; the restart backoff.

Two kinds of worker handle, one face (:class:`WorkerHandle`), so the supervisor has no
in-process branches:

* :class:`WorkerProc`, a child process with a Pipe (reports and commands) and its own bounded
  stream queue. One queue per worker rather than one shared queue: a worker killed while writing
  to a shared ``multiprocessing.Queue`` can die holding its write lock or leave half a message in
  the pipe, which would stall or corrupt every other worker's streams (the multiprocessing docs
  warn about exactly this); a private queue dies with its worker.
* :class:`InprocWorker`, the one-worker case: the :class:`~streamtap.process.worker.Worker`
  runs inside the supervisor and its ``step()`` is the loop's wait.

Fork safety: children never come from the supervisor's own memory. The supervisor runs threads
(each sink's runner, the control server, the queue feeders), and a plain ``fork()`` copies
whatever lock one of them held at that instant (logging, the heap, a sink's client) into a
child that then deadlocks on it. Workers come from multiprocessing's *forkserver*: a fresh,
single-threaded interpreter that :func:`start_forkserver` launches (fork + exec) at daemon start,
before the first thread, with ``streamtap.process.worker`` preloaded so each worker is one
cheap fork of it. The forkserver is started inside the daemon's network namespace, so its children
capture there too. It keeps none of the supervisor's file descriptors, so a worker holds neither the
self-pipe nor another worker's pipe.
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from multiprocessing import forkserver
from typing import Any, Final, Protocol

from streamtap.config import Config
from streamtap.engine.stream import Stream
from streamtap.process.capture import CaptureLost, CaptureOpenError
from streamtap.process.messages import (
    Command,
    Eof,
    Failed,
    Ready,
    Reload,
    Report,
    Stats,
    Stop,
    Stopped,
    Streams,
)
from streamtap.process.messages import send as send_msg
from streamtap.process.worker import STATS_EVERY, Worker, reload_worker, worker_process

QUEUE_BATCHES = 64          # bounded stream queue per worker (batches)
START_METHOD: Final = "forkserver"
# imported once in the forkserver: a worker is then a bare fork
PRELOAD = ["streamtap.process.worker"]


def backoff_delay(failures: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Delay before the restart after `failures` consecutive deaths: 1, 2, 4 … 60 s."""
    if failures <= 0:
        return 0.0
    return min(cap, base * 2 ** (failures - 1))


class WorkerHandle(Protocol):
    """What the supervisor sees of a worker, forked or in-process."""

    index: int
    pid: int
    inline: bool   # True: step() is where the worker runs, and the loop's wait
    eof: bool      # its Eof arrived: every stream it produced has been read

    def step(self, timeout: float) -> None: ...
    def exitcode(self) -> int | None: ...
    def abort(self) -> None: ...
    def kill(self) -> None: ...
    def send(self, msg: Command) -> bool: ...
    def messages(self) -> list[Report]: ...
    def batches(self, limit: int) -> list[list[Stream]]: ...
    def waitables(self) -> list[Any]: ...
    def close(self) -> None: ...


Spawn = Callable[[int, Config, str, "int | None"], WorkerHandle]

# --------------------------------------------------------------------------- forked workers


def start_forkserver() -> None:
    """Launch the forkserver now (idempotent). Call it before the daemon starts any thread."""
    ctx = mp.get_context(START_METHOD)
    ctx.set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()


def child_entry(target: Callable[..., Any], args: tuple, kw: dict) -> None:
    """First thing in a worker: forget the terminal/systemd signals and the notify socket."""
    # the supervisor tells workers to stop over the pipe, so a SIGTERM to the whole cgroup
    # cannot lose open streams
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(var, None)
    faulthandler.enable()  # SIGABRT from murder_workers: every thread's stack to stderr
    # die with the forkserver, which exits when the supervisor does: the sinks live there, a
    # lone worker is useless
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(1)
    except (OSError, AttributeError):
        pass
    target(*args, **kw)


class WorkerProc:
    """The supervisor's handle on one worker process: its process, pipe and stream queue."""

    inline = False

    def __init__(self, process: Any, conn: Any, queue: Any, index: int) -> None:
        self.process = process
        self.conn = conn
        self.queue = queue
        self.index = index
        self.pid: int = process.pid
        self.eof = False
        self._conn_eof = False

    def step(self, timeout: float) -> None:
        """A child runs on its own."""

    def exitcode(self) -> int | None:
        return self.process.exitcode

    def abort(self) -> None:
        """SIGABRT: Python's faulthandler (enabled in the child) writes every thread's stack
        to stderr before the process dies, so a hang reaches the log."""
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGABRT)

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)

    def send(self, msg: Command) -> bool:
        return send_msg(self.conn, msg)

    def messages(self) -> list[Report]:
        out = []
        while not self._conn_eof:
            try:
                if not self.conn.poll():
                    break
                out.append(self.conn.recv())
            except (EOFError, OSError):
                self._conn_eof = True
        return out

    def batches(self, limit: int) -> list[list[Stream]]:
        """Stream batches already in the queue, without blocking (a dead writer's half message
        raises EOFError, since the supervisor closed its own copy of the write end)."""
        out: list[list[Stream]] = []
        reader = self.queue._reader
        while len(out) < limit and not self.eof:
            try:
                if not reader.poll():
                    break
                item = self.queue.get_nowait()
            except Exception:  # Empty, EOFError, a truncated pickle from a killed worker
                break
            if isinstance(item, Streams):
                out.append(item.streams)
            elif isinstance(item, Eof):
                self.eof = True
        return out

    def waitables(self) -> list[Any]:
        # the sentinel wakes the loop when the child dies: it is the forkserver's child, not
        # ours, so no SIGCHLD reaches the supervisor
        out = [self.queue._reader, self.process.sentinel]
        if not self._conn_eof:
            out.append(self.conn)
        return out

    def close(self) -> None:
        for c in (self.conn, self.queue._reader):
            with contextlib.suppress(OSError):
                c.close()
        with contextlib.suppress(Exception):
            self.process.close()


def spawn_process(index: int, cfg: Config, interface: str, count: int | None) -> WorkerProc:
    """Start worker `index` from the forkserver (sharded: PACKET_FANOUT)."""
    start_forkserver()
    ctx = mp.get_context(START_METHOD)
    parent, child = ctx.Pipe()
    queue = ctx.Queue(maxsize=QUEUE_BATCHES)
    proc = ctx.Process(
        target=child_entry,
        args=(worker_process, (index, cfg, interface, True, child, queue), {"count": count}),
        name=f"streamtap-worker-{index}", daemon=False)
    proc.start()
    child.close()
    queue._writer.close()  # type: ignore[attr-defined]  # only the worker writes; a dead worker's queue then reads EOF
    return WorkerProc(proc, parent, queue, index)


# --------------------------------------------------------------------------- in-process


class InprocWorker:
    """A :class:`~streamtap.process.worker.Worker` run inside the supervisor, behind the same
    face as a forked one: what a child would send arrives through `messages()` and `batches()`, and
    its exit code is the one the child would have exited with."""

    inline = True

    def __init__(self, worker: Any, index: int) -> None:
        self.worker = worker
        self.index = index
        self.pid = os.getpid()
        self.eof = False
        self._reports: list[Report] = []
        self._batches: list[list[Stream]] = []
        self._code: int | None = None
        self._next_stats = 0.0

    @classmethod
    def spawn(cls, index: int, cfg: Config, interface: str, count: int | None, *,
              make_worker: Callable[..., Any] = Worker) -> InprocWorker:
        """Open the capture here; a handle that cannot open is a worker exiting with its code."""
        p = cls(make_worker(index, cfg, interface=interface, fanout=False, count=count), index)
        try:
            p.worker.start()
        except CaptureOpenError as e:
            p._reports.append(Failed(e.exit_code, e.message))
            p._code = e.exit_code
        else:
            p._reports.append(Ready(index, p.pid))
        return p

    def step(self, timeout: float) -> None:
        if self._code is not None:
            return
        w = self.worker
        try:
            streams = w.step(timeout)
        except CaptureLost as e:
            self._finish(e.exit_code, Failed(e.exit_code, e.message))
            return
        if streams:
            self._batches.append(streams)
        now = time.monotonic()
        if now >= self._next_stats:
            self._next_stats = now + STATS_EVERY
            self._reports.append(Stats(w.stats()))
        if w.done:
            self._finish(0, Stopped(self.index))

    def _finish(self, code: int, last: Report | None) -> None:
        streams = self.worker.stop()
        if streams:
            self._batches.append(streams)
        self._reports.append(Stats(self.worker.stats()))
        if last is not None:
            self._reports.append(last)
        self.eof = True
        self._code = code

    def exitcode(self) -> int | None:
        return self._code

    def abort(self) -> None:
        """Nothing to do: the loop that would abort it is the loop that runs it."""

    def kill(self) -> None:
        if self._code is None:
            self._finish(-signal.SIGKILL, None)

    def send(self, msg: Command) -> bool:
        if self._code is not None:
            return False
        if isinstance(msg, Stop):
            self._finish(0, Stopped(self.index))
        elif isinstance(msg, Reload):
            self._reports.append(reload_worker(self.worker, msg.cfg))
        return True

    def messages(self) -> list[Report]:
        out, self._reports = self._reports, []
        return out

    def batches(self, limit: int) -> list[list[Stream]]:
        out, self._batches = self._batches[:limit], self._batches[limit:]
        return out

    def waitables(self) -> list[Any]:
        return []

    def close(self) -> None:
        """The handle was closed by `Worker.stop()`."""
