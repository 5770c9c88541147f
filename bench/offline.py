#!/usr/bin/env python3
"""Offline throughput benchmark: tcpflow (and a dpkt reassembler) vs the streamtap library and CLI.

    python bench/offline.py [--capture mixed|short|synflood|bulk|all] [--pcap FILE] [--repeat 3]
                            [--json]

Without --pcap, a capture is generated into /dev/shm with bench/gen_capture.py: `--capture`
names its shape (default `mixed`: 150,000 packets, 1,600 connections, seed 1; `short`: 50,000
9-packet connections, 50 open at a time; `synflood`: 500,000 unanswered SYNs with 200 real
connections; `bulk`: one 200 MB connection; `all`: each in turn, one table per capture). Each
tool runs --repeat times, interleaved, as a child process; the table gives the best wall time,
and the peak RSS of the child (os.wait4's ru_maxrss). All outputs go to tmpfs (/dev/shm), so the
ratio measures reassembly, not disks. See bench/README.md.

Speed is nothing without the right bytes: the generator also writes its truth (what every
connection really carried), and every stream the library reassembles is checked byte-exact
against it ("1600/1600 streams byte-exact"); with --pcap, give the generator's --truth file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import machine  # bench/machine.py: the scripts run from bench/
from machine import results_table

HERE = Path(__file__).resolve().parent
TMPFS = "/dev/shm"

LIB_CHILD = """\
import sys, time
t0 = time.perf_counter()
import streamtap
t1 = time.perf_counter()
n = sum(1 for s in streamtap.reassemble(sys.argv[1]))
t2 = time.perf_counter()
print(n, t1 - t0, t2 - t1)
"""


@dataclass
class Run:
    wall: float
    rss_mib: float
    output: int | None  # tcpflow: files written; library: streams; CLI: JSONL records
    user: float = 0.0
    system: float = 0.0
    inner: float | None = None  # library: seconds inside reassemble() (no start-up, no import)


@dataclass
class Result:
    tool: str
    command: str
    walls: list[float] = field(default_factory=list)
    wall_s: float | None = None
    packets_per_s: float | None = None
    ratio_to_tcpflow: float | None = None
    peak_rss_mib: float | None = None
    output: int | None = None
    output_kind: str = ""
    user_s: float | None = None  # CPU seconds of the best run
    sys_s: float | None = None
    inner_s: float | None = None
    error: str | None = None


# -- child processes ---------------------------------------------------------------------------
# A child's ru_maxrss starts from the high-water RSS of the memory image it was exec'ed from: a
# child forked from this process (which may have just generated a 130 MiB capture) would report
# our peak, not its own. So every command is started by a small, fresh launcher process (python
# -I -S, ~8 MiB), which times it and reaps it with os.wait4; RSS below the launcher's own size
# reads as that floor.
LAUNCHER = """\
import os, signal, sys, time
out, timeout, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
try:
    t0 = time.perf_counter()
    pid = os.posix_spawnp(argv[0], argv, os.environ)
    signal.signal(signal.SIGALRM, lambda *_: os.kill(pid, signal.SIGKILL))
    signal.alarm(timeout)
    _, status, ru = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    res = "%r %r %r %r %r" % (wall, ru.ru_maxrss, os.waitstatus_to_exitcode(status),
                              ru.ru_utime, ru.ru_stime)
except OSError as e:
    res = "error %s: %s" % (argv[0], e.strerror)
with open(out, "w") as f:
    f.write(res)
