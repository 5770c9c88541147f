"""The library API (DESIGN "Interfaces"): `streamtap.reassemble()` and `streamtap.Reassembler`."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
from pcapbuild import LINKTYPE_ETHERNET, Conversation, frame, write_pcap

import streamtap
from streamtap.engine.reader import CaptureError

T0 = 1700000000.0
REQUEST = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def http_conv(client=("10.0.0.1", 40000), server=("10.0.0.2", 80), t0: float = T0,
              req: bytes = REQUEST, resp: bytes = RESPONSE) -> Conversation:
    c = Conversation(client, server, t0=t0)
    return c.handshake().send("client", req).send("server", resp).close()


def merged(*convs: Conversation) -> list[tuple[float, bytes]]:
    return sorted((p for c in convs for p in c.packets), key=lambda p: p[0])


@pytest.fixture
def capture(tmp_path: Path) -> Path:
    """Port 80 (fin), port 22 (rst), port 443 over IPv6 (left open)."""
    web = http_conv(("10.0.0.1", 40000), ("10.0.0.2", 80))
    ssh = Conversation(("10.0.0.1", 40001), ("10.0.0.3", 22), t0=T0 + 0.0002)
    ssh.handshake().send("server", b"SSH-2.0-x\r\n").rst("client")
    v6 = Conversation(("2001:db8::1", 40002), ("2001:db8::2", 443), t0=T0 + 0.0004)
    v6.handshake().send("client", b"\x16\x03\x01hello")
    p = tmp_path / "cap.pcap"
    write_pcap(p, merged(web, ssh, v6))
    return p


def by_port(streams) -> dict[int, streamtap.Stream]:
    out = {s.client[1]: s for s in streams}
    assert len(out) == len(streams)
    return out


# --------------------------------------------------------------------------- reassemble()


def test_reassemble_is_a_generator_of_streams(capture: Path):
    gen = streamtap.reassemble(capture)
    assert isinstance(gen, types.GeneratorType)
    streams = list(gen)
    assert all(isinstance(s, streamtap.Stream) for s in streams)
    s = by_port(streams)
    assert set(s) == {40000, 40001, 40002}

    web = s[40000]
    assert web.client == ("10.0.0.1", 40000) and web.server == ("10.0.0.2", 80)
    assert web.client_data == REQUEST and web.server_data == RESPONSE
    assert web.close_reason == "fin" and web.gaps == []

    ssh = s[40001]
    assert ssh.server == ("10.0.0.3", 22)
    assert ssh.client_data == b"" and ssh.server_data == b"SSH-2.0-x\r\n"
    assert ssh.close_reason == "rst"

    v6 = s[40002]
    assert v6.client == ("2001:db8::1", 40002) and v6.server == ("2001:db8::2", 443)
    assert v6.client_data == b"\x16\x03\x01hello"
    assert v6.close_reason == "shutdown"

    # a Path, a str: same result
    assert [x.record() for x in streamtap.reassemble(str(capture))] == \
        [x.record() for x in streams]


def test_record_dicts(capture: Path):
    web = by_port(list(streamtap.reassemble(capture)))[40000]
    rec = web.record()
    assert rec["source"]["ip"] == "10.0.0.1" and rec["destination"]["port"] == 80
    assert rec["source"]["bytes"] == len(REQUEST)
    assert rec["tcp"]["close_reason"] == "fin"
    assert rec["stream"]["id"] == web.id
    assert rec["network"]["community_id"] == web.community_id
    assert rec["streamtap"]["payload_encoding"] == "base64"
    import base64

    assert base64.b64decode(rec["source"]["payload"]) == REQUEST

    hexrec = web.record(payload="hex")
    assert hexrec["source"]["payload"] == REQUEST.hex()
    assert hexrec["destination"]["payload"] == RESPONSE.hex()
    assert hexrec["streamtap"]["payload_encoding"] == "hex"
    assert "payload" not in web.record(payload="none")["source"]
    with pytest.raises(ValueError):
        web.record(payload="rot13")


def test_reassemble_bpf(capture: Path):
    (s,) = streamtap.reassemble(capture, bpf="tcp port 22")
    assert s.server == ("10.0.0.3", 22)
    assert {x.client[1] for x in streamtap.reassemble(capture, bpf="ip6")} == {40002}
    assert list(streamtap.reassemble(capture, bpf="port 9999")) == []


def test_reassemble_bad_bpf(capture: Path):
    from streamtap.engine.reader import FilterError

    with pytest.raises(FilterError, match="unknown port"):
        list(streamtap.reassemble(capture, bpf="port nosuchport"))


def test_reassemble_list_of_paths_merges(tmp_path: Path):
    c = Conversation(t0=T0).handshake()
    for i in range(4):
        c.send("client", b"q%d " % i).send("server", b"a%d " % i)
    c.close()
    client_src = bytes([10, 0, 0, 1])
    mine = [p for p in c.packets if p[1][26:30] == client_src]
    theirs = [p for p in c.packets if p[1][26:30] != client_src]
    a, b = tmp_path / "a.pcap", tmp_path / "b.pcap"
    write_pcap(a, mine)
    write_pcap(b, theirs)
    (s,) = streamtap.reassemble([a, b])
    assert s.client_data == b"q0 q1 q2 q3 " and s.server_data == b"a0 a1 a2 a3 "
    assert s.close_reason == "fin" and s.gaps == []
    (s2,) = streamtap.reassemble([str(b), str(a)])
    assert s2.record() == s.record()


def test_stream_id_is_deterministic(capture: Path, tmp_path: Path):
    ids1 = sorted(s.id for s in streamtap.reassemble(capture))
    ids2 = sorted(s.id for s in streamtap.reassemble(capture))
    assert ids1 == ids2 and len(set(ids1)) == 3
    copy = tmp_path / "copy.pcap"
    copy.write_bytes(capture.read_bytes())
    assert sorted(s.id for s in streamtap.reassemble(copy)) == ids1
    # same 4-tuple, another start time: another id
    other = tmp_path / "other.pcap"
    http_conv(t0=T0 + 3600).write(other)
    (s,) = streamtap.reassemble(other)
    assert s.id not in ids1
    # same start time, another client port: another id
    other2 = tmp_path / "other2.pcap"
    http_conv(client=("10.0.0.1", 40009)).write(other2)
    (s2,) = streamtap.reassemble(other2)
    assert s2.id not in ids1 and s2.id != s.id


def test_damaged_file_yields_streams_then_raises(tmp_path: Path):
    first = http_conv(("10.0.0.1", 40000), t0=T0)
    second = Conversation(("10.0.0.1", 40001), t0=T0 + 10).handshake()
    second.send("client", b"kept").send("client", b"cut")
    pkts = first.packets + second.packets
    p = tmp_path / "damaged.pcap"
    write_pcap(p, pkts)
    offset = 24 + sum(16 + len(f) for _, f in pkts[:-1])
    p.write_bytes(p.read_bytes()[:offset + 20])

    gen = streamtap.reassemble(p)
    got = []
    with pytest.raises(CaptureError) as exc:
        for s in gen:
            got.append(s)
    assert exc.value.offset == offset
    assert f"byte {offset}" in str(exc.value)
    assert exc.value.path == str(p)
    s = by_port(got)
    assert s[40000].close_reason == "fin"
    assert s[40000].client_data == REQUEST and s[40000].server_data == RESPONSE
    assert s[40001].client_data == b"kept"


def test_missing_file_raises_capture_error(tmp_path: Path):
    with pytest.raises(CaptureError, match="nope.pcap"):
        list(streamtap.reassemble(tmp_path / "nope.pcap"))


# --------------------------------------------------------------------------- Reassembler


def test_reassembler_feed_completed_flush():
    a = http_conv(("10.0.0.1", 40000), ("10.0.0.2", 80), t0=T0)
    b = Conversation(("10.0.0.5", 40100), ("10.0.0.6", 8080), t0=T0 + 30)
    b.handshake().send("client", b"later").send("server", b"reply")

    r = streamtap.Reassembler()
    done = []
    for ts, f in a.packets:
        r.feed(ts, LINKTYPE_ETHERNET, f)
        done += r.completed()
    # FIN both ways: the stream may linger for stragglers, but is never "shutdown" on its own
    assert all(s.close_reason == "fin" for s in done)
    for ts, f in b.packets:
        r.feed(ts, LINKTYPE_ETHERNET, f)
        done += r.completed()
    # a's linger has passed by b's packet times
    (sa,) = done
    assert sa.client == ("10.0.0.1", 40000) and sa.server == ("10.0.0.2", 80)
    assert sa.client_data == REQUEST and sa.server_data == RESPONSE
    assert sa.close_reason == "fin"
    assert r.completed() == []  # each stream handed out once

    rest = r.flush()
    (sb,) = rest
    assert sb.client == ("10.0.0.5", 40100)
    assert sb.client_data == b"later" and sb.server_data == b"reply"
    assert sb.close_reason == "shutdown"
    assert r.flush() == [] and r.completed() == []
    assert r.packets == len(a.packets) + len(b.packets)

    assert r.summary() == {
        "10.0.0.1:40000-10.0.0.2:80": {40000: len(REQUEST), 80: len(RESPONSE)},
        "10.0.0.5:40100-10.0.0.6:8080": {40100: 5, 8080: 5},
    }
    stats = r.stats
    assert stats["packets"] == len(a.packets) + len(b.packets)
    assert stats["streams"]["fin"] == 1 and stats["streams"]["shutdown"] == 1


def test_reassembler_rst_completes_after_linger():
    a = Conversation(t0=T0).handshake().send("client", b"x").rst("server")
    later = frame("10.9.9.9", "10.9.9.8", 1234, 80, 1, flags="S")
    r = streamtap.Reassembler()
    for ts, f in a.packets:
        r.feed(ts, LINKTYPE_ETHERNET, f)
    r.feed(T0 + 60, LINKTYPE_ETHERNET, later)
    (s,) = r.completed()
    assert s.close_reason == "rst" and s.client_data == b"x"


def test_reassembler_summary_ipv6_key():
    c = http_conv(("2001:db8::1", 5555), ("2001:db8::2", 80))
    r = streamtap.Reassembler()
    for ts, f in c.packets:
        r.feed(ts, LINKTYPE_ETHERNET, f)
    r.flush()
    assert r.summary() == {"[2001:db8::1]:5555-[2001:db8::2]:80": {5555: len(REQUEST),
                                                                   80: len(RESPONSE)}}


def test_reassembler_other_linktypes():
    from pcapbuild import LINKTYPE_LINUX_SLL, LINKTYPE_RAW

    r = streamtap.Reassembler()
    for i, lt in enumerate((LINKTYPE_RAW, LINKTYPE_LINUX_SLL)):
        c = Conversation(("10.0.0.1", 40000 + i), t0=T0 + i, linktype=lt)
        c.handshake().send("client", b"lt%d" % lt).close()
        for ts, f in c.packets:
            r.feed(ts, lt, f)
    got = by_port(r.flush())
    assert got[40000].client_data == b"lt101" and got[40001].client_data == b"lt113"


def _short_connection(i: int, t: float) -> list[tuple[float, bytes]]:
    port = 10000 + i % 50000
    c = Conversation((f"10.1.{i // 250 % 250}.{i % 250 + 1}", port),
                     ("10.2.0.1", 80), isn_c=i * 7919, isn_s=i * 104729, t0=t, dt=0.0005)
    c.handshake().send("client", b"req %d" % i).send("server", b"resp %d" % i).close()
    return c.packets


def test_bounded_memory_many_short_connections():
    """3,000 sequential connections, each closed by FIN: closed flows leave the table (after
    their linger), so the open-flow count stays small and no buffer outlives its flow."""
    r = streamtap.Reassembler()
    n = 3000
    spacing = 0.5  # s between connections: fin_linger 5 s keeps ~10 of them in the table
    max_flows = 0
    got = 0
    for i in range(n):
        for ts, f in _short_connection(i, T0 + i * spacing):
            r.feed(ts, LINKTYPE_ETHERNET, f)
            max_flows = max(max_flows, r.table.nflows)
        for s in r.completed():
            got += 1
            assert s.close_reason == "fin"
            assert s.client_data.startswith(b"req ")
    assert max_flows < 50, max_flows
    assert got > n - 50
    rest = r.flush()
    assert got + len(rest) == n
    assert all(s.close_reason == "fin" for s in rest)  # lingering ones keep their reason
    assert r.table.nflows == 0
    assert r.table.mem == 0
    assert r.stats["streams"]["fin"] == n


def test_reassemble_generator_streams_before_the_end(tmp_path: Path):
    """reassemble() yields completed streams while reading, not only at the end."""
    p = tmp_path / "many.pcap"
    pkts = []
    for i in range(2000):
        pkts += _short_connection(i, T0 + i * 0.5)
    write_pcap(p, pkts)
    gen = streamtap.reassemble(p)
    first = next(gen)
    assert first.close_reason == "fin"
    assert first.client_data == b"req 0"
    assert sum(1 for _ in gen) == 1999


# --------------------------------------------------------------------------- get_streams()
# The scapy stream extractor's call: {'SRC:SPORT ==> DST:DPORT': {SPORT: client, DPORT: server}}


def test_get_streams_returns_contents_in_the_extractors_shape(capture: Path):
    got = streamtap.get_streams(str(capture))
    assert got == {
        "10.0.0.1:40000 ==> 10.0.0.2:80": {40000: REQUEST, 80: RESPONSE},
        "10.0.0.1:40001 ==> 10.0.0.3:22": {40001: b"", 22: b"SSH-2.0-x\r\n"},
        "2001:db8::1:40002 ==> 2001:db8::2:443": {40002: b"\x16\x03\x01hello", 443: b""},
    }
    for value in got.values():
        assert all(type(port) is int and type(data) is bytes for port, data in value.items())
    assert streamtap.get_streams(capture, bpf="tcp port 22") == {
        "10.0.0.1:40001 ==> 10.0.0.3:22": {40001: b"", 22: b"SSH-2.0-x\r\n"}}


def test_get_streams_takes_a_list_of_paths(tmp_path: Path):
    a, b = tmp_path / "a.pcap", tmp_path / "b.pcap"
    write_pcap(a, http_conv(("10.0.0.1", 40000)).packets)
    write_pcap(b, http_conv(("10.0.0.1", 40001), t0=T0 + 1, req=b"two").packets)
    assert streamtap.get_streams([a, str(b)]) == {
        "10.0.0.1:40000 ==> 10.0.0.2:80": {40000: REQUEST, 80: RESPONSE},
        "10.0.0.1:40001 ==> 10.0.0.2:80": {40001: b"two", 80: RESPONSE},
    }


def test_get_streams_port_reuse_concatenates_in_start_order(tmp_path: Path):
    first = http_conv(req=b"first ", resp=b"one ")
    second = Conversation(("10.0.0.1", 40000), ("10.0.0.2", 80), isn_c=777, isn_s=999,
                          t0=T0 + 30)
    second.handshake().send("client", b"second").send("server", b"two").close()
    path = tmp_path / "reuse.pcap"
    write_pcap(path, merged(first, second))
    assert len(list(streamtap.reassemble(path))) == 2  # two connections, one key below
    assert streamtap.get_streams(path) == {
        "10.0.0.1:40000 ==> 10.0.0.2:80": {40000: b"first second", 80: b"one two"}}
    r = streamtap.Reassembler()
    for ts, f in merged(first, second):
        r.feed(ts, LINKTYPE_ETHERNET, f)
    r.flush()
    assert r.summary() == {"10.0.0.1:40000-10.0.0.2:80": {40000: 12, 80: 7}}


def test_get_streams_equal_ports_keep_both_directions(tmp_path: Path):
    c = http_conv(("10.0.0.1", 5000), ("10.0.0.2", 5000), req=b"ping", resp=b"pong")
    path = tmp_path / "same.pcap"
    write_pcap(path, c.packets)
    assert streamtap.get_streams(path) == {"10.0.0.1:5000 ==> 10.0.0.2:5000": {5000: b"pingpong"}}


def test_reassembler_get_streams_matches_the_file_call(capture: Path, tmp_path: Path):
    from streamtap.engine.reader import read

    r = streamtap.Reassembler()
    quiet = streamtap.Reassembler(summary=False)
    for linktype, data, meta in read([str(capture)]):
        r.feed_batch(linktype, data, meta)
        quiet.feed_batch(linktype, data, meta)
    before = r.get_streams()
    assert "2001:db8::1:40002 ==> 2001:db8::2:443" not in before  # still open until flush
    r.flush()
    quiet.flush()
    assert r.get_streams() == streamtap.get_streams(capture)
    assert len(r.get_streams()) == 3
    assert quiet.get_streams() == {} and quiet.summary() == {}


def late_segment_conv() -> Conversation:
    """The client's second segment reaches the sensor after the server's ACK that covers it
    (SPAN port, aggregating tap): the hole is skipped, then filled late."""
    c = Conversation(t0=T0).handshake()
    c.segment("client", 0, b"GET /late HTTP/1.1\r\n")
    c.segment("client", 40, b"\r\n")
    c.ack("server")                                   # acknowledges all 42 bytes
    c.segment("client", 20, b"Host: example.com\r\n\r\n"[:20])
    return c.send("server", b"HTTP/1.1 204 No Content\r\n\r\n").close()


def test_late_segment_fills_its_hole_and_is_counted(tmp_path: Path):
    p = tmp_path / "late.pcap"
    write_pcap(p, late_segment_conv().packets)
    r = streamtap.Reassembler()
    for linktype, data, meta in streamtap.engine.reader.read([str(p)]):
        r.feed_batch(linktype, data, meta)
    (s,) = r.flush()
    assert s.client_data == b"GET /late HTTP/1.1\r\nHost: example.com\r\n\r\n"[:40] + b"\r\n"
    assert s.gaps == [] and s.missed_bytes == 0 and "G" not in s.history
    rec = s.record()
    assert rec["tcp"]["gaps"] == [] and rec["tcp"]["missed_bytes"] == 0
    stats = r.stats
    assert stats["late_filled_segments"] == 1 and stats["late_filled_bytes"] == 20
    assert stats["late_dropped_bytes"] == 0 and stats["missed_bytes"] == 0
