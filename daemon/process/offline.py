"""Parallel offline reads: N worker processes, each reassembling one shard of a capture file.

Worker k of N opens the file through `Pipeline(shard=(N, k))`: libpcap's BPF keeps the plain
IPv4/IPv6 TCP packets whose address+port sum is k modulo N (the same sum both ways, so a
connection stays in one shard), and the complement (VLAN tags, IP fragments, IPv6 extension
headers, tunnels, other traffic), of which the worker keeps what the same sum, computed after
a full decode, puts in its shard (DESIGN "Capture"). The parent reads the complement once
before the workers start (up to COMPLEMENT_IN_MEMORY; past it, each worker reads it through a
second handle) and the workers inherit it; the packets come in the file's order either way.

Streams come back over a pipe, their payloads through a memfd per worker (`_Shipper`).

Workers produce streams; the parent writes them to the sinks, in-process, as the one-worker
path does. Output order, deterministic for a given N (README "Command line"):

1. while reading, each worker sends the streams each capture batch completed, tagged with the
   latest packet time it has read (its watermark); the parent merges the workers' sequences by
   (watermark, worker index): roughly the order in which connections ended;
2. at the end of the file the parent tells every worker the latest packet time of all (so a
   connection that timed out before the end of the capture closes "timeout" in every shard, as
   it does with one worker); then worker 0's remaining streams (timeouts, then every connection
   still open, "shutdown"), then worker 1's, and so on.

The set of records is the same for any N (README: except parts cut by `part_interval` and
captures whose time runs backwards); only their order depends on N.

Single-worker cases (`plan`): stdin, several files (merged in timestamp order), `-c COUNT`, a
FIFO or device, and a link type the shard filters do not compile for.
"""

from __future__ import annotations

import multiprocessing
import os
import stat
import threading
import traceback
from collections.abc import Callable
from typing import Any

from streamtap.config import Config
from streamtap.engine.decode import UnsupportedLinkType
from streamtap.engine.pcapfmt import CaptureError, FilterError
from streamtap.engine.pipeline import Pipeline
from streamtap.engine.reader import STDIN, Batches, ShardSource, open_source, read_complement
from streamtap.engine.stream import Stream
from streamtap.errors import Error

__all__ = ["ParallelError", "merge_stats", "plan", "run_parallel", "workers_for"]

INF = float("inf")
# Payloads travel through a memfd per worker, not the pipe: one copy in (pwritev), one out
# (pread), against five through pickle and a pipe (measured on the 150 k-packet capture: 120 µs
# per stream through the pipe). The worker reuses the file from its start once the parent has
# acknowledged every message written since, so it holds about this much (a larger batch
# grows it for as long as it takes to read).
SHM_REUSE = 8 << 20
# The parent reads the complement once, up to this much, for every worker (each libpcap handle
# reads the whole file in 4 KiB reads: a second handle per worker doubled the read syscalls).
COMPLEMENT_IN_MEMORY = 16 << 20
IOV_MAX = 1024  # os.pwritev takes at most this many buffers per call (Linux UIO_MAXIOV)


class ParallelError(Error):
    """A worker process failed for a reason that is not the capture's (a bug): exit 1."""


def workers_for(cfg: Config) -> int:
    """`capture.workers`, 0 = one per CPU core (the cores this process may run on)."""
    if cfg.capture.workers:
        return cfg.capture.workers
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def plan(paths: list[str], bpf: str | None, workers: int, count: int | None = None) -> int:
    """How many workers read `paths`: `workers`, or 1 where sharding does not apply (see the
    module docstring). Raises what opening the capture raises (`CaptureError`,
    `FilterError` for the user's filter), before any worker starts."""
    if workers <= 1 or len(paths) != 1 or paths[0] == STDIN or count is not None:
        return 1
    path = paths[0]
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return 1
    except OSError:
        return 1  # the one-worker path reports it
    open_source(path, bpf).close()  # the user's filter and the file, checked as one worker would
    try:
        ShardSource(path, bpf, workers, 0).close()
    except FilterError:
        return 1  # a link type without IP: the shard expressions do not compile
    return workers


def merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The workers' `Pipeline.stats`, summed (dicts of counters key by key)."""
    out: dict[str, Any] = {}
    for st in parts:
        for key, value in st.items():
            if isinstance(value, dict):
                acc = out.setdefault(key, {})
                for k, v in value.items():
                    acc[k] = acc.get(k, 0) + v
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = out.get(key, 0) + value
            else:
                out.setdefault(key, value)
    return out


class _Shipper:
    """The worker's end of the channel: streams over the pipe, their payloads in the memfd."""

    def __init__(self, conn: Any, fd: int | None) -> None:
        self.conn, self.fd = conn, fd
        self.off = 0
        self.unacked = 0

    def _drain(self, block: bool) -> None:
        while self.unacked and (block or self.conn.poll()):
            self.conn.recv()  # an "ack"
            self.unacked -= 1

    def send(self, watermark: float, streams: list[Stream]) -> None:
        fd = self.fd
        if fd is None:
            self.conn.send(("streams", watermark, streams, 0, None))
            return
        self._drain(False)
        size = sum(len(s.client_data) + len(s.server_data) for s in streams)
        if self.off and self.off + size > SHM_REUSE:
            self._drain(True)  # every earlier message read: start the file over
            if self.off > 2 * SHM_REUSE:
                os.ftruncate(fd, SHM_REUSE)  # a large batch's pages go back to the system
            self.off = 0
        off = self.off
        bufs: list[bytes] = []
        spans: list[tuple[int, int]] = []
        for s in streams:
            spans.append((len(s.client_data), len(s.server_data)))
            bufs += [b for b in (s.client_data, s.server_data) if b]
            s.client_data = s.server_data = b""
        at = off
        for i in range(0, len(bufs), IOV_MAX):
            at += os.pwritev(fd, bufs[i:i + IOV_MAX], at)
        self.conn.send(("streams", watermark, streams, off, spans))
        self.unacked += 1
        self.off = off + size

    def end(self, latest: float | None) -> float | None:
        self.conn.send(("read", latest, None, 0, None))
        while True:
            msg = self.conn.recv()
            if msg[0] == "end":
                return msg[1]
            self.unacked -= 1


def _worker(conn: Any, path: str, cfg: Config, bpf: str | None, n: int, k: int,
            shm: int | None = None, complement: Batches | None = None) -> None:
    """Worker k: stream messages ("streams", watermark, [Stream]), then ("read", latest time),
    waits for the time to end at, then ("streams", inf, ...) and ("done", stats, error)."""
    error: str | None = None
    pipe = Pipeline(path, cfg, bpf=bpf, shard=(n, k), complement=complement)
    reading = True
    ship = _Shipper(conn, shm)

    def end_time(latest: float | None) -> float | None:
        nonlocal reading
        reading = False
        return ship.end(latest)

    try:
        try:
            for streams in pipe.batches(end_time=end_time):
                if streams:
                    last = pipe.last_time
                    watermark = last if reading and last is not None else INF
                    ship.send(watermark, streams)
        except (CaptureError, UnsupportedLinkType) as e:
            error = str(e)
        conn.send(("done", pipe.stats, error, 0, None))
    except (EOFError, BrokenPipeError):
        return  # the parent left (a sink failed, ^C): nothing to report to
    except BaseException:
        conn.send(("failed", traceback.format_exc(), None, 0, None))
        raise SystemExit(1) from None


