"""Full disks (issue 11 item 4): the JSONL, files and pcap sinks and the spool on a small tmpfs
that fills up. ENOSPC is counted and logged once per episode, never raised; records wait in the
queue and the spool within their caps; delivery resumes when space returns; what was written is
never lost or torn, and what could not be kept is counted as dropped.

Needs root (mount -t tmpfs): skipped loudly on a user's machine, a failure under
STREAMTAP_REQUIRE_ALL=1 (tests/require.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import require

from streamtap.engine.stream import Stream
from streamtap.sinks.files import FilesSink
from streamtap.sinks.jsonl import JsonlSink
from streamtap.sinks.pcap import PcapSink
from streamtap.sinks.runner import SinkRunner
from streamtap.sinks.spool import Spool

WAIT = 20.0
PAYLOAD = 3000  # bytes per direction


def tmpfs_missing() -> str | None:
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "mount/umount are not installed (apt-get install mount)"
    return None


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """mount(name, size) -> a fresh tmpfs of that size; all unmounted at the end."""
    require.need(tmpfs_missing())
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                       check=True, capture_output=True)
        mounted.append(d)
        return d

    try:
        yield mount
    finally:
        for d in reversed(mounted):
            subprocess.run(["umount", "-l", str(d)], check=False, capture_output=True)


def fill(d: Path, leave: int = 0) -> Path:
    """A file taking all but about `leave` bytes of d's file system."""
    filler = d / "filler"
    st = os.statvfs(d)
    free = st.f_bavail * st.f_frsize - leave
    with open(filler, "wb") as f:
        chunk = b"\0" * (1 << 16)
        while free > 0:
            try:
                free -= f.write(chunk[:free])
                f.flush()
            except OSError:
                break
    return filler


def mk(i: int) -> Stream:
    c = (b"%08d" % i).ljust(PAYLOAD, b"c")
    s = (b"%08d" % i).ljust(PAYLOAD, b"s")
    pkts = [(1700000000.0 + i, 60 + len(c), b"\x02" * 60 + c),
            (1700000000.1 + i, 60 + len(s), b"\x03" * 60 + s)]
    return Stream(("10.0.0.1", 1024 + i), ("10.0.0.2", 80), c, s, "fin", [],
                  1700000000.0 + i, 1700000000.5 + i, 4, packets=pkts)


def between_attempts(read: Callable[[Path], list[int]], out: Path) -> list[int] | None:
    """`read(out)`, or None when it caught a write attempt half-way (its checks failed)."""
    try:
        return read(out)
    except (AssertionError, OSError, ValueError, KeyError):
        return None


def until(pred: Callable[[], bool], what: str) -> None:
    end = time.monotonic() + WAIT
    while not pred():
        assert time.monotonic() < end, what
        time.sleep(0.01)


# --------------------------------------------------------------------- reading the outputs back


def jsonl_ids(out: Path) -> list[int]:
    data = (out / "out.jsonl").read_bytes()
    assert not data or data.endswith(b"\n"), "a torn last line"
    return [int(json.loads(line)["source"]["port"]) - 1024 for line in data.splitlines()]


def files_ids(out: Path) -> list[int]:
    data = (out / "streams.jsonl").read_bytes()
    assert not data or data.endswith(b"\n"), "a torn index line"
    got = []
    names = set()
    for line in data.splitlines():
        rec = json.loads(line)
        i = int(rec["source"]["port"]) - 1024
        for side, fill_byte in (("source", b"c"), ("destination", b"s")):
            name = rec["streamtap"]["files"][side]
            names.add(name)
            assert (out / name).read_bytes() == (b"%08d" % i).ljust(PAYLOAD, fill_byte)
        got.append(i)
    flows = {p.name for p in out.iterdir() if p.name not in ("streams.jsonl", "filler")}
    assert flows == names, "a file left by a failed batch"
    return got


def pcap_ids(out: Path) -> list[int]:
    (f,) = [p for p in out.iterdir() if p.suffix == ".pcap"]
    data = f.read_bytes()
    off, got = 24, []
    while off < len(data):
        assert off + 16 <= len(data), "a torn pcap record header"
        _s, _u, incl, orig = struct.unpack_from("<IIII", data, off)
        assert off + 16 + incl <= len(data), "a torn pcap record"
        frame = data[off + 16:off + 16 + incl]
        if frame[0] == 2:
            got.append(int(frame[60:68]))
        off += 16 + incl
    return got


