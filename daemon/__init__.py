"""streamtap: TCP stream reassembly for captures and live interfaces.

    import streamtap
    for s in streamtap.reassemble("x.pcap", bpf="tcp port 80"):
        print(s.client, s.server, len(s.client_data), len(s.server_data))
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Reassembler", "Stream", "get_streams", "reassemble", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import streamtap.config` (the CLI's first step) does not load the engine.
    if name in ("Reassembler", "get_streams", "reassemble"):
        from . import api

        return getattr(api, name)
    if name == "Stream":
        from .stream import Stream

        return Stream
    raise AttributeError(name)
