"""Daemon logging: journald under systemd, stderr otherwise.

Under systemd (``$JOURNAL_STREAM`` names the device:inode of our stderr, see systemd.exec(5))
records go to the journal through ``systemd.journal.JournalHandler`` with
``SYSLOG_IDENTIFIER=streamtap`` and ``STREAMTAP_INTERFACE``; a record logged with
``extra=fields(worker=i)`` also carries ``STREAMTAP_WORKER``. Elsewhere: one plain line per record
on stderr (or JSON with ``logging.format: json``).

Everything logs below the ``streamtap`` logger; :func:`setup` configures only that logger.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

from systemd.journal import JournalHandler

from streamtap.config import Config

LOGGER = "streamtap"
PLAIN_FORMAT = "streamtap[%(process)d]: %(levelname)s: %(message)s"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}

_interface: str | None = None


def fields(worker: int | None = None, **more: Any) -> dict[str, Any]:
    """The ``extra=`` of a record: journal fields (upper case, STREAMTAP_ prefix)."""
    out: dict[str, Any] = {}
    if _interface:
        out["STREAMTAP_INTERFACE"] = _interface
    if worker is not None:
        out["STREAMTAP_WORKER"] = worker
    for k, v in more.items():
        out["STREAMTAP_" + k.upper()] = v
    return out


def journal_stderr(env: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """True when stderr is the journal stream systemd gave us (not merely inherited env)."""
    env = os.environ if env is None else env
    value = env.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k.startswith("STREAMTAP_"):
                out[k[10:].lower()] = v
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def level_for(cfg: Config, verbose: int = 0, quiet: bool = False) -> int:
    if verbose:
        return logging.DEBUG
    if quiet:
        return logging.WARNING
    return LEVELS.get(cfg.logging.level, logging.INFO)


def setup(
    cfg: Config,
    *,
    verbose: int = 0,
    quiet: bool = False,
    interface: str | None = None,
    stream: IO[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> logging.Logger:
    """(Re)configure the ``streamtap`` logger; returns it. Idempotent: old handlers go."""
    global _interface
    _interface = interface
    log = logging.getLogger(LOGGER)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    handler: logging.Handler | None = None
    if stream is None and journal_stderr(env):
        kw = {"SYSLOG_IDENTIFIER": "streamtap"}
        if interface:
            kw["STREAMTAP_INTERFACE"] = interface
        handler = JournalHandler(**kw)
        handler.setFormatter(logging.Formatter("%(message)s"))
    if handler is None:
        handler = logging.StreamHandler(stream or sys.stderr)
        fmt = cfg.logging.format
        handler.setFormatter(JsonFormatter() if fmt == "json" else
                             logging.Formatter(PLAIN_FORMAT))
    log.addHandler(handler)
    log.setLevel(level_for(cfg, verbose, quiet))
    log.propagate = False
    return log


def set_level(cfg: Config, verbose: int = 0, quiet: bool = False) -> None:
    """After a reload: the new ``logging.level`` (CLI -v/-q still win)."""
    logging.getLogger(LOGGER).setLevel(level_for(cfg, verbose, quiet))
