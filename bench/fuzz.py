#!/usr/bin/env python3
"""Fuzz the engine: generated and mutated packets through decode and the flow table.

    python bench/fuzz.py                          # 1,000,000 packets, each installed engine
    python bench/fuzz.py --packets 200000 --engine python
    python bench/fuzz.py --atheris --seconds 60   # coverage-guided (atheris), decoder + table

Each engine runs in a child process: `python` sets STREAMTAP_ENGINE=python (the pure-Python
modules are forced); `compiled` runs without the variable, so whatever is installed runs, and
the child reports "not available" when no compiled streamtap module got loaded.

The packets: scenes of ~8 interleaved TCP conversations (IPv4/IPv6, random ISNs, segments split,
reordered, duplicated, dropped, overlapped with conflicting bytes, FIN/RST/none) built once with
tests/pcapbuild.py, then replayed round after round under a fresh client port and ISN shift and
a random link type, a quarter of the frames mutated (cut, bit flips, bogus 16-bit fields, junk
appended, pure noise). Packet time advances 1 ms per packet, so idle timeouts and lingers fire.

Counted: exceptions escaping `feed_batch`/`completed`/`flush` (0 expected; the first failing
batch is saved as a pcap to reproduce), and "closed exactly once": streams emitted == flows
opened, no stream id twice, no flow left open after the final flush. Exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))   # pcapbuild, the tests' capture builder

META = struct.Struct("=IIII")       # pcapy next_batch() meta: sec, usec, offset, caplen
LINKTYPES = (0, 1, 12, 101, 113, 228, 229, 276)
SEQ_MOD = 1 << 32


# --------------------------------------------------------------------------- packet pool


def _link(linktype: int, v6: bool) -> bytes:
    import pcapbuild as pb

    if linktype in (0, 1, 113):
        return pb.link_header(linktype, v6)
    if linktype == 276:   # Linux SLL2
        return struct.pack("!HHIHBB8s", 0x86DD if v6 else 0x0800, 0, 1, 1, 0, 6, b"\2" * 6)
    return b""


def _conversation(rng: random.Random, k: int) -> list[tuple[bytes, bool, bool]]:
    """One conversation's IP packets: (ip bytes, v6, sent by the client)."""
    import pcapbuild as pb

    v6 = rng.random() < 0.4
    cip, sip = ("2001:db8::1", "2001:db8::2") if v6 else ("10.0.0.1", "10.0.0.2")
    cport, sport = 30000 + k, rng.choice((80, 443, 8080))
    isn = {True: rng.choice((rng.randrange(SEQ_MOD), SEQ_MOD - rng.randrange(1, 3000))),
           False: rng.randrange(SEQ_MOD)}
    data = {side: rng.randbytes(rng.randrange(0, 3000)) for side in (True, False)}
    pkts: list[tuple[bool, int, int, str, bytes]] = []

    def seq(side: bool, off: int) -> int:
        return (isn[side] + 1 + off) % SEQ_MOD

    for side in (True, False):
        d = data[side]
        off = 0
        while off < len(d):
            n = rng.randrange(1, 1400)
            if rng.random() > 0.05:    # else dropped
                pkts.append((side, seq(side, off), seq(not side, rng.randrange(len(data[not side])
                                                                              + 1)),
                             "PA", d[off:off + n]))
                if rng.random() < 0.1:
                    pkts.append(pkts[-1])
            off += n
        for _ in range(rng.randrange(3)):   # conflicting overlap
            a = rng.randrange(len(d) + 1)
            pkts.append((side, seq(side, a), seq(not side, 0), "PA", rng.randbytes(rng.randrange(
                1, 200))))
        if rng.random() < 0.7:
            pkts.append((side, seq(side, len(d)), seq(not side, len(data[not side])), "FA", b""))
    if rng.random() < 0.2:
        pkts.append((True, seq(True, 0), seq(False, 0), "RA", b"diagnostic"))
    rng.shuffle(pkts)
    hs = [(True, isn[True], 0, "S", b""), (False, isn[False], seq(True, 0), "SA", b""),
          (True, seq(True, 0), seq(False, 0), "A", b"")]
    out = []
    for side, s, a, flags, payload in hs + pkts:
        src, dst = ((cip, cport), (sip, sport)) if side else ((sip, sport), (cip, cport))
        seg = pb.tcp(src[1], dst[1], s, a, flags, payload, src=src[0], dst=dst[0])
        ip = pb.ipv6(src[0], dst[0], seg) if v6 else pb.ipv4(src[0], dst[0], seg)
        out.append((ip, v6, side))
    return out


