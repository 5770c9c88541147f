# Cython declarations for flowtable.py (pure-Python mode: this file augments the .py when it is
# compiled; the .py alone is the reference engine). The per-flow structs are C extension types,
# so the batch loop in FlowTable.feed reads and writes their fields as C struct members. Every
# field is public: the rare paths in reassembly.py (a module of its own) and the tests reach
# them as Python attributes.

cdef class Half:
    cdef public Flow flow
    cdef public Half peer
    cdef public bint is_client
    cdef public bytes ip
    cdef public int port
    cdef public long long next, off, room, ooo_bytes, isn, fin_off, packets
    cdef public long long retrans, overlaps, depth_dropped, late, base, pbase, pkt0
    cdef public bytearray buf
    cdef public object ooo, gaps
    cdef public bint syn, fin, rst
    cdef public int seen

cdef class Embryo:
    # no field can hold a reference cycle (bytes and numbers): Cython leaves the type untracked
    cdef public bytes src, dst
    cdef public int sport, dport
    cdef public bint live
    cdef public double first
    cdef public long long isn
    cdef public int linktype

cdef class Flow:
    cdef public Half c, s
    cdef public int version, state, linktype
    cdef public double first, last, timeout, pstart
    cdef public object entry, pkts
    cdef public str reason, hist, rule
    cdef public bint trunc
    cdef public long long part