class _Worker:
    def __init__(self, ctx: Any, path: str, cfg: Config, bpf: str | None, n: int,
                 k: int, shm: bool, complement: Batches | None) -> None:
        self.conn, child = ctx.Pipe()
        # a forked child inherits the memfd; a forkserver's would need it passed: pipe only
        self.shm = os.memfd_create(f"streamtap-offline-{k}") if shm else None
        self.proc = ctx.Process(target=_worker,
                                args=(child, path, cfg, bpf, n, k, self.shm, complement),
                                name=f"streamtap-offline-{k}", daemon=True)
        self.proc.start()
        child.close()
        self.k = k

    def close(self) -> None:
        self.conn.close()
        if self.shm is not None:
            os.close(self.shm)
            self.shm = None

    def streams(self, msg: tuple) -> list[Stream]:
        """A "streams" message's streams, payloads read back from the memfd; acknowledged."""
        _, _, streams, off, spans = msg
        fd = self.shm
        if fd is not None and spans is not None:
            for s, (nc, ns) in zip(streams, spans, strict=True):
                if nc:
                    s.client_data = os.pread(fd, nc, off)
                    off += nc
                if ns:
                    s.server_data = os.pread(fd, ns, off)
                    off += ns
            try:
                self.conn.send("ack")
            except OSError:
                pass  # the worker has sent everything and left: nothing to acknowledge to
        return streams

    def recv(self) -> tuple:
        try:
            msg = self.conn.recv()
        except EOFError:
            code = self.proc.exitcode if not self.proc.is_alive() else None
            raise ParallelError(f"offline worker {self.k} exited ({code}) without a "
                                f"result") from None
        if msg[0] == "failed":
            raise ParallelError(f"offline worker {self.k} failed:\n{msg[1]}")
        return msg


def run_parallel(path: str, cfg: Config, bpf: str | None, n: int,
                 deliver: Callable[[list[Stream]], None]) -> tuple[dict[str, Any], str | None]:
    """Read `path` with `n` worker processes; `deliver` gets every batch of streams in the
    order the module docstring defines. Returns (summed stats, the capture's error message or
    None: damage found after every stream before it was delivered). Raises `ParallelError`
    when a worker fails; whatever `deliver` raises stops the workers and propagates."""
    # fork is cheapest, and safe while this process runs no thread (the offline CLI starts
    # none before reading); otherwise a forkserver
    method = "fork" if threading.active_count() == 1 else "forkserver"
    ctx = multiprocessing.get_context(method)
    shm = method == "fork" and hasattr(os, "memfd_create")
    complement = read_complement(path, bpf, COMPLEMENT_IN_MEMORY)
    workers: list[_Worker] = []
    try:
        for k in range(n):
            workers.append(_Worker(ctx, path, cfg, bpf, n, k, shm, complement))
        heads = [w.recv() for w in workers]
        # phase 1: merge by (watermark, worker) while every worker is reading
        while True:
            live = [i for i, h in enumerate(heads) if h[0] == "streams" and h[1] != INF]
            if not live:
                break
            i = min(live, key=lambda j: (heads[j][1], j))
            deliver(workers[i].streams(heads[i]))
            heads[i] = workers[i].recv()
        latest = max((h[1] for h in heads if h[0] == "read" and h[1] is not None),
                     default=None)
        for w, h in zip(workers, heads, strict=True):
            if h[0] != "read":  # pragma: no cover - the protocol: "read" comes first
                raise ParallelError(f"offline worker {w.k}: unexpected {h[0]!r}")
            try:
                w.conn.send(("end", latest))
            except OSError as e:  # not stdout's broken pipe: a worker gone
                raise ParallelError(f"offline worker {w.k} left: {e}") from None
        # phase 2: each worker's end of input, worker by worker
        stats: list[dict[str, Any]] = []
        error: str | None = None
        for w in workers:
            while True:
                msg = w.recv()
                if msg[0] == "streams":
                    deliver(w.streams(msg))
                    continue
                stats.append(msg[1])
                error = error or msg[2]
                break
        for w in workers:
            w.proc.join()
        return merge_stats(stats), error
    finally:
        for w in workers:
            w.close()
            if w.proc.is_alive():
                w.proc.terminate()
            w.proc.join()
