# C-level API of raftfast._batch, shared with raftfast._log (and any future Cython module) so
# the log can build and validate packed batches without going through Python objects.

from cpython.long cimport PyLong_Check
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    /* Unaligned little-endian loads/stores; memcpy compiles to a single mov on x86/arm64. */
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    #define RF_BSWAP64(v) __builtin_bswap64(v)
    #define RF_BSWAP32(v) __builtin_bswap32(v)
    #else
    #define RF_BSWAP64(v) (v)
    #define RF_BSWAP32(v) (v)
    #endif
    static inline uint64_t rf_load_u64(const unsigned char *p) {
        uint64_t v; memcpy(&v, p, 8); return RF_BSWAP64(v);
    }
    static inline uint32_t rf_load_u32(const unsigned char *p) {
        uint32_t v; memcpy(&v, p, 4); return RF_BSWAP32(v);
    }
    static inline void rf_store_u64(unsigned char *p, uint64_t v) {
        v = RF_BSWAP64(v); memcpy(p, &v, 8);
    }
    static inline void rf_store_u32(unsigned char *p, uint32_t v) {
        v = RF_BSWAP32(v); memcpy(p, &v, 4);
    }

    /* Every index the log computes with stays inside [RF_CLAMP_LO, RF_CLAMP_HI] (see
       clamp_index): far below any first_index - 1 (< 2**62) and far above any last_index + 1. */
    #define RF_CLAMP_LO (-(INT64_C(1) << 62))
    #define RF_CLAMP_HI INT64_MAX
    """
    uint64_t rf_load_u64(const unsigned char *p) noexcept nogil
    uint32_t rf_load_u32(const unsigned char *p) noexcept nogil
    void rf_store_u64(unsigned char *p, uint64_t v) noexcept nogil
    void rf_store_u32(unsigned char *p, uint32_t v) noexcept nogil
    const int64_t RF_CLAMP_LO
    const int64_t RF_CLAMP_HI

cdef enum:
    C_HEADER_SIZE = 20
    C_META_SIZE = 13
    C_CRC_OFFSET = 16  # the CRC field; it covers header[:16] (magic, count, first index) + body

cdef uint32_t crc32c_update(uint32_t crc, const unsigned char *p, size_t n) noexcept nogil

# Validate the packed batch `data`, whose bytes are at `p` (magic, sizes, CRC), and return the
# offset of its payload area; raises BatchError. The CRC is left out when `data` is the very
# bytes object that checked out last (bytes cannot change).
cdef Py_ssize_t parse_batch_of(object data, const unsigned char *p, Py_ssize_t n,
                               uint64_t *first_index, uint32_t *count) except -1

# Write the header (magic, count, first index, and the CRC over every byte of the batch except
# the CRC field itself) into a fully filled batch buffer of `size` bytes.
cdef void finish_batch(unsigned char *p, Py_ssize_t size, uint32_t count,
                       uint64_t first_index) noexcept nogil

# A Python int as int64, clamped into [RF_CLAMP_LO, RF_CLAMP_HI] so huge values behave like any
# out-of-range value instead of raising OverflowError; non-ints raise TypeError.
cdef int64_t clamp_index(object value) except? -1

# PyObject_GetBuffer(PyBUF_SIMPLE) that reports non-bytes-like objects with TypeError, as
# bytes.join does; the caller must PyBuffer_Release.
cdef int get_buffer(object p, Py_buffer *view) except -1

# Length of / copy out a bytes-like payload (fast path for exact bytes); TypeError otherwise.
cdef Py_ssize_t payload_len(object p) except -1
cdef Py_ssize_t copy_payload(object p, unsigned char *dst) except -1


# Checked conversions for u64/u8 fields.  Plain Cython casts would silently truncate floats;
# like the pure twin, only ints are accepted (TypeError), and out-of-range ints raise
# OverflowError.
cdef inline uint64_t as_u64(object value) except? 0xFFFFFFFFFFFFFFFF:
    if not PyLong_Check(value):
        raise TypeError(f"an integer is required, not {type(value).__name__}")
    return <uint64_t>value


cdef inline uint8_t as_u8(object value) except? 0xFF:
    if not PyLong_Check(value):
        raise TypeError(f"an integer is required, not {type(value).__name__}")
    return <uint8_t>value
