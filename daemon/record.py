"""A completed `Stream` as the JSON record that sinks write (README "Stream record").

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
import binascii
import calendar
import hashlib
import json
import time
from typing import Any

from .communityid import community_id, pack_ip
from .stream import Stream

__all__ = [
    "PAYLOAD_ENCODINGS",
    "encode_payload",
    "decode_payload",
    "from_record",
    "stream_id",
    "to_json",
    "to_record",
]

PAYLOAD_ENCODINGS = ("base64", "hex", "utf8", "none")

_ISO_FORMAT = "%Y-%m-%dT%H:%M:%S"


def _micros(t: float) -> int:
    """Seconds since the epoch as integer microseconds (round half to even, like `round`)."""
    return round(t * 1_000_000)


def _iso(us: int) -> str:
    sec, frac = divmod(us, 1_000_000)
    return time.strftime(_ISO_FORMAT, time.gmtime(sec)) + f".{frac:06d}Z"


def _parse_iso(text: str) -> int:
    """Inverse of `_iso`: integer microseconds since the epoch."""
    if not text.endswith("Z"):
        raise ValueError(f"not a UTC timestamp ending in 'Z': {text!r}")
    whole, _, frac = text[:-1].partition(".")
    sec = calendar.timegm(time.strptime(whole, _ISO_FORMAT))
    micro = int(frac.ljust(6, "0")[:6]) if frac else 0
    return sec * 1_000_000 + micro


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


def decode_payload(text: str | None, encoding: str) -> bytes:
    """Inverse of `encode_payload`. Exact for base64 and hex; utf8 gives the UTF-8 encoding of
    the (possibly lossy) text; none, or a missing payload, gives b""."""
    if text is None or encoding == "none":
        return b""
    if encoding == "base64":
        try:
            return base64.b64decode(text, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"bad base64 payload: {exc}") from None
    if encoding == "hex":
        return bytes.fromhex(text)
    if encoding == "utf8":
        return text.encode("utf-8")
    raise ValueError(f"unknown payload encoding {encoding!r}; expected one of {PAYLOAD_ENCODINGS}")


def to_record(s: Stream, payload: str = "base64", max_payload: int | None = None) -> dict[str, Any]:
    """The record of `s` as a dict (see the module docstring for the layout).

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


def from_record(d: dict[str, Any]) -> Stream:
    """Rebuild a `Stream` from a record (spool replay, tests).

    Exact for base64 and hex records that were not truncated, up to the microsecond rounding of
    start/end (so `stream_id` round-trips). A truncated record gives the truncated payloads;
    utf8 records give the UTF-8 encoding of the lossy text; "none" records give b"". Raw
    packets and `extra` are not part of the record and come back empty.
    """
    src, dst, tcp, event = d["source"], d["destination"], d["tcp"], d["event"]
    encoding = d.get("streamtap", {}).get("payload_encoding", "base64")
    iface = d.get("observer", {}).get("ingress", {}).get("interface", {}).get("name")
    return Stream(
        client=(src["ip"], int(src["port"])),
        server=(dst["ip"], int(dst["port"])),
        client_data=decode_payload(src.get("payload"), encoding),
        server_data=decode_payload(dst.get("payload"), encoding),
        close_reason=tcp["close_reason"],
        gaps=[(int(g["offset"]), int(g["length"]), g["dir"]) for g in tcp.get("gaps", [])],
        start=_parse_iso(event["start"]) / 1_000_000,
        end=_parse_iso(event["end"]) / 1_000_000,
        ip_version=6 if d.get("network", {}).get("type") == "ipv6" else 4,
        client_packets=int(src.get("packets", 0)),
        server_packets=int(dst.get("packets", 0)),
        client_rule=tcp.get("client_rule", "syn"),
        history=tcp.get("history", ""),
        state=tcp.get("state", ""),
        retransmitted_bytes=int(tcp.get("retransmitted_bytes", 0)),
        overlaps=int(tcp.get("overlaps", 0)),
        truncated=bool(tcp.get("truncated", False)),
        interface=iface,
    )
