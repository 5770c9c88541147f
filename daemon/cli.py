"""Command line: tcpdump's habits where they exist (DESIGN "Interfaces").

Exit codes: 0 done, 1 runtime failure (unreadable capture, missing interface, a sink that
cannot open or write), 2 usage or config error. A user's mistake or a failing sink gets one line
on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from streamtap import __version__, config
from streamtap.config import Config, ConfigError
from streamtap.engine.compiled import engine
from streamtap.errors import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, Error
from streamtap.sinks.base import OK, Sink, SinkError, describe_error
from streamtap.sinks.registry import build_sinks, parse_sink_spec, sink_types


class UsageError(Error):
    """A bad flag, filter or config: exit 2 with the message."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="streamtap",
        description="Reassemble TCP connections from captures or an interface into byte streams.",
        epilog="streamtap ctl [-i IFACE | --socket PATH] status|metrics|ingest PATH: "
        "talk to a running daemon.",
    )
    p.add_argument("-r", dest="read", action="append", metavar="FILE",
                   help="read packets from FILE (pcap or pcapng; '-' = stdin); repeatable, "
                   "several files are merged in timestamp order")
    p.add_argument("-i", dest="interface", metavar="IFACE", help="capture live on IFACE")
    p.add_argument("-s", dest="snaplen", type=int, metavar="SNAPLEN",
                   help="bytes captured per packet (default 262144)")
    p.add_argument("-B", dest="buffer_kib", type=int, metavar="KiB",
                   help="kernel capture buffer in KiB (default 65536)")
    p.add_argument("-p", dest="no_promisc", action="store_true",
                   help="do not put the interface into promiscuous mode")
    p.add_argument("-c", dest="count", type=int, metavar="COUNT",
                   help="stop after COUNT packets")
    p.add_argument("-F", dest="filter_file", metavar="FILE",
                   help="read the BPF filter expression from FILE")
    p.add_argument("--config", metavar="FILE",
                   help="YAML configuration (default: the shipped default.yaml)")
    p.add_argument("--sink", action="append", metavar="SPEC",
                   help="jsonl:PATH|- , pcap:DIR, files:DIR or couchdb:URL; repeatable; "
                   "replaces the config's sinks")
    p.add_argument("--workers", type=int, metavar="N",
                   help="worker processes (shards); default one per core, for -i and for -r "
                   "of one file (stdin, several files and -c read with one)")
    p.add_argument("--control-socket", metavar="PATH", help="control API unix socket")
    p.add_argument("--check-config", action="store_true",
                   help="validate, print the effective config as YAML, exit 0 (or 2)")
    p.add_argument("-v", dest="verbose", action="count", default=0, help="more log output")
    p.add_argument("-q", dest="quiet", action="store_true",
                   help="no progress bar, no summary")
    p.add_argument("--version", action="version",
                   version=f"streamtap {__version__} (engine: {engine()})")
    p.add_argument("expression", nargs="*", help="BPF filter, as tcpdump takes it")
    return p


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """CLI flags become config overrides, validated like YAML."""
    capture: dict[str, Any] = {}
    if args.interface:
        capture["interface"] = args.interface
    if args.snaplen is not None:
        capture["snaplen"] = args.snaplen
    if args.buffer_kib is not None:
        capture["buffer_size"] = args.buffer_kib * 1024
    if args.no_promisc:
        capture["promiscuous"] = False
    if args.workers is not None:
        capture["workers"] = args.workers
    expression = " ".join(args.expression)
    if args.filter_file:
        if expression:
            raise UsageError("give a filter either as an expression or with -F, not both")
        try:
            with open(args.filter_file, encoding="utf-8") as fh:
                # tcpdump -F: the whole file is the expression; '#' comments are ours
                expression = " ".join(
                    line.split("#", 1)[0].strip() for line in fh if line.strip()
                ).strip()
        except OSError as e:
            raise UsageError(f"-F {args.filter_file}: {e.strerror}") from None
    if expression:
        capture["filter"] = expression
    out: dict[str, Any] = {}
    if capture:
        out["capture"] = capture
    if args.sink:
        out["sinks"] = [parse_sink_spec(s) for s in args.sink]
    if args.control_socket:
        out["control"] = {"socket": args.control_socket}
    return out


