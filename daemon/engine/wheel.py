"""Hierarchical timer wheel for flow idle timeouts (Kafka's TimingWheel, single-threaded).

Pure structure with injected time: nothing here reads a clock. Time (float seconds: packet
timestamps offline, max(packet time, monotonic clock) live) enters only through
`TimerWheel.advance`, and never runs backwards (an earlier `now` is ignored).
"""

from __future__ import annotations

from math import floor, inf
from operator import attrgetter

__all__ = ["TimerEntry", "TimerWheel"]

_by_deadline = attrgetter("deadline")


class _Bucket:
    """Sentinel of one bucket's circular doubly linked list; an empty bucket points at itself.

    The sentinel is also the bucket's identity: a scheduled entry's `_bucket` is its sentinel,
    which is what makes `cancel` O(1) without knowing the level or slot (Kafka's TimerTaskList).
    """

    __slots__ = ("_prev", "_next")

    def __init__(self) -> None:
        self._prev: TimerEntry | _Bucket = self
        self._next: TimerEntry | _Bucket = self


class TimerEntry:
    """One scheduled object (a flow). Reusable: schedule, fire, re-schedule as often as needed.

    `deadline` is the last deadline passed to `TimerWheel.schedule`; `payload` is the caller's
    object. The three underscore slots belong to the wheel.
    """

    __slots__ = ("deadline", "payload", "_prev", "_next", "_bucket")

    def __init__(self, payload: object) -> None:
        self.deadline: float = 0.0
        self.payload = payload
        self._prev: TimerEntry | _Bucket | None = None
        self._next: TimerEntry | _Bucket | None = None
        self._bucket: _Bucket | None = None

    @property
    def scheduled(self) -> bool:
        return self._bucket is not None

    def __repr__(self) -> str:
        state = "scheduled" if self._bucket is not None else "idle"
        return f"TimerEntry({self.payload!r}, deadline={self.deadline!r}, {state})"


