"""Differential test: streamtap's struct decoder against impacket's ImpactDecoder, on the corpus.

For every packet of every corpus capture whose link type impacket can decode, both decoders run
independently. Wherever impacket decodes the frame to IPv4/IPv6 + TCP directly (no fragment, no
tunnel: impacket does not reassemble or decapsulate), the two must agree on addresses, ports,
seq, ack, flags and captured payload length. Packets that cannot be compared are counted per
reason and printed (run with ``-s``); a disagreement not explained below fails the test.

impacket reads payloads per the IP length but keeps no notion of snaplen truncation, so the
captured payload length is the comparable quantity on both sides.
"""

from __future__ import annotations

import socket
import struct
from collections import Counter
from pathlib import Path

import pcapy
import pytest
from impacket import IP6, ImpactDecoder, ImpactPacket
from impacket.IP6_Extension_Headers import IP6_Extension_Header

from streamtap.engine.decode import Decoder

# DLT -> how impacket takes the frame: (decoder factory or None for "by IP version", bytes to
# strip first). The 4-byte BSD loopback header has no impacket decoder; stripping it is all the
# link layer there is, the IP and TCP decoding stays impacket's.
_ETH = (ImpactDecoder.EthDecoder, 0)
_SLL = (ImpactDecoder.LinuxSLLDecoder, 0)
_RAW = (None, 0)
IMPACKET_LINKS = {1: _ETH, 113: _SLL, 12: _RAW, 14: _RAW, 101: _RAW, 228: _RAW, 229: _RAW,
                  0: (None, 4), 108: (None, 4)}  # fmt: skip


def _impacket_tcp(frame: bytes, factory, strip: int):
    """(version, src, dst, sport, dport, seq, ack, flags, payload_len) or a reason string."""
    if factory is ImpactDecoder.LinuxSLLDecoder and frame[14:16] == b"\x86\xdd":
        factory, strip = None, 16  # impacket's SLL decoder knows IPv4 only: hand it IPv6 itself
    data = frame[strip:]
    if factory is None:
        if not data:
            return "impacket_not_ip"
        factory = ImpactDecoder.IPDecoder if data[0] >> 4 == 4 else ImpactDecoder.IP6Decoder
        if data[0] >> 4 not in (4, 6):
            return "impacket_not_ip"
    try:
        top = factory().decode(data)
    except Exception:
        return "impacket_error"
    if top is None:
        return "impacket_error"
    ip = top if isinstance(top, (ImpactPacket.IP, IP6.IP6)) else top.child()
    if isinstance(ip, ImpactPacket.IP):
        if ip.get_ip_p() != 6:
            return "impacket_not_tcp"
        if ip.get_ip_mf() or ip.get_ip_off() & 0x1FFF:
            return "fragment"
        version = 4
        src = socket.inet_aton(ip.get_ip_src())
        dst = socket.inet_aton(ip.get_ip_dst())
    elif isinstance(ip, IP6.IP6):
        if ip.get_next_header() == 44:
            return "fragment"
        if ip.get_payload_length() == 0:
            return "ipv6_plen_0"  # impacket reads an empty payload; we use the capture
        version = 6
        src = bytes(ip.get_ip_src().as_bytes())
        dst = bytes(ip.get_ip_dst().as_bytes())
    else:
        return "impacket_not_ip"
    tcp = ip.child()
    # IPv6 extension headers impacket knows (hop-by-hop, routing, destination options); any
    # other (fragment, AH...) leaves a Data layer: not compared.
    while isinstance(tcp, IP6_Extension_Header):
        tcp = tcp.child()
    if not isinstance(tcp, ImpactPacket.TCP):
        return "impacket_not_tcp"
    try:
        body = tcp.child()
        plen = body.get_size() if body is not None else 0
        # impacket sizes the TCP header from the options it parsed, not from the data offset:
        # after an EOL it stops, and the rest of the option space lands in its payload. Move
        # those bytes back to the header so the payload lengths stay comparable.
        misparsed = tcp.get_th_off() * 4 - tcp.get_header_size()
        return (
            version, src, dst, tcp.get_th_sport(), tcp.get_th_dport(), tcp.get_th_seq(),
            tcp.get_th_ack(), tcp.get_th_flags(), plen - max(misparsed, 0), tcp.get_th_off(),
            misparsed,
        )  # fmt: skip
    except Exception:
        return "impacket_error"


