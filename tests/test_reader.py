"""daemon/engine/reader.py: offline sources, damage reporting, stdin, merge, BPF."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pcapy
import pytest
from pcapbuild import Conversation, PcapngWriter, PcapWriter, frame, write_pcap, write_pcapng

from streamtap.engine import reader
from streamtap.engine.reader import CaptureError, FilterError, open_source, read

META = struct.Struct("=IIII")


def conversation(n_data: int = 20, **kw) -> Conversation:
    c = Conversation(**kw).handshake()
    for i in range(n_data):
        c.send("client" if i % 2 == 0 else "server", bytes([65 + i % 26]) * (50 + i))
    return c.close()


def unpack(batches) -> list[tuple[int, int, int, bytes]]:
    """[(linktype, sec, usec, packet)] from read() batches, checking their shape."""
    out = []
    for linktype, data, meta in batches:
        assert len(meta) % 16 == 0 and meta
        expect = 0
        for sec, usec, off, caplen in META.iter_unpack(meta):
            assert off == expect  # offsets relative to this batch's data, contiguous
            expect += caplen
            out.append((linktype, sec, usec, data[off:off + caplen]))
        assert expect == len(data)
    return out


def read_all(paths, **kw) -> tuple[list, CaptureError | None]:
    got: list = []
    try:
        for batch in read(paths, **kw):
            got.extend(unpack([batch]))
    except CaptureError as e:
        return got, e
    return got, None


@pytest.fixture()
def conv() -> Conversation:
    return conversation()


@pytest.fixture()
def good_pcap(tmp_path: Path, conv: Conversation) -> Path:
    conv.write(tmp_path / "good.pcap")
    return tmp_path / "good.pcap"


# ----------------------------------------------------------------- plain reading


@pytest.mark.parametrize("fmt", ["pcap", "pcap_ns", "pcapng"])
@pytest.mark.parametrize("n", [1, 3, 4096])
def test_reads_every_packet(tmp_path: Path, conv: Conversation, fmt: str, n: int) -> None:
    path = tmp_path / "c.cap"
    conv.write(path, nanosecond=fmt == "pcap_ns", pcapng=fmt == "pcapng")
    got, err = read_all([str(path)], n=n)
    assert err is None
    assert [g[3] for g in got] == [f for _, f in conv.packets]
    assert {g[0] for g in got} == {1}
    assert [(g[1], g[2]) for g in got] == [(1700000000, 1000 * i) for i in range(len(got))]


def test_source_counters(good_pcap: Path, conv: Conversation) -> None:
    src = open_source(str(good_pcap))
    assert (src.linktype, src.size, src.bytes_read, src.packets_read) == (
        1, good_pcap.stat().st_size, 24, 0)
    positions = []
    for _data, _meta in src.batches(5):
        positions.append(src.bytes_read)
    sizes = [24 + sum(16 + len(f) for _, f in conv.packets[:k])
             for k in range(5, len(conv.packets), 5)]
    assert positions[:len(sizes)] == sizes
    assert src.bytes_read == good_pcap.stat().st_size
    assert src.packets_read == len(conv.packets)


def test_nanosecond_pcap_reads_at_microseconds(tmp_path: Path) -> None:
    f = frame("10.0.0.1", "10.0.0.2", 1, 2, 0)
    with PcapWriter(tmp_path / "ns.pcap", nanosecond=True) as w:
        w.write((1700001100, 800037), f)
        w.write((1700001100, 999999999), f)
    got, err = read_all([str(tmp_path / "ns.pcap")])
    assert err is None
    assert [(g[1], g[2]) for g in got] == [(1700001100, 800), (1700001100, 999999)]


def test_bpf_filter(good_pcap: Path, conv: Conversation) -> None:
    got, err = read_all([str(good_pcap)], bpf="tcp[tcpflags] & tcp-push != 0")
    assert err is None
    assert len(got) == 20
    got, _ = read_all([str(good_pcap)], bpf="src host 10.0.0.2")
    assert len(got) == len([1 for _, f in conv.packets if f[26:30] == bytes([10, 0, 0, 2])])
    got, _ = read_all([str(good_pcap)], bpf="udp")
    assert got == []


def test_bad_bpf(good_pcap: Path) -> None:
    with pytest.raises(FilterError, match="syntax error"):
        open_source(str(good_pcap), bpf="tcp and and")
    with pytest.raises(FilterError):
        list(read([str(good_pcap), str(good_pcap)], bpf="port 99999999"))
    assert issubclass(FilterError, ValueError)


# ----------------------------------------------------------------- unreadable inputs


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "x.pcap")
    with pytest.raises(CaptureError) as ei:
        open_source(path)
    assert str(ei.value) == f"cannot open {path}: No such file or directory"
    assert ei.value.path == path and ei.value.offset is None


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match="^cannot open .*: Is a directory$"):
        open_source(str(tmp_path))


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "e.pcap").write_bytes(b"")
    with pytest.raises(CaptureError, match=r"e\.pcap: empty file.* at byte 0$") as ei:
        list(read([str(tmp_path / "e.pcap")]))
    assert ei.value.offset == 0


def test_garbage_file(tmp_path: Path) -> None:
    (tmp_path / "g.pcap").write_bytes(bytes.fromhex("1234abcd") + b"x" * 100)
    with pytest.raises(CaptureError) as ei:
        open_source(str(tmp_path / "g.pcap"))
    assert str(ei.value) == (f"{tmp_path / 'g.pcap'}: not a pcap or pcapng file "
                             "(magic 0x1234abcd) at byte 0")


def test_truncated_file_header(tmp_path: Path, good_pcap: Path) -> None:
    (tmp_path / "h.pcap").write_bytes(good_pcap.read_bytes()[:10])
    with pytest.raises(CaptureError, match=r"h\.pcap: truncated file header at byte 0") as ei:
        open_source(str(tmp_path / "h.pcap"))
    assert ei.value.offset == 0


def _open_error(path: str) -> str:
    try:
        open_source(path)
    except CaptureError as e:
        return str(e)
    return "opened"


def test_permission_denied(tmp_path: Path, good_pcap: Path) -> None:
    path = tmp_path / "secret.pcap"
    path.write_bytes(good_pcap.read_bytes())
    os.chmod(path, 0)
    if os.geteuid() != 0:
        message = _open_error(str(path))
    else:  # root reads anything: drop to nobody in a forked child
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                os.setuid(65534)
                os.write(wfd, _open_error(str(path)).encode())
            finally:
                os._exit(0)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            message = r.read().decode()
        os.waitpid(pid, 0)
    assert message == f"cannot open {path}: Permission denied"


# ----------------------------------------------------------------- damage


def _blocks(raw: bytes) -> list[tuple[int, int, int]]:
    out, off = [], 0
    while off < len(raw):
        btype, length = struct.unpack_from("<II", raw, off)
        out.append((off, btype, length))
        off += length
    return out


def _record_offsets(conv: Conversation) -> list[int]:
    offs, pos = [], 24
    for _, f in conv.packets:
        offs.append(pos)
        pos += 16 + len(f)
    return offs


@pytest.mark.parametrize("n", [1, 4, 4096])
@pytest.mark.parametrize("cut", ["data", "header", "middle"])
def test_truncated_pcap(tmp_path: Path, good_pcap: Path, conv: Conversation, n: int,
                        cut: str) -> None:
    raw = good_pcap.read_bytes()
    offs = _record_offsets(conv)
    k = {"data": len(offs) - 1, "header": 1, "middle": 9}[cut]  # index of the damaged record
    end = offs[k] + (8 if cut == "header" else 30)
    path = tmp_path / "t.pcap"
    path.write_bytes(raw[:end])
    got, err = read_all([str(path)], n=n)
    assert err is not None
    assert [g[3] for g in got] == [f for _, f in conv.packets[:k]]  # every good packet
    assert err.offset == offs[k]
    kind = "truncated record header" if cut == "header" else "truncated record"
    assert str(err) == f"{path}: {kind} at byte {offs[k]} (packet {k + 1})"
    assert "\n" not in str(err)


def test_bad_caplen_pcap(tmp_path: Path, good_pcap: Path, conv: Conversation) -> None:
    raw = bytearray(good_pcap.read_bytes())
    offs = _record_offsets(conv)
    struct.pack_into("<I", raw, offs[3] + 8, 0x7FFFFFFF)
    (tmp_path / "c.pcap").write_bytes(raw)
    got, err = read_all([str(tmp_path / "c.pcap")])
    assert len(got) == 3 and err is not None and err.offset == offs[3]
    assert "invalid captured length 2147483647 at byte" in str(err)


def test_truncated_pcap_with_filter(tmp_path: Path, good_pcap: Path, conv: Conversation) -> None:
    raw = good_pcap.read_bytes()
    offs = _record_offsets(conv)
    (tmp_path / "t.pcap").write_bytes(raw[:offs[12] + 20])
    got, err = read_all([str(tmp_path / "t.pcap")], bpf="tcp[tcpflags] & tcp-push != 0", n=3)
    assert err is not None and err.offset == offs[12]
    expected = [f for _, f in conv.packets[:12] if f[47] & 0x08]
    assert [g[3] for g in got] == expected


@pytest.mark.parametrize("damage", ["truncated", "length", "trailer", "interface"])
@pytest.mark.parametrize("n", [1, 4, 4096])
def test_damaged_pcapng(tmp_path: Path, conv: Conversation, damage: str, n: int) -> None:
    conv.write(tmp_path / "good.pcapng", pcapng=True)
    raw = bytearray((tmp_path / "good.pcapng").read_bytes())
    blocks = _blocks(bytes(raw))
    k = 7  # packet index of the damaged block (blocks 0, 1 = SHB, IDB)
    off, _, length = blocks[k + 2]
    if damage == "truncated":
        k = len(conv.packets) - 1
        off, _, length = blocks[k + 2]
        raw = raw[:off + length - 10]
    elif damage == "length":
        struct.pack_into("<I", raw, off + 4, 13)
    elif damage == "trailer":
        struct.pack_into("<I", raw, off + length - 4, 999)
    else:
        struct.pack_into("<I", raw, off + 8, 5)  # EPB for interface 5: there is one IDB
    path = tmp_path / "bad.pcapng"
    path.write_bytes(raw)
    got, err = read_all([str(path)], n=n)
    assert err is not None, damage
    assert [g[3] for g in got] == [f for _, f in conv.packets[:k]]
    assert err.offset == off and f"at byte {off} (packet {k + 1})" in str(err)
    assert str(err).startswith(f"{path}: ")


def test_pcapng_cut_on_block_boundary_is_clean(tmp_path: Path, conv: Conversation) -> None:
    conv.write(tmp_path / "g.pcapng", pcapng=True)
    raw = (tmp_path / "g.pcapng").read_bytes()
    off = _blocks(raw)[7][0]
    (tmp_path / "c.pcapng").write_bytes(raw[:off])
    got, err = read_all([str(tmp_path / "c.pcapng")])
    assert err is None and len(got) == 5


class _StopsEarly:
    """libpcap 1.9 stand-in: EOF (no error) instead of raising at a truncated last record."""

    def __init__(self, real) -> None:
        self._real = real

    def next_batch(self, n: int):
        try:
            return self._real.next_batch(1)
        except pcapy.PcapError:
            return b"", b""

    def __getattr__(self, name: str):
        return getattr(self._real, name)


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_silent_stop_is_detected(tmp_path: Path, conv: Conversation, fmt: str,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    conv.write(tmp_path / "g", pcapng=fmt == "pcapng")
    raw = (tmp_path / "g").read_bytes()
    (tmp_path / "t").write_bytes(raw[:-10])
    real_open = pcapy.open_offline
    monkeypatch.setattr(reader.pcapy, "open_offline", lambda p: _StopsEarly(real_open(p)))
    got, err = read_all([str(tmp_path / "t")])
    assert len(got) == len(conv.packets) - 1
    assert err is not None and f"(packet {len(conv.packets)})" in str(err)


# ----------------------------------------------------------------- stdin

STDIN_READER = """
import struct, sys
from streamtap.engine.reader import read, CaptureError
n = 0
try:
    for lt, data, meta in read(["-"], bpf=sys.argv[1] or None, n=4):
        n += len(meta) // 16
    print(lt, n)
