"""The sink runner: one thread and one bounded queue per sink (DESIGN "Sinks"; STYLE F2-F4, N4).

`SinkRunner.submit` is called on the capture path and never waits for the sink. Records queue in
memory (at most `queue_max`); a thread takes them in batches (`batch_records`, `batch_bytes` of
payload, or `batch_age` seconds after the oldest arrived, whichever comes first) and calls the
sink's `write`. The runner owns retries (F3): a `retry` result backs off with capped exponential
full jitter (`backoff_full_jitter`) and writes the same batch again; `fatal` counts the batch as
failed, logs why, and moves on. The sink is opened lazily; an OSError from `open` is a retry.

Disk spool (F4). When the queue is full, the queue (and the batch the thread holds, if it came
from the queue) is moved to the spool, oldest first, followed by the new records; from then on,
while the spool holds anything, new records are appended to the spool too, and the thread
delivers the spool (oldest first) before taking from the queue again. The spool is written by a
second thread of the runner (the spool writer), never on the caller's thread: `submit` only
moves records to an in-memory hand-off list (at most `handoff_max` records, by default
`queue_max` but at least 1,000; past that the newest are dropped and counted), so neither a
stuck sink nor a slow or full disk delays the capture path. So records reach the sink in
submission order, whether they went through the spool or not. A spool left by a previous run
(same `spool_dir`) is replayed at start, before anything submitted now. Without `spool_dir`,
records that do not fit the queue are dropped (the newest) and counted. At the spool's size cap
the OLDEST spooled records are dropped and counted (`Spool`).

Delivery guarantees: in order, and at-least-once for every record that reached the spool: the
spool cursor is committed after each delivered batch, so a crash re-delivers at most the batch
being written (a few with a stuck sink at `stop`, see below). Records still in memory (queue,
the batch in hand, the hand-off list) are lost if the process dies without `stop`. Sinks are
expected to be idempotent on replays (CouchDB: deterministic `_id`, a 409 means "already stored").

`stop(timeout)` delivers what it can until the deadline, then spools what is left (or drops and
counts it without a spool), then calls the sink's `flush` and `close` from the runner thread. If
the thread is stuck inside the sink past the deadline, `stop` spools the queue and the batch in
hand itself (that batch may then be delivered twice) and leaves the sink unclosed.

Failures are logged once per episode (STYLE S3: a counter per event, not a log line): the first
failed attempt, any later one whose error differs, and the attempt that works again. Every
failed attempt on a full file system (ENOSPC, EDQUOT: the sink's or the spool's) counts in
`enospc` (`/status` sinks[].enospc, metric `streamtap_sink_enospc_total`).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from streamtap.engine.stream import Stream

from .base import FATAL, OK, RETRY, Result, Sink, SinkError, describe_error
from .codec import decode, encode
from .spool import DISK_FULL, Spool, Token

__all__ = ["SinkRunner", "backoff_full_jitter"]

log = logging.getLogger("streamtap.sinks")

# How long `stop` waits past its timeout for the thread to spool the rest and close the sink.
STOP_GRACE = 1.0
# Spool segments: 1/16 of the cap (so a full disk or the cap drops a sixteenth at a time), at
# least 64 KiB, at most 16 MiB.
SEGMENT_MIN, SEGMENT_MAX = 64 << 10, 16 << 20


def backoff_full_jitter(base: float, cap: float, attempt: int, rng: random.Random) -> float:
    """Delay before retry number `attempt` (0 for the first): uniform in
    [0, min(cap, base * 2**attempt)] ("full jitter", capped exponential backoff)."""
    ceiling = min(cap, base * 2.0 ** min(attempt, 64))
    return rng.uniform(0.0, ceiling)


def _payload_len(s: Stream) -> int:
    n = len(s.client_data) + len(s.server_data)
    if s.packets:
        n += sum(len(p[2]) for p in s.packets)
    return n


class _Batch:
    """A batch in the thread's hands: where it came from and how to mark it delivered."""

    __slots__ = ("streams", "token", "from_queue", "spooling")

    def __init__(self, streams: list[Stream], token: Token | None, from_queue: bool) -> None:
        self.streams = streams
        self.token = token  # spool position after the batch, once it is in the spool
        self.from_queue = from_queue
        self.spooling = False  # handed to the spool writer: it sets `token` once written