def _read(path: Path):
    """Yield (ts, frame bytes) for every packet; raises on unreadable files."""
    r = pcapy.open_offline(str(path))
    dlt = r.datalink()
    yield dlt
    while True:
        data, meta = r.next_batch(4096)
        if not meta:
            return
        for sec, usec, off, caplen in struct.iter_unpack("=IIII", meta):
            yield sec + usec * 1e-6, data[off : off + caplen]


def test_decoder_agrees_with_impacket(corpus_dir: Path):
    files = sorted((corpus_dir / "pcaps").rglob("*"))
    files = [f for f in files if f.is_file()]
    assert files, "corpus has no captures"
    excluded: Counter[str] = Counter()
    notes: Counter[str] = Counter()
    per_file: dict[str, Counter[str]] = {}
    mismatches: list[str] = []
    compared = agreed = 0
    for path in files:
        stats: Counter[str] = Counter()
        per_file[str(path.relative_to(corpus_dir))] = stats
        try:
            it = _read(path)
            dlt = next(it)
        except Exception as e:  # e.g. libpcap 1.9: pcapng with two link types
            excluded["(files) unreadable"] += 1
            stats[f"unreadable: {e}"] += 1
            continue
        if dlt not in IMPACKET_LINKS:
            excluded[f"(files) no impacket decoder for DLT {dlt}"] += 1
            continue
        factory, strip = IMPACKET_LINKS[dlt]
        ours = Decoder(dlt)
        n = 0
        # Only libpcap reading the file may raise here (a capture cut part-way); an exception
        # from our decoder is a failure of the test, like a mismatch.
        try:
            for ts, frame in it:
                n += 1
                theirs = _impacket_tcp(frame, factory, strip)
                if isinstance(theirs, str):
                    excluded[theirs] += 1
                    continue
                before = ours.malformed.copy()
                try:
                    got = ours.decode(frame, 0, len(frame), ts)
                except Exception as e:
                    mismatches.append(f"{path.name}#{n}: our decoder raised {e!r}, "
                                      f"impacket {theirs[:9]}")  # fmt: skip
                    continue
                compared += 1
                stats["compared"] += 1
                if got is None:
                    thl = theirs[9] * 4
                    reason = ",".join(ours.malformed - before) or "not counted as malformed"
                    # impacket decodes a TCP header with a data offset < 5 or longer than the
                    # datagram, we count it malformed: agreed that it is bad, not compared.
                    if thl < 20 or reason in ("tcp_header", "truncated_header"):
                        excluded["bad_tcp_header_both"] += 1
                        compared -= 1
                        stats["compared"] -= 1
                        continue
                    mismatches.append(f"{path.name}#{n}: we decoded nothing ({reason}), "
                                      f"impacket {theirs}")  # fmt: skip
                    continue
                v, src, dst, sport, dport, seq, ack, flags, _win, payload, _miss, _opts = got
                mine = (v, src, dst, sport, dport, seq, ack, flags, len(payload))
                if mine == theirs[:9]:
                    agreed += 1
                    stats["agreed"] += 1
                    if theirs[10] > 0:
                        notes["impacket_options_after_eol_adjusted"] += 1
                else:
                    mismatches.append(f"{path.name}#{n}: ours {mine} impacket {theirs[:9]}")
        except Exception as e:
            excluded["(files) read error part-way"] += 1
            stats[f"read_error: {e}"] += 1
    print(
        f"\ndifferential vs impacket: {len(files)} files, {compared} TCP packets compared, "
        f"{agreed} agreed, {len(mismatches)} mismatches"
    )
    for reason, count in sorted(excluded.items()):
        print(f"  excluded {reason}: {count}")
    for reason, count in sorted(notes.items()):
        print(f"  agreed after adjustment, {reason}: {count}")
    for name, st in sorted(per_file.items()):
        if any(k.startswith(("unreadable", "read_error")) for k in st):
            print(f"  {name}: {dict(st)}")
    assert compared > 10_000, "too few packets compared: is the corpus complete?"
    assert not mismatches, f"{len(mismatches)} mismatches:\n" + "\n".join(mismatches[:50])
    assert agreed == compared


@pytest.mark.parametrize("dlt", sorted(IMPACKET_LINKS))
def test_oracle_table_matches_decoder(dlt):
    # every link type compared here is on our fast path (the oracle is not the thing tested)
    assert Decoder(dlt)._impacket is None
