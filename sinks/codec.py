"""Lossless serialization of a `Stream` for the disk spool.

`encode(s)` is the stream's record (`streamtap.engine.stream.to_json_chunks`, payloads base64, never
capped) with the fields a record does not carry exactly spliced in as extra top-level keys:

- `_start`, `_end`: the exact float timestamps (the record rounds them to microseconds);
- `_ip_version`, `_linktype`;
- `_packets`: `[[ts, wire_len, base64 frame], ...]` or null (raw packets, for the pcap sink);
- `_extra`: `Stream.extra` (JSON values; anything else comes back as its `repr`).

`decode(encode(s))` gives a `Stream` equal to `s` field by field. JSON floats are written with
`repr`, so they round-trip exactly.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Callable
from typing import Any

import pybase64

from streamtap.engine.stream import Stream, to_json_chunks

# the record's own base64 encoder (SIMD)
_b64encode: Callable[[Any], bytes] = pybase64.b64encode

__all__ = ["decode", "encode"]

_a2b = binascii.a2b_base64  # the CRC already vouches for the bytes: no strict check


def encode(s: Stream) -> bytes:
    """`s` as UTF-8 JSON bytes (see the module docstring)."""
    chunks = to_json_chunks(s, "base64")
    packets = s.packets
    extras: dict[str, Any] = {
        "_start": s.start,
        "_end": s.end,
        "_ip_version": s.ip_version,
        "_linktype": s.linktype,
        "_packets": None if packets is None else [
            [ts, wire_len, _b64encode(frame).decode("ascii")] for ts, wire_len, frame in packets
        ],
    }
    if s.extra:
        extras["_extra"] = s.extra
    tail = json.dumps(extras, separators=(",", ":"), default=repr)
    # Both are JSON objects: splice the extras into the record's object (the last chunk is
    # the record's closing text), in the one join that copies the payloads.
    chunks[-1] = chunks[-1][:-1] + b"," + tail[1:].encode("utf-8")
    return b"".join(chunks)


def decode(b: bytes) -> Stream:
    """Inverse of `encode`. Raises ValueError (or a subclass) on malformed input.

    Builds the `Stream` directly from the record's fields (as `from_record` would) but takes
    the exact times from `_start`/`_end` instead of parsing the ISO strings: strptime was a
    third of the replay cost.
    """
    d = json.loads(b)
    if not isinstance(d, dict):
        raise ValueError("spool record is not a JSON object")
    try:
        src, dst, tcp = d["source"], d["destination"], d["tcp"]
        packets = d["_packets"]
        iface = d.get("observer", {}).get("ingress", {}).get("interface", {}).get("name")
        s = Stream(
            client=(src["ip"], int(src["port"])),
            server=(dst["ip"], int(dst["port"])),
            client_data=_a2b(src["payload"]),
            server_data=_a2b(dst["payload"]),
            close_reason=tcp["close_reason"],
            gaps=[(int(g["offset"]), int(g["length"]), g["dir"]) for g in tcp["gaps"]],
            start=float(d["_start"]),
            end=float(d["_end"]),
            ip_version=int(d["_ip_version"]),
            client_packets=int(src["packets"]),
            server_packets=int(dst["packets"]),
            client_rule=tcp["client_rule"],
            history=tcp["history"],
            state=tcp["state"],
            retransmitted_bytes=int(tcp["retransmitted_bytes"]),
            overlaps=int(tcp["overlaps"]),
            truncated=bool(tcp["truncated"]),
            interface=iface,
            packets=None if packets is None else [
                (float(ts), int(wl), _a2b(fr)) for ts, wl, fr in packets],
            linktype=int(d["_linktype"]),
            extra=d.get("_extra") or {},
            # absent from spool records written before parts existed
            part=int(d["stream"].get("part", 0)),
            client_offset=int(src.get("offset", 0)),
            server_offset=int(dst.get("offset", 0)),
        )
    except (KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise ValueError(f"malformed spool record: {exc!r}") from None
    return s
