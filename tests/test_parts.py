"""Long connections emitted in parts (DESIGN "Pinned details": Parts; issue 11 item 3).

Built captures with a small `reassembly.part_bytes`: the parts of a connection concatenate to
its exact bytes, carry the stream's id, numbers 0, 1, … and the offsets where their bytes
start, `close_reason: part` on all but the last; the sinks append parts to the stream's files.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import streamtap
from streamtap import config as cfgmod
from streamtap.engine.flowtable import FlowTable, Limits
from streamtap.engine.stream import Stream
from streamtap.sinks.files import FilesSink
from streamtap.sinks.pcap import PcapSink

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pcapbuild import Conversation  # noqa: E402
from sinkrun import write_batches  # noqa: E402
from test_reassembly import Conn  # noqa: E402

T0 = 1_700_000_000.0
PART = 8192


def cfg(**reassembly) -> cfgmod.Config:
    return cfgmod.load(None, {"reassembly": {"part_bytes": PART, **reassembly}})


def bulk(tmp_path: Path, n: int = 60, size: int = 1000, seed: int = 1) -> tuple[Path, bytes,
                                                                               bytes]:
    """One connection: `n` client chunks of `size` bytes, each answered by a shorter one."""
    rng = random.Random(seed)
    c = Conversation(t0=T0).handshake()
    cdata, sdata = [], []
    for _ in range(n):
        a, b = rng.randbytes(size), rng.randbytes(size // 3)
        c.send("client", a).send("server", b)
        cdata.append(a)
        sdata.append(b)
    c.close()
    cap = tmp_path / "bulk.pcap"
    c.write(cap)
    return cap, b"".join(cdata), b"".join(sdata)


def test_parts_concatenate_to_the_exact_bytes(tmp_path: Path) -> None:
    cap, cdata, sdata = bulk(tmp_path)
    parts = list(streamtap.reassemble(cap, config=cfg()))
    # a part is cut as soon as the client side holds PART: after 9 chunks of 1,000 bytes
    assert [len(p.client_data) for p in parts] == [9000] * 6 + [6000]
    assert [p.part for p in parts] == list(range(len(parts)))
    assert len({p.id for p in parts}) == 1
    assert [p.close_reason for p in parts] == ["part"] * (len(parts) - 1) + ["fin"]
    assert b"".join(p.client_data for p in parts) == cdata
    assert b"".join(p.server_data for p in parts) == sdata
    cpos = spos = 0
    for p in parts:
        assert (p.client_offset, p.server_offset) == (cpos, spos)
        cpos += len(p.client_data)
        spos += len(p.server_data)
    # packets are counted per part; the whole connection's add up
    assert sum(p.client_packets + p.server_packets for p in parts) == 3 + 2 * 60 + 3
    whole = list(streamtap.reassemble(cap, config=cfg(part_bytes=0)))
    assert len(whole) == 1 and whole[0].part == 0 and whole[0].client_offset == 0
    assert whole[0].id == parts[0].id and whole[0].client_data == cdata


def test_part_interval_emits_what_is_held(tmp_path: Path) -> None:
    c = Conversation(t0=T0).handshake().send("client", b"one").send("server", b"1")
    c.wait(70).send("client", b"two").wait(70).send("client", b"three").close()
    cap = tmp_path / "slow.pcap"
    c.write(cap)
    parts = list(streamtap.reassemble(cap, config=cfg(part_interval=60)))
    assert [(p.part, p.client_data, p.server_data, p.close_reason) for p in parts] == [
        (0, b"one", b"1", "part"), (1, b"two", b"", "part"), (2, b"three", b"", "fin")]
    assert [p.client_offset for p in parts] == [0, 3, 6]


def test_open_holes_become_gaps_of_the_part_and_late_bytes_are_counted() -> None:
    t = FlowTable(Limits(part_bytes=8))
    c = Conn(5, table=t).handshake()
    c.seg("c", 0, b"aaaa", ack_rel=0)
    c.seg("c", 8, b"cccc", ack_rel=0)               # a hole at 4..8
    c.seg("s", 0, flags="A", ack_rel=12)             # ACKed past: skipped, still fillable
    assert t.done == []                              # 8 bytes held: not yet a part
    c.seg("c", 4, b"bb", ack_rel=0)                  # late fill of half the hole: 10 >= 8
    assert [(s.part, s.client_data, s.gaps, s.close_reason) for s in t.done] == [
        (0, b"aaaabbcccc", [(6, 2, "client")], "part")]
    c.seg("c", 6, b"BB", ack_rel=0)                  # too late: its part is out
    assert t.stats["part_late_bytes"] == 2
    c.seg("c", 12, b"dd", ack_rel=0)
    last = c.streams()[-1]
    assert (last.part, last.client_data, last.client_offset, last.gaps) == (1, b"dd", 10, [])
    assert t.mem == 0


def test_emit_empty_false_still_emits_the_last_part() -> None:
    t = FlowTable(Limits(part_bytes=4, emit_empty=False))
    c = Conn(5, table=t).handshake().seg("c", 0, b"aaaa", ack_rel=0)
    out = c.streams()
    assert [(s.part, s.close_reason) for s in out] == [(0, "part"), (1, "shutdown")]


def test_files_sink_appends_parts_to_the_stream_files(tmp_path: Path) -> None:
    cap, cdata, sdata = bulk(tmp_path)
    parts = list(streamtap.reassemble(cap, config=cfg()))
    assert len(parts) > 2
    # one batch per part, as they come
    write_batches(FilesSink("files", {"dir": str(tmp_path / "out")}), *([p] for p in parts))
    files = sorted(f for f in (tmp_path / "out").iterdir() if f.name != "streams.jsonl")
    assert [f.read_bytes() for f in files] == [cdata, sdata]
    lines = (tmp_path / "out" / "streams.jsonl").read_text().splitlines()
    assert len(lines) == len(parts)


def test_pcap_sink_appends_parts_to_the_stream_file(tmp_path: Path) -> None:
    cap, cdata, sdata = bulk(tmp_path)
    parts = list(streamtap.reassemble(cap, config=cfg(keep_packets=True)))
    assert len(parts) > 2
    write_batches(PcapSink("pcap", {"dir": str(tmp_path / "out")}), *([p] for p in parts))
    files = list((tmp_path / "out").rglob("*.pcap"))
    assert len(files) == 1
    # the file holds the whole connection: read back whole, it is the same stream
    again = list(streamtap.reassemble(files[0], config=cfg(part_bytes=0)))
    assert len(again) == 1
    s: Stream = again[0]
    assert (s.client_data, s.server_data, s.id) == (cdata, sdata, parts[0].id)
    assert s.client_packets + s.server_packets == 3 + 2 * 60 + 3


CHILD = """\
import hashlib, sys
from streamtap.engine.pipeline import Pipeline
from streamtap import config
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) * 1024
cfg = config.load(None, {"reassembly": {"part_bytes": int(sys.argv[2])}})
p = Pipeline(sys.argv[1], cfg)
p.open()
base = hwm()
h, n, parts = hashlib.sha256(), 0, 0
for batch in p.batches():
    for s in batch:
        h.update(s.server_data)
        n += len(s.server_data)
        parts += 1
