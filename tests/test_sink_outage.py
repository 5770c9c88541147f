"""A real outage in a live run: the CouchDB-compatible server is down while the daemon captures,
the daemon stops with its records in the disk spool, the server comes back, a new daemon run
replays the leftover spool; afterwards every stream is stored exactly once.

The daemon captures on `lo` (filtered to the test's own port) so that it and pouchdb-server
share 127.0.0.1; both run in this machine's namespace and are stopped at the end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from couchserver import CouchServer
from daemonrun import EchoServer, LiveRun, connect, status, stop, stored, wait, write_config


@pytest.fixture
def couch(tmp_path: Path):
    srv = CouchServer(data_dir=tmp_path / "couch")
    yield srv
    srv.close()


def test_outage_and_leftover_spool_store_every_stream_once(couch, tmp_path: Path) -> None:
    with LiveRun(tmp_path) as run:
        echo = run.closing(EchoServer())
        cfg = write_config(tmp_path / "cfg.yaml", echo.port,
                           f"  - type: couchdb\n    url: {couch.url}\n")
        # run 1: the server is down for the whole run
        d1 = run.start(cfg, 1)
        assert wait(lambda: status(tmp_path / "ctl.sock") is not None, 20), "daemon not up"
        time.sleep(0.5)
        first = connect(echo.port, 20)
        assert wait(lambda: sum((status(tmp_path / "ctl.sock") or {}).get("streams", {})
                                .values()) >= 20, 20)
        assert stop(d1)[0] == 0
        spool = tmp_path / "state" / "lo" / "spool" / "couchdb"
        assert any(spool.glob("*.seg")), "records should have been spooled"
        assert not couch.running

        # run 2: the server is back; the leftover spool is replayed, new streams follow
        couch.start()
        d2 = run.start(cfg, 2)
        assert wait(lambda: status(tmp_path / "ctl.sock") is not None, 20)
        time.sleep(0.5)
        second = connect(echo.port, 10)
        assert wait(lambda: len(stored(couch.url)) >= 30, 30), len(stored(couch.url))
        assert stop(d2)[0] == 0
        docs = stored(couch.url)
        ports = sorted(d["source"]["port"] for d in docs)
        assert ports == sorted(first + second), "every stream exactly once"
        for d in docs:
            assert d["_id"] == d["stream"]["id"]
            assert d["destination"]["bytes"] == 1000 + (
                first.index(d["source"]["port"]) if d["source"]["port"] in first
                else second.index(d["source"]["port"]))


def test_sink_that_cannot_open_logs_one_line_per_attempt_and_spools(tmp_path: Path) -> None:
    """The daemon (supervisor + sink runner) with a CouchDB answering 401: capture goes on; each
    failed attempt is one log line naming the sink and the server's answer (no traceback, no
    password); the records wait in the spool."""
    with LiveRun(tmp_path) as run:
        couch = run.closing(CouchServer(admins={"admin": "right-pw"}))
        couch.start()
        echo = run.closing(EchoServer())
        cfg = write_config(
            tmp_path / "cfg.yaml", echo.port,
            f"  - type: couchdb\n"
            f"    url: {couch.url.replace('://', '://admin:wrong-pw@')}/streams\n",
            extra="logging: {format: json}\n",
        )
        d = run.start(cfg)
        sock = tmp_path / "ctl.sock"
        assert wait(lambda: status(sock) is not None, 20), "daemon not up"
        time.sleep(0.5)
        connect(echo.port, 5)
        assert wait(lambda: "401" in json.dumps((status(sock) or {}).get("sinks")), 20)
        assert stop(d)[0] == 0
    text = (tmp_path / "stderr-1.txt").read_text()
    assert "wrong-pw" not in text
    lines = [json.loads(line) for line in text.splitlines()]  # a traceback would not parse
    assert not any("exception" in x for x in lines)
    mine = [x["message"] for x in lines if "sink couchdb" in x["message"]]
    failed = [m for m in mine if "401" in m]
    assert failed, mine
    for m in failed:
        assert "retry" in m and (f"{couch.url}/streams: HTTP 401 unauthorized: "
                                 "Name or password is incorrect.") in m
    assert len(failed) == len([m for m in mine if "retry" in m])  # no second line per attempt
    spool = tmp_path / "state" / "lo" / "spool" / "couchdb"
    assert any(spool.glob("*.seg")), "records should have been spooled"
