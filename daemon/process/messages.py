"""Every message between a worker and the supervisor, one frozen dataclass each.

Two channels per forked worker (see :mod:`streamtap.process.procs` for why the queue is private):

- the pipe, both ways: worker → supervisor :data:`Report` (every one of them is also a
  heartbeat, G2); supervisor → worker :data:`Command`;
- the bounded stream queue, worker → supervisor only: :class:`Streams` batches, then :class:`Eof`
  once after the final flush. The two channels are independent, so :class:`Stopped` on the pipe
  may overtake the last batches on the queue; the supervisor counts a cleanly stopped worker
  whose :class:`Eof` never arrived as having lost its last streams.

They are pickled across the process boundary, so they hold plain data only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streamtap.config import Config
from streamtap.engine.stream import Stream

# --------------------------------------------------------------------------- worker → supervisor


@dataclass(frozen=True, slots=True)
class Ready:
    """The capture handle is open; the worker captures from now on."""
    index: int
    pid: int


@dataclass(frozen=True, slots=True)
class Failed:
    """The handle could not open, or a running capture failed; the worker then exits with
    `exit_code` (1 open/permission, 2 bad BPF, 3 capture lost)."""
    exit_code: int
    message: str


@dataclass(frozen=True, slots=True)
class Stats:
    """Every counter of the worker (~1 s apart): cumulative numbers and {reason: n} dicts,
    summed by :mod:`streamtap.process.counters`; ``stats["last_progress"]`` is the worker's
    last pass."""
    stats: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Reloaded:
    index: int


@dataclass(frozen=True, slots=True)
class ReloadFailed:
    index: int
    message: str


@dataclass(frozen=True, slots=True)
class Stopped:
    """Last message on the pipe: the worker flushed its open streams and will exit 0."""
    index: int


Report = Ready | Failed | Stats | Reloaded | ReloadFailed | Stopped

# --------------------------------------------------------------------------- the stream queue


@dataclass(frozen=True, slots=True)
class Streams:
    index: int
    streams: list[Stream]


@dataclass(frozen=True, slots=True)
class Eof:
    """After the final :class:`Streams` of a worker: nothing more will come from it."""
    index: int


QueueItem = Streams | Eof

# --------------------------------------------------------------------------- supervisor → worker


@dataclass(frozen=True, slots=True)
class Stop:
    """Flush every open stream (close_reason "shutdown") and exit 0."""


@dataclass(frozen=True, slots=True)
class Reload:
    """Apply the new filter and reassembly settings in place (SIGHUP); open streams stay."""
    cfg: Config


Command = Stop | Reload


def send(conn: Any, msg: Report | Command) -> bool:
    """Send on a `multiprocessing` connection; False when the other end is gone."""
    try:
        conn.send(msg)
        return True
    except (OSError, EOFError, ValueError):
        return False
