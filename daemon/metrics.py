"""Prometheus metrics for GET /metrics, built from the supervisor's state dict.

A custom collector (`StateCollector`) on a private `CollectorRegistry`, never the global one:
every scrape calls the supervisor's `state()` once and turns its counters into metric families.
The counters in the state are already cumulative (the supervisor adds a dead worker's last
totals to its slot), so nothing here keeps history, and prometheus_client's multiprocess mode is
not used.

Exposed (Prometheus text format 0.0.4):

=============================================  =======  ================  =====================
name                                           type     labels            from state
=============================================  =======  ================  =====================
streamtap_capture_packets_received_total       counter  worker            workers[].received
streamtap_capture_kernel_drops_total           counter  worker            workers[].kernel_drops
streamtap_capture_interface_drops_total        counter  worker            workers[].interface_drops
streamtap_decode_malformed_total               counter  reason            malformed
streamtap_tcp_streams_active                   gauge                      flows_active
streamtap_tcp_streams_completed_total          counter  reason            streams
streamtap_tcp_missed_bytes_total               counter                    missed_bytes
streamtap_sink_records_total                   counter  sink, result      sinks[].records
streamtap_sink_queue_depth                     gauge    sink              sinks[].queue_depth
streamtap_worker_restarts_total                counter                    worker_restarts
streamtap_channel_dropped_total                counter                    channel_dropped
streamtap_worker_up                            gauge    worker            workers[].alive
streamtap_sink_healthy                         gauge    sink              sinks[].healthy
streamtap_uptime_seconds                       gauge                      uptime
=============================================  =======  ================  =====================

`worker` is the worker slot index (a restarted worker keeps its slot); `sink` is the sink's
name, made unique with `#<index>` when two sinks share one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest

__all__ = ["CONTENT_TYPE", "StateCollector", "registry", "render"]

# generate_latest() writes the 0.0.4 text format whatever CONTENT_TYPE_LATEST says in newer
# prometheus_client releases (0.26 announces version=1.0.0), so the header is pinned here.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

StateFn = Callable[[], Mapping[str, Any]]

STREAM_REASONS = ("fin", "rst", "timeout", "evicted", "shutdown")
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


def families(state: Mapping[str, Any]) -> list[Metric]:
    """The metric families of one state dict (missing keys count as zero)."""
    workers = list(state.get("workers") or ())
    out: list[Metric] = []

    for key, name, doc in (
        ("received", "streamtap_capture_packets_received",
         "Packets the kernel handed to the capture handle (pcap stats recv)."),
        ("kernel_drops", "streamtap_capture_kernel_drops",
         "Packets dropped by the kernel: capture buffer full (pcap stats drop)."),
        ("interface_drops", "streamtap_capture_interface_drops",
         "Packets dropped by the interface or driver (pcap stats ifdrop)."),
    ):
        c = CounterMetricFamily(name, doc, labels=["worker"])
        for w in workers:
            c.add_metric([str(w.get("index", ""))], _num(w.get(key)))
        out.append(c)

    up = GaugeMetricFamily("streamtap_worker_up", "1 if the worker process is alive.",
                           labels=["worker"])
    for w in workers:
        up.add_metric([str(w.get("index", ""))], 1.0 if w.get("alive") else 0.0)
    out.append(up)

    mal = CounterMetricFamily("streamtap_decode_malformed",
                              "Packets the decoder rejected, by reason.", labels=["reason"])
    for reason, n in sorted((state.get("malformed") or {}).items()):
        mal.add_metric([str(reason)], _num(n))
    out.append(mal)

    out.append(GaugeMetricFamily("streamtap_tcp_streams_active",
                                 "Connections open in the flow tables.",
                                 value=_num(state.get("flows_active"))))

    done = CounterMetricFamily("streamtap_tcp_streams_completed",
                               "Streams completed, by close reason.", labels=["reason"])
    streams = dict(state.get("streams") or {})
    for reason in STREAM_REASONS:
        done.add_metric([reason], _num(streams.pop(reason, 0)))
    for reason, n in sorted(streams.items()):
        done.add_metric([str(reason)], _num(n))
    out.append(done)

    out.append(CounterMetricFamily("streamtap_tcp_missed_bytes",
                                   "Bytes skipped as gaps (never captured, or cut by snaplen).",
                                   value=_num(state.get("missed_bytes"))))

    records = CounterMetricFamily("streamtap_sink_records",
                                  "Stream records handled by each sink, by result.",
                                  labels=["sink", "result"])
    depth = GaugeMetricFamily("streamtap_sink_queue_depth",
                              "Batches or records waiting in a sink's queue.", labels=["sink"])
    healthy = GaugeMetricFamily("streamtap_sink_healthy", "1 if the sink reports healthy.",
                                labels=["sink"])
    seen: set[str] = set()
    for i, s in enumerate(state.get("sinks") or ()):
        name = str(s.get("name") or s.get("type") or f"sink{i}")
        if name in seen:
            name = f"{name}#{i}"
        seen.add(name)
        rec = dict(s.get("records") or {})
        for result in SINK_RESULTS:
            records.add_metric([name, result], _num(rec.pop(result, 0)))
        for result, n in sorted(rec.items()):
            records.add_metric([name, str(result)], _num(n))
        depth.add_metric([name], _num(s.get("queue_depth")))
        healthy.add_metric([name], 1.0 if s.get("healthy", True) else 0.0)
    out += [records, depth, healthy]

    out.append(CounterMetricFamily("streamtap_worker_restarts",
                                   "Worker processes restarted after dying.",
                                   value=_num(state.get("worker_restarts"))))
    out.append(CounterMetricFamily("streamtap_channel_dropped",
                                   "Stream records dropped on a full worker-to-supervisor "
                                   "channel.", value=_num(state.get("channel_dropped"))))
    out.append(GaugeMetricFamily("streamtap_uptime_seconds", "Seconds since the daemon started.",
                                 value=_num(state.get("uptime"))))
    return out


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
