"""The stream record: layout, types, id, payload encodings, round trip."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamtap.engine.communityid import community_id
from streamtap.engine.stream import (
    CLOSE_REASONS,
    Stream,
    encode_payload,
    stream_id,
    to_json,
    to_json_chunks,
    to_record,
)

# 2021-03-04T05:06:07.123456Z
T0 = 1614834367.123456


def make_stream(**overrides: Any) -> Stream:
    fields: dict[str, Any] = dict(
        client=("192.168.1.10", 51000),
        server=("93.184.216.34", 80),
        client_data=b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
        server_data=b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi\xff\x00",
        close_reason="fin",
        gaps=[(10, 5, "server"), (3, 2, "client")],
        start=T0,
        end=T0 + 1.5,
        ip_version=4,
        client_packets=6,
        server_packets=5,
        client_rule="syn",
        history="ShADadFf",
        state="SF",
        retransmitted_bytes=12,
        overlaps=1,
        truncated=False,
        interface="eth0",
    )
    fields.update(overrides)
    return Stream(**fields)


def test_layout_and_types() -> None:
    s = make_stream()
    r = to_record(s)
    assert list(r) == [
        "stream",
        "event",
        "network",
        "source",
        "destination",
        "tcp",
        "observer",
        "streamtap",
    ]
    assert list(r["stream"]) == ["id", "part"]
    assert r["stream"]["part"] == 0  # a stream emitted whole is part 0
    assert isinstance(r["stream"]["id"], str) and len(r["stream"]["id"]) == 32
    int(r["stream"]["id"], 16)

    assert r["event"] == {
        "start": "2021-03-04T05:06:07.123456Z",
        "end": "2021-03-04T05:06:08.623456Z",
        "duration": 1_500_000_000,
    }
    assert list(r["event"]) == ["start", "end", "duration"]
    assert isinstance(r["event"]["duration"], int)

    assert r["network"] == {
        "community_id": community_id("192.168.1.10", 51000, "93.184.216.34", 80),
        "transport": "tcp",
        "type": "ipv4",
    }
    assert list(r["network"]) == ["community_id", "transport", "type"]

    for key, side, data, packets in (
        ("source", s.client, s.client_data, 6),
        ("destination", s.server, s.server_data, 5),
    ):
        part = r[key]
        assert list(part) == ["ip", "port", "bytes", "packets", "offset", "payload"]
        assert part["offset"] == 0
        assert part["ip"] == side[0] and isinstance(part["ip"], str)
        assert part["port"] == side[1] and isinstance(part["port"], int)
        assert part["bytes"] == len(data)
        assert part["packets"] == packets
        assert base64.b64decode(part["payload"]) == data

    assert r["tcp"] == {
        "state": "SF",
        "history": "ShADadFf",
        "close_reason": "fin",
        "client_rule": "syn",
        "missed_bytes": 7,
        "gaps": [
            {"dir": "server", "offset": 10, "length": 5},
            {"dir": "client", "offset": 3, "length": 2},
        ],
        "retransmitted_bytes": 12,
        "overlaps": 1,
        "truncated": False,
    }
    assert list(r["tcp"]) == [
        "state",
        "history",
        "close_reason",
        "client_rule",
        "missed_bytes",
        "gaps",
        "retransmitted_bytes",
        "overlaps",
        "truncated",
    ]
    assert list(r["tcp"]["gaps"][0]) == ["dir", "offset", "length"]
    assert r["observer"] == {"ingress": {"interface": {"name": "eth0"}}}
    assert r["streamtap"] == {"payload_encoding": "base64", "payload_truncated": False}


def test_stream_record_method_matches() -> None:
    s = make_stream()
    assert s.record() == to_record(s)
    assert s.id == stream_id(s)
    assert s.community_id == to_record(s)["network"]["community_id"]


def test_ipv6_type() -> None:
    s = make_stream(client=("2001:db8::1", 40000), server=("2001:db8::2", 443), ip_version=6)
    r = to_record(s)
    assert r["network"]["type"] == "ipv6"
    assert r["source"]["ip"] == "2001:db8::1"


def test_observer_omitted_without_interface() -> None:
    r = to_record(make_stream(interface=None))
    assert "observer" not in r
    assert list(r)[-2:] == ["tcp", "streamtap"]


def test_empty_stream() -> None:
    s = make_stream(client_data=b"", server_data=b"", gaps=[], close_reason="rst", start=T0, end=T0)
    r = to_record(s)
    assert r["source"]["bytes"] == 0 and r["source"]["payload"] == ""
    assert r["event"]["duration"] == 0
    assert r["tcp"]["missed_bytes"] == 0 and r["tcp"]["gaps"] == []


def test_id_deterministic() -> None:
    a, b = make_stream(), make_stream(client_data=b"other", history="S")
    assert stream_id(a) == stream_id(b) == stream_id(make_stream())
    # the end time and payload are not part of the key
    assert stream_id(make_stream(end=T0 + 99)) == stream_id(a)


@pytest.mark.parametrize(
    "change",
    [
        {"start": T0 + 0.000001},
        {"start": T0 + 1},
        {"client": ("192.168.1.10", 51001)},
        {"server": ("93.184.216.34", 8080)},
        {"client": ("192.168.1.11", 51000)},
        {"server": ("93.184.216.35", 80)},
        # swapping the roles is a different stream
        {"client": ("93.184.216.34", 80), "server": ("192.168.1.10", 51000)},
    ],
)
def test_id_changes_with_key_or_start(change: dict[str, Any]) -> None:
    assert stream_id(make_stream(**change)) != stream_id(make_stream())


def test_id_ignores_address_spelling() -> None:
    a = make_stream(client=("2001:db8::1", 1), server=("::1", 2), ip_version=6)
    b = make_stream(client=("2001:0db8:0:0::1", 1), server=("0:0::1", 2), ip_version=6)
    assert stream_id(a) == stream_id(b)


@pytest.mark.parametrize(
    ("encoding", "decode"),
    [
        ("base64", base64.b64decode),
        ("hex", bytes.fromhex),
        ("utf8", lambda t: t.encode("utf-8")),
    ],
)
def test_payload_encodings(encoding: str, decode: Any) -> None:
    s = make_stream()
    r = to_record(s, payload=encoding)
    assert r["streamtap"] == {"payload_encoding": encoding, "payload_truncated": False}
    assert decode(r["source"]["payload"]) == s.client_data  # client data is ASCII
    if encoding == "utf8":
        assert r["destination"]["payload"].endswith("hi\ufffd\x00")
    else:
        assert decode(r["destination"]["payload"]) == s.server_data


def test_payload_none_omits_payload_keys() -> None:
    s = make_stream()
    r = to_record(s, payload="none", max_payload=3)
    assert "payload" not in r["source"] and "payload" not in r["destination"]
    assert r["source"]["bytes"] == len(s.client_data)
    assert r["streamtap"] == {"payload_encoding": "none", "payload_truncated": False}


def test_payload_cap() -> None:
    s = make_stream()
    r = to_record(s, max_payload=4)
    assert base64.b64decode(r["source"]["payload"]) == b"GET "
    assert base64.b64decode(r["destination"]["payload"]) == b"HTTP"
    assert r["source"]["bytes"] == len(s.client_data)
    assert r["destination"]["bytes"] == len(s.server_data)
    assert r["streamtap"]["payload_truncated"] is True

    # a cap only one side exceeds still flags the record
    r = to_record(s, payload="hex", max_payload=len(s.client_data))
    assert bytes.fromhex(r["source"]["payload"]) == s.client_data
    assert len(bytes.fromhex(r["destination"]["payload"])) == len(s.client_data)
    assert r["streamtap"]["payload_truncated"] is True

    # a cap nobody reaches does not
    r = to_record(s, max_payload=10_000)
    assert r["streamtap"]["payload_truncated"] is False
    assert base64.b64decode(r["destination"]["payload"]) == s.server_data

    r = to_record(s, max_payload=0)
    assert r["source"]["payload"] == "" and r["streamtap"]["payload_truncated"] is True


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        to_record(make_stream(), payload="b85")
    with pytest.raises(ValueError):
        to_record(make_stream(), max_payload=-1)
    with pytest.raises(ValueError):
        encode_payload(b"x", "rot13")


def test_encode_payload() -> None:
    data = bytes(range(256))
    assert encode_payload(data, "none") is None
    assert base64.b64decode(encode_payload(data, "base64") or "", validate=True) == data
    assert bytes.fromhex(encode_payload(data, "hex") or "") == data
    assert encode_payload(b"caf\xc3\xa9", "utf8") == "café"


def test_json_line() -> None:
    s = make_stream(client_data=b"line1\nline2\r\n\xe2\x80\xa8", server_data=b"\n")
    for enc in ("base64", "hex", "utf8", "none"):
        line = to_json(s, payload=enc)
        assert "\n" not in line and "\r" not in line
        assert len(line.splitlines()) == 1
        assert ", " not in line and '": ' not in line  # compact separators
        parsed = json.loads(line)
        assert parsed == to_record(s, payload=enc)
        assert list(parsed) == list(to_record(s, payload=enc))


@pytest.mark.parametrize("encoding", ["base64", "hex", "utf8", "none"])
def test_to_json_splice_equals_plain_encoding(encoding: str) -> None:
    # to_json splices base64/hex payloads in after encoding; the line must still be exactly
    # what json.dumps of the record gives.
    s = Stream(client=("10.0.0.1", 1), server=("10.0.0.2", 2), client_data=bytes(range(256)),
               server_data=b'\x00"\\\n' * 50, close_reason="fin", gaps=[], start=1.0, end=2.0,
               ip_version=4, interface="\x00streamtap-c\x00")
    line = to_json(s, encoding)
    assert line == json.dumps(to_record(s, encoding), separators=(",", ":"))


# ---------------------------------------------------------------- parts (issue 11 item 3)


def test_part_fields() -> None:
    whole = make_stream()
    s = make_stream(part=3, client_offset=64 << 20, server_offset=5, close_reason="part")
    r = to_record(s)
    assert r["stream"] == {"id": stream_id(whole), "part": 3}  # every part has the stream's id
    assert r["source"]["offset"] == 64 << 20 and r["destination"]["offset"] == 5
    assert r["tcp"]["close_reason"] == "part" and "part" in CLOSE_REASONS
    assert json.loads(to_json(s)) == r


def test_spool_codec_keeps_parts() -> None:
    from streamtap.sinks import codec

    s = make_stream(part=2, client_offset=7, server_offset=9, close_reason="part")
    assert codec.decode(codec.encode(s)) == s
    # a spool record written before parts existed reads back as part 0, offsets 0
    d = json.loads(codec.encode(make_stream()))
    del d["stream"]["part"], d["source"]["offset"], d["destination"]["offset"]
    old = codec.decode(json.dumps(d).encode())
    assert (old.part, old.client_offset, old.server_offset) == (0, 0, 0)


# ------------------------------------------ the direct writer against json.dumps of the dict


def assert_same_json(s: Stream, encoding: str, cap: int | None) -> None:
    chunks = to_json_chunks(s, encoding, cap, "\n")
    assert all(type(c) is bytes for c in chunks)
    expected = json.dumps(to_record(s, encoding, cap), separators=(",", ":")) + "\n"
    assert b"".join(chunks) == expected.encode("ascii")


def test_large_payloads_are_chunks_of_their_own() -> None:
    big_c, big_s = bytes(range(256)) * 40, b"\x00" * 9000
    s = make_stream(client_data=big_c, server_data=big_s)
    chunks = to_json_chunks(s)
    # text, client base64, text, server base64, text: the payloads are not copied into a line
    assert len(chunks) == 5
    assert chunks[1] == base64.b64encode(big_c) and chunks[3] == base64.b64encode(big_s)
    assert len(to_json_chunks(s, "base64", 100)) == 1  # capped small: one chunk
    assert len(to_json_chunks(s, "none")) == 1
    for enc in ("base64", "hex", "utf8", "none"):
        for cap in (None, 0, 1, 5000):
            assert_same_json(s, enc, cap)


def test_base64_is_the_simd_encoder() -> None:
    # pybase64 is a dependency: the record must not silently fall back to binascii (6x slower)
    import pybase64

    from streamtap.engine import stream

    assert stream._b64encode is pybase64.b64encode


def test_iso_times_across_days_and_before_1970() -> None:
    for t in (0.0, -1.5, 86399.9999996, 951782400.0, 4102444800.000001, T0, 1e10):
        s = make_stream(start=t, end=t + 0.0000005)
        r = to_record(s)
        assert r["event"]["start"] == time.strftime(
            "%Y-%m-%dT%H:%M:%S", time.gmtime(round(t * 1e6) // 1_000_000)
        ) + f".{round(t * 1e6) % 1_000_000:06d}Z"
        assert_same_json(s, "base64", None)


_text = st.text(max_size=12)
_ints = st.integers(min_value=0, max_value=2**63)


@st.composite
def streams(draw: st.DrawFn) -> Stream:
    v6 = draw(st.booleans())
    addr = st.ip_addresses(v=6 if v6 else 4).map(str)
    port = st.integers(0, 65535)
    data = st.one_of(st.binary(max_size=64), st.binary(min_size=1500, max_size=3000))
    start = draw(st.floats(min_value=-1e9, max_value=4e9, allow_nan=False))
    gap = st.tuples(_ints, _ints, st.sampled_from(["client", "server"]) | _text)
    return Stream(
        client=(draw(addr), draw(port)), server=(draw(addr), draw(port)),
        client_data=draw(data), server_data=draw(data),
        close_reason=draw(st.sampled_from(CLOSE_REASONS) | _text),
        gaps=draw(st.lists(gap, max_size=3)),
        start=start, end=start + draw(st.floats(min_value=-1, max_value=1e6)),
        ip_version=6 if v6 else 4,
        client_packets=draw(_ints), server_packets=draw(_ints),
        client_rule=draw(_text), history=draw(_text), state=draw(_text),
        retransmitted_bytes=draw(_ints), overlaps=draw(_ints), truncated=draw(st.booleans()),
        interface=draw(st.none() | _text),
        part=draw(_ints), client_offset=draw(_ints), server_offset=draw(_ints),
    )


@settings(max_examples=300, deadline=None)
@given(streams(), st.sampled_from(("base64", "hex", "utf8", "none")),
       st.none() | st.integers(0, 2000))
def test_direct_writer_equals_json_dumps(s: Stream, encoding: str, cap: int | None) -> None:
    assert_same_json(s, encoding, cap)


def test_direct_writer_equals_json_dumps_on_the_corpus(corpus_dir: Path) -> None:
    from streamtap import Error, reassemble

    captures = sorted(p for p in (corpus_dir / "pcaps").rglob("*")
                      if p.suffix in (".pcap", ".pcapng", ".cap") and p.is_file())
    assert len(captures) > 100
    n = 0
    for path in captures:
        try:
            got = list(reassemble(str(path)))
        except Error:  # a damaged capture: the streams before the damage are enough
            continue
        for s in got:
            for enc, cap in (("base64", None), ("base64", 1 << 20), ("hex", 100), ("utf8", None)):
                assert_same_json(s, enc, cap)
            n += 1
    assert n > 1000
