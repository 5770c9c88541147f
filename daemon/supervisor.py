"""The live supervisor: keeps N capture workers alive and feeds their streams to the sinks.

Modelled on gunicorn's arbiter (STYLE G1–G4):

* Signal handlers only enqueue the signal and write one byte to a self-pipe (G1). The run loop
  waits ~0.1 s on (self-pipe, worker pipes, stream queues), dispatches ``handle_<sig>``, then every
  pass: drains streams to the sinks, reaps dead workers, murders silent ones, manages (respawns)
  workers, and speaks to systemd.
* Heartbeat (G2): every message a worker sends over its pipe (``("stats", …)`` comes every ~1 s)
  refreshes it; a worker silent for :attr:`Supervisor.heartbeat_timeout` is SIGKILLed and restarted.
* Exit codes mean something (G3): a worker exiting 1 or 2 before it was ready (a
  ``CaptureOpenError``: missing interface, permission, bad filter) stops the daemon with that code
  instead of respawning forever. Other deaths respawn with exponential backoff 1 s → 60 s.
* Nothing process-wide happens before fork in a worker (G4); children ignore the terminal/systemd
  signals (the supervisor tells them to stop over the pipe, so SIGTERM to the whole cgroup cannot
  lose open streams) and die with the supervisor (PR_SET_PDEATHSIG).

``workers == 1`` runs the :class:`~streamtap.worker.Worker` inside this process: its ``step()`` is
the loop's wait. ``workers > 1`` forks children (multiprocessing "fork" context), each with a Pipe
for control and heartbeats and its own bounded stream queue. One queue per worker rather than one
shared queue: a worker killed while writing to a shared ``multiprocessing.Queue`` can die holding
its write lock or leave half a message in the pipe, which would stall or corrupt every other
worker's streams (the multiprocessing docs warn about exactly this); a private queue dies with its
worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .errors import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE
from .notify import Notifier

log = logging.getLogger("streamtap.supervisor")

BOOT_ERRORS = (EXIT_RUNTIME, EXIT_USAGE)

SIGNALS = ("HUP", "INT", "TERM", "USR1", "CHLD")
# A worker's stats message is summed generically: every number, and every {reason: number}
# dict, is a cumulative counter, except the keys below. So a counter the engine adds later
# reaches /status and /metrics with no change here.
META_KEYS = frozenset({"index", "pid", "interface", "last_progress", "_error"})
GAUGES = frozenset({"flows_active"})  # summed over live workers only, never kept past a death
QUEUE_BATCHES = 64          # bounded stream queue per worker (batches)
MAX_BATCHES_PER_PASS = 256  # keep signals and heartbeats served under a flood of streams


class HaltServer(Exception):
    def __init__(self, reason: str, exit_status: int = EXIT_RUNTIME) -> None:
        super().__init__(reason)
        self.reason = reason
        self.exit_status = exit_status


def backoff_delay(failures: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Delay before the restart after `failures` consecutive deaths: 1, 2, 4 … 60 s."""
    if failures <= 0:
        return 0.0
    return min(cap, base * 2 ** (failures - 1))


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _add_counters(into: dict[str, Any], stats: dict[str, Any], gauges: bool = False) -> None:
    """Add the counters (or, with `gauges`, the gauges) of one stats message into `into`."""
    for k, v in stats.items():
        if k in META_KEYS or (k in GAUGES) != gauges:
            continue
        if _is_num(v):
            old = into.get(k, 0)
            if _is_num(old):
                into[k] = old + v
        elif isinstance(v, dict):
            d = into.setdefault(k, {})
            if not isinstance(d, dict):
                continue
            for reason, n in v.items():
                if _is_num(n):
                    d[reason] = d.get(reason, 0) + n


# --------------------------------------------------------------------------- child processes


def _child_entry(target: Callable[..., Any], close_fds: list[int], args: tuple, kw: dict) -> None:
    """First thing in a forked worker: forget the supervisor's signals, fds and notify socket."""
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for fd in close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    os.environ.pop("NOTIFY_SOCKET", None)
    os.environ.pop("WATCHDOG_USEC", None)
    os.environ.pop("WATCHDOG_PID", None)
    try:  # die with the supervisor: the sinks live there, a lone worker is useless
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(EXIT_RUNTIME)
    except (OSError, AttributeError):
        pass
    target(*args, **kw)


