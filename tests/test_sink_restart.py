"""Sink outages across restarts and a slow CouchDB (issue 11 item 5), on a live daemon on `lo`
(tests/outage.py has the scenarios; bench/sink_outage.py runs them at the issue's 60 s)."""

from __future__ import annotations

from pathlib import Path

from outage import dump, restart_mid_outage, slow_couchdb


def test_restart_in_the_middle_of_an_outage_stores_every_stream_once(tmp_path: Path) -> None:
    r = restart_mid_outage(tmp_path, outage=10.0, conns=10)
    print(dump(r))
    assert r["daemon1_exit"] == 0 and r["daemon2_exit"] == 0
    assert r["spool_segments_at_restart"] > 0, "the records waited in the spool"
    assert (r["lost"], r["duplicated"], r["unexpected"]) == (0, 0, 0), r
    assert r["stored"] == r["expected"] == 40
    # one line per failure episode and daemon, not one per retry
    assert r["log_retry_lines"] <= 4, r["log_retry_lines"]


def test_slow_couchdb_stalls_neither_capture_nor_the_other_sinks(tmp_path: Path) -> None:
    r = slow_couchdb(tmp_path, delay=10.0, rounds=3, conns=5)
    print(dump(r))
    assert r["proxy_active"] >= 1, "the CouchDB sink should be inside a slow request"
    assert r["captured"] >= 15 and r["jsonl_records"] >= 15
    # fin_linger 0.5 s + the runner's batch age 2 s: far below the 10 s CouchDB takes
    assert r["jsonl_lag_max_s"] < 5.0, r
    assert r["status_max_ms"] < 1000, r
    # stop: the CouchDB runner gives up after its stop timeout (shutdown_timeout / 2) + 1 s
    assert r["exit"] == 0 and r["stop_s"] < 12, r
    assert (r["lost"], r["duplicated"], r["unexpected"]) == (0, 0, 0), r
