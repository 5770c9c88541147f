"""Community ID v1 against published test vectors."""

from __future__ import annotations

import pytest

from streamtap.engine.communityid import community_id

# Vectors from the spec's reference data, corelight/community-id-spec, files
# baseline/baseline_deflt.json (seed 0) and baseline/baseline_seed1.json (seed 1), computed there
# by the reference implementation over the repo's pcaps/tcp.pcap, ipv6.pcap, udp.pcap and
# sctp.pcap. Each flow is listed once; the baseline also lists the reverse direction, which the
# symmetry test covers.
# (saddr, sport, daddr, dport, proto, seed, expected)
BASELINE = [
    # TCP over IPv4 (tcp.pcap)
    ("128.232.110.120", 34855, "66.35.250.204", 80, 6, 0, "1:LQU9qZlK+B5F3KDmev6m5PMibrg="),
    ("128.232.110.120", 34855, "66.35.250.204", 80, 6, 1, "1:3V71V58M3Ksw/yuFALMcW0LAHvc="),
    # TCP over IPv6 (ipv6.pcap)
    (
        "2001:470:e5bf:dead:4957:2174:e82c:4887",
        63943,
        "2607:f8b0:400c:c03::1a",
        25,
        6,
        0,
        "1:/qFaeAR+gFe1KYjMzVDsMv+wgU4=",
    ),
    (
        "2001:470:e5bf:dead:4957:2174:e82c:4887",
        63943,
        "2607:f8b0:400c:c03::1a",
        25,
        6,
        1,
        "1:eJYTW6AOzFLlSUoESovMjnu7rMw=",
    ),
    # UDP (udp.pcap)
    ("192.168.1.52", 54585, "8.8.8.8", 53, 17, 0, "1:d/FP5EW3wiY1vCndhwleRRKHowQ="),
    ("192.168.1.52", 54585, "8.8.8.8", 53, 17, 1, "1:Q9We8WO3piVF8yEQBNJF4uiSVrI="),
    # SCTP with equal ports (sctp.pcap): the ordering falls to the addresses
    ("192.168.170.8", 7, "192.168.170.56", 7, 132, 0, "1:MP2EtRCAUIZvTw6MxJHLV7N7JDs="),
    ("192.168.170.8", 7, "192.168.170.56", 7, 132, 1, "1:5w3ZRjeKBzqT3zsaEECDGjUbYeg="),
]

# The 1.2.3.4:1122 -> 5.6.7.8:3344 TCP example that many implementations test against (Zeek's
# community_id_v1 btest, Vector's VRL community_id docs, the Rust and Go ports).
COMMON_EXAMPLE = ("1.2.3.4", 1122, "5.6.7.8", 3344, 6, 0, "1:wCb3OG7yAFWelaUydu0D+125CLM=")

VECTORS = [*BASELINE, COMMON_EXAMPLE]


@pytest.mark.parametrize(("saddr", "sport", "daddr", "dport", "proto", "seed", "expected"), VECTORS)
def test_published_vectors(
    saddr: str, sport: int, daddr: str, dport: int, proto: int, seed: int, expected: str
) -> None:
    assert community_id(saddr, sport, daddr, dport, proto=proto, seed=seed) == expected


@pytest.mark.parametrize(("saddr", "sport", "daddr", "dport", "proto", "seed", "expected"), VECTORS)
def test_symmetric(
    saddr: str, sport: int, daddr: str, dport: int, proto: int, seed: int, expected: str
) -> None:
    assert community_id(daddr, dport, saddr, sport, proto=proto, seed=seed) == expected


def test_defaults_are_tcp_seed_0() -> None:
    assert community_id("128.232.110.120", 34855, "66.35.250.204", 80) == (
        "1:LQU9qZlK+B5F3KDmev6m5PMibrg="
    )


def test_same_address_ordered_by_port() -> None:
    a = community_id("10.0.0.1", 1234, "10.0.0.1", 80)
    assert a == community_id("10.0.0.1", 80, "10.0.0.1", 1234)
    assert a != community_id("10.0.0.1", 1234, "10.0.0.1", 81)


def test_address_spelling_does_not_matter() -> None:
    assert community_id("::1", 1, "2001:db8::2", 2) == community_id(
        "0:0:0:0:0:0:0:1", 1, "2001:0db8:0:0:0:0:0:2", 2
    )


def test_seed_changes_id() -> None:
    assert community_id("1.2.3.4", 1, "5.6.7.8", 2, seed=0) != community_id(
        "1.2.3.4", 1, "5.6.7.8", 2, seed=65535
    )


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("1.2.3.4", 1, "::1", 2), {}),  # mixed families
        (("1.2.3.400", 1, "5.6.7.8", 2), {}),  # bad address
        (("1.2.3.4", 70000, "5.6.7.8", 2), {}),  # bad port
        (("1.2.3.4", 1, "5.6.7.8", 2), {"seed": 65536}),
        (("1.2.3.4", 1, "5.6.7.8", 2), {"proto": 256}),
    ],
)
def test_rejects_bad_input(args: tuple, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        community_id(*args, **kwargs)
