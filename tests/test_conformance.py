"""Conformance: every tshark-oracle direction of the corpus is reproduced exactly, or listed in
conformance_expected.tsv with a category from the documented policies (README "Policies").

The test fails on an unlisted difference, on a listed direction that no longer differs (the
list must shrink when streamtap improves), and on an unknown category. The corpus has no
direction of category `late-fill` (a segment captured after the ACK that covers it); a built
capture run through tshark and tcpflow stands for it.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from conformance import CATEGORIES, all_differences, load_expected
from pcapbuild import Conversation, write_pcap

import streamtap


def test_tshark_oracle_directions(corpus_dir: Path) -> None:
    total, diffs = all_differences(corpus_dir)
    expected = load_expected()
    found = {(d.file, d.stream, d.side): why for d, why in diffs}
    unlisted = {k: v for k, v in found.items() if k not in expected}
    fixed = [k for k in expected if k not in found]
    bad_cat = {k: v[0] for k, v in expected.items() if v[0] not in CATEGORIES}
    exact = total - len(found)
    print(f"\nconformance: {exact}/{total} tshark directions exact "
          f"({100.0 * exact / total:.2f}%), {len(found)} differ, all categorized: "
          f"{not unlisted}")
    assert not bad_cat, f"unknown categories: {bad_cat}"
    assert not unlisted, "differences not in conformance_expected.tsv:\n" + "\n".join(
        f"{f}\t{s}\t{side}\t{why}" for (f, s, side), why in sorted(unlisted.items()))
    assert not fixed, "listed as different but now exact (remove them):\n" + "\n".join(
        f"{f}\t{s}\t{side}" for f, s, side in sorted(fixed))
    assert total > 2400, "oracle file looks incomplete"


# -- late fill: the category no corpus direction exercises yet --------------------------------

_GAP_MARKER = re.compile(rb"\[\d+ bytes missing in capture file\]\x00")


def _tshark_follow(tshark: str, pcap: Path) -> tuple[bytes, bytes]:
    """Node 0 and node 1 bytes of `tshark -z follow,tcp,raw,0`, gap marker records removed
    (the corpus oracle's `*_gaps_skipped` form)."""
    out = subprocess.run([tshark, "-r", str(pcap), "-q", "-z", "follow,tcp,raw,0"],
                         capture_output=True, text=True, check=True).stdout
    nodes = [bytearray(), bytearray()]
    body = out.split("Node 1:", 1)[1].split("\n", 1)[1]
    for line in body.splitlines():
        if not line.strip() or line.startswith("="):
            continue
        nodes[line.startswith("\t")] += bytes.fromhex(line.strip())
    return _GAP_MARKER.sub(b"", bytes(nodes[0])), _GAP_MARKER.sub(b"", bytes(nodes[1]))


def test_late_fill_keeps_what_tshark_drops_as_tcpflow_does(oracle_tools: dict[str, str],
                                                            tmp_path: Path) -> None:
    """A client segment captured after the server's ACK that covers it: tshark 4.0 writes a gap
    marker for its range and drops it (category `late-fill`); tcpflow and streamtap keep it."""
    c = Conversation(("10.0.0.1", 40000), ("10.0.0.2", 80)).handshake()
    c.segment("client", 0, b"GET /late HTTP/1.1\r\n")
    c.segment("client", 40, b"\r\n")
    c.ack("server")                                          # acknowledges all 42 bytes
    c.segment("client", 20, b"Host: example.com\r\nX")       # the late one
    c.send("server", b"HTTP/1.1 204 No Content\r\n\r\n").close()
    pcap = tmp_path / "late.pcap"
    write_pcap(pcap, c.packets)
    (ours,) = streamtap.reassemble(pcap)
    assert ours.client_data == b"GET /late HTTP/1.1\r\nHost: example.com\r\nX\r\n"
    assert ours.gaps == []

    theirs, _ = _tshark_follow(oracle_tools["tshark"], pcap)
    assert theirs == b"GET /late HTTP/1.1\r\n\r\n"            # the late bytes are lost to tshark
    assert "late-fill" in CATEGORIES

    out = tmp_path / "tcpflow"
    out.mkdir()
    subprocess.run([oracle_tools["tcpflow"], "-r", str(pcap), "-o", str(out)],
                   capture_output=True, check=True)
    assert (out / "010.000.000.001.40000-010.000.000.002.00080").read_bytes() == ours.client_data
