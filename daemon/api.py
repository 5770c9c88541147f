"""The library API: `reassemble()` for a capture file, `Reassembler` to feed packets yourself,
`get_streams()` for code written against the scapy stream extractor.

`get_streams()` shape (the extractor's): ``{"SRC:SPORT ==> DST:DPORT": {SPORT: client_bytes,
DPORT: server_bytes}}``, SRC the client (who opened the connection), addresses printed as they
are (an IPv6 address without brackets, as the extractor prints it). Two rules the extractor
left implicit:

- Port reuse: several connections on one 4-tuple with the same client share a key; each
  direction's value is their bytes concatenated in the order the connections started. That is
  what the extractor's dict, filled packet by packet under one key, effectively gave, and no byte
  is dropped; `reassemble()` keeps the connections apart.
- Equal ports (SPORT == DPORT): the dict can hold one entry, so it holds the client's bytes
  followed by the server's, rather than silently keeping one direction.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from .decode import Decoder
from .flowtable import FlowTable, Limits
from .reader import CaptureError, read
from .stream import Stream

STATS_GROUPS = ("streams", "evicted")  # flow-table stats "<group>_<reason>" -> {reason: n}


def _load_config(config: Any):
    from streamtap import config as cfgmod

    if config is None:
        return cfgmod.default()
    if isinstance(config, (str, os.PathLike)):
        return cfgmod.load(config)
    return config


class Reassembler:
    """Incremental reassembly: feed packets, pull completed streams.

    >>> r = Reassembler()
    >>> r.feed(ts, 1, frame)          # linktype 1 = Ethernet
    >>> for s in r.completed(): ...
    >>> for s in r.flush(): ...       # end of input: every open stream, close_reason "shutdown"
    """

    def __init__(
        self, config: Any = None, *, interface: str | None = None, summary: bool = True
    ) -> None:
        self.config = cfg = _load_config(config)
        self.limits = Limits.from_config(cfg)
        self.table = FlowTable(self.limits, interface=interface)
        self._decoders: dict[int, Decoder] = {}
        # Every completed stream's endpoints, start and bytes, for summary() and get_streams();
        # summary=False keeps nothing (the CLI, the workers: unbounded input).
        self._kept: list[Stream] | None = [] if summary else None
        self.packets = 0

    def reconfigure(self, config: Any) -> None:
        """Apply a reloaded config's reassembly settings in place (SIGHUP), keeping open flows.

        New flows get the new depth; open flows keep the depth budget they started with. Idle
        timeouts of open flows are re-derived from their state (linger after FIN/RST is kept).
        `keep_packets` cannot change on a live table (open flows have no packet list): the old
        value stays until restart. Pending IP fragments keep their old settings.
        """
        from .flowtable import CLOSED

        cfg = _load_config(config)
        t = self.table
        lim = Limits.from_config(cfg)
        if lim.keep_packets != t.limits.keep_packets:
            lim = dataclasses.replace(lim, keep_packets=t.limits.keep_packets)
        self.config = cfg
        self.limits = lim
        t.set_limits(lim)
        for h in list(t.flows.values()):
            f = h.flow
            if h.is_client and f.state != CLOSED:
                t._set_state(f, f.state)

    def _decoder(self, linktype: int) -> Decoder:
        d = self._decoders.get(linktype)
        if d is None:
            frag = self.config.reassembly.fragments
            d = self._decoders[linktype] = Decoder(
                linktype,
                frag_max_pending=frag.max_pending,
                frag_timeout=frag.timeout,
                # the pcap sink writes every frame of a stream, fragments included
                frag_frames=self.table.frag_frames if self.limits.keep_packets else None,
            )
        return d

    def feed(self, ts: float, linktype: int, frame: bytes) -> None:
        """One captured frame of the given link type (DLT), timestamp in epoch seconds."""
        self.packets += 1
        dec = self._decoder(linktype).decode(frame, 0, len(frame), ts)
        if dec is not None:
            self.table.linktype = linktype
            self.table.packet(ts, dec, frame)

    def feed_batch(self, linktype: int, data: bytes, meta: bytes) -> int:
        """A pcapy `next_batch()` result: the capture loop's fast path. Returns packets fed."""
        self.table.linktype = linktype
        self.table.feed(self._decoder(linktype).decode, data, meta)
        n = len(meta) // 16
        self.packets += n
        return n

    def advance(self, now: float) -> None:
        """Move time forward without a packet (live capture on an idle link)."""
        self.table.advance(now)

    def completed(self) -> list[Stream]:
        """Streams completed since the last call."""
        done = self.table.done
        if not done:
            return []
        self.table.done = []
        if self._kept is not None:
            self._kept.extend(done)
        return done

    def flush(self) -> list[Stream]:
        """End of input: close every open stream (close_reason "shutdown") and return them with
        anything else completed."""
        self.table.flush("shutdown")
        return self.completed()

    def summary(self) -> dict[str, dict[int, int]]:
        """Byte counts: {key: {client_port: client_bytes, server_port: server_bytes}} for every
        completed stream, key "client_ip:client_port-server_ip:server_port" (IPv6 addresses in
        brackets). Connections sharing a key (port reuse) add up; equal ports count both
        directions under the one port. The contents are in `get_streams()`."""
        out: dict[str, dict[int, int]] = {}
        for s in self._kept or ():
            counts = out.setdefault(_summary_key(s), {})
            for port, n in ((s.client[1], len(s.client_data)), (s.server[1], len(s.server_data))):
                counts[port] = counts.get(port, 0) + n
        return out

    def get_streams(self) -> dict[str, dict[int, bytes]]:
        """Stream contents of every completed stream, as the scapy stream extractor's
        get_streams() returned them: {"SRC:SPORT ==> DST:DPORT": {SPORT: client_bytes, DPORT:
        server_bytes}} (module docstring: port reuse and equal ports). Call `flush()` first to
        include the streams still open. Empty with `Reassembler(summary=False)`."""
        return streams_dict(self._kept or ())

    @property
    def malformed(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for d in self._decoders.values():
            total.update(d.malformed)
        return total

    @property
    def skipped(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for d in self._decoders.values():
            total.update(d.skipped)
        return total

    @property
    def stats(self) -> dict[str, Any]:
        """Every counter of the flow table, the decoders and the defragmenters. Flow-table keys
        `streams_<reason>` and `evicted_<reason>` are grouped into {reason: n} dicts; any other
        flow-table key is passed through as it is, so a counter added there reaches the daemon's
        /status and /metrics with no plumbing. `flows_active` is the one gauge."""
        out: dict[str, Any] = {
            "packets": self.packets,
            "streams": {},
            "evicted": {},
            "malformed": dict(self.malformed),
            "skipped": dict(self.skipped),
            "gaps": 0,
            "missed_bytes": self.table.gap_bytes,
            "flows_active": self.table.nflows,
        }
        for k, v in self.table.stats.items():
            group, _, reason = k.partition("_")
            if group in STATS_GROUPS and reason:
                out[group][reason] = v
            else:
                out[k] = v
        return out


def _summary_key(s: Stream) -> str:
    def ep(ip: str, port: int) -> str:
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"

    return f"{ep(*s.client)}-{ep(*s.server)}"


def _streams_key(s: Stream) -> str:
    return f"{s.client[0]}:{s.client[1]} ==> {s.server[0]}:{s.server[1]}"


def streams_dict(streams: Iterable[Stream]) -> dict[str, dict[int, bytes]]:
    """The get_streams() dict of these streams (module docstring)."""
    parts: dict[str, list[tuple[float, int, Stream]]] = {}
    for n, s in enumerate(streams):
        parts.setdefault(_streams_key(s), []).append((s.start, n, s))
    out: dict[str, dict[int, bytes]] = {}
    for key, conns in parts.items():
        conns.sort(key=lambda c: c[:2])  # start time; completion order breaks ties
        client = b"".join(s.client_data for _, _, s in conns)
        server = b"".join(s.server_data for _, _, s in conns)
        cport, sport = conns[0][2].client[1], conns[0][2].server[1]
        out[key] = {cport: client + server} if cport == sport else {cport: client, sport: server}
    return out


def get_streams(
    path_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
    bpf: str | None = None,
    config: Any = None,
) -> dict[str, dict[int, bytes]]:
    """Every stream of a capture (or several, merged by timestamp) in the scapy stream
    extractor's get_streams() shape: {"SRC:SPORT ==> DST:DPORT": {SPORT: client_bytes, DPORT:
    server_bytes}} (module docstring: port reuse and equal ports).

    Holds every byte in memory, as the extractor did; `reassemble()` streams instead.
    """
    return streams_dict(reassemble(path_or_paths, bpf, config))


def reassemble(
    path_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
    bpf: str | None = None,
    config: Any = None,
) -> Iterator[Stream]:
    """Reassemble one capture (or several, merged by timestamp) and yield each completed stream.

    A generator: streams come out as they complete, so memory stays bounded by the open
    connections (and the configured limits), not by the size of the capture. A damaged file
    raises `CaptureError` after every stream read before the damage has been yielded.
    """
    if isinstance(path_or_paths, (str, os.PathLike)):
        paths = [os.fspath(path_or_paths)]
    else:
        paths = [os.fspath(p) for p in path_or_paths]
    r = Reassembler(config, summary=False)
    try:
        for linktype, data, meta in read(paths, bpf):
            r.feed_batch(linktype, data, meta)
            if r.table.done:
                yield from r.completed()
    except CaptureError:
        yield from r.flush()
        raise
    yield from r.flush()
