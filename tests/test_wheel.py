"""Timer wheel: exact expiry (never early, never late), O(1) moves, cheap idle jumps."""

from __future__ import annotations

import random

import pytest

from streamtap.engine.wheel import TimerEntry, TimerWheel


def fired(entries: list[TimerEntry]) -> set[object]:
    return {e.payload for e in entries}


# -- basics ---------------------------------------------------------------------------------


def test_schedule_and_fire_in_tick_order() -> None:
    w = TimerWheel(tick=1.0, slots=8)
    a, b, c = TimerEntry("a"), TimerEntry("b"), TimerEntry("c")
    assert w.schedule(c, 5.0)
    assert w.schedule(a, 1.5)
    assert w.schedule(b, 3.2)
    assert len(w) == 3 and a.scheduled
    assert w.advance(1.0) == []
    assert [e.payload for e in w.advance(4.0)] == ["a", "b"]
    assert not a.scheduled and not b.scheduled and c.scheduled
    assert len(w) == 1
    assert [e.payload for e in w.advance(5.0)] == ["c"]
    assert len(w) == 0


def test_entries_of_the_current_tick_fire_in_deadline_order() -> None:
    w = TimerWheel(tick=1.0, slots=8)
    entries = [TimerEntry(d) for d in (2.9, 2.1, 2.5, 2.3)]
    for e in entries:
        w.schedule(e, e.payload)  # type: ignore[arg-type]
    w.advance(2.0)  # tick 2 becomes current
    late = TimerEntry(2.2)
    w.schedule(late, 2.2)  # out-of-order arrival in the current bucket
    assert [e.payload for e in w.advance(2.4)] == [2.1, 2.2, 2.3]
    assert [e.payload for e in w.advance(2.95)] == [2.5, 2.9]


def test_never_fires_before_its_deadline_within_a_tick() -> None:
    w = TimerWheel(tick=1.0, slots=64)
    e = TimerEntry("x")
    w.schedule(e, 10.5)
    assert w.advance(10.2) == []
    assert e.scheduled
    assert w.advance(10.49) == []
    assert w.advance(10.5) == [e]


def test_cancel() -> None:
    w = TimerWheel()
    a, b = TimerEntry("a"), TimerEntry("b")
    w.schedule(a, 3.0)
    w.schedule(b, 3.0)
    w.cancel(a)
    assert not a.scheduled and len(w) == 1
    w.cancel(a)  # no-op when not scheduled
    w.cancel(TimerEntry("never"))
    assert len(w) == 1
    assert w.advance(10.0) == [b]


def test_cancel_far_entry_and_current_bucket_head() -> None:
    w = TimerWheel(tick=1.0, slots=4)
    far, head, other = TimerEntry("far"), TimerEntry("head"), TimerEntry("other")
    w.schedule(far, 1000.0)
    w.schedule(head, 0.5)
    w.schedule(other, 0.7)
    w.cancel(far)
    w.cancel(head)
    assert len(w) == 1
    assert w.advance(0.6) == []
    assert w.advance(2000.0) == [other]


def test_reschedule_moves_entry() -> None:
    w = TimerWheel(tick=1.0, slots=8)
    e = TimerEntry("e")
    w.schedule(e, 3.0)
    assert w.schedule(e, 500.0)  # moved far: no longer in the level-0 bucket
    assert len(w) == 1
    assert w.advance(100.0) == []
    assert w.schedule(e, 100.5)  # moved back near
    assert len(w) == 1
    assert w.advance(100.5) == [e]
    assert len(w) == 0


def test_schedule_in_the_past_returns_false() -> None:
    w = TimerWheel(start=10.0)
    e = TimerEntry("e")
    assert not w.schedule(e, 9.0)
    assert not w.schedule(e, 10.0)  # deadline == now: already expired
    assert not e.scheduled and len(w) == 0
    assert w.schedule(e, 10.001)
    # Moving a scheduled entry into the past unschedules it: the caller fires it.
    assert not w.schedule(e, 5.0)
    assert not e.scheduled and len(w) == 0
    assert not w.schedule(e, float("nan"))


def test_time_never_goes_backwards() -> None:
    w = TimerWheel(tick=1.0, slots=8)
    e = TimerEntry("e")
    w.schedule(e, 20.0)
    w.advance(15.0)
    assert w.advance(3.0) == []
    assert w.now == 15.0
    assert w.advance(15.0) == []
    assert not w.schedule(TimerEntry("past"), 14.0)  # judged against 15, not 3
    assert w.advance(19.9) == []
    assert w.advance(20.0) == [e]


