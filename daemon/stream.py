"""The completed stream: what the reassembler hands to sinks and to library users."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CLOSE_REASONS = ("fin", "rst", "timeout", "evicted", "shutdown")
CLIENT_RULES = ("syn", "synack", "port", "first")


@dataclass(slots=True)
class Stream:
    """One TCP connection, both directions reassembled.

    `client` opened the connection (see `client_rule` for how that was decided); `gaps` lists
    skipped byte ranges as (offset, length, dir) where dir is "client" or "server" (the side that
    sent the missing bytes) and offset is the position in that side's delivered data at which the
    missing bytes would have been.
    """

    client: tuple[str, int]
    server: tuple[str, int]
    client_data: bytes
    server_data: bytes
    close_reason: str
    gaps: list[tuple[int, int, str]]
    start: float
    end: float
    ip_version: int
    client_packets: int = 0
    server_packets: int = 0
    client_rule: str = "syn"
    history: str = ""
    state: str = ""
    retransmitted_bytes: int = 0
    overlaps: int = 0
    truncated: bool = False
    interface: str | None = None
    # Raw packets as captured, only when a consumer (the pcap sink) asked for them:
    # [(ts, wire_len, frame_bytes)], linktype in `linktype`; every frame, each fragment of a
    # fragmented IP datagram included, in capture order.
    packets: list[tuple[float, int, bytes]] | None = None
    linktype: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def missed_bytes(self) -> int:
        return sum(g[1] for g in self.gaps)

    @property
    def id(self) -> str:
        from .record import stream_id

        return stream_id(self)

    @property
    def community_id(self) -> str:
        from .communityid import community_id

        return community_id(self.client[0], self.client[1], self.server[0], self.server[1])

    def record(self, payload: str = "base64", max_payload: int | None = None) -> dict[str, Any]:
        """The JSONL/CouchDB record as a dict (see README "Stream record")."""
        from .record import to_record

        return to_record(self, payload=payload, max_payload=max_payload)