class TimerWheel:
    """Hierarchical timing wheel: O(1) schedule and cancel, cheap advance over idle stretches.

    Time is cut into ticks; tick number k covers [k*tick, (k+1)*tick) and a deadline d belongs
    to tick k(d) = floor(d / tick). All bucket arithmetic is done on these integer tick numbers
    so float rounding can never put two entries of the same tick into different buckets; the
    final "has it expired?" decision always compares the float deadline with the float `now`.

    Level 0 has `slots` buckets of one tick each and holds the ticks c .. c+slots-1 (c = the
    tick of `now`). Level L >= 1 has `slots` buckets of u_L = slots**L ticks each (its tick is
    the whole span of level L-1) and holds the coarse buckets after the current one. An entry
    goes into the lowest level whose window contains its deadline; levels are created lazily
    the first time a deadline needs them, so a one-day timeout with tick 1 s and 64 slots costs
    three levels and no configuration.

    Worked example, tick = 1 s, slots = 4, now = 0 (so c = 0):

        level 0: 4 buckets of 1 s    span  4 s    holds ticks [0, 4)
        level 1: 4 buckets of 4 s    span 16 s    holds [4, 16)  in buckets 1..3
        level 2: 4 buckets of 16 s   span 64 s    holds [16, 64) in buckets 1..3

    schedule(a, 2.5)  -> level 0, bucket 2 (tick 2).
    schedule(b, 9.0)  -> tick 9 is past level 0's window; level 1 bucket 9 // 4 = 2.
    schedule(c, 40.2) -> past level 1's window too; level 2 bucket 40 // 16 = 2, creating
                         level 2 on the way.
    advance(3.0)  -> level 0 buckets 0..2 are flushed: `a` is returned (2.5 <= 3.0).
    advance(8.1)  -> ticks 3..7 are passed (4 level-0 buckets, each visited once); level 1
                     bucket 2 ([8, 12)) has started, so it is flushed and `b` re-added relative
                     to now = 8.1, landing in level 0 bucket 9 % 4 = 1. Nothing is returned.
    advance(9.0)  -> `b` (9.0 <= 9.0) is returned from level 0.
    advance(32.0) -> level 2 bucket 2 ([32, 48)) has started: `c` cascades to level 1 bucket
                     40 // 4 = 10; advance(40.0) cascades it to level 0 bucket 40 % 4 = 0,
                     where it waits (still sub-tick) until advance(40.2) returns it.

    Coarse buckets are only flushed when time reaches their start (Kafka's lazy cascade): each
    entry moves down at most once per level, and a long timeout costs nothing per tick.

    Precision: unlike Kafka, expiry is exact, not rounded to a tick. The bucket of the current
    tick is kept sorted by deadline (it is sorted once when its tick becomes current; later
    arrivals are appended, and only an out-of-order arrival forces a re-sort), so each
    `advance` inside a tick pops expired entries from its head. An entry is returned by the
    first `advance(now)` with now >= deadline, never earlier.

    Big jumps: `advance` visits at most `slots` buckets per level, whatever the jump (0 to 1e6
    s with tick 1 and 64 slots: about 64 + 64 + 64 + 4 buckets), skipping empty ones in O(1).

    Single-threaded, one wheel per worker: no locks, no clock, no background thread.
    """

    __slots__ = (
        "_tick",
        "_slots",
        "_now",
        "_cur",
        "_levels",
        "_units",
        "_count",
        "_cur_sorted",
        "_cur_min",
        "buckets_visited",
    )

    def __init__(self, tick: float = 1.0, slots: int = 64, start: float = 0.0) -> None:
        if not tick > 0.0 or tick == inf:
            raise ValueError(f"tick must be a positive finite number of seconds, got {tick!r}")
        if slots < 2:
            raise ValueError(f"slots must be >= 2, got {slots!r}")
        self._tick = float(tick)
        self._slots = slots
        self._now = float(start)
        self._cur = floor(self._now / self._tick)  # tick number of `now`
        # _levels[L][i] is bucket i of level L; _units[L] = ticks per bucket (slots**L).
        self._levels: list[list[_Bucket]] = [[_Bucket() for _ in range(slots)]]
        self._units: list[int] = [1]
        self._count = 0
        # State of the current-tick bucket (level 0, slot _cur % slots): is it sorted by
        # deadline, and a lower bound of its deadlines (inf when empty) so that an advance that
        # cannot expire anything there costs one compare.
        self._cur_sorted = True
        self._cur_min = inf
        # Diagnostic / test accessor: buckets examined by advance() so far (K1: tests count
        # work instead of timing it).
        self.buckets_visited = 0

    # -- accessors (K1) ----------------------------------------------------------------------

    @property
    def now(self) -> float:
        """Current wheel time: the largest `now` ever passed to `advance` (or `start`)."""
        return self._now

    @property
    def tick(self) -> float:
        return self._tick

    @property
    def level_count(self) -> int:
        """Levels created so far (test accessor: they are created lazily)."""
        return len(self._levels)

    def __len__(self) -> int:
        return self._count

    # -- hot path ----------------------------------------------------------------------------

    def schedule(self, entry: TimerEntry, deadline: float) -> bool:
        """Schedule `entry` to fire at `deadline`, moving it if it is already scheduled.

        O(1). Returns False, leaving the entry unscheduled, if `deadline` <= `now`: the caller
        fires it itself (Kafka's add() contract). `deadline` must be finite.
        """
        if entry._bucket is not None:
            self.cancel(entry)
        entry.deadline = deadline
        if not deadline > self._now:  # also rejects NaN
            return False
        self._place(entry, deadline)
        self._count += 1
        return True

    def cancel(self, entry: TimerEntry) -> None:
        """Unschedule `entry`. O(1); a no-op if it is not scheduled."""
        if entry._bucket is None:
            return
        prev = entry._prev
        nxt = entry._next
        prev._next = nxt  # type: ignore[union-attr]
        nxt._prev = prev  # type: ignore[union-attr]
        entry._prev = entry._next = entry._bucket = None
        self._count -= 1
        # Cancelling from the current bucket keeps it sorted; _cur_min may now be too low,
        # which only costs one extra head check in the next advance.

    # -- internals ---------------------------------------------------------------------------

    def _add_far(self, entry: TimerEntry, k: int) -> None:
        """Link `entry` (tick k, beyond level 0's window) into the lowest level that holds it."""
        slots = self._slots
        cur = self._cur
        levels = self._levels
        units = self._units
        level = 1
        while True:
            if level == len(levels):
                # Lazily grow an overflow level whose tick is the lower level's whole span.
                levels.append([_Bucket() for _ in range(slots)])
                units.append(units[-1] * slots)
            unit = units[level]
            j = k // unit
            # Level L holds coarse buckets cur_L+1 .. cur_L+slots-1; bucket cur_L itself is
            # always covered by level L-1, so a slot never holds two different coarse buckets.
            if j - cur // unit < slots:
                bucket = levels[level][j % slots]
                tail = bucket._prev
                entry._prev = tail
                entry._next = bucket
                entry._bucket = bucket
                tail._next = entry
                bucket._prev = entry
                return
            level += 1

    def _place(self, entry: TimerEntry, deadline: float) -> None:
        """Link an unlinked entry into the bucket its deadline falls in (deadline > now)."""
        k = floor(deadline / self._tick)
        slots = self._slots
        if k - self._cur < slots:
            bucket = self._levels[0][k % slots]
            tail = bucket._prev
            if k == self._cur:
                # The current-tick bucket is kept sorted; appending in order keeps it so.
                if tail is not bucket and deadline < tail.deadline:  # type: ignore[union-attr]
                    self._cur_sorted = False
                if deadline < self._cur_min:
                    self._cur_min = deadline
            entry._prev = tail
            entry._next = bucket
            entry._bucket = bucket
            tail._next = entry
            bucket._prev = entry
        else:
            self._add_far(entry, k)

    def _readd(self, entry: TimerEntry, expired: list[TimerEntry]) -> None:
        """Cascade: put an unlinked entry from a flushed coarse bucket back, relative to now."""
        deadline = entry.deadline
        if deadline <= self._now:
            expired.append(entry)
            self._count -= 1
            return
        self._place(entry, deadline)

    @staticmethod
    def _detach(bucket: _Bucket) -> list[TimerEntry]:
        """Empty `bucket`, returning its entries unlinked (the caller re-adds or fires them)."""
        out: list[TimerEntry] = []
        node = bucket._next
        while node is not bucket:
            nxt = node._next
            node._prev = node._next = node._bucket = None  # type: ignore[union-attr]
            out.append(node)  # type: ignore[arg-type]
            node = nxt  # type: ignore[assignment]
        bucket._prev = bucket._next = bucket
        return out

    def _sort_current(self, bucket: _Bucket) -> None:
        """Relink the current-tick bucket in deadline order (stable: ties keep insertion order)."""
        entries: list[TimerEntry] = []
        node = bucket._next
        while node is not bucket:
            entries.append(node)  # type: ignore[arg-type]
            node = node._next  # type: ignore[assignment]
        entries.sort(key=_by_deadline)
        prev: TimerEntry | _Bucket = bucket
        for e in entries:
            e._prev = prev
            prev._next = e
            prev = e
        prev._next = bucket
        bucket._prev = prev
        self._cur_sorted = True

    # -- time --------------------------------------------------------------------------------

    def advance(self, now: float) -> list[TimerEntry]:
        """Move time forward to `now`; return every entry with deadline <= now, unscheduled.

        An earlier (or equal, or NaN) `now` is ignored and returns [] (N2: time never runs
        backwards). Order: roughly by deadline (tick by tick, then cascaded entries), exact
        within the final tick; callers must not rely on it.
        """
        if not now > self._now:
            return []
        expired: list[TimerEntry] = []
        slots = self._slots
        levels = self._levels
        level0 = levels[0]
        old = self._cur
        new = floor(now / self._tick)
        self._now = now
        visited = 0
        if new != old:
            self._cur = new
            # Level 0: every tick in [old, new) lies wholly before now (k(d) < k(now) implies
            # d < now, floor of a correctly rounded division being monotonic), so those buckets
            # expire whole. A jump of `slots` ticks or more passes each bucket once.
            for k in range(old, old + min(new - old, slots)):
                bucket = level0[k % slots]
                visited += 1
                if bucket._next is not bucket:
                    got = self._detach(bucket)
                    self._count -= len(got)
                    expired.extend(got)
            # The new current bucket: unknown order and minimum until looked at below.
            self._cur_sorted = False
            self._cur_min = -inf
            # Overflow levels, bottom-up: a coarse bucket whose start time has been reached is
            # flushed and its entries re-added relative to the new time, so they land in lower
            # levels, which are already clean (bottom-up order guarantees a re-added entry never
            # shares a slot with a stale bucket still waiting to be flushed).
            units = self._units
            for level in range(1, len(levels)):
                unit = units[level]
                old_j = old // unit
                new_j = new // unit
                if new_j == old_j:
                    break  # higher levels have not moved either
                buckets = levels[level]
                # This level holds old_j+1 .. old_j+slots-1: flush those now at or before new_j.
                for j in range(old_j + 1, old_j + 1 + min(new_j - old_j, slots - 1)):
                    bucket = buckets[j % slots]
                    visited += 1
                    if bucket._next is not bucket:
                        for entry in self._detach(bucket):
                            self._readd(entry, expired)
        # The current-tick bucket: sub-tick precision. Sorted, so expired entries are a prefix.
        if now >= self._cur_min:
            bucket = level0[new % slots]
            visited += 1
            if not self._cur_sorted:
                self._sort_current(bucket)
            node = bucket._next
            while node is not bucket and node.deadline <= now:  # type: ignore[union-attr]
                nxt = node._next  # type: ignore[union-attr]
                node._prev = node._next = node._bucket = None  # type: ignore[union-attr]
                expired.append(node)  # type: ignore[arg-type]
                self._count -= 1
                node = nxt  # type: ignore[assignment]
            bucket._next = node
            node._prev = bucket
            self._cur_min = inf if node is bucket else node.deadline  # type: ignore[union-attr]
        self.buckets_visited += visited
        return expired