print(hwm() - base, n, parts, h.hexdigest())
"""


def test_a_long_connection_in_parts_holds_about_a_part(tmp_path: Path) -> None:
    """20 MB from the server in one connection (gen_capture's bulk shape, smaller): read
    whole, the reader's peak memory grows by the stream; read in 1 MiB parts, by about a part
    more than the reading itself takes."""
    import hashlib
    import subprocess

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import gen_capture as g

    total = 20_000_000
    rng = random.Random(3)
    block = rng.randbytes(g.BLOCK_SIZE)
    cap = tmp_path / "bulk20.pcap"
    w = g._FastWriter(str(cap))
    c = g._FastConn((g._ip4((10, 3), 1), 51_000), (g._ip4((198, 51), 7), 443), 1, 2, 3)
    t = 0
    for step in ((0, g.SYN), (1, g.SYN | g.ACK), (0, g.ACK)):
        t += 200
        w.add(t, c.frame(t, *step))
    sent, truth = 0, hashlib.sha256()
    while sent < total:
        n = min(g.PAYLOAD4, total - sent)
        off = rng.randrange(len(block) - n)
        t += 10
        w.add(t, c.frame(t, 1, g.ACK, block[off:off + n]))
        truth.update(block[off:off + n])
        sent += n
        if sent // g.PAYLOAD4 % 2:
            w.add(t + 5, c.frame(t + 5, 0, g.ACK))
    for side in (1, 0):
        t += 200
        w.add(t, c.frame(t, side, g.FIN | g.ACK))
    w.close()
    got = {}
    for part_bytes in (1 << 20, 0):
        out = subprocess.run([sys.executable, "-c", CHILD, str(cap), str(part_bytes)],
                             capture_output=True, text=True, check=True, timeout=60).stdout
        growth, n, parts, digest = out.split()
        assert (int(n), digest) == (total, truth.hexdigest())
        got[part_bytes] = (int(growth), int(parts))
    (in_parts, nparts), (whole, _) = got[1 << 20], got[0]
    assert nparts == total // (1 << 20) + 1
    # what the reader itself takes (capture batches, buffers) is the same both ways; the
    # stream is what differs: in parts it never holds more than a part or so of it
    assert whole > total, got
    assert whole - in_parts > total - (4 << 20), got
