"""The files sink: tcpflow's layout, checked against tcpflow itself."""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conformance import load_expected
from pcapbuild import Conversation, PcapWriter
from sinkrun import write_batches

import streamtap
from streamtap import config as cfgmod
from streamtap.cli import main
from streamtap.engine.stream import Stream, to_record
from streamtap.sinks import files as filesmod
from streamtap.sinks import registry
from streamtap.sinks.base import OK, RETRY
from streamtap.sinks.files import FilesSink, address, direction_chunks, flow_name

SINKS = registry.sink_types()
T0 = 1700000000.0  # 2023-11-14T22:13:20Z
C_NAME = "010.000.000.001.40000-010.000.000.002.00080"
S_NAME = "010.000.000.002.00080-010.000.000.001.40000"


def stream(client=("10.0.0.1", 40000), server=("10.0.0.2", 80), cdata=b"GET /", sdata=b"200",
           gaps=(), start=T0, close_reason="fin") -> Stream:
    return Stream(client, server, cdata, sdata, close_reason, list(gaps), start, start + 1,
                  6 if ":" in client[0] else 4)


def run(d: Path, streams: list[Stream], **options) -> FilesSink:
    sink = FilesSink("files", {"dir": str(d), **options})
    write_batches(sink, streams)
    return sink


def listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def index(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "streams.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- names


def test_names_are_tcpflows():
    assert address("10.0.0.1") == "010.000.000.001"
    assert address("192.168.100.254") == "192.168.100.254"
    assert address("2001:0db8:0000:0000:0000:0000:0000:0001") == "2001:db8::1"
    assert address("::ffff:10.0.0.1") == "::ffff:10.0.0.1"  # inet_ntop's spelling, as tcpflow
    assert flow_name(("10.0.0.1", 40000), ("10.0.0.2", 80)) == C_NAME
    assert flow_name(("10.0.0.1", 7), ("10.0.0.2", 80), 2) == \
        "010.000.000.001.00007-010.000.000.002.00080c2"
    assert flow_name(("2001:db8::1", 443), ("fe80::2", 5)) == "2001:db8::1.00443-fe80::2.00005"


def test_one_file_per_direction_v4_and_v6(tmp_path):
    v6 = stream(("2001:db8::1", 50000), ("2001:db8::2", 80), b"hello", b"world", start=T0 + 1)
    run(tmp_path, [stream(), v6])
    assert listing(tmp_path) == sorted([
        C_NAME, S_NAME, "streams.jsonl",
        "2001:db8::1.50000-2001:db8::2.00080", "2001:db8::2.00080-2001:db8::1.50000"])
    assert (tmp_path / C_NAME).read_bytes() == b"GET /"
    assert (tmp_path / S_NAME).read_bytes() == b"200"
    assert (tmp_path / "2001:db8::2.00080-2001:db8::1.50000").read_bytes() == b"world"
    assert oct((tmp_path / C_NAME).stat().st_mode & 0o777) in ("0o640", "0o600", "0o440",
                                                                 "0o400")


def test_port_reuse_gets_c1_c2(tmp_path):
    run(tmp_path, [stream(cdata=b"one"), stream(cdata=b"two", start=T0 + 10)])
    run(tmp_path, [stream(cdata=b"three", sdata=b"", start=T0 + 20)])  # a later batch too
    assert (tmp_path / C_NAME).read_bytes() == b"one"
    assert (tmp_path / f"{C_NAME}c1").read_bytes() == b"two"
    assert (tmp_path / f"{C_NAME}c2").read_bytes() == b"three"
    assert not (tmp_path / f"{S_NAME}c2").exists()  # each direction numbered on its own


def test_empty_directions_get_no_file(tmp_path):
    run(tmp_path, [stream(cdata=b"only the client", sdata=b""),
                   stream(("10.0.0.3", 1), ("10.0.0.4", 2), b"", b"")])  # a refused connection
    assert listing(tmp_path) == [C_NAME, "streams.jsonl"]
    recs = index(tmp_path)
    assert recs[0]["streamtap"]["files"] == {"source": C_NAME, "destination": None}
    assert recs[1]["streamtap"]["files"] == {"source": None, "destination": None}


# --------------------------------------------------------------------------- gaps


def test_gaps_skipped_by_default_and_zeroed_on_request(tmp_path):
    # client: "AAAA" [3 missing] "BB" [2 missing] "CC" [4 missing at the end]; server: "x" [1]
    gaps = [(4, 3, "client"), (6, 2, "client"), (8, 4, "client"), (0, 1, "server")]
    s = stream(cdata=b"AAAABBCC", sdata=b"x", gaps=gaps)
    run(tmp_path / "skip", [s])
    assert (tmp_path / "skip" / C_NAME).read_bytes() == b"AAAABBCC"
    assert (tmp_path / "skip" / S_NAME).read_bytes() == b"x"
    run(tmp_path / "zero", [s], gaps="zero")
    zeroed = (tmp_path / "zero" / C_NAME).read_bytes()
    assert zeroed == b"AAAA\0\0\0BB\0\0CC\0\0\0\0"
    # file offset = sequence offset: "CC" sits where 4 + 3 + 2 + 2 bytes precede it
    assert zeroed.index(b"CC") == 11 and len(zeroed) == s.missed_bytes - 1 + len(b"AAAABBCC")
    assert (tmp_path / "zero" / S_NAME).read_bytes() == b"\0x"


def test_direction_chunks():
    assert direction_chunks(b"abcdef", []) == [b"abcdef"]
    assert direction_chunks(b"abcdef", [(6, 2), (0, 1), (3, 4)]) == [1, b"abc", 4, b"def", 2]


def test_zero_fill_of_a_captured_gap_matches_sequence_offsets(tmp_path):
    c = Conversation(t0=T0).handshake()
    c.send("client", b"A" * 100)
    c.send("client", b"B" * 50, seq_offset=30)  # 30 bytes never captured
    c.ack("server").send("server", b"ok").close()
    cap = tmp_path / "gap.pcap"
    c.write(cap)
    streams = list(streamtap.reassemble(cap))
    assert [g[:2] for g in streams[0].gaps] == [(100, 30)]
    run(tmp_path / "zero", streams, gaps="zero")
    assert (tmp_path / "zero" / C_NAME).read_bytes() == b"A" * 100 + b"\0" * 30 + b"B" * 50


# --------------------------------------------------------------------------- index


def test_index_holds_each_record_without_payload(tmp_path):
    streams = [stream(), stream(("10.0.0.3", 1), ("10.0.0.4", 2), b"q", b"")]
    run(tmp_path, streams)
    recs = index(tmp_path)
    assert len(recs) == 2
    for rec, s in zip(recs, streams, strict=True):
        files = rec["streamtap"].pop("files")
        assert rec == to_record(s, "none")  # the JSONL sink's record, payload_encoding none
        assert "payload" not in rec["source"] and "payload" not in rec["destination"]
        for side, name in files.items():
            if name is not None:
                data = s.client_data if side == "source" else s.server_data
                assert (tmp_path / name).read_bytes() == data


# --------------------------------------------------------------------------- subdirs


@pytest.mark.parametrize(("subdirs", "bins"), [
    ("day", ["20231114/", "20231114/", "20231114/"]),
    ("hour", ["20231114/22/", "20231114/22/", "20231114/23/"]),
])
def test_subdirs(tmp_path, subdirs, bins):
    # two connections at 22:13 UTC, one at 23:13; cN counts within a subdirectory
    run(tmp_path, [stream(), stream(start=T0 + 5), stream(start=T0 + 3600)], subdirs=subdirs)
    names = [r["streamtap"]["files"]["source"] for r in index(tmp_path)]
    suffixes = ["", "c1", "c2"] if subdirs == "day" else ["", "c1", ""]
    assert names == [f"{b}{C_NAME}{c}" for b, c in zip(bins, suffixes, strict=True)]
    assert set(names) < set(listing(tmp_path))
    assert "streams.jsonl" in listing(tmp_path)  # the index stays at the top


# --------------------------------------------------------------------------- restarts


def test_existing_files_are_never_overwritten(tmp_path):
    (tmp_path / C_NAME).write_bytes(b"an earlier run")
    (tmp_path / f"{C_NAME}c1").write_bytes(b"and its port reuse")
    run(tmp_path, [stream()])
    # a restarted daemon (a new sink) writing the same stream again
    run(tmp_path, [stream()])
    assert (tmp_path / C_NAME).read_bytes() == b"an earlier run"
    assert (tmp_path / f"{C_NAME}c1").read_bytes() == b"and its port reuse"
    assert (tmp_path / f"{C_NAME}c2").read_bytes() == b"GET /"
    assert (tmp_path / f"{C_NAME}c3").read_bytes() == b"GET /"
    assert (tmp_path / S_NAME).read_bytes() == (tmp_path / f"{S_NAME}c1").read_bytes() == b"200"
    assert [r["streamtap"]["files"]["source"] for r in index(tmp_path)] == \
        [f"{C_NAME}c2", f"{C_NAME}c3"]


def test_a_later_part_appends_to_the_same_files(tmp_path):
    sink = FilesSink("files", {"dir": str(tmp_path), "gaps": "zero"})
    sink.open()
    first = stream(cdata=b"part0-", sdata=b"", close_reason="part")
    second = stream(cdata=b"part1", sdata=b"answer", gaps=[(0, 2, "client")])
    assert first.id == second.id
    assert sink.write([first]).status == OK
    assert sink.health()["ongoing_streams"] == 1
    assert sink.write([stream(start=T0 + 1)]).status == OK  # another connection on the tuple
    assert sink.write([second]).status == OK
    sink.close()
    assert (tmp_path / C_NAME).read_bytes() == b"part0-\0\0part1"
    assert (tmp_path / S_NAME).read_bytes() == b"200"  # the other connection's, which came first
    assert (tmp_path / f"{S_NAME}c1").read_bytes() == b"answer"
    assert sink.health()["ongoing_streams"] == 0


# --------------------------------------------------------------------------- errors


def test_write_error_rolls_the_batch_back_and_a_retry_takes_the_same_names(tmp_path,
                                                                          monkeypatch):
    sink = FilesSink("files", {"dir": str(tmp_path)})
    sink.open()
    assert sink.write([stream(("10.0.0.9", 9), ("10.0.0.8", 8))]).status == OK
    before = {p: (tmp_path / p).read_bytes() for p in listing(tmp_path)}
    real_write, calls = os.write, []

    def failing(fd, data):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(filesmod.os, "write", failing)
    batch = [stream(), stream(start=T0 + 5)]
    res = sink.write(batch)
    assert res.status == RETRY and "No space left on device" in res.error
    assert {p: (tmp_path / p).read_bytes() for p in listing(tmp_path)} == before
    monkeypatch.setattr(filesmod.os, "write", real_write)
    assert sink.write(batch).status == OK
    sink.close()
    assert (tmp_path / C_NAME).read_bytes() == (tmp_path / f"{C_NAME}c1").read_bytes()
    assert not (tmp_path / f"{C_NAME}c2").exists()
    assert len(index(tmp_path)) == 3


def test_a_failed_part_is_cut_off_and_its_retry_appends_once(tmp_path, monkeypatch):
    sink = FilesSink("files", {"dir": str(tmp_path)})
    sink.open()
    assert sink.write([stream(cdata=b"first ", sdata=b"", close_reason="part")]).status == OK
    real_write = os.write

    def failing(fd, data):
        real_write(fd, data[:2])  # a torn write, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(filesmod.os, "write", failing)
    last = stream(cdata=b"second", sdata=b"")
    assert sink.write([last]).status == RETRY
    assert (tmp_path / C_NAME).read_bytes() == b"first "
    monkeypatch.setattr(filesmod.os, "write", real_write)
    assert sink.write([last]).status == OK
    sink.close()
    assert (tmp_path / C_NAME).read_bytes() == b"first second"
    assert [r["tcp"]["close_reason"] for r in index(tmp_path)] == ["part", "fin"]


def test_a_regular_file_as_dir_fails_open_with_the_os_answer(tmp_path):
    f = tmp_path / "not-a-dir"
    f.write_text("x")
    with pytest.raises(NotADirectoryError) as info:
        FilesSink("files", {"dir": str(f)}).open()
    assert info.value.filename == str(f)


def test_cli_regular_file_as_dir_exits_1_with_one_line(tmp_path, capsys):
    cap = tmp_path / "x.pcap"
    Conversation(t0=T0).handshake().send("client", b"hi").close().write(cap)
    f = tmp_path / "not-a-dir"
    f.write_text("x")
    assert main(["-q", "-r", str(cap), "--sink", f"files:{f}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(f) in err and "Not a directory" in err
    assert "Traceback" not in err


def test_bad_options_are_refused():
    with pytest.raises(cfgmod.ConfigError, match="gaps: expected one of skip, zero, got 'fill'"):
        FilesSink("files", {"dir": "x", "gaps": "fill"})
    with pytest.raises(cfgmod.ConfigError, match="unknown key 'bins' for sink type files"):
        FilesSink("files", {"dir": "x", "bins": "k"})
    with pytest.raises(cfgmod.ConfigError, match="subdirs"):
        cfgmod.loads("sinks: [{type: files, dir: /tmp/x, subdirs: weekly}]", sink_types=SINKS)
    with pytest.raises(cfgmod.ConfigError, match="missing required key 'dir'"):
        cfgmod.loads("sinks: [{type: files}]", sink_types=SINKS)


def test_yaml_and_cli_forms(tmp_path):
    cfg = cfgmod.loads(f"sinks: [{{type: files, dir: {tmp_path}, gaps: zero}}]", sink_types=SINKS)
    (sc,) = cfg.sinks
    assert sc.options == {"dir": str(tmp_path), "gaps": "zero", "subdirs": "none"}
    sink = registry.create(sc)
    assert isinstance(sink, FilesSink) and sink.zero_fill
    assert not cfg.reassembly.keep_packets  # the files sink needs no raw packets
    cap = tmp_path / "x.pcap"
    Conversation(t0=T0).handshake().send("client", b"hi").send("server", b"yo").close().write(cap)
    out = tmp_path / "out"
    assert main(["-q", "-r", str(cap), "--sink", f"files:{out}"]) == 0
    assert listing(out) == [C_NAME, S_NAME, "streams.jsonl"]
    assert (out / C_NAME).read_bytes() == b"hi"


# --------------------------------------------------------------------------- tcpflow itself

_VLAN = re.compile(r"--\d+(?=(c\d+)?$)")  # tcpflow's --VLAN name part (streams carry no VLAN)


def tcpflow_files(tcpflow: str, cap: Path, out: Path) -> dict[str, bytes]:
    subprocess.run([tcpflow, "-r", str(cap), "-o", str(out)], check=True, capture_output=True,
                   timeout=120)
    return {p.name: p.read_bytes() for p in out.iterdir()
            if p.is_file() and p.name not in ("report.xml",)}


def test_same_names_and_bytes_as_tcpflow_on_built_captures(tmp_path, tcpflow):
    cap = tmp_path / "built.pcap"
    convs = [
        Conversation(("10.0.0.1", 40000), ("10.0.0.2", 80), t0=T0).handshake()
        .send("client", b"GET / HTTP/1.0\r\n\r\n").send("server", b"HTTP/1.0 200 OK\r\n\r\n")
        .close(),
        # the same 4-tuple twice more, later: c1 and c2
        Conversation(("10.0.0.1", 40000), ("10.0.0.2", 80), isn_c=7, isn_s=9, t0=T0 + 30)
        .handshake().send("client", b"second").send("server", b"reply 2").close(),
        Conversation(("10.0.0.1", 40000), ("10.0.0.2", 80), isn_c=70, isn_s=90, t0=T0 + 60)
        .handshake().send("client", b"third").close(),
        Conversation(("2001:db8::1", 50000), ("2001:db8::2", 443), t0=T0 + 1).handshake()
        .send("client", b"\x16\x03\x01 hello").send("server", b"\x16\x03\x03 hi").close(),
        Conversation(("192.168.1.10", 1025), ("172.16.0.1", 65535), t0=T0 + 2, isn_c=2**32 - 3)
        .handshake().send("client", b"wraps around" * 10).close(),
    ]
    with PcapWriter(cap) as w:
        for ts, frame in sorted((p for c in convs for p in c.packets), key=lambda p: p[0]):
            w.write(ts, frame)
    theirs = tcpflow_files(tcpflow, cap, tmp_path / "tcpflow")
    assert main(["-q", "-r", str(cap), "--sink", f"files:{tmp_path / 'ours'}"]) == 0
    ours = {p.name: p.read_bytes() for p in (tmp_path / "ours").iterdir()}
    del ours["streams.jsonl"]
    assert f"{C_NAME}c2" in theirs and "2001:db8::1.50000-2001:db8::2.00443" in theirs
    assert ours == theirs


def _oracle_module(corpus: Path):
    """The corpus's oracle.py, for its `rewrite_for_tcpflow` (what tcpflow was given)."""
    spec = importlib.util.spec_from_file_location("corpus_oracle", corpus / "oracle.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    shutil.rmtree(mod._CONF, ignore_errors=True)  # made at import, unused here
    return mod


@pytest.mark.parametrize("gaps", ["skip", "zero"])
def test_same_names_and_bytes_as_tcpflow_on_the_corpus(tmp_path, corpus_dir, tcpflow, gaps):
    """Every direction where the corpus oracle found tcpflow and tshark agreeing: tcpflow's
    file and ours have the same name and the same bytes.

    skip: the directions they agree on exactly. zero: those they agree on once tshark's gap
    markers become zeros (tcpflow zero-fills holes, as `gaps: zero` does). tcpflow gets the
    capture oracle.py gave it (Ethernet trailer padding cut: a tcpflow 1.6.1 bug), streamtap the
    original. Left out: directions conformance_expected.tsv lists (streamtap's documented
    policies differ from tshark there). tcpflow's `--VLAN` name part is dropped before comparing.
    """
    oracle = _oracle_module(corpus_dir)
    expected = load_expected()
    rows: dict[str, list[dict]] = collections.defaultdict(list)
    with open(corpus_dir / "oracle_compare.jsonl", encoding="utf-8") as fh:
        for line in fh:
            c = json.loads(line)
            agree = c["exact"] if gaps == "skip" else (c["equal_after_zero_fill"]
                                                       and not c["exact"])
            if agree and c["tcpflow_files"]:
                rows[c["file"]].append(c)
    compared = identical = vlan = left_out = 0
    differing = []
    for n, (file, cs) in enumerate(sorted(rows.items())):
        work = tmp_path / str(n)
        work.mkdir()
        given, _note = oracle.rewrite_for_tcpflow(str(corpus_dir / file), str(work))
        theirs = tcpflow_files(tcpflow, Path(given), work / "tcpflow")
        run(work / "ours", list(streamtap.reassemble(corpus_dir / file)), gaps=gaps)
        for c in cs:
            if (file, c["stream"], c["side"]) in expected:
                left_out += 1
                continue
            for name in c["tcpflow_files"]:
                compared += 1
                ours = work / "ours" / _VLAN.sub("", name)
                if ours.is_file() and ours.read_bytes() == theirs[name]:
                    identical += 1
                    vlan += ours.name != name
                else:
                    differing.append((file, name))
        shutil.rmtree(work)
    print(f"files sink vs tcpflow, gaps {gaps}: {compared} files compared, {identical} "
          f"identical ({vlan} of them under the name without tcpflow's --VLAN), {left_out} "
          f"directions left out (conformance_expected.tsv)")
    assert compared > (1500 if gaps == "skip" else 15)
    assert differing == []