SINKS = {
    "jsonl": (lambda d: JsonlSink("jsonl", {"path": str(d / "out.jsonl")}), jsonl_ids),
    "files": (lambda d: FilesSink("files", {"dir": str(d)}), files_ids),
    "pcap": (lambda d: PcapSink("pcap", {"dir": str(d), "mode": "rotating"}), pcap_ids),
}


def episode_lines(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.getMessage().startswith(f"sink {name}: retry")]


@pytest.mark.parametrize("kind", sorted(SINKS))
def test_sink_disk_full_waits_in_queue_and_spool_then_resumes(tmpfs, tmp_path, caplog, kind):
    out = tmpfs("out", "8m")  # 400 streams take ~3.3 MB; the filler takes the rest
    make, read_ids = SINKS[kind]
    r = SinkRunner(make(out), spool_dir=str(tmp_path / "spool"), queue_max=40,
                   batch_records=10, batch_age=0.01, backoff_base=0.01, backoff_cap=0.1,
                   spool_max_bytes=64 << 20)
    r.start()
    try:
        with caplog.at_level(logging.INFO, logger="streamtap"):
            r.submit([mk(i) for i in range(100)])
            until(lambda: r.stats()["records"]["ok"] == 100, "first 100 not delivered")
            acked = read_ids(out)
            assert acked == list(range(100))
            # room for a part of one batch: the write that fails has written something
            filler = fill(out, leave=4 << 10)
            for i in range(100, 400, 5):
                r.submit([mk(j) for j in range(i, i + 5)])
                st = r.stats()
                assert st["queue_depth"] <= 40
            until(lambda: r.stats()["enospc"] >= 3, "ENOSPC not counted")
            until(lambda: r.stats()["records"]["spooled"] >= 250, "not spooled")
            st = r.stats()
            assert st["healthy"] is False and st["records"]["ok"] == 100
            assert r._thread is not None and r._thread.is_alive()
            # what was acknowledged is intact, and nothing half-written is left behind. The
            # runner keeps retrying meanwhile, so a read can land inside an attempt (its files
            # exist until the attempt is rolled back): the outputs must be exactly the
            # acknowledged ones between attempts; a file a failed batch left would never pass
            until(lambda: between_attempts(read_ids, out) == acked,
                  "acknowledged records changed, or a failed batch left something behind")
            assert len(episode_lines(caplog, kind)) == 1, episode_lines(caplog, kind)
            filler.unlink()  # space comes back
            until(lambda: r.stats()["records"]["ok"] == 400, f"delivery did not resume {r.stats()}")
    finally:
        r.stop(5)
    st = r.stats()
    assert st["records"]["dropped"] == 0 and st["records"]["failed"] == 0
    assert read_ids(out) == list(range(400)), "each record once, in order"
    msgs = [m.getMessage() for m in caplog.records]
    assert any(m.startswith(f"sink {kind}: answering again after") for m in msgs)
    assert len(episode_lines(caplog, kind)) == 1


def test_sink_and_spool_full_drop_the_oldest_and_count_them(tmpfs, caplog):
    out = tmpfs("out", "2m")
    spool_dir = tmpfs("spool", "1m")
    r = SinkRunner(JsonlSink("jsonl", {"path": str(out / "out.jsonl")}),
                   spool_dir=str(spool_dir), queue_max=20, batch_records=10, batch_age=0.01,
                   backoff_base=0.01, backoff_cap=0.1, spool_max_bytes=2 << 20)
    r.start()
    total = 1000  # about 12 MB: the spool's file system holds some 80 of them
    try:
        with caplog.at_level(logging.INFO, logger="streamtap"):
            r.submit([mk(i) for i in range(50)])
            until(lambda: r.stats()["records"]["ok"] == 50, "first 50 not delivered")
            filler = fill(out)
            for i in range(50, total, 10):
                r.submit([mk(j) for j in range(i, i + 10)])
                until(lambda: r.stats()["spool_pending"] < 500, "spool writer stuck")
            until(lambda: r.stats()["spool_pending"] == 0, "spool writer stuck")
            st = r.stats()
            assert st["records"]["dropped"] > 0, st
            assert st["enospc"] > 1 and st["spool_bytes"] <= 1 << 20
            assert jsonl_ids(out) == list(range(50))
            spool_lines = [r.getMessage() for r in caplog.records
                           if "cannot write" in r.getMessage()]
            assert len(spool_lines) == 1, spool_lines
            filler.unlink()
            until(lambda: r.stats()["spool_bytes"] == 0 or r.stats()["healthy"], "no resume")
            until(lambda: r._spool is not None and r._spool.is_empty()
                  and r.stats()["queue_depth"] == 0, "backlog not delivered")
    finally:
        r.stop(5)
    st = r.stats()
    got = jsonl_ids(out)
    assert len(got) == len(set(got)), "a record delivered twice"
    assert got == sorted(got), "out of order"
    lost = total - len(got)
    assert 0 < lost <= st["records"]["dropped"], (lost, st["records"])
    # drop oldest: the newest records made it
    assert got[-30:] == list(range(total - 30, total)), got[-30:]


