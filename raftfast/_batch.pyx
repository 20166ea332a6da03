# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled packed entry batches, CRC32C and small quorum helpers (twin of raftfast._batch_py).

See raftfast/_batch_py.py for the format; both modules accept and reject exactly the same inputs
with the same exception types (tests/test_parity.py).  The speed comes from doing the per-entry
work in C: CRC32C with slicing-by-8 tables, and batches written straight into the memory of the
result bytes object.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.ref cimport PyObject
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

from raftfast.errors import BatchError

cdef extern from "Python.h":
    # Borrowed-reference accessors for the list/tuple PySequence_Fast returns.
    bint Long_CheckExact "PyLong_CheckExact"(PyObject *o)
    object PySequence_Fast(object o, const char *m)
    Py_ssize_t PySequence_Fast_GET_SIZE(object o)
    PyObject **PySequence_Fast_ITEMS(object o)

cdef extern from *:
    """
    /* CRC32C (Castagnoli, reflected polynomial 0x82F63B78), slicing-by-8: eight 1 KiB tables
       let the loop fold 8 input bytes per iteration with independent lookups. */
    static uint32_t rf_crc_tab[8][256];

    /* Shifting a crc register over runs of zero bytes: the register after `len` zeros is a
       linear function of the register before, applied as four byte-indexed tables (Mark
       Adler's method for combining CRCs). RF_CRC_LONG and RF_CRC_SHORT are powers of two. */
    #define RF_CRC_LONG 8192
    #define RF_CRC_SHORT 256
    static uint32_t rf_crc_long[4][256];
    static uint32_t rf_crc_short[4][256];

    static uint32_t rf_gf2_times(const uint32_t *mat, uint32_t vec) {
        uint32_t sum = 0;
        while (vec) {
            if (vec & 1) sum ^= *mat;
            vec >>= 1;
            mat++;
        }
        return sum;
    }

    static void rf_gf2_square(uint32_t *square, const uint32_t *mat) {
        for (int n = 0; n < 32; n++) square[n] = rf_gf2_times(mat, mat[n]);
    }

    /* The operator that runs a register through `len` zero bytes (len a power of two). */
    static void rf_crc_zeros_op(uint32_t *even, size_t len) {
        uint32_t odd[32], row = 1;
        odd[0] = 0x82F63B78u;  /* one zero bit */
        for (int n = 1; n < 32; n++) {
            odd[n] = row;
            row <<= 1;
        }
        rf_gf2_square(even, odd);  /* two zero bits */
        rf_gf2_square(odd, even);  /* four */
        do {  /* each square doubles it: one zero byte first, in even */
            rf_gf2_square(even, odd);
            len >>= 1;
            if (len == 0) return;
            rf_gf2_square(odd, even);
            len >>= 1;
        } while (len);
        for (int n = 0; n < 32; n++) even[n] = odd[n];
    }

    static void rf_crc_zeros(uint32_t zeros[][256], size_t len) {
        uint32_t op[32];
        rf_crc_zeros_op(op, len);
        for (uint32_t n = 0; n < 256; n++) {
            zeros[0][n] = rf_gf2_times(op, n);
            zeros[1][n] = rf_gf2_times(op, n << 8);
            zeros[2][n] = rf_gf2_times(op, n << 16);
            zeros[3][n] = rf_gf2_times(op, n << 24);
        }
    }

    static inline uint32_t rf_crc_shift(uint32_t zeros[][256], uint32_t crc) {
        return zeros[0][crc & 0xff] ^ zeros[1][(crc >> 8) & 0xff]
            ^ zeros[2][(crc >> 16) & 0xff] ^ zeros[3][crc >> 24];
    }

    /* The CPU's own CRC32C instruction (SSE 4.2), when it has it: ~10x the tables' speed,
       which a follower checksumming every batch several times over feels (bench/: perf). */
    #if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    #define RF_HAVE_HW_CRC 1
    #include <nmmintrin.h>
    static int rf_hw_crc = 0;

    /* Continue an inverted crc over n bytes. The instruction takes 3 cycles but can start one
       every cycle: three independent runs over three consecutive blocks keep it busy, and
       their registers are combined by shifting (a register after block A, run through B's
       length of zeros, xor B's own register from 0, is the register after A then B). */
    __attribute__((target("sse4.2")))
    static uint32_t rf_crc_hw(uint32_t crc, const unsigned char *p, size_t n) {
        uint64_t c0 = crc;
        while (n >= 3 * RF_CRC_SHORT) {
            size_t block = n >= 3 * RF_CRC_LONG ? RF_CRC_LONG : RF_CRC_SHORT;
            uint64_t c1 = 0, c2 = 0;
            const unsigned char *end = p + block;
            do {
                uint64_t w0, w1, w2;
                memcpy(&w0, p, 8);
                memcpy(&w1, p + block, 8);
                memcpy(&w2, p + 2 * block, 8);
                c0 = _mm_crc32_u64(c0, w0);
                c1 = _mm_crc32_u64(c1, w1);
                c2 = _mm_crc32_u64(c2, w2);
                p += 8;
            } while (p < end);
            uint32_t (*zeros)[256] = block == RF_CRC_LONG ? rf_crc_long : rf_crc_short;
            c0 = rf_crc_shift(zeros, (uint32_t)c0) ^ (uint32_t)c1;
            c0 = rf_crc_shift(zeros, (uint32_t)c0) ^ (uint32_t)c2;
            p += 2 * block;
            n -= 3 * block;
        }
        while (n >= 8) {
            uint64_t w;
            memcpy(&w, p, 8);
            c0 = _mm_crc32_u64(c0, w);
            p += 8;
            n -= 8;
        }
        crc = (uint32_t)c0;
        while (n--) crc = _mm_crc32_u8(crc, *p++);
        return crc;
    }
    #endif

    static int rf_crc_hardware(void) {
    #ifdef RF_HAVE_HW_CRC
        return rf_hw_crc;
    #else
        return 0;
    #endif
    }

    static void rf_crc_init(void) {
    #ifdef RF_HAVE_HW_CRC
        __builtin_cpu_init();
        rf_hw_crc = __builtin_cpu_supports("sse4.2") ? 1 : 0;
        rf_crc_zeros(rf_crc_long, RF_CRC_LONG);
        rf_crc_zeros(rf_crc_short, RF_CRC_SHORT);
    #endif
        for (uint32_t n = 0; n < 256; n++) {
            uint32_t c = n;
            for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
            rf_crc_tab[0][n] = c;
        }
        for (uint32_t n = 0; n < 256; n++) {
            uint32_t c = rf_crc_tab[0][n];
            for (int k = 1; k < 8; k++) {
                c = rf_crc_tab[0][c & 0xff] ^ (c >> 8);
                rf_crc_tab[k][n] = c;
            }
        }
    }

    #if !(defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__)
    /* One slicing-by-8 step: fold 8 input bytes, given as their little-endian value, into the
       (inverted) crc. */
    static inline uint32_t rf_crc_fold64(uint32_t crc, uint64_t w) {
        uint32_t lo = (uint32_t)w ^ crc, hi = (uint32_t)(w >> 32);
        return rf_crc_tab[7][lo & 0xff] ^ rf_crc_tab[6][(lo >> 8) & 0xff]
            ^ rf_crc_tab[5][(lo >> 16) & 0xff] ^ rf_crc_tab[4][lo >> 24]
            ^ rf_crc_tab[3][hi & 0xff] ^ rf_crc_tab[2][(hi >> 8) & 0xff]
            ^ rf_crc_tab[1][(hi >> 16) & 0xff] ^ rf_crc_tab[0][hi >> 24];
    }

    /* The same for the 8 bytes at p (any alignment). */
    static inline uint32_t rf_crc_fold8(uint32_t crc, const unsigned char *p) {
        uint64_t w;
        memcpy(&w, p, 8);
        return rf_crc_fold64(crc, w);
    }
    #endif

    /* The tables alone (tests compare both ways). */
    static uint32_t rf_crc32c_tables(uint32_t crc, const unsigned char *p, size_t n) {
        crc = ~crc;
    #if !(defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__)
        while (n && ((uintptr_t)p & 7)) {
            crc = rf_crc_tab[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
            n--;
        }
        while (n >= 8) {
            crc = rf_crc_fold8(crc, p);
            p += 8;
            n -= 8;
        }
    #endif
        while (n--) crc = rf_crc_tab[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
        return ~crc;
    }

    static uint32_t rf_crc32c(uint32_t crc, const unsigned char *p, size_t n) {
    #ifdef RF_HAVE_HW_CRC
        if (rf_hw_crc) return ~rf_crc_hw(~crc, p, n);
    #endif
        return rf_crc32c_tables(crc, p, n);
    }

    #if !(defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__)
    /* Continue an (inverted) crc over the n bytes at p with unaligned 8-byte loads, so there is
       no byte-wise alignment prologue (a batch body starts 4 bytes off 8-byte alignment). */
    static inline uint32_t rf_crc_body(uint32_t crc, const unsigned char *p, size_t n) {
    #ifdef RF_HAVE_HW_CRC
        if (rf_hw_crc) return rf_crc_hw(crc, p, n);
    #endif
        while (n >= 8) {
            crc = rf_crc_fold8(crc, p);
            p += 8;
            n -= 8;
        }
        if (n >= 4) {  /* one slicing-by-4 step instead of four byte steps */
            uint32_t w;
            memcpy(&w, p, 4);
            w ^= crc;
            crc = rf_crc_tab[3][w & 0xff] ^ rf_crc_tab[2][(w >> 8) & 0xff]
                ^ rf_crc_tab[1][(w >> 16) & 0xff] ^ rf_crc_tab[0][w >> 24];
            p += 4;
            n -= 4;
        }
        while (n--) crc = rf_crc_tab[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
        return crc;
    }
    #endif

    /* The CRC of a packed batch of `size` (>= 20) bytes: crc32c(p[20:], crc32c(p[:16])), i.e.
       every byte except the CRC field at [16:20].  Covering the header costs two slicing
       steps. */
    static uint32_t rf_batch_crc(const unsigned char *p, size_t size) {
    #if !(defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__)
        uint32_t crc = rf_crc_fold8(rf_crc_fold8(0xFFFFFFFFu, p), p + 8);
        return ~rf_crc_body(crc, p + 20, size - 20);
    #else
        return rf_crc32c(rf_crc32c(0, p, 16), p + 20, size - 20);
    #endif
    }

    /* rf_batch_crc of a batch whose header holds magic "RFB1", `count` and `first_index`.
       The header words come from registers: reading back the separate 4-byte stores of magic
       and count as one 8-byte load would stall on store forwarding. */
    static uint32_t rf_batch_crc_new(const unsigned char *p, size_t size, uint32_t count,
                                     uint64_t first_index) {
    #if !(defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__)
        uint64_t w0 = (uint64_t)0x31424652u | ((uint64_t)count << 32);  /* "RFB1" | count */
        uint32_t crc = rf_crc_fold64(rf_crc_fold64(0xFFFFFFFFu, w0), first_index);
        return ~rf_crc_body(crc, p + 20, size - 20);
    #else
        (void)count; (void)first_index;
        return rf_batch_crc(p, size);
    #endif
    }
    """
    void rf_crc_init() noexcept nogil
    int rf_crc_hardware() noexcept nogil
    uint32_t rf_crc32c(uint32_t crc, const unsigned char *p, size_t n) noexcept nogil
    uint32_t rf_crc32c_tables(uint32_t crc, const unsigned char *p, size_t n) noexcept nogil
    uint32_t rf_batch_crc(const unsigned char *p, size_t size) noexcept nogil
    uint32_t rf_batch_crc_new(const unsigned char *p, size_t size, uint32_t count,
                              uint64_t first_index) noexcept nogil

