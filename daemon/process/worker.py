"""One capture shard: a `LiveHandle` feeding a `Reassembler`, and the worker child process body.

`Worker` is the loop's state; `worker_process` runs it inside a child started by the supervisor
(from the forkserver, :mod:`streamtap.process.procs`), and
:class:`streamtap.process.procs.InprocWorker` runs it inside the supervisor when there is one
worker. `Worker.__init__` only stores its arguments (gunicorn G4): the handle and the reassembler
are created in `start()`, in the capturing process.

Protocol with the supervisor (G2, G3, N4), every message a :mod:`streamtap.process.messages` type:

- over `conn` (a `multiprocessing.Pipe` end) the worker sends `Ready` once the handle is open;
  `Failed(exit_code, message)` when it cannot open (the child then exits with that code: 1
  interface/permission, 2 bad BPF: don't respawn it, stop the daemon) or when a running capture
  fails (exit code 3, after flushing its open streams to `queue` and its `Eof`: the interface went
  down or was deleted; respawning with backoff may help, and a respawn that cannot open exits 1);
  `Stats` about every second, which is also the heartbeat; `Reloaded` / `ReloadFailed`;
  `Stopped` last. It receives `Stop` and `Reload(cfg)`. EOF on `conn` (the supervisor died) and
  SIGTERM act as `Stop`; SIGINT and SIGHUP are ignored (a Ctrl-C reaches the whole process
  group; the supervisor decides).
- over `queue` (a bounded `multiprocessing.Queue`): `Streams(index, [Stream, ...])` per tick
  with completions, and after the final streams `Eof(index)`: once the supervisor has it, every
  stream of that worker has arrived. Keep reading `queue` while joining a child.

Back-pressure choice: capture never blocks on the queue. The kernel ring keeps filling while we
wait, so blocking would turn a slow sink into kernel drops for *every* connection. Completed
streams go out with `put_nowait`; if the queue is full they wait in a pending list and are
retried every tick; past `PENDING_MAX` streams the oldest are dropped and counted in
`stats["channel_dropped"]` (F4: what happens at the cap is explicit and counted). Only the final
flush on stop uses a blocking put, bounded by `FINAL_PUT_TIMEOUT`.
"""

from __future__ import annotations

import os
import queue as queue_mod
import signal
import sys
import time
from typing import Any

from streamtap.config import Config
from streamtap.engine.api import Reassembler
from streamtap.engine.pcapfmt import META
from streamtap.engine.stream import Stream
from streamtap.process.capture import CaptureLost, CaptureOpenError, LiveHandle, fanout_group_id
from streamtap.process.messages import (
    Eof,
    Failed,
    Ready,
    Reload,
    Reloaded,
    ReloadFailed,
    Stats,
    Stop,
    Stopped,
    Streams,
    send,
)

BATCH = 4096  # packets per next_batch call
PENDING_MAX = 1000  # completed streams held while the queue is full; beyond: oldest dropped
STATS_EVERY = 1.0  # seconds between ("stats", ...) heartbeats
FINAL_PUT_TIMEOUT = 5.0  # seconds the final flush may wait for room in the queue
TICK = 0.1


class Worker:
    """One shard. Create pre-fork (stores arguments only), `start()` in the process that
    captures, then `step()` in a loop; `stop()` flushes every open stream."""

    def __init__(
        self, index: int, cfg: Config, *, interface: str, fanout: bool, count: int | None = None
    ) -> None:
        self.index = index
        self.cfg = cfg
        self.interface = interface
        self.fanout = fanout
        self.count = count
        self.done = False
        self.handle: LiveHandle | None = None
        self.reassembler: Reassembler | None = None
        self.last_ts = 0.0  # newest packet timestamp seen
        self.last_progress = 0.0
        self.channel_dropped = 0
        self._fed = 0
        self._final: tuple[int, int, int] = (0, 0, 0)

    def fanout_group(self) -> int | None:
        if not self.fanout:
            return None
        g = self.cfg.capture.fanout_group
        return fanout_group_id(self.interface) if g is None else g

    def start(self) -> None:
        """Open the handle (raises `CaptureOpenError`) and create the reassembler."""
        c = self.cfg.capture
        self.handle = LiveHandle(
            self.interface,
            snaplen=c.snaplen,
            buffer_size=c.buffer_size,
            promiscuous=c.promiscuous,
            bpf=c.filter or None,
            fanout_group=self.fanout_group(),
        )
        self.reassembler = Reassembler(self.cfg, interface=self.interface, summary=False)
        self.last_progress = time.monotonic()

    def step(self, timeout: float = TICK) -> list[Stream]:
        """Wait up to `timeout` for packets, drain them, advance the clock to
        max(newest packet, wall clock) so idle streams time out on an idle link, and return
        the streams completed meanwhile."""
        h, r = self.handle, self.reassembler
        assert h is not None and r is not None, "start() first"
        if self.done:
            return []
        if h.wait(timeout):
            feed = r.feed_batch
            lt = h.linktype
            for data, meta in h.drain(BATCH):
                if self.count is not None:
                    left = self.count - self._fed
                    if len(meta) >= 16 * left:
                        meta = meta[: 16 * left]
                        self.done = True
                if meta:
                    self._fed += feed(lt, data, meta)
                    sec, usec, _o, _c = META.unpack_from(meta, len(meta) - 16)
                    ts = sec + usec * 1e-6
                    if ts > self.last_ts:
                        self.last_ts = ts
                if self.done:
                    break
        r.advance(max(self.last_ts, time.time()))
        self.last_progress = time.monotonic()
        return r.completed()

    def stats(self) -> dict[str, Any]:
        r = self.reassembler
        recv, drop, ifdrop = self.handle.stats() if self.handle is not None else self._final
        # every engine counter, whatever its name: the supervisor sums them all generically
        out: dict[str, Any] = dict(r.stats) if r is not None else {}
        out.update({
            "index": self.index,
            "pid": os.getpid(),
            "interface": self.interface,
            "received": recv,
            "kernel_drops": drop,
            "interface_drops": ifdrop,
            "channel_dropped": self.channel_dropped,
            "last_progress": self.last_progress,
        })
        return out

    def reload(self, cfg: Config) -> None:
        """SIGHUP: new BPF filter, then the reassembly limits/timeouts in place; open streams
        are kept. A bad filter raises `CaptureOpenError(exit_code=2)` and changes nothing.
        Interface, snaplen, buffer size, promiscuous mode and worker count need a restart."""
        assert self.handle is not None and self.reassembler is not None, "start() first"
        self.handle.set_filter(cfg.capture.filter or None)
        self.reassembler.reconfigure(cfg)
        self.cfg = cfg

    def stop(self) -> list[Stream]:
        """Flush every open stream (close_reason "shutdown"), close the handle, return them."""
        out: list[Stream] = []
        if self.reassembler is not None:
            out = self.reassembler.flush()
        if self.handle is not None:
            try:
                self._final = self.handle.stats()
            except Exception:
                pass
            self.handle.close()
            self.handle = None
        return out


