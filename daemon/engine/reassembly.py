"""One direction of a TCP connection: the byte store and its TCP meaning.

Sequence numbers wrap at 2^32; they are turned into 64-bit offsets once, at the edge
(`rel_offset`, Zeek's `ToRelativeSeqSpace` habit), and everything below compares plain ints.
An offset counts sequence space from the direction's first byte (SYN excluded), so offsets
include skipped gaps; positions in `buf` do not. `gaps` maps one to the other.

The in-order append is inlined in `flowtable.FlowTable.feed` (hot path); this module holds the
rare paths: out-of-order storage, retransmissions, overlaps, gaps and limits. Every gap goes
through `skip_gap` (Zeek's one choke point) so the counters cannot drift apart, and every late
fill of a gap through `fill_gap`: a skipped hole stays fillable until the stream is emitted
(DESIGN "Late fill"), so a gap is only what is still missing then.
"""

from __future__ import annotations

from bisect import bisect_right, insort
from typing import Any

MASK32 = 0xFFFFFFFF
HALF32 = 0x80000000
UNLIMITED = 1 << 62


class Half:
    """One direction: what the sender of these packets sent, as the receiver would read it."""

    __slots__ = (
        "flow", "peer", "is_client", "ip", "port",
        "next", "off", "buf", "room", "ooo", "ooo_bytes", "gaps",
        "isn", "syn", "fin", "fin_off", "rst", "packets", "seen",
        "retrans", "overlaps", "depth_dropped", "late", "base", "pbase", "pkt0",
    )

    def __init__(self, ip: bytes, port: int, room: int) -> None:
        self.ip = ip
        self.port = port
        # Both set right after construction (flowtable.FlowTable._new_flow); typed Any because
        # the hot path dereferences them without a None check, and Flow lives in flowtable.
        self.flow: Any = None
        self.peer: Any = None
        self.is_client = False
        self.next = -1          # next expected 32-bit seq; -1 = nothing seen yet
        self.off = 0            # 64-bit offset of `next`
        self.buf = bytearray()
        self.room = room        # bytes left before the depth limit
        # sorted [offset, bytes, missing_tail] blocks, non-overlapping; and the skipped holes,
        # (offset, length, buf position). Both start as the shared empty tuple and become lists
        # when first needed: most directions never hold either (a flow costs less)
        self.ooo: Any = ()
        self.ooo_bytes = 0
        self.gaps: Any = ()
        self.isn = -1
        self.syn = False
        self.fin = False
        self.fin_off = -1
        self.rst = False
        self.packets = 0
        self.seen = 0           # bitmask of history letters already recorded
        self.retrans = 0        # bytes that repeated data already held
        self.overlaps = 0       # segments whose bytes conflicted with bytes already held
        self.depth_dropped = 0
        self.late = 0           # bytes that filled a range already skipped as a gap
        # parts (DESIGN "Parts"): `buf` holds only the current part; these say where it starts
        self.base = 0           # delivered bytes emitted in earlier parts (the part's offset)
        self.pbase = 0          # sequence-space offset where the current part starts
        self.pkt0 = 0           # packets counted in earlier parts


def rel_offset(h: Half, seq: int) -> int:
    """64-bit offset of a 32-bit seq, taking the nearer of the two wrap-around readings."""
    d = (seq - h.next) & MASK32
    return h.off + d if d < HALF32 else h.off - ((HALF32 << 1) - d)


def append(h: Half, data: bytes, table: Any) -> None:
    """Deliver in-order bytes at h.off, honouring the depth limit (Suricata's CheckDepth)."""
    n = len(data)
    if n <= h.room:
        h.buf += data
        h.room -= n
        table.mem += n
    else:
        keep = h.room
        if keep > 0:
            h.buf += data[:keep]
            table.mem += keep
        h.room = 0
        h.depth_dropped += n - keep
        table.stats["depth_dropped_bytes"] += n - keep
    h.off += n
    h.next = (h.next + n) & MASK32


def skip_gap(h: Half, length: int, table) -> None:
    """Record `length` missing bytes at h.off and move past them. The one place gaps are made."""
    if length <= 0:
        return
    pos = len(h.buf)
    if h.gaps and h.gaps[-1][0] + h.gaps[-1][1] == h.off:
        g_off, g_len, g_pos = h.gaps[-1]
        h.gaps[-1] = (g_off, g_len + length, g_pos)   # adjacent gaps merge
    elif h.gaps:
        h.gaps.append((h.off, length, pos))
    else:
        h.gaps = [(h.off, length, pos)]
    h.off += length
    h.next = (h.next + length) & MASK32
    table.letter(h, "G")