cdef extern from *:
    """
    /* Value of an int that fits one internal digit, without a function call (what
       PyLong_AsLongLong does first anyway); returns 0 for anything larger. */
    static inline int rf_small_long(PyObject *o, long long *v) {
    #if PY_VERSION_HEX >= 0x030C0000
        if (PyUnstable_Long_IsCompact((PyLongObject *)o)) {
            *v = (long long)PyUnstable_Long_CompactValue((PyLongObject *)o);
            return 1;
        }
        return 0;
    #else
        Py_ssize_t s = Py_SIZE(o);
        if (s == 0) { *v = 0; return 1; }
        if (s == 1) { *v = (long long)((PyLongObject *)o)->ob_digit[0]; return 1; }
        if (s == -1) { *v = -(long long)((PyLongObject *)o)->ob_digit[0]; return 1; }
        return 0;
    #endif
    }
    """
    int rf_small_long(PyObject *o, long long *v) noexcept

rf_crc_init()

HEADER_SIZE = C_HEADER_SIZE
META_SIZE = C_META_SIZE
MAGIC = b"RFB1"
MAX_COUNT = 0xFFFFFFFF

# Release the GIL while checksumming buffers at least this large.
cdef Py_ssize_t NOGIL_CRC_BYTES = 1 << 16
# commit_index sorts in a stack array up to this many voters, else falls back to Python.
cdef enum:
    MAX_VOTERS = 64


