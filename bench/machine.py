"""What every benchmark table names in its header: the machine it ran on."""

from __future__ import annotations

import datetime as dt
import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_figures() -> dict:
    """CPU, cores (and those this process may use), kernel, Python, date."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_line() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, Linux {platform.release()}"


def results_table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Aligned text lines of a results table: the first and sixth columns left-aligned, the
    others right-aligned, a dashed rule under the head. A row shorter than `head` (a name and
    an error) is written as it is after the name column and does not widen the others."""
    full = [row for row in rows if len(row) == len(head)]
    widths = [max([len(head[i])] + [len(row[i]) for row in (rows if i == 0 else full)])
              for i in range(len(head))]
    fmt = "  ".join(f"{{:{'<' if i in (0, 5) else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*head).rstrip(), "  ".join("-" * w for w in widths)]
    for row in rows:
        if len(row) != len(head):
            lines.append(f"{row[0]:<{widths[0]}}  {'  '.join(row[1:])}")
        else:
            lines.append(fmt.format(*row).rstrip())
    return lines


def print_verdict(res: dict, bad: list[str], as_json: bool) -> int:
    """The end of a long run (flood.py, soak.py): its figures, then what did not hold; the
    exit status (1 when anything failed)."""
    import json

    if as_json:
        print(json.dumps({**res, "failed": bad}, indent=1))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")
        print("held: all" if not bad else "FAILED: " + "; ".join(bad))
    return 1 if bad else 0
