"""The package's error base and exit codes, in one place (imports nothing).

Every exception streamtap raises on bad input or failure derives from :class:`Error`: a
capture that cannot be read or opened, a filter that does not compile, a config key, a sink
that refuses, an unsupported link type. A notebook user catches one class:

    try:
        streams = list(streamtap.reassemble("x.pcap", bpf="tcp port 80"))
    except streamtap.Error as e:
        print(e)

This module sits below every layer (config included), so any module may import it.
"""

from __future__ import annotations

__all__ = ["EXIT_CAPTURE_LOST", "EXIT_OK", "EXIT_RUNTIME", "EXIT_USAGE", "Error"]

# Process exit codes (DESIGN "Interfaces"): the CLI, `streamtap ctl`, the daemon and its
# workers all answer with these.
EXIT_OK = 0
EXIT_RUNTIME = 1  # runtime failure: unreadable capture, missing interface, failing sink
EXIT_USAGE = 2  # usage or config error: a flag, a key, a filter that does not compile
EXIT_CAPTURE_LOST = 3  # a worker's capture failed after it started (interface gone or down)


class Error(Exception):
    """Base of every exception streamtap raises on bad input or failure."""
