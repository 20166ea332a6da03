# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled in-memory Raft log (twin of raftfast._log_py).

Terms, types and payload offsets live in realloc-grown C arrays over one payload buffer, so
appending and slicing never create a Python object per entry.  Behaviour, including exception
types, matches the pure twin exactly (tests/test_parity.py).
"""

from cpython.buffer cimport PyBuffer_Release
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.ref cimport PyObject
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy, memmove, memset

from raftfast._batch cimport (
    C_HEADER_SIZE,
    C_META_SIZE,
    as_u8,
    as_u64,
    clamp_index,
    copy_payload,
    finish_batch,
    get_buffer,
    parse_batch_of,
    payload_len,
    rf_load_u32,
    rf_load_u64,
    rf_store_u32,
    rf_store_u64,
)

from raftfast.errors import CompactedError, LogError, UnavailableError

cdef extern from "Python.h":
    # Borrowed-pointer variants, so hot loops do no refcounting on the items they inspect.
    bint Bytes_CheckExact "PyBytes_CheckExact"(PyObject *o)
    Py_ssize_t Bytes_GET_SIZE "PyBytes_GET_SIZE"(PyObject *o)
    char *Bytes_AS_STRING "PyBytes_AS_STRING"(PyObject *o)
    object PySequence_Fast(object o, const char *m)
    Py_ssize_t PySequence_Fast_GET_SIZE(object o)
    PyObject **PySequence_Fast_ITEMS(object o)

cdef extern from *:
    """
    #if defined(__linux__) || defined(__APPLE__)
    #include <sys/mman.h>
    #include <unistd.h>
    #include <stdint.h>
    /* Give back the whole pages of [start, end), memory the caller owns but no longer needs
       (its content is lost: it reads as zeros if touched again). */
    static void rf_release_pages(unsigned char *start, unsigned char *end) {
        uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
        uintptr_t lo = ((uintptr_t)start + page - 1) & ~(page - 1);
        uintptr_t hi = (uintptr_t)end & ~(page - 1);
        if (hi > lo)
            madvise((void *)lo, hi - lo, MADV_DONTNEED);
    }
    #else
    static void rf_release_pages(unsigned char *start, unsigned char *end) { (void)start; (void)end; }
    #endif
    """
    void rf_release_pages(unsigned char *start, unsigned char *end) noexcept nogil

cdef enum:
    MIN_CAP = 16            # entries
    MIN_BUF = 1024          # payload bytes

cdef uint64_t U64_MAX = 0xFFFFFFFFFFFFFFFF
cdef uint64_t MAX_FIRST = 1 << 62   # first_index must stay below this (see clamp_index)


cdef inline Py_ssize_t _grow(Py_ssize_t cap, Py_ssize_t need) noexcept:
    while cap < need:
        cap *= 2
    return cap


cdef class EntryLog:
    """Raft log entries ``first_index..last_index`` plus the term of ``first_index - 1``."""

    def __cinit__(self, *args, **kwargs):
        self._n = 0
        self._cap = 0
        self._buf_cap = 0
        self._reserve(0, 0)

    def __dealloc__(self):
        free(self._terms)
        free(self._types)
        free(self._offs)
        free(self._buf)

    def __init__(self, first_index=1, prev_term=0):
        self.reset(first_index, prev_term)

    # -- memory -----------------------------------------------------------------------------

    cdef int _reserve(self, Py_ssize_t entries, size_t nbytes) except -1:
        """Make room for `entries` more entries and `nbytes` more payload bytes (doubling)."""
        cdef Py_ssize_t cap
        cdef size_t used = self._offs[self._n] if self._offs != NULL else 0
        cdef size_t bcap
        cdef void *p
        if self._n + entries > self._cap or self._terms == NULL:
            cap = _grow(max(self._cap, MIN_CAP), self._n + entries)
            p = realloc(self._terms, cap * sizeof(uint64_t))
            if p == NULL:
                raise MemoryError()
            self._terms = <uint64_t *>p
            p = realloc(self._types, cap * sizeof(uint8_t))
            if p == NULL:
                raise MemoryError()
            self._types = <uint8_t *>p
            p = realloc(self._offs, (cap + 1) * sizeof(uint64_t))
            if p == NULL:
                raise MemoryError()
            if self._offs == NULL:
                (<uint64_t *>p)[0] = 0
            self._offs = <uint64_t *>p
            self._cap = cap
        if used + nbytes > self._buf_cap or self._buf == NULL:
            bcap = max(self._buf_cap, <size_t>MIN_BUF)
            while bcap < used + nbytes:
                bcap *= 2
            p = realloc(self._buf, bcap)
            if p == NULL:
                raise MemoryError()
            self._buf = <unsigned char *>p
            self._buf_cap = bcap
        return 0

    cdef void _shrink(self) noexcept:
        """Give memory back once a quarter or less of it is in use (after compact/truncate)."""
        cdef Py_ssize_t cap
        cdef size_t bcap, used = self._offs[self._n]
        cdef void *p
        if self._cap > MIN_CAP and self._n * 4 <= self._cap:
            cap = max(<Py_ssize_t>MIN_CAP, self._n * 2)
            # A shrinking realloc keeps the data we still need.  _cap drops as soon as one column
            # has shrunk; if a later realloc fails, that column is merely larger than _cap.
            p = realloc(self._terms, cap * sizeof(uint64_t))
            if p == NULL:
                return
            self._terms = <uint64_t *>p
            self._cap = cap
            p = realloc(self._types, cap * sizeof(uint8_t))
            if p == NULL:
                return
            self._types = <uint8_t *>p
            p = realloc(self._offs, (cap + 1) * sizeof(uint64_t))
            if p == NULL:
                return
            self._offs = <uint64_t *>p
        if self._buf_cap > MIN_BUF and used * 4 <= self._buf_cap:
            bcap = max(<size_t>MIN_BUF, used * 2)
            p = realloc(self._buf, bcap)
            if p != NULL:
                self._buf = <unsigned char *>p
                self._buf_cap = bcap

    cdef uint64_t _last_term(self) noexcept:
        return self._terms[self._n - 1] if self._n else self._prev_term

    # -- bounds -----------------------------------------------------------------------------

    @property
    def first_index(self):
        return self._first

    @property
    def last_index(self):
        return self._first + self._n - 1

    @property
    def last_term(self):
        return self._last_term()

    @property
    def nbytes(self):
        return self._offs[self._n]

    def __len__(self):
        return self._n

    def __sizeof__(self):
        """Bytes held, including the C columns and payload buffer (for memory accounting)."""
        return (type(self).__basicsize__ + self._cap * (sizeof(uint64_t) * 2 + sizeof(uint8_t))
                + sizeof(uint64_t) + self._buf_cap)

    def __repr__(self):
        return (f"EntryLog(first_index={self._first}, last_index={self._first + self._n - 1}, "
                f"last_term={self._last_term()}, nbytes={self._offs[self._n]})")

    cdef Py_ssize_t _held(self, object index) except -1:
        """Position of `index` in the columns; raise if it is not held."""
        cdef int64_t i = clamp_index(index)
        if i < self._first:
            raise CompactedError(f"index {index} is compacted (first index {self._first})")
        if i - self._first >= self._n:
            raise UnavailableError(
                f"index {index} is after last index {self._first + self._n - 1}")
        return <Py_ssize_t>(i - self._first)

    # -- reads ------------------------------------------------------------------------------

    def term_at(self, index):
        """Term of ``index``; ``first_index - 1`` answers with the snapshot term."""
        cdef int64_t i = clamp_index(index)
        if i >= self._first:
            if i - self._first < self._n:
                return self._terms[i - self._first]
            raise UnavailableError(
                f"index {index} is after last index {self._first + self._n - 1}")
        if i == self._first - 1:
            return self._prev_term
        raise CompactedError(f"index {index} is compacted (first index {self._first})")

    def entry(self, index):
        """(term, type, payload) of a held entry."""
        cdef Py_ssize_t pos = self._held(index)
        cdef uint64_t off = self._offs[pos]
        payload = PyBytes_FromStringAndSize(<const char *>self._buf + off,
                                            self._offs[pos + 1] - off)
        return self._terms[pos], self._types[pos], payload

    cdef int _span(self, object lo, object hi, object max_bytes, Py_ssize_t *a,
                   Py_ssize_t *b) except -1:
        """Positions [a, b) of entries [lo, hi), cut short once payloads would exceed
        ``max_bytes`` (at least one entry when lo < hi; 0: no limit)."""
        cdef int64_t limit = clamp_index(max_bytes)
        cdef int64_t l, h
        cdef Py_ssize_t m, k, i
        cdef uint64_t base
        if limit < 0:
            raise ValueError("max_bytes must be >= 0")
        l = clamp_index(lo)
        h = clamp_index(hi)
        if l < self._first:
            raise CompactedError(f"slice start {lo} is compacted (first index {self._first})")
        if h - self._first > self._n:
            raise UnavailableError(
                f"slice end {hi} is after last index {self._first + self._n - 1} + 1")
        if l > h:
            raise UnavailableError(f"slice start {lo} is after its end {hi}")
        a[0] = <Py_ssize_t>(l - self._first)
        b[0] = <Py_ssize_t>(h - self._first)
        base = self._offs[a[0]]
        if limit and b[0] > a[0] and self._offs[b[0]] - base > <uint64_t>limit:
            # Largest b' in [a+1, b] with offs[b'] - base <= limit, but at least one entry.
            m = a[0] + 1
            k = b[0]
            while m < k:
                i = (m + k + 1) // 2
                if self._offs[i] - base <= <uint64_t>limit:
                    m = i
                else:
                    k = i - 1
            b[0] = m
        if b[0] - a[0] > 0xFFFFFFFF:
            raise ValueError(f"too many entries for one batch: {b[0] - a[0]}")
        return 0

    def slice(self, lo, hi, max_bytes=0):
        """Packed batch of entries [lo, hi), cut short once payloads would exceed ``max_bytes``.

        At least one entry is returned when lo < hi, so an oversized entry still makes progress;
        ``max_bytes == 0`` means no limit.
        """
        cdef Py_ssize_t a, b, i, count, table_end
        cdef uint64_t base, body
        cdef unsigned char *out
        cdef unsigned char *rec
        self._span(lo, hi, max_bytes, &a, &b)
        count = b - a
        base = self._offs[a]
        body = self._offs[b] - base
        table_end = C_HEADER_SIZE + C_META_SIZE * count
        result = PyBytes_FromStringAndSize(NULL, table_end + <Py_ssize_t>body)
        out = <unsigned char *>PyBytes_AS_STRING(result)
        rec = out + C_HEADER_SIZE
        for i in range(a, b):
            rf_store_u64(rec, self._terms[i])
            rec[8] = self._types[i]
            rf_store_u32(rec + 9, <uint32_t>(self._offs[i + 1] - self._offs[i]))
            rec += C_META_SIZE
        memcpy(out + table_end, self._buf + base, body)
        finish_batch(out, table_end + <Py_ssize_t>body, <uint32_t>count, <uint64_t>(self._first + a))
        return result

    def unpack(self, lo, hi, max_bytes=0):
        """``decode_batch(self.slice(lo, hi, max_bytes))`` — (lo, terms, types, payloads) —
        without the packed batch: its copy and checksum are for the disk and the wire, not
        for entries applied here."""
        cdef Py_ssize_t a, b, i
        cdef list terms = [], types = [], payloads = []
        self._span(lo, hi, max_bytes, &a, &b)
        for i in range(a, b):
            terms.append(self._terms[i])
            types.append(self._types[i])
            payloads.append(PyBytes_FromStringAndSize(
                <const char *>self._buf + self._offs[i], self._offs[i + 1] - self._offs[i]))
        return self._first + a, terms, types, payloads

    def find_conflict(self, batch):
        """First index of ``batch`` whose entry is not in this log with the same term.

        Entries below ``first_index`` were committed and compacted, so they count as matching.
        Returns ``batch_last + 1`` when everything matches.
        """
        cdef Py_buffer view
        cdef uint64_t bfirst
        cdef uint32_t count
        cdef int64_t last, index, held_end
        cdef const unsigned char *p
        get_buffer(batch, &view)
        try:
            p = <const unsigned char *>view.buf
            # Read the bounds only after parsing: a large batch's CRC runs without the GIL.
            parse_batch_of(batch, p, view.len, &bfirst, &count)
            last = self._first + self._n - 1
            if bfirst > <uint64_t>(last + 1):
                raise UnavailableError(
                    f"batch starts at {bfirst}, after last index {last} + 1")
            # From here bfirst <= last + 1 < 2**63, so the int64 arithmetic cannot overflow.
            index = max(<int64_t>bfirst, self._first)
            held_end = min(<int64_t>bfirst + count, last + 1)
            while index < held_end:
                if (rf_load_u64(p + C_HEADER_SIZE + C_META_SIZE * (index - <int64_t>bfirst))
                        != self._terms[index - self._first]):
                    return index
                index += 1
            return held_end
        finally:
            PyBuffer_Release(&view)

    def find_conflict_by_term(self, index, term):
        """Largest j <= index with term_at(j) <= term (fast log backtracking), or first_index-1."""
        cdef int64_t i = clamp_index(index)
        cdef int64_t last = self._first + self._n - 1
        cdef Py_ssize_t lo, hi, mid
        cdef uint64_t t
        hi = <Py_ssize_t>(min(i, last) - self._first + 1)   # candidate positions [0, hi)
        if hi <= 0:
            return self._first - 1
        if term < 0:
            return self._first - 1   # terms are unsigned: none is <= a negative term
        t = U64_MAX if term > U64_MAX else <uint64_t>term
        # Terms are non-decreasing: find the first position whose term is > t.
        lo = 0
        while lo < hi:
            mid = (lo + hi) // 2
            if self._terms[mid] <= t:
                lo = mid + 1
            else:
                hi = mid
        return self._first + lo - 1

    # -- writes -----------------------------------------------------------------------------

    def append(self, term, payloads, etype=0):
        """Append entries of one term after last_index; return the new last_index."""
        cdef uint64_t t = as_u64(term)
        cdef uint8_t y = as_u8(etype)
        cdef object seq
        cdef PyObject **items
        cdef PyObject *o
        cdef Py_ssize_t i, n, length
        cdef uint64_t off, base
        cdef bint exact
        cdef unsigned char *buf
        cdef uint64_t *offs
        cdef uint64_t *terms
        if t < self._last_term():
            raise LogError(f"term {term} is below last term {self._last_term()}")
        seq = PySequence_Fast(payloads, "payloads must be a sequence")
        n = PySequence_Fast_GET_SIZE(seq)
        items = PySequence_Fast_ITEMS(seq)
        self._reserve(n, 0)
        # One pass copies and validates.  _n only moves at the end, so an invalid payload leaves
        # the log unchanged (bytes already copied past the used area are simply ignored).
        # Borrowed pointers: no refcount traffic on the payload objects.
        offs = self._offs + self._n
        terms = self._terms + self._n
        base = offs[0]
        off = base
        buf = self._buf
        for i in range(n):
            o = items[i]
            exact = Bytes_CheckExact(o)
            length = Bytes_GET_SIZE(o) if exact else payload_len(<object>o)
            if length > 0xFFFFFFFF:
                raise OverflowError("payload longer than 4 GiB")
            if off + length > self._buf_cap:
                # Extrapolate from the payloads seen so far, so that one realloc usually suffices.
                self._reserve(0, max(off + length - base, (off + length - base) // (i + 1) * n))
                buf = self._buf
            if exact:
                memcpy(buf + off, Bytes_AS_STRING(o), length)
            else:
                copy_payload(<object>o, buf + off)
            off += length
            offs[i + 1] = off
            terms[i] = t
        memset(self._types + self._n, y, n)
        self._n += n
        return self._first + self._n - 1

    def append_batch(self, batch, start_index=None):
        """Append ``batch``'s entries from ``start_index`` (default: its first) to its end.

        ``start_index`` lets a follower skip the prefix it already holds (see find_conflict).
        """
        cdef Py_buffer view
        cdef uint64_t bfirst, prev, t, off, body_start
        cdef uint32_t count
        cdef int64_t last, start
        cdef Py_ssize_t skip, m, i, table_end
        cdef const unsigned char *p
        cdef const unsigned char *rec
        get_buffer(batch, &view)
        try:
            p = <const unsigned char *>view.buf
            # Read the bounds only after parsing: a large batch's CRC runs without the GIL.
            table_end = parse_batch_of(batch, p, view.len, &bfirst, &count)
            last = self._first + self._n - 1
            if start_index is None:
                if bfirst != <uint64_t>(last + 1):
                    raise LogError(f"append at {bfirst}, expected last index {last} + 1")
                start = last + 1
            else:
                start = clamp_index(start_index)
                if start != last + 1:
                    raise LogError(f"append at {start_index}, expected last index {last} + 1")
            if bfirst > <uint64_t>start or <uint64_t>start - bfirst > count:
                raise LogError(f"start index {start} is outside batch "
                               f"[{bfirst}, {bfirst + count}]")
            skip = <Py_ssize_t>(<uint64_t>start - bfirst)
            m = count - skip
            if m == 0:
                return last
            prev = self._last_term()
            body_start = table_end
            rec = p + C_HEADER_SIZE
            for i in range(skip):
                body_start += rf_load_u32(rec + 9)
                rec += C_META_SIZE
            for i in range(m):
                t = rf_load_u64(rec + C_META_SIZE * i)
                if t < prev:
                    raise LogError(f"entry {start + i} has term {t}, below previous term {prev}")
                prev = t
            self._reserve(m, view.len - body_start)
            off = self._offs[self._n]
            memcpy(self._buf + off, p + body_start, view.len - body_start)
            for i in range(self._n, self._n + m):
                self._terms[i] = rf_load_u64(rec)
                self._types[i] = rec[8]
                off += rf_load_u32(rec + 9)
                self._offs[i + 1] = off
                rec += C_META_SIZE
            self._n += m
            return last + m
        finally:
            PyBuffer_Release(&view)

    def truncate_after(self, index):
        """Drop entries after ``index`` (a follower discarding a conflicting suffix)."""
        cdef int64_t i = clamp_index(index)
        cdef int64_t last = self._first + self._n - 1
        if i >= last:
            return
        if i < self._first - 1:
            raise CompactedError(
                f"cannot truncate after {index}: compacted below {self._first}")
        self._n = <Py_ssize_t>(i - self._first + 1)
        self._shrink()

    def compact(self, index):
        """Discard entries <= ``index`` (covered by a snapshot); remember term_at(index)."""
        cdef int64_t i = clamp_index(index)
        cdef int64_t last = self._first + self._n - 1
        cdef Py_ssize_t drop, keep, j
        cdef uint64_t base
        if i < self._first:
            return
        if i > last:
            raise UnavailableError(f"cannot compact through {index}: last index is {last}")
        drop = <Py_ssize_t>(i - self._first + 1)
        keep = self._n - drop
        self._prev_term = self._terms[drop - 1]
        base = self._offs[drop]
        memmove(self._buf, self._buf + base, self._offs[self._n] - base)
        memmove(self._terms, self._terms + drop, keep * sizeof(uint64_t))
        memmove(self._types, self._types + drop, keep * sizeof(uint8_t))
        for j in range(keep + 1):
            self._offs[j] = self._offs[j + drop] - base
        self._n = keep
        self._first = i + 1
        # The memory past the data is kept: under a steady load the log grows back to the same
        # size before the next compaction, and pages given back here came back as page faults,
        # ~10% of a node's CPU under batched puts (perf). release_unused() gives it back.

    def release_unused(self):
        """Give back the memory past the data: the buffers shrink once a quarter or less of
        them is in use; otherwise the pages the data does not reach go back to the system (a
        compaction that kept much of the log left them resident up to the buffer's high-water
        mark: a node with 1M keys held ~65 MiB for ~28 MiB of log). For a log at rest."""
        self._shrink()
        rf_release_pages(self._buf + self._offs[self._n], self._buf + self._buf_cap)

    def reset(self, first_index, prev_term):
        """Drop everything and start empty at ``first_index`` (snapshot install)."""
        cdef uint64_t f = as_u64(first_index)
        cdef uint64_t pt
        if not 1 <= f < MAX_FIRST:
            raise ValueError(f"first_index must be in [1, 2**62), got {first_index}")
        pt = as_u64(prev_term)
        self._first = <int64_t>f
        self._prev_term = pt
        self._n = 0
        self._shrink()