def load_config(args: argparse.Namespace) -> Config:
    """The config the flags name, sink options checked by each sink type (SIGHUP reloads
    through this too, passed down to the daemon)."""
    return config.load(args.config, overrides_from_args(args), sink_types=sink_types())


class SinkFailure(Error):
    """A sink could not open or refused a batch: offline runs stop on it with exit 1 and this
    one line, `sink NAME: ANSWER` (the server's or the OS's answer)."""

    def __init__(self, sink: Any, answer: str) -> None:
        super().__init__(f"sink {getattr(sink, 'name', None) or type(sink).__name__}: {answer}")


# What a sink may raise from open() or write() for a failure it can state (STYLE F2): the OS's
# answer (OSError) or its own (streamtap.sinks.base.SinkError, e.g. CouchDB's HTTP 401). Any
# sink, built-in or plugin, that keeps to this gets the one-line exit 1 offline and the
# one-line log and retry in the daemon; anything else is a bug and keeps its traceback.
def _sink_errors() -> tuple[type[BaseException], ...]:
    return (OSError, SinkError)


def open_sinks(sinks: list[Sink]) -> None:
    """Open every sink; the first that cannot raises `SinkFailure`."""
    errors = _sink_errors()
    for sink in sinks:
        try:
            sink.open()
        except errors as e:
            raise SinkFailure(sink, describe_error(e)) from None


def write_all(sinks: list[Sink], streams: list, failed: set[int] | None = None) -> None:
    """Offline delivery is synchronous: a batch tool should fail loudly and at once. (The
    daemon puts a SinkRunner with retries and a disk spool in front of each sink instead.)

    Every sink not in `failed` (ids) gets the batch, even after another one failed; a sink
    that fails is added to `failed` and the first failure is raised as `SinkFailure`."""
    errors = _sink_errors()
    first: SinkFailure | None = None
    for sink in sinks:
        if failed is not None and id(sink) in failed:
            continue
        try:
            res = sink.write(streams)
        except BrokenPipeError:
            raise
        except errors as e:
            failure = SinkFailure(sink, describe_error(e))
        else:
            if res is None or res.status == OK:
                continue
            if "broken pipe" in (res.error or ""):
                raise BrokenPipeError(res.error)
            failure = SinkFailure(sink, res.error or res.status)
        if failed is not None:
            failed.add(id(sink))
        first = first or failure
    if first is not None:
        raise first


def _summary_line(stats: dict[str, Any], elapsed: float) -> str:
    streams = stats["streams"]
    total = sum(streams.values())
    by = ", ".join(f"{k} {streams.get(k, 0)}"
                   for k in ("fin", "rst", "timeout", "evicted", "shutdown"))
    line = (f"streamtap: {stats['packets']} packets in {elapsed:.2f} s, {total} streams ({by}), "
            f"{stats['gaps']} gaps ({stats['missed_bytes']} bytes missed)")
    mal = stats["malformed"]
    if mal:
        line += f", {sum(mal.values())} malformed (" + ", ".join(
            f"{k} {v}" for k, v in sorted(mal.items())) + ")"
    else:
        line += ", 0 malformed"
    return line


def close_sinks(sinks: list[Sink]) -> None:
    """Close every sink at the end of an offline run; a failure was reported when it happened,
    so closing does not report it again."""
    for s in sinks:
        try:
            s.close()
        except _sink_errors():
            pass


