"""The one list of Cython-compiled modules, read from daemon/engine/compiled.py without
importing it.

Stdlib only, so the Makefile can ask for the sources before any venv exists:

    python3 packaging/backend/engine_modules.py   # their .py (and .pxd) files, space-separated
"""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENGINE_FILE = "daemon/engine/compiled.py"


def compiled_modules(root: Path = ROOT) -> list[str]:
    """COMPILED_MODULES from daemon/engine/compiled.py, without importing the package."""
    tree = ast.parse((root / ENGINE_FILE).read_text(encoding="utf-8"))
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == "COMPILED_MODULES":
            value = ast.literal_eval(node.value)  # type: ignore[union-attr, arg-type]
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{ENGINE_FILE}: COMPILED_MODULES must be a tuple of strings")
            return list(value)
    raise ValueError(f"{ENGINE_FILE}: no COMPILED_MODULES")


def module_sources(root: Path = ROOT) -> dict[str, str]:
    """Module name -> its .py source, relative to the root, through pyproject's package-dir."""
    with open(root / "pyproject.toml", "rb") as f:
        package_dir: dict[str, str] = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    out = {}
    for name in compiled_modules(root):
        # the longest package-dir entry that holds the module (streamtap.engine.wheel lives
        # in daemon/engine/wheel.py through "streamtap" = "daemon")
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            pkg = ".".join(parts[:cut])
            if pkg in package_dir:
                src = "/".join([package_dir[pkg], *parts[cut:]]) + ".py"
                break
        else:
            raise ValueError(f"{ENGINE_FILE}: {name}: no package-dir entry holds it")
        if not (root / src).is_file():
            raise ValueError(f"{ENGINE_FILE}: {name}: {src} not found")
        out[name] = src
    return out


def build_inputs(root: Path = ROOT) -> list[str]:
    """The listed modules' .py files and the .pxd declarations beside them (an edit to either
    must recompile)."""
    out = []
    for src in module_sources(root).values():
        out.append(src)
        pxd = src[: -len(".py")] + ".pxd"
        if (root / pxd).is_file():
            out.append(pxd)
    return out


if __name__ == "__main__":
    print(" ".join(build_inputs()))
    sys.exit(0)
