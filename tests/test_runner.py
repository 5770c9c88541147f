"""Sink runner (sinks/runner.py): batching, retry/backoff, spool and replay, stop, with fake
sinks defined here."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Sequence

import pytest

from streamtap.engine.stream import Stream
from streamtap.sinks.base import Result, Sink, SinkError
from streamtap.sinks.codec import encode
from streamtap.sinks.runner import SinkRunner, backoff_full_jitter
from streamtap.sinks.spool import HEADER, Spool

WAIT = 10.0  # generous upper bound for Event waits; tests finish long before


def mk(i: int, size: int = 10) -> Stream:
    data = (b"%08d" % i).ljust(size, b".")
    return Stream(("10.0.0.1", 1024 + i % 60000), ("10.0.0.2", 80), data, b"", "fin", [],
                  1700000000.0 + i, 1700000000.5 + i, 4)


def ids(streams: Sequence[Stream]) -> list[int]:
    return [int(s.client_data[:8]) for s in streams]


def _until(pred: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not pred():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.001)


class FakeSink(Sink):
    """Records every batch; `script(batch, call_no)` picks the Result (default ok)."""

    type = "fake"

    def __init__(self, script: Callable[[Sequence[Stream], int], Result] | None = None) -> None:
        super().__init__("fake", {})
        self.script = script
        self.batches: list[list[int]] = []  # ids of every accepted batch
        self.calls = 0
        self.opened = 0
        self.flushed = 0
        self.closed = 0
        self.got = threading.Condition()

    def open(self) -> None:
        self.opened += 1

    def write(self, batch: Sequence[Stream]) -> Result:
        self.calls += 1
        res = self.script(batch, self.calls) if self.script else Result.ok()
        if res.status == "ok":
            with self.got:
                self.batches.append(ids(batch))
                self.got.notify_all()
        return res

    def flush(self) -> None:
        self.flushed += 1

    def close(self) -> None:
        self.closed += 1

    def health(self) -> dict[str, object]:
        return {"fake_calls": self.calls}

    def delivered(self) -> list[int]:
        return [i for b in self.batches for i in b]

    def wait_for(self, n: int) -> None:
        with self.got:
            assert self.got.wait_for(lambda: len(self.delivered()) >= n, WAIT)


class BlockingSink(FakeSink):
    """A FakeSink whose writes hold until the test sets `release` (at most WAIT): `entered` is
    set by the first write, `inside` while a write is in progress."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.inside = threading.Event()
        super().__init__(self._hold)

    def _hold(self, batch: Sequence[Stream], call: int) -> Result:
        self.inside.set()
        self.entered.set()
        self.release.wait(WAIT)  # "sleeps" until the test lets it go
        self.inside.clear()
        return Result.ok()


def test_batches_by_count_in_order():
    sink = FakeSink()
    r = SinkRunner(sink, spool_dir=None, batch_records=3, batch_age=60)
    r.submit([mk(i) for i in range(10)])
    r.start()
    sink.wait_for(9)
    assert [len(b) for b in sink.batches] == [3, 3, 3]  # the 10th waits for more or its age
    r.stop(2)
    assert sink.delivered() == list(range(10))
    assert [len(b) for b in sink.batches] == [3, 3, 3, 1]
    assert sink.opened == 1 and sink.flushed == 1 and sink.closed == 1
    st = r.stats()
    assert st["records"] == {"ok": 10, "retried": 0, "failed": 0, "spooled": 0, "dropped": 0}
    assert st["name"] == "fake" and st["type"] == "fake" and st["healthy"] is True
    assert st["fake_calls"] == 4 and st["queue_depth"] == 0 and st["last_error"] is None


def test_batches_by_bytes():
    sink = FakeSink()
    r = SinkRunner(sink, spool_dir=None, batch_records=100, batch_bytes=25, batch_age=60)
    r.submit([mk(i, size=10) for i in range(7)])
    r.start()
    sink.wait_for(6)
    assert [len(b) for b in sink.batches] == [3, 3]  # 30 bytes >= 25 closes a batch
    r.stop(2)
    assert sink.delivered() == list(range(7))


def test_batches_by_age():
    sink = FakeSink()
    r = SinkRunner(sink, spool_dir=None, batch_records=100, batch_age=0.05)
    r.start()
    r.submit([mk(0)])
    r.submit([mk(1)])
    sink.wait_for(2)  # delivered before stop, by age alone
    assert sink.delivered() == [0, 1]
    r.submit([mk(2)])
    sink.wait_for(3)
    r.stop(2)
    assert sink.delivered() == [0, 1, 2]


