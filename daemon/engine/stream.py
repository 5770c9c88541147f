"""The completed stream, what the reassembler hands to sinks and to library users, and its
record: the JSON form that sinks write (README "Stream record"). One module, so that `Stream`
and the functions that render it need not import each other.

The record is nested, ECS-flavoured, with keys always in this order::

    {"stream": {"id", "part"},
     "event": {"start", "end", "duration"},
     "network": {"community_id", "transport", "type"},
     "source": {"ip", "port", "bytes", "packets", "offset", "payload"},        # the client
     "destination": {"ip", "port", "bytes", "packets", "offset", "payload"},   # the server
     "tcp": {"state", "history", "close_reason", "client_rule", "missed_bytes", "gaps",
             "retransmitted_bytes", "overlaps", "truncated"},
     "observer": {"ingress": {"interface": {"name"}}},               # only with an interface
     "streamtap": {"payload_encoding", "payload_truncated"}}

`event.start`/`end` are ISO 8601 UTC with microseconds and a "Z"; `event.duration` is integer
nanoseconds (ECS), computed from the microsecond-rounded start and end so it agrees with them.

Two renderings of the same record: `to_record` builds the dict (the CouchDB and files sinks, the
library), `to_json_chunks` writes the JSON bytes directly (the JSON Lines sink, the spool), with
each payload's base64 as its own chunk so the payload is copied once, by the encoder, on its way
to `os.writev`. `to_json_chunks` must stay byte-identical to `json.dumps(to_record(...))`:
tests/test_record.py checks that on generated streams and on the corpus.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _quote
from typing import Any

import pybase64

from streamtap.engine.communityid import community_id, community_id_packed, pack_ip

# SIMD base64 (AVX2/AVX-512/NEON): ~6x binascii on bulk payloads, the same bytes
_b64encode: Callable[[Any], bytes] = pybase64.b64encode

__all__ = [
    "CLIENT_RULES",
    "CLOSE_REASONS",
    "PAYLOAD_ENCODINGS",
    "Stream",
    "encode_payload",
    "stream_id",
    "to_json",
    "to_json_chunks",
    "to_record",
]

# "part": a long connection's part that is not its last (DESIGN "Pinned details": "Parts")
CLOSE_REASONS = ("fin", "rst", "timeout", "evicted", "shutdown", "part")
CLIENT_RULES = ("syn", "synack", "port", "first")


@dataclass(slots=True)
class Stream:
    """One TCP connection, both directions reassembled.

    `client` opened the connection (see `client_rule` for how that was decided); `gaps` lists
    skipped byte ranges as (offset, length, dir) where dir is "client" or "server" (the side that
    sent the missing bytes) and offset is the position in that side's delivered data at which the
    missing bytes would have been.

    A long connection is emitted in parts: `part` counts them from 0 (a stream emitted whole is
    part 0), and `client_offset` / `server_offset` say where this part's bytes start in each
    direction's stream.
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

_DAY_FORMAT = "%Y-%m-%dT"
_DAYS: dict[int, str] = {}  # day number since the epoch -> "YYYY-MM-DDT"
_DAYS_MAX = 4096

# A payload whose encoding is shorter than this is folded into the record's text: a few more
# bytes copied cost less than one more iovec and one more bytes object per direction.
_INLINE = 2048


def _micros(t: float) -> int:
    """Seconds since the epoch as integer microseconds (round half to even, like `round`)."""
    return round(t * 1_000_000)


def _iso(us: int) -> str:
    """ISO 8601 UTC with microseconds and a "Z". The date comes from a per-day cache: strftime
    and gmtime for every time were a third of the record's own (non-payload) cost."""
    sec, frac = divmod(us, 1_000_000)
    day, rem = divmod(sec, 86400)
    date = _DAYS.get(day)
    if date is None:
        if len(_DAYS) >= _DAYS_MAX:
            _DAYS.clear()
        date = _DAYS[day] = time.strftime(_DAY_FORMAT, time.gmtime(day * 86400))
    hour, rem = divmod(rem, 3600)
    minute, second = divmod(rem, 60)
    return f"{date}{hour:02d}:{minute:02d}:{second:02d}.{frac:06d}Z"


