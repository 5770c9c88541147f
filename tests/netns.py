"""Test helper: two network namespaces joined by a veth pair, and real TCP traffic between them.

    with VethPair() as net:                 # needs root; namespaces are always deleted
        with net.inside(net.ns_b):          # this thread now lives in ns_b (ctypes setns)
            handle = LiveHandle(net.veth_b, ...)
        srv = net.start_server()            # TCP server in ns_b (IPv4 + IPv6)
        result = net.run_client([(net.ip4_b, 1000, 2000), (net.ip6_b, 5, 0)])

Addresses are 10.x IPv4 and fd00:: IPv6 and exist only inside the namespaces. `inside()` switches
only the calling thread (setns(2)); sockets and capture handles opened there stay in that
namespace, and children forked there inherit it.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

CLONE_NEWNET = 0x40000000
PYTHON = sys.executable
_counter = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


def available() -> str | None:
    """None if namespaces can be used here, else the reason to skip."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, CAP_NET_RAW)"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "`ip netns` does not work here"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {p.stderr.strip()}")
    return p


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class VethPair:
    """Namespaces `ns_a` (veth_a, .1) and `ns_b` (veth_b, .2), created on enter, deleted on
    exit whatever happened."""

    def __init__(self, mtu: int | None = None, offload: bool = True) -> None:
        n = next(_counter)
        pid = os.getpid()
        tag = f"{pid % 100000}x{n}"
        self.ns_a = f"sttap-{tag}-a"
        self.ns_b = f"sttap-{tag}-b"
        self.veth_a = f"st{tag}a"[:15]
        self.veth_b = f"st{tag}b"[:15]
        sub = n % 250
        self.ip4_a, self.ip4_b = f"10.77.{sub}.1", f"10.77.{sub}.2"
        self.ip6_a, self.ip6_b = f"fd00:77:{sub:x}::1", f"fd00:77:{sub:x}::2"
        self.mtu = mtu
        self.offload = offload
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> VethPair:
        try:
            self._create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def _create(self) -> None:
        _ip("netns", "add", self.ns_a)
        _ip("netns", "add", self.ns_b)
        _ip("link", "add", self.veth_a, "netns", self.ns_a, "type", "veth",
            "peer", "name", self.veth_b, "netns", self.ns_b)
        for ns, dev, ip4, ip6 in (
            (self.ns_a, self.veth_a, self.ip4_a, self.ip6_a),
            (self.ns_b, self.veth_b, self.ip4_b, self.ip6_b),
        ):
            _ip("-n", ns, "addr", "add", f"{ip4}/24", "dev", dev)
            _ip("-n", ns, "-6", "addr", "add", f"{ip6}/64", "dev", dev, "nodad")
            if self.mtu:
                _ip("-n", ns, "link", "set", dev, "mtu", str(self.mtu))
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            if not self.offload:
                self.run(ns, ["ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off"],
                         check=False)

    def destroy(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        for ns in (self.ns_a, self.ns_b):
            _ip("netns", "delete", ns, check=False)

    # -- running things inside ------------------------------------------------------------

    def cmd(self, ns: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def run(self, ns: str, argv: Sequence[str], check: bool = True, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.cmd(ns, argv), check=check, timeout=timeout, **kw)

    def popen(self, ns: str, argv: Sequence[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(self.cmd(ns, argv), **kw)
        self._procs.append(p)
        return p

    def python(self, ns: str, code: str, *args: str, **kw) -> subprocess.Popen:
        return self.popen(ns, [PYTHON, "-c", code, *args], **kw)

    @contextlib.contextmanager
    def inside(self, ns: str) -> Iterator[None]:
        """Run the block with this thread in namespace `ns` (and back afterwards)."""
        orig = os.open("/proc/self/ns/net", os.O_RDONLY)
        target = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(orig)
        finally:
            os.close(target)
            os.close(orig)

    # -- TCP traffic with known hashes ----------------------------------------------------

    def start_server(self, port: int = 5000, ns: str | None = None) -> subprocess.Popen:
        """A threaded TCP server (IPv4 + IPv6) in `ns` (default ns_b); returns once listening."""
        p = self.python(ns or self.ns_b, SERVER, str(port), stdout=subprocess.PIPE, text=True)
        line = p.stdout.readline() if p.stdout else ""
        if line.strip() != "ready":
            p.kill()
            raise RuntimeError(f"server did not start: {line!r}")
        return p

    def run_client(self, conns: Sequence[tuple[str, int, int]], port: int = 5000,
                   ns: str | None = None, hold: float = 0.0, parallel: int = 4,
                   timeout: float = 60) -> list[dict]:
        """Open one connection per (server_ip, client_bytes, server_bytes); the client sends
        its bytes (the first 8 say how many the server returns), half-closes, reads the reply.
        Returns per connection {"ip", "port" (client port), "sent", "recv" (SHA-256 hex),
        "sent_len", "recv_len"}. `hold` keeps each connection open that long before closing."""
        spec = json.dumps({"conns": conns, "port": port, "hold": hold, "parallel": parallel})
        p = self.run(ns or self.ns_a, [PYTHON, "-c", CLIENT, spec], timeout=timeout)
        return json.loads(p.stdout)

    def client_popen(self, conns: Sequence[tuple[str, int, int]], port: int = 5000,
                     ns: str | None = None, hold: float = 0.0, parallel: int = 4
                     ) -> subprocess.Popen:
        """`run_client` in the background: read its JSON from stdout when it ends."""
        spec = json.dumps({"conns": conns, "port": port, "hold": hold, "parallel": parallel})
        return self.python(ns or self.ns_a, CLIENT, spec, stdout=subprocess.PIPE, text=True)


def wait_for(pred, timeout: float, every: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(every)
    return pred()


SERVER = r"""
import os, socket, sys, threading
port = int(sys.argv[1])
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", port)); s.listen(256)
def serve(c):
    with c:
        buf = bytearray()
        while True:
            d = c.recv(1 << 20)
            if not d:
                break
            buf += d
        n = int.from_bytes(bytes(buf[:8]).ljust(8, b"\0"), "big")
        out = os.urandom(n)
        c.sendall(out)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

CLIENT = r"""
import hashlib, json, os, socket, sys, time
from concurrent.futures import ThreadPoolExecutor
spec = json.loads(sys.argv[1])
def one(c):
    ip, nsend, nrecv = c
    fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
    payload = nrecv.to_bytes(8, "big") + os.urandom(max(0, nsend - 8))
    payload = payload[:max(nsend, 8)]
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect((ip, spec["port"]))
    s.sendall(payload)
    if spec["hold"]:
        time.sleep(spec["hold"])
    s.shutdown(socket.SHUT_WR)
    got = bytearray()
    while True:
        d = s.recv(1 << 20)
        if not d:
            break
        got += d
    port = s.getsockname()[1]
    s.close()
    return {"ip": ip, "port": port, "sent": hashlib.sha256(payload).hexdigest(),
            "recv": hashlib.sha256(got).hexdigest(), "sent_len": len(payload),
            "recv_len": len(got)}
with ThreadPoolExecutor(spec["parallel"]) as ex:
    out = list(ex.map(one, spec["conns"]))
print(json.dumps(out))
"""
