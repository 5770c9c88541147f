"""Write a small sample capture: `python tests/sample.py OUT.pcap` (used by `make run`).

About ten TCP connections, a few milliseconds apart, built with tests/pcapbuild.py:
HTTP over IPv4 (two), HTTP over IPv6, out-of-order segments, a retransmission, a connection
reset by the client, a refused connection (SYN -> RST/ACK), one left open at the end of the
capture, a small length-prefixed binary protocol, and an SMTP-like exchange. Well under 50 KB.

`conversations()` is importable so tests can check what the file holds.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pcapbuild import Conversation, write_pcap  # noqa: E402

T0 = 1700000000.0
GAP = 0.005  # seconds between the first packets of consecutive connections


def _http_get(host: str, path: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: streamtap-sample/1\r\n"
            "Accept: */*\r\n\r\n").encode()


def _http_response(body: bytes, ctype: str = "text/html") -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


def _binary_message(kind: int, body: bytes) -> bytes:
    """A toy protocol: 1-byte type, 2-byte big-endian length, body."""
    return struct.pack("!BH", kind, len(body)) + body


def conversations() -> list[tuple[str, Conversation]]:
    """(name, conversation) pairs, each starting GAP after the previous one."""
    out: list[tuple[str, Conversation]] = []

    def new(name: str, client: tuple[str, int], server: tuple[str, int],
            isn_c: int, isn_s: int) -> Conversation:
        c = Conversation(client, server, isn_c=isn_c, isn_s=isn_s, t0=T0 + len(out) * GAP,
                         dt=0.0004)
        out.append((name, c))
        return c

    page = b"<html><body><h1>streamtap sample</h1><p>" + b"hello " * 40 + b"</p></body></html>\n"

    c = new("http-ipv4", ("192.168.1.10", 51000), ("93.184.216.34", 80), 100, 9000)
    c.handshake().send("client", _http_get("example.com", "/")).ack("server")
    c.send("server", _http_response(page)).ack("client").close()

    c = new("http-ipv6", ("2001:db8::10", 51001), ("2001:db8::80", 80), 2000, 7000)
    c.handshake().send("client", _http_get("[2001:db8::80]", "/v6"))
    c.send("server", _http_response(b"IPv6 works\n", "text/plain")).close()

    # Server answers in three segments; the second and third arrive swapped.
    c = new("out-of-order", ("192.168.1.10", 51002), ("93.184.216.34", 80), 3000, 11000)
    resp = _http_response(b"0123456789abcdef" * 8, "text/plain")
    a, b, rest = resp[:60], resp[60:120], resp[120:]
    c.handshake().send("client", _http_get("example.com", "/ooo"))
    c.segment("server", 0, a).segment("server", 120, rest).segment("server", 60, b)
    c.ack("client").close()

    # The client's request is sent twice (its first copy's ACK was "lost").
    c = new("retransmission", ("192.168.1.11", 51003), ("93.184.216.34", 80), 4000, 12000)
    req = _http_get("example.com", "/retx")
    c.handshake().send("client", req).send("client", req, seq_offset=-len(req), dt=0.2)
    c.send("server", _http_response(b"once\n", "text/plain")).close()

    # Client sends data, gets an answer, then aborts with a RST.
    c = new("reset", ("192.168.1.12", 51004), ("10.1.1.1", 8080), 5000, 13000)
    c.handshake().send("client", b"PING\r\n").send("server", b"PONG\r\n").rst("client")

    # Nothing listens: SYN answered by RST/ACK.
    c = new("refused", ("192.168.1.12", 51005), ("10.1.1.1", 23), 6000, 0)
    c.syn().packet("server", 0, c.seq("client", 0), "RA")

    # A small binary protocol (type/length/value messages) with a clean close.
    c = new("binary", ("192.168.1.13", 40100), ("10.1.1.2", 7000), 7000, 14000)
    c.handshake()
    c.send("client", _binary_message(1, b"\x00\x01hello\xff\xfe"))
    c.send("server", _binary_message(2, bytes(range(32))))
    c.send("client", _binary_message(3, b"\x00" * 8)).send("server", _binary_message(4, b""))
    c.close()

    c = new("smtp-like", ("192.168.1.14", 51006), ("10.1.1.3", 25), 8000, 15000)
    c.handshake().send("server", b"220 mail.example ESMTP\r\n")
    c.send("client", b"EHLO sample\r\n").send("server", b"250 mail.example\r\n")
    c.send("client", b"QUIT\r\n").send("server", b"221 bye\r\n").close()

    c = new("http-ipv4-2", ("192.168.1.15", 51007), ("93.184.216.34", 80), 9000, 16000)
    c.handshake().send("client", _http_get("example.com", "/favicon.ico"))
    c.send("server", b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n").close()

    # Still open when the capture ends (streamtap flushes it with close_reason "shutdown").
    c = new("left-open", ("192.168.1.16", 51008), ("10.1.1.4", 6379), 10000, 17000)
    c.handshake().send("client", b"*1\r\n$4\r\nPING\r\n").send("server", b"+PONG\r\n")

    return out


def packets() -> list[tuple[float, bytes]]:
    """Every conversation's packets, merged by timestamp (stable: ties keep creation order)."""
    allp = [p for _, c in conversations() for p in c.packets]
    return sorted(allp, key=lambda p: p[0])


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tests/sample.py OUT.pcap", file=sys.stderr)
        return 2
    out = Path(argv[0])
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    write_pcap(out, packets())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
