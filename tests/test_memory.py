"""The memory model (issue 11 item 1, issue 10 item 3): per-flow state size, one cap for all
workers (cap/N each), checked before memory is taken, half-open flows evicted first, emergency
timeouts while at the cap, evictions counted by reason.

The size test measures a size, not a time: tracemalloc counts the bytes allocated, which does
not depend on the machine's load.
"""

from __future__ import annotations

import gc
import random
import struct
import sys
import tracemalloc
from pathlib import Path

from streamtap import config as cfgmod
from streamtap.engine.flowtable import (
    EMBRYO_BYTES,
    FLOW_BYTES,
    HANDSHAKE,
    Embryo,
    FlowTable,
    Limits,
)
from streamtap.engine.pipeline import Reassembler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pcapbuild import Conversation, frame  # noqa: E402

N_FLOWS = 10_000
_PACK_IP = struct.Struct("!I").pack


def _syn(i: int) -> tuple:
    """A decoded pure SYN as the decoder makes it: fresh address bytes and port ints."""
    return (4, _PACK_IP(0x0A000000 + i), _PACK_IP(0x0A800001), int(str(1024 + i % 60000)),
            int("8080"), (i * 7919) & 0xFFFFFFFF, 0, 0x02, 65535, b"", 0, b"")


def per_flow_bytes(answered: bool) -> float:
    """Bytes held per flow by a table of N_FLOWS flows, each one SYN (and its SYN-ACK when
    `answered`): flow objects, table entries and keys, timers, everything."""
    t = FlowTable(Limits(max_flows=0, memory=0))
    t.advance(1.0)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(N_FLOWS):
            d = _syn(i)
            t.packet(1.0 + i * 1e-5, d)
            if answered:
                t.packet(1.0 + i * 1e-5, (4, d[2], d[1], d[4], d[3], 5000, d[5] + 1, 0x12,
                                          65535, b"", 0, b""))
        d = None
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert t.nflows == N_FLOWS
    return (after - before) / N_FLOWS


def test_a_half_open_flow_costs_at_most_400_bytes() -> None:
    size = per_flow_bytes(answered=False)
    assert size <= 400, size
    assert size <= EMBRYO_BYTES, "EMBRYO_BYTES must stay an upper bound of the measured size"


def test_a_full_flow_costs_at_most_flow_bytes() -> None:
    size = per_flow_bytes(answered=True)
    assert size <= FLOW_BYTES, size


def test_a_lone_syn_is_an_embryo_with_the_record_of_a_full_flow() -> None:
    records = []
    for embryos in (True, False):
        t = FlowTable(Limits())
        t.embryo_ok = embryos
        t.packet(5.0, _syn(1))
        assert (type(t.flows[next(iter(t.flows))]) is Embryo) == embryos
        t.advance(40.0)                          # past the 30 s handshake timeout
        assert t.nflows == 0 and t.mem == 0
        records.append([s.record() for s in t.done])
    assert records[0] == records[1] and len(records[0]) == 1
    assert records[0][0]["tcp"]["state"] == "S0"


def test_a_flow_grows_out_of_its_embryo_unchanged() -> None:
    # retransmitted SYN, then the handshake and data: as if the flow had been full all along
    out = []
    for embryos in (True, False):
        t = FlowTable(Limits())
        t.embryo_ok = embryos
        d = _syn(2)
        t.packet(5.0, d)
        t.packet(6.0, d)
        t.packet(6.1, (4, d[2], d[1], d[4], d[3], 900, d[5] + 1, 0x12, 100, b"", 0, b""))
        t.packet(6.2, (4, d[1], d[2], d[3], d[4], d[5] + 1, 901, 0x18, 100, b"hi", 0, b""))
        t.flush()
        out.append([s.record() for s in t.done])
    assert out[0] == out[1]
    assert out[0][0]["tcp"]["history"] == "ShD" and out[0][0]["source"]["packets"] == 3


def test_each_worker_enforces_its_share_of_the_cap() -> None:
    cfg = cfgmod.load(None, {"capture": {"workers": 4},
                             "reassembly": {"limits": {"memory": 4_000_000}}})
    assert FlowTable(Limits.from_config(cfg)).mem_cap == 1_000_000
    assert Reassembler(cfg).table.mem_cap == 1_000_000
    # the offline pipeline runs one worker: it has the whole cap
    from streamtap.engine.pipeline import Pipeline

    assert Pipeline([], cfg).reassembler.table.mem_cap == 4_000_000


def test_syn_flood_under_a_small_cap() -> None:
    """5,000 unanswered SYNs with 4 real connections inside, 2 workers sharing a cap that
    holds about 200 half-open flows each: the accounted memory never passes the worker's share,
    the half-open flows go first, the real connections come out byte-exact, emergency mode
    shortens the timeouts and is lifted once usage falls, every eviction is counted."""
    cap = 2 * 100_000
    cfg = cfgmod.load(None, {"capture": {"workers": 2},
                             "reassembly": {"limits": {"memory": cap}}})
    r = Reassembler(cfg, summary=False)
    t = r.table
    share = cap // 2
    rng = random.Random(7)
    real = []
    for k in range(4):
        c = Conversation(client=(f"10.9.0.{k + 1}", 50000 + k), server=("10.9.1.1", 443),
                         t0=1000.0)
        c.handshake()
        data = [rng.randbytes(500) for _ in range(20)]
        for chunk in data:
            c.send("client", chunk).send("server", chunk[::-1])
        c.close()
        real.append((c.packets, b"".join(data), b"".join(x[::-1] for x in data)))
    peak = 0
    emergency_timeout = None
    ts = 1000.0
    for i in range(5000):
        ts += 0.001
        src = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
        r.feed(ts, 1, frame(src, "10.9.1.1", 1024 + i % 60000, 443, i * 7919, flags="S"))
        k, step = divmod(i, 40)
        if k < len(real[0][0]) and step < 4:      # the real connections, spread through it
            pts, pframe = real[step][0][k]
            r.feed(ts, 1, pframe)
        peak = max(peak, t.mem)
        assert t.mem <= share, (i, t.mem)
        if t.emergency and emergency_timeout is None:
            emergency_timeout = t.timeouts[HANDSHAKE]
    assert peak > share * 0.8
    assert emergency_timeout == 3.0                         # 30 s / 10 while at the cap
    streams = r.completed()
    evicted = [s for s in streams if s.close_reason == "evicted"]
    assert evicted and all(s.state == "S0" for s in evicted)   # half-open first
    stats = r.stats
    assert stats["evicted"]["memory"] == len(evicted)
    assert stats["memory_limit_hits"] > 0 and stats["emergency_entered"] >= 1
    # the flood stops: the shortened timeouts empty the table and emergency mode is lifted
    r.advance(ts + 6.0)
    assert not t.emergency and t.timeouts[HANDSHAKE] == 30.0
    assert r.stats["evicted"]["emergency"] > 0               # expired early: counted
    assert t.nflows == 0 and t.mem == 0
    streams += r.completed()
    fin = sorted((s for s in streams if s.close_reason == "fin"), key=lambda s: s.client)
    assert [(s.client_data, s.server_data) for s in fin] == [(c, s) for _, c, s in real]
    assert len(streams) == 5000 + 4