def run_offline(args: argparse.Namespace, cfg: Config) -> int:
    from streamtap.engine.decode import UnsupportedLinkType
    from streamtap.engine.pipeline import Pipeline
    from streamtap.engine.reader import CaptureError, FilterError
    from streamtap.process.offline import plan, workers_for

    # A batch job that builds a flow per connection: the objects alive now (modules, config)
    # are never garbage, and a large first generation spares the collector most passes over
    # the flow table (about 10 % of a SYN flood's run). The library and the daemon keep
    # Python's defaults.
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)
    bpf = cfg.capture.filter or None
    try:
        nworkers = plan(args.read, bpf, workers_for(cfg), args.count)
    except FilterError as e:
        print(f"streamtap: bad filter expression: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CaptureError as e:
        print(f"streamtap: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    if nworkers > 1:
        return _run_parallel(args, cfg, nworkers)
    sinks = build_sinks(cfg)
    pipe = Pipeline(args.read, cfg, bpf=bpf, count=args.count)
    started = time.monotonic()
    status = EXIT_OK
    show_progress = not args.quiet and sys.stderr.isatty() and "-" not in args.read
    bar = None
    failed: set[int] = set()  # sinks that failed: written to no more (not even at the end)
    opened = False

    def deliver(streams: list) -> None:
        if streams:
            write_all(sinks, streams, failed)

    try:
        open_sinks(sinks)
        opened = True
        pipe.open()
        if show_progress:
            bar = _progress(pipe.total_size)
        for streams in pipe.batches():
            deliver(streams)
            if bar is not None:
                bar.update(pipe.bytes_read - bar.n)
                rate = pipe.packets / max(time.monotonic() - started, 1e-9)
                bar.set_postfix_str(f"{rate:,.0f} pkt/s")
    except FilterError as e:
        print(f"streamtap: bad filter expression: {e}", file=sys.stderr)
        status = EXIT_USAGE
    except (UnsupportedLinkType, CaptureError, SinkFailure) as e:
        print(f"streamtap: {e}", file=sys.stderr)
        status = EXIT_RUNTIME
    except BrokenPipeError:
        raise
    except OSError as e:
        # not a sink's (those are SinkFailure): e.g. the progress bar's terminal
        print(f"streamtap: {describe_error(e)}", file=sys.stderr)
        status = EXIT_RUNTIME
    finally:
        if bar is not None:
            bar.close()
        # after a sink failure, the streams still open go to the sinks still working (after
        # damage the pipeline has handed them over already: this flush is then empty)
        try:
            if opened:
                deliver(pipe.flush())
        except BrokenPipeError:
            status = EXIT_OK
        except SinkFailure as e:
            if status == EXIT_OK:
                print(f"streamtap: {e}", file=sys.stderr)
                status = EXIT_RUNTIME
        close_sinks(sinks)
    if not args.quiet and status != EXIT_USAGE and (status == EXIT_OK or pipe.packets):
        print(_summary_line(pipe.stats, time.monotonic() - started), file=sys.stderr)
    return status


def _run_parallel(args: argparse.Namespace, cfg: Config, nworkers: int) -> int:
    """`run_offline` with several worker processes (streamtap.process.offline): the workers
    reassemble, this process writes to the sinks. No progress bar."""
    from streamtap.process.offline import ParallelError, run_parallel

    started = time.monotonic()
    status = EXIT_OK
    failed: set[int] = set()
    stats: dict[str, Any] | None = None
    sinks = build_sinks(cfg)

    def deliver(streams: list) -> None:
        if streams:
            write_all(sinks, streams, failed)

    try:
        open_sinks(sinks)
        stats, error = run_parallel(args.read[0], cfg, cfg.capture.filter or None, nworkers,
                                    deliver)
        if error is not None:
            print(f"streamtap: {error}", file=sys.stderr)
            status = EXIT_RUNTIME
    except (SinkFailure, ParallelError) as e:
        print(f"streamtap: {e}", file=sys.stderr)
        status = EXIT_RUNTIME
    except BrokenPipeError:
        raise
    except OSError as e:
        print(f"streamtap: {describe_error(e)}", file=sys.stderr)
        status = EXIT_RUNTIME
    finally:
        close_sinks(sinks)
    if not args.quiet and stats is not None:
        print(_summary_line(stats, time.monotonic() - started), file=sys.stderr)
    return status


def _progress(total: int | None):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                desc="streamtap", leave=False)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "ctl":
        from streamtap.process.ctl import main as ctl_main

        return ctl_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.count is not None and args.count < 1:
        parser.error("-c COUNT must be a positive number of packets")
    try:
        cfg = load_config(args)
        if args.check_config:
            sys.stdout.write(config.dump(cfg))
            return EXIT_OK
        if args.read and args.interface:
            raise UsageError("-r and -i are exclusive: read files or capture live")
        if args.read:
            return run_offline(args, cfg)
        if args.interface or cfg.capture.interface:
            from streamtap.process.live import run_live

            return run_live(args, cfg, load_config=lambda: load_config(args))
        raise UsageError("nothing to do: give -r FILE or -i IFACE (see --help)")
    except (UsageError, ConfigError) as e:
        print(f"streamtap: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # `streamtap -r x | head`: the reader left; that is not an error
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        except OSError:
            pass
        return EXIT_OK
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
