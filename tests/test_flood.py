"""A SYN flood into a live daemon, small (issue 11 item 2; bench/flood.py runs >= 1,000,000).

200,000 distinct half-open flows replayed at 20,000 packets/s into a 2-worker daemon on a veth
(tests/netns.py), with 200 complete connections inside the capture and 30 real TCP connections
made through the namespaces at the same time, under `reassembly.limits.memory: 64MiB`.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import netns
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import flood  # noqa: E402

MIB = 1 << 20

pytestmark = [
    pytest.mark.requires(netns.available()),
    pytest.mark.requires(None if shutil.which("tcpreplay") else "needs tcpreplay"),
]


def test_syn_flood_into_the_live_daemon_holds_memory_capture_and_real_streams(tmp_path):
    res = flood.run(tmp_path, syns=200_000, pps=20_000, cap=64 * MIB, workers=2, real=200,
                    tcp=30)
    print(res)
    # 200,000 lone SYNs would take ~80 MB of flow state alone; the cap holds them to 64 MiB
    assert res["rss_peak_mib"] < res["rss_bound_mib"] == 64 + 150, res
    assert res["stalls"] == [] and res["worker_restarts"] == 0 and res["worker_pids_same"]
    assert res["received"] >= 200_000, res
    assert res["replayed"] == {"expected": 200, "exact": 200, "lost": 0, "duplicated": 0}
    assert res["live_tcp"] == {"expected": 30, "exact": 30, "lost": 0, "duplicated": 0}
    ev = res["evictions"]
    # 32 MiB per worker holds ~84,000 lone SYNs at 400 B: of ~100,000 each, the rest is evicted
    assert ev is not None and ev["memory"] >= 20_000, ev
    assert res["exit"] == 0
    assert flood.verdict(res) == []
