"""streamtap: TCP stream reassembly for captures and live interfaces.

    import streamtap
    for s in streamtap.reassemble("x.pcap", bpf="tcp port 80"):
        print(s.client, s.server, len(s.client_data), len(s.server_data))

Every error streamtap raises on bad input or failure (capture, filter, config, sink, link type)
is a :class:`streamtap.Error`.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from streamtap.engine.compiled import COMPILED_MODULES, forced_python
from streamtap.errors import Error

__version__ = "0.1.0"
__all__ = ["Error", "Reassembler", "Stream", "get_streams", "reassemble", "__version__"]


class _SourceEngineFinder(importlib.abc.MetaPathFinder):
    """STREAMTAP_ENGINE=python: load the compiled modules from their .py source.

    The import system prefers an extension module (.so) over a .py of the same name in the same
    directory; this finder runs first and answers only for the listed modules, so the rest of
    the package imports as usual.
    """

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED_MODULES or not path:
            return None
        leaf = fullname.rpartition(".")[2]
        for entry in path:
            src = os.path.join(entry, leaf + ".py")
            if os.path.isfile(src):
                return importlib.util.spec_from_file_location(fullname, src)
        return None


if forced_python() and not any(isinstance(f, _SourceEngineFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _SourceEngineFinder())


def __getattr__(name: str) -> Any:
    # Lazy, so `import streamtap.config` (the CLI's first step) does not load the engine.
    if name in ("Reassembler", "get_streams", "reassemble"):
        from streamtap.engine import api

        return getattr(api, name)
    if name == "Stream":
        from streamtap.engine.stream import Stream

        return Stream
    raise AttributeError(name)
