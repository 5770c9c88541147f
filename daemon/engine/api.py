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

import os
from collections.abc import Iterator, Sequence

from streamtap.engine.pipeline import ConfigLike, Pipeline, Reassembler, streams_dict
from streamtap.engine.stream import Stream

__all__ = ["Reassembler", "get_streams", "reassemble", "streams_dict"]


def get_streams(
    path_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
    bpf: str | None = None,
    config: ConfigLike = None,
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
    config: ConfigLike = None,
) -> Iterator[Stream]:
    """Reassemble one capture (or several, merged by timestamp) and yield each completed stream.

    A generator: streams come out as they complete, so memory stays bounded by the open
    connections (and the configured limits), not by the size of the capture. A damaged file
    raises `CaptureError` after every stream read before the damage has been yielded.
    """
    for streams in Pipeline(path_or_paths, config, bpf=bpf).batches():
        yield from streams
