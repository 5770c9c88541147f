"""The worker pool: N slots kept alive — spawn, read, reap, murder the silent, respawn (G2, G3).

Each pass of the supervisor's loop calls `poll`, `drain`, `reap`, `murder`, `manage`. Exit codes
mean something (G3): a worker exiting 1 or 2 before it was ready (a `CaptureOpenError`: missing
interface, permission, bad filter) raises :class:`HaltServer` with that code instead of
respawning forever; other deaths respawn with exponential backoff 1 s → 60 s.

A worker silent for `heartbeat_timeout` gets SIGABRT first (its faulthandler writes every
thread's stack to the log, so the hang can be diagnosed), then SIGKILL `abort_grace` seconds
later if it is still there (gunicorn's `murder_workers`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from streamtap.config import Config
from streamtap.engine.stream import Stream
from streamtap.errors import EXIT_RUNTIME, EXIT_USAGE
from streamtap.process.counters import Counters, WorkerView
from streamtap.process.messages import (
    Failed,
    Ready,
    Reloaded,
    ReloadFailed,
    Report,
    Stats,
    Stop,
    Stopped,
)
from streamtap.process.procs import Spawn, WorkerHandle, backoff_delay

log = logging.getLogger("streamtap.process.supervisor")

# exit codes of a worker that cannot start: stop the daemon
BOOT_ERRORS = (EXIT_RUNTIME, EXIT_USAGE)
MAX_BATCHES_PER_PASS = 256  # keep signals and heartbeats served under a flood of streams


class HaltServer(Exception):
    def __init__(self, reason: str, exit_status: int = EXIT_RUNTIME) -> None:
        super().__init__(reason)
        self.reason = reason
        self.exit_status = exit_status


class Slot:
    """One worker position (shard index): its current handle and what survives its deaths."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: WorkerHandle | None = None
        self.pid: int | None = None
        self.ready = False          # the current incarnation sent Ready
        self.stopped = False        # sent Stopped (asked to, or -c COUNT reached)
        self.done = False           # finished for good: never respawn
        self.error: Failed | None = None
        self.started_at = 0.0
        self.last_heartbeat = 0.0
        self.aborted_at: float | None = None  # SIGABRT sent, SIGKILL after the grace
        self.failures = 0
        self.restart_at: float | None = None
        self.reload_pending = False

    @property
    def alive(self) -> bool:
        return self.proc is not None


