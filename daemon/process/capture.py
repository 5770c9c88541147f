"""Live capture: one libpcap handle per worker, polled with a tick so nothing ever hangs.

Measured pcapy facts this module is built on (DESIGN "Capture"):

- Blocking `next()` / `next_batch()` on a live handle never return on an idle link, whatever
  `set_timeout` says. So the handle is put in nonblocking mode (`setnonblock(1)`), `wait()` polls
  `getfd()` with a timeout (the worker's 100 ms tick, G1-style), and `drain()` reads with
  `next_batch(n)`. On a nonblocking handle with nothing pending, `next_batch()` returns
  `(b"", b"")` at once (measured: ~60 µs), which is how `drain()` knows the ring is empty.
- `next_batch(n)` returns `(data, meta)`: the packets' bytes concatenated and 16-byte native
  `=IIII` records `(sec, usec, offset, caplen)`, µs precision, no wire length.
- `activate()` does not raise: it returns libpcap's status code (negative = error, e.g. -5
  PCAP_ERROR_NO_SUCH_DEVICE, -8 PCAP_ERROR_PERM_DENIED; positive = warning). We turn the codes
  into `CaptureOpenError` with an explanation. A bad BPF expression raises `pcapy.PcapError`
  with libpcap's text ("can't parse filter expression: syntax error").
- Sharding: `set_fanout(group, PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_DEFRAG)` after
  `activate()`. The kernel's software flow hash is symmetric, so both directions of a connection
  land on the same handle. With hardware RSS (the NIC's hash, used when the driver provides
  one) symmetry depends on the NIC's RSS key: an asymmetric key splits a connection across
  workers. Use a symmetric key (`ethtool -X IFACE hkey 6d:5a:...` repeated) on such NICs.
- `stats()` gives `(recv, drop, ifdrop)` per handle, counted since `activate()`.
"""

from __future__ import annotations

import select
import zlib
from collections.abc import Iterator

import pcapy

from streamtap.errors import EXIT_CAPTURE_LOST, EXIT_RUNTIME, EXIT_USAGE, Error

# linux/if_packet.h
PACKET_FANOUT_HASH = pcapy.PACKET_FANOUT_HASH
PACKET_FANOUT_FLAG_DEFRAG = 0x8000  # reassemble IP fragments before hashing

# pcap/pcap.h: pcap_activate() status codes
PCAP_ERROR = -1
PCAP_ERROR_NO_SUCH_DEVICE = -5
PCAP_ERROR_PERM_DENIED = -8
PCAP_ERROR_IFACE_NOT_UP = -9
PCAP_ERROR_PROMISC_PERM_DENIED = -11
PCAP_WARNING_PROMISC_NOTSUP = 2

_ACTIVATE_ERRORS = {
    -1: "generic error",
    -2: "loop terminated",
    -3: "capture not activated",
    -4: "capture already activated",
    -5: "no such device",
    -6: "monitor mode not supported",
    -7: "not in monitor mode",
    -8: "permission denied",
    -9: "interface is not up",
    -10: "cannot set the time stamp type",
    -11: "permission denied for promiscuous mode",
    -12: "time stamp precision not supported",
}

# exit codes of a capture failure (streamtap.errors): cannot open the interface (missing, no
# permission, down); the BPF expression does not compile; failed after it started.
EXIT_OPEN, EXIT_FILTER, EXIT_LOST = EXIT_RUNTIME, EXIT_USAGE, EXIT_CAPTURE_LOST

_GRANT = (
    "capturing needs CAP_NET_RAW: run as root, or grant the capability to the interpreter "
    "(setcap cap_net_raw+eip $(readlink -f $(which python3))), or under systemd "
    "set AmbientCapabilities=CAP_NET_RAW in the unit"
)


class CaptureOpenError(Error):
    """The capture cannot start. `exit_code` 1: interface missing/down or no permission;
    2: the BPF expression does not compile (the message is libpcap's)."""

    def __init__(self, message: str, exit_code: int = EXIT_OPEN) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __reduce__(self):  # survive pickling across worker pipes
        return (type(self), (self.message, self.exit_code))


class CaptureLost(CaptureOpenError):
    """A running capture failed (libpcap: "The interface went down", the interface was deleted):
    `exit_code` 3. Unlike 1 and 2 this happens after a good start, so respawning may help."""

    def __init__(self, message: str, exit_code: int = EXIT_LOST) -> None:
        super().__init__(message, exit_code)


def fanout_group_id(interface: str) -> int:
    """A stable 16-bit PACKET_FANOUT group id from the interface name, so two daemons on
    different interfaces do not join each other's group (CRC-32, low 16 bits)."""
    return zlib.crc32(interface.encode()) & 0xFFFF