# -- C API (see _batch.pxd) -------------------------------------------------------------------

cdef uint32_t crc32c_update(uint32_t crc, const unsigned char *p, size_t n) noexcept nogil:
    return rf_crc32c(crc, p, n)


cdef object _checked = None  # the bytes object that last checked out whole (parse_batch_of)


cdef Py_ssize_t parse_batch_of(object data, const unsigned char *p, Py_ssize_t n,
                               uint64_t *first_index, uint32_t *count) except -1:
    """_parse_batch; but the very bytes object that checked out last is not checksummed again:
    bytes cannot change, and a batch is looked at several times on its way (a follower's
    frame where it arrives, for a configuration among it, by find_conflict, by append_batch;
    a put_many's pairs by check_packed, then by put_packed). Its sizes are checked always."""
    global _checked
    if data is _checked:
        return _parse_batch(p, n, first_index, count, False)
    cdef Py_ssize_t off = _parse_batch(p, n, first_index, count, True)
    if type(data) is bytes:
        _checked = data
    return off


cdef Py_ssize_t _parse_batch(const unsigned char *p, Py_ssize_t n, uint64_t *first_index,
                             uint32_t *count, bint check_crc) except -1:
    cdef uint32_t cnt, i, crc
    cdef uint64_t expected
    cdef Py_ssize_t table_end
    if n < C_HEADER_SIZE:
        raise BatchError(f"batch too short: {n} bytes, the header alone is {C_HEADER_SIZE}")
    if memcmp(p, b"RFB1", 4) != 0:
        raise BatchError(f"bad batch magic {p[:4]!r}, expected {MAGIC!r}")
    cnt = rf_load_u32(p + 4)
    if cnt > <uint64_t>(n - C_HEADER_SIZE) // C_META_SIZE:
        raise BatchError(f"batch count {cnt} is impossible in {n} bytes")
    table_end = C_HEADER_SIZE + <Py_ssize_t>C_META_SIZE * cnt
    expected = table_end
    for i in range(cnt):
        expected += rf_load_u32(p + C_HEADER_SIZE + <Py_ssize_t>C_META_SIZE * i + 9)
    if expected != <uint64_t>n:
        raise BatchError(f"batch size mismatch: its table describes {expected} bytes, got {n}")
    if check_crc:
        # The CRC covers the header up to its own field (magic, count, first index), then the
        # rest.
        if n >= NOGIL_CRC_BYTES:
            with nogil:
                crc = rf_batch_crc(p, <size_t>n)
        else:
            crc = rf_batch_crc(p, <size_t>n)
        if crc != rf_load_u32(p + C_CRC_OFFSET):
            raise BatchError("batch CRC32C mismatch")
    first_index[0] = rf_load_u64(p + 8)
    count[0] = cnt
    return table_end


