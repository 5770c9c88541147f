# Cython declarations for flowtable.py (pure-Python mode: this file augments the .py when it is
# compiled; the .py alone is the reference engine). The per-flow structs are C extension types,
# so the batch loop in FlowTable.feed reads and writes their fields as C struct members (Half,
# one direction, is reassembly's). Every field is public: the tests and the Python engine
# reach them as attributes.

from streamtap.engine.reassembly cimport Half

cdef extern from "Python.h":
    void PyObject_GC_UnTrack(object op)

cpdef str _ip(bytes b)

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

cdef class FlowTable:
    cdef public dict flows
    cdef public object limits, emit, done, interface, embryos, _servers, wheel, _due
    cdef public object stats, frag_frames, normal_timeouts, timeouts
    cdef public long long nflows, mem, gap_bytes, ooo_limit, mem_cap, max_flows, depth, part_max
    cdef public bint emergency, last, embryo_ok
    cdef public double now, _next_advance, part_interval
    cdef public int linktype
    # what the batch loop and the per-flow paths call: C calls, not attribute lookups
    cpdef letter(self, Half h, str ch)
    cpdef _data(self, Half h, long long seq, bytes payload, long long missing)
    cpdef _slow(self, double ts, tuple dec, object h, object frame)
    cpdef advance(self, double now)
    cpdef _set_state(self, Flow f, int state, object timeout=*)
    cpdef double _deadline(self, Flow f)
    cpdef _part(self, Flow f, double now)
    cpdef _new_embryo(self, double ts, tuple key, long long isn)
    cpdef _hatch(self, Embryo e)
    cpdef _close_embryo(self, Embryo e, str reason)
    cpdef _new_flow(self, double ts, int version, bytes src, object sport, bytes dst,
                    object dport, int flags, bint hatch=*)
    cpdef _close(self, Flow f, str reason)
    cpdef _stream(self, Flow f, str reason)
