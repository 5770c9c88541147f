"""The test suite's own rules: every test can fail, and no test hides a missing requirement.

- A skip for a missing tool, root, namespaces or the corpus goes through tests/require.py, which
  fails instead under STREAMTAP_REQUIRE_ALL=1 (CI). A bare `pytest.skip`, `skipif` or
  `importorskip` anywhere else would turn a broken CI machine green.
- A test function asserts something: an `assert`, `pytest.raises`/`warns`/`fail`, or a call to a
  function of its own module that does (found transitively), or to an `assert_*` helper.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SKIPPERS = {"skip", "skipif", "importorskip"}
ASSERTING_CALLS = {"raises", "warns", "fail", "deprecated_call"}


def _name(call: ast.Call) -> str | None:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)


def _asserts(fn: ast.AST, helpers: set[str]) -> bool:
    for n in ast.walk(fn):
        if isinstance(n, ast.Assert):
            return True
        if isinstance(n, ast.Call):
            name = _name(n) or ""
            if name in ASSERTING_CALLS or name in helpers or name.startswith("assert_"):
                return True
    return False


def assertionless_tests(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    helpers: set[str] = set()
    grew = True
    while grew:  # helpers that call helpers that assert
        grew = False
        for fn in funcs:
            if not fn.name.startswith("test_") and fn.name not in helpers and _asserts(fn, helpers):
                helpers.add(fn.name)
                grew = True
    return [f"{path.name}:{fn.lineno} {fn.name}" for fn in funcs
            if fn.name.startswith("test_") and not _asserts(fn, helpers)]


def skips_outside_require(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and n.attr in SKIPPERS:
            base = n.value
            # pytest.skip / pytest.importorskip / pytest.mark.skipif
            if (isinstance(base, ast.Name) and base.id == "pytest") or (
                isinstance(base, ast.Attribute) and base.attr == "mark"
            ):
                out.append(f"{path.name}:{n.lineno} {n.attr}")
    return out


def test_every_test_asserts_something():
    bad = [x for p in sorted(TESTS.glob("test_*.py")) for x in assertionless_tests(p)]
    assert not bad, "tests that assert nothing (add an assertion or remove them):\n" + "\n".join(
        bad)


def test_skips_go_through_require():
    bad = [x for p in sorted(TESTS.glob("*.py")) if p.name != "require.py"
           for x in skips_outside_require(p)]
    assert not bad, ("skips that CI cannot turn into failures; use require.need() or "
                     "@pytest.mark.requires(...) (tests/require.py):\n" + "\n".join(bad))


def test_the_scans_catch_what_they_look_for(tmp_path):
    src = tmp_path / "test_x.py"
    src.write_text(
        "import pytest\n"
        "def check(x):\n    assert x\n"
        "def test_nothing():\n    x = 1\n"
        "def test_helper():\n    check(1)\n"
        "def test_raises():\n    with pytest.raises(ValueError):\n        int('x')\n"
        "@pytest.mark.skipif(True, reason='no tool')\n"
        "def test_skipped():\n    pytest.skip('no tool')\n    assert False\n"
    )
    assert assertionless_tests(src) == ["test_x.py:4 test_nothing"]
    assert skips_outside_require(src) == ["test_x.py:11 skipif", "test_x.py:13 skip"]