def test_retry_then_ok_backs_off_with_injected_rng():
    fails = 6

    def script(batch, call):
        return Result.retry(error="503") if call <= fails else Result.ok()

    sink = FakeSink(script)
    delays: list[float] = []
    r = SinkRunner(sink, spool_dir=None, batch_records=4, backoff_base=0.5, backoff_cap=4.0,
                   rng=random.Random(7), sleep=delays.append)
    r.submit([mk(i) for i in range(8)])
    r.start()
    sink.wait_for(8)
    r.stop(2)
    ref = random.Random(7)
    assert delays == [backoff_full_jitter(0.5, 4.0, n, ref) for n in range(fails)]
    assert all(0 <= d <= min(4.0, 0.5 * 2**n) for n, d in enumerate(delays))
    assert sink.delivered() == list(range(8))
    st = r.stats()
    assert st["records"]["retried"] == fails * 4
    assert st["records"]["ok"] == 8 and st["records"]["failed"] == 0
    assert st["healthy"] is True and st["last_error"] == "503"


def test_retry_after_hint_is_respected_and_capped():
    def script(batch, call):
        return Result.retry(after=100.0) if call == 1 else Result.ok()

    sink = FakeSink(script)
    delays: list[float] = []
    r = SinkRunner(sink, spool_dir=None, backoff_cap=3.0, batch_age=0.01,
                   rng=random.Random(1), sleep=delays.append)
    r.submit([mk(0)])
    r.start()
    sink.wait_for(1)
    r.stop(2)
    assert delays == [3.0]


def test_open_oserror_is_a_retry():
    class FlakyOpen(FakeSink):
        def open(self) -> None:
            self.opened += 1
            if self.opened < 3:
                raise ConnectionRefusedError("refused")

    sink = FlakyOpen()
    r = SinkRunner(sink, spool_dir=None, batch_age=0.01, rng=random.Random(0),
                   sleep=lambda d: None)
    r.submit([mk(0), mk(1)])
    r.start()
    sink.wait_for(2)
    r.stop(2)
    assert sink.opened == 3
    assert r.stats()["records"]["retried"] == 4
    assert sink.delivered() == [0, 1]


def test_sink_failures_are_one_log_line_without_traceback(caplog):
    """Any sink (a plugin too) that raises OSError or SinkError: one line per attempt naming the
    sink and the answer; open failures are retried, a SinkError from write fails the batch."""
    import logging

    class Stated(FakeSink):
        def open(self) -> None:
            self.opened += 1
            if self.opened == 1:
                raise FileNotFoundError(2, "No such file or directory", "/x/out")
            if self.opened == 2:
                raise SinkError("server said: HTTP 401 unauthorized")

        def write(self, batch):
            if 0 in ids(batch):
                raise SinkError("server said: HTTP 400 bad_request")
            return super().write(batch)

    sink = Stated()
    r = SinkRunner(sink, spool_dir=None, batch_records=1, batch_age=0.01,
                   rng=random.Random(0), sleep=lambda d: None)
    with caplog.at_level(logging.INFO, logger="streamtap"):
        r.submit([mk(0), mk(1)])
        r.start()
        sink.wait_for(1)
        r.stop(2)
    assert sink.opened == 3 and sink.delivered() == [1]
    lines = [rec.getMessage() for rec in caplog.records]
    assert all(rec.exc_info is None for rec in caplog.records)
    d1, d2 = r.backoffs
    assert lines == [
        f"sink fake: retry 1 in {d1:.2f} s: open: /x/out: No such file or directory",
        f"sink fake: retry 2 in {d2:.2f} s: open: server said: HTTP 401 unauthorized",
        "sink fake: answering again after 2 failed attempt(s) in 0.0 s",
        "sink fake: 1 records failed: write: server said: HTTP 400 bad_request",
    ]