def test_start_offset() -> None:
    w = TimerWheel(tick=1.0, slots=8, start=1_700_000_000.25)
    assert w.now == 1_700_000_000.25
    e = TimerEntry("e")
    w.schedule(e, 1_700_000_600.0)
    assert w.advance(1_700_000_599.99) == []
    assert w.advance(1_700_000_600.0) == [e]


def test_len() -> None:
    w = TimerWheel(tick=0.5, slots=4)
    entries = [TimerEntry(i) for i in range(100)]
    for i, e in enumerate(entries):
        w.schedule(e, 1.0 + i * 7.3)
    assert len(w) == 100
    for e in entries[::2]:
        w.cancel(e)
    assert len(w) == 50
    w.schedule(entries[1], 2.0)  # a move does not change the count
    assert len(w) == 50
    got = w.advance(1.0 + 99 * 7.3)
    assert len(got) == 50 and len(w) == 0


def test_bucket_boundaries_exact() -> None:
    for tick in (1.0, 0.1, 0.25, 0.3):
        w = TimerWheel(tick=tick, slots=4)
        entries = [TimerEntry(i) for i in range(1, 60)]
        for e in entries:
            w.schedule(e, e.payload * tick)  # type: ignore[operator]
        for e in entries:
            d = e.deadline
            assert w.advance(d - 1e-9) == [], (tick, d)
            assert w.advance(d) == [e], (tick, d)


# -- far deadlines, big jumps ----------------------------------------------------------------


def test_far_deadlines_create_levels_lazily() -> None:
    w = TimerWheel(tick=1.0, slots=64)
    assert w.level_count == 1
    ten_min, day, week = TimerEntry("10min"), TimerEntry("day"), TimerEntry("week")
    w.schedule(ten_min, 600.0)
    assert w.level_count == 2
    w.schedule(day, 86_400.0)
    assert w.level_count == 3
    w.schedule(week, 7 * 86_400.0 + 0.5)
    assert w.level_count == 4
    assert w.advance(599.5) == []
    assert w.advance(600.0) == [ten_min]
    assert w.advance(86_399.999) == []
    assert w.advance(86_400.0) == [day]
    assert w.advance(7 * 86_400.0) == []
    assert w.advance(7 * 86_400.0 + 0.5) == [week]


def test_cascade_through_three_levels_step_by_step() -> None:
    # The worked example of the class docstring.
    w = TimerWheel(tick=1.0, slots=4)
    a, b, c = TimerEntry("a"), TimerEntry("b"), TimerEntry("c")
    w.schedule(a, 2.5)
    w.schedule(b, 9.0)
    w.schedule(c, 40.2)
    assert w.level_count == 3
    assert w.advance(3.0) == [a]
    assert w.advance(8.1) == []
    assert w.advance(9.0) == [b]
    assert w.advance(32.0) == []
    assert w.advance(40.0) == []
    assert w.advance(40.2) == [c]


def test_huge_jump_visits_few_buckets() -> None:
    w = TimerWheel(tick=1.0, slots=64)
    entries = [TimerEntry(i) for i in range(50)]
    for i, e in enumerate(entries):
        w.schedule(e, 10.0 + i * 20_000.0)  # spread up to ~1e6 s, over 4 levels
    before = w.buckets_visited
    got = w.advance(1e6)
    assert fired(got) == set(range(50))
    # At most `slots` buckets per level plus the current one: not 1e6 ticks.
    assert w.buckets_visited - before <= 64 * w.level_count + 1
    # And idling across a further huge gap with nothing scheduled is cheap too.
    before = w.buckets_visited
    assert w.advance(1e9) == []
    assert w.buckets_visited - before <= 64 * w.level_count + 1


def test_huge_jump_keeps_future_entries() -> None:
    w = TimerWheel(tick=1.0, slots=8)
    near, far = TimerEntry("near"), TimerEntry("far")
    w.schedule(near, 5.0)
    w.schedule(far, 1e6 + 0.5)
    assert w.advance(1e6) == [near]
    assert far.scheduled and len(w) == 1
    assert w.advance(1e6 + 0.4) == []
    assert w.advance(1e6 + 0.5) == [far]


# -- lazy re-arm (DESIGN "Reassembly") --------------------------------------------------------


