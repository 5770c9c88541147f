# Cython declarations for reassembly.py (pure-Python mode: this file augments the .py when it
# is compiled; the .py alone is the reference engine). Half is a C extension type: the batch
# loop in flowtable (which cimports it) and the functions here read its fields as C struct
# members. Every field is public: the tests and the Python engine reach them as attributes.

cdef class Half:
    cdef public object flow    # flowtable.Flow (a cimport back would be a cycle)
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