def build_scenes(rng: random.Random, n_scenes: int) -> list[list[tuple[bytes, bool, bool, int]]]:
    """Scenes of interleaved conversations: (ip bytes, v6, from client, conversation index)."""
    scenes = []
    k = 0
    for _ in range(n_scenes):
        queues = []
        for _ in range(8):
            queues.append([(ip, v6, side, k) for ip, v6, side in _conversation(rng, k)])
            k += 1
        scene = []
        while any(queues):
            scene.append(rng.choice([q for q in queues if q]).pop(0))
        scenes.append(scene)
    return scenes


def mutate(rng: random.Random, frame: bytes) -> bytes:
    if rng.random() < 0.08:
        return rng.randbytes(rng.randrange(120))
    b = bytearray(frame)
    for _ in range(rng.randrange(1, 4)):
        if not b:
            break
        i = rng.randrange(min(len(b), 80))
        r = rng.random()
        if r < 0.25:
            del b[i:]
        elif r < 0.6:
            b[i] ^= 1 << rng.randrange(8)
        elif r < 0.9 and i + 2 <= len(b):
            b[i:i + 2] = struct.pack("!H", rng.choice((0, 1, 20, 0xFFFF, len(b), rng.randrange(
                65536))))
        else:
            b += rng.randbytes(rng.randrange(40))
    return bytes(b)


# --------------------------------------------------------------------------- child: one engine


def loaded_engine() -> str:
    """'compiled' if any loaded streamtap module is an extension module, else 'python'."""
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None) or ""
        if name.startswith("streamtap") and f.endswith((".so", ".pyd")):
            return "compiled"
    return "python"


