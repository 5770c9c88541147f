"""sd_notify(3) from the supervisor's pid (DESIGN "Pinned details": no NotifyAccess=all needed).

A thin wrapper over ``systemd.daemon.notify``, which is itself a no-op returning False when
``$NOTIFY_SOCKET`` is unset (G4). The wrapper adds three things:

* it sends only from the pid that created it, so a forked worker can never speak for the unit;
* ``WATCHDOG_USEC`` / ``WATCHDOG_PID`` are read once: :attr:`Notifier.watchdog_interval` is half
  the watchdog period (systemd's advice), None when the unit has no watchdog or it is meant for
  another pid;
* ``reloading()`` carries ``MONOTONIC_USEC`` as Type=notify-reload requires;
* ``ready(status)`` sends ``READY=1`` and ``STATUS=`` in one datagram, so ``systemctl status``
  shows what the daemon does from the moment it is up, not after the first periodic STATUS.

The send function is injectable, so the supervisor's sequencing is testable without systemd.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

from systemd import daemon


def _sd_notify(state: str) -> bool:
    for _ in range(3):  # the C call returns EINTR to us when a signal lands mid-sendmsg
        try:
            return bool(daemon.notify(state))
        except InterruptedError:
            continue
        except OSError:  # socket gone or full: systemd will notice, capture must go on
            return False
    return False


class Notifier:
    """sd_notify messages of one daemon. Every method returns whether a message was sent."""

    def __init__(
        self,
        send: Callable[[str], bool] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if env is None else env
        self._send = send or _sd_notify
        self.pid = os.getpid()
        # without an injected sender, nothing can be delivered off systemd: stay quiet
        self.enabled = send is not None or bool(env.get("NOTIFY_SOCKET"))
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        wpid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not wpid or wpid == str(self.pid)):
            self.watchdog_interval = int(usec) / 2e6
        self.sent: list[str] = []  # the last few messages, for debugging and tests
        self.is_ready = False

    def notify(self, state: str) -> bool:
        if not self.enabled or os.getpid() != self.pid:
            return False
        self.sent.append(state)
        del self.sent[:-32]
        return bool(self._send(state))

    def ready(self, status: str | None = None) -> bool:
        self.is_ready = True
        if status:
            return self.notify("READY=1\nSTATUS=" + status.replace("\n", " "))
        return self.notify("READY=1")

    def reloading(self) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        return self.notify("STATUS=" + text.replace("\n", " "))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")
