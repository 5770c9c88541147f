"""Where the daemon keeps its files (DESIGN "Pinned details": Directories), in one place.

systemd hands a unit its directories in the environment (``RuntimeDirectory=`` ->
``$RUNTIME_DIRECTORY``, ``StateDirectory=`` -> ``$STATE_DIRECTORY``); outside systemd the
defaults below apply. systemd joins several entries of one setting with ':'; ours is the first.
"""

from __future__ import annotations

import os

__all__ = ["DEFAULT_RUNTIME_DIR", "DEFAULT_STATE_DIR", "control_socket", "runtime_dir",
           "state_dir"]

DEFAULT_RUNTIME_DIR = "/run/streamtap"
DEFAULT_STATE_DIR = "/var/lib/streamtap"


def _first(variable: str, default: str) -> str:
    return (os.environ.get(variable) or "").split(":")[0] or default


def runtime_dir() -> str:
    """$RUNTIME_DIRECTORY else /run/streamtap: the control sockets live here."""
    return _first("RUNTIME_DIRECTORY", DEFAULT_RUNTIME_DIR)


def state_dir() -> str:
    """$STATE_DIRECTORY else /var/lib/streamtap: the sinks' spools live here."""
    return _first("STATE_DIRECTORY", DEFAULT_STATE_DIR)


def control_socket(interface: str) -> str:
    """The default control socket of the daemon on ``interface``: ``<runtime>/<iface>.sock``."""
    return os.path.join(runtime_dir(), f"{interface}.sock")