def _activate_error(interface: str, code: int) -> CaptureOpenError:
    what = _ACTIVATE_ERRORS.get(code, "unknown error")
    if code == PCAP_ERROR_NO_SUCH_DEVICE:
        names = []
        try:
            names = pcapy.findalldevs()
        except pcapy.PcapError:
            pass
        avail = f" (available: {', '.join(names)})" if names else ""
        return CaptureOpenError(f"interface {interface!r}: no such device{avail}")
    if code in (PCAP_ERROR_PERM_DENIED, PCAP_ERROR_PROMISC_PERM_DENIED):
        return CaptureOpenError(f"interface {interface!r}: {what}; {_GRANT}")
    if code == PCAP_ERROR_IFACE_NOT_UP:
        return CaptureOpenError(f"interface {interface!r}: {what} (ip link set {interface} up)")
    if code == PCAP_ERROR:
        # pcapy exposes no pcap_geterr(): open_live reports libpcap's text for the same failure
        try:
            pcapy.open_live(interface, 96, 0, 0).close()
        except pcapy.PcapError as exc:
            return CaptureOpenError(f"interface {interface!r}: {exc}")
        except Exception:
            pass
    return CaptureOpenError(f"interface {interface!r}: cannot capture: {what} ({code})")


class LiveHandle:
    """One activated, nonblocking libpcap handle, optionally in a PACKET_FANOUT group."""

    def __init__(
        self,
        interface: str,
        *,
        snaplen: int,
        buffer_size: int,
        promiscuous: bool,
        bpf: str | None,
        fanout_group: int | None,
    ) -> None:
        self.interface = interface
        self.fanout_group = fanout_group
        try:
            h = pcapy.create(interface)
        except pcapy.PcapError as exc:
            raise CaptureOpenError(f"interface {interface!r}: {exc}") from None
        h.set_snaplen(snaplen)
        h.set_promisc(1 if promiscuous else 0)
        if buffer_size:
            h.set_buffer_size(buffer_size)
        h.set_timeout(100)  # ms; irrelevant in nonblocking mode, but keeps TPACKET_V3 blocks short
        code = h.activate()
        if code < 0:
            try:
                h.close()
            except Exception:
                pass
            raise _activate_error(interface, code)
        promisc_off = code == PCAP_WARNING_PROMISC_NOTSUP
        self.warning = "promiscuous mode not supported" if promisc_off else None
        self._h = h
        try:
            if fanout_group is not None:
                try:
                    h.set_fanout(fanout_group, PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_DEFRAG)
                except pcapy.PcapError as exc:
                    raise CaptureOpenError(
                        f"interface {interface!r}: cannot join fanout group {fanout_group}: {exc}"
                    ) from None
            self.set_filter(bpf)
            h.setnonblock(1)
            self.linktype: int = h.datalink()
            self._fd = h.getfd()
            self._poll = select.poll()
            self._poll.register(self._fd, select.POLLIN | select.POLLERR)
        except BaseException:
            self.close()
            raise

    def fileno(self) -> int:
        return self._fd

    def wait(self, timeout: float) -> bool:
        """True when packets (or an error) are pending; False after `timeout` seconds idle."""
        try:
            return bool(self._poll.poll(max(0, int(timeout * 1000))))
        except InterruptedError:  # a signal: let the caller's tick run
            return False

    def drain(self, n: int = 4096, max_batches: int = 64) -> Iterator[tuple[bytes, bytes]]:
        """Yield `(data, meta)` batches until the ring is empty, at most `max_batches` per call
        so the caller's tick (timers, control messages) keeps running under load. Raises
        `CaptureLost` if the capture fails (the interface went down or away)."""
        nb = self._h.next_batch
        full = 16 * n
        for _ in range(max_batches):
            try:
                data, meta = nb(n)
            except pcapy.PcapError as exc:
                raise CaptureLost(f"interface {self.interface!r}: capture failed: {exc}") from None
            if not meta:
                return
            yield data, meta
            if len(meta) < full:  # short batch: ring drained for now; the next wait() tells
                return

    def set_filter(self, bpf: str | None) -> None:
        """Install a BPF expression ("" or None = everything). On a compile error the old filter
        stays and `CaptureOpenError(exit_code=2)` carries libpcap's message."""
        try:
            self._h.setfilter(bpf or "")
        except pcapy.PcapError as exc:
            raise CaptureOpenError(f"bad filter {bpf!r}: {exc}", EXIT_FILTER) from None

    def stats(self) -> tuple[int, int, int]:
        """(packets received, dropped by the kernel for lack of buffer, dropped by the
        interface), libpcap's pcap_stats()."""
        recv, drop, ifdrop = self._h.stats()
        return recv, drop, ifdrop

    def close(self) -> None:
        h = self.__dict__.pop("_h", None)
        if h is not None:
            try:
                h.close()
            except Exception:
                pass

    def __enter__(self) -> LiveHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
