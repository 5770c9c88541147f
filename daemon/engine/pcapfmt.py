"""Capture formats as libpcap presents them, in one place: the pcap and pcapng file magics and
block types, the batch meta record of `next_batch`, the LINKTYPE (file) <-> DLT (libpcap API)
tables, and the errors of reading a capture. The readers (`reader`, `pcapng`), the flow table,
the worker and the pcap sink all take these from here.
"""

from __future__ import annotations

import struct

from streamtap.errors import Error

__all__ = ["CaptureError", "FilterError"]

# --- pcap (https://www.tcpdump.org/manpages/pcap-savefile.5.html)
PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
PCAP_MAGICS = frozenset((PCAP_MAGIC_US, PCAP_MAGIC_NS))
PCAP_FILE_HEADER_LEN = 24
PCAP_RECORD_HEADER_LEN = 16
MAX_SNAPLEN = 262144  # libpcap's MAXIMUM_SNAPLEN: bigger caplens are rejected

# --- pcapng (draft-ietf-opsawg-pcapng)
PCAPNG_SHB = 0x0A0D0D0A  # same in both byte orders
PCAPNG_IDB = 0x00000001
PCAPNG_PB = 0x00000002  # obsolete Packet Block
PCAPNG_SPB = 0x00000003
PCAPNG_EPB = 0x00000006
PCAPNG_PACKET_BLOCKS = frozenset((PCAPNG_PB, PCAPNG_SPB, PCAPNG_EPB))
PCAPNG_BYTE_ORDER_MAGIC = 0x1A2B3C4D
PCAPNG_BYTE_ORDER_SWAPPED = 0x4D3C2B1A  # the byte-order magic read in the other byte order
PCAPNG_MIN_BLOCK = 12

# --- the batch meta record: pcapy's next_batch packs one per packet, native order,
# (sec, usec, offset into the batch's data, caplen); there is no wire length.
META = struct.Struct("=IIII")
META_LEN = META.size

# --- link types. A file header holds a LINKTYPE value, libpcap's API reports a DLT value; they
# are the same number except for these (libpcap pcap-common.c, tcpdump.org/linktypes.html).
LINKTYPE_TO_DLT = {
    100: 11,  # LINKTYPE_ATM_RFC1483 -> DLT_ATM_RFC1483
    101: 12,  # LINKTYPE_RAW -> DLT_RAW (Linux, most BSDs)
    102: 15,  # LINKTYPE_SLIP_BSDOS -> DLT_SLIP_BSDOS
    103: 16,  # LINKTYPE_PPP_BSDOS -> DLT_PPP_BSDOS
    106: 19,  # LINKTYPE_ATM_CLIP -> DLT_ATM_CLIP (Linux)
}
DLT_TO_LINKTYPE = {dlt: lt for lt, dlt in LINKTYPE_TO_DLT.items()}
DLT_TO_LINKTYPE[14] = 101  # DLT_RAW (OpenBSD) -> LINKTYPE_RAW


def linktype_to_dlt(linktype: int) -> int:
    """The DLT value libpcap reports for a file's LINKTYPE value."""
    return LINKTYPE_TO_DLT.get(linktype, linktype)


def dlt_to_linktype(dlt: int) -> int:
    """The LINKTYPE value for a file header from the DLT value pcapy reports."""
    return DLT_TO_LINKTYPE.get(dlt, dlt)


class CaptureError(Error):
    """A capture cannot be opened or is damaged. One-line message naming the file and, when
    known, the byte offset of the damage (`offset`, else None)."""

    def __init__(self, message: str, path: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset


class FilterError(Error, ValueError):
    """A BPF expression libpcap refuses; the message is libpcap's."""