class _Flags:
    stop = False


def worker_process(
    index: int,
    cfg: Config,
    interface: str,
    fanout: bool,
    conn: Any,
    queue: Any,
    count: int | None = None,
) -> None:
    """Body of a worker child (see the module docstring for the protocol). Exits 0 after a
    stop, or with `CaptureOpenError.exit_code` if the handle cannot be opened."""
    flags = _Flags()

    def on_term(signum: int, frame: Any) -> None:  # G1: a handler only sets a flag
        flags.stop = True

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_term)

    w = Worker(index, cfg, interface=interface, fanout=fanout, count=count)
    try:
        w.start()
    except CaptureOpenError as exc:
        send(conn, Failed(exc.exit_code, exc.message))
        sys.exit(exc.exit_code)
    send(conn, Ready(index, os.getpid()))

    pending: list[Stream] = []
    next_stats = 0.0
    while True:
        try:
            pending.extend(w.step(TICK))
        except CaptureLost as exc:  # interface deleted/down: flush what we have, report, exit 3
            pending.extend(w.stop())
            _final_put(queue, index, pending, w)
            send(conn, Stats(w.stats()))
            send(conn, Failed(exc.exit_code, exc.message))
            sys.exit(exc.exit_code)
        if pending:
            try:
                queue.put_nowait(Streams(index, pending))
                pending = []
            except queue_mod.Full:
                if len(pending) > PENDING_MAX:
                    over = len(pending) - PENDING_MAX
                    w.channel_dropped += over
                    del pending[:over]
        now = time.monotonic()
        if now >= next_stats:
            next_stats = now + STATS_EVERY
            if not send(conn, Stats(w.stats())):
                flags.stop = True
        stop = flags.stop or w.done
        try:
            while not stop and conn.poll(0):
                msg = conn.recv()
                if isinstance(msg, Stop):
                    stop = True
                elif isinstance(msg, Reload):
                    send(conn, reload_worker(w, msg.cfg))
        except (EOFError, OSError):  # supervisor gone
            stop = True
        if stop:
            break

    pending.extend(w.stop())
    _final_put(queue, index, pending, w)
    send(conn, Stats(w.stats()))
    send(conn, Stopped(index))
    sys.exit(0)


def reload_worker(w: Worker, cfg: Config) -> Reloaded | ReloadFailed:
    """Apply a `Reload`; the answer to send back. A bad config must not kill capture."""
    try:
        w.reload(cfg)
    except CaptureOpenError as exc:
        return ReloadFailed(w.index, exc.message)
    except Exception as exc:
        return ReloadFailed(w.index, f"{type(exc).__name__}: {exc}")
    return Reloaded(w.index)


def _final_put(queue: Any, index: int, streams: list[Stream], w: Worker) -> None:
    deadline = time.monotonic() + FINAL_PUT_TIMEOUT
    items: list[Streams | Eof] = [Streams(index, streams)] if streams else []
    items.append(Eof(index))
    for item in items:
        try:
            queue.put(item, timeout=max(0.0, deadline - time.monotonic()))
        except queue_mod.Full:
            w.channel_dropped += len(item.streams) if isinstance(item, Streams) else 0
            # nobody is reading: don't let the queue's feeder thread hold the exit
            queue.cancel_join_thread()
            return
