"""In-tree PEP 517 backend: setuptools, plus the engine modules compiled with Cython 3.

pyproject.toml names this module (`backend-path = ["packaging/backend"]`), so `pip install .`,
`pip install -e .` and `python -m build` compile without a setup.py at the repository root.
Everything is setuptools' own backend; the only addition is `ext_modules`, built from the one
list of compiled modules, `COMPILED_MODULES` in daemon/engine/compiled.py (read by
engine_modules.py with ast: the package is not importable while it is being built). Each listed
module is an annotated .py file compiled in Cython's pure-Python mode; the .py is installed next to
the extension, which the import system prefers. An empty list builds a pure-Python package, as
before.
"""

from __future__ import annotations

import os

import setuptools
from engine_modules import module_sources
from setuptools.build_meta import *  # noqa: F403  (the PEP 517 hooks this backend re-exports)


def extensions() -> list[setuptools.Extension]:
    sources = module_sources()
    # STREAMTAP_COMPILE=0: a pure-Python build, for `make typecheck`'s throwaway install (mypy
    # reads the .py files; compiling them there would only add the C compiler's time)
    if not sources or os.environ.get("STREAMTAP_COMPILE", "1") == "0":
        return []
    from Cython.Build import cythonize  # a build requirement (pyproject), so only needed here

    exts = [setuptools.Extension(name, [src]) for name, src in sources.items()]
    # Extension names are the installed names (streamtap.engine.wheel), not the tree's
    # (daemon.engine.wheel): cythonize keeps them, so the module's and its classes' names are right.
    # the generated C goes to build/cython/, so it is neither next to the source (nor in git)
    # nor picked up as package data into the wheel
    return cythonize(exts, compiler_directives={"language_level": 3}, quiet=True,
                     build_dir="build/cython", include_path=[pxd_root()])


def pxd_root() -> str:
    """A directory where the package's name leads to its sources (build/cython/pxd/streamtap ->
    daemon): Cython finds a module's .pxd (flowtable.pxd beside flowtable.py) by the module's
    installed name, streamtap.engine.flowtable, which the source tree does not spell."""
    root = os.path.join("build", "cython", "pxd")
    link = os.path.join(root, "streamtap")
    os.makedirs(root, exist_ok=True)
    if not os.path.islink(link):
        os.symlink(os.path.join("..", "..", "..", "daemon"), link)
    return root


_setup = setuptools.setup


def _setup_with_extensions(**attrs: object) -> object:
    attrs.setdefault("ext_modules", extensions())
    return _setup(**attrs)


# setuptools' backend runs `setuptools.setup()` when there is no setup.py (it looks the name up
# when it runs), so this is where the extensions join the otherwise declarative configuration.
setuptools.setup = _setup_with_extensions  # type: ignore[assignment]