cdef void finish_batch(unsigned char *p, Py_ssize_t size, uint32_t count,
                       uint64_t first_index) noexcept nogil:
    memcpy(p, b"RFB1", 4)
    rf_store_u32(p + 4, count)
    rf_store_u64(p + 8, first_index)
    # Everything but the CRC field itself: header[:16], then the table and payloads.
    rf_store_u32(p + C_CRC_OFFSET, rf_batch_crc_new(p, <size_t>size, count, first_index))


cdef int64_t clamp_index(object value) except? -1:
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow > 0:
        return RF_CLAMP_HI
    if overflow < 0 or v < RF_CLAMP_LO:
        return RF_CLAMP_LO
    # A TypeError leaves v == -1, which `except? -1` turns into a raise via PyErr_Occurred.
    return v


# -- helpers ----------------------------------------------------------------------------------

cdef inline uint32_t _crc(const unsigned char *p, Py_ssize_t n, uint32_t crc) noexcept:
    if n >= NOGIL_CRC_BYTES:
        with nogil:
            crc = rf_crc32c(crc, p, <size_t>n)
        return crc
    return rf_crc32c(crc, p, <size_t>n)


cdef Py_ssize_t payload_len(object p) except -1:
    """Byte length of a bytes-like payload; TypeError for anything else (like bytes.join)."""
    cdef Py_buffer view
    if PyBytes_CheckExact(p):
        return PyBytes_GET_SIZE(p)
    get_buffer(p, &view)
    n = view.len
    PyBuffer_Release(&view)
    return n


