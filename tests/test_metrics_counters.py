"""Every counter a worker keeps reaches the operator: summed in GET /status, exported in
GET /metrics, listed in the README's metrics table.

The counters are provoked through the real engine (a `Worker` whose packets come from a list
instead of a pcapy handle, run in-process by the real `Supervisor`) and read back through the
control API's real HTTP handler on a unix socket.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pcapbuild import ETHERTYPE_IPV4, Conversation, eth, ipv4, link_header, tcp
from prometheus_client.parser import text_string_to_metric_families

from streamtap import config as cfgmod
from streamtap.engine.api import Reassembler
from streamtap.engine.flowtable import FLOW_BYTES
from streamtap.process import metrics
from streamtap.process.control import ControlServer
from streamtap.process.counters import GAUGES, META_KEYS
from streamtap.process.ctl import UnixHTTPConnection
from streamtap.process.messages import Stats
from streamtap.process.notify import Notifier
from streamtap.process.supervisor import Supervisor
from streamtap.process.worker import Worker

T0 = 1700000000.0
ROOT = Path(__file__).resolve().parent.parent
LINKTYPE_RAW = 101

Frame = tuple[float, int, bytes]  # (ts, linktype, bytes)


# --------------------------------------------------------------------------- plumbing


class EngineWorker(Worker):
    """The real Worker (its stats() heartbeat included) fed from a list: no capture handle,
    time advances with the packets only (as offline), a few packets per step."""

    frames: list[Frame] = []

    def start(self) -> None:
        self.reassembler = Reassembler(self.cfg, interface=self.interface, summary=False)

    def step(self, timeout: float = 0.1) -> list:
        r = self.reassembler
        assert r is not None
        for ts, linktype, frame in self.frames[self._fed:self._fed + 7]:
            r.feed(ts, linktype, frame)
            self._fed += 1
        if self._fed >= len(self.frames):
            self.done = True
        return r.completed()


class Sink:
    def __init__(self) -> None:
        self.written: list = []

    def write(self, batch: list) -> None:
        self.written.extend(batch)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def run_inproc(cfg: Any, frames: list[Frame]) -> tuple[Supervisor, EngineWorker, Sink]:
    """The daemon's in-process path (workers: 1) over `frames`, until they are all fed and the
    worker stopped (its open streams flushed)."""
    made: list[EngineWorker] = []

    def make_worker(*a: Any, **kw: Any) -> EngineWorker:
        w = EngineWorker(*a, **kw)
        w.frames = frames
        made.append(w)
        return w

    sink = Sink()
    sup = Supervisor(cfg, interface="eth9", sinks=[sink],
                     notifier=Notifier(send=lambda s: True), make_worker=make_worker)
    assert sup.run() == 0
    return sup, made[0], sink


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="stmet-"))  # AF_UNIX paths are short
    yield d
    shutil.rmtree(d, ignore_errors=True)


def read_back(sup: Supervisor, sock_dir: Path) -> tuple[dict[str, Any], dict[tuple, float]]:
    """GET /status (JSON) and GET /metrics (parsed samples: (name, labels) -> value) from the
    control server's real handler, with the supervisor's state() behind it."""
    sock = str(sock_dir / "c.sock")
    with ControlServer(sock, listen=None, ingest_dirs=[], state=sup.state, deliver=print,
                       config=lambda: None):
        out = []
        for path in ("/status", "/metrics"):
            conn = UnixHTTPConnection(sock, timeout=5)
            try:
                conn.request("GET", path)
                r = conn.getresponse()
                assert r.status == 200
                out.append(r.read().decode())
            finally:
                conn.close()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(out[1]) for s in f.samples}
    return json.loads(out[0]), samples


def metric_of(key: str) -> str:
    """The Prometheus sample name of a state key (declared, or the generic fallback)."""
    if key in metrics.ENGINE_COUNTERS:
        return metrics.ENGINE_COUNTERS[key][0] + "_total"
    return "streamtap_tcp_" + key + "_total"


def engine_counters(stats: dict[str, Any]) -> dict[tuple[str, str | None], float]:
    """Flatten a worker's stats to {(key, reason or None): value}, counters only."""
    out: dict[tuple[str, str | None], float] = {}
    for k, v in stats.items():
        if k in META_KEYS or k in GAUGES or k in metrics.PER_WORKER:
            continue
        if isinstance(v, dict):
            for reason, n in v.items():
                out[(k, reason)] = n
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[(k, None)] = v
    return out


