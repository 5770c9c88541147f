"""A NOTIFY_SOCKET as systemd binds it, for the live tests: datagrams with the sender's
credentials, read continuously on a thread (a fresh netns has net.unix.max_dgram_qlen = 10, and
a full queue would block the daemon's sd_notify, which libsystemd sends blocking)."""

from __future__ import annotations

import os
import socket
import struct
import threading
from pathlib import Path


class NotifySocket:
    def __init__(self, path: str | Path, mode: int | None = None) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        if mode is not None:
            os.chmod(self.path, mode)
        self.sock.settimeout(0.1)
        self.msgs: list[tuple[int, str]] = []   # (sender pid, message)
        self.datagrams: list[str] = []          # whole datagrams: which lines travelled together
        self._stop = False
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data, anc, _f, _a = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            pid = -1
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("=iII", cdata[:12])[0]
            self.datagrams.append(data.decode())
            for line in data.decode().splitlines():
                self.msgs.append((pid, line))

    def lines(self) -> list[str]:
        return [m for _p, m in self.msgs]

    def ready_datagram(self) -> str | None:
        """The first datagram carrying READY=1, whole."""
        return next((d for d in self.datagrams if "READY=1" in d.splitlines()), None)

    def close(self) -> None:
        self._stop = True
        self._t.join(2)
        self.sock.close()