def test_sink_down_with_tiny_queue_spools_then_replays_in_order(tmp_path):
    up = threading.Event()
    sink = FakeSink(lambda batch, call: Result.ok() if up.is_set() else Result.retry())
    r = SinkRunner(sink, spool_dir=str(tmp_path), queue_max=5, batch_records=4,
                   batch_age=0.01, backoff_base=0.005, backoff_cap=0.02)
    r.start()
    n = 60
    for i in range(n):
        r.submit([mk(i)])
        assert r.stats()["queue_depth"] <= 5
    _until(lambda: sink.calls >= 2)  # the first retry has been handled
    st = r.stats()
    assert st["records"]["spooled"] > 0 and st["spool_bytes"] > 0
    assert st["healthy"] is False
    assert sink.delivered() == []
    up.set()
    sink.wait_for(n)
    r.submit([mk(n)])  # after the replay, normal flow resumes
    sink.wait_for(n + 1)
    r.stop(2)
    assert sink.delivered() == list(range(n + 1))  # in order, each exactly once
    st = r.stats()
    assert st["records"]["ok"] == n + 1 and st["records"]["dropped"] == 0
    assert st["healthy"] is True


def test_no_spool_drops_newest_and_counts():
    sink = BlockingSink()
    r = SinkRunner(sink, spool_dir=None, queue_max=3, batch_records=1, batch_age=0)
    r.start()
    r.submit([mk(0)])
    assert sink.entered.wait(WAIT)
    r.submit([mk(i) for i in range(1, 4)])  # fills the queue
    r.submit([mk(4), mk(5)])  # no room: dropped
    sink.release.set()
    r.stop(5)
    assert sink.delivered() == [0, 1, 2, 3]
    assert r.stats()["records"]["dropped"] == 2


def test_fatal_counts_failed_and_moves_on():
    def script(batch, call):
        return Result.fatal("400 bad doc") if 3 in ids(batch) else Result.ok()

    sink = FakeSink(script)
    r = SinkRunner(sink, spool_dir=None, batch_records=2, batch_age=60)
    r.submit([mk(i) for i in range(8)])
    r.start()
    sink.wait_for(6)
    r.stop(2)
    assert sink.delivered() == [0, 1, 4, 5, 6, 7]
    st = r.stats()
    assert st["records"]["failed"] == 2 and st["records"]["ok"] == 6
    assert st["records"]["retried"] == 0 and st["last_error"] == "400 bad doc"


def test_submit_never_blocks_on_a_slow_sink(tmp_path):
    sink = BlockingSink()
    r = SinkRunner(sink, spool_dir=str(tmp_path), queue_max=10_000, batch_records=500,
                   batch_age=0.01)
    r.start()
    r.submit([mk(0)])
    assert sink.entered.wait(WAIT)
    for i in range(1, 10_001):
        r.submit([mk(i)])
    # Every submit returned while the sink is still blocked inside its first write; the
    # 10,000th record did not fit the queue and went to the spool.
    assert sink.inside.is_set() and not sink.release.is_set()
    st = r.stats()
    assert st["queue_depth"] + st["spool_pending"] + st["records"]["spooled"] == 10_000
    sink.release.set()
    sink.wait_for(10_001)
    r.stop(5)
    assert sink.delivered() == list(range(10_001))


def test_stop_with_dead_sink_spools_and_next_runner_replays(tmp_path):
    dead = FakeSink(lambda batch, call: Result.retry(error="connection refused"))
    r1 = SinkRunner(dead, spool_dir=str(tmp_path), queue_max=100, batch_records=4,
                    batch_age=0.01, backoff_base=0.01, backoff_cap=0.05)
    r1.start()
    r1.submit([mk(i) for i in range(10)])
    r1.submit([mk(i) for i in range(10, 20)])
    r1.stop(0.2)
    st = r1.stats()
    assert st["records"]["spooled"] == 20 and st["records"]["ok"] == 0
    assert st["last_error"] == "connection refused"
    assert dead.flushed == 1 and dead.closed == 1
    assert any(n.endswith(".seg") for n in os.listdir(tmp_path))

    sink = FakeSink()
    r2 = SinkRunner(sink, spool_dir=str(tmp_path), batch_records=6, batch_age=0.01)
    r2.submit([mk(100)])  # newer than the spool: must come after it
    r2.start()
    r2.submit([mk(101)])
    sink.wait_for(22)
    r2.stop(2)
    assert sink.delivered() == list(range(20)) + [100, 101]
    # Fully drained: a third runner has nothing to replay.
    sink3 = FakeSink()
    r3 = SinkRunner(sink3, spool_dir=str(tmp_path))
    r3.start()
    r3.stop(1)
    assert sink3.delivered() == []