class WorkerProc:
    """The supervisor's handle on one forked worker: its process, pipe and stream queue."""

    def __init__(self, process: Any, conn: Any, queue: Any, index: int) -> None:
        self.process = process
        self.conn = conn
        self.queue = queue
        self.index = index
        self.pid: int = process.pid
        self._eof = False

    def exitcode(self) -> int | None:
        return self.process.exitcode

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)

    def send(self, msg: tuple) -> bool:
        try:
            self.conn.send(msg)
            return True
        except (OSError, EOFError, ValueError):
            return False

    def messages(self) -> list[tuple]:
        out = []
        while not self._eof:
            try:
                if not self.conn.poll():
                    break
                out.append(self.conn.recv())
            except (EOFError, OSError):
                self._eof = True
        return out

    def batches(self, limit: int) -> list[tuple]:
        """Stream batches already in the queue, without blocking (a dead writer's half message
        raises EOFError, since the supervisor closed its own copy of the write end)."""
        out: list = []
        reader = self.queue._reader  # type: ignore[attr-defined]
        while len(out) < limit:
            try:
                if not reader.poll():
                    break
                out.append(self.queue.get_nowait())
            except Exception:  # Empty, EOFError, a truncated pickle from a killed worker
                break
        return out

    def waitables(self) -> list[Any]:
        out = [self.queue._reader]
        if not self._eof:
            out.append(self.conn)
        return out

    def close(self) -> None:
        for c in (self.conn, self.queue._reader):
            with contextlib.suppress(OSError):
                c.close()
        with contextlib.suppress(Exception):
            self.process.close()


def spawn_process(index: int, cfg: Any, interface: str, fanout: bool, count: int | None,
                  close_fds: list[int]) -> WorkerProc:
    import multiprocessing as mp

    from .worker import worker_process

    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    queue = ctx.Queue(maxsize=QUEUE_BATCHES)
    proc = ctx.Process(
        target=_child_entry,
        args=(worker_process, [*close_fds, parent.fileno()],
              (index, cfg, interface, fanout, child, queue), {"count": count}),
        name=f"streamtap-worker-{index}", daemon=False)
    proc.start()
    child.close()
    queue._writer.close()  # type: ignore[attr-defined]  # only the worker writes; a dead worker's queue then reads EOF
    return WorkerProc(proc, parent, queue, index)


# --------------------------------------------------------------------------- supervisor


