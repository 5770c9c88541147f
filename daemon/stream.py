"""The completed stream, what the reassembler hands to sinks and to library users, and its
record: the JSON form that sinks write (README "Stream record"). One module, so that `Stream`
and the functions that render it need not import each other.

The record is nested, ECS-flavoured, with keys always in this order::

    {"stream": {"id"},
     "event": {"start", "end", "duration"},
     "network": {"community_id", "transport", "type"},
     "source": {"ip", "port", "bytes", "packets", "payload"},        # the client
     "destination": {"ip", "port", "bytes", "packets", "payload"},   # the server
     "tcp": {"state", "history", "close_reason", "client_rule", "missed_bytes", "gaps",
             "retransmitted_bytes", "overlaps", "truncated"},
     "observer": {"ingress": {"interface": {"name"}}},               # only with an interface
     "streamtap": {"payload_encoding", "payload_truncated"}}

`event.start`/`end` are ISO 8601 UTC with microseconds and a "Z"; `event.duration` is integer
nanoseconds (ECS), computed from the microsecond-rounded start and end so it agrees with them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from .communityid import community_id, pack_ip

__all__ = [
    "CLIENT_RULES",
    "CLOSE_REASONS",
    "PAYLOAD_ENCODINGS",
    "Stream",
    "encode_payload",
    "stream_id",
    "to_json",
    "to_record",
]

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
    part: int = 0
    client_offset: int = 0
    server_offset: int = 0

    @property
    def missed_bytes(self) -> int:
        return sum(g[1] for g in self.gaps)

    @property
    def id(self) -> str:
        return stream_id(self)

    @property
    def community_id(self) -> str:
        return community_id(self.client[0], self.client[1], self.server[0], self.server[1])

    def record(self, payload: str = "base64", max_payload: int | None = None) -> dict[str, Any]:
        """The JSONL/CouchDB record as a dict (see README "Stream record")."""
        return to_record(self, payload=payload, max_payload=max_payload)


PAYLOAD_ENCODINGS = ("base64", "hex", "utf8", "none")

_ISO_FORMAT = "%Y-%m-%dT%H:%M:%S"


def _micros(t: float) -> int:
    """Seconds since the epoch as integer microseconds (round half to even, like `round`)."""
    return round(t * 1_000_000)


def _iso(us: int) -> str:
    sec, frac = divmod(us, 1_000_000)
    return time.strftime(_ISO_FORMAT, time.gmtime(sec)) + f".{frac:06d}Z"


def stream_id(s: Stream) -> str:
    """Deterministic id of a stream: same capture in, same id out (also the CouchDB `_id`).

    Recipe: the first 32 hex digits (128 bits) of SHA-256 over the concatenation of

    - client address, network byte order (4 bytes IPv4, 16 bytes IPv6)
    - client port, 2 bytes big-endian
    - server address, same encoding
    - server port, 2 bytes big-endian
    - start time (first packet) in integer microseconds since the epoch, rounded to the
      nearest microsecond, 8 bytes big-endian signed

    Using packed addresses makes the id independent of how an address is spelled
    ("::1" vs "0:0::1").
    """
    h = hashlib.sha256(pack_ip(s.client[0]))
    h.update(s.client[1].to_bytes(2, "big"))
    h.update(pack_ip(s.server[0]))
    h.update(s.server[1].to_bytes(2, "big"))
    h.update(_micros(s.start).to_bytes(8, "big", signed=True))
    return h.hexdigest()[:32]


def encode_payload(data: bytes, encoding: str) -> str | None:
    """`data` as a JSON string: base64 | hex | utf8 (lossy, U+FFFD for bad bytes) | none (None)."""
    if encoding == "base64":
        return base64.b64encode(data).decode("ascii")
    if encoding == "hex":
        return data.hex()
    if encoding == "utf8":
        return data.decode("utf-8", errors="replace")
    if encoding == "none":
        return None
    raise ValueError(f"unknown payload encoding {encoding!r}; expected one of {PAYLOAD_ENCODINGS}")


def to_record(s: Stream, payload: str = "base64", max_payload: int | None = None) -> dict[str, Any]:
    """The record of `s` as a dict (layout: "The record" in the module docstring).

    `payload` picks the encoding of each direction's bytes (`encode_payload`); with "none" the
    `payload` keys are left out. `max_payload` caps each direction's payload to that many bytes
    before encoding; `source.bytes`/`destination.bytes` stay the true totals and
    `streamtap.payload_truncated` says whether any payload was cut (always False with "none").
    """
    if payload not in PAYLOAD_ENCODINGS:
        raise ValueError(
            f"unknown payload encoding {payload!r}; expected one of {PAYLOAD_ENCODINGS}"
        )
    if max_payload is not None and max_payload < 0:
        raise ValueError(f"max_payload must be >= 0, got {max_payload}")

    cdata, sdata = s.client_data, s.server_data
    source: dict[str, Any] = {
        "ip": s.client[0],
        "port": s.client[1],
        "bytes": len(cdata),
        "packets": s.client_packets,
    }
    destination: dict[str, Any] = {
        "ip": s.server[0],
        "port": s.server[1],
        "bytes": len(sdata),
        "packets": s.server_packets,
    }
    truncated = False
    if payload != "none":
        if max_payload is not None:
            if len(cdata) > max_payload:
                cdata = cdata[:max_payload]
                truncated = True
            if len(sdata) > max_payload:
                sdata = sdata[:max_payload]
                truncated = True
        source["payload"] = encode_payload(cdata, payload)
        destination["payload"] = encode_payload(sdata, payload)

    start_us = _micros(s.start)
    end_us = _micros(s.end)
    rec: dict[str, Any] = {
        "stream": {"id": stream_id(s)},
        "event": {
            "start": _iso(start_us),
            "end": _iso(end_us),
            "duration": max(0, end_us - start_us) * 1000,
        },
        "network": {
            "community_id": community_id(s.client[0], s.client[1], s.server[0], s.server[1]),
            "transport": "tcp",
            "type": "ipv6" if s.ip_version == 6 else "ipv4",
        },
        "source": source,
        "destination": destination,
        "tcp": {
            "state": s.state,
            "history": s.history,
            "close_reason": s.close_reason,
            "client_rule": s.client_rule,
            "missed_bytes": s.missed_bytes,
            "gaps": [{"dir": d, "offset": off, "length": n} for off, n, d in s.gaps],
            "retransmitted_bytes": s.retransmitted_bytes,
            "overlaps": s.overlaps,
            "truncated": s.truncated,
        },
    }
    if s.interface is not None:
        rec["observer"] = {"ingress": {"interface": {"name": s.interface}}}
    rec["streamtap"] = {"payload_encoding": payload, "payload_truncated": truncated}
    return rec


# Placeholders for the payload strings while the (small) rest of the record is encoded.
_PLACEHOLDERS = (r'"\u0000streamtap-c\u0000"', r'"\u0000streamtap-s\u0000"')


def to_json(s: Stream, payload: str = "base64", max_payload: int | None = None) -> str:
    """The record as one compact JSON line (ASCII only, no trailing newline).

    base64 and hex payloads are pure ASCII that JSON never escapes, so they are spliced in after
    encoding instead of being scanned byte by byte by the JSON encoder: on bulk captures that
    scan was a third of the CLI's time.
    """
    rec = to_record(s, payload, max_payload)
    if payload not in ("base64", "hex"):
        return json.dumps(rec, separators=(",", ":"))
    src, dst = rec["source"], rec["destination"]
    cpay, spay = src["payload"], dst["payload"]
    src["payload"], dst["payload"] = "\0streamtap-c\0", "\0streamtap-s\0"
    line = json.dumps(rec, separators=(",", ":"))
    return line.replace(_PLACEHOLDERS[0], f'"{cpay}"', 1).replace(
        _PLACEHOLDERS[1], f'"{spay}"', 1)