def test_spool_full_disk_cuts_the_torn_record_and_reads_back_whole(tmpfs):
    d = tmpfs("spool", "1m")
    sp = Spool(str(d), max_bytes=64 << 20, segment_bytes=128 << 10)
    rec = b"x" * 5000
    n = 0
    while sp.enospc == 0:
        assert sp.append(rec + b"%08d" % n)
        n += 1
        assert n < 1000, "never full"
    assert sp.dropped_records > 0  # room was made by dropping the oldest segments
    sp.close()
    again = Spool(str(d))
    payloads = [p for batch, _ in again.read_batches(1000) for p in batch]
    assert again.corrupt_records == 0, "a torn record was left in a segment"
    assert payloads and all(p[:5000] == rec for p in payloads)
    seq = [int(p[5000:]) for p in payloads]
    assert seq == list(range(seq[0], n)), "the newest are kept, whole and in order"
    assert len(payloads) + sp.dropped_records == n


def test_daemon_counts_enospc_in_status_and_metrics_and_keeps_capturing(tmpfs, tmp_path):
    """A live daemon (on lo) whose JSONL file system is full: it keeps capturing, /status and
    /metrics show the ENOSPC count, and when room returns every stream is written once."""
    from daemonrun import (
        EchoServer,
        LiveRun,
        connect,
        control_get,
        status,
        stop,
        wait,
        write_config,
    )

    out = tmpfs("out", "4m")
    sock = tmp_path / "ctl.sock"

    def sink() -> dict:
        return next(iter((status(sock) or {}).get("sinks") or [{}]))

    def lines() -> list[bytes]:
        p = out / "out.jsonl"
        return p.read_bytes().splitlines() if p.exists() else []

    with LiveRun(tmp_path) as run:
        echo = run.closing(EchoServer())
        cfg = write_config(tmp_path / "cfg.yaml", echo.port,
                           f"  - type: jsonl\n    path: {out / 'out.jsonl'}\n",
                           shutdown_timeout="4s")
        d = run.start(cfg)
        assert wait(lambda: status(sock) is not None, 20), "daemon not up"
        time.sleep(0.5)
        ports = connect(echo.port, 5)
        assert wait(lambda: len(lines()) >= 5, 20), "first records not written"
        filler = fill(out)
        ports += connect(echo.port, 20)
        assert wait(lambda: (sink().get("enospc") or 0) > 0, 20), sink()
        streams = sum((status(sock) or {}).get("streams", {}).values())
        assert streams >= 25, "capture stopped"
        assert d.poll() is None
        text = control_get(sock, "/metrics", timeout=5).decode()
        line = next(x for x in text.splitlines()
                    if x.startswith("streamtap_sink_enospc_total{"))
        assert 'sink="jsonl"' in line and float(line.split()[-1]) > 0, line
        assert len(lines()) == 5
        filler.unlink()
        ports += connect(echo.port, 5)
        assert wait(lambda: len(lines()) >= 30, 90), (len(lines()), sink())
        assert stop(d)[0] == 0
    data = (out / "out.jsonl").read_bytes()
    assert data.endswith(b"\n")
    got = sorted(json.loads(x)["source"]["port"] for x in data.splitlines())
    assert got == sorted(ports), "each stream once"
    err = (tmp_path / "stderr-1.txt").read_text()
    assert err.count("sink jsonl: retry") == 1, err
    assert "Traceback" not in err
