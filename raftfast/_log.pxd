# C-level layout of raftfast._log.EntryLog, so other Cython modules can cimport the class and
# read its columns directly.

from libc.stdint cimport int64_t, uint8_t, uint64_t


cdef class EntryLog:
    cdef int64_t _first          # index of the first held entry
    cdef uint64_t _prev_term     # term of _first - 1 (the snapshot point)
    cdef Py_ssize_t _n           # entries held
    cdef Py_ssize_t _cap         # capacity of the three columns (entries)
    cdef uint64_t *_terms        # _cap terms
    cdef uint8_t *_types         # _cap entry types
    cdef uint64_t *_offs         # _cap + 1 payload offsets into _buf; _offs[0] == 0
    cdef unsigned char *_buf     # payload bytes, _offs[_n] of them used
    cdef size_t _buf_cap

    cdef int _reserve(self, Py_ssize_t entries, size_t nbytes) except -1
    cdef void _shrink(self) noexcept
    cdef uint64_t _last_term(self) noexcept
    cdef Py_ssize_t _held(self, object index) except -1
    cdef int _span(self, object lo, object hi, object max_bytes, Py_ssize_t *a,
                   Py_ssize_t *b) except -1
