"""Durations and sizes in human units, both ways.

Durations: ``500ms``, ``30s``, ``10m``, ``1h``, ``1d``, compounds like ``1h30m``, decimals like
``1.5s``; a plain number (int, float or digits-only string) is seconds. Parsed to float seconds.

Sizes: ``64KiB``, ``1MiB``, ``1GiB`` (powers of 1024), ``1KB``, ``1MB`` (powers of 1000), ``512B``,
an optional space before the unit (``256 MiB``), units case-insensitive; a plain int is bytes.
Parsed to int bytes. Bare ``K``/``M``/``G`` are refused: they are ambiguous.

``format_*`` pick the largest unit that represents the value exactly, so that
``parse_x(format_x(v)) == v`` for every valid ``v``.

Parsers raise ``ValueError`` with a message meant for the user; the config loader adds the key path
and YAML line.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

__all__ = ["format_duration", "format_size", "parse_duration", "parse_size"]

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"

_DURATION_UNITS: dict[str, Fraction] = {
    "us": Fraction(1, 1_000_000),
    "µs": Fraction(1, 1_000_000),
    "ms": Fraction(1, 1_000),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
    "d": Fraction(86400),
}
# Longest unit names first, so "ms" is tried before "m".
_DURATION_UNIT_RE = "|".join(sorted(_DURATION_UNITS, key=len, reverse=True))
_DURATION_PART = re.compile(rf"({_NUMBER})\s*({_DURATION_UNIT_RE})")
_DURATION_RE = re.compile(rf"(?:{_NUMBER}\s*(?:{_DURATION_UNIT_RE})\s*)+")
# Units format_duration may emit, largest first ("d" is accepted but "24h" reads better).
_DURATION_FORMAT = ("h", "m", "s", "ms", "us")

_SIZE_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(rf"({_NUMBER})\s*([A-Za-z]+)?")
_SIZE_FORMAT = (
    ("TiB", 1024**4),
    ("GiB", 1024**3),
    ("MiB", 1024**2),
    ("KiB", 1024),
    ("TB", 1000**4),
    ("GB", 1000**3),
    ("MB", 1000**2),
    ("KB", 1000),
)

DURATION_HINT = "expected a duration like 30s or 10m"
SIZE_HINT = "expected a size like 64KiB or 1MiB"


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return repr(value)


def _negative(value: object) -> ValueError:
    return ValueError(f"must not be negative, got {_show(value)}")


def parse_duration(value: object) -> float:
    """Seconds (float) from ``30s``/``10m``/``1h``/``500ms``/``1h30m`` or a plain number."""
    if isinstance(value, bool):
        raise ValueError(f"{DURATION_HINT}, got {_show(value)}")
    if isinstance(value, int | float):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise ValueError(f"{DURATION_HINT}, got {_show(value)}")
        if seconds < 0:
            raise _negative(value)
        return seconds
    if not isinstance(value, str):
        raise ValueError(f"{DURATION_HINT}, got {_show(value)}")
    text = value.strip()
    body = text[1:].lstrip() if text.startswith("-") else text
    if re.fullmatch(_NUMBER, body):
        total = Fraction(body)
    elif _DURATION_RE.fullmatch(body):
        total = sum(
            (Fraction(num) * _DURATION_UNITS[unit] for num, unit in _DURATION_PART.findall(body)),
            Fraction(0),
        )
    else:
        raise ValueError(f"{DURATION_HINT}, got {_show(value)}")
    if body is not text and total != 0:
        raise _negative(value)
    return float(total)


def parse_size(value: object) -> int:
    """Bytes (int) from ``64KiB``/``1MiB``/``1GiB``/``1MB``/``512B`` or a plain int."""
    if isinstance(value, bool):
        raise ValueError(f"{SIZE_HINT}, got {_show(value)}")
    if isinstance(value, int):
        if value < 0:
            raise _negative(value)
        return value
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{SIZE_HINT} (a whole number of bytes), got {_show(value)}")
        if value < 0:
            raise _negative(value)
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"{SIZE_HINT}, got {_show(value)}")
    text = value.strip()
    body = text[1:].lstrip() if text.startswith("-") else text
    match = _SIZE_RE.fullmatch(body)
    if match is None:
        raise ValueError(f"{SIZE_HINT}, got {_show(value)}")
    number, unit = match.groups()
    factor = 1 if unit is None else _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(
            f"{SIZE_HINT}, got {_show(value)} (units: B, KB, MB, GB, TB = powers of 1000; "
            "KiB, MiB, GiB, TiB = powers of 1024)"
        )
    total = Fraction(number) * factor
    if total.denominator != 1:
        raise ValueError(f"{SIZE_HINT} (a whole number of bytes), got {_show(value)}")
    if body is not text and total != 0:
        raise _negative(value)
    return int(total)


def format_duration(seconds: float) -> str:
    """The largest exact unit: 600 -> "10m", 0.5 -> "500ms", 90 -> "90s", 1.25 -> "1250ms"."""
    if isinstance(seconds, bool) or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"cannot format {seconds!r} as a duration")
    if seconds == 0:
        return "0s"
    exact = Fraction(seconds)
    for unit in _DURATION_FORMAT:
        factor = _DURATION_UNITS[unit]
        count = round(exact / factor)
        if count > 0 and float(count * factor) == seconds:
            return f"{count}{unit}"
    return f"{float(seconds)!r}s"


def format_size(nbytes: int) -> str:
    """The largest exact unit: 1048576 -> "1MiB", 1000000 -> "1MB", 1500 -> "1500" (bytes)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"cannot format {nbytes!r} as a size")
    if nbytes == 0:
        return "0"
    for unit, factor in _SIZE_FORMAT:
        if nbytes % factor == 0:
            return f"{nbytes // factor}{unit}"
    return str(nbytes)
