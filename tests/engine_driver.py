"""Reassemble captures one by one in this process and write every stream as JSON Lines.

    python tests/engine_driver.py OUT.jsonl CAPTURE...

Used by tests/test_engines.py, once per engine (STREAMTAP_ENGINE=python or not): each capture
gets a header line {"file": NAME, "engine": ...} and then its streams, encoded by the JSON Lines
sink as the CLI writes them; a capture the reader rejects gets {"file": NAME, "error": ...}
instead of a traceback. Each file is reassembled on its own (the CLI merges several -r files by
timestamp, which changes the streams), and one process serves the whole corpus.
"""

from __future__ import annotations

import json
import sys

import streamtap
from streamtap.engine.compiled import engine
from streamtap.sinks.jsonl import JsonlSink


def main(argv: list[str]) -> int:
    out_path, paths = argv[0], argv[1:]
    sink = JsonlSink("diff", {"path": out_path})
    name = engine()
    with open(out_path, "wb") as out:
        for path in paths:
            head = {"file": path, "engine": name}
            streams = []
            try:
                streams = list(streamtap.reassemble(path))
            except Exception as e:  # the same failure under both engines is what counts
                head["error"] = f"{type(e).__name__}: {e}"
            out.write(json.dumps(head).encode() + b"\n")
            out.write(sink.encode(streams))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