class _Flow:
    def __init__(self, last_seen: float) -> None:
        self.last_seen = last_seen
        self.entry = TimerEntry(self)
        self.expired_at: float | None = None


def test_lazy_rearm_pattern() -> None:
    """Packets only bump last_seen; the caller re-arms an entry that fires early."""
    timeout = 30.0
    w = TimerWheel(tick=1.0, slots=64)
    flow = _Flow(last_seen=0.0)
    assert w.schedule(flow.entry, flow.last_seen + timeout)
    rearms = 0

    def run_timers(now: float) -> None:
        nonlocal rearms
        for entry in w.advance(now):
            f = entry.payload
            assert isinstance(f, _Flow)
            real = f.last_seen + timeout
            if real > now:
                rearms += 1
                assert w.schedule(entry, real)
            else:
                f.expired_at = now

    for t in (5.0, 12.0, 29.0):  # packets: no wheel call, just last_seen
        run_timers(t)
        flow.last_seen = t
    run_timers(40.5)  # deadline 30 fires early (last_seen 29): re-armed to 59
    assert rearms == 1 and flow.expired_at is None and flow.entry.deadline == 59.0
    flow.last_seen = 45.0  # one more packet
    run_timers(60.0)  # 59 fires early again: re-armed to 75
    assert rearms == 2 and flow.expired_at is None
    run_timers(74.9)
    assert flow.expired_at is None
    run_timers(75.0)
    assert rearms == 2 and flow.expired_at == 75.0
    assert len(w) == 0

    # Same with fine-grained time steps: fires exactly at the first step >= last_seen + timeout.
    w = TimerWheel(tick=1.0, slots=64)  # run_timers sees the new wheel
    flow = _Flow(last_seen=0.0)
    assert w.schedule(flow.entry, timeout)
    flow.last_seen = 20.25
    t = 0.0
    while flow.expired_at is None:
        t = round(t + 0.25, 2)
        run_timers(t)
    assert flow.expired_at == 50.25


# -- property test against a brute-force model -----------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6, 7, 8])
def test_matches_brute_force_model(seed: int) -> None:
    rng = random.Random(seed)
    tick = rng.choice([1.0, 0.1, 0.25, 0.3, 7.0])
    slots = rng.choice([2, 3, 4, 8, 64])
    start = rng.choice([0.0, 123.456, 1_700_000_000.0])
    w = TimerWheel(tick=tick, slots=slots, start=start)
    pool = [TimerEntry(i) for i in range(200)]
    model: dict[int, float] = {}  # payload -> deadline of scheduled entries
    now = start

    def random_deadline() -> float:
        scale = rng.choice([tick * 0.5, tick * 3, tick * slots, tick * slots**2, tick * slots**4])
        d = now + rng.random() * scale
        if rng.random() < 0.2:  # exactly on a bucket boundary
            d = (int(d / tick) + rng.randint(0, 3)) * tick
        return d

    for _ in range(3000):
        op = rng.random()
        e = rng.choice(pool)
        key = e.payload
        assert isinstance(key, int)
        if op < 0.45:
            d = random_deadline()
            ok = w.schedule(e, d)
            assert ok == (d > now)
            if ok:
                model[key] = d
            else:
                model.pop(key, None)
        elif op < 0.55:
            w.cancel(e)
            model.pop(key, None)
        else:
            r = rng.random()
            if r < 0.05:
                step = -rng.random() * tick * 10  # backwards: ignored
            elif r < 0.1:
                step = rng.random() * tick * slots**3  # long idle jump
            elif r < 0.15:
                step = 0.0
            else:
                step = rng.random() * tick * rng.choice([0.3, 2, slots])
            target = now + step
            got = w.advance(target)
            now = max(now, target)
            assert w.now == now
            expect = {k for k, d in model.items() if d <= now}
            got_keys = [g.payload for g in got]
            assert len(got_keys) == len(set(got_keys)), "an entry was returned twice"
            assert set(got_keys) == expect, (seed, now)
            for g in got:
                assert not g.scheduled
                assert g.deadline <= now
                del model[g.payload]  # type: ignore[arg-type]
        assert len(w) == len(model)
        for k in model:
            assert pool[k].scheduled
    # Drain: everything still scheduled fires by the largest deadline.
    if model:
        last = max(model.values())
        got = w.advance(last)
        assert fired(got) == set(model)
    assert len(w) == 0
