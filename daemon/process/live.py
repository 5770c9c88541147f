"""`streamtap -i IFACE`: the live daemon (logging, sinks, control server, supervisor).

Exit codes: 0 stopped (SIGTERM/SIGINT, or -c COUNT reached), 1 runtime failure (capture cannot
open: missing interface, no permission), 2 bad filter or config. A sink that cannot open does
not stop the daemon: its runner retries with backoff and spools the records meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Callable

from streamtap.config import Config, paths
from streamtap.process import logs
from streamtap.process.control import ControlServer, Limits
from streamtap.process.notify import Notifier
from streamtap.process.procs import start_forkserver
from streamtap.process.supervisor import Supervisor, worker_count
from streamtap.sinks.registry import build_sinks
from streamtap.sinks.runner import RunnerSink

log = logging.getLogger("streamtap.process.live")


def control_socket_path(args: argparse.Namespace, cfg: Config, interface: str) -> str:
    """--control-socket, else control.socket, else <runtime>/<iface>.sock."""
    return (getattr(args, "control_socket", None) or cfg.control.socket
            or paths.control_socket(interface))


def start_control(path: str, cfg: Config, sup: Supervisor) -> ControlServer | None:
    """The control API, or None (logged) when it cannot start: capture matters more."""
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        server = ControlServer(path, listen=cfg.control.listen,
                               ingest_dirs=cfg.control.ingest_dirs, state=sup.state,
                               deliver=sup.deliver, config=lambda: sup.cfg,
                               group=cfg.control.group, limits=Limits.of(cfg.control))
        server.start()
    except Exception as e:
        log.warning("control API on %s not started: %s", path, e)
        return None
    return server


def make_daemon_sinks(cfg: Config, interface: str | None) -> list:
    """Every configured sink behind its own runner (queue, retries, disk spool under
    <state>/<iface>/spool/<sink>/), so a slow or dead sink never stalls capture."""
    sinks = build_sinks(cfg, interface)  # named apart (sink_names): one spool each
    timeout = max(1.0, cfg.capture.shutdown_timeout / 2)
    root = os.path.join(paths.state_dir(), interface or "offline", "spool")
    return [RunnerSink(s, spool_dir=os.path.join(root, s.name), stop_timeout=timeout)
            for s in sinks]


def run_live(args: argparse.Namespace, cfg: Config, *,
             load_config: Callable[[], Config]) -> int:
    """`load_config` re-reads the configuration on SIGHUP: it comes from the command line,
    which sits above this layer, and is passed down."""
    # first, while this process has a single thread: workers are forked from the forkserver,
    # never from the supervisor once sink runners and the control server run (procs.py)
    if worker_count(cfg) > 1:
        start_forkserver()

    def daemon_sinks(c: Config) -> list:
        return make_daemon_sinks(c, interface)

    interface: str = getattr(args, "interface", None) or cfg.capture.interface or ""
    logs.setup(cfg, verbose=getattr(args, "verbose", 0), quiet=getattr(args, "quiet", False),
               interface=interface)
    sinks = daemon_sinks(cfg)
    for s in sinks:
        s.open()  # starts the sink's runner thread; the sink itself opens lazily
    sup = Supervisor(cfg, sinks=sinks, interface=interface, count=getattr(args, "count", None),
                     verbose=getattr(args, "verbose", 0), quiet=getattr(args, "quiet", False),
                     notifier=Notifier(), load_config=load_config, make_sinks=daemon_sinks)
    control = start_control(control_socket_path(args, cfg, interface), cfg, sup)
    try:
        return sup.run()
    finally:
        if control is not None:
            with contextlib.suppress(Exception):
                control.stop()
