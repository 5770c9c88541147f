"""The stream record: layout, types, id, payload encodings, round trip."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from streamtap.communityid import community_id
from streamtap.record import encode_payload, stream_id, to_json, to_record
from streamtap.stream import Stream

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
    assert list(r["stream"]) == ["id"]
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
        assert list(part) == ["ip", "port", "bytes", "packets", "payload"]
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