cdef int get_buffer(object p, Py_buffer *view) except -1:
    try:
        PyObject_GetBuffer(p, view, PyBUF_SIMPLE)
    except (TypeError, BufferError):
        raise TypeError(f"expected a bytes-like object, {type(p).__name__} found") from None
    return 0


cdef Py_ssize_t copy_payload(object p, unsigned char *dst) except -1:
    cdef Py_buffer view
    cdef Py_ssize_t n
    if PyBytes_CheckExact(p):
        n = PyBytes_GET_SIZE(p)
        memcpy(dst, PyBytes_AS_STRING(p), n)
        return n
    get_buffer(p, &view)
    n = view.len
    memcpy(dst, view.buf, n)
    PyBuffer_Release(&view)
    return n


cdef uint64_t _payloads_total(object seq) except? 0xFFFFFFFFFFFFFFFF:
    """Sum of payload lengths of a PySequence_Fast result; validates each payload."""
    cdef Py_ssize_t i, n = PySequence_Fast_GET_SIZE(seq)
    cdef PyObject **items = PySequence_Fast_ITEMS(seq)
    cdef Py_ssize_t length
    cdef uint64_t total = 0
    for i in range(n):
        length = payload_len(<object>items[i])
        if length > 0xFFFFFFFF:
            raise OverflowError("payload longer than 4 GiB")
        total += length
    return total


