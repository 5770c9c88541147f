#!/usr/bin/env python3
"""Sink outages at the issue's scale (issue 11 item 5): a live daemon on `lo` with a CouchDB
sink (pouchdb-server, `make test` installs it); CouchDB down for `--outage` seconds (default 60),
the daemon stopped with SIGTERM and started again halfway through, traffic before, during and
after; then CouchDB answering after `--delay` seconds per request (default 10) beside a JSONL
sink. Prints what each scenario measured (JSON) and exits 1 unless every stream was stored
exactly once and the JSONL sink and /status kept their pace.

    sudo .venv/bin/python bench/sink_outage.py                  # 60 s outage, 10 s answers
    sudo .venv/bin/python bench/sink_outage.py --outage 10 --skip-slow

Needs root (capture on lo). The short versions run in `make test` (tests/test_sink_restart.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from outage import dump, restart_mid_outage, slow_couchdb  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--outage", type=float, default=60.0, help="CouchDB down this long (s)")
    ap.add_argument("--conns", type=int, default=50, help="connections per traffic phase")
    ap.add_argument("--delay", type=float, default=10.0, help="slow CouchDB: s per request")
    ap.add_argument("--rounds", type=int, default=5, help="slow CouchDB: traffic rounds")
    ap.add_argument("--skip-slow", action="store_true", help="only the outage scenario")
    a = ap.parse_args()
    ok = True
    with tempfile.TemporaryDirectory(prefix="streamtap-outage-") as tmp:
        r = restart_mid_outage(Path(tmp), outage=a.outage, conns=a.conns)
        print("restart in the middle of an outage:", dump(r))
        ok &= (r["lost"], r["duplicated"], r["unexpected"]) == (0, 0, 0)
    if not a.skip_slow:
        with tempfile.TemporaryDirectory(prefix="streamtap-slow-") as tmp:
            r = slow_couchdb(Path(tmp), delay=a.delay, rounds=a.rounds, conns=a.conns)
            print("slow CouchDB:", dump(r))
            ok &= (r["lost"], r["duplicated"], r["unexpected"]) == (0, 0, 0)
            ok &= r["jsonl_lag_max_s"] < 5.0 and r["status_max_ms"] < 1000
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
