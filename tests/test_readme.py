"""The README stays true to the code: the configuration table is the schema's, the layout names
every module, `make test` runs what the README says."""

from __future__ import annotations

import re
from pathlib import Path

import readme_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(heading: str) -> str:
    start = README.index(heading + "\n")
    nxt = re.search(r"^#{2,3} ", README[start + len(heading):], re.M)
    return README[start: start + len(heading) + (nxt.start() if nxt else len(README))]


def test_config_table_is_generated_from_the_schema():
    assert readme_config.current() == readme_config.generated(), (
        "README.md's configuration table differs from config/schema.py; regenerate it with: "
        + readme_config.REGENERATE)


def test_layout_names_every_module():
    layout = _section("### Layout")
    files = sorted(p.relative_to(ROOT).as_posix() for d in ("daemon", "sinks", "config")
                   for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 30
    missing = [f for f in files if f"`{f}`" not in layout]
    assert not missing, ("README.md, section Layout: add one line per module: "
                         + ", ".join(missing))
    named = set(re.findall(r"`((?:daemon|sinks|config)/[\w./]+)`", layout))
    gone = sorted(n for n in named if not (ROOT / n).exists())
    assert not gone, f"README.md, section Layout names files that do not exist: {gone}"


def test_make_test_runs_ruff_mypy_import_linter_and_pytest():
    make = (ROOT / "Makefile").read_text()
    recipe = make[make.index("\ntest:"):].split("\n\n")[0]
    assert "ruff check" in recipe and "typecheck" in recipe and "pytest" in recipe, recipe
    typecheck = make[make.index("\ntypecheck:"):].split("\n\n")[0]
    assert "mypy" in typecheck and "lint-imports" in typecheck, typecheck
    assert re.search(r"^make test +# ruff, mypy, import-linter \(the layers\) and pytest",
                     _section("## Development"), re.M)
