"""Prometheus metrics for GET /metrics, built from the supervisor's state dict.

A custom collector (`StateCollector`) on a private `CollectorRegistry`, never the global one:
every scrape calls the supervisor's `state()` once and turns its counters into metric families.
The counters in the state are already cumulative (the supervisor adds a dead worker's last
totals to its slot), so nothing here keeps history, and prometheus_client's multiprocess mode is
not used.

Every metric is declared once, in `PER_WORKER`, `ENGINE_COUNTERS` and `families()`; the
README's metrics table is `reference_table()`, and a test keeps the two equal. An engine counter
the supervisor sums but nobody declared yet is still exported, as
``streamtap_tcp_<key>_total`` (a {reason: n} dict gets a ``reason`` label): a counter added to
the flow table reaches the operator with no plumbing, and the README test then asks for its
declaration (name and help).

`worker` is the worker slot index (a restarted worker keeps its slot); `sink` is the sink's
name, made unique by `streamtap.sinks.registry.sink_names` (`jsonl`, `jsonl-2`), as its spool.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from types import SimpleNamespace
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest

from streamtap.sinks.registry import sink_names

__all__ = ["CONTENT_TYPE", "ENGINE_COUNTERS", "StateCollector", "reference_table", "registry",
           "render"]

# generate_latest() writes the 0.0.4 text format whatever CONTENT_TYPE_LATEST says in newer
# prometheus_client releases (0.26 announces version=1.0.0), so the header is pinned here.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

StateFn = Callable[[], Mapping[str, Any]]

STREAM_REASONS = ("fin", "rst", "timeout", "evicted", "shutdown")
EVICT_REASONS = ("max_flows", "memory", "emergency")
SINK_RESULTS = ("ok", "retried", "failed", "spooled", "dropped")


def _num(value: Any) -> float:
    try:
        return float(value or 0)
    except (TypeError, ValueError):
        return 0.0


class StateCollector:
    """A prometheus_client custom collector: `collect()` reads `state_fn()` once per scrape."""

    def __init__(self, state_fn: StateFn) -> None:
        self.state_fn = state_fn

    def describe(self) -> list[Metric]:
        # Registering must not call the supervisor's state(): nothing to check names against.
        return []

    def collect(self) -> Iterator[Metric]:
        return iter(families(self.state_fn()))


# state key -> (metric name without _total, help, label values always exported)
PER_WORKER: dict[str, tuple[str, str]] = {
    "received": ("streamtap_capture_packets_received",
                 "Packets the kernel handed to the capture handle (pcap stats recv)."),
    "kernel_drops": ("streamtap_capture_kernel_drops",
                     "Packets dropped by the kernel: capture buffer full (pcap stats drop)."),
    "interface_drops": ("streamtap_capture_interface_drops",
                        "Packets dropped by the interface or driver (pcap stats ifdrop)."),
}

# Counters the workers report, summed over workers (and over the deaths of each) by the
# supervisor: state key -> (name without _total, help, labels always exported). A dict value is
# exported with a `reason` label.
ENGINE_COUNTERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "packets": ("streamtap_decode_packets", "Frames handed to the decoder.", ()),
    "malformed": ("streamtap_decode_malformed",
                  "Packets the decoder rejected, by reason; fragment_* reasons are IP fragments "
                  "dropped (overlap, timeout, limit = table full, invalid).", ()),
    "skipped": ("streamtap_decode_skipped",
                "Frames that are fine but not reassembled (not_ip, not_tcp) or IP fragments "
                "held, duplicated or discarded, by reason.", ()),
    "flows": ("streamtap_tcp_streams_opened", "Connections opened in the flow tables.", ()),
    "streams": ("streamtap_tcp_streams_completed", "Streams completed, by close reason.",
                STREAM_REASONS),
    "evicted": ("streamtap_tcp_evictions",
                "Connections closed early by a limit, by limit (max_flows, memory, emergency = "
                "expired only by the shorter timeouts of emergency mode).",
                EVICT_REASONS),
    "empty_dropped": ("streamtap_tcp_empty_streams_dropped",
                      "Streams without payload dropped (reassembly.emit_empty false).", ()),
    "gaps": ("streamtap_tcp_gaps", "Gaps in the emitted streams.", ()),
    "missed_bytes": ("streamtap_tcp_missed_bytes",
                     "Bytes skipped as gaps (never captured, or cut by snaplen).", ()),
    "memory_limit_hits": ("streamtap_tcp_memory_limit_hits",
                          "Times the reassembly memory cap was exceeded (idle flows are then "
                          "evicted).", ()),
    "depth_dropped_bytes": ("streamtap_tcp_depth_dropped_bytes",
                            "Bytes past the reassembly depth, not kept (stream flagged "
                            "truncated).", ()),
    "ooo_limit_hits": ("streamtap_tcp_ooo_limit_hits",
                       "Holes skipped because a direction held more than ooo_bytes out of "
                       "order.", ()),
    "late_filled_segments": ("streamtap_tcp_late_filled_segments",
                             "Segments whose bytes filled a skipped hole after the ACK that "
                             "covers them (late fill, README \"Policies\").", ()),
    "late_filled_bytes": ("streamtap_tcp_late_filled_bytes",
                          "Bytes put into skipped holes by late segments.", ()),
    "part_late_bytes": ("streamtap_tcp_part_late_bytes",
                        "Bytes captured for a part already emitted (retransmissions, or late "
                        "fills that came too late): not delivered.", ()),
    "emergency_entered": ("streamtap_tcp_memory_emergency",
                          "Times a flow table entered emergency mode at its memory cap "
                          "(shorter idle timeouts until usage falls under 70 %).", ()),
    "late_dropped_bytes": ("streamtap_tcp_late_dropped_bytes",
                           "Late bytes refused by the reassembly depth (they stay a gap).", ()),
    "channel_dropped": ("streamtap_channel_dropped",
                        "Stream records dropped on a full worker-to-supervisor channel.", ()),
}

_DICT_KEYS = frozenset({"malformed", "skipped", "streams", "evicted"})  # {reason: n} values

# state keys that are not summed engine counters (or are exported per worker)
_NOT_ENGINE = frozenset({"uptime", "interface", "workers", "flows_active", "sinks",
                         "worker_restarts", *PER_WORKER})

# (name, type, labels, /status key, help) of the metrics families() builds by hand
_OTHER: tuple[tuple[str, str, str, str, str], ...] = (
    ("streamtap_worker_up", "gauge", "worker", "workers[].alive",
     "1 if the worker process is alive."),
    ("streamtap_tcp_streams_active", "gauge", "", "flows_active",
     "Connections open in the flow tables."),
    ("streamtap_sink_records", "counter", "sink, result", "sinks[].records",
     "Stream records handled by each sink, by result (ok, retried, failed, spooled, dropped)."),
    ("streamtap_sink_queue_depth", "gauge", "sink", "sinks[].queue_depth",
     "Batches or records waiting in a sink's queue."),
    ("streamtap_sink_healthy", "gauge", "sink", "sinks[].healthy",
     "1 if the sink reports healthy."),
    ("streamtap_sink_enospc", "counter", "sink", "sinks[].enospc",
     "Writes of a sink or its spool that found the file system full (ENOSPC, EDQUOT)."),
    ("streamtap_worker_restarts", "counter", "", "worker_restarts",
     "Worker processes restarted after dying."),
    ("streamtap_uptime_seconds", "gauge", "", "uptime", "Seconds since the daemon started."),
)
_DOC = {name: (kind, labels, doc) for name, kind, labels, _key, doc in _OTHER}


def _metric_name(key: str) -> str:
    name = re.sub(r"[^a-zA-Z0-9_]", "_", str(key)).strip("_").lower() or "unnamed"
    return "streamtap_tcp_" + name.removesuffix("_total")


def _counter(name: str, doc: str, value: Any, labels: tuple[str, ...] = ()) -> Metric:
    if not isinstance(value, Mapping):
        return CounterMetricFamily(name, doc, value=_num(value))
    c = CounterMetricFamily(name, doc, labels=["reason"])
    counts = dict(value)
    for reason in labels:
        c.add_metric([reason], _num(counts.pop(reason, 0)))
    for reason, n in sorted(counts.items(), key=lambda kv: str(kv[0])):
        c.add_metric([str(reason)], _num(n))
    return c


def families(state: Mapping[str, Any]) -> list[Metric]:
    """The metric families of one state dict (missing keys count as zero)."""
    workers = list(state.get("workers") or ())
    out: list[Metric] = []

    for key, (name, doc) in PER_WORKER.items():
        c = CounterMetricFamily(name, doc, labels=["worker"])
        for w in workers:
            c.add_metric([str(w.get("index", ""))], _num(w.get(key)))
        out.append(c)

    up = GaugeMetricFamily("streamtap_worker_up", _DOC["streamtap_worker_up"][2],
                           labels=["worker"])
    for w in workers:
        up.add_metric([str(w.get("index", ""))], 1.0 if w.get("alive") else 0.0)
    out.append(up)

    out.append(GaugeMetricFamily("streamtap_tcp_streams_active",
                                 _DOC["streamtap_tcp_streams_active"][2],
                                 value=_num(state.get("flows_active"))))

    names: set[str] = set()
    for key, (name, doc, labels) in ENGINE_COUNTERS.items():
        value = state.get(key)
        if value is None:
            value = {} if key in _DICT_KEYS else 0
        out.append(_counter(name, doc, value, labels))
        names.add(name)
    # counters the engine reports that nobody declared yet: exported all the same
    for key, value in sorted(state.items()):
        if key in _NOT_ENGINE or key in ENGINE_COUNTERS:
            continue
        if not isinstance(value, (Mapping, int, float)) or isinstance(value, bool):
            continue
        name = _metric_name(key)
        if name not in names:
            names.add(name)
            out.append(_counter(name, f"Worker counter {key!r} (summed over workers).", value))

    records = CounterMetricFamily("streamtap_sink_records", _DOC["streamtap_sink_records"][2],
                                  labels=["sink", "result"])
    depth = GaugeMetricFamily("streamtap_sink_queue_depth",
                              _DOC["streamtap_sink_queue_depth"][2], labels=["sink"])
    healthy = GaugeMetricFamily("streamtap_sink_healthy", _DOC["streamtap_sink_healthy"][2],
                                labels=["sink"])
    enospc = CounterMetricFamily("streamtap_sink_enospc", _DOC["streamtap_sink_enospc"][2],
                                 labels=["sink"])
    sinks = list(state.get("sinks") or ())
    # the daemon's sinks are already named apart by build_sinks; the same scheme keeps the
    # labels apart for any other caller of render()
    sink_labels = sink_names(SimpleNamespace(name=s.get("name"), type=s.get("type") or "sink")
                             for s in sinks)
    for name, s in zip(sink_labels, sinks, strict=True):
        rec = dict(s.get("records") or {})
        for result in SINK_RESULTS:
            records.add_metric([name, result], _num(rec.pop(result, 0)))
        for result, n in sorted(rec.items()):
            records.add_metric([name, str(result)], _num(n))
        depth.add_metric([name], _num(s.get("queue_depth")))
        healthy.add_metric([name], 1.0 if s.get("healthy", True) else 0.0)
        enospc.add_metric([name], _num(s.get("enospc")))
    out += [records, depth, healthy, enospc]

    out.append(CounterMetricFamily("streamtap_worker_restarts",
                                   _DOC["streamtap_worker_restarts"][2],
                                   value=_num(state.get("worker_restarts"))))
    out.append(GaugeMetricFamily("streamtap_uptime_seconds", _DOC["streamtap_uptime_seconds"][2],
                                 value=_num(state.get("uptime"))))
    return out


def reference_table() -> str:
    """The README's metrics table (Markdown), one row per declared metric."""
    rows: list[tuple[str, str, str, str, str]] = []
    for key, (name, doc) in PER_WORKER.items():
        rows.append((name + "_total", "counter", "worker", f"workers[].{key}", doc))
    for key, (name, doc, _reasons) in ENGINE_COUNTERS.items():
        labels = "reason" if key in _DICT_KEYS else ""
        rows.append((name + "_total", "counter", labels, key, doc))
    for name, kind, labels, key, doc in _OTHER:
        rows.append((name + ("_total" if kind == "counter" else ""), kind, labels, key, doc))
    lines = ["| metric | type | labels | `/status` key | meaning |", "|---|---|---|---|---|"]
    for name, kind, labels, key, doc in sorted(rows):
        lines.append(f"| `{name}` | {kind} | {labels} | `{key}` | {doc} |")
    return "\n".join(lines) + "\n"


def registry(state_fn: StateFn) -> CollectorRegistry:
    """A private registry holding only a `StateCollector` over `state_fn`."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StateCollector(state_fn))
    return reg


def render(state_fn: StateFn | CollectorRegistry) -> bytes:
    """Prometheus text exposition (format 0.0.4) of `state_fn()`, or of a registry from
    `registry()` (to build it once and reuse it)."""
    reg = state_fn if isinstance(state_fn, CollectorRegistry) else registry(state_fn)
    return generate_latest(reg)