def run_child(args: argparse.Namespace) -> int:
    import streamtap

    rng = random.Random(args.seed)
    t_build = time.perf_counter()
    scenes = build_scenes(rng, args.scenes)
    t_build = time.perf_counter() - t_build
    r = streamtap.Reassembler(summary=False)
    engine = loaded_engine()
    if args.want == "compiled" and engine != "compiled":
        print(json.dumps({"engine": "compiled", "available": False,
                          "why": "no compiled streamtap module is installed in this interpreter"}))
        return 0
    links = {(lt, v6): _link(lt, v6) for lt in LINKTYPES for v6 in (False, True)}
    ids: set[str] = set()
    dup_ids = 0
    streams = 0
    exceptions = 0
    first_error = ""
    packets = 0
    mutated_n = 0
    usec = 0
    rnd = 0
    flows_base = 0

    def collect(done: list) -> None:
        nonlocal streams, dup_ids
        for s in done:
            streams += 1
            sid = s.id
            if sid in ids:
                dup_ids += 1
            ids.add(sid)

    t0 = time.perf_counter()
    while packets < args.packets:
        rnd += 1
        for scene in scenes:
            linktype = rng.choice(LINKTYPES)
            shift = {}
            data = bytearray()
            meta = bytearray()
            for ip, v6, side, k in scene:
                if linktype in (228, 229) and v6 != (linktype == 229):
                    continue
                sh = shift.get(k)
                if sh is None:
                    sh = shift[k] = (rng.randrange(SEQ_MOD), rng.randrange(SEQ_MOD),
                                     (30000 + k + rnd * 7919) % 35000 + 1024)
                hl = 40 if v6 else 20
                seg = bytearray(ip)
                # a new flow each round: client port, ISNs shifted (wrap anywhere)
                dc, ds, cport = sh
                s_seq, s_ack = struct.unpack_from("!II", seg, hl + 4)
                ds_me, ds_peer = (dc, ds) if side else (ds, dc)
                struct.pack_into("!II", seg, hl + 4, (s_seq + ds_me) % SEQ_MOD,
                                 (s_ack + ds_peer) % SEQ_MOD if s_ack else 0)
                struct.pack_into("!H", seg, hl + (0 if side else 2), cport)
                frame = links[(linktype, v6)] + bytes(seg)
                if rng.random() < 0.25:
                    frame = mutate(rng, frame)
                    mutated_n += 1
                meta += META.pack(usec // 1_000_000, usec % 1_000_000, len(data), len(frame))
                data += frame
                usec += 1000
            if not meta:
                continue
            try:
                packets += r.feed_batch(linktype, bytes(data), bytes(meta))
                collect(r.completed())
            except Exception:
                exceptions += 1
                if not first_error:
                    first_error = traceback.format_exc()
                    _save_batch(linktype, bytes(data), bytes(meta))
                flows_base += r.stats["flows"] - streams
                r = streamtap.Reassembler(summary=False)   # its state is suspect now
        if rnd % 20 == 0 or packets >= args.packets:
            # now and then, not every round: flows left idle meet their timeouts first
            try:
                collect(r.flush())
            except Exception:
                exceptions += 1
                first_error = first_error or traceback.format_exc()
    elapsed = time.perf_counter() - t0
    stats = r.stats
    flows = stats["flows"] + flows_base
    out = {
        "engine": engine, "available": True, "packets": packets, "mutated": mutated_n,
        "seconds": round(elapsed, 2), "packets_per_s": round(packets / elapsed),
        "pool_build_s": round(t_build, 2), "exceptions": exceptions,
        "flows": flows, "streams": streams, "duplicate_ids": dup_ids,
        "flows_active_after_flush": stats["flows_active"],
        "closed_once": streams == flows and not dup_ids and stats["flows_active"] == 0,
        "by_reason": stats["streams"], "malformed": sum(stats["malformed"].values()),
        "skipped": sum(stats["skipped"].values()), "gaps": stats["gaps"],
        "late_filled_bytes": stats["late_filled_bytes"], "ooo_limit_hits": stats["ooo_limit_hits"],
        "first_error": first_error,
    }
    print(json.dumps(out))
    return 0


def _save_batch(linktype: int, data: bytes, meta: bytes) -> None:
    import pcapbuild as pb

    fd, path = tempfile.mkstemp(prefix="streamtap-fuzz-", suffix=".pcap")
    os.close(fd)
    pkts = [(sec + us * 1e-6, data[off:off + n]) for sec, us, off, n in META.iter_unpack(meta)]
    pb.write_pcap(path, pkts, linktype=linktype)
    print(f"first failing batch saved to {path}", file=sys.stderr)


# --------------------------------------------------------------------------- atheris


def run_atheris(args: argparse.Namespace) -> int:
    try:
        import atheris
    except ImportError:
        print("atheris is not installed (pip install atheris)", file=sys.stderr)
        return 1
    with atheris.instrument_imports(include=["streamtap"]):
        import streamtap
        import streamtap.engine.api  # noqa: F401  (the decoder and flow table, loaded instrumented)

    state = {"r": streamtap.Reassembler(summary=False), "n": 0}

    def one_input(buf: bytes) -> None:
        # format: linktype index, then frames as 2-byte length + bytes
        if not buf:
            return
        linktype = LINKTYPES[buf[0] % len(LINKTYPES)]
        r = state["r"]
        i, ts = 1, 1_700_000_000.0
        while i + 2 <= len(buf):
            n = int.from_bytes(buf[i:i + 2], "big") % 2048
            frame = buf[i + 2:i + 2 + n]
            i += 2 + n
            ts += 0.7
            r.feed(ts, linktype, frame)
        r.completed()
        state["n"] += 1
        if state["n"] % 500 == 0:
            r.flush()
            assert r.stats["flows_active"] == 0

    corpus = Path(tempfile.mkdtemp(prefix="streamtap-atheris-"))
    rng = random.Random(args.seed)
    for j, scene in enumerate(build_scenes(rng, 4)):
        for lt_i, lt in enumerate(LINKTYPES):
            blob = bytearray([lt_i])
            for ip, v6, _side, _k in scene[:16]:
                frame = _link(lt, v6) + ip
                blob += len(frame).to_bytes(2, "big") + frame
            (corpus / f"seed-{j}-{lt}").write_bytes(bytes(blob))
    argv = [sys.argv[0], f"-max_total_time={args.seconds}", "-print_final_stats=1",
            f"-artifact_prefix={tempfile.gettempdir()}/streamtap-fuzz-",
            "-rss_limit_mb=4096", str(corpus)]
    if args.runs:
        argv.insert(1, f"-runs={args.runs}")
    print(f"atheris: seed corpus {corpus}, limit {args.seconds} s", file=sys.stderr)
    atheris.Setup(argv, one_input)
    atheris.Fuzz()   # exits the process; an escaping exception is a crash, exit status != 0
    return 0


# --------------------------------------------------------------------------- parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--scenes", type=int, default=40, help="scenes of 8 conversations in the pool")
    ap.add_argument("--engine", choices=("python", "compiled", "both"), default="both")
    ap.add_argument("--atheris", action="store_true", help="coverage-guided mode (atheris)")
    ap.add_argument("--seconds", type=int, default=60, help="--atheris time limit")
    ap.add_argument("--runs", type=int, default=0, help="--atheris input limit (0: none)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--child", choices=("python", "compiled"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.packets <= 0 or args.scenes <= 0 or args.seconds <= 0:
        ap.error("--packets, --scenes and --seconds must be positive")
    if args.child:
        args.want = args.child
        return run_atheris(args) if args.atheris else run_child(args)

    engines = ("python", "compiled") if args.engine == "both" else (args.engine,)
    failed = False
    results = []
    for eng in engines:
        env = dict(os.environ)
        env.pop("STREAMTAP_ENGINE", None)
        if eng == "python":
            env["STREAMTAP_ENGINE"] = "python"
        cmd = [sys.executable, __file__, "--child", eng, "--packets", str(args.packets),
               "--seed", str(args.seed), "--scenes", str(args.scenes), "--seconds",
               str(args.seconds), "--runs", str(args.runs)] + (["--atheris"] if args.atheris
                                                              else [])
        if args.atheris:
            rc = subprocess.call(cmd, env=env)
            print(f"atheris [{eng}]: exit {rc} ({'no crash' if rc == 0 else 'CRASH'})")
            failed |= rc != 0
            continue
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0 or not p.stdout.strip():
            print(f"{eng}: child failed (exit {p.returncode}): {p.stderr.strip()[-2000:]}")
            failed = True
            continue
        res = json.loads(p.stdout.strip().splitlines()[-1])
        results.append(res)
        if not res["available"]:
            print(f"{eng}: not available: {res['why']}")
            continue
        failed |= bool(res["exceptions"]) or not res["closed_once"]
        if not args.json:
            print(f"{eng} engine ({res['engine']} modules loaded): {res['packets']:,} packets "
                  f"({res['mutated']:,} mutated) in {res['seconds']} s = "
                  f"{res['packets_per_s']:,} packets/s; exceptions {res['exceptions']}")
            print(f"  flows {res['flows']:,}, streams {res['streams']:,}, closed exactly once: "
                  f"{res['closed_once']} (duplicate ids {res['duplicate_ids']}, open after "
                  f"flush {res['flows_active_after_flush']})")
            print(f"  by reason {res['by_reason']}; malformed {res['malformed']:,}, skipped "
                  f"{res['skipped']:,}, gaps {res['gaps']:,}, late-filled bytes "
                  f"{res['late_filled_bytes']:,}, out-of-order limit hits "
                  f"{res['ooo_limit_hits']:,}")
            if res["first_error"]:
                print("  first exception:\n" + res["first_error"])
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