except CaptureError as e:
    print(n, e)
"""


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_stdin_pipe(tmp_path: Path, conv: Conversation, fmt: str) -> None:
    path = tmp_path / "c"
    conv.write(path, pcapng=fmt == "pcapng")
    # through a real pipe (cat | python), not a regular file on fd 0
    cat = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
    out = subprocess.run([sys.executable, "-c", STDIN_READER, ""], stdin=cat.stdout,
                         capture_output=True, text=True, timeout=60)
    cat.wait()
    assert out.stdout.split() == ["1", str(len(conv.packets))], out.stderr
    out = subprocess.run([sys.executable, "-c", STDIN_READER, "tcp[tcpflags] & tcp-push != 0"],
                         input=path.read_bytes(), capture_output=True, timeout=60)
    assert out.stdout.split() == [b"1", b"20"], out.stderr


def test_stdin_damage(tmp_path: Path, good_pcap: Path) -> None:
    out = subprocess.run([sys.executable, "-c", STDIN_READER, ""],
                         input=good_pcap.read_bytes()[:-10], capture_output=True, timeout=60)
    text = out.stdout.decode()
    assert "<stdin>: truncated dump file" in text and "cannot be re-read" in text, out.stderr
    assert int(text.split()[0]) >= len(conversation().packets) - 4


# ----------------------------------------------------------------- merge


def test_merge_interleaved(tmp_path: Path) -> None:
    a = conversation(6, t0=1700000000.0, client=("10.0.0.1", 1111))
    b = conversation(6, t0=1700000000.0005, client=("10.0.0.3", 3333), isn_c=7)
    a.write(tmp_path / "a.pcap")
    b.write(tmp_path / "b.pcapng", pcapng=True)
    got, err = read_all([str(tmp_path / "a.pcap"), str(tmp_path / "b.pcapng")], n=5)
    assert err is None
    expected = sorted(a.packets + b.packets, key=lambda p: p[0])
    assert [g[3] for g in got] == [f for _, f in expected]
    keys = [(g[1], g[2]) for g in got]
    assert keys == sorted(keys)


def test_merge_ties_keep_file_order(tmp_path: Path) -> None:
    fa = frame("10.0.0.1", "10.0.0.2", 1, 2, 0)
    fb = frame("10.0.0.3", "10.0.0.4", 1, 2, 0)
    write_pcap(tmp_path / "a.pcap", [(5.0, fa), (6.0, fa)])
    write_pcap(tmp_path / "b.pcap", [(5.0, fb), (6.0, fb)])
    got, _ = read_all([str(tmp_path / "b.pcap"), str(tmp_path / "a.pcap")])
    assert [g[3] for g in got] == [fb, fa, fb, fa]


def test_merge_link_types(tmp_path: Path) -> None:
    eth = [(1.0 + i, frame("10.0.0.1", "10.0.0.2", 1, 2, i)) for i in range(0, 6, 2)]
    raw = [(2.0 + i, frame("10.0.0.1", "10.0.0.2", 1, 2, i, linktype=101)) for i in range(0, 4, 2)]
    write_pcap(tmp_path / "e.pcap", eth)
    write_pcapng(tmp_path / "r.pcapng", raw, linktype=101)
    batches = list(read([str(tmp_path / "e.pcap"), str(tmp_path / "r.pcapng")], n=100))
    # linktypes are pcapy's datalink() values: LINKTYPE_RAW (101) in the file is DLT_RAW (12)
    raw_dlt = pcapy.DLT_RAW
    assert [(lt, len(m) // 16) for lt, _, m in batches] == [(1, 1), (raw_dlt, 1), (1, 1),
                                                            (raw_dlt, 1), (1, 1)]
    got = unpack(batches)
    assert [g[1] for g in got] == [1, 2, 3, 4, 5]
    assert [g[3] for g in got] == [eth[0][1], raw[0][1], eth[1][1], raw[1][1], eth[2][1]]


def test_merge_batch_size(tmp_path: Path) -> None:
    a, b = conversation(30), conversation(30, t0=1700000000.0003, isn_c=9)
    a.write(tmp_path / "a.pcap")
    b.write(tmp_path / "b.pcap")
    batches = list(read([str(tmp_path / "a.pcap"), str(tmp_path / "b.pcap")], n=7))
    sizes = [len(m) // 16 for _, _, m in batches]
    assert all(s == 7 for s in sizes[:-1]) and sum(sizes) == len(a.packets) + len(b.packets)


def test_merge_with_damaged_file(tmp_path: Path) -> None:
    a = conversation(10)
    b = conversation(10, t0=1700000000.0005, isn_c=9)
    a.write(tmp_path / "a.pcap")
    b.write(tmp_path / "b.pcap")
    raw = (tmp_path / "a.pcap").read_bytes()
    (tmp_path / "a.pcap").write_bytes(raw[:len(raw) // 2 + 3])
    got, err = read_all([str(tmp_path / "a.pcap"), str(tmp_path / "b.pcap")], n=4)
    assert err is not None and str(err).startswith(f"{tmp_path / 'a.pcap'}: truncated record")
    frames = [g[3] for g in got]
    assert all(f in frames for _, f in b.packets)  # the healthy file is read to its end
    good_a = [f for _, f in a.packets if f in frames]
    assert good_a == [f for _, f in a.packets[:len(good_a)]] and good_a


def test_merge_open_errors_come_first(tmp_path: Path, good_pcap: Path) -> None:
    it = read([str(good_pcap), str(tmp_path / "missing.pcap")])
    with pytest.raises(CaptureError, match="cannot open"):
        next(it)


def test_pcapng_multiple_sections_of_interfaces(tmp_path: Path) -> None:
    f = frame("10.0.0.1", "10.0.0.2", 1, 2, 0)
    with PcapngWriter(tmp_path / "m.pcapng") as w:
        second = w.add_interface(1, nanosecond=True)
        w.write(1.5, f)
        w.write((2, 123456789), f, interface=second)
    got, err = read_all([str(tmp_path / "m.pcapng")])
    assert err is None and [(g[1], g[2]) for g in got] == [(1, 500000), (2, 123456)]
