"""Disk spool (sinks/spool.py) and its codec (sinks/codec.py)."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading

import pytest

from streamtap.engine.stream import Stream
from streamtap.sinks.codec import decode, encode
from streamtap.sinks.spool import CURSOR_NAME, HEADER, Spool


def _segments(d) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.endswith(".seg"))


def _read_all(sp: Spool, n: int = 1000, commit: bool = True) -> list[bytes]:
    out: list[bytes] = []
    for batch, token in sp.read_batches(n):
        out += batch
        if commit:
            sp.commit(token)
    return out


def _recs(n: int, start: int = 0) -> list[bytes]:
    return [b"record-%05d" % i for i in range(start, start + n)]


def test_codec_round_trip_is_lossless():
    s = Stream(
        ("2001:db8::1", 51000), ("2001:db8::2", 443), b"\x00hello\xff", b"\x80" * 300, "rst",
        [(5, 10, "client"), (0, 3, "server")], 1700000000.1234567, 1700000003.0000004, 6,
        client_packets=7, server_packets=5, client_rule="synack", history="ShADadR",
        state="RSTO", retransmitted_bytes=12, overlaps=2, truncated=True, interface="eth1",
        packets=[(1700000000.1234567, 1514, b"\x01" * 64), (1700000001.5, 60, b"")],
        linktype=113, extra={"k": [1, "x"]},
    )
    back = decode(encode(s))
    assert dataclasses.asdict(back) == dataclasses.asdict(s)
    plain = dataclasses.replace(s, packets=None, extra={}, interface=None, gaps=[])
    assert dataclasses.asdict(decode(encode(plain))) == dataclasses.asdict(plain)
    with pytest.raises(ValueError):
        decode(b'{"not": "a record"}')


def test_append_read_commit_in_order(tmp_path):
    sp = Spool(str(tmp_path))
    assert sp.is_empty()
    for r in _recs(10):
        sp.append(r)
    assert not sp.is_empty()
    batches = list(sp.read_batches(4))
    assert [len(b) for b, _ in batches] == [4, 4, 2]
    assert [r for b, _ in batches for r in b] == _recs(10)
    # Nothing committed yet: reading again starts over.
    assert _read_all(sp, commit=False) == _recs(10)
    sp.commit(batches[0][1])
    assert _read_all(sp, commit=False) == _recs(10)[4:]
    sp.commit(batches[-1][1])
    assert sp.is_empty()
    assert list(sp.read_batches(4)) == []
    sp.close()


def test_segments_roll_and_delivered_ones_are_deleted(tmp_path):
    rec_len = HEADER.size + len(_recs(1)[0])
    sp = Spool(str(tmp_path), segment_bytes=3 * rec_len)
    for r in _recs(10):
        sp.append(r)
    assert len(_segments(tmp_path)) == 4  # 3 + 3 + 3 + 1
    assert sp.size_bytes == 10 * rec_len
    it = sp.read_batches(3)
    batch, token = next(it)
    assert batch == _recs(3)
    sp.commit(token)  # a sealed segment read to its end goes
    assert len(_segments(tmp_path)) == 3
    assert _read_all(sp) == _recs(10)[3:]
    assert sp.is_empty()
    sp.close()
    assert len(_segments(tmp_path)) <= 1


def test_cap_drops_oldest_segments_and_counts(tmp_path, caplog):
    rec_len = HEADER.size + len(_recs(1)[0])
    sp = Spool(str(tmp_path), max_bytes=6 * rec_len, segment_bytes=2 * rec_len)
    with caplog.at_level(logging.WARNING, logger="streamtap.spool"):
        for r in _recs(10):
            sp.append(r)
    assert sp.size_bytes <= 6 * rec_len
    assert sp.dropped_records == 4
    assert _read_all(sp) == _recs(10)[4:]  # the newest survive, in order
    assert "dropped segment" in caplog.text
    # A record bigger than the cap is dropped and counted, not written.
    sp.append(b"x" * (7 * rec_len))
    assert sp.dropped_records == 5
    assert sp.is_empty()
    sp.close()


def test_cap_counts_only_undelivered_records(tmp_path):
    rec_len = HEADER.size + len(_recs(1)[0])
    sp = Spool(str(tmp_path), max_bytes=4 * rec_len, segment_bytes=4 * rec_len)
    for r in _recs(4):
        sp.append(r)
    batch, token = next(sp.read_batches(3))
    sp.commit(token)
    sp.append(b"record-99999")  # drops the (head) segment holding one undelivered record
    assert sp.dropped_records == 1
    assert _read_all(sp) == [b"record-99999"]
    sp.close()


def _three_segments(d, per: int = 5) -> tuple[list[str], int]:
    rec_len = HEADER.size + len(_recs(1)[0])
    sp = Spool(str(d), segment_bytes=per * rec_len)
    for r in _recs(3 * per):
        sp.append(r)
    sp.close()
    segs = _segments(d)
    assert len(segs) == 3
    return segs, rec_len


def test_corrupt_crc_skips_rest_of_segment_only(tmp_path, caplog):
    segs, rec_len = _three_segments(tmp_path)
    path = tmp_path / segs[1]
    data = bytearray(path.read_bytes())
    data[2 * rec_len + HEADER.size + 3] ^= 0xFF  # payload byte of the 3rd record
    path.write_bytes(bytes(data))
    sp = Spool(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="streamtap.spool"):
        got = _read_all(sp, n=4)
    want = _recs(15)
    assert got == want[:5] + want[5:7] + want[10:]
    assert sp.corrupt_records == 1
    assert "CRC mismatch" in caplog.text
    assert sp.is_empty()
    sp.close()


def test_bad_length_is_corrupt(tmp_path):
    segs, rec_len = _three_segments(tmp_path)
    path = tmp_path / segs[0]
    data = bytearray(path.read_bytes())
    data[rec_len:rec_len + 4] = (1 << 31).to_bytes(4, "big")  # 2nd record: absurd length
    path.write_bytes(bytes(data))
    sp = Spool(str(tmp_path))
    assert _read_all(sp) == _recs(15)[:1] + _recs(15)[5:]
    assert sp.corrupt_records == 1
    sp.close()


def test_truncated_tail(tmp_path):
    segs, rec_len = _three_segments(tmp_path)
    path = tmp_path / segs[-1]
    with open(path, "r+b") as f:
        f.truncate(4 * rec_len + 5)  # the last record is cut inside its payload
    sp = Spool(str(tmp_path))
    assert _read_all(sp) == _recs(14)
    assert sp.corrupt_records == 1
    # New data after a torn tail goes to a new segment and is read normally.
    sp.append(b"after")
    assert _read_all(sp) == [b"after"]
    sp.close()


def test_resume_after_reopen_respects_cursor(tmp_path):
    sp = Spool(str(tmp_path))
    for r in _recs(10):
        sp.append(r)
    it = sp.read_batches(3)
    b1, t1 = next(it)
    sp.commit(t1)
    b2, _t2 = next(it)  # read, never committed: the "crash" happens during its delivery
    it.close()
    sp.close()
    assert b1 == _recs(3) and b2 == _recs(10)[3:6]
    assert (tmp_path / CURSOR_NAME).is_file()

    sp2 = Spool(str(tmp_path))
    assert not sp2.is_empty()
    again = _read_all(sp2)
    assert again == _recs(10)[3:]  # no committed record again; only the one batch replayed
    sp2.append(b"new")
    assert _read_all(sp2) == [b"new"]
    sp2.close()
    sp3 = Spool(str(tmp_path))
    assert sp3.is_empty()
    assert _read_all(sp3) == []
    sp3.close()


def test_unreadable_cursor_replays_everything(tmp_path):
    sp = Spool(str(tmp_path))
    for r in _recs(4):
        sp.append(r)
    sp.close()
    (tmp_path / CURSOR_NAME).write_text("{garbage")
    sp2 = Spool(str(tmp_path))
    assert _read_all(sp2) == _recs(4)
    sp2.close()


def test_concurrent_writer_and_reader_exactly_once_in_order(tmp_path):
    n = 5000
    sp = Spool(str(tmp_path), segment_bytes=4096)
    want = _recs(n)
    got: list[bytes] = []

    def writer() -> None:
        for r in want:
            sp.append(r)

    def reader() -> None:
        while len(got) < n:
            for batch, token in sp.read_batches(37):
                got.extend(batch)
                sp.commit(token)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads)
    assert got == want
    assert sp.is_empty() and sp.corrupt_records == 0
    sp.close()
    assert len(_segments(tmp_path)) <= 1