cdef bytes _encode(uint64_t first_index, object terms, object payloads, object types,
                   bint uniform, uint64_t term, uint8_t etype):
    """Shared body of encode_batch/encode_uniform (per-entry terms/types unless `uniform`)."""
    cdef object pseq = PySequence_Fast(payloads, "payloads must be a sequence")
    cdef Py_ssize_t i, n = PySequence_Fast_GET_SIZE(pseq)
    cdef PyObject **pitems = PySequence_Fast_ITEMS(pseq)
    cdef PyObject **items
    cdef object seq
    cdef uint64_t body = _payloads_total(pseq)
    cdef Py_ssize_t table_end = C_HEADER_SIZE + <Py_ssize_t>C_META_SIZE * n
    cdef unsigned char *out
    cdef unsigned char *rec
    cdef unsigned char *dst
    cdef Py_ssize_t length
    if n > MAX_COUNT:
        raise ValueError(f"too many entries for one batch: {n}")
    result = PyBytes_FromStringAndSize(NULL, table_end + <Py_ssize_t>body)
    out = <unsigned char *>PyBytes_AS_STRING(result)
    if uniform:
        for i in range(n):
            rec = out + C_HEADER_SIZE + C_META_SIZE * i
            rf_store_u64(rec, term)
            rec[8] = etype
    else:
        # Same validation order as the pure twin: payloads, then types, then terms.
        if types is None:
            for i in range(n):
                out[C_HEADER_SIZE + C_META_SIZE * i + 8] = 0
        else:
            seq = PySequence_Fast(types, "types must be a sequence")
            items = PySequence_Fast_ITEMS(seq)
            for i in range(n):
                out[C_HEADER_SIZE + C_META_SIZE * i + 8] = as_u8(<object>items[i])
        seq = PySequence_Fast(terms, "terms must be a sequence")
        items = PySequence_Fast_ITEMS(seq)
        for i in range(n):
            rf_store_u64(out + C_HEADER_SIZE + C_META_SIZE * i, as_u64(<object>items[i]))
    dst = out + table_end
    for i in range(n):
        length = copy_payload(<object>pitems[i], dst)
        rf_store_u32(out + C_HEADER_SIZE + C_META_SIZE * i + 9, <uint32_t>length)
        dst += length
    finish_batch(out, table_end + <Py_ssize_t>body, <uint32_t>n, first_index)
    return result


# -- public API -------------------------------------------------------------------------------

def crc32c(data, crc=0):
    """CRC32C (Castagnoli) of ``data``; pass a previous result as ``crc`` to continue it."""
    cdef Py_buffer view
    cdef uint64_t c = as_u64(crc)
    if c > 0xFFFFFFFF:
        raise OverflowError("crc must be an unsigned 32-bit value")
    if PyBytes_CheckExact(data):
        return _crc(<const unsigned char *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data),
                    <uint32_t>c)
    get_buffer(data, &view)
    try:
        return _crc(<const unsigned char *>view.buf, view.len, <uint32_t>c)
    finally:
        PyBuffer_Release(&view)


def crc32c_hardware():
    """Whether ``crc32c`` uses the CPU's CRC32C instruction (else slicing-by-8 tables)."""
    return bool(rf_crc_hardware())


def crc32c_tables(data, crc=0):
    """``crc32c`` with the tables alone, whatever the CPU (tests compare the two)."""
    cdef const unsigned char[::1] view = memoryview(data).cast("B")
    cdef uint64_t c = as_u64(crc)
    if c > 0xFFFFFFFF:
        raise OverflowError("crc must be an unsigned 32-bit value")
    if view.shape[0] == 0:
        return c
    return rf_crc32c_tables(<uint32_t>c, &view[0], view.shape[0])


def encode_batch(first_index, terms, payloads, types=None):
    """Pack entries ``first_index, first_index+1, ...`` into one checksummed batch."""
    cdef uint64_t first = as_u64(first_index)
    n = len(terms)
    if len(payloads) != n:
        raise ValueError(f"{n} terms but {len(payloads)} payloads")
    if types is not None and len(types) != n:
        raise ValueError(f"{n} terms but {len(types)} types")
    return _encode(first, terms, payloads, types, False, 0, 0)


def encode_uniform(first_index, term, payloads, etype=0):
    """Pack entries that share one term and type (the leader's proposal path)."""
    cdef uint64_t first = as_u64(first_index)
    cdef uint64_t t = as_u64(term)
    cdef uint8_t y = as_u8(etype)
    return _encode(first, None, payloads, None, True, t, y)


