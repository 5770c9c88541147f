"""The compiled engine and the Python engine: which one runs, and that they agree byte for byte.

`streamtap.engine.compiled.COMPILED_MODULES` lists the modules Cython compiles (pip install,
make venv); STREAMTAP_ENGINE=python loads them from their .py source instead. The differential tests
run the same captures through both engines, each in its own process, and compare the JSON Lines.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pcapbuild import Conversation, write_pcap

from streamtap import __version__
from streamtap.engine.compiled import (
    COMPILED_MODULES,
    ENGINE_ENV,
    compiled_modules,
    engine,
    forced_python,
)

TESTS = Path(__file__).resolve().parent
STREAMTAP = Path(sys.executable).parent / "streamtap"
DRIVER = TESTS / "engine_driver.py"
CAPTURE_SUFFIXES = (".pcap", ".pcapng", ".cap")


def env_for(which: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != ENGINE_ENV}
    if which == "python":
        env[ENGINE_ENV] = "python"
    return env


def built_extensions() -> list[str]:
    """The listed modules that have a compiled extension next to their source."""
    out = []
    for name in COMPILED_MODULES:
        pkg, _, leaf = name.rpartition(".")
        spec = importlib.util.find_spec(pkg)
        assert spec is not None and spec.submodule_search_locations is not None
        for d in spec.submodule_search_locations:
            if any(os.path.exists(os.path.join(d, leaf + sfx))
                   for sfx in importlib.machinery.EXTENSION_SUFFIXES):
                out.append(name)
                break
    return out


# -- which engine runs -------------------------------------------------------------------------
def test_suite_runs_the_compiled_engine():
    """`make test` tests the build users get: every listed module compiled and loaded as such
    (unless STREAMTAP_ENGINE=python asks for the source on purpose)."""
    if forced_python():
        assert engine() == "python"
        assert not any(compiled_modules().values())
        return
    if not COMPILED_MODULES:
        assert engine() == "python"
        return
    assert built_extensions() == list(COMPILED_MODULES), (
        "the engine modules are not compiled: run `make venv` (pip install -e . builds them)")
    assert compiled_modules() == dict.fromkeys(COMPILED_MODULES, True)
    assert engine() == "compiled"
    for name in COMPILED_MODULES:  # an edit since the build would test stale code
        mod = importlib.import_module(name)
        src = Path(mod.__file__ or "").with_name(name.rpartition(".")[2] + ".py")
        assert os.path.getmtime(mod.__file__ or "") >= os.path.getmtime(src), (
            f"{mod.__file__} is older than {src.name}: run `make venv` to rebuild")


def version(which: str) -> str:
    proc = subprocess.run([str(STREAMTAP), "--version"], capture_output=True, text=True,
                          env=env_for(which), timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_version_names_the_engine():
    expected = "compiled" if COMPILED_MODULES and built_extensions() else "python"
    assert version("default") == f"streamtap {__version__} (engine: {expected})"


def test_env_forces_the_python_engine():
    assert version("python") == f"streamtap {__version__} (engine: python)"


def test_forced_python_loads_every_listed_module_from_source():
    code = ("import importlib, streamtap.engine.compiled as e; "
            "print(*[importlib.import_module(m).__file__ for m in e.COMPILED_MODULES])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env_for("python"), timeout=60)
    assert proc.returncode == 0, proc.stderr
    files = proc.stdout.split()
    assert len(files) == len(COMPILED_MODULES)
    assert all(f.endswith(".py") for f in files), files


# -- differential: the same bytes from both engines --------------------------------------------
def synthetic_captures(d: Path) -> list[Path]:
    """Connections that exercise the listed modules: idle timeouts (the timer wheel), reordered
    and retransmitted segments, RST, IPv6, a wrapping ISN, a long-lived connection."""
    t0 = 1_700_000_000.0
    convs = []
    for i in range(40):
        c = Conversation((f"10.0.{i // 200}.{i % 200 + 1}", 40000 + i), ("10.9.0.1", 80),
                         isn_c=(2**32 - 3 if i % 7 == 0 else 1000 + i), t0=t0 + i * 3.7)
        c.handshake().send("client", b"GET /%d HTTP/1.1\r\n\r\n" % i)
        if i % 3 == 0:
            c.segment("server", 1400, b"B" * 1400).segment("server", 0, b"A" * 1400)
            c.segment("server", 0, b"A" * 1400)  # a retransmission
        else:
            c.send("server", b"HTTP/1.1 200 OK\r\n\r\n" + bytes(range(256)) * (i % 5 + 1))
        if i % 5 == 0:
            c.wait(700.0).send("client", b"after idle")  # past the established timeout
        elif i % 5 == 1:
            c.rst("client")
        elif i % 5 == 2:
            pass  # left open: flushed at the end
        else:
            c.close()
        convs.append(c)
    v6 = Conversation(("2001:db8::1", 50000), ("2001:db8::2", 443), t0=t0 + 1.0)
    v6.handshake().send("client", b"x" * 3000).send("server", b"y" * 5000).close()
    convs.append(v6)
    half = Conversation(("10.1.0.1", 41000), ("10.9.0.2", 22), t0=t0 + 2.0).syn()
    half.wait(100.0).syn()  # a half-open flow that times out before its SYN is repeated
    convs.append(half)
    mixed = d / "mixed.pcap"
    write_pcap(mixed, sorted((p for c in convs for p in c.packets), key=lambda p: p[0]))
    single = d / "single.pcap"
    convs[1].write(single)
    return [mixed, single]


def run_driver(which: str, out: Path, captures: list[Path]) -> bytes:
    proc = subprocess.run([sys.executable, str(DRIVER), str(out), *map(str, captures)],
                          capture_output=True, text=True, env=env_for(which), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out.read_bytes()


def assert_identical(a: bytes, b: bytes) -> None:
    if a == b:
        return
    la, lb = a.splitlines(), b.splitlines()
    for i, (x, y) in enumerate(zip(la, lb, strict=False)):
        if x != y:
            pytest.fail(f"line {i + 1} differs:\n compiled: {x[:300]!r}\n   python: {y[:300]!r}")
    pytest.fail(f"{len(la)} lines (compiled) vs {len(lb)} (python)")


def test_cli_output_identical_on_built_captures(tmp_path: Path):
    captures = synthetic_captures(tmp_path)
    outs = {}
    for which in ("default", "python"):
        for cap in captures:
            out = tmp_path / f"{cap.stem}.{which}.jsonl"
            proc = subprocess.run([str(STREAMTAP), "-q", "-r", str(cap), "--sink",
                                   f"jsonl:{out}"], capture_output=True, text=True,
                                  env=env_for(which), timeout=120)
            assert proc.returncode == 0, proc.stderr
            outs[(which, cap.stem)] = out.read_bytes()
    for cap in captures:
        a, b = outs[("default", cap.stem)], outs[("python", cap.stem)]
        assert a.count(b"\n") >= 1
        assert_identical(a, b)
    records = outs[("default", "mixed")].count(b"\n")
    assert records >= 42  # every connection, the idle-split ones twice


def test_driver_output_identical_on_the_corpus(corpus_dir: Path, tmp_path: Path):
    captures = sorted(p for p in (corpus_dir / "pcaps").rglob("*")
                      if p.suffix in CAPTURE_SUFFIXES and p.is_file())
    assert len(captures) > 100
    compiled = run_driver("default", tmp_path / "compiled.jsonl", captures)
    python = run_driver("python", tmp_path / "python.jsonl", captures)
    heads = [ln for ln in compiled.splitlines() if ln.startswith(b'{"file"')]
    assert len(heads) == len(captures)
    expected = "compiled" if COMPILED_MODULES and built_extensions() else "python"
    assert re.search(rb'"engine": "%s"' % expected.encode(), heads[0])
    # the header names the engine; everything else must match byte for byte
    assert_identical(compiled.replace(b'"engine": "compiled"', b'"engine": "python"'), python)
