"""The JSON Lines sink: encodings, payload cap, rotation (size, time), gzip, fsync policies,
stdout, write errors as retries."""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
from pathlib import Path

import pytest

from streamtap.config import ConfigError
from streamtap.engine.stream import Stream
from streamtap.sinks import jsonl as jsonlmod
from streamtap.sinks.base import FATAL, OK, RETRY
from streamtap.sinks.jsonl import JsonlSink

T0 = 1700000000.0


def stream(i: int = 0, cdata: bytes = b"GET / HTTP/1.0\r\n\r\n",
           sdata: bytes = b"HTTP/1.0 200 OK\r\n\r\n\xff\xfe") -> Stream:
    return Stream(("10.0.0.1", 40000 + i), ("10.0.0.2", 80), cdata, sdata, "fin", [],
                  T0 + i, T0 + i + 0.5, 4, client_packets=5, server_packets=4)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_bytes().splitlines()]


def sink(tmp_path: Path, **opts) -> JsonlSink:
    opts.setdefault("path", str(tmp_path / "out.jsonl"))
    s = JsonlSink("jsonl", opts)
    s.open()
    return s


@pytest.mark.parametrize("enc", ["base64", "hex", "utf8", "none"])
def test_payload_encodings(tmp_path, enc):
    s = sink(tmp_path, payload_encoding=enc)
    st = stream()
    assert s.write([st, stream(1)]).status == OK
    s.close()
    recs = lines(tmp_path / "out.jsonl")
    assert len(recs) == 2
    r = recs[0]
    assert r["streamtap"] == {"payload_encoding": enc, "payload_truncated": False}
    src, dst = r["source"], r["destination"]
    if enc == "base64":
        assert base64.b64decode(dst["payload"]) == st.server_data
    elif enc == "hex":
        assert bytes.fromhex(dst["payload"]) == st.server_data
    elif enc == "utf8":
        assert dst["payload"] == st.server_data.decode("utf-8", "replace")
    else:
        assert "payload" not in src and "payload" not in dst
    if enc in ("base64", "hex"):
        assert r["stream"]["id"] == st.id


def test_encode_is_the_file_content(tmp_path):
    s = sink(tmp_path)
    batch = [stream(i) for i in range(3)]
    expected = s.encode(batch)
    assert s.write(batch).status == OK
    s.close()
    assert (tmp_path / "out.jsonl").read_bytes() == expected
    assert expected.endswith(b"\n") and expected.count(b"\n") == 3


def test_payload_cap_flags_truncation(tmp_path):
    s = sink(tmp_path, max_payload=4)
    assert s.write([stream(0, b"abcdefgh", b"xy")]).status == OK
    s.close()
    (r,) = lines(tmp_path / "out.jsonl")
    assert base64.b64decode(r["source"]["payload"]) == b"abcd"
    assert base64.b64decode(r["destination"]["payload"]) == b"xy"
    assert r["source"]["bytes"] == 8
    assert r["streamtap"]["payload_truncated"] is True


def test_default_cap_is_one_mib_and_zero_is_unlimited(tmp_path):
    big = b"z" * (1024 * 1024 + 10)
    s = sink(tmp_path)
    assert s.write([stream(0, big, b"")]).status == OK
    s.close()
    (r,) = lines(tmp_path / "out.jsonl")
    assert len(base64.b64decode(r["source"]["payload"])) == 1024 * 1024
    assert r["streamtap"]["payload_truncated"] is True
    s = sink(tmp_path, path=str(tmp_path / "u.jsonl"), max_payload=0)
    assert s.write([stream(0, big, b"")]).status == OK
    s.close()
    (r,) = lines(tmp_path / "u.jsonl")
    assert base64.b64decode(r["source"]["payload"]) == big
    assert r["streamtap"]["payload_truncated"] is False


def test_rotation_by_size_never_splits_a_batch(tmp_path):
    one = len(JsonlSink("x", {}).encode([stream()]))
    s = sink(tmp_path, rotate_bytes=3 * one + 10)
    for i in range(8):
        assert s.write([stream(i)]).status == OK
    assert s.write([stream(i) for i in range(8, 12)]).status == OK  # bigger than the limit
    s.close()
    rotated = sorted(p for p in tmp_path.iterdir() if p.name != "out.jsonl")
    live = tmp_path / "out.jsonl"
    sizes = [len(lines(p)) for p in rotated]
    assert sizes == [3, 3, 2]  # then the 4-record batch alone in the live file
    assert len(lines(live)) == 4
    got = [r["source"]["port"] for p in [*rotated, live] for r in lines(p)]
    assert got == [40000 + i for i in range(12)]
    assert all(p.name.startswith("out.jsonl.") for p in rotated)
    assert s.health()["rotations"] == 3


def test_rotation_by_time_with_an_injected_clock(tmp_path):
    now = [T0]
    s = JsonlSink("jsonl", {"path": str(tmp_path / "out.jsonl"), "rotate_seconds": 60},
                  clock=lambda: now[0])
    s.open()
    for step in (0, 30, 29, 1, 10, 60):  # writes at 0, 30, 59 | 60, 70 | 130
        now[0] += step
        assert s.write([stream()]).status == OK
    s.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    # timestamped by the time each file was opened (UTC), so they sort chronologically
    assert names == ["out.jsonl", "out.jsonl.20231114T221320Z", "out.jsonl.20231114T221420Z"]
    assert [len(lines(tmp_path / n)) for n in names] == [1, 3, 2]


