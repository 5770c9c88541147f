"""JSON Lines sink: one stream record per line, to a file or stdout."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import IO

from streamtap.record import to_json
from streamtap.stream import Stream


class JsonlSink:
    """Writes records to `path` ("-" = stdout), payloads encoded as `payload_encoding`."""

    name = "jsonl"

    def __init__(
        self, path: str = "-", payload_encoding: str = "base64", max_payload: int | None = None
    ) -> None:
        self.path = path
        self.payload_encoding = payload_encoding
        self.max_payload = max_payload or None
        self._f: IO[str] | None = None
        self.records = 0

    def open(self) -> None:
        if self.path == "-":
            self._f = sys.stdout
        else:
            self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held open)

    def write(self, batch: Sequence[Stream]) -> None:
        if self._f is None:
            self.open()
        f = self._f
        assert f is not None
        enc, cap = self.payload_encoding, self.max_payload
        f.write("".join(to_json(s, enc, cap) + "\n" for s in batch))
        self.records += len(batch)

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.flush()
            if self._f is not sys.stdout:
                self._f.close()
            self._f = None
