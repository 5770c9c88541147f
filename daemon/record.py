"""The stream record's functions under their historical name: they live in `streamtap.stream`,
beside `Stream` (one module, no import cycle); the sinks import them from here."""

from __future__ import annotations

from .stream import (
    PAYLOAD_ENCODINGS,
    encode_payload,
    stream_id,
    to_json,
    to_json_chunks,
    to_record,
)

__all__ = [
    "PAYLOAD_ENCODINGS", "encode_payload", "stream_id", "to_json", "to_json_chunks", "to_record",
]
