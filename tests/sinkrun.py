"""Drive a sink directly, as the runner would: open, write, close (tests of the built-in sinks)."""

from __future__ import annotations

from collections.abc import Sequence

from streamtap.engine.stream import Stream
from streamtap.sinks.base import OK, Sink


def write_batches(sink: Sink, *batches: Sequence[Stream]) -> Sink:
    """Open `sink`, write each batch (each must be stored: `Result.ok`), close it even when one
    is not; returns the sink for its counters."""
    sink.open()
    try:
        for batch in batches:
            res = sink.write(batch)
            assert res.status == OK, res
    finally:
        sink.close()
    return sink
