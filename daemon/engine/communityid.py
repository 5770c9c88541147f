"""Community ID v1 flow hashing (https://github.com/corelight/community-id-spec).

The hash input is, all in network byte order::

    seed (2 bytes) . addr_a (4|16) . addr_b (4|16) . proto (1) . 0 (1 byte padding)
    . port_a (2) . port_b (2)

where (addr_a, port_a) is the numerically smaller of the two endpoints (compared by address
bytes, then port), so both directions of a flow hash alike. The id is ``"1:"`` followed by the
base64 of the 20-byte SHA-1 digest.

Only port-based protocols (TCP, UDP, SCTP) are covered: streamtap never needs the ICMP mapping.
"""

from __future__ import annotations

import binascii
import hashlib
import socket
import struct

__all__ = ["community_id", "community_id_packed", "pack_ip"]

_SEED = struct.Struct("!H")
_TAIL = struct.Struct("!BxHH")


def pack_ip(ip: str) -> bytes:
    """The address in network byte order: 4 bytes for IPv4, 16 for IPv6 (ValueError if bad)."""
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    except (OSError, TypeError):
        raise ValueError(f"not an IP address: {ip!r}") from None


def community_id(
    src_ip: str,
    src_port: int,
    dst_ip: str,
    dst_port: int,
    proto: int = 6,
    seed: int = 0,
) -> str:
    """Community ID v1 of a flow, e.g. ``"1:LQU9qZlK+B5F3KDmev6m5PMibrg="``.

    Symmetric: swapping source and destination gives the same id. `seed` is 0..65535,
    `proto` the IP protocol number (6 = TCP), ports 0..65535. Raises ValueError on a bad
    address, port, protocol or seed, or on mixed address families.
    """
    a = pack_ip(src_ip)
    b = pack_ip(dst_ip)
    if len(a) != len(b):
        raise ValueError(f"mixed address families: {src_ip!r} and {dst_ip!r}")
    return community_id_packed(a, src_port, b, dst_port, proto, seed)


def community_id_packed(
    a: bytes, a_port: int, b: bytes, b_port: int, proto: int = 6, seed: int = 0
) -> str:
    """`community_id` of addresses already packed by `pack_ip` (the record packs each address
    once for both the stream id and this). Both must be of one family."""
    if (b, b_port) < (a, a_port):
        a, b = b, a
        a_port, b_port = b_port, a_port
    try:
        head = _SEED.pack(seed)
        tail = _TAIL.pack(proto, a_port, b_port)
    except struct.error as exc:
        raise ValueError(f"seed, proto or port out of range: {exc}") from None
    digest = hashlib.sha1(b"".join((head, a, b, tail)), usedforsecurity=False).digest()
    return "1:" + binascii.b2a_base64(digest, newline=False).decode("ascii")
