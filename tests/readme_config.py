"""The README's configuration table, generated from the schema (config/schema.py).

    .venv/bin/python tests/readme_config.py --write    # or: make readme
    .venv/bin/python tests/readme_config.py            # check only: exit 1 when out of date

The table sits between two HTML comments in README.md (`BEGIN`, `END` below), which Markdown
does not render. tests/test_readme.py fails when README and schema differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN = "<!-- BEGIN config table: generated from config/schema.py by `make readme` -->\n"
END = "<!-- END config table -->\n"
REGENERATE = "make readme  (= .venv/bin/python tests/readme_config.py --write)"


def generated() -> str:
    from streamtap.config.loader import reference_table
    from streamtap.sinks.registry import sink_types

    return reference_table(sink_types())


def split(text: str) -> tuple[str, str, str]:
    """(before BEGIN, the table, from END on); ValueError when a marker is missing."""
    start = text.find(BEGIN)
    end = text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md has no {BEGIN.strip()} ... {END.strip()} pair")
    return text[: start + len(BEGIN)], text[start + len(BEGIN) : end], text[end:]


def current() -> str:
    return split(README.read_text())[1]


def write() -> bool:
    """Regenerate the table in README.md; True when it changed."""
    before, table, after = split(README.read_text())
    new = generated()
    if table == new:
        return False
    README.write_text(before + new + after)
    return True


def main(argv: list[str]) -> int:
    if argv == ["--write"]:
        print("README.md: configuration table " + ("regenerated" if write() else "up to date"))
        return 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    if current() != generated():
        print(f"README.md: configuration table out of date; run: {REGENERATE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
