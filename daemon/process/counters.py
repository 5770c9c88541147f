"""The daemon's counters and the state it reports (GET /status, /metrics, SIGUSR1, systemd STATUS=).

A worker's `Stats` message is summed generically: every number, and every {reason: number}
dict, is a cumulative counter, except the keys below. So a counter the engine adds later
reaches /status and /metrics with no change here. Per worker position (slot), the last stats of
each dead incarnation are folded into `base`, so totals never go backwards over a restart.

The control server reads from its own thread while the loop writes: one lock guards the dicts.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

META_KEYS = frozenset({"index", "pid", "interface", "last_progress"})
GAUGES = frozenset({"flows_active"})  # summed over live workers only, never kept past a death


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def add_counters(into: dict[str, Any], stats: dict[str, Any], gauges: bool = False) -> None:
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


@dataclass(frozen=True, slots=True)
class WorkerView:
    """What /status says of one worker position besides its counters."""
    index: int
    pid: int | None
    alive: bool


def sink_label(sink: Any) -> str:
    """The sink's name as build_sinks gave it (`sink_names`: `jsonl`, `jsonl-2`): the one
    name in logs, /status, metric labels and spool directories."""
    return str(getattr(sink, "name", None) or type(sink).__name__)


class Counters:
    """Counters of `n` worker slots, plus the supervisor's own (restarts, records delivered,
    records a sink failed to take)."""

    def __init__(self, n: int, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.started = clock()
        self.base: list[dict[str, Any]] = [{} for _ in range(n)]     # dead incarnations
        self.current: list[dict[str, Any]] = [{} for _ in range(n)]  # the live one's last stats
        self.worker_restarts = 0
        self.delivered = 0
        self.sink_errors: dict[int, int] = {}
        self._lock = threading.Lock()
        self._rate_base: tuple[float, int, int] = (self.started, 0, 0)

    def update(self, index: int, stats: dict[str, Any]) -> None:
        with self._lock:
            self.current[index] = dict(stats)

    def fold(self, index: int) -> None:
        """Worker `index` died: its last stats become part of the slot's base."""
        with self._lock:
            add_counters(self.base[index], self.current[index])
            self.current[index] = {}

    def totals(self, index: int | None = None) -> dict[str, Any]:
        """Cumulative counters of one slot, or of all."""
        out: dict[str, Any] = {}
        with self._lock:
            for i in range(len(self.base)) if index is None else (index,):
                add_counters(out, self.base[i])
                add_counters(out, self.current[i])
        return out

    def sink_failed(self, i: int, records: int) -> None:
        self.sink_errors[i] = self.sink_errors.get(i, 0) + records

    # ------------------------------------------------------------------ reports

    def stats_line(self, views: Sequence[WorkerView]) -> str:
        """SIGUSR1's log line."""
        t = self.totals()
        streams = t.get("streams", {})
        by = ", ".join(f"{k} {v}" for k, v in sorted(streams.items()))
        alive = sum(1 for v in views if v.alive)
        return (f"stats: {t.get('packets', 0)} packets, {sum(streams.values())} streams"
                f"{' (' + by + ')' if by else ''}, {t.get('kernel_drops', 0)} kernel drops, "
                f"{t.get('interface_drops', 0)} interface drops, "
                f"{t.get('missed_bytes', 0)} bytes missed, "
                f"{sum(t.get('malformed', {}).values())} malformed, "
                f"{alive}/{len(views)} workers, {self.worker_restarts} restarts, "
                f"{self.delivered} records delivered")

    def status_text(self, views: Sequence[WorkerView], now: float | None = None) -> str:
        """systemd's STATUS=: rates since the previous call."""
        now = self.clock() if now is None else now
        t = self.totals()
        streams = sum(t.get("streams", {}).values())
        t0, p0, s0 = self._rate_base
        dt = max(now - t0, 1e-9)
        self._rate_base = (now, t.get("packets", 0), streams)
        drops = t.get("kernel_drops", 0) + t.get("interface_drops", 0)
        alive = sum(1 for v in views if v.alive)
        return (f"{(t.get('packets', 0) - p0) / dt:.0f} packets/s, "
                f"{(streams - s0) / dt:.1f} streams/s, {drops} drops, "
                f"{alive}/{len(views)} workers")

    def state(self, views: Sequence[WorkerView], interface: str | None,
              sinks: Sequence[Any]) -> dict[str, Any]:
        """The control server's GET /status (counters cumulative over worker deaths). Besides
        the keys named here, every counter the workers report is there, summed."""
        workers = []
        gauges: dict[str, Any] = {}
        for v in views:
            tot = self.totals(v.index)
            with self._lock:
                cur = dict(self.current[v.index])
            add_counters(gauges, cur, gauges=True)
            workers.append({
                "index": v.index, "pid": v.pid, "alive": v.alive,
                "received": tot.get("received", 0), "kernel_drops": tot.get("kernel_drops", 0),
                "interface_drops": tot.get("interface_drops", 0),
                "packets": tot.get("packets", 0),
                "flows_active": int(cur.get("flows_active") or 0),
            })
        t = self.totals()
        out = {
            "uptime": round(self.clock() - self.started, 3),
            "interface": interface,
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
            "sinks": [self.sink_state(i, sink) for i, sink in enumerate(sinks)],
        }
        for k, v in (*t.items(), *gauges.items()):
            out.setdefault(k, v)
        return out

    def sink_state(self, i: int, sink: Any) -> dict[str, Any]:
        if callable(getattr(sink, "health", None)):
            with contextlib.suppress(Exception):
                h = dict(sink.health())
                h.setdefault("name", sink_label(sink))
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
            "name": sink_label(sink),
            "type": getattr(sink, "type", None) or getattr(sink, "name", type(sink).__name__),
            "healthy": bool(getattr(sink, "healthy", True)) and not self.sink_errors.get(i),
            "queue_depth": int(getattr(sink, "queue_depth", 0) or 0),
            "records": records,
        }