def assert_reaches_operator(stats: dict[str, Any], status: dict[str, Any],
                            samples: dict[tuple, float]) -> None:
    for (key, reason), value in engine_counters(stats).items():
        got = status[key] if reason is None else status[key][reason]
        assert got == value, (key, reason, got, value)
        labels = () if reason is None else (("reason", reason),)
        assert samples[(metric_of(key), labels)] == value, (key, reason)


# --------------------------------------------------------------------------- scenarios


def frag(ident: int, offset: int, size: int, ts: float) -> Frame:
    """One IPv4 fragment (more fragments follow) of a datagram that never completes."""
    ip = ipv4("10.9.0.1", "10.9.0.2", b"f" * size, ident=ident, flags_df=False,
              frag_offset=offset, more_fragments=True)
    return (ts, 1, link_header(1, False) + ip)


def provoking_frames() -> list[Frame]:
    """Packets that hit every limit and every drop the engine counts, in time order.

    Limits (see `provoking_config`): 4 flows, 5,000 bytes of buffers, depth 1,500 bytes per
    direction, 1,000 out-of-order bytes, empty streams dropped, 2 pending IP datagrams that
    wait 1 s.
    """
    convs: list[Conversation] = []

    def conv(port: int, t0: float) -> Conversation:
        c = Conversation(("10.0.0.1", port), ("10.0.0.2", 80), t0=t0)
        convs.append(c)
        return c

    # memory: three idle flows hold 1,500 bytes each; the fourth sends 2,000 (depth keeps
    # 1,500, drops 500) and the 6,000 held bytes pass the 5,000 cap: the idlest is evicted
    for i in range(3):
        conv(41001 + i, T0 + i * 0.01).handshake().send("client", b"m" * 1500)
    conv(41004, T0 + 0.1).handshake().send("client", b"d" * 2000)
    # max_flows: two more flows; the second finds 4 open and evicts the idlest
    conv(42001, T0 + 1).handshake()
    conv(42002, T0 + 1.1).handshake()
    # out-of-order limit: 1,100 bytes held behind a 100-byte hole > 1,000: the hole is skipped
    conv(43001, T0 + 2).handshake().segment("client", 100, b"o" * 1100).close()
    # a whole exchange closed by FINs
    conv(44001, T0 + 3).handshake().send("client", b"GET /").send("server", b"200").close()
    # refused: no payload, dropped since emit_empty is false
    conv(45001, T0 + 3.1).syn().rst("server")
    # a SYN never answered: handshake timeout (30 s)
    conv(46001, T0 + 3.2).syn()
    frames: list[Frame] = [(ts, 1, f) for c in convs for ts, f in c.packets]

    t = T0 + 4
    # IP fragments: an overlap kills datagram 10; datagrams 11, 12, 13 overflow the 2 pending
    # (11 is dropped: table full); 12 and 13 time out when the fragment of 14 arrives 2 s later
    frames += [frag(10, 0, 16, t), frag(10, 8, 16, t + 0.01), frag(11, 0, 16, t + 0.02),
               frag(12, 0, 16, t + 0.03), frag(13, 0, 16, t + 0.04), frag(14, 0, 16, t + 2)]
    # decoder drops: a cut Ethernet header, an IP version 5 packet on a raw-IP link, ARP, UDP
    udp = b"\x30\x39\x00\x35\x00\x0c\x00\x00data"
    frames += [(t + 3, 1, b"\x00" * 10),
               (t + 3, LINKTYPE_RAW, b"\x50" + b"\x00" * 39),
               (t + 3, 1, eth(ethertype=0x0806) + b"\x00" * 28),
               (t + 3, 1, eth(ethertype=ETHERTYPE_IPV4) + ipv4("10.9.0.1", "10.9.0.2", udp,
                                                                proto=17))]
    # a minute later: linger and timeouts are over; this flow is flushed at stop (shutdown)
    late = tcp(47001, 80, 1, 0, "S", src="10.0.0.1", dst="10.0.0.2")
    frames.append((T0 + 60, 1, link_header(1, False) + ipv4("10.0.0.1", "10.0.0.2", late)))
    frames.sort(key=lambda f: f[0])
    return frames