def drain(h: Half, table) -> None:
    """Deliver every stored block that has become contiguous with h.off."""
    ooo = h.ooo
    while ooo and ooo[0][0] <= h.off:
        start, data, tail = ooo.pop(0)
        h.ooo_bytes -= len(data)
        table.mem -= len(data)
        end = start + len(data)
        if end > h.off:
            append(h, data[h.off - start:], table)
        if tail and end + tail > h.off:
            skip_gap(h, end + tail - h.off, table)


def _locate(h: Half, i: int) -> tuple[int, bool, int]:
    """Where offset `i` (< h.off) lies: (index of the first gap ending after `i`, whether `i`
    is inside that gap, position in `buf` of `i` or, inside a gap, of the gap)."""
    base_off, base_pos = h.pbase, 0
    for k, (g_off, g_len, g_pos) in enumerate(h.gaps):
        if i < g_off:
            return k, False, base_pos + (i - base_off)
        if i < g_off + g_len:
            return k, True, g_pos
        base_off, base_pos = g_off + g_len, g_pos
    return len(h.gaps), False, base_pos + (i - base_off)


def fill_gap(h: Half, k: int, off: int, data: bytes, table) -> int:
    """Late fill (DESIGN "Pinned details"): put `data`, which starts at offset `off` inside gap
    `k`, in its place in `buf`; the gap shrinks or splits, and later gaps' buffer positions move
    by what was inserted. The bytes count against the depth and the memory cap like any other;
    what the depth limit refuses stays a gap and is counted. Returns the bytes filled."""
    g_off, g_len, g_pos = h.gaps[k]
    n = len(data)
    if n > h.room:
        # room == 0 also means buffer positions past the depth are no longer exact: fill nothing
        over = n - h.room
        h.depth_dropped += over
        table.stats["late_dropped_bytes"] += over
        n = h.room
        data = data[:n]
    if n <= 0:
        return 0
    h.buf[g_pos:g_pos] = data
    h.room -= n
    h.late += n
    table.mem += n
    rest = []
    if off > g_off:
        rest.append((g_off, off - g_off, g_pos))
    if off + n < g_off + g_len:
        rest.append((off + n, g_off + g_len - off - n, g_pos + n))
    gaps = h.gaps
    gaps[k:k + 1] = rest
    for j in range(k + len(rest), len(gaps)):
        j_off, j_len, j_pos = gaps[j]
        gaps[j] = (j_off, j_len, j_pos + n)
    if not gaps:
        table.unletter(h, "G")   # `G` says what is missing at emit, and nothing is
    return n


def compare_delivered(h: Half, off: int, data: bytes, policy_last: bool, table) -> None:
    """A segment (or its head) covers offsets already passed (`off` < h.off).

    Where bytes were delivered, `first` keeps them and `last` overwrites them with the new ones;
    either way a difference is counted once as an overlap, and the repeat as retransmitted.
    Where the range was skipped as a gap, the bytes are late and fill it (`fill_gap`).
    """
    end = min(off + len(data), h.off)
    differs = False
    filled = 0
    i = off
    while i < end:
        k, inside, p = _locate(h, i)
        if inside:
            g_off, g_len, _ = h.gaps[k]
            stop = min(end, g_off + g_len)
            got = fill_gap(h, k, i, data[i - off:stop - off], table)
            filled += got
            i = stop
            continue
        stop = min(end, h.gaps[k][0]) if k < len(h.gaps) else end
        h.retrans += stop - i
        have = h.buf[p:p + (stop - i)]
        new = data[i - off:i - off + len(have)]
        if have != new:
            differs = True
            if policy_last:
                h.buf[p:p + len(new)] = new
        i = stop
    if differs:
        h.overlaps += 1
    if filled:
        table.stats["late_filled_segments"] += 1
        table.stats["late_filled_bytes"] += filled


