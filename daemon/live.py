"""`streamtap -i IFACE`: the live daemon (logging, sinks, control server, supervisor).

Exit codes: 0 stopped (SIGTERM/SIGINT, or -c COUNT reached), 1 runtime failure (capture cannot
open: missing interface, no permission), 2 bad filter or config. A sink that cannot open does
not stop the daemon: its runner retries with backoff and spools the records meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

from streamtap.config import Config, paths

from . import logs
from .notify import Notifier
from .supervisor import Supervisor

log = logging.getLogger("streamtap.live")


def control_socket_path(args: Any, cfg: Config, interface: str | None) -> str:
    """--control-socket, else control.socket, else <runtime>/<iface>.sock."""
    return (getattr(args, "control_socket", None) or cfg.control.socket
            or paths.control_socket(str(interface)))


def start_control(path: str, cfg: Any, sup: Supervisor) -> Any:
    """The control API, or None (logged) when it cannot start: capture matters more."""
    try:
        from .control import ControlServer, Limits
    except ImportError as e:
        log.warning("control API unavailable: %s", e)
        return None
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


def make_daemon_sinks(cfg: Any, interface: str | None) -> list:
    """Every configured sink behind its own runner (queue, retries, disk spool under
    <state>/<iface>/spool/<sink>/), so a slow or dead sink never stalls capture."""
    from streamtap.sinks.registry import build_sinks
    from streamtap.sinks.runner import RunnerSink

    sinks = build_sinks(cfg, interface)  # named apart (sink_names): one spool each
    timeout = max(1.0, cfg.capture.shutdown_timeout / 2)
    root = os.path.join(paths.state_dir(), interface or "offline", "spool")
    return [RunnerSink(s, spool_dir=os.path.join(root, s.name), stop_timeout=timeout)
            for s in sinks]


def run_live(args: Any, cfg: Config,
             load_config: Callable[[Any], Config] | None = None) -> int:
    """``load_config(args)`` (from the CLI, passed down) reloads the config on SIGHUP."""
    def make_sinks(c: Any) -> list:
        return make_daemon_sinks(c, interface)

    interface = getattr(args, "interface", None) or cfg.capture.interface
    logs.setup(cfg, verbose=getattr(args, "verbose", 0), quiet=getattr(args, "quiet", False),
               interface=interface)
    sinks = make_sinks(cfg)
    for s in sinks:
        s.open()  # starts the sink's runner thread; the sink itself opens lazily
    sup = Supervisor(cfg, args, sinks=sinks, interface=interface, notifier=Notifier(),
                     make_sinks=make_sinks, load_config=load_config)
    control = start_control(control_socket_path(args, cfg, interface), cfg, sup)
    try:
        return sup.run()
    finally:
        if control is not None:
            with contextlib.suppress(Exception):
                control.stop()
