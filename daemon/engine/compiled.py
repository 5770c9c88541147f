"""Which engine runs: the Cython-compiled build of the hot-path modules, or their Python source.

`COMPILED_MODULES` is the one list of modules compiled by `pip install .` (the in-tree build
backend, packaging/backend/streamtap_build.py, reads it from this file's source) and by the
Makefile's venv. Each is plain annotated Python (Cython's pure-Python mode): the same file runs
uncompiled, which is how `STREAMTAP_ENGINE=python` gets the reference engine even when the
compiled modules are installed (daemon/__init__.py installs a finder that loads them from
source). This module imports nothing of the engine at import time, so that finder can use it.
"""

from __future__ import annotations

import importlib
import os

__all__ = ["COMPILED_MODULES", "ENGINE_ENV", "compiled_modules", "engine", "forced_python"]

# Keep this a literal tuple of strings: the build backend reads it with ast, without importing.
COMPILED_MODULES: tuple[str, ...] = (
    "streamtap.engine.wheel",
    "streamtap.engine.decode",
    "streamtap.engine.defrag",
    "streamtap.engine.reassembly",
    "streamtap.engine.flowtable",
    "streamtap.engine.stream",
)

ENGINE_ENV = "STREAMTAP_ENGINE"


def forced_python() -> bool:
    """True when STREAMTAP_ENGINE=python asks for the pure-Python engine."""
    return os.environ.get(ENGINE_ENV, "").strip().lower() == "python"


def compiled_modules() -> dict[str, bool]:
    """Each listed module and whether the loaded one is a compiled extension."""
    out = {}
    for name in COMPILED_MODULES:
        path = getattr(importlib.import_module(name), "__file__", None) or ""
        # Linux builds end in .so; the check stays right on the other platforms' suffixes too
        out[name] = path.endswith((".so", ".pyd"))
    return out


def engine() -> str:
    """"compiled" when every listed module runs compiled, else "python" (an empty list: python)."""
    mods = compiled_modules()
    return "compiled" if mods and all(mods.values()) else "python"