def provoking_config() -> Any:
    return cfgmod.load(None, {
        "capture": {"interface": "eth9", "workers": 1},
        "reassembly": {
            "emit_empty": False,
            # the cap counts each open flow at FLOW_BYTES besides the 5,000 bytes held
            "limits": {"max_flows": 4, "memory": 5000 + 4 * FLOW_BYTES, "depth": 1500,
                       "ooo_bytes": 1000},
            "fragments": {"max_pending": 2, "timeout": 1.0},
        },
    })


# every counter the engine keeps, with the value this capture must give it (None: > 0)
PROVOKED: dict[tuple[str, str | None], int | None] = {
    ("evicted", "max_flows"): None,
    ("evicted", "memory"): None,
    ("memory_limit_hits", None): None,
    ("depth_dropped_bytes", None): 500,
    ("ooo_limit_hits", None): 1,
    ("empty_dropped", None): 5,   # refused, timed out, 2 evicted and 1 flushed: no payload
    ("gaps", None): 1,
    ("missed_bytes", None): 100,
    ("flows", None): 11,
    ("packets", None): None,
    ("streams", "fin"): 2,
    ("streams", "rst"): 1,
    ("streams", "timeout"): 1,
    ("streams", "evicted"): None,
    ("streams", "shutdown"): None,
    ("malformed", "fragment_overlap"): 1,
    ("malformed", "fragment_limit"): 1,
    ("malformed", "fragment_timeout"): 2,
    ("malformed", "link_header"): 1,
    ("malformed", "ip_version"): 1,
    ("skipped", "not_ip"): 1,
    ("skipped", "not_tcp"): 1,
    ("skipped", "fragment_pending"): 5,
}


def test_every_engine_counter_is_provoked_and_read_back(short_dir: Path) -> None:
    sup, w, sink = run_inproc(provoking_config(), provoking_frames())
    stats = w.stats()
    counters = engine_counters(stats)
    for (key, reason), want in PROVOKED.items():
        got = counters.get((key, reason), 0)
        assert got > 0 if want is None else got == want, (key, reason, got, want)
    evicted = stats["evicted"]["max_flows"] + stats["evicted"]["memory"]
    assert stats["streams"]["evicted"] == evicted
    assert any(s.truncated for s in sink.written)  # the depth drop flagged its stream
    assert stats["flows_active"] == 0

    status, samples = read_back(sup, short_dir)
    assert_reaches_operator(stats, status, samples)
    assert status["flows_active"] == 0 and samples[("streamtap_tcp_streams_active", ())] == 0


def test_engine_counters_are_all_declared_metrics(short_dir: Path) -> None:
    """No counter of this capture falls back to a generic name: each one is declared (own
    name, help) in metrics.ENGINE_COUNTERS."""
    _sup, w, _sink = run_inproc(provoking_config(), provoking_frames())
    undeclared = {k for k, _r in engine_counters(w.stats())} - set(metrics.ENGINE_COUNTERS)
    assert not undeclared


# --------------------------------------------------------------------------- generic path


class FakeProc:
    inline = False
    eof = False

    def __init__(self, index: int, pid: int) -> None:
        self.index, self.pid = index, pid
        self.inbox: list[Any] = []
        self.code: int | None = None

    def step(self, timeout: float) -> None:
        pass

    def exitcode(self) -> int | None:
        return self.code

    def abort(self) -> None:
        pass

    def kill(self) -> None:
        self.code = -9

    def send(self, msg: Any) -> bool:
        return self.code is None

    def messages(self) -> list[Any]:
        out, self.inbox = self.inbox, []
        return out

    def batches(self, limit: int) -> list:
        return []

    def waitables(self) -> list:
        return []

    def close(self) -> None:
        pass