"""


TIMEOUT = 600  # seconds per run; --timeout


def run_child(argv: list[str]) -> tuple[float, float, int, str, str, float, float]:
    """Run argv; returns (wall s, peak RSS MiB, exit status, stdout, stderr, user s, sys s)."""
    fd, result = tempfile.mkstemp(prefix="streamtap-bench-", suffix=".res")
    os.close(fd)
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            subprocess.run([sys.executable, "-I", "-S", "-c", LAUNCHER, result, str(TIMEOUT),
                            *argv],
                           stdin=subprocess.DEVNULL, stdout=out, stderr=err, check=False)
            out.seek(0)
            err.seek(0)
            stdout = out.read().decode(errors="replace")
            stderr = err.read().decode(errors="replace")
        with open(result) as f:
            fields = f.read().split(" ", 1)
    finally:
        os.unlink(result)
    if fields[0] in ("error", ""):
        raise ToolError(fields[1] if len(fields) > 1 else f"launcher failed: {stderr[-200:]}")
    wall, maxrss, rc, user, system = fields[0], *fields[1].split()
    return (float(wall), int(maxrss) / 1024.0, int(rc), stdout, stderr, float(user),
            float(system))


class ToolError(Exception):
    pass


def _error(rc: int, stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    msg = lines[-1] if lines else "no message"
    if rc == -9:
        msg = f"killed (timeout {TIMEOUT} s?)"
    return f"exit {rc}: {msg}"[:200]


def bench_tcpflow(pcap: str) -> Run:
    outdir = tempfile.mkdtemp(prefix="streamtap-bench-tcpflow-", dir=TMPFS)
    try:
        wall, rss, rc, _, err, user, system = run_child(["tcpflow", "-r", pcap, "-o", outdir])
        if rc != 0:
            raise ToolError(_error(rc, err))
        files = sum(1 for name in os.listdir(outdir) if name != "report.xml")
        return Run(wall, rss, files, user, system)
    finally:
        shutil.rmtree(outdir, ignore_errors=True)


def bench_dpkt(pcap: str) -> Run:
    outdir = tempfile.mkdtemp(prefix="streamtap-bench-dpkt-", dir=TMPFS)
    try:
        cmd = [sys.executable, str(HERE / "dpkt_reassembler.py"), pcap, outdir]
        wall, rss, rc, out, err, user, system = run_child(cmd)
        if rc != 0:
            if "No module named 'dpkt'" in err:
                raise ToolError("dpkt not installed (make bench, or pip install -e '.[bench]')")
            raise ToolError(_error(rc, err))
        return Run(wall, rss, len(os.listdir(outdir)), user, system)
    finally:
        shutil.rmtree(outdir, ignore_errors=True)


def bench_library(pcap: str) -> Run:
    wall, rss, rc, out, err, user, system = run_child([sys.executable, "-c", LIB_CHILD, pcap])
    if rc != 0:
        raise ToolError(_error(rc, err))
    try:
        n, _, inner = out.split()
        return Run(wall, rss, int(n), user, system, float(inner))
    except ValueError as e:
        raise ToolError(f"unexpected output {out[:80]!r}") from e


def streamtap_cli() -> str:
    exe = Path(sys.executable).parent / "streamtap"
    if exe.exists():
        return str(exe)
    return shutil.which("streamtap") or str(exe)


def bench_cli(pcap: str, workers: int | None = None) -> Run:
    """The CLI writing JSON Lines to tmpfs; `workers` None = its default (one per core)."""
    fd, sink = tempfile.mkstemp(prefix="streamtap-bench-", suffix=".jsonl", dir=TMPFS)
    os.close(fd)
    os.unlink(sink)  # let the CLI create it
    try:
        cmd = [streamtap_cli(), "-r", pcap, "--sink", f"jsonl:{sink}"]
        if workers is not None:
            cmd += ["--workers", str(workers)]
        wall, rss, rc, _, err, user, system = run_child(cmd)
        if rc != 0:
            raise ToolError(_error(rc, err))
        try:
            with open(sink, "rb") as f:
                lines = sum(1 for _ in f)
        except OSError:
            lines = None
        return Run(wall, rss, lines, user, system)
    finally:
        if os.path.exists(sink):
            os.unlink(sink)


# -- figures -----------------------------------------------------------------------------------
def capture_figures(path: str) -> dict:
    """Packets, TCP connections (distinct 4-tuples) and the IPv4/IPv6 split of a classic pcap
    over Ethernet; other formats fall back to capinfos for the packet count."""
    size = os.path.getsize(path)
    fig: dict = {"path": path, "bytes": size}
    with open(path, "rb") as f:
        data = f.read()
    magic = data[:4]
    endian = {b"\xd4\xc3\xb2\xa1": "<", b"\x4d\x3c\xb2\xa1": "<",
              b"\xa1\xb2\xc3\xd4": ">", b"\xa1\xb2\x3c\x4d": ">"}.get(magic)
    if endian is None or struct.unpack(endian + "I", data[20:24])[0] != 1:
        fig["packets"] = _capinfos_packets(path)
        return fig
    rec = struct.Struct(endian + "IIII")
    off, packets, n = 24, 0, len(data)
    conns: dict[tuple, int] = {}
    while off + 16 <= n:
        _, _, incl, _ = rec.unpack_from(data, off)
        off += 16
        frame = data[off : off + incl]
        off += incl
        packets += 1
        etype = int.from_bytes(frame[12:14], "big")
        l3 = 14
        while etype in (0x8100, 0x88A8) and len(frame) >= l3 + 4:
            etype = int.from_bytes(frame[l3 + 2 : l3 + 4], "big")
            l3 += 4
        if etype == 0x0800 and len(frame) >= l3 + 20 and frame[l3 + 9] == 6:
            l4 = l3 + (frame[l3] & 0x0F) * 4
            a, b, ver = frame[l3 + 12 : l3 + 16], frame[l3 + 16 : l3 + 20], 4
        elif etype == 0x86DD and len(frame) >= l3 + 40 and frame[l3 + 6] == 6:
            l4 = l3 + 40
            a, b, ver = frame[l3 + 8 : l3 + 24], frame[l3 + 24 : l3 + 40], 6
        else:
            continue
        pa, pb = frame[l4 : l4 + 2], frame[l4 + 2 : l4 + 4]
        key = (a, pa, b, pb) if (a, pa) <= (b, pb) else (b, pb, a, pa)
        conns[key] = ver
    fig["packets"] = packets
    fig["connections"] = len(conns)
    fig["ipv4_connections"] = sum(1 for v in conns.values() if v == 4)
    fig["ipv6_connections"] = len(conns) - fig["ipv4_connections"]
    return fig


def _capinfos_packets(path: str) -> int | None:
    try:
        out = subprocess.run(["capinfos", "-M", "-c", "-T", path], capture_output=True,
                             text=True, check=True).stdout.splitlines()
        return int(out[-1].split("\t")[-1])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


def machine_figures() -> dict:
    try:
        tcpflow = subprocess.run(["tcpflow", "-V"], capture_output=True, text=True).stdout.strip()
    except OSError:
        tcpflow = "not found"
    return {**machine.machine_figures(), "tcpflow": tcpflow or "unknown",
            "streamtap": _streamtap_version(), "tmpfs": TMPFS}


def _streamtap_version() -> str:
    code = ("import streamtap, streamtap.engine.compiled as e; "
            "print(f'{streamtap.__version__} (engine: {e.engine()})')")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "not importable"


# -- correctness -------------------------------------------------------------------------------
def verify(pcap: str, truth_path: str) -> dict:
    """Reassemble `pcap` with the library (in this process, untimed) and compare every stream
    with the generator's truth: a connection is exact when it came out as one stream, client and
    server as generated, both directions byte for byte. A truth line {"empty_flows": N} allows N
    further streams with no bytes either way (the SYN flood's), and requires exactly that many.
    Streams are checked as they come, so memory stays that of the reassembly."""
    import streamtap

    truth: dict[tuple, dict] = {}
    empty_expected = 0
    with open(truth_path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if "empty_flows" in rec:
                empty_expected += rec["empty_flows"]
                continue
            truth[(tuple(rec["client"]), tuple(rec["server"]))] = rec
    seen: dict[tuple, int] = {}
    exact, empty, wrong = 0, 0, []
    # a connection longer than reassembly.part_bytes comes in parts: hashed part by part, it
    # is checked once its last part is out
    parts: dict[str, list] = {}
    for st in streamtap.reassemble(pcap):
        acc = parts.pop(st.id, None) or [hashlib.sha256(), hashlib.sha256(), 0, 0, []]
        acc[0].update(st.client_data)
        acc[1].update(st.server_data)
        acc[2] += len(st.client_data)
        acc[3] += len(st.server_data)
        acc[4] += st.gaps
        if st.close_reason == "part":
            parts[st.id] = acc
            continue
        key = (st.client, st.server)
        rec = truth.get(key)
        if rec is None:
            if not acc[2] and not acc[3]:
                empty += 1
            else:
                wrong.append(f"{key}: not in the truth")
            continue
        seen[key] = seen.get(key, 0) + 1
        got = {"client": (acc[2], acc[0].hexdigest()), "server": (acc[3], acc[1].hexdigest())}
        bad = [side for side in ("client", "server")
               if got[side] != (rec[f"{side}_len"], rec[f"{side}_sha256"])]
        if bad:
            wrong.append(f"{key}: {'/'.join(bad)} bytes differ "
                         f"({acc[2]}/{acc[3]} vs "
                         f"{rec['client_len']}/{rec['server_len']}, gaps {acc[4][:3]})")
        elif seen[key] == 1:
            exact += 1
    for key in truth:
        n = seen.get(key, 0)
        if n != 1:
            wrong.append(f"{key}: {n} streams")
            if n > 1:
                exact -= 1
    if empty != empty_expected:
        wrong.append(f"{empty} payload-less streams outside the truth, expected {empty_expected}")
    return {"exact": exact, "connections": len(truth), "empty": empty,
            "empty_expected": empty_expected, "wrong": wrong}


# -- main --------------------------------------------------------------------------------------
def benchmark(pcap: str, packets: int | None, repeat: int, tools: list[str]) -> list[Result]:
    benches: dict[str, tuple[Callable[[str], Run], str, str]] = {
        "tcpflow": (bench_tcpflow, f"tcpflow -r {pcap} -o {TMPFS}/<tmpdir>", "files"),
        "dpkt reassembler": (
            bench_dpkt, f"python bench/dpkt_reassembler.py {pcap} {TMPFS}/<tmpdir>", "files"),
        "streamtap library": (
            bench_library,
            "python -c 'sum(1 for s in streamtap.reassemble(FILE))'",
            "streams",
        ),
        "streamtap CLI": (
            bench_cli,
            f"streamtap -r {pcap} --sink jsonl:{TMPFS}/<tmp>.jsonl (default workers: one per "
            "core)",
            "records",
        ),
        "streamtap CLI 1 worker": (
            lambda p: bench_cli(p, 1),
            f"streamtap -r {pcap} --workers 1 --sink jsonl:{TMPFS}/<tmp>.jsonl",
            "records",
        ),
    }
    results = {name: Result(name, benches[name][1], output_kind=benches[name][2])
               for name in tools}
    runs: dict[str, list[Run]] = {name: [] for name in tools}
    for i in range(repeat):
        for name in tools:
            res = results[name]
            if res.error:
                continue
            try:
                run = benches[name][0](pcap)
            except ToolError as e:
                res.error = str(e)
                continue
            except OSError as e:
                res.error = f"{type(e).__name__}: {e}"
                continue
            runs[name].append(run)
            print(f"  run {i + 1}/{repeat} {name}: {run.wall:.3f} s, {run.rss_mib:.1f} MiB",
                  file=sys.stderr)
    for name in tools:
        res, rs = results[name], runs[name]
        if res.error or not rs:
            res.error = res.error or "no run"
            continue
        best = min(rs, key=lambda r: r.wall)
        res.walls = [round(r.wall, 4) for r in rs]
        res.wall_s = round(best.wall, 4)
        res.peak_rss_mib = round(max(r.rss_mib for r in rs), 1)
        res.output = best.output
        res.user_s, res.sys_s = round(best.user, 3), round(best.system, 3)
        if best.inner is not None:
            res.inner_s = round(min(r.inner for r in rs if r.inner is not None), 4)
        if packets:
            res.packets_per_s = round(packets / best.wall)
    base = results.get("tcpflow")
    if base and base.wall_s:
        for res in results.values():
            if res.wall_s:
                res.ratio_to_tcpflow = round(res.wall_s / base.wall_s, 2)
    return list(results.values())


def format_report(machine: dict, capture: dict, results: list[Result], repeat: int,
                  header: bool = True) -> str:
    lines = [
        f"machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable), "
        f"Linux {machine['kernel']}",
        f"software: Python {machine['python']}, {machine['tcpflow']}, "
        f"streamtap {machine['streamtap']}; outputs on tmpfs {machine['tmpfs']}; {machine['date']}",
    ] if header else []
    cap = f"capture: {capture['path']}: {capture.get('packets', '?'):,} packets"
    if capture.get("connections") is not None:
        cap += (f", {capture['connections']:,} connections ({capture.get('ipv4_connections')} "
                f"IPv4, {capture.get('ipv6_connections')} IPv6)")
    cap += f", {capture['bytes'] / 2**20:.1f} MiB"
    if capture.get("shape"):
        cap = f"{capture['shape']} " + cap
    if "seed" in capture:
        cap += f" (generated, seed {capture['seed']}, in {capture['generation_s']} s)"
    runs = f"{repeat} run{'s' if repeat > 1 else ''}"
    lines += [cap, f"best of {runs} each, wall includes process start-up", ""]
    head = ("tool", "wall s", "packets/s", "x tcpflow", "peak RSS MiB", "output")
    rows = []
    for r in results:
        if r.error:
            rows.append((r.tool, f"n/a (error: {r.error})"))
            continue
        out = f"{r.output:,} {r.output_kind}" if r.output is not None else "?"
        if r.inner_s is not None:
            out += f" ({r.inner_s:.3f} s in reassemble)"
        rows.append((
            r.tool,
            f"{r.wall_s:.3f}",
            f"{r.packets_per_s:,}" if r.packets_per_s else "?",
            f"{r.ratio_to_tcpflow:.2f}" if r.ratio_to_tcpflow is not None else "?",
            f"{r.peak_rss_mib:.1f}",
            out,
        ))
    lines += results_table(head, rows)
    return "\n".join(lines)


SHAPES = ("mixed", "short", "synflood", "bulk")  # bench/gen_capture.py's
PEERS = ("tcpflow", "dpkt reassembler")


def run_capture(args: argparse.Namespace, shape: str | None, tools: list[str]) -> tuple[dict, int]:
    """Generate (unless --pcap), benchmark and verify one capture; returns (document, status)."""
    generated = None
    truth = args.truth
    if args.pcap:
        pcap = args.pcap
        capture = capture_figures(pcap)
    else:
        sys.path.insert(0, str(HERE))
        import gen_capture

        fd, pcap = tempfile.mkstemp(prefix=f"streamtap-bench-{shape}-", suffix=".pcap",
                                    dir=TMPFS)
        os.close(fd)
        generated = pcap
        truth = pcap[: -len(".pcap")] + ".truth.jsonl"
        print(f"generating {shape} capture {pcap} ...", file=sys.stderr)
        capture = gen_capture.generate(pcap, args.packets, args.connections, args.seed, truth,
                                       shape=shape or "mixed")
    check = None
    try:
        results = benchmark(pcap, capture.get("packets"), args.repeat, tools)
        if truth:
            print("checking every stream against the truth ...", file=sys.stderr)
            check = verify(pcap, truth)
    finally:
        if generated and not args.keep:
            os.unlink(generated)
            if truth:
                os.unlink(truth)
    status = 0
    if check is not None:
        for line in check["wrong"][:20]:
            print(f"  not exact: {line}", file=sys.stderr)
        if check["exact"] != check["connections"] or check["wrong"]:
            status = 1
    return {"capture": capture, "repeat": args.repeat, "results": [asdict(r) for r in results],
            "correctness": check, "_results": results}, status


def correctness_line(check: dict) -> str:
    line = (f"correctness: {check['exact']}/{check['connections']} streams byte-exact against "
            "the generator's truth")
    if check["empty_expected"] or check["empty"]:
        line += (f"; {check['empty']:,}/{check['empty_expected']:,} unanswered SYNs as "
                 "payload-less streams")
    return line


def main(argv: list[str] | None = None) -> int:
    global TIMEOUT
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--capture", default="mixed", choices=(*SHAPES, "all"),
                    help="generated capture's shape, or all of them in turn (mixed)")
    ap.add_argument("--pcap", help="capture to use (default: generate one into /dev/shm)")
    ap.add_argument("--truth", metavar="FILE",
                    help="with --pcap: the generator's --truth file, to check every stream")
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool; the best counts (3)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--packets", type=int, default=150_000,
                    help="generated mixed capture: packets")
    ap.add_argument("--connections", type=int, default=1600,
                    help="generated mixed capture: connections")
    ap.add_argument("--seed", type=int, default=1, help="generated capture: seed")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per run (600)")
    ap.add_argument("--keep", action="store_true", help="keep the generated capture")
    ap.add_argument("--tools", default="tcpflow,dpkt,library,cli,cli1",
                    help="comma-separated subset of tcpflow,dpkt,library,cli,cli1 (cli: the "
                         "default workers, one per core; cli1: --workers 1; the dpkt "
                         "reassembler runs on the first capture only)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    TIMEOUT = max(1, args.timeout)
    names = {"tcpflow": "tcpflow", "dpkt": "dpkt reassembler", "library": "streamtap library",
             "cli": "streamtap CLI", "cli1": "streamtap CLI 1 worker"}
    try:
        tools = [names[t.strip()] for t in args.tools.split(",") if t.strip()]
    except KeyError as e:
        ap.error(f"--tools: unknown tool {e}")
    if args.truth and not args.pcap:
        ap.error("--truth goes with --pcap (a generated capture brings its own)")
    shapes: list[str | None] = [None] if args.pcap else (
        list(SHAPES) if args.capture == "all" else [args.capture])

    machine = machine_figures()
    docs, status = [], 0
    for i, shape in enumerate(shapes):
        # the dpkt peer is for the first capture: pure Python, it takes minutes on the others
        use = [t for t in tools if t != "dpkt reassembler" or i == 0]
        doc, st = run_capture(args, shape, use)
        status = max(status, st)
        docs.append(doc)
        if not args.json:
            if i:
                print()
            print(format_report(machine, doc["capture"], doc.pop("_results"), args.repeat,
                                header=i == 0))
            if doc["correctness"] is not None:
                print(correctness_line(doc["correctness"]))
            sys.stdout.flush()
        else:
            doc.pop("_results")
    if args.json:
        out = {"machine": machine, "captures": docs} if len(docs) > 1 else {
            "machine": machine, **docs[0]}
        print(json.dumps(out, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
