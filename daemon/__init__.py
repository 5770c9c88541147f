"""streamtap: TCP stream reassembly for captures and live interfaces.

    import streamtap
    for s in streamtap.reassemble("x.pcap", bpf="tcp port 80"):
        print(s.client, s.server, len(s.client_data), len(s.server_data))

Every error streamtap raises on bad input or failure (capture, filter, config, sink, link type)
is a :class:`streamtap.Error`.
"""

from __future__ import annotations

from typing import Any

from .errors import Error

__version__ = "0.1.0"
__all__ = ["Error", "Reassembler", "Stream", "get_streams", "reassemble", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import streamtap.config` (the CLI's first step) does not load the engine.
    if name in ("Reassembler", "get_streams", "reassemble"):
        from . import api

        return getattr(api, name)
    if name == "Stream":
        from .stream import Stream

        return Stream
    raise AttributeError(name)