class Pool:
    heartbeat_timeout = 10.0   # seconds without a message from a worker → SIGABRT
    abort_grace = 2.0          # then SIGKILL if it has not died of the SIGABRT
    backoff_reset = 60.0       # a worker up this long starts its failure count afresh

    def __init__(self, n: int, spawn: Spawn, counters: Counters, *, interface: str,
                 count: int | None, deliver: Callable[[list[Stream]], None],
                 on_all_ready: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.slots = [Slot(i) for i in range(n)]
        self.interface = interface
        self.count = count  # -c COUNT: each worker stops by itself after COUNT packets
        self.spawn = spawn
        self.counters = counters
        self.deliver = deliver
        self.on_all_ready = on_all_ready
        self.clock = clock
        self.stopping = False
        self.all_ready = False

    def views(self) -> list[WorkerView]:
        return [WorkerView(s.index, s.pid, s.alive) for s in self.slots]

    def running(self) -> list[WorkerHandle]:
        return [s.proc for s in self.slots if s.proc is not None]

    def finished(self) -> bool:
        return all(s.done for s in self.slots)

    def start(self, cfg: Config) -> None:
        for s in self.slots:
            self.spawn_worker(s, cfg)

    def spawn_worker(self, s: Slot, cfg: Config) -> None:
        proc = self.spawn(s.index, cfg, self.interface, self.count)
        now = self.clock()
        s.proc, s.pid = proc, proc.pid
        s.ready = s.stopped = False
        s.started_at = s.last_heartbeat = now
        s.aborted_at = s.restart_at = None
        log.debug("worker %d spawned, pid %d", s.index, proc.pid,
                  extra={"STREAMTAP_WORKER": s.index})

    # ------------------------------------------------------------------ reading

    def poll(self) -> None:
        for s in self.slots:
            if s.proc is not None:
                for msg in s.proc.messages():
                    s.last_heartbeat = self.clock()
                    self.handle_report(s, msg)

    def handle_report(self, s: Slot, msg: Report) -> None:
        extra = {"STREAMTAP_WORKER": s.index}
        if isinstance(msg, Stats):
            self.counters.update(s.index, msg.stats)
        elif isinstance(msg, Ready):
            s.ready = True
            log.info("worker %d capturing on %s, pid %d", s.index, self.interface, msg.pid,
                     extra=extra)
        elif isinstance(msg, Failed):
            log.error("worker %d: %s", s.index, msg.message, extra=extra)
            s.error = msg
        elif isinstance(msg, Stopped):
            s.stopped = True
        elif isinstance(msg, Reloaded):
            s.reload_pending = False
            log.debug("worker %d reloaded", s.index, extra=extra)
        elif isinstance(msg, ReloadFailed):
            s.reload_pending = False
            log.error("worker %d kept its old settings: %s", s.index, msg.message, extra=extra)
        else:
            log.warning("worker %d sent unknown message %r", s.index, msg, extra=extra)
        if isinstance(msg, Ready) and not self.all_ready and all(x.ready for x in self.slots):
            self.all_ready = True
            self.on_all_ready()

    def drain(self, limit: int = MAX_BATCHES_PER_PASS) -> None:
        for s in self.slots:
            if s.proc is not None:
                for batch in s.proc.batches(limit):
                    self.deliver(batch)

    # ------------------------------------------------------------------ deaths (G3)

    def reap(self) -> None:
        """Workers that exited: fold their counters, then respawn, finish or halt (G3)."""
        for s in self.slots:
            if s.proc is None:
                continue
            code = s.proc.exitcode()
            if code is None:
                continue
            # what it said and queued before dying still counts
            for msg in s.proc.messages():
                self.handle_report(s, msg)
            for batch in s.proc.batches(1 << 30):
                self.deliver(batch)
            self.worker_exited(s, code)

    def worker_exited(self, s: Slot, code: int) -> None:
        extra = {"STREAMTAP_WORKER": s.index}
        proc = s.proc
        assert proc is not None
        err, s.error = s.error, None
        self.counters.fold(s.index)
        if code == 0 and s.stopped and not proc.eof:
            log.error("worker %d exited before its last streams arrived: they are lost",
                      s.index, extra=extra)
        proc.close()
        was_ready, stopped = s.ready, s.stopped
        s.proc, s.ready = None, False
        now = self.clock()
        if self.stopping or (code == 0 and stopped):
            s.done = True
            log.debug("worker %d exited (%s)", s.index, code, extra=extra)
            if not self.stopping and all(x.done or x.stopped for x in self.slots):
                log.info("every worker finished (count reached)")
            return
        if code in BOOT_ERRORS and (not was_ready or err is not None):
            raise HaltServer(err.message if err else
                             f"worker {s.index} could not start (exit {code})", code)
        if now - s.started_at >= self.backoff_reset:
            s.failures = 0
        s.failures += 1
        delay = backoff_delay(s.failures)
        s.restart_at = now + delay
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        log.error("worker %d (pid %s) died: %s; restart in %.0f s", s.index, s.pid, how, delay,
                  extra=extra)

    def murder(self) -> None:
        """SIGABRT a worker that stopped sending heartbeats (G2), SIGKILL it after the grace;
        the reap restarts it."""
        now = self.clock()
        for s in self.slots:
            if s.proc is None or s.proc.exitcode() is not None:
                continue
            extra = {"STREAMTAP_WORKER": s.index}
            if s.aborted_at is not None:
                if now - s.aborted_at >= self.abort_grace:
                    log.error("worker %d (pid %s) survived SIGABRT: killing it", s.index, s.pid,
                              extra=extra)
                    s.proc.kill()
                    s.aborted_at = None
                    s.last_heartbeat = now  # one kill per timeout
            elif now - s.last_heartbeat > self.heartbeat_timeout:
                log.error("worker %d (pid %s) silent for %.0f s: aborting it", s.index, s.pid,
                          now - s.last_heartbeat, extra=extra)
                s.proc.abort()
                s.aborted_at = now

    def manage(self, cfg: Config) -> None:
        """Respawn the dead whose backoff has passed."""
        if self.stopping:
            return
        now = self.clock()
        for s in self.slots:
            if s.proc is None and not s.done and s.restart_at is not None and now >= s.restart_at:
                self.counters.worker_restarts += 1
                log.info("restarting worker %d (restart #%d)", s.index,
                         self.counters.worker_restarts, extra={"STREAMTAP_WORKER": s.index})
                self.spawn_worker(s, cfg)

    # ------------------------------------------------------------------ stop

    def stop(self) -> None:
        self.stopping = True
        for s in self.slots:
            if s.proc is not None:
                s.proc.send(Stop())
            else:
                s.done = True

    def kill_all(self) -> None:
        for p in self.running():
            p.kill()
        end = time.monotonic() + 2.0
        while time.monotonic() < end and any(p.exitcode() is None for p in self.running()):
            time.sleep(0.01)
        self.stopping = True
        for s in self.slots:
            if s.proc is not None:
                code = s.proc.exitcode()
                self.worker_exited(s, code if code is not None else -9)
                s.done = True

    def healthy(self) -> bool:
        """Every worker alive and heard from recently (the watchdog condition)."""
        now = self.clock()
        for s in self.slots:
            if s.done:
                continue
            if (s.proc is None or not s.ready or s.proc.exitcode() is not None
                    or now - s.last_heartbeat > self.heartbeat_timeout):
                return False
        return True