def test_a_counter_added_later_reaches_status_and_metrics(short_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A key the flow table starts counting (as the late-fill counters will) is summed over
    workers and over a worker's death, with no change in the supervisor or the collector."""
    procs: list[FakeProc] = []

    def spawn(index: int, *a: Any) -> FakeProc:
        procs.append(FakeProc(index, 100 + len(procs)))
        return procs[-1]

    cfg = cfgmod.load(None, {"capture": {"interface": "eth9", "workers": 2}})
    sup = Supervisor(cfg, interface="eth9", sinks=[],
                     notifier=Notifier(send=lambda s: True), spawn=spawn)
    sup.start_workers()

    def heartbeat(index: int, **table_counts: int) -> None:
        # a real worker's stats message, from a real engine whose flow table counts new keys
        w = EngineWorker(index, cfg, interface="eth9", fanout=True)
        w.start()
        assert w.reassembler is not None
        w.reassembler.table.stats.update(table_counts)
        [p for p in procs if p.index == index][-1].inbox.append(Stats(w.stats()))

    heartbeat(0, late_filled_segments=3, late_filled_bytes=1400, late_dropped_after_emit=1)
    heartbeat(1, late_filled_segments=4, late_filled_bytes=100)
    sup.run_pass()
    procs[1].code = -9                       # worker 1 dies: its counts must stay
    sup.run_pass()
    sup.clock = sup.pool.clock = lambda: 1e12  # past the restart backoff
    sup.run_pass()
    heartbeat(1, late_filled_segments=1, late_filled_bytes=10)
    sup.run_pass()

    status, samples = read_back(sup, short_dir)
    assert status["late_filled_segments"] == 8
    assert status["late_filled_bytes"] == 1510
    assert status["late_dropped_after_emit"] == 1
    assert samples[("streamtap_tcp_late_filled_segments_total", ())] == 8
    assert samples[("streamtap_tcp_late_filled_bytes_total", ())] == 1510
    assert samples[("streamtap_tcp_late_dropped_after_emit_total", ())] == 1
    # a {reason: n} counter gets a reason label; the existing names keep theirs
    assert status["worker_restarts"] == 1
    assert ("streamtap_tcp_streams_completed_total", (("reason", "fin"),)) in samples


def test_generic_dict_counter_and_odd_names() -> None:
    state = {"late_dropped": {"after_emit": 2, "over_depth": 1}, "weird-key.x": 5,
             "already_total": 1, "interface": "eth0", "flag": True}
    text = metrics.render(lambda: state).decode()
    samples = {(s.name, tuple(s.labels.items())): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("streamtap_tcp_late_dropped_total", (("reason", "after_emit"),))] == 2
    assert samples[("streamtap_tcp_late_dropped_total", (("reason", "over_depth"),))] == 1
    assert samples[("streamtap_tcp_weird_key_x_total", ())] == 5
    assert samples[("streamtap_tcp_already_total", ())] == 1
    assert not any("interface" in n or "flag" in n for n, _l in samples)


# --------------------------------------------------------------------------- README


def readme_metrics_table() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("| metric | type | labels |")
    end = text.index("\n\n", start)
    return text[start:end + 1]


def test_readme_metrics_table_is_the_generated_one() -> None:
    assert readme_metrics_table() == metrics.reference_table(), (
        "README metrics table is stale: paste streamtap.process.metrics.reference_table()")


def engine_stats_keys() -> set[str]:
    """Every literal key the engine counts into its flow-table stats, read from the source:
    a counter added there must be declared (name, help) and so appear in the README."""
    keys: set[str] = set()
    for mod in ("flowtable", "reassembly"):
        src = (ROOT / "daemon" / "engine" / f"{mod}.py").read_text()
        keys.update(re.findall(r"""\bstats\[\s*["']([A-Za-z0-9_]+)["']\s*\]""", src))
    return keys


def test_every_exported_metric_is_in_the_readme() -> None:
    keys = engine_stats_keys()
    assert {"memory_limit_hits", "empty_dropped", "depth_dropped_bytes"} <= keys
    # the state a daemon would report with every one of those counters at 1
    state: dict[str, Any] = {"workers": [{"index": 0, "alive": True}],
                             "sinks": [{"name": "jsonl", "records": {}}]}
    for k in keys:
        group, _, reason = k.partition("_")
        if group in ("streams", "evicted") and reason:
            state.setdefault(group, {})[reason] = 1
        else:
            state[k] = 1
    documented = set(re.findall(r"`(streamtap_[a-z0-9_]+)`", readme_metrics_table()))
    # a counter family's samples are name_total; its README row names the same
    exported = {f.name + "_total" if f.type == "counter" else f.name
                for f in metrics.families(state)}
    assert exported - documented == set()
    assert documented - exported == set()  # nothing documented that is not exported
