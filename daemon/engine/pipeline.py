"""The engine's one pipeline: captures -> decoders -> flow table -> completed streams.

`Reassembler` is the packet-level part (feed frames or pcapy batches, pull completed streams);
`Pipeline` reads capture files through it. Every offline reader uses `Pipeline`: the CLI's `-r`
(`cli.run_offline`), the library's `streamtap.reassemble`, and the daemon's `POST /pcaps`
ingestion (`ingest`). What they share is decided here, once:

- the files are opened up front (`open()`): a missing file or a bad filter fails before any
  packet is read (`CaptureError`, `FilterError`);
- streams come out in the batches they complete in (`batches()`), so memory stays bounded by
  the open connections, not by the capture;
- damage (`CaptureError`: a truncated or corrupt file; `UnsupportedLinkType`) first hands over
  every stream read before it, open ones flushed with close_reason "shutdown", then raises;
- a consumer that stops early (closes the generator) gets no flush: `flush()` is its call.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import streamtap.config as cfgmod
from streamtap.config import Config
from streamtap.engine.decode import Decoder, UnsupportedLinkType
from streamtap.engine.flowtable import CLOSED, FlowTable, Limits
from streamtap.engine.pcapfmt import META_LEN, CaptureError
from streamtap.engine.reader import Batches, ShardSource, Sources, shard_of
from streamtap.engine.stream import Stream

__all__ = ["ConfigLike", "Pipeline", "Reassembler", "streams_dict"]

STATS_GROUPS = ("streams", "evicted")  # flow-table stats "<group>_<reason>" -> {reason: n}


ConfigLike = Config | str | os.PathLike[str] | None  # a Config, a YAML path, or None: defaults


def _load_config(config: ConfigLike) -> Config:
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
        self, config: ConfigLike = None, *, interface: str | None = None, summary: bool = True,
        workers: int | None = None,
    ) -> None:
        """`workers`: how many reassemblers share `reassembly.limits.memory` (each enforces
        its share); None = `capture.workers` (0 = one per CPU core), as the live workers do."""
        self.config = cfg = _load_config(config)
        self.limits = Limits.from_config(cfg, workers)
        self.table = FlowTable(self.limits, interface=interface)
        self._decoders: dict[int, Decoder] = {}
        # shard k of n (`feed_complement`): the complement's own decoders, so IP fragments are
        # reassembled by one decoder; their counters count only where `count_complement`
        self._cdecoders: dict[int, Decoder] = {}
        self.shard: tuple[int, int] | None = None
        self.count_complement = True
        self.foreign = 0  # complement segments decoded and left to another shard
        # Every completed stream's endpoints, start and bytes, for summary() and get_streams();
        # summary=False keeps nothing (the CLI, the workers: unbounded input).
        self._kept: list[Stream] | None = [] if summary else None
        self.packets = 0

    def reconfigure(self, config: ConfigLike) -> None:
        """Apply a reloaded config's reassembly settings in place (SIGHUP), keeping open flows.

        New flows get the new depth; open flows keep the depth budget they started with. Idle
        timeouts of open flows are re-derived from their state (linger after FIN/RST is kept).
        `keep_packets` cannot change on a live table (open flows have no packet list): the old
        value stays until restart. Pending IP fragments keep their old settings.
        """
        cfg = _load_config(config)
        t = self.table
        lim = Limits.from_config(cfg, t.limits.workers)
        if lim.keep_packets != t.limits.keep_packets:
            lim = dataclasses.replace(lim, keep_packets=t.limits.keep_packets)
        self.config = cfg
        self.limits = lim
        t.set_limits(lim)
        for f in t.open_flows():
            if f.state != CLOSED:
                t._set_state(f, f.state)

    def _decoder(self, linktype: int, decoders: dict[int, Decoder] | None = None) -> Decoder:
        decoders = self._decoders if decoders is None else decoders
        d = decoders.get(linktype)
        if d is None:
            frag = self.config.reassembly.fragments
            d = decoders[linktype] = Decoder(
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

    def feed_complement(self, linktype: int, data: bytes, meta: bytes) -> int:
        """Shard mode (`shard` = (n, k)): a batch of packets the shard filters cannot place.
        Each is decoded in full (fragments reassembled, tunnels and tags removed) and kept
        only if `shard_of` its TCP tuple is k. Returns packets fed."""
        assert self.shard is not None
        n, k = self.shard
        decode = self._decoder(linktype, self._cdecoders).decode
        held = self.table.frag_frames

        def mine(buf: bytes, off: int, end: int, ts: float) -> tuple | None:
            dec = decode(buf, off, end, ts)
            if dec is None or shard_of(dec[1], dec[2], dec[3], dec[4], n) == k:
                return dec
            self.foreign += 1
            held.clear()  # the earlier fragments' frames of a datagram left to another shard
            return None

        self.table.linktype = linktype
        self.table.feed(mine, data, meta)
        count = len(meta) // 16
        if self.count_complement:
            self.packets += count
        return count

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

    def flush_batches(self, chunk: int = 10_000) -> Iterator[list[Stream]]:
        """`flush()` in batches of about `chunk` streams, each built only once the previous
        one is handed over: memory stays that of the open flows, not twice it."""
        for _ in self.table.flush_iter("shutdown", chunk):
            yield self.completed()

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
        server_bytes}} (`streamtap.engine.api` docstring: port reuse and equal ports). Call
        `flush()` first to include the streams still open. Empty with
        `Reassembler(summary=False)`."""
        return streams_dict(self._kept or ())

    def _counted_decoders(self) -> list[Decoder]:
        out = list(self._decoders.values())
        if self.count_complement:
            out += self._cdecoders.values()
        return out

    @property
    def malformed(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for d in self._counted_decoders():
            total.update(d.malformed)
        return total

    @property
    def skipped(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for d in self._counted_decoders():
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
    """The get_streams() dict of these streams (`streamtap.engine.api` docstring)."""
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


class Pipeline:
    """Capture files through one `Reassembler`: `batches()` yields streams as they complete.
    One use per instance.

    >>> p = Pipeline(["a.pcap", "b.pcap"], cfg, bpf="tcp port 80")
    >>> for streams in p.batches(): ...     # a list per capture batch, often empty
    """

    def __init__(self, paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                 config: ConfigLike = None, *, bpf: str | None = None,
                 count: int | None = None, summary: bool = False,
                 shard: tuple[int, int] | None = None, complement: Batches | None = None,
                 ) -> None:
        """`shard` = (n, k): read only shard k of n of one capture file (`ShardSource`, which
        takes `complement`), as worker k of n parallel readers does; the reassembler then
        enforces 1/n of the memory cap, and only shard 0 counts the complement's packets
        (each is read by every shard)."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [os.fspath(p) for p in paths]
        self.bpf = bpf
        self.count = count  # stop after this many packets (tcpdump -c)
        if shard is not None and (len(self.paths) != 1 or count is not None):
            raise ValueError("a shard reads one file, without a packet count")
        self.shard = shard
        self.complement = complement
        self.reassembler = Reassembler(config, summary=summary,
                                       workers=1 if shard is None else shard[0])
        if shard is not None:
            self.reassembler.shard = shard
            self.reassembler.count_complement = shard[1] == 0
        self.source: Sources | ShardSource | None = None
        self.last_time: float | None = None  # the latest packet time read (any packet)

    def open(self) -> None:
        """Open every capture now (else the first `batches()` step does). Raises
        `CaptureError` or `FilterError`."""
        if self.source is None:
            if self.shard is not None:
                self.source = ShardSource(self.paths[0], self.bpf, *self.shard,
                                          complement=self.complement)
            else:
                self.source = Sources(self.paths, self.bpf)

    @property
    def packets(self) -> int:
        return self.reassembler.packets

    @property
    def total_size(self) -> int | None:
        """Bytes of all captures (None when one is not a regular file): for a progress bar."""
        if isinstance(self.source, ShardSource):
            return self.source.size
        return self.source.total_size if self.source is not None else None

    @property
    def bytes_read(self) -> int:
        return self.source.bytes_read if self.source is not None else 0

    def batches(self, end_time: Callable[[float | None], float | None] | None = None,
                ) -> Iterator[list[Stream]]:
        """The streams completed by each capture batch, then the end-of-input flush.

        Before the flush, time advances to the latest packet time read (any packet the filter
        let through, TCP or not): a stream whose idle timeout passed before the end of the
        capture closes "timeout", not "shutdown", however the packets were split among
        shards. `end_time(latest)` may replace that time: a parallel reader's shard gets the
        latest time of all shards there."""
        self.open()
        assert self.source is not None
        r = self.reassembler
        sharded = isinstance(self.source, ShardSource)
        try:
            for batch in self.source:
                linktype, data, meta = batch[:3]
                if self.count is not None:
                    left = self.count - r.packets
                    if left <= 0:
                        break
                    if len(meta) // META_LEN > left:
                        meta = meta[: left * META_LEN]
                self._see_time(meta)
                if sharded and batch[3]:  # type: ignore[misc]
                    r.feed_complement(linktype, data, meta)
                else:
                    r.feed_batch(linktype, data, meta)
                yield r.completed()
        except (CaptureError, UnsupportedLinkType):
            yield from self._end(end_time)  # what was read before the damage is the user's
            raise
        yield from self._end(end_time)

    def _see_time(self, meta: bytes) -> None:
        if not meta:
            return
        words = memoryview(meta).cast("I")
        sec, usec = max(zip(words[0::4], words[1::4], strict=True))
        t = sec + usec * 1e-6
        if self.last_time is None or t > self.last_time:
            self.last_time = t

    def _end(self, end_time: Callable[[float | None], float | None] | None,
             ) -> Iterator[list[Stream]]:
        last = self.last_time if end_time is None else end_time(self.last_time)
        r = self.reassembler
        if last is not None:
            r.advance(last)
            yield r.completed()
        yield from r.flush_batches()

    def flush(self) -> list[Stream]:
        """Every stream still open, closed now ("shutdown"), and any completed but not handed
        over: for a consumer that stopped `batches()` early and still wants them."""
        return self.reassembler.flush()

    @property
    def stats(self) -> dict[str, Any]:
        return self.reassembler.stats