def _stream_id(a: bytes, a_port: int, b: bytes, b_port: int, start_us: int) -> str:
    return hashlib.sha256(
        b"".join((a, a_port.to_bytes(2, "big"), b, b_port.to_bytes(2, "big"),
                  start_us.to_bytes(8, "big", signed=True)))
    ).hexdigest()[:32]


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
    ("::1" vs "0:0::1"). Every part of a long connection has its stream's id.
    """
    return _stream_id(pack_ip(s.client[0]), s.client[1], pack_ip(s.server[0]), s.server[1],
                      _micros(s.start))


def _ids(s: Stream, start_us: int) -> tuple[str, str]:
    """(stream id, Community ID), packing each address once for both."""
    (cip, cport), (sip, sport) = s.client, s.server
    a, b = pack_ip(cip), pack_ip(sip)
    if len(a) != len(b):
        raise ValueError(f"mixed address families: {cip!r} and {sip!r}")
    return _stream_id(a, cport, b, sport, start_us), community_id_packed(a, cport, b, sport)


def encode_payload(data: bytes | memoryview, encoding: str) -> str | None:
    """`data` as a JSON string: base64 | hex | utf8 (lossy, U+FFFD for bad bytes) | none (None)."""
    if encoding == "base64":
        return _b64encode(data).decode("ascii")
    if encoding == "hex":
        return binascii.hexlify(data).decode("ascii")
    if encoding == "utf8":
        return str(data, "utf-8", "replace")
    if encoding == "none":
        return None
    raise ValueError(f"unknown payload encoding {encoding!r}; expected one of {PAYLOAD_ENCODINGS}")


def _check(payload: str, max_payload: int | None) -> None:
    if payload not in PAYLOAD_ENCODINGS:
        raise ValueError(
            f"unknown payload encoding {payload!r}; expected one of {PAYLOAD_ENCODINGS}"
        )
    if max_payload is not None and max_payload < 0:
        raise ValueError(f"max_payload must be >= 0, got {max_payload}")


def _capped(data: bytes | memoryview, max_payload: int | None) -> tuple[Any, bool]:
    """(`data` cut to `max_payload` bytes, whether it was cut): a memoryview, not a copy."""
    if max_payload is not None and len(data) > max_payload:
        return memoryview(data)[:max_payload], True
    return data, False


def to_record(s: Stream, payload: str = "base64", max_payload: int | None = None) -> dict[str, Any]:
    """The record of `s` as a dict (layout: "The record" in the module docstring).

    `payload` picks the encoding of each direction's bytes (`encode_payload`); with "none" the
    `payload` keys are left out. `max_payload` caps each direction's payload to that many bytes
    before encoding; `source.bytes`/`destination.bytes` stay the true totals and
    `streamtap.payload_truncated` says whether any payload was cut (always False with "none").
    """
    _check(payload, max_payload)
    cdata, sdata = s.client_data, s.server_data
    source: dict[str, Any] = {
        "ip": s.client[0],
        "port": s.client[1],
        "bytes": len(cdata),
        "packets": s.client_packets,
        "offset": s.client_offset,
    }
    destination: dict[str, Any] = {
        "ip": s.server[0],
        "port": s.server[1],
        "bytes": len(sdata),
        "packets": s.server_packets,
        "offset": s.server_offset,
    }
    truncated = False
    if payload != "none":
        cdata, ccut = _capped(cdata, max_payload)
        sdata, scut = _capped(sdata, max_payload)
        truncated = ccut or scut
        source["payload"] = encode_payload(cdata, payload)
        destination["payload"] = encode_payload(sdata, payload)

    start_us = _micros(s.start)
    end_us = _micros(s.end)
    sid, cid = _ids(s, start_us)
    rec: dict[str, Any] = {
        "stream": {"id": sid, "part": s.part},
        "event": {
            "start": _iso(start_us),
            "end": _iso(end_us),
            "duration": max(0, end_us - start_us) * 1000,
        },
        "network": {
            "community_id": cid,
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


def _encoded(data: Any, payload: str) -> bytes:
    """One direction's payload as the bytes of its JSON string, quotes included for utf8 only
    (base64 and hex never need escaping: their quotes are in the surrounding text)."""
    if payload == "base64":
        return _b64encode(data)
    if payload == "hex":
        return binascii.hexlify(data)
    return _quote(str(data, "utf-8", "replace")).encode("ascii")


def _json_value(v: Any) -> str:
    """A scalar as json.dumps writes it: the record's ints, strings and bools take the fast
    paths, anything else (None, an int subclass, a float) goes through json.dumps itself, so
    the two renderings can never disagree."""
    t = type(v)
    if t is int:
        return int.__repr__(v)
    if t is str:
        return _quote(v)
    if v is True:
        return "true"
    if v is False:
        return "false"
    return json.dumps(v)


def to_json_chunks(s: Stream, payload: str = "base64", max_payload: int | None = None,
                   end: str = "") -> list[bytes]:
    """The record as compact JSON bytes, in chunks whose concatenation is exactly
    ``json.dumps(to_record(s, payload, max_payload), separators=(",", ":")).encode() + end``.

    A payload of `_INLINE` encoded bytes or more is a chunk of its own, the encoder's output
    as it came (`os.writev` takes the list as it is); the text around it is ASCII (escaped as
    json.dumps escapes). `end` is appended to the last chunk (the JSON Lines newline).
    """
    _check(payload, max_payload)
    cdata, sdata = s.client_data, s.server_data
    (cip, cport), (sip, sport) = s.client, s.server
    start_us = _micros(s.start)
    end_us = _micros(s.end)
    sid, cid = _ids(s, start_us)
    jv = _json_value
    head = (
        f'{{"stream":{{"id":"{sid}","part":{jv(s.part)}}},'
        f'"event":{{"start":"{_iso(start_us)}","end":"{_iso(end_us)}",'
        f'"duration":{max(0, end_us - start_us) * 1000}}},'
        f'"network":{{"community_id":"{cid}","transport":"tcp",'
        f'"type":"{"ipv6" if s.ip_version == 6 else "ipv4"}"}},'
        f'"source":{{"ip":{jv(cip)},"port":{jv(cport)},"bytes":{len(cdata)},'
        f'"packets":{jv(s.client_packets)},"offset":{jv(s.client_offset)}'
    )
    mid = (
        f'}},"destination":{{"ip":{jv(sip)},"port":{jv(sport)},"bytes":{len(sdata)},'
        f'"packets":{jv(s.server_packets)},"offset":{jv(s.server_offset)}'
    )
    gaps = ",".join([
        f'{{"dir":{jv(d)},"offset":{jv(off)},"length":{jv(n)}}}'
        for off, n, d in s.gaps
    ])
    observer = "" if s.interface is None else \
        f'"observer":{{"ingress":{{"interface":{{"name":{jv(s.interface)}}}}}}},'
    truncated = False
    chunks: list[bytes] = []
    if payload != "none":
        cdata, ccut = _capped(cdata, max_payload)
        sdata, scut = _capped(sdata, max_payload)
        truncated = ccut or scut
        quote = "" if payload == "utf8" else '"'
        text = head + ',"payload":' + quote
        for data, after in ((cdata, quote + mid + ',"payload":' + quote), (sdata, quote)):
            enc = _encoded(data, payload)
            if len(enc) < _INLINE:
                text += enc.decode("ascii") + after
            else:
                chunks.append(text.encode("ascii"))
                chunks.append(enc)
                text = after
    else:
        text = head + mid
    text += (
        f'}},"tcp":{{"state":{jv(s.state)},'
        f'"history":{jv(s.history)},'
        f'"close_reason":{jv(s.close_reason)},'
        f'"client_rule":{jv(s.client_rule)},'
        f'"missed_bytes":{jv(s.missed_bytes)},"gaps":[{gaps}],'
        f'"retransmitted_bytes":{jv(s.retransmitted_bytes)},'
        f'"overlaps":{jv(s.overlaps)},"truncated":{jv(s.truncated)}}},'
        f'{observer}"streamtap":{{"payload_encoding":"{payload}",'
        f'"payload_truncated":{"true" if truncated else "false"}}}}}{end}'
    )
    chunks.append(text.encode("ascii"))
    return chunks


def to_json(s: Stream, payload: str = "base64", max_payload: int | None = None) -> str:
    """The record as one compact JSON line (ASCII only, no trailing newline): exactly
    ``json.dumps(to_record(s, payload, max_payload), separators=(",", ":"))``."""
    return b"".join(to_json_chunks(s, payload, max_payload)).decode("ascii")
