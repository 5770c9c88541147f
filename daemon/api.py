"""The library API: `reassemble()` for a capture file, `Reassembler` to feed packets yourself."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from .decode import Decoder
from .flowtable import FlowTable, Limits
from .reader import CaptureError, read
from .stream import Stream


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
        self._summary: dict[str, dict[int, int]] | None = {} if summary else None
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
        if self._summary is not None:
            for s in done:
                self._summary[_summary_key(s)] = {
                    s.client[1]: len(s.client_data), s.server[1]: len(s.server_data)
                }
        return done

    def flush(self) -> list[Stream]:
        """End of input: close every open stream (close_reason "shutdown") and return them with
        anything else completed."""
        self.table.flush("shutdown")
        return self.completed()

    def summary(self) -> dict[str, dict[int, int]]:
        """{key: {client_port: client_bytes, server_port: server_bytes}} for every completed
        stream: the shape of the scapy stream extractor's get_streams(). key is
        "client_ip:client_port-server_ip:server_port" (IPv6 addresses in brackets)."""
        return dict(self._summary or {})

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
        t = self.table.stats
        return {
            "packets": self.packets,
            "streams": {k[8:]: v for k, v in t.items() if k.startswith("streams_")},
            "evicted": {k[8:]: v for k, v in t.items() if k.startswith("evicted_")},
            "malformed": dict(self.malformed),
            "skipped": dict(self.skipped),
            "gaps": t["gaps"],
            "missed_bytes": self.table.gap_bytes,
            "flows_active": self.table.nflows,
        }


def _summary_key(s: Stream) -> str:
    def ep(ip: str, port: int) -> str:
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"

    return f"{ep(*s.client)}-{ep(*s.server)}"


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
