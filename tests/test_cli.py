"""The `streamtap` command line (DESIGN "Interfaces": CLI; "Pinned details": record JSON).

Most tests run the installed console script in a subprocess, the way a user does; a few call
`streamtap.cli.main()` in-process where that is simpler. Every test checks that nothing on
stderr is a Python traceback.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from couchserver import CouchServer, PouchdbMissing, free_port
from pcapbuild import Conversation, write_pcap, write_pcapng

from streamtap import __version__
from streamtap.cli import main

STREAMTAP = Path(sys.executable).parent / "streamtap"
T0 = 1700000000.0  # 2023-11-14T22:13:20Z
T0_ISO = "2023-11-14T22:13:20.000000Z"

REQUEST = b"GET /index.html HTTP/1.1\r\nHost: example.com\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
BINARY = bytes(range(256)) + b"\x00\xff" * 10


# --------------------------------------------------------------------------- helpers


def run(*args: str | Path, stdin: bytes | None = None, timeout: float = 60) -> (
        subprocess.CompletedProcess[bytes]):
    """Run the console script; never a traceback on stderr."""
    proc = subprocess.run([str(STREAMTAP), *map(str, args)], input=stdin, capture_output=True,
                          timeout=timeout)
    assert b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    return proc


def records(stdout: bytes | str) -> list[dict]:
    text = stdout.decode() if isinstance(stdout, bytes) else stdout
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def by_client_port(recs: list[dict]) -> dict[int, dict]:
    out = {r["source"]["port"]: r for r in recs}
    assert len(out) == len(recs), "two records with the same client port"
    return out


def payload(rec: dict, side: str) -> bytes:
    assert rec["streamtap"]["payload_encoding"] == "base64"
    return base64.b64decode(rec[side]["payload"], validate=True)


def community_id(saddr: str, sport: int, daddr: str, dport: int, proto: int = 6) -> str:
    """Community ID v1, seed 0, written here from the spec (independent of streamtap's)."""
    s, d = ipaddress.ip_address(saddr).packed, ipaddress.ip_address(daddr).packed
    if (s, sport) > (d, dport):
        s, d, sport, dport = d, s, dport, sport
    h = hashlib.sha1(struct.pack("!H", 0) + s + d + struct.pack("!BBHH", proto, 0, sport, dport))
    return "1:" + base64.b64encode(h.digest()).decode()


def test_community_id_helper_matches_the_spec_vector():
    assert community_id("128.232.110.120", 34855, "66.35.250.204", 80) == \
        "1:LQU9qZlK+B5F3KDmev6m5PMibrg="


def http_conv(client=("10.0.0.1", 40000), server=("10.0.0.2", 80), t0: float = T0,
              **kw) -> Conversation:
    c = Conversation(client, server, t0=t0, **kw)
    return c.handshake().send("client", REQUEST).send("server", RESPONSE).close()


def merged(*convs: Conversation) -> list[tuple[float, bytes]]:
    return sorted((p for c in convs for p in c.packets), key=lambda p: p[0])


@pytest.fixture
def http_pcap(tmp_path: Path) -> Path:
    p = tmp_path / "http.pcap"
    http_conv().write(p)
    return p


@pytest.fixture
def two_ports_pcap(tmp_path: Path) -> Path:
    """A port-80 connection and a port-22 connection, interleaved."""
    p = tmp_path / "two.pcap"
    web = http_conv(("10.0.0.1", 40000), ("10.0.0.2", 80))
    ssh = Conversation(("10.0.0.1", 40001), ("10.0.0.3", 22), t0=T0 + 0.0005)
    ssh.handshake().send("server", b"SSH-2.0-OpenSSH_9.2\r\n").send("client", b"SSH-2.0-x\r\n")
    ssh.close()
    write_pcap(p, merged(web, ssh))
    return p


# --------------------------------------------------------------------------- records


def test_one_json_line_per_stream_with_nested_fields(tmp_path: Path):
    v4 = http_conv(("10.0.0.1", 40000), ("10.0.0.2", 80), t0=T0)
    v6 = Conversation(("2001:db8::1", 40001), ("2001:db8::2", 443), t0=T0 + 0.0001)
    v6.handshake().send("client", BINARY).send("server", b"\x01\x02\x03").close()
    refused = Conversation(("10.0.0.1", 40002), ("10.0.0.9", 23), t0=T0 + 0.0002)
    refused.syn().packet("server", 0, refused.seq("client", 0), "RA")
    p = tmp_path / "mix.pcap"
    write_pcap(p, merged(v4, v6, refused))

    proc = run("-r", p, "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 3
    recs = by_client_port(records(proc.stdout))

    r = recs[40000]
    assert set(r) >= {"stream", "event", "network", "source", "destination", "tcp", "streamtap"}
    assert isinstance(r["stream"]["id"], str) and len(r["stream"]["id"]) == 32
    int(r["stream"]["id"], 16)
    assert r["event"]["start"] == T0_ISO
    assert r["network"] == {"community_id": community_id("10.0.0.1", 40000, "10.0.0.2", 80),
                            "transport": "tcp", "type": "ipv4"}
    assert r["source"]["ip"] == "10.0.0.1" and r["source"]["port"] == 40000
    assert r["destination"]["ip"] == "10.0.0.2" and r["destination"]["port"] == 80
    assert payload(r, "source") == REQUEST
    assert payload(r, "destination") == RESPONSE
    assert r["source"]["bytes"] == len(REQUEST)
    assert r["destination"]["bytes"] == len(RESPONSE)
    # client: SYN, ACK, request, FIN, last ACK; server: SYN-ACK, response, FIN
    assert r["source"]["packets"] == 5
    assert r["destination"]["packets"] == 3
    assert r["tcp"]["close_reason"] == "fin"
    assert r["tcp"]["gaps"] == []
    assert r["streamtap"]["payload_encoding"] == "base64"

    r6 = recs[40001]
    assert r6["network"]["type"] == "ipv6"
    assert r6["network"]["community_id"] == community_id("2001:db8::1", 40001, "2001:db8::2", 443)
    assert r6["source"]["ip"] == "2001:db8::1" and r6["destination"]["port"] == 443
    assert payload(r6, "source") == BINARY
    assert payload(r6, "destination") == b"\x01\x02\x03"
    assert r6["event"]["start"] == "2023-11-14T22:13:20.000100Z"

    rr = recs[40002]  # streams without payload are emitted too
    assert rr["tcp"]["close_reason"] == "rst"
    assert payload(rr, "source") == b"" and payload(rr, "destination") == b""
    assert rr["source"]["bytes"] == 0 and rr["destination"]["bytes"] == 0


def test_gaps_in_record(tmp_path: Path):
    c = Conversation(t0=T0).handshake().send("client", b"AAAA")
    c.send("client", b"CCCC", seq_offset=10).send("server", b"ok").close()
    p = tmp_path / "gap.pcap"
    c.write(p)
    proc = run("-r", p)
    assert proc.returncode == 0
    (r,) = records(proc.stdout)
    assert payload(r, "source") == b"AAAACCCC"  # skipped, never zero-filled
    assert r["tcp"]["gaps"] == [{"dir": "client", "offset": 4, "length": 10}]
    assert r["tcp"]["missed_bytes"] == 10
    assert "1 gaps (10 bytes missed)" in proc.stderr.decode()


# --------------------------------------------------------------------------- summary


def test_summary_line_on_stderr(tmp_path: Path):
    fin = http_conv(("10.0.0.1", 40000), t0=T0)                              # 8 packets
    rst = Conversation(("10.0.0.1", 40001), t0=T0 + 0.0001)
    rst.handshake().send("client", b"x").rst("client")                         # 5 packets
    open_ = Conversation(("10.0.0.1", 40002), t0=T0 + 0.0002)
    open_.handshake().send("client", b"still here")                            # 4 packets
    p = tmp_path / "s.pcap"
    # one malformed frame: IPv4 claiming TCP with only 4 bytes of TCP header
    bad = bytes(fin.packets[0][1][:14 + 20 + 4])
    bad = bad[:16] + struct.pack("!H", 24) + bad[18:]
    write_pcap(p, merged(fin, rst, open_) + [(T0 + 0.5, bad)])
    proc = run("-r", p)
    assert proc.returncode == 0
    assert len(records(proc.stdout)) == 3
    err = proc.stderr.decode()
    assert err.count("\n") == 1, err
    assert "18 packets" in err
    assert "3 streams (fin 1, rst 1, timeout 0, evicted 0, shutdown 1)" in err
    assert "0 gaps" in err
    assert "1 malformed" in err

    quiet = run("-r", p, "-q")
    assert quiet.returncode == 0
    assert quiet.stderr == b""
    assert quiet.stdout == proc.stdout


# --------------------------------------------------------------------------- inputs


def test_several_files_merged_in_timestamp_order(tmp_path: Path):
    """One connection split across two files (client packets in one, server packets in the
    other): the merge interleaves them back into one stream."""
    c = Conversation(t0=T0).handshake()
    for i in range(5):
        c.send("client", b"c%d;" % i).send("server", b"s%d;" % i)
    c.close()
    client_ip = c.client[0]
    mine = [p for p in c.packets if p[1][14 + 12:14 + 16] == bytes(map(int,
                                                                       client_ip.split(".")))]
    theirs = [p for p in c.packets if p not in mine]
    assert mine and theirs
    a, b = tmp_path / "a.pcap", tmp_path / "b.pcap"
    write_pcap(a, mine)
    write_pcap(b, theirs)
    for order in ((a, b), (b, a)):
        proc = run("-r", order[0], "-r", order[1], "-q")
        assert proc.returncode == 0, proc.stderr
        (r,) = records(proc.stdout)
        assert payload(r, "source") == b"c0;c1;c2;c3;c4;"
        assert payload(r, "destination") == b"s0;s1;s2;s3;s4;"
        assert r["tcp"]["close_reason"] == "fin"
        assert r["tcp"]["gaps"] == []
        assert r["source"]["packets"] + r["destination"]["packets"] == len(c.packets)
    # file names are not part of the result: merged == one file with everything
    whole = tmp_path / "whole.pcap"
    c.write(whole)
    assert run("-r", whole, "-q").stdout == run("-r", a, "-r", b, "-q").stdout


def test_stdin(http_pcap: Path):
    proc = run("-r", "-", "-q", stdin=http_pcap.read_bytes())
    assert proc.returncode == 0, proc.stderr
    (r,) = records(proc.stdout)
    assert payload(r, "source") == REQUEST and payload(r, "destination") == RESPONSE
    assert proc.stdout == run("-r", http_pcap, "-q").stdout


def test_pcapng(tmp_path: Path):
    c = http_conv(t0=T0 + 0.25)
    p = tmp_path / "x.pcapng"
    c.write(p, pcapng=True)
    proc = run("-r", p, "-q")
    assert proc.returncode == 0, proc.stderr
    (r,) = records(proc.stdout)
    assert payload(r, "source") == REQUEST and payload(r, "destination") == RESPONSE
    assert r["event"]["start"] == "2023-11-14T22:13:20.250000Z"

    write_pcapng(tmp_path / "ns.pcapng", c.packets, nanosecond=True)
    proc = run("-r", tmp_path / "ns.pcapng", "-q")
    assert proc.returncode == 0, proc.stderr
    assert records(proc.stdout) == [r]


def test_nanosecond_pcap(tmp_path: Path):
    c = http_conv()
    # exact nanosecond stamps: 123456789 ns past T0, then 1 ms apart
    pkts = [((int(T0), 123_456_789 + i * 1_000_000), f) for i, (_, f) in enumerate(c.packets)]
    p = tmp_path / "ns.pcap"
    write_pcap(p, pkts, nanosecond=True)
    proc = run("-r", p, "-q")
    assert proc.returncode == 0, proc.stderr
    (r,) = records(proc.stdout)
    assert payload(r, "source") == REQUEST and payload(r, "destination") == RESPONSE
    # read at microsecond precision (libpcap truncates)
    assert r["event"]["start"] == "2023-11-14T22:13:20.123456Z"
    assert r["event"]["end"] == "2023-11-14T22:13:20.130456Z"


def test_count_stops_after_count_packets(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    c = Conversation(t0=T0).handshake()
    for chunk in (b"one ", b"two ", b"three ", b"four "):
        c.send("client", chunk)
    c.close()
    p = tmp_path / "c.pcap"
    c.write(p)
    proc = run("-r", p, "-c", "5")  # SYN, SYN-ACK, ACK, "one ", "two "
    assert proc.returncode == 0, proc.stderr
    (r,) = records(proc.stdout)
    assert payload(r, "source") == b"one two "
    assert r["tcp"]["close_reason"] == "shutdown"
    assert r["source"]["packets"] + r["destination"]["packets"] == 5
    assert "5 packets" in proc.stderr.decode()

    assert main(["-r", str(p), "-c", "4", "-q"]) == 0
    out = capsys.readouterr()
    (r,) = records(out.out)
    assert payload(r, "source") == b"one "
    assert out.err == ""


def test_count_across_batches(tmp_path: Path):
    """-c inside a later batch (the reader hands packets over 4096 at a time)."""
    c = Conversation(t0=T0).handshake()
    for i in range(5000):
        c.send("client", b"%05d" % i, dt=0.0001)
    p = tmp_path / "big.pcap"
    c.write(p)
    proc = run("-r", p, "-c", "4503")
    assert proc.returncode == 0, proc.stderr
    (r,) = records(proc.stdout)
    assert payload(r, "source") == b"".join(b"%05d" % i for i in range(4500))
    assert "4503 packets" in proc.stderr.decode()


def test_bpf_expression_as_trailing_words(two_ports_pcap: Path):
    both = records(run("-r", two_ports_pcap, "-q").stdout)
    assert sorted(r["destination"]["port"] for r in both) == [22, 80]
    proc = run("-r", two_ports_pcap, "-q", "tcp", "port", "80")
    assert proc.returncode == 0, proc.stderr
    (r,) = records(proc.stdout)
    assert r["destination"]["port"] == 80
    assert payload(r, "source") == REQUEST
    proc = run("-q", "-r", two_ports_pcap, "port 22")
    (r,) = records(proc.stdout)
    assert r["destination"]["port"] == 22


def test_bpf_from_file(two_ports_pcap: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    f = tmp_path / "filter.bpf"
    f.write_text("tcp\nand port 22\n")
    proc = run("-r", two_ports_pcap, "-q", "-F", f)
    assert proc.returncode == 0, proc.stderr
    (r,) = records(proc.stdout)
    assert r["destination"]["port"] == 22
    assert main(["-r", str(two_ports_pcap), "-q", "-F", str(f)]) == 0
    assert records(capsys.readouterr().out) == [r]
    # -F and an expression together: a usage error
    both = run("-r", two_ports_pcap, "-F", f, "port", "80")
    assert both.returncode == 2
    # -F naming a missing file: usage error naming it
    missing = run("-r", two_ports_pcap, "-F", tmp_path / "nope.bpf")
    assert missing.returncode == 2
    assert b"nope.bpf" in missing.stderr


def test_sink_jsonl_path(http_pcap: Path, tmp_path: Path):
    out = tmp_path / "out.jsonl"
    proc = run("-r", http_pcap, "--sink", f"jsonl:{out}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b""
    (r,) = records(out.read_text())
    assert payload(r, "source") == REQUEST and payload(r, "destination") == RESPONSE
    assert b"1 streams" in proc.stderr
    # jsonl:- is stdout
    proc = run("-r", http_pcap, "-q", "--sink", "jsonl:-")
    assert records(proc.stdout) == [r]


# --------------------------------------------------------------------------- errors


def test_bad_bpf_exits_2_with_libpcap_message(http_pcap: Path):
    proc = run("-r", http_pcap, "tcp", "port", "bogus")
    assert proc.returncode == 2
    assert b"unknown port 'bogus'" in proc.stderr  # libpcap's words
    assert proc.stdout == b""
    proc = run("-r", http_pcap, "tcp", "and")
    assert proc.returncode == 2
    assert b"syntax error" in proc.stderr


def test_unknown_flag_exits_2():
    proc = run("--no-such-flag")
    assert proc.returncode == 2
    assert b"--no-such-flag" in proc.stderr


def test_nothing_to_do_exits_2():
    proc = run()
    assert proc.returncode == 2
    assert b"-r" in proc.stderr


def test_missing_file_exits_1_naming_it(tmp_path: Path):
    missing = tmp_path / "does-not-exist.pcap"
    proc = run("-r", missing)
    assert proc.returncode == 1
    assert str(missing).encode() in proc.stderr
    assert proc.stdout == b""


def test_garbage_file_exits_1_at_byte_0(tmp_path: Path):
    g = tmp_path / "garbage.pcap"
    g.write_bytes(b"this is not a capture file at all\n" * 20)
    proc = run("-r", g)
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert str(g) in err and "byte 0" in err
    assert proc.stdout == b""


@pytest.mark.parametrize("cut", [5, 15, 30])  # inside a record header / inside the frame
def test_truncated_file_exits_1_with_offset_and_keeps_earlier_streams(tmp_path: Path, cut: int):
    first = http_conv(("10.0.0.1", 40000), t0=T0)
    second = Conversation(("10.0.0.1", 40001), t0=T0 + 1).handshake()
    second.send("client", b"before damage").send("client", b"lost in the damage")
    pkts = first.packets + second.packets
    p = tmp_path / "cut.pcap"
    write_pcap(p, pkts)
    # damage inside the last record
    offset = 24 + sum(16 + len(f) for _, f in pkts[:-1])
    data = p.read_bytes()
    assert len(data) == offset + 16 + len(pkts[-1][1])
    p.write_bytes(data[:offset + cut])

    proc = run("-r", p)
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert str(p) in err
    assert f"byte {offset}" in err, err
    recs = by_client_port(records(proc.stdout))
    r = recs[40000]
    assert r["tcp"]["close_reason"] == "fin"
    assert payload(r, "source") == REQUEST and payload(r, "destination") == RESPONSE
    r2 = recs[40001]  # everything before the damage, then flushed
    assert payload(r2, "source") == b"before damage"
    assert r2["tcp"]["close_reason"] == "shutdown"


def test_truncated_file_on_stdin_exits_1(http_pcap: Path):
    data = http_pcap.read_bytes()
    proc = run("-r", "-", stdin=data[:-10])
    assert proc.returncode == 1
    assert b"<stdin>" in proc.stderr or b"stdin" in proc.stderr


def test_check_config_round_trip(tmp_path: Path):
    proc = run("--check-config")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.decode()
    assert "reassembly:" in text and "handshake:" in text
    cfg = tmp_path / "effective.yaml"
    cfg.write_bytes(proc.stdout)
    again = run("--check-config", "--config", cfg)
    assert again.returncode == 0, again.stderr
    assert again.stdout == proc.stdout
    # overrides from flags show up in the effective config, and survive a round trip too
    with_flags = run("--check-config", "--sink", f"jsonl:{tmp_path / 'o.jsonl'}", "tcp",
                     "port", "80")
    assert with_flags.returncode == 0, with_flags.stderr
    assert b"tcp port 80" in with_flags.stdout
    assert str(tmp_path / "o.jsonl").encode() in with_flags.stdout
    cfg2 = tmp_path / "flags.yaml"
    cfg2.write_bytes(with_flags.stdout)
    assert run("--check-config", "--config", cfg2).stdout == with_flags.stdout


def test_bad_config_exits_2_naming_key_and_line(tmp_path: Path, http_pcap: Path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("# a comment\nreassembly:\n  timeouts:\n    handshake: soon\n")
    for extra in ((), ("-r", http_pcap)):
        proc = run("--check-config", "--config", cfg, *extra)
        assert proc.returncode == 2
        err = proc.stderr.decode()
        assert "reassembly.timeouts.handshake" in err
        assert f"{cfg}:4" in err, err
        assert proc.stdout == b""
    proc = run("-r", http_pcap, "--config", cfg)
    assert proc.returncode == 2
    assert "reassembly.timeouts.handshake" in proc.stderr.decode()
    assert proc.stdout == b""


def test_missing_config_file_exits_2(tmp_path: Path):
    proc = run("--check-config", "--config", tmp_path / "nope.yaml")
    assert proc.returncode == 2
    assert b"nope.yaml" in proc.stderr


def test_version():
    proc = run("--version")
    assert proc.returncode == 0
    # the engine is compiled or python (tests/test_engines.py checks which)
    assert re.fullmatch(rf"streamtap {re.escape(__version__)} \(engine: (compiled|python)\)",
                        proc.stdout.decode().strip())


@pytest.mark.parametrize("spec", ["bogus:x", "jsonl", "jsonl:", "nocolon"])
def test_bad_sink_exits_2(http_pcap: Path, spec: str):
    proc = run("-r", http_pcap, "--sink", spec)
    assert proc.returncode == 2
    assert b"--sink" in proc.stderr
    assert proc.stdout == b""


def test_sample_script_builds_a_capture(tmp_path: Path):
    out = tmp_path / "sub" / "sample.pcap"
    script = Path(__file__).resolve().parent / "sample.py"
    subprocess.run([sys.executable, str(script), str(out)], check=True,
                   cwd=Path(__file__).resolve().parents[1])
    assert 0 < out.stat().st_size < 50_000
    proc = run("-r", out)
    assert proc.returncode == 0, proc.stderr
    recs = records(proc.stdout)
    assert len(recs) == 10
    reasons = sorted(r["tcp"]["close_reason"] for r in recs)
    assert reasons == ["fin"] * 7 + ["rst"] * 2 + ["shutdown"]
    assert {r["network"]["type"] for r in recs} == {"ipv4", "ipv6"}
    assert any(r["tcp"]["retransmitted_bytes"] > 0 for r in recs)
    assert all(r["tcp"]["gaps"] == [] for r in recs)
    ooo = next(r for r in recs if r["source"]["port"] == 51002)
    assert payload(ooo, "destination").endswith(b"0123456789abcdef" * 8)


def test_unsupported_linktype_exits_1(tmp_path: Path):
    p = tmp_path / "lt147.pcap"
    write_pcap(p, [(T0, b"\x00" * 40)], linktype=147)
    proc = run("-r", p)
    assert proc.returncode == 1
    assert b"147" in proc.stderr


# --------------------------------------------------------------------------- a sink that fails
# Offline, a sink that cannot open or write ends the run: exit 1, one line on stderr naming the
# sink and the OS's or the server's answer, never a traceback.


def one_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    lines = proc.stderr.decode(errors="replace").splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def couch_server(**kw) -> CouchServer:
    try:
        return CouchServer(**kw)
    except PouchdbMissing as exc:  # a missing pouchdb-server fails, never skips
        pytest.fail(str(exc), pytrace=False)


def test_sink_path_in_missing_directory_is_one_line_not_a_traceback(http_pcap: Path,
                                                                    tmp_path: Path):
    out = tmp_path / "no-such-dir" / "out.jsonl"
    proc = run("-r", http_pcap, "--sink", f"jsonl:{out}")
    assert proc.returncode == 1
    assert one_line(proc) == f"streamtap: sink jsonl: {out}: No such file or directory"
    assert proc.stdout == b""


def test_sink_path_in_read_only_directory(http_pcap: Path, tmp_path: Path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    out = ro / "out.jsonl"
    argv = [str(STREAMTAP), "-r", str(http_pcap), "--sink", f"jsonl:{out}"]
    if os.geteuid() == 0:  # root writes anywhere: run without CAP_DAC_OVERRIDE
        argv = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", *argv]
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=60)
    finally:
        ro.chmod(0o755)
    assert proc.returncode == 1, proc.stderr
    assert one_line(proc) == f"streamtap: sink jsonl: {out}: Permission denied"
    assert not out.exists()


def test_sink_pcap_dir_that_is_a_regular_file(http_pcap: Path, tmp_path: Path):
    # (a `files` sink's directory is opened the same way: OSError -> this one line)
    f = tmp_path / "not-a-dir"
    f.write_bytes(b"x")
    proc = run("-r", http_pcap, "--sink", f"pcap:{f}")
    assert proc.returncode == 1
    assert one_line(proc) == f"streamtap: sink pcap: {f}: Not a directory"
    proc = run("-r", http_pcap, "--sink", f"pcap:{f}/sub")
    assert proc.returncode == 1
    assert one_line(proc) == f"streamtap: sink pcap: {f}/sub: Not a directory"
    assert f.read_bytes() == b"x"


def test_sink_write_failure_is_one_line_and_other_sinks_get_the_streams(http_pcap: Path,
                                                                       tmp_path: Path):
    good = tmp_path / "good.jsonl"
    proc = run("-r", http_pcap, "-q", "--sink", "jsonl:/dev/full", "--sink", f"jsonl:{good}")
    assert proc.returncode == 1
    assert one_line(proc) == "streamtap: sink jsonl: /dev/full: No space left on device"
    assert len(records(good.read_bytes())) == 1


def test_couchdb_unreachable_is_one_line(http_pcap: Path):
    port = free_port()  # nobody listens there: connection refused
    proc = run("-r", http_pcap, "--sink", f"couchdb:http://u:hunter22@127.0.0.1:{port}/streams")
    assert proc.returncode == 1
    assert one_line(proc) == (f"streamtap: sink couchdb: http://127.0.0.1:{port}/streams: "
                              "cannot connect: Connection refused")


def test_couchdb_401_is_one_line_without_the_password(http_pcap: Path):
    with couch_server(admins={"admin": "right-pw"}) as server:
        url = server.url.replace("://", "://admin:wrong-pw@") + "/streams"
        proc = run("-r", http_pcap, "--sink", f"couchdb:{url}")
    assert proc.returncode == 1
    assert one_line(proc) == (f"streamtap: sink couchdb: {server.url}/streams: "
                              "HTTP 401 unauthorized: Name or password is incorrect.")


def test_couchdb_url_names_the_database(two_ports_pcap: Path):
    """Issue 8.2: `couchdb:http://h:5984/streams` writes to the database `streams` (it used to
    PUT /streams/streamtap and fail with 404 no_db_file)."""
    with couch_server(admins={"admin": "pw"}) as server:
        url = server.url.replace("://", "://admin:pw@")
        proc = run("-r", two_ports_pcap, "-q", "--sink", f"couchdb:{url}/streams/")
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == b""
        auth = {"Authorization": "Basic " + base64.b64encode(b"admin:pw").decode()}
        status, body = server.request("GET", "/streams/_all_docs", headers=auth)
        assert status == 200
        assert len([r for r in body["rows"] if not r["id"].startswith("_design/")]) == 2
        assert server.request("GET", "/streamtap", headers=auth)[0] == 404


def test_check_config_masks_couchdb_credentials(tmp_path: Path):
    proc = run("--check-config", "--sink", "couchdb:http://admin:hunter22@127.0.0.1:5984/db")
    assert proc.returncode == 0
    out = proc.stdout.decode()
    assert "hunter22" not in out and "admin" not in out
    assert "url: http://***@127.0.0.1:5984/db" in out and "database: null" in out
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sinks:\n  - type: couchdb\n    url: http://h:5984\n"
                   "    username: u\n    password: hunter22\n")
    out = run("--check-config", "--config", cfg).stdout.decode()
    assert "hunter22" not in out and "password: '***'" in out
    bad = run("--check-config", "--sink", "couchdb:http://admin:hunter22@127.0.0.1:5984/Db")
    assert bad.returncode == 2
    line = one_line(bad)
    assert "last path segment" in line and "hunter22" not in line


def test_reader_leaving_early_is_not_an_error(tmp_path: Path):
    """`streamtap -r x | head -1`: exit 0, no traceback, no 'Exception ignored' noise."""
    convs = []
    for i in range(1500):
        c = Conversation(("10.0.0.1", 10000 + i), t0=T0 + i * 0.01)
        convs.append(c.handshake().send("client", b"x" * 3000).close())
    p = tmp_path / "many.pcap"
    write_pcap(p, merged(*convs))  # ~6 MB of JSON: more than a pipe buffer holds
    proc = subprocess.Popen([str(STREAMTAP), "-r", str(p)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read()
    rc = proc.wait(timeout=60)
    assert json.loads(first)["source"]["port"] == 10000
    assert rc == 0
    assert b"Traceback" not in err and b"Exception ignored" not in err, err