def test_corrupt_spool_segment_is_skipped_and_counted(tmp_path):
    payloads = [encode(mk(i)) for i in range(9)]
    seg = max(HEADER.size + len(p) for p in payloads) * 3
    sp = Spool(str(tmp_path), segment_bytes=seg)
    for p in payloads:
        sp.append(p)
    sp.close()
    segs = sorted(n for n in os.listdir(tmp_path) if n.endswith(".seg"))
    assert len(segs) == 3
    path = tmp_path / segs[1]
    data = bytearray(path.read_bytes())
    data[HEADER.size + 20] ^= 0x55  # first record of the middle segment
    path.write_bytes(bytes(data))

    sink = FakeSink()
    r = SinkRunner(sink, spool_dir=str(tmp_path), batch_records=2, batch_age=0.01)
    r.start()
    sink.wait_for(6)
    r.stop(2)
    assert sink.delivered() == [0, 1, 2, 6, 7, 8]
    assert r.stats()["spool_corrupt"] == 1


def test_stuck_sink_does_not_hold_stop(tmp_path):
    sink = BlockingSink()
    r = SinkRunner(sink, spool_dir=str(tmp_path), batch_records=1, batch_age=0)
    r.start()
    r.submit([mk(0)])
    assert sink.entered.wait(WAIT)
    r.submit([mk(1), mk(2)])
    t0 = time.monotonic()
    r.stop(0.05)
    assert time.monotonic() - t0 < WAIT
    sink.release.set()
    # The batch in hand and the queue are in the spool: at-least-once.
    sink2 = FakeSink()
    r2 = SinkRunner(sink2, spool_dir=str(tmp_path))
    r2.start()
    r2.stop(2)
    assert sink2.delivered() == [0, 1, 2]


class _MaxRng(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


@pytest.mark.parametrize("base,cap", [(0.5, 60.0), (0.1, 1.0), (2.0, 2.0)])
def test_backoff_full_jitter_bounds(base, cap):
    rng = random.Random(3)
    for attempt in range(40):
        d = backoff_full_jitter(base, cap, attempt, rng)
        assert 0.0 <= d <= min(cap, base * 2**attempt)
    top = _MaxRng()
    assert [backoff_full_jitter(base, cap, n, top) for n in range(3)] == [
        min(cap, base), min(cap, 2 * base), min(cap, 4 * base)]
    assert backoff_full_jitter(base, cap, 10_000, top) == cap  # no overflow


def test_stats_keep_runner_counts_when_the_sink_reports_same_keys() -> None:
    from streamtap.sinks.base import Result, Sink
    from streamtap.sinks.runner import SinkRunner

    class Clashing(Sink):
        type = "clash"

        def write(self, batch):
            return Result.ok()

        def health(self):
            return {"records": 7, "healthy": "maybe", "path": "/x"}

    r = SinkRunner(Clashing("c", {}), spool_dir=None)
    st = r.stats()
    assert isinstance(st["records"], dict) and st["records"]["ok"] == 0
    assert st["healthy"] is True and st["path"] == "/x"


def test_spool_writes_never_run_on_the_submitting_thread(tmp_path, monkeypatch):
    """A stuck sink and a slow disk: with the queue full, submit only hands records over; the
    runner's own spool writer appends them (the caller never waits for the disk)."""
    release = threading.Event()
    sink = FakeSink(lambda batch, call: Result.ok() if release.wait(WAIT) else Result.retry())
    real_append = Spool.append
    writers: set[str] = set()

    def slow_append(self, payload):
        writers.add(threading.current_thread().name)
        time.sleep(0.002)
        return real_append(self, payload)

    monkeypatch.setattr(Spool, "append", slow_append)
    r = SinkRunner(sink, spool_dir=str(tmp_path), queue_max=10, batch_records=5,
                   batch_age=0.01)
    r.start()
    t = time.monotonic()
    for i in range(1000):
        r.submit([mk(i)])
    took = time.monotonic() - t
    assert took < 0.5, f"submit waited for the spool: {took:.2f} s for 1000 records"
    _until(lambda: r.stats()["spool_pending"] == 0)
    assert writers == {"spool-fake"}, writers
    release.set()
    sink.wait_for(1000)
    r.stop(5)
    assert sink.delivered() == list(range(1000)), "in order, each once"
    assert r.stats()["records"]["dropped"] == 0