class SinkRunner:
    """Runs one sink on its own thread; see the module docstring."""

    def __init__(
        self,
        sink: Sink,
        *,
        spool_dir: str | None,
        queue_max: int = 10_000,
        batch_records: int = 500,
        batch_bytes: int = 4 << 20,
        batch_age: float = 2.0,
        backoff_base: float = 0.5,
        backoff_cap: float = 60.0,
        spool_max_bytes: int = 1 << 30,
        handoff_max: int | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        if queue_max < 1 or batch_records < 1 or batch_bytes < 1:
            raise ValueError("queue_max, batch_records and batch_bytes must be >= 1")
        if batch_age < 0 or backoff_base < 0 or backoff_cap < 0:
            raise ValueError("batch_age, backoff_base and backoff_cap must be >= 0")
        self.sink = sink
        self.queue_max = queue_max
        self.handoff_max = handoff_max if handoff_max is not None else max(queue_max, 1000)
        self.batch_records = batch_records
        self.batch_bytes = batch_bytes
        self.batch_age = batch_age
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._sleep_fn = sleep
        # The spool directory is claimed at `start` (or `stop`), not here: a daemon reloading
        # builds the new runner while the old one of the same name may still write there.
        self._spool_dir = spool_dir or None
        self._spool_max = spool_max_bytes
        self._spool: Spool | None = None
        self._cond = threading.Condition()
        self._queue: deque[tuple[Stream, int, float]] = deque()
        self._queue_bytes = 0
        # True while the spool holds undelivered records: new records go there too.
        self._spooling = False
        # records on their way to the spool (the spool writer's hand-off list), oldest first;
        # the batch in hand to spool first (set at the spill); records being written now
        self._overflow: deque[Stream] = deque()
        self._spill_batch: _Batch | None = None
        self._spool_busy = 0
        self._spool_gen = 0  # write passes of the spool writer
        self._spooler: threading.Thread | None = None
        self._spooler_stop = False
        self._inflight: _Batch | None = None
        self._in_sink = False
        self._opened = False
        self._stopping = False
        self._deadline: float | None = None  # time.monotonic() at which stop gives up
        self._closed = False  # no more deliveries; submit spools or drops
        self._abandoned = False  # stop took over from a thread stuck in the sink
        self._spool_closed = False
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.healthy = True
        self.last_error: str | None = None
        self.counts = {"ok": 0, "retried": 0, "failed": 0, "spooled": 0, "dropped": 0}
        self.backoffs: list[float] = []  # the most recent delays, for tests and /status
        self.decode_errors = 0
        self.enospc = 0  # failed sink attempts on a full file system (the spool counts its own)
        self._episode: tuple[float, int, str | None] | None = None  # (since, attempts, logged)

    # -- capture side -------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("runner already started")
        name = getattr(self.sink, "name", "sink")
        self._open_spool()
        if self._spool is not None:
            self._spooler = threading.Thread(target=self._spool_loop, name=f"spool-{name}",
                                             daemon=True)
            self._spooler.start()
        self._thread = threading.Thread(target=self._run, name=f"sink-{name}", daemon=True)
        self._thread.start()

    def _open_spool(self) -> None:
        if self._spool_dir is None or self._spool is not None:
            return
        segment = min(SEGMENT_MAX, max(SEGMENT_MIN, self._spool_max // 16))
        spool = Spool(self._spool_dir, max_bytes=self._spool_max, segment_bytes=segment)
        with self._cond:
            self._spool = spool
            # a spool left by a previous run is delivered first, and what was submitted
            # before `start` goes after it, in order
            if not self._spooling and not spool.is_empty():
                self._spooling = True
                self._overflow.extend(s for s, _, _ in self._queue)
                self._queue.clear()
                self._queue_bytes = 0

    def submit(self, streams: list[Stream]) -> None:
        """Hand completed streams to the sink. Never waits for the sink."""
        if not streams:
            return
        now = self._clock()
        with self._cond:
            if self._closed:
                # after stop (shutdown): the spool writer is gone, write here
                self._to_spool_locked(streams)
                return
            if self._spooling:
                self._hand_off_locked(streams)
                return
            if len(self._queue) + len(streams) <= self.queue_max:
                q = self._queue
                for s in streams:
                    n = _payload_len(s)
                    q.append((s, n, now))
                    self._queue_bytes += n
                self._cond.notify_all()
                return
            if self._spool_dir is None:
                self.counts["dropped"] += len(streams)
                return
            # Queue full: everything older goes to the spool first, to keep the order: the
            # batch in hand (unless delivered meanwhile), the queue, then the new records.
            self._spooling = True
            b = self._inflight
            if b is not None and b.from_queue and b.token is None:
                b.spooling = True
                self._spill_batch = b
            self._overflow.extend(s for s, _, _ in self._queue)
            self._queue.clear()
            self._queue_bytes = 0
            self._overflow.extend(streams)
            self._cond.notify_all()

    def _hand_off_locked(self, streams: list[Stream]) -> None:
        room = self.handoff_max - len(self._overflow)
        if room < len(streams):  # the spool writer is behind (a slow disk): drop the newest
            self.counts["dropped"] += len(streams) - max(0, room)
            streams = streams[:max(0, room)]
        self._overflow.extend(streams)
        self._cond.notify_all()

    # -- spool writer thread ------------------------------------------------------------------

    def _spool_loop(self) -> None:
        spool = self._spool
        assert spool is not None
        cond = self._cond
        try:
            while True:
                with cond:
                    while (not self._overflow and self._spill_batch is None
                           and not self._spooler_stop):
                        cond.wait()
                    b, self._spill_batch = self._spill_batch, None
                    if b is not None and b is not self._inflight:
                        b = None  # stop spooled or dropped it meanwhile
                    items = list(self._overflow)
                    self._overflow.clear()
                    if b is None and not items:
                        return  # stopping, nothing left
                    self._spool_busy = len(items) + (len(b.streams) if b is not None else 0)
                if b is not None:
                    n = self._append_all(b.streams)
                    tok = spool.end_token()
                    with cond:
                        self.counts["spooled"] += n
                        self._spool_gen += 1
                        b.token = tok
                        cond.notify_all()
                n = self._append_all(items)
                with cond:
                    self.counts["spooled"] += n
                    self._spool_busy = 0
                    self._spool_gen += 1
                    cond.notify_all()
        except Exception:
            log.exception("sink %s: spool writer failed", getattr(self.sink, "name", "?"))
            with cond:
                self._spool_busy = 0
                cond.notify_all()

    def _append_all(self, streams: Iterable[Stream]) -> int:
        """Append to the spool; the number appended (the spool counts what it drops)."""
        spool = self._spool
        assert spool is not None
        n = 0
        for s in streams:
            try:
                if spool.append(encode(s)):
                    n += 1
            except ValueError:  # closed under us (stop gave up): counted as dropped
                with self._cond:
                    self.counts["dropped"] += 1
        return n

    def _spool_idle_locked(self) -> bool:
        """Nothing on its way to the spool."""
        return not self._overflow and not self._spool_busy and self._spill_batch is None

    # -- spool helpers (caller holds self._cond) ----------------------------------------------

    def _to_spool_locked(self, streams: Iterable[Stream]) -> None:
        spool = self._spool
        if spool is None or self._spool_closed:
            self.counts["dropped"] += sum(1 for _ in streams)
            return
        n = 0
        for s in streams:
            if spool.append(encode(s)):
                n += 1
        self.counts["spooled"] += n
        self._spooling = True

    def _spill_locked(self) -> None:
        """At the end: move the batch in hand (if from the queue and not yet spooled), the queue
        and what the spool writer did not take to the spool, in that order. A batch in hand
        from the queue is older than the rest (the spool writer had none: see `submit`)."""
        b = self._inflight
        if b is not None and b.from_queue and b.token is None and not b.spooling:
            self._to_spool_locked(b.streams)
            if self._spool is not None:
                b.token = self._spool.end_token()
        if self._queue:
            self._to_spool_locked(s for s, _, _ in self._queue)
            self._queue.clear()
            self._queue_bytes = 0
        if self._overflow:
            self._to_spool_locked(list(self._overflow))
            self._overflow.clear()

    # -- runner thread ------------------------------------------------------------------------

    def _gave_up(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _sleep(self, delay: float) -> None:
        if self._sleep_fn is not None:
            self._sleep_fn(delay)
            return
        end = time.monotonic() + delay
        while True:
            now = time.monotonic()
            left = end - now
            if self._deadline is not None:
                left = min(left, self._deadline - now)
            if left <= 0:
                return
            self._wake.wait(left)
            self._wake.clear()

    def _next_batch(self) -> _Batch | None:
        """Wait for the next batch: from the spool while it holds anything, else the queue.
        None when stopping and nothing is left (or the deadline passed)."""
        with self._cond:
            while True:
                if self._gave_up():
                    return None
                if self._spooling:
                    break
                if self._queue:
                    if self._stopping:
                        return self._take_locked()
                    if (len(self._queue) >= self.batch_records
                            or self._queue_bytes >= self.batch_bytes):
                        return self._take_locked()
                    wait = self.batch_age - (self._clock() - self._queue[0][2])
                    if wait <= 0:
                        return self._take_locked()
                    self._cond.wait(wait)
                    continue
                if self._stopping:
                    return None
                self._cond.wait()
        return self._read_spool()

    def _take_locked(self) -> _Batch:
        q = self._queue
        out: list[Stream] = []
        nbytes = 0
        while q and len(out) < self.batch_records and nbytes < self.batch_bytes:
            s, n, _ = q.popleft()
            out.append(s)
            nbytes += n
        self._queue_bytes -= nbytes
        b = _Batch(out, None, True)
        self._inflight = b
        return b

    def _read_spool(self) -> _Batch | None:
        spool = self._spool
        assert spool is not None
        it = spool.read_batches(self.batch_records, self.batch_bytes)
        try:
            item = next(it, None)
        finally:
            it.close()
        if item is None:
            if not self._end_spooling():
                with self._cond:
                    if not self._gave_up() and not self._spool_idle_locked():
                        self._cond.wait(0.2)  # the spool writer is on it
            return _Batch([], None, False)
        payloads, token = item
        streams: list[Stream] = []
        for p in payloads:
            try:
                streams.append(decode(p))
            except ValueError as exc:
                self.decode_errors += 1
                self.counts["failed"] += 1
                log.error("sink %s: undecodable spool record skipped: %s",
                          getattr(self.sink, "name", "?"), exc)
        b = _Batch(streams, token, False)
        self._inflight = b
        return b

    def _write_once(self, batch: list[Stream]) -> Result:
        self._in_sink = True
        try:
            if not self._opened:
                try:
                    self.sink.open()
                except Exception as exc:
                    # OSError, or e.g. CouchDB refusing the credentials (SinkError): nothing
                    # was sent, so keep the records (queue, then spool) and retry with backoff
                    # until the operator fixes it, rather than dropping every batch as failed.
                    # _deliver logs it, once per attempt, as one line (no traceback).
                    return Result.retry(None, f"open: {describe_error(exc)}",
                                        getattr(exc, "errno", None))
                self._opened = True
            try:
                res = self.sink.write(batch)
            except OSError as exc:
                return Result.retry(None, f"write: {describe_error(exc)}", exc.errno)
            except SinkError as exc:  # stated by the sink: one line, not a traceback
                return Result.fatal(f"write: {describe_error(exc)}")
            except Exception as exc:  # a bug in the sink: do not retry it forever
                log.exception("sink %s: write raised", getattr(self.sink, "name", "?"))
                return Result.fatal(f"write raised {exc!r}")
            if not isinstance(res, Result):
                return Result.ok()  # a sink that returns nothing stored the batch
            return res
        finally:
            self._in_sink = False

    def _deliver(self, b: _Batch) -> bool:
        """Write `b` until ok or fatal (True), or until stop's deadline (False)."""
        attempt = 0
        name = getattr(self.sink, "name", "?")
        while True:
            if not b.streams:
                return True
            res = self._write_once(b.streams)
            if self._abandoned:
                return False
            n = len(b.streams)
            if res.status != RETRY and self._episode is not None:
                since, tries, _ = self._episode
                self._episode = None
                log.warning("sink %s: answering again after %d failed attempt(s) in %.1f s",
                            name, tries, time.monotonic() - since)
            if res.status == OK:
                self.counts["ok"] += n
                self.healthy = True
                return True
            if res.status == FATAL:
                self.counts["failed"] += n
                self.last_error = res.error
                log.error("sink %s: %d records failed: %s", name, n, res.error)
                return True
            self.counts["retried"] += n
            self.healthy = False
            self.last_error = res.error
            if res.errno in DISK_FULL:
                self.enospc += 1
            if self._gave_up():
                return False
            delay = backoff_full_jitter(self.backoff_base, self.backoff_cap, attempt, self._rng)
            if res.after is not None:
                delay = max(delay, min(res.after, self.backoff_cap))
            self.backoffs.append(delay)
            del self.backoffs[:-64]
            # once per episode: the first failure, and any later one that says something new
            since, tries, logged = self._episode or (time.monotonic(), 0, None)
            if tries == 0 or res.error != logged:
                logged = res.error
                log.warning("sink %s: retry %d in %.2f s: %s", name, attempt + 1, delay,
                            res.error)
            else:
                log.debug("sink %s: retry %d in %.2f s: %s", name, attempt + 1, delay,
                          res.error)
            self._episode = (since, tries + 1, logged)
            self._sleep(delay)
            if self._gave_up():
                return False
            attempt += 1

    def _run(self) -> None:
        try:
            while True:
                b = self._next_batch()
                if b is None:
                    break
                done = self._deliver(b)
                with self._cond:
                    if self._abandoned:
                        return
                    if not done:
                        break
                    # a batch handed to the spool writer: wait for its spool position, so
                    # that the cursor skips it (a short local write)
                    while (b.spooling and b.token is None and self._spooler is not None
                           and self._spooler.is_alive()):
                        self._cond.wait(0.2)
                    token = b.token
                if token is not None and self._spool is not None:
                    # not under self._cond: the spool's lock may wait for the spool writer's
                    # disk, and submit must never wait for that
                    self._spool.commit(token)
                    self._end_spooling()
                with self._cond:
                    self._inflight = None
        except Exception:
            log.exception("sink %s: runner thread failed", getattr(self.sink, "name", "?"))
            self.healthy = False
        with self._cond:
            if self._abandoned:
                return
            self._closed = True
        self._stop_spooler()
        with self._cond:
            if self._abandoned:
                return
            self._spill_locked()
            self._inflight = None
        self._finish_sink()

    def _end_spooling(self) -> bool:
        """Back to the queue once the spool is delivered and nothing is on its way there. The
        spool is asked outside self._cond (see _run); `_spool_gen` tells whether the spool
        writer appended meanwhile."""
        spool = self._spool
        with self._cond:
            if not self._spooling:
                return True
            gen = self._spool_gen
        empty = spool is not None and spool.is_empty()
        with self._cond:
            if empty and gen == self._spool_gen and self._spool_idle_locked():
                self._spooling = False
            return not self._spooling

    def _stop_spooler(self, timeout: float | None = None) -> None:
        """Let the spool writer write what it holds, then end it."""
        with self._cond:
            self._spooler_stop = True
            self._cond.notify_all()
        t = self._spooler
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    def _finish_sink(self) -> None:
        name = getattr(self.sink, "name", "?")
        if self._opened:
            self._in_sink = True
            try:
                for what in ("flush", "close"):
                    try:
                        getattr(self.sink, what)()
                    except Exception as exc:
                        log.error("sink %s: %s failed: %s", name, what, exc)
            finally:
                self._in_sink = False
        with self._cond:
            if self._spool is not None:
                self._spool.close()
                self._spool_closed = True

    def stop(self, timeout: float) -> None:
        """Deliver until `timeout` seconds from now, then spool (or drop) the rest; then flush
        and close the sink. Submissions after `stop` go to the spool (or are dropped)."""
        with self._cond:
            self._stopping = True
            self._deadline = time.monotonic() + max(0.0, timeout)
            self._cond.notify_all()
        self._wake.set()
        t = self._thread
        if t is None:  # never started: nothing in flight
            self._open_spool()
            with self._cond:
                self._closed = True
                self._spill_locked()
            self._finish_sink()
            return
        t.join(max(0.0, timeout) + STOP_GRACE)
        if not t.is_alive():
            return
        with self._cond:
            stuck = self._in_sink
            if stuck:
                self._abandoned = True
                self._closed = True
                b = self._inflight
                if b is not None and b.from_queue and b.token is None and not b.spooling:
                    self._to_spool_locked(b.streams)
                if self._queue:
                    self._to_spool_locked(s for s, _, _ in self._queue)
                    self._queue.clear()
                    self._queue_bytes = 0
        if stuck:
            self._stop_spooler(STOP_GRACE * 5)
            with self._cond:
                if self._overflow:
                    self._to_spool_locked(list(self._overflow))
                    self._overflow.clear()
                if self._spool is not None:
                    self._spool.close()
                    self._spool_closed = True
            log.error("sink %s: still inside the sink %.1f s after stop; spooled the rest, "
                      "sink left open", getattr(self.sink, "name", "?"), timeout)
        else:
            t.join()  # spooling the rest to local disk / closing the sink

    # -- status -------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        spool = self._spool
        records = dict(self.counts)
        spool_bytes = 0
        enospc = self.enospc
        if spool is not None:
            records["dropped"] += spool.dropped_records
            spool_bytes = spool.size_bytes
            enospc += spool.enospc
        t = self._thread
        out: dict[str, Any] = {
            "name": getattr(self.sink, "name", "?"),
            "type": getattr(self.sink, "type", type(self.sink).__name__),
            "healthy": self.healthy and (t is None or t.is_alive() or self._closed),
            "queue_depth": len(self._queue),
            "spool_bytes": spool_bytes,
            "spool_pending": len(self._overflow) + self._spool_busy,
            "records": records,
            "enospc": enospc,
            "last_error": self.last_error,
            "spool_corrupt": spool.corrupt_records if spool is not None else 0,
        }
        try:
            # the sink's own details never replace the runner's counts (a JSONL sink reports
            # "records" too, as a plain number)
            for key, value in self.sink.health().items():
                out.setdefault(key, value)
        except Exception as exc:
            out["health_error"] = repr(exc)
        return out


class RunnerSink:
    """A sink seen through its runner, with the plain sink's face (open / write / flush / close /
    health), so the daemon's supervisor hands streams over without knowing about queues: write
    never blocks, failures are retried or spooled behind it."""

    def __init__(self, sink: Sink, *, spool_dir: str | None, stop_timeout: float = 5.0,
                 **runner_args: Any) -> None:
        self.sink = sink
        self.name = sink.name
        self.type = sink.type
        self.stop_timeout = stop_timeout
        if spool_dir is not None:
            try:
                os.makedirs(spool_dir, exist_ok=True)
            except OSError as e:
                log.warning("sink %s: no disk spool (%s: %s); records are dropped and counted "
                            "while the sink is down", sink.name, spool_dir, e.strerror)
                spool_dir = None
        self.runner = SinkRunner(sink, spool_dir=spool_dir, **runner_args)

    def open(self) -> None:
        self.runner.start()

    def write(self, batch: Sequence[Stream]) -> Result:
        self.runner.submit(list(batch))
        return Result.ok()

    def flush(self) -> None:
        """Nothing to do: the runner's thread writes as batches fill or age."""

    def close(self) -> None:
        self.runner.stop(self.stop_timeout)

    def health(self) -> dict[str, Any]:
        return self.runner.stats()