def decode_batch(data):
    """Validate and unpack a batch into (first_index, terms, types, payloads)."""
    cdef Py_buffer view
    cdef uint64_t first
    cdef uint32_t count, i, length
    cdef Py_ssize_t off
    cdef const unsigned char *p
    cdef const unsigned char *rec
    get_buffer(data, &view)
    try:
        p = <const unsigned char *>view.buf
        off = parse_batch_of(data, p, view.len, &first, &count)
        terms = []
        types = []
        payloads = []
        for i in range(count):
            rec = p + C_HEADER_SIZE + <Py_ssize_t>C_META_SIZE * i
            length = rf_load_u32(rec + 9)
            terms.append(rf_load_u64(rec))
            types.append(rec[8])
            payloads.append(PyBytes_FromStringAndSize(<const char *>p + off, length))
            off += length
        return first, terms, types, payloads
    finally:
        PyBuffer_Release(&view)


def entries_of_type(data, etype):
    """Validate a batch and return ``(index, payload)`` of its entries of type ``etype``.

    The core uses it to spot the rare configuration entry in a frame without decoding the rest.
    """
    cdef Py_buffer view
    cdef uint64_t first
    cdef uint32_t count, i, length
    cdef Py_ssize_t off
    cdef const unsigned char *p
    cdef const unsigned char *rec
    cdef uint8_t y = as_u8(etype)
    get_buffer(data, &view)
    try:
        p = <const unsigned char *>view.buf
        off = parse_batch_of(data, p, view.len, &first, &count)
        out = []
        for i in range(count):
            rec = p + C_HEADER_SIZE + <Py_ssize_t>C_META_SIZE * i
            length = rf_load_u32(rec + 9)
            if rec[8] == y:
                # A Python int: first + i may pass 2**64 (the pure twin does not wrap either).
                out.append((<object>first + i,
                            PyBytes_FromStringAndSize(<const char *>p + off, length)))
            off += length
        return out
    finally:
        PyBuffer_Release(&view)


def batch_info(data):
    """Validate a batch fully (including its CRC) and return (first_index, count)."""
    cdef Py_buffer view
    cdef uint64_t first
    cdef uint32_t count
    get_buffer(data, &view)
    try:
        parse_batch_of(data, <const unsigned char *>view.buf, view.len, &first, &count)
    finally:
        PyBuffer_Release(&view)
    return first, count


cdef inline object _pair_item(object x, str what):
    if type(x) is bytes:
        return x
    if isinstance(x, str):
        return (<str>x).encode("utf-8")
    if isinstance(x, (bytes, bytearray, memoryview)):
        return bytes(x)
    raise TypeError(f"{what} must be bytes or str, not {type(x).__name__}")


def flatten_pairs(items):
    """``[key, value, key, value, ...]`` of (key, value) pairs, each as bytes (str as UTF-8,
    bytearray and memoryview copied); TypeError for anything else (a client's put_many)."""
    cdef list out = []
    for item in items:
        if isinstance(item, (str, bytes, bytearray, memoryview)):
            # (a 2-character string unpacked as a pair: put_many(["ab"]) wrote a = b)
            raise TypeError(f"put_many takes (key, value) pairs, got a {type(item).__name__}")
        key, value = item
        out.append(_pair_item(key, "key"))
        out.append(_pair_item(value, "value"))
    return out


def chunk_payloads(payloads, max_bytes, max_count):
    """Greedily split proposals into [start, end) runs that each fit one batch.

    A run holds at most ``max_count`` payloads totalling at most ``max_bytes``, except that a
    single payload larger than ``max_bytes`` travels alone rather than being refused.
    """
    cdef int64_t mb = clamp_index(max_bytes)
    cdef int64_t mc = clamp_index(max_count)
    cdef Py_ssize_t i, start = 0, n, length
    cdef int64_t used = 0
    cdef PyObject **items
    cdef object p
    if mb <= 0 or mc <= 0:
        raise ValueError("max_bytes and max_count must be positive")
    seq = PySequence_Fast(payloads, "payloads must be a sequence")
    n = PySequence_Fast_GET_SIZE(seq)
    items = PySequence_Fast_ITEMS(seq)
    out = []
    for i in range(n):
        p = <object>items[i]
        length = PyBytes_GET_SIZE(p) if PyBytes_CheckExact(p) else len(p)
        if i > start and (i - start >= mc or used + length > mb):
            out.append((start, i))
            start = i
            used = 0
        used += length
    if n > start:
        out.append((start, n))
    return out


