"""The live supervisor's loop: signals, sinks, reload, stop and systemd around a worker pool.

Modelled on gunicorn's arbiter (STYLE G1–G4). Signal handlers only enqueue the signal and write
one byte to a self-pipe (G1). The run loop waits ~0.1 s on (self-pipe, worker pipes, stream
queues, worker sentinels), dispatches ``handle_<sig>``, then every pass: reads the workers'
reports, drains their streams to the sinks, reaps the dead, murders the silent, respawns
(:mod:`streamtap.process.pool`), and speaks to systemd (G4: a no-op off systemd).

Where things are: :mod:`streamtap.process.procs` starts and kills workers (forked from the
forkserver, or in-process when there is one), :mod:`streamtap.process.messages` is what they
say, :mod:`streamtap.process.pool` keeps N of them alive, :mod:`streamtap.process.counters`
sums their counters.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from multiprocessing.connection import wait as mp_wait
from typing import Any

from streamtap.config import Config
from streamtap.engine.stream import Stream
from streamtap.process import logs
from streamtap.process.counters import Counters, sink_label
from streamtap.process.messages import Reload
from streamtap.process.notify import Notifier
from streamtap.process.pool import HaltServer, Pool, Slot
from streamtap.process.procs import InprocWorker, Spawn, spawn_process

log = logging.getLogger("streamtap.process.supervisor")

SIGNALS = ("HUP", "INT", "TERM", "USR1", "CHLD")

__all__ = ["HaltServer", "Supervisor", "worker_count"]


# Batches held for a reloaded sink while its predecessor of the same name closes: beyond this
# many records, the newest are counted as failed for that sink (the close is bounded by the
# runner's stop timeout, so this is a few seconds of traffic).
HOLD_MAX_RECORDS = 50_000


class _Held:
    """A new sink (not yet open) waiting for the old sink of its name to close."""

    __slots__ = ("sink", "closer", "batches", "records", "dropped")

    def __init__(self, sink: Any, closer: threading.Thread) -> None:
        self.sink = sink
        self.closer = closer
        self.batches: deque[list[Stream]] = deque()
        self.records = 0
        self.dropped = 0


def _sink_name(sink: Any) -> str | None:
    name = getattr(sink, "name", None)
    return name if isinstance(name, str) else None


def worker_count(cfg: Config) -> int:
    """capture.workers; 0 or unset means one per CPU."""
    n = cfg.capture.workers
    return n if n and n > 0 else (os.cpu_count() or 1)


class Supervisor:
    """Run the live capture: ``Supervisor(cfg, sinks=…).run() -> exit code``."""

    status_interval = 5.0
    reload_timeout = 5.0
    tick = 0.1

    def __init__(
        self,
        cfg: Config,
        *,
        sinks: list | None = None,
        interface: str | None = None,
        count: int | None = None,
        verbose: int = 0,
        quiet: bool = False,
        notifier: Notifier | None = None,
        load_config: Callable[[], Config] | None = None,
        make_sinks: Callable[[Config], list] | None = None,
        spawn: Spawn | None = None,
        make_worker: Callable[..., Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.interface: str = interface or cfg.capture.interface or ""
        self.verbose, self.quiet = verbose, quiet
        self.num_workers = worker_count(cfg)
        self.notifier = notifier or Notifier()
        self.clock = clock
        self._load_config = load_config
        self._make_sinks = make_sinks
        if spawn is None:
            spawn = spawn_process if self.num_workers > 1 else (
                partial(InprocWorker.spawn, make_worker=make_worker) if make_worker
                else InprocWorker.spawn)
        self.sinks: list = list(sinks or [])
        self.counters = Counters(self.num_workers, clock)
        self.pool = Pool(self.num_workers, spawn, self.counters, interface=self.interface,
                         count=count, deliver=self.deliver_streams,
                         on_all_ready=self.all_ready, clock=clock)
        self.slots: list[Slot] = self.pool.slots
        self.sig_queue: list[str] = []
        self.pipe: tuple[int, int] | None = None
        self.stopping_deadline: float | None = None
        self.exit_status = 0
        self.ready_sent = False
        self.reloading_since: float | None = None
        self._ingest: deque[list[Stream]] = deque()
        # SIGHUP closes the old sinks on closer threads (a sink stuck in a slow request must
        # not hold the loop); a new sink of the same name opens only once its predecessor
        # closed (they share a spool directory, a file), its records held here meanwhile
        self._closers: dict[str, threading.Thread] = {}
        self._anon_closers: list[threading.Thread] = []
        self._held: dict[int, _Held] = {}
        self._reload_deferred = False
        self._last_status = clock()
        self._last_watchdog = 0.0

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
        log.info("%s", self.counters.stats_line(self.pool.views()))

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
                self.pool.kill_all()
            except Exception:
                # a bug in the loop: never leave headless workers behind; say so, exit 1
                log.exception("unhandled exception in the supervisor loop")
                self.halt(HaltServer("supervisor failed, stopping", 1))
            self.pool.drain(1 << 30)
        finally:
            self.finish_handovers()
            self.close_sinks(self.sinks, "sink")
            self.reset_signals()
        return self.exit_status

    def start_workers(self) -> None:
        self.pool.start(self.cfg)

    def run_pass(self) -> None:
        p = self.pool
        p.poll()
        self.drain()
        p.reap()
        p.murder()
        p.manage(self.cfg)
        self.check_stop_deadline()
        self.check_handovers()
        self.check_reload()
        self.notify_systemd()

    def wait(self, timeout: float) -> None:
        """Block until a signal, a worker message or a batch arrives, or `timeout`. An
        in-process worker captures during the wait instead."""
        if self.sig_queue or self._ingest:
            timeout = 0
        running = self.pool.running()
        inline = [p for p in running if p.inline]
        if inline:
            if not self.sig_queue and self.stopping_deadline is None:
                inline[0].step(timeout)
            self._read_pipe()
            return
        objs: list[Any] = [self.pipe[0]] if self.pipe is not None else []
        for p in running:
            objs.extend(p.waitables())
        ready: list[Any] = []
        with contextlib.suppress(OSError, ValueError):
            ready = mp_wait(objs, timeout)
        if self.pipe is not None and self.pipe[0] in ready:
            self._read_pipe()

    def _read_pipe(self) -> None:
        if self.pipe is None:
            return
        with contextlib.suppress(BlockingIOError, InterruptedError, OSError):
            while os.read(self.pipe[0], 4096):
                pass

    def finished(self) -> bool:
        return self.pool.finished()

    def all_ready(self) -> None:
        if self.ready_sent:
            return
        self.ready_sent = True
        n = self.num_workers
        log.info("%d worker%s capturing on %s", n, "s" if n != 1 else "", self.interface)
        self.notifier.ready(self.ready_status())

    # ------------------------------------------------------------------ stop

    def stop(self, why: str) -> None:
        if self.stopping_deadline is not None:
            return
        log.info("%s: stopping, flushing open streams", why)
        self.notifier.stopping()
        self.stopping_deadline = self.clock() + float(self.cfg.capture.shutdown_timeout)
        self.pool.stop()

    def check_stop_deadline(self) -> None:
        if self.stopping_deadline is None or self.clock() < self.stopping_deadline:
            return
        left = self.pool.running()
        if left:
            log.error("shutdown timeout: killing %d worker(s) still flushing", len(left))
            self.pool.kill_all()

    def halt(self, e: HaltServer) -> None:
        """A boot error: stop the others cleanly and leave with its exit code."""
        log.error("%s", e.reason)
        self.exit_status = e.exit_status
        self.stop("halt")
        deadline = self.stopping_deadline or self.clock()
        while not self.finished() and self.clock() < deadline:
            self.wait(self.tick)
            with contextlib.suppress(HaltServer):
                self.pool.poll()
                self.drain()
                self.pool.reap()
        if not self.finished():
            self.pool.kill_all()

    # ------------------------------------------------------------------ sinks

    def drain(self) -> None:
        while self._ingest:
            self.deliver_streams(self._ingest.popleft())
        self.pool.drain()

    def deliver_streams(self, streams: list[Stream]) -> None:
        if not streams:
            return
        self.counters.delivered += len(streams)
        held = self._held
        for i, sink in enumerate(self.sinks):
            h = held.get(id(sink)) if held else None
            if h is not None:
                self._hold(i, h, streams)
                continue
            try:
                sink.write(streams)
            except Exception as e:  # a broken sink never stops capture
                self.counters.sink_failed(i, len(streams))
                log.error("sink %s: write failed, %d record(s) lost: %s", sink_label(sink),
                          len(streams), e)

    def deliver(self, streams: list[Stream]) -> None:
        """For the control server's ingest (another thread): the loop writes them."""
        if streams:
            self._ingest.append(list(streams))
            self.wakeup()

    def _hold(self, i: int, h: _Held, streams: list[Stream]) -> None:
        n = len(streams)
        if h.records + n > HOLD_MAX_RECORDS:
            if not h.dropped:
                log.error("sink %s: %d records held while its predecessor closes; counting "
                          "the newer ones as failed", sink_label(h.sink), h.records)
            h.dropped += n
            self.counters.sink_failed(i, n)
            return
        h.batches.append(streams)
        h.records += n

    def check_handovers(self) -> None:
        """Open the new sinks whose predecessor has closed, and give them what was held."""
        if self._anon_closers:
            self._anon_closers = [t for t in self._anon_closers if t.is_alive()]
        for name in [n for n, t in self._closers.items() if not t.is_alive()]:
            del self._closers[name]
        if not self._held:
            if self._reload_deferred and self.stopping_deadline is None:
                self._reload_deferred = False
                self.reload()
            return
        for key, h in list(self._held.items()):
            if h.closer.is_alive():
                continue
            del self._held[key]
            self._release(h)

    def _release(self, h: _Held) -> None:
        i = next((k for k, s in enumerate(self.sinks) if s is h.sink), -1)
        try:
            h.sink.open()
        except Exception as e:
            log.error("sink %s: open failed after reload, %d record(s) lost: %s",
                      sink_label(h.sink), h.records, e)
            if i >= 0:
                self.counters.sink_failed(i, h.records)
            return
        while h.batches:
            batch = h.batches.popleft()
            try:
                h.sink.write(batch)
            except Exception as e:
                if i >= 0:
                    self.counters.sink_failed(i, len(batch))
                log.error("sink %s: write failed, %d record(s) lost: %s", sink_label(h.sink),
                          len(batch), e)

    def finish_handovers(self) -> None:
        """At exit: wait for the old sinks to close, then hand the new ones what was held
        (their own close follows)."""
        for t in [*self._closers.values(), *self._anon_closers]:
            t.join()
        self._closers.clear()
        self._anon_closers.clear()
        held, self._held = self._held, {}
        for h in held.values():
            self._release(h)

    def _close_later(self, sink: Any) -> threading.Thread:
        """Flush and close `sink` on a closer thread (the loop goes on draining)."""
        t = threading.Thread(target=self.close_sinks, args=([sink], "old sink"),
                             name=f"close-{sink_label(sink)}", daemon=True)
        name = _sink_name(sink)
        prev = self._closers.get(name) if name is not None else None
        if prev is not None:
            # a sink of this name is still closing from an earlier reload: after it
            def chained(prev: threading.Thread = prev) -> None:
                prev.join()
                self.close_sinks([sink], "old sink")

            t = threading.Thread(target=chained, name=t.name, daemon=True)
        if name is not None:
            self._closers[name] = t
        else:
            self._anon_closers.append(t)
        t.start()
        return t

    @staticmethod
    def close_sinks(sinks: list, what: str) -> None:
        for sink in sinks:
            for op in ("flush", "close"):
                try:
                    getattr(sink, op)()
                except Exception as e:
                    log.error("%s %s: %s failed: %s", what, sink_label(sink), op, e)

    # ------------------------------------------------------------------ reload

    def reload(self) -> None:
        if self._held:
            # the previous reload's sinks are still waiting for their predecessors: this
            # one follows as soon as they are open (the wait is bounded by a sink's stop)
            self._reload_deferred = True
            return
        log.info("SIGHUP: reloading the configuration")
        if self._load_config is None or self._make_sinks is None:
            log.error("reload failed: this supervisor cannot load a configuration")
            return
        try:
            new = self._load_config()
        except Exception as e:
            log.error("reload failed, keeping the running configuration: %s", e)
            return
        self.notifier.reloading()
        hold = self._closing_names(self.sinks)
        try:
            sinks = self.build_sinks(new, hold=hold)
        except Exception as e:
            log.error("reload failed, keeping the running configuration and sinks: %s", e)
            self.notifier.ready()
            return
        old, self.sinks = self.sinks, sinks
        self.counters.sink_errors = {}
        for sink in old:
            self._close_later(sink)
        for sink in sinks:
            name = _sink_name(sink)
            if name in hold:
                self._held[id(sink)] = _Held(sink, self._closers[name])
        if new.capture.interface not in (None, self.interface):
            log.warning("capture.interface changed to %s: takes a restart, not a reload",
                        new.capture.interface)
        self.cfg = new
        logs.set_level(new, self.verbose, self.quiet)
        for s in self.slots:
            if s.proc is not None:
                s.reload_pending = s.proc.send(Reload(new))
        self.reloading_since = self.clock()
        self.pool.poll()  # an in-process worker has already answered
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

    def _closing_names(self, old: list) -> set[str]:
        """Names a new sink must wait for: the running sinks' and those still closing."""
        names = {n for n in map(_sink_name, old) if n is not None}
        names.update(n for n, t in self._closers.items() if t.is_alive())
        return names

    def build_sinks(self, cfg: Config, hold: set[str] | frozenset[str] = frozenset()) -> list:
        """Build and open the sinks of `cfg`, except those named in `hold`: they open when
        their predecessor has closed (`check_handovers`)."""
        if self._make_sinks is None:
            from streamtap.sinks.registry import build_sinks

            sinks: list = build_sinks(cfg, self.interface)
        else:
            sinks = self._make_sinks(cfg)
        opened = []
        try:
            for sink in sinks:
                if _sink_name(sink) in hold:
                    continue
                sink.open()
                opened.append(sink)
        except Exception:
            for sink in opened:
                with contextlib.suppress(Exception):
                    sink.close()
            raise
        return sinks

    # ------------------------------------------------------------------ systemd and state

    def notify_systemd(self) -> None:
        now = self.clock()
        n = self.notifier
        if (n.watchdog_interval and now - self._last_watchdog >= n.watchdog_interval
                and self.stopping_deadline is None and self.ready_sent and self.pool.healthy()):
            self._last_watchdog = now
            n.watchdog()
        if now - self._last_status >= self.status_interval:
            self._last_status = now
            n.status(self.counters.status_text(self.pool.views(), now))

    def ready_status(self) -> str:
        """The STATUS= sent with the first READY=1 (DESIGN "Pinned details"); rates follow
        every `status_interval`."""
        n = self.num_workers
        return f"capturing on {self.interface}, {n} worker{'s' if n != 1 else ''}"

    def state(self) -> dict[str, Any]:
        """The control server's GET /status."""
        return self.counters.state(self.pool.views(), self.interface, list(self.sinks))