def store_ooo(h: Half, off: int, data: bytes, tail: int, policy_last: bool, table) -> None:
    """Hold a segment that starts past h.off. Storage never knows the policy (Suricata's S2):
    the policy decides which bytes to insert, then plain non-overlapping blocks are stored."""
    ooo = h.ooo
    if not ooo:
        ooo = h.ooo = []
    end = off + len(data)
    if not ooo or ooo[-1][0] + len(ooo[-1][1]) <= off:
        # the common case: beyond everything held (Zeek tests append-at-tail first)
        ooo.append([off, data, tail])
        h.ooo_bytes += len(data)
        table.mem += len(data)
        return
    i = bisect_right(ooo, off, key=lambda b: b[0] + len(b[1]))
    overlapping = []
    while i < len(ooo) and ooo[i][0] < end:
        overlapping.append(ooo[i])
        i += 1
    if not overlapping:
        insort(ooo, [off, data, tail], key=lambda b: b[0])
        h.ooo_bytes += len(data)
        table.mem += len(data)
        return
    differs = False
    for b_off, b_data, _ in overlapping:
        lo, hi = max(off, b_off), min(end, b_off + len(b_data))
        if b_data[lo - b_off:hi - b_off] != data[lo - off:hi - off]:
            differs = True
        else:
            h.retrans += hi - lo
    if differs:
        h.overlaps += 1
    if policy_last:
        # newest wins: cut the overlapped parts out of held blocks, then store the new block whole
        for blk in overlapping:
            ooo.remove(blk)
            h.ooo_bytes -= len(blk[1])
            table.mem -= len(blk[1])
            b_off, b_data, b_tail = blk
            if b_off < off:
                _insert(h, [b_off, b_data[:off - b_off], 0], table)
            if b_off + len(b_data) > end:
                _insert(h, [end, b_data[end - b_off:], b_tail], table)
        _insert(h, [off, data, tail], table)
    else:
        # first wins: store only the pieces of the new segment no held block covers
        cur = off
        for b_off, b_data, _ in overlapping:
            if b_off > cur:
                _insert(h, [cur, data[cur - off:b_off - off], 0], table)
            cur = max(cur, b_off + len(b_data))
        if cur < end:
            _insert(h, [cur, data[cur - off:], tail], table)


def _insert(h: Half, block: list, table) -> None:
    if not block[1] and not block[2]:
        return
    insort(h.ooo, block, key=lambda b: b[0])
    h.ooo_bytes += len(block[1])
    table.mem += len(block[1])


def segment(h: Half, seq: int, data: bytes, missing: int, policy_last: bool, table) -> None:
    """Every data segment that is not the plain in-order case lands here."""
    n = len(data)
    off = rel_offset(h, seq)
    if off < h.pbase and h.pbase > 0:
        # bytes of a part already emitted: a retransmission, or a late fill that came too late
        # (a hole stays fillable only until its part is emitted); not delivered, counted
        cut = min(n, h.pbase - off)
        table.stats["part_late_bytes"] += cut
        data = data[cut:]
        off += cut
        n = len(data)
        if not n and not missing:
            return
    if off < h.off:
        # starts in what was delivered: compare (and maybe overwrite) that part, keep the rest
        if off + n <= h.off:
            if n:
                compare_delivered(h, max(off, 0), data[max(0, -off):], policy_last, table)
            if missing and off + n + missing > h.off:
                skip_gap(h, off + n + missing - h.off, table)
                drain(h, table)
            return
        head = h.off - off
        if off >= 0:
            compare_delivered(h, off, data[:head], policy_last, table)
        data = data[head:]
        off = h.off
        n = len(data)
    if off == h.off:
        if h.ooo and policy_last is False:
            # first wins against bytes held out of order too: only the part before the first block
            # is new; the rest goes through store_ooo's trimming
            first = h.ooo[0][0]
            if off + n > first:
                store_ooo(h, first, data[first - off:], missing, policy_last, table)
                data = data[:first - off]
                missing = 0
        append(h, data, table)
        if missing:
            skip_gap(h, missing, table)
        drain(h, table)
    else:
        store_ooo(h, off, data, missing, policy_last, table)
        limit = table.ooo_limit
        while h.ooo_bytes > limit and h.ooo:
            table.stats["ooo_limit_hits"] += 1
            force_gap(h, table)


def force_gap(h: Half, table) -> None:
    """Skip the hole before the first held block and deliver what follows it (Zeek's Gap)."""
    if not h.ooo:
        return
    skip_gap(h, h.ooo[0][0] - h.off, table)
    drain(h, table)


def ack_passed(h: Half, ack: int, table) -> None:
    """The peer acknowledged `ack`: holes it acknowledged past are lost to the capture.

    As tshark's follow does, a hole is declared only once the acknowledgement passes the start
    of the first held block; a hole merely acknowledged into stays open (its data may still be
    reordered in the capture).
    """
    ack_off = rel_offset(h, ack)
    while h.ooo and ack_off > h.ooo[0][0]:
        force_gap(h, table)


def flush(h: Half, table) -> None:
    """At close every held block is delivered, the holes before them skipped as gaps."""
    while h.ooo:
        force_gap(h, table)


def delivered_gaps(h: Half) -> list[tuple[int, int]]:
    """Gaps as (position in delivered bytes, length)."""
    return [(pos, length) for _, length, pos in h.gaps]
