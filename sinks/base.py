"""The sink contract (Fluent Bit's F1/F2 habits): a sink encodes and delivers; the runner owns
batching, retries, backoff and the disk spool, so a sink never sleeps or loops.

A sink module exposes a class implementing `Sink`, registered by type name (built-ins in
`streamtap.sinks.registry`, third-party ones through the entry-point group "streamtap.sinks").
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from streamtap.config.schema import check_options
from streamtap.engine.stream import Stream
from streamtap.errors import Error

OK = "ok"
RETRY = "retry"
FATAL = "fatal"


class SinkError(Error):
    """A sink cannot open or write for a reason it can state: the server's answer (HTTP 401),
    a refused configuration. Its text is the answer, without the sink's name (callers add it)
    and without credentials.

    Transport and file-system failures stay `OSError`. The offline CLI turns either into one
    line and exit 1 (`streamtap: sink NAME: ANSWER`); the daemon's runner logs one line and
    retries (open) or counts the batch failed (write)."""


def describe_error(exc: BaseException) -> str:
    """The one-line answer of a sink failure: `PATH: strerror` for a file-system error (what
    the OS said, e.g. `/x/out.jsonl: No such file or directory`), the text of a `SinkError` or
    other `OSError`, and `Type: text` for anything else (a bug: the type helps)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    text = " ".join(str(exc).split())
    if isinstance(exc, SinkError | OSError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(frozen=True)
class Result:
    """What `Sink.write` returns: every record of the batch stored (`ok`); try the whole batch
    again later (`retry`, optionally after `after` seconds); or never (`fatal`, with why).
    `errno` is the OS error behind a retry, when there is one (the runner counts ENOSPC)."""

    status: str
    after: float | None = None
    error: str | None = None
    errno: int | None = None

    @classmethod
    def ok(cls) -> Result:
        return cls(OK)

    @classmethod
    def retry(cls, after: float | None = None, error: str | None = None,
              errno: int | None = None) -> Result:
        return cls(RETRY, after, error, errno)

    @classmethod
    def fatal(cls, error: str) -> Result:
        return cls(FATAL, None, error)


class Sink:
    """Base class with no-op defaults; override what the sink needs.

    `options` are the validated config keys of the sink's entry (defaults filled in from
    `options_class`); `interface` is the capture interface (None offline); `state_dir` is where
    the sink may keep files of its own.

    The class declares its settings (`streamtap.sinks.registry` hands them to the config
    layer): `options_class`, a frozen dataclass of `streamtap.config.setting` fields (None: keys
    passed through); `options_check(options_obj, key_path)` for rules spanning several keys
    (raise `streamtap.config.ConfigError`); `spec_key`, the key `--sink TYPE:VALUE` sets;
    `needs_packets`, true when the sink needs each stream's raw packets (turns
    `reassembly.keep_packets` on).
    """

    type: str = "base"
    options_class: builtins.type | None = None
    options_check: Callable[[Any, str], None] | None = None
    spec_key: str | None = None
    needs_packets: bool = False

    def __init__(
        self, name: str, options: dict[str, Any], *, interface: str | None = None,
        state_dir: str | None = None,
    ) -> None:
        self.name = name
        self.options = options
        self.interface = interface
        self.state_dir = state_dir

    @classmethod
    def parse_options(cls, options: Mapping[str, Any] | None) -> Any:
        """`options` as an `options_class` instance, defaults filled in, checked by the same
        code as a config entry (`streamtap.config.schema.check_options`: unknown keys, types,
        enums, units, ranges, then `options_check`). For a sink constructed directly (tests,
        library users); raises `streamtap.config.ConfigError`."""
        assert cls.options_class is not None, f"{cls.__name__} declares no options_class"
        return check_options(cls.options_class, options, f"for sink type {cls.type}",
                             check=cls.options_check)

    def open(self) -> None:
        """Acquire resources (files, connections). May raise OSError or `SinkError` (with the
        OS's or the server's answer): offline that ends the run, the daemon's runner retries."""

    def write(self, batch: Sequence[Stream]) -> Result:
        """Deliver a batch of completed streams."""
        raise NotImplementedError

    def flush(self) -> None:
        """Make what was written durable (fsync, HTTP flush)."""

    def close(self) -> None:
        """Release resources; called once, after the last write."""

    def health(self) -> dict[str, Any]:
        """Sink-specific health details for /status (e.g. the open file, the server URL)."""
        return {}