def test_same_second_rotations_get_distinct_names(tmp_path):
    s = JsonlSink("jsonl", {"path": str(tmp_path / "out.jsonl"), "rotate_bytes": 1},
                  clock=lambda: T0)
    s.open()
    for i in range(3):
        assert s.write([stream(i)]).status == OK
    s.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "out.jsonl", "out.jsonl.20231114T221320Z", "out.jsonl.20231114T221320Z.1"]


def test_rotated_files_are_gzipped(tmp_path):
    now = [T0]
    s = JsonlSink("jsonl", {"path": str(tmp_path / "out.jsonl"), "rotate_bytes": 1,
                            "compress_rotated": True}, clock=lambda: now[0])
    s.open()
    for i in range(3):
        assert s.write([stream(i)]).status == OK
        now[0] += 1
    s.close()
    gz = sorted(tmp_path.glob("*.gz"))
    assert [p.name for p in gz] == ["out.jsonl.20231114T221320Z.gz",
                                    "out.jsonl.20231114T221321Z.gz"]
    assert not list(tmp_path.glob("*.tmp"))
    ports = [json.loads(x)["source"]["port"] for p in gz
             for x in gzip.decompress(p.read_bytes()).splitlines()]
    assert ports == [40000, 40001]
    assert len(lines(tmp_path / "out.jsonl")) == 1


@pytest.mark.parametrize(("policy", "expected"), [("never", 0), ("batch", 3), ("always", 6)])
def test_fsync_policies(tmp_path, monkeypatch, policy, expected):
    calls = []
    monkeypatch.setattr(jsonlmod.os, "fsync", lambda fd: calls.append(fd))
    s = sink(tmp_path, fsync=policy)
    for i in range(3):
        assert s.write([stream(2 * i), stream(2 * i + 1)]).status == OK
    assert len(calls) == expected
    s.close()
    assert len(lines(tmp_path / "out.jsonl")) == 6


def test_stdout(capfd):
    s = JsonlSink("jsonl", {"path": "-", "payload_encoding": "hex"})
    s.open()
    assert s.write([stream(0), stream(1)]).status == OK
    s.close()
    out = capfd.readouterr().out.splitlines()
    assert [json.loads(x)["source"]["port"] for x in out] == [40000, 40001]
    assert s.health()["records"] == 2


def test_full_disk_is_a_retry_and_the_file_is_reopened(tmp_path):
    s = JsonlSink("jsonl", {"path": "/dev/full"})
    s.open()
    res = s.write([stream()])
    assert res.status == RETRY
    assert "No space left" in (res.error or "") and "/dev/full" in (res.error or "")
    assert s.health()["open"] is False and s.health()["errors"] == 1
    s.open()  # the runner reopens before retrying
    assert s.health()["open"] is True
    assert s.write([stream()]).status == RETRY
    s.close()


def test_failed_batch_is_cut_off_so_the_retry_leaves_no_torn_line(tmp_path, monkeypatch):
    s = sink(tmp_path)
    assert s.write([stream(0)]).status == OK
    good = (tmp_path / "out.jsonl").read_bytes()
    real = os.writev

    def half_then_fail(fd, bufs):
        os.write(fd, bytes(bufs[0])[:10])  # a torn line reaches the file, then EIO
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(jsonlmod.os, "writev", half_then_fail)
    res = s.write([stream(1), stream(2)])
    assert res.status == RETRY and "Input/output error" in (res.error or "")
    assert (tmp_path / "out.jsonl").read_bytes() == good
    monkeypatch.setattr(jsonlmod.os, "writev", real)
    assert s.write([stream(1), stream(2)]).status == OK  # reopens by itself
    s.close()
    assert [r["source"]["port"] for r in lines(tmp_path / "out.jsonl")] == [40000, 40001, 40002]


def test_missing_directory_fails_open(tmp_path):
    s = JsonlSink("jsonl", {"path": str(tmp_path / "no" / "such" / "out.jsonl")})
    with pytest.raises(FileNotFoundError):
        s.open()
    res = s.write([stream()])  # write() without open: tries, and asks for a retry
    assert res.status == RETRY


def test_unencodable_record_is_fatal(tmp_path):
    s = sink(tmp_path)
    bad = stream()
    bad.client = ("not-an-ip", 1)
    res = s.write([bad])
    assert res.status == FATAL and "cannot encode" in (res.error or "")
    s.close()


def test_bad_options_are_refused(tmp_path):
    # checked by the config's own code (Sink.parse_options), with its messages
    for opts, message in (
        ({"fsync": "sometimes"}, "fsync: expected one of never, batch, always, got 'sometimes'"),
        ({"payload_encoding": "rot13"}, "payload_encoding: expected one of base64, hex, utf8"),
        ({"rotate": 1}, "unknown key 'rotate' for sink type jsonl"),
        ({"rotate_bytes": -1}, "rotate_bytes: must not be negative, got -1"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            JsonlSink("jsonl", opts)