@cython.binding(False)
@cython.always_allow_keywords(False)
def commit_index(match_indexes, /):
    """Highest index stored on a majority: the (n//2+1)-th largest match index.

    Called on every acknowledgement, so it is a plain METH_O builtin (positional-only, as in the
    pure twin) working on borrowed list items; anything unusual falls back to Python sorting.
    """
    cdef long long vals[MAX_VOTERS]
    cdef Py_ssize_t pos[MAX_VOTERS]
    cdef Py_ssize_t i, j, n, kp = 0
    cdef long long v
    cdef int overflow
    cdef PyObject **items
    cdef PyObject *o
    seq = PySequence_Fast(match_indexes, "match_indexes must be a sequence")
    n = PySequence_Fast_GET_SIZE(seq)
    if n == 0:
        raise ValueError("commit_index needs at least one match index")
    if n > MAX_VOTERS:
        return sorted(match_indexes, reverse=True)[n // 2]
    items = PySequence_Fast_ITEMS(seq)
    # Insertion sort, descending, remembering where each value came from so the original object
    # is returned (no new int) and ties resolve exactly like Python's stable sort.
    for i in range(n):
        o = items[i]
        if not Long_CheckExact(o):
            return sorted(match_indexes, reverse=True)[n // 2]
        if not rf_small_long(o, &v):
            overflow = 0
            v = PyLong_AsLongLongAndOverflow(<object>o, &overflow)
            if overflow:
                return sorted(match_indexes, reverse=True)[n // 2]
        j = i
        while j > 0 and vals[j - 1] < v:
            vals[j] = vals[j - 1]
            pos[j] = pos[j - 1]
            j -= 1
        vals[j] = v
        pos[j] = i
    if n // 2 < n:   # always true; tells the compiler pos[n // 2] was written
        kp = pos[n // 2]
    return <object>items[kp]


cdef inline bint _varint(const unsigned char *p, Py_ssize_t n, Py_ssize_t *i,
                         uint64_t *out) noexcept nogil:
    """Read a protobuf varint at p[i[0]:n] into out, advancing i; False if it is cut off or
    longer than 10 bytes."""
    cdef uint64_t v = 0
    cdef int shift = 0
    cdef unsigned char b
    while i[0] < n and shift < 70:
        b = p[i[0]]
        i[0] += 1
        v |= (<uint64_t>(b & 0x7F)) << shift if shift < 64 else 0
        if not (b & 0x80):
            out[0] = v
            return True
        shift += 7
    return False


def count_field(data, field, limit):
    """How many times the field numbered ``field`` occurs at the top level of the protobuf
    message ``data``, without parsing it: counting stops past ``limit`` (``limit + 1`` then).
    A message it cannot walk to its end (the wire format breaks, or it holds a group, which
    the parser skips over with whatever it holds) counts ``limit + 1`` too: its ops cannot be
    counted, and the parser would keep them (a review: a group in front hid 780,000 ops)."""
    cdef Py_buffer view
    cdef const unsigned char *p
    cdef Py_ssize_t n, i = 0
    cdef uint64_t wire, tag, length, want = field if field >= 0 else 0xFFFFFFFFFFFFFFFF
    cdef int64_t count = 0, most = clamp_index(limit)
    get_buffer(data, &view)
    try:
        p = <const unsigned char *>view.buf
        n = view.len
        while i < n and count <= most:
            if not _varint(p, n, &i, &tag):
                break
            if (tag >> 3) == want:
                count += 1
            wire = tag & 7
            if wire == 0:
                if not _varint(p, n, &i, &length):
                    break
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            elif wire == 2:
                if not _varint(p, n, &i, &length) or length > <uint64_t>(n - i):
                    break
                i += <Py_ssize_t>length
            else:
                return limit + 1
        else:
            return count if i <= n else limit + 1  # (a fixed-size field cut short)
    finally:
        PyBuffer_Release(&view)
    return limit + 1 if count <= most else count