class Slot:
    """One worker position (shard index): its current process and what survives its deaths."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: Any = None
        self.pid: int | None = None
        self.ready = False          # the current incarnation sent "ready"
        self.stopped = False        # sent "stopped" (asked to, or -c COUNT reached)
        self.done = False           # finished for good: never respawn
        self.started_at = 0.0
        self.last_heartbeat = 0.0
        self.last_progress: float | None = None
        self.failures = 0
        self.restart_at: float | None = None
        self.reload_pending = False
        self.base: dict[str, Any] = {}   # sum of dead incarnations' last stats
        self.stats: dict[str, Any] = {}  # the current incarnation's last stats

    @property
    def alive(self) -> bool:
        return self.proc is not None

    def totals(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        _add_counters(out, self.base)
        _add_counters(out, self.stats)
        return out


class Supervisor:
    """Run the live capture: ``Supervisor(cfg, args, sinks=…).run() -> exit code``."""

    heartbeat_timeout = 10.0   # seconds without a message from a child → SIGKILL
    backoff_reset = 60.0       # a worker up this long starts its failure count afresh
    status_interval = 5.0
    stats_interval = 1.0       # in-process worker: how often stats() is sampled
    reload_timeout = 5.0
    tick = 0.1

    def __init__(
        self,
        cfg: Any,
        args: Any = None,
        *,
        sinks: list | None = None,
        interface: str | None = None,
        notifier: Notifier | None = None,
        load_config: Callable[[Any], Any] | None = None,
        make_sinks: Callable[[Any], list] | None = None,
        spawn: Callable[..., Any] | None = None,
        make_worker: Callable[..., Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.args = args
        self.interface = interface or getattr(args, "interface", None) or cfg.capture.interface
        self.count = getattr(args, "count", None)
        n = cfg.capture.workers
        self.num_workers = n if n and n > 0 else (os.cpu_count() or 1)
        self.notifier = notifier or Notifier()
        self.clock = clock
        self._load_config = load_config
        self._make_sinks = make_sinks
        self._spawn = spawn or spawn_process
        self._make_worker = make_worker
        self.sinks: list = list(sinks or [])
        self.sink_errors: dict[int, int] = {}
        self.slots = [Slot(i) for i in range(self.num_workers)]
        self.inproc: Any = None
        self.sig_queue: list[str] = []
        self.pipe: tuple[int, int] | None = None
        self.worker_restarts = 0
        self.started = clock()
        self.started_wall = time.time()
        self.stopping_deadline: float | None = None
        self.exit_status = EXIT_OK
        self.ready_sent = False
        self.reloading_since: float | None = None
        self._ingest: deque[list] = deque()
        self._last_status = clock()
        self._last_watchdog = 0.0
        self._last_stats = 0.0
        self._rate_base: tuple[float, int, int] = (clock(), 0, 0)
        self.delivered = 0
        import threading

        self._lock = threading.Lock()

    # ------------------------------------------------------------------ signals (G1)

    def init_signals(self) -> None:
        if self.pipe is None:
            r, w = os.pipe()
            for fd in (r, w):
                os.set_blocking(fd, False)
                os.set_inheritable(fd, False)
            self.pipe = (r, w)
        for name in SIGNALS:
            sig = getattr(signal, "SIG" + name)
            signal.signal(sig, self.signal)
            # SA_RESTART: C calls (sd_notify, pcap, sink libraries) are not failed with EINTR;
            # the loop's wait still wakes at once, through the self-pipe byte
            signal.siginterrupt(sig, False)

    def reset_signals(self) -> None:
        for name in SIGNALS:
            with contextlib.suppress(ValueError, OSError):
                signal.signal(getattr(signal, "SIG" + name), signal.SIG_DFL)
        if self.pipe is not None:
            for fd in self.pipe:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.pipe = None

    def signal(self, sig: int, frame: Any = None) -> None:
        """The handler: enqueue and wake the loop; nothing else (no logging, no work)."""
        if len(self.sig_queue) < 5:
            self.sig_queue.append(signal.Signals(sig).name[3:])
        self.wakeup()

    def wakeup(self) -> None:
        if self.pipe is not None:
            with contextlib.suppress(OSError):
                os.write(self.pipe[1], b".")

    def dispatch_signals(self) -> None:
        while self.sig_queue:
            name = self.sig_queue.pop(0)
            handler = getattr(self, "handle_" + name.lower(), None)
            if handler is None:
                log.error("unhandled signal %s", name)
                continue
            handler()

    def handle_chld(self) -> None:
        """A child died: the reap that follows every pass deals with it."""

    def handle_term(self) -> None:
        self.stop("SIGTERM")

    def handle_int(self) -> None:
        self.stop("SIGINT")

    def handle_usr1(self) -> None:
        log.info("%s", self.stats_line())

    def handle_hup(self) -> None:
        if self.stopping_deadline is not None:
            return
        self.reload()

    # ------------------------------------------------------------------ run loop

    def run(self) -> int:
        """Start the workers, loop until stopped; flush and close the sinks; exit code."""
        self.init_signals()
        try:
            try:
                self.start_workers()
                while True:
                    self.wait(self.tick)
                    self.dispatch_signals()
                    self.run_pass()
                    if self.finished():
                        break
            except HaltServer as e:
                self.halt(e)
            except KeyboardInterrupt:  # a second ^C while stopping
                self.kill_all()
            except Exception:
                # a bug in the loop: never leave headless workers behind; say so, exit 1
                log.exception("unhandled exception in the supervisor loop")
                self.halt(HaltServer("supervisor failed, stopping", EXIT_RUNTIME))
            self.final_drain()
        finally:
            self.close_sinks()
            self.reset_signals()
        return self.exit_status

    def run_pass(self) -> None:
        self.poll_workers()
        self.drain()
        self.reap_workers()
        self.murder_workers()
        self.manage_workers()
        self.check_stop_deadline()
        self.check_reload()
        self.notify_systemd()

    def wait(self, timeout: float) -> None:
        """Block until a signal, a worker message or a batch arrives, or `timeout`."""
        if self.inproc is not None:
            if self.sig_queue or self.stopping_deadline is not None:
                return
            self.step_inproc(timeout)
            self._read_pipe(0)
            return
        from multiprocessing.connection import wait as mp_wait

        objs: list[Any] = []
        if self.pipe is not None:
            objs.append(self.pipe[0])
        for s in self.slots:
            if s.proc is not None:
                objs.extend(s.proc.waitables())
        if self.sig_queue or self._ingest:
            timeout = 0
        try:
            if objs:
                ready = mp_wait(objs, timeout)
            else:
                time.sleep(timeout)
                ready = []
        except (OSError, ValueError):
            ready = []
        if self.pipe is not None and self.pipe[0] in ready:
            self._read_pipe(0)

    def _read_pipe(self, timeout: float) -> None:
        if self.pipe is None:
            return
        try:
            if timeout:
                select.select([self.pipe[0]], [], [], timeout)
            while os.read(self.pipe[0], 4096):
                pass
        except (BlockingIOError, InterruptedError, OSError):
            pass

    def finished(self) -> bool:
        if self.inproc is not None:
            return self.slots[0].done
        return all(s.done for s in self.slots)

    # ------------------------------------------------------------------ workers

    @property
    def fanout_group(self) -> int:
        if self.cfg.capture.fanout_group is not None:
            return self.cfg.capture.fanout_group
        try:
            from .capture import fanout_group_id
        except ImportError:
            import zlib

            return zlib.crc32((self.interface or "").encode()) & 0xFFFF
        return fanout_group_id(self.interface or "")

    def start_workers(self) -> None:
        if self.num_workers == 1:
            self.start_inproc()
        else:
            for s in self.slots:
                self.spawn_worker(s)

    def start_inproc(self) -> None:
        if self._make_worker is None:
            from .worker import Worker

            self._make_worker = Worker
        s = self.slots[0]
        w = self._make_worker(0, self.cfg, interface=self.interface, fanout=False,
                              count=self.count)
        try:
            w.start()
        except Exception as e:
            code = getattr(e, "exit_code", None)
            if code in BOOT_ERRORS:
                raise HaltServer(str(getattr(e, "message", e)), code) from None
            raise
        self.inproc = w
        now = self.clock()
        s.proc, s.pid, s.ready, s.started_at, s.last_heartbeat = w, os.getpid(), True, now, now
        log.info("capturing on %s (1 worker, in-process)", self.interface)
        self.notifier.ready(self.ready_status())
        self.ready_sent = True

    def step_inproc(self, timeout: float) -> None:
        w, s = self.inproc, self.slots[0]
        if s.done:
            return
        self.deliver_streams(w.step(timeout))
        now = self.clock()
        s.last_heartbeat = now
        if now - self._last_stats >= self.stats_interval:
            self._last_stats = now
            self.update_stats(s, w.stats())
        if w.done and not s.done:
            self.finish_inproc("count reached")

    def finish_inproc(self, why: str) -> None:
        w, s = self.inproc, self.slots[0]
        self.deliver_streams(w.stop())
        self.update_stats(s, w.stats())
        s.done = s.stopped = True
        log.info("worker 0 stopped (%s)", why, extra={"STREAMTAP_WORKER": 0})

    def spawn_worker(self, s: Slot) -> None:
        close: list[int] = []
        if self.pipe is not None:
            close.extend(self.pipe)
        for other in self.slots:
            if other.proc is not None and hasattr(other.proc, "conn"):
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    close.append(other.proc.conn.fileno())
        for sink in self.sinks:  # nothing buffered may be written twice by a fork
            with contextlib.suppress(Exception):
                sink.flush()
        proc = self._spawn(s.index, self.cfg, self.interface, True, self.count, close)
        now = self.clock()
        s.proc, s.pid = proc, proc.pid
        s.ready = s.stopped = False
        s.started_at = s.last_heartbeat = now
        s.restart_at = None
        s.stats = {}
        log.debug("worker %d spawned, pid %d", s.index, proc.pid,
                  extra={"STREAMTAP_WORKER": s.index})

    def poll_workers(self) -> None:
        for s in self.slots:
            if s.proc is None or self.inproc is not None:
                continue
            for msg in s.proc.messages():
                s.last_heartbeat = self.clock()
                self.handle_message(s, msg)

    def handle_message(self, s: Slot, msg: tuple) -> None:
        kind = msg[0]
        extra = {"STREAMTAP_WORKER": s.index}
        if kind == "stats":
            self.update_stats(s, msg[1])
        elif kind == "ready":
            s.ready = True
            log.info("worker %d capturing on %s, pid %d", s.index, self.interface, msg[2]
                     if len(msg) > 2 else s.pid, extra=extra)
            if not self.ready_sent and all(x.ready for x in self.slots):
                self.ready_sent = True
                log.info("all %d workers capturing on %s", self.num_workers, self.interface)
                self.notifier.ready(self.ready_status())
        elif kind == "error":
            code, text = msg[1], msg[2]
            log.error("worker %d: %s", s.index, text, extra=extra)
            s.stats["_error"] = (code, text)
        elif kind == "stopped":
            s.stopped = True
        elif kind == "reloaded":
            s.reload_pending = False
            log.debug("worker %d reloaded", s.index, extra=extra)
        elif kind == "reload_failed":
            s.reload_pending = False
            log.error("worker %d kept its old settings: %s", s.index, msg[2], extra=extra)
        elif kind == "streams":  # tolerated on the pipe too
            self.deliver_streams(msg[2])
        else:
            log.warning("worker %d sent unknown message %r", s.index, kind, extra=extra)

    def update_stats(self, s: Slot, stats: dict[str, Any]) -> None:
        with self._lock:
            err = s.stats.get("_error")
            s.stats = dict(stats)
            if err:
                s.stats["_error"] = err
        lp = stats.get("last_progress")
        if lp is not None:
            s.last_progress = lp

    def drain(self, limit: int = MAX_BATCHES_PER_PASS) -> None:
        while self._ingest:
            self.deliver_streams(self._ingest.popleft())
        if self.inproc is not None:
            return
        for s in self.slots:
            if s.proc is not None:
                for msg in s.proc.batches(limit):
                    if msg and msg[0] == "streams":
                        self.deliver_streams(msg[2])

    def reap_workers(self) -> None:
        """Children that exited: fold their counters, then respawn, finish or halt (G3)."""
        if self.inproc is not None:
            return
        for s in self.slots:
            if s.proc is None:
                continue
            code = s.proc.exitcode()
            if code is None:
                continue
            # what it said and queued before dying still counts
            for msg in s.proc.messages():
                self.handle_message(s, msg)
            for msg in s.proc.batches(1 << 30):
                if msg and msg[0] == "streams":
                    self.deliver_streams(msg[2])
            self.worker_exited(s, code)

    def worker_exited(self, s: Slot, code: int) -> None:
        extra = {"STREAMTAP_WORKER": s.index}
        err = s.stats.pop("_error", None)
        with self._lock:
            _add_counters(s.base, s.stats)
            s.stats = {}
        with contextlib.suppress(Exception):
            s.proc.close()
        was_ready, stopped = s.ready, s.stopped
        s.proc, s.ready = None, False
        now = self.clock()
        if self.stopping_deadline is not None or (code == 0 and stopped):
            s.done = True
            log.debug("worker %d exited (%s)", s.index, code, extra=extra)
            if self.stopping_deadline is None and all(x.done or x.stopped for x in self.slots):
                log.info("every worker finished (count reached)")
            return
        if code in BOOT_ERRORS and (not was_ready or err is not None):
            msg = err[1] if err else f"worker {s.index} could not start (exit {code})"
            raise HaltServer(msg, code)
        if now - s.started_at >= self.backoff_reset:
            s.failures = 0
        s.failures += 1
        delay = backoff_delay(s.failures)
        s.restart_at = now + delay
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        log.error("worker %d (pid %s) died: %s; restart in %.0f s", s.index, s.pid, how, delay,
                  extra=extra)

    def murder_workers(self) -> None:
        """SIGKILL a worker that stopped sending heartbeats (G2); the reap restarts it."""
        if self.inproc is not None:
            return
        now = self.clock()
        for s in self.slots:
            if s.proc is None or s.proc.exitcode() is not None:
                continue
            if now - s.last_heartbeat > self.heartbeat_timeout:
                log.error("worker %d (pid %s) silent for %.0f s: killing it", s.index, s.pid,
                          now - s.last_heartbeat, extra={"STREAMTAP_WORKER": s.index})
                s.proc.kill()
                s.last_heartbeat = now  # one kill per timeout

    def manage_workers(self) -> None:
        if self.inproc is not None or self.stopping_deadline is not None:
            return
        now = self.clock()
        for s in self.slots:
            if s.proc is None and not s.done and s.restart_at is not None and now >= s.restart_at:
                self.worker_restarts += 1
                log.info("restarting worker %d (restart #%d)", s.index, self.worker_restarts,
                         extra={"STREAMTAP_WORKER": s.index})
                self.spawn_worker(s)

    # ------------------------------------------------------------------ stop

    def stop(self, why: str) -> None:
        if self.stopping_deadline is not None:
            return
        log.info("%s: stopping, flushing open streams", why)
        self.notifier.stopping()
        self.stopping_deadline = self.clock() + float(self.cfg.capture.shutdown_timeout)
        if self.inproc is not None:
            if not self.slots[0].done:
                self.finish_inproc(why)
            return
        for s in self.slots:
            if s.proc is not None:
                s.proc.send(("stop",))
            else:
                s.done = True

    def check_stop_deadline(self) -> None:
        if self.stopping_deadline is None or self.clock() < self.stopping_deadline:
            return
        left = [s for s in self.slots if s.proc is not None]
        if left:
            log.error("shutdown timeout: killing %d worker(s) still flushing",
                      len(left))
            self.kill_all()

    def kill_all(self) -> None:
        for s in self.slots:
            if s.proc is not None:
                s.proc.kill()
        end = time.monotonic() + 2.0
        while time.monotonic() < end and any(
                s.proc is not None and s.proc.exitcode() is None for s in self.slots):
            time.sleep(0.01)
        for s in self.slots:
            if s.proc is not None:
                code = s.proc.exitcode()
                self.stopping_deadline = self.stopping_deadline or self.clock()
                self.worker_exited(s, code if code is not None else -9)
                s.done = True

    def halt(self, e: HaltServer) -> None:
        """A boot error: stop the others cleanly and leave with its exit code."""
        log.error("%s", e.reason)
        self.exit_status = e.exit_status
        if self.stopping_deadline is None:
            self.stop("halt")
        deadline = self.stopping_deadline or self.clock()
        while not self.finished() and self.clock() < deadline:
            self.wait(self.tick)
            try:
                self.poll_workers()
                self.drain()
                self.reap_workers()
            except HaltServer:
                pass
        if not self.finished():
            self.kill_all()

    def final_drain(self) -> None:
        self.drain(1 << 30)

    def close_sinks(self) -> None:
        for sink in self.sinks:
            for op in ("flush", "close"):
                try:
                    getattr(sink, op)()
                except Exception as e:
                    log.error("sink %s: %s failed: %s", _sink_name(sink), op, e)

    # ------------------------------------------------------------------ sinks

    def deliver_streams(self, streams: list) -> None:
        if not streams:
            return
        self.delivered += len(streams)
        for i, sink in enumerate(self.sinks):
            try:
                sink.write(streams)
            except Exception as e:  # a broken sink never stops capture
                self.sink_errors[i] = self.sink_errors.get(i, 0) + len(streams)
                log.error("sink %s: write failed, %d record(s) lost: %s", _sink_name(sink),
                          len(streams), e)

    def deliver(self, streams: list) -> None:
        """For the control server's ingest (another thread): the loop writes them."""
        if streams:
            self._ingest.append(list(streams))
            self.wakeup()

    # ------------------------------------------------------------------ reload

    def reload(self) -> None:
        log.info("SIGHUP: reloading the configuration")
        try:
            if self._load_config is None:
                raise RuntimeError("no load_config was given")
            new = self._load_config(self.args)
        except Exception as e:
            log.error("reload failed, keeping the running configuration: %s", e)
            return
        self.notifier.reloading()
        try:
            sinks = self.build_sinks(new)
        except Exception as e:
            log.error("reload failed, keeping the running configuration and sinks: %s", e)
            self.notifier.ready()
            return
        old, self.sinks, self.sink_errors = self.sinks, sinks, {}
        for sink in old:
            for op in ("flush", "close"):
                try:
                    getattr(sink, op)()
                except Exception as e:
                    log.error("old sink %s: %s failed: %s", _sink_name(sink), op, e)
        if new.capture.interface not in (None, self.interface):
            log.warning("capture.interface changed to %s: takes a restart, not a reload",
                        new.capture.interface)
        self.cfg = new
        from . import logs

        logs.set_level(new, getattr(self.args, "verbose", 0), getattr(self.args, "quiet", False))
        if self.inproc is not None:
            try:
                self.inproc.reload(new)
            except Exception as e:
                log.error("worker 0 kept its old settings: %s", e)
            self.notifier.ready()
            log.info("configuration reloaded")
            return
        for s in self.slots:
            if s.proc is not None:
                s.reload_pending = s.proc.send(("reload", new))
        self.reloading_since = self.clock()
        self.check_reload()

    def check_reload(self) -> None:
        if self.reloading_since is None:
            return
        pending = [s for s in self.slots if s.proc is not None and s.reload_pending]
        if pending and self.clock() - self.reloading_since < self.reload_timeout:
            return
        for s in pending:
            s.reload_pending = False
            log.error("worker %d did not confirm the reload", s.index)
        self.reloading_since = None
        self.notifier.ready()
        log.info("configuration reloaded")

    def build_sinks(self, cfg: Any) -> list:
        if self._make_sinks is None:
            from streamtap.sinks.registry import build_sinks

            sinks: list = build_sinks(cfg, self.interface)
        else:
            sinks = self._make_sinks(cfg)
        opened = []
        try:
            for sink in sinks:
                sink.open()
                opened.append(sink)
        except Exception:
            for sink in opened:
                with contextlib.suppress(Exception):
                    sink.close()
            raise
        return sinks

    # ------------------------------------------------------------------ systemd

    def all_healthy(self) -> bool:
        """Every worker alive and heard from recently (the watchdog condition)."""
        if not self.ready_sent:
            return False
        now = self.clock()
        for s in self.slots:
            if s.done:
                continue
            if s.proc is None or not s.ready or now - s.last_heartbeat > self.heartbeat_timeout:
                return False
            if self.inproc is None and s.proc.exitcode() is not None:
                return False
        return True

    def notify_systemd(self) -> None:
        now = self.clock()
        n = self.notifier
        if (n.watchdog_interval and now - self._last_watchdog >= n.watchdog_interval
                and self.stopping_deadline is None and self.all_healthy()):
            self._last_watchdog = now
            n.watchdog()
        if now - self._last_status >= self.status_interval:
            self._last_status = now
            n.status(self.status_text(now))

    def ready_status(self) -> str:
        """The STATUS= sent with the first READY=1 (DESIGN "Pinned details"); rates follow
        every `status_interval`."""
        n = self.num_workers
        return f"capturing on {self.interface}, {n} worker{'s' if n != 1 else ''}"

    def status_text(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        t = self.totals()
        streams = sum(t.get("streams", {}).values())
        t0, p0, s0 = self._rate_base
        dt = max(now - t0, 1e-9)
        self._rate_base = (now, t.get("packets", 0), streams)
        drops = t.get("kernel_drops", 0) + t.get("interface_drops", 0)
        alive = sum(1 for s in self.slots if s.alive)
        return (f"{(t.get('packets', 0) - p0) / dt:.0f} packets/s, "
                f"{(streams - s0) / dt:.1f} streams/s, {drops} drops, "
                f"{alive}/{self.num_workers} workers")

    # ------------------------------------------------------------------ state

    def totals(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with self._lock:
            for s in self.slots:
                _add_counters(out, s.base)
                _add_counters(out, s.stats)
        return out

    def stats_line(self) -> str:
        t = self.totals()
        streams = t.get("streams", {})
        by = ", ".join(f"{k} {v}" for k, v in sorted(streams.items()))
        alive = sum(1 for s in self.slots if s.alive)
        return (f"stats: {t.get('packets', 0)} packets, {sum(streams.values())} streams"
                f"{' (' + by + ')' if by else ''}, {t.get('kernel_drops', 0)} kernel drops, "
                f"{t.get('interface_drops', 0)} interface drops, "
                f"{t.get('missed_bytes', 0)} bytes missed, "
                f"{sum(t.get('malformed', {}).values())} malformed, "
                f"{alive}/{self.num_workers} workers, {self.worker_restarts} restarts, "
                f"{self.delivered} records delivered")

    def state(self) -> dict[str, Any]:
        """The control server's GET /status (counters cumulative over worker deaths). Besides
        the keys named here, every counter the workers report is there, summed."""
        workers = []
        gauges: dict[str, Any] = {}
        with self._lock:
            for s in self.slots:
                tot = s.totals()
                _add_counters(gauges, s.stats, gauges=True)
                fa = int(s.stats.get("flows_active") or 0)
                workers.append({
                    "index": s.index, "pid": s.pid, "alive": s.alive,
                    "received": tot.get("received", 0), "kernel_drops": tot.get("kernel_drops", 0),
                    "interface_drops": tot.get("interface_drops", 0),
                    "packets": tot.get("packets", 0), "flows_active": fa,
                })
        t = self.totals()
        out = {
            "uptime": round(self.clock() - self.started, 3),
            "interface": self.interface,
            "workers": workers,
            "flows_active": gauges.pop("flows_active", 0),
            "streams": t.get("streams", {}),
            "malformed": t.get("malformed", {}),
            "missed_bytes": t.get("missed_bytes", 0),
            "packets": t.get("packets", 0),
            "received": t.get("received", 0),
            "kernel_drops": t.get("kernel_drops", 0),
            "interface_drops": t.get("interface_drops", 0),
            "gaps": t.get("gaps", 0),
            "worker_restarts": self.worker_restarts,
            "channel_dropped": t.get("channel_dropped", 0),
            "sinks": [self.sink_state(i, sink) for i, sink in enumerate(list(self.sinks))],
        }
        for k, v in (*t.items(), *gauges.items()):
            out.setdefault(k, v)
        return out

    def sink_state(self, i: int, sink: Any) -> dict[str, Any]:
        if callable(getattr(sink, "health", None)):
            with contextlib.suppress(Exception):
                h = dict(sink.health())
                h.setdefault("name", _sink_name(sink))
                h.setdefault("type", getattr(sink, "type", h["name"]))
                return h
        rec = getattr(sink, "records", 0)
        if isinstance(rec, dict):
            records = {k: rec.get(k, 0) for k in ("ok", "retried", "failed", "spooled",
                                                  "dropped")}
        else:
            records = {"ok": int(rec or 0), "retried": 0, "failed": self.sink_errors.get(i, 0),
                       "spooled": 0, "dropped": 0}
        return {
            "name": _sink_name(sink),
            "type": getattr(sink, "type", None) or getattr(sink, "name", type(sink).__name__),
            "healthy": bool(getattr(sink, "healthy", True)) and not self.sink_errors.get(i),
            "queue_depth": int(getattr(sink, "queue_depth", 0) or 0),
            "records": records,
        }


def _sink_name(sink: Any) -> str:
    name = getattr(sink, "name", None) or type(sink).__name__
    path = getattr(sink, "path", None)
    return f"{name}:{path}" if path and name in ("jsonl", "pcap") else str(name)
