# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The KV store's keys and values in compact form (twin of raftfast._store_py).

A Python dict of bytes costs ~230 bytes for a key of 16 bytes and a value of 64 (two objects
with their headers, the dict's entry and index, a sorted list for scans). Here:

* an *arena*, one growing byte buffer of records ``klen u32 | vlen u32 | key | value``; a
  record is rewritten in place when a value keeps its length, else a new one is appended and
  the old one becomes garbage; once garbage is half of it, the live records slide down over
  it, a few KiB per write;
* a *table*, open addressing with linear probing, one u64 per slot: the record's offset + 1
  (40 bits) and 24 bits of the key's hash, so most probes that miss never touch the arena.
  The hash is Python's own for bytes (SipHash with the process's random key): keys chosen to
  collide cannot be chosen from outside;
* a *sorted index* of record offsets for ordered reads, in blocks of at most 1,024 (a block
  full is split in two, an empty one dropped), so that a key added or removed costs a binary
  search and a move within one block, never a pass over the index (at 3M keys a pass was
  0.3-0.4 s of the loop, on every scan after writes). Built at the first ordered read (sorted
  by 8-byte chunks: sort_by_key) or by load_store, then kept: keys added wait unsorted in a
  short list, merged in once it is full or at the next ordered read (~1 us a new key). A store
  never read in order pays nothing for it; the first ordered read of a big one sorts it all
  (~0.1 s per 1M keys), once.

So a key of 16 bytes with a value of 64 costs 88 bytes of record, 8-16 bytes of table and,
once read in order, 11-16 of index. Behaviour, including exceptions, is the pure twin's
(tests/test_store.py).
"""

cimport cython
from cpython.dict cimport PyDict_GetItem
from cpython.long cimport PyLong_FromUnsignedLongLong
from cpython.object cimport PyObject, PyObject_Hash
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove, memset

from raftfast._batch cimport (
    C_HEADER_SIZE,
    C_META_SIZE,
    parse_batch_of,
    rf_load_u32,
    rf_load_u64,
    rf_store_u32,
)

from raftfast import dedup as _dedup
from raftfast.errors import BatchError

cdef extern from *:
    """
    #define rf_prefetch(p) __builtin_prefetch((const void *)(p))
    static inline uint64_t rf_load_be64(const unsigned char *p) {
        uint64_t v; memcpy(&v, p, 8);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        return v;
    #else
        return __builtin_bswap64(v);
    #endif
    }
    """
    void rf_prefetch(const void *p) noexcept nogil
    uint64_t rf_load_be64(const unsigned char *p) noexcept nogil

cdef extern from "Python.h":
    Py_hash_t _Py_HashBytes(const void *src, Py_ssize_t len)
    # (the same, where the GIL is let go: it reads only the process's hash key)
    Py_hash_t hash_bytes_nogil "_Py_HashBytes" (const void *src, Py_ssize_t len) nogil

DEF HEADER = 8                      # klen u32 | vlen u32
DEF EMPTY = 0
DEF TOMB = 1
DEF TAG_BITS = 24
DEF TAG_MASK = 0xFFFFFF
DEF MAX_OFFSET = (1 << 40) - 2      # an arena of up to 1 TiB
DEF MAX_EXTRA = 256                 # added keys waiting outside the index
DEF BLOCK = 1024                    # index entries a block holds at most
DEF BLOCK_FILL = 768                # ... when the index is built from a sorted array
DEF MIN_SLOTS = 8
DEF SLIDE_STEP = 16384              # arena bytes a compaction under way looks at per write
DEF MIGRATE_STEP = 64               # slots of a grown table's old one moved over per write
# ... but a put_many moves at most MOVE_PER_CALL in all (at least MIN_MIGRATE_STEP a pair):
# one of 50,000 new keys is 50,000 writes in one apply, and at 64 each moved 3,200,000 slots
# at once (0.4-0.5 s of the loop at 6.4M keys, leader changes; a hunt). The old table holds
# 4/3 of the keys in slots, and the new one takes at least half the keys again (added or
# deleted) before it grows: 4 a write end the move with room to spare (1.33 needed).
DEF MOVE_PER_CALL = 262144
DEF MIN_MIGRATE_STEP = 4
DEF MAX_LEN = 0xFFFFFFFF
DEF MAX_KEY_LEN = 0x7FFFFFFF       # (a garbage record's klen has the top bit set: mark_garbage)
DEF SLOT_AHEAD = 16                 # put_packed: prefetch the slot of the pair this far ahead
DEF RECORD_AHEAD = 8                # ... and the record that slot points to

__all__ = ["FrozenStore", "KeyStore", "apply_writes", "check_packed", "load_store", "sum_u32"]


ctypedef struct Shared:
    # An arena read by a FrozenStore: freed by whichever of its holders lets go last.
    unsigned char *data
    Py_ssize_t refs


cdef void release_share(Shared *share) noexcept:
    share.refs -= 1
    if share.refs == 0:
        free(share.data)
        free(share)


cdef inline int compare_keys(const unsigned char *arena, uint64_t a, uint64_t b) noexcept nogil:
    """memcmp order of the keys of records ``a`` and ``b`` (shorter first on a tie)."""
    cdef uint32_t la = rf_load_u32(arena + a), lb = rf_load_u32(arena + b)
    cdef int c = memcmp(arena + a + HEADER, arena + b + HEADER, la if la < lb else lb)
    if c:
        return c
    return (la > lb) - (la < lb)


cdef inline int compare_to(const unsigned char *arena, uint64_t a, const unsigned char *key,
                           Py_ssize_t klen) noexcept nogil:
    """The order of record ``a``'s key against ``key``."""
    cdef uint32_t la = rf_load_u32(arena + a)
    cdef int c = memcmp(arena + a + HEADER, key, la if la < <uint64_t>klen else klen)
    if c:
        return c
    return (la > klen) - (la < klen)


cdef void merge_sort(uint64_t *items, uint64_t *scratch, Py_ssize_t n,
                     const unsigned char *arena) noexcept nogil:
    """Sort record offsets by key (bottom-up merge sort; no comparator globals, so two stores
    may sort at once in two threads)."""
    cdef Py_ssize_t width = 1, lo, mid, hi, i, j, k
    cdef uint64_t *src = items
    cdef uint64_t *dst = scratch
    cdef uint64_t *tmp
    while width < n:
        lo = 0
        while lo < n:
            mid = lo + width if lo + width < n else n
            hi = lo + 2 * width if lo + 2 * width < n else n
            i, j, k = lo, mid, lo
            while i < mid and j < hi:
                if compare_keys(arena, src[i], src[j]) <= 0:
                    dst[k] = src[i]
                    i += 1
                else:
                    dst[k] = src[j]
                    j += 1
                k += 1
            while i < mid:
                dst[k] = src[i]
                i += 1
                k += 1
            while j < hi:
                dst[k] = src[j]
                j += 1
                k += 1
            lo = hi
        tmp = src
        src = dst
        dst = tmp
        width *= 2
    if src != items:
        memcpy(items, src, n * sizeof(uint64_t))


ctypedef struct KeyChunk:
    uint64_t chunk      # 8 bytes of the key from where the sort has got to, big-endian
    uint64_t off        # the record


DEF RADIX_MIN_RUN = 32      # shorter runs of keys alike so far are sorted by comparison
DEF RADIX_MAX_DEPTH = 64    # keys alike past 512 bytes: merge sort for that run


cdef inline uint64_t key_chunk(const unsigned char *arena, uint64_t off, uint64_t at) noexcept nogil:
    """Bytes ``at`` to ``at`` + 8 of record ``off``'s key as a big-endian number, zeros past
    its end (so chunks order like the bytes: memcmp's order, a shorter key tied with zeros)."""
    cdef uint64_t klen = rf_load_u32(arena + off), v = 0, i
    cdef const unsigned char *k = arena + off + HEADER + at
    if klen >= at + 8:
        return rf_load_be64(k)
    if klen <= at:
        return 0
    for i in range(klen - at):
        v |= (<uint64_t>k[i]) << (56 - 8 * i)
    return v


cdef uint64_t same_bytes(const unsigned char *arena, KeyChunk *a, Py_ssize_t n,
                         uint64_t at) noexcept nogil:
    """Sets each key's chunk at ``at``; returns how many bytes from ``at`` on all the keys of
    ``a`` share (or 0 once it is under 8: the caller has no use for the exact number). One
    pass over the records: each is read once, for both."""
    cdef const unsigned char *first = arena + a[0].off + HEADER
    cdef uint64_t common = rf_load_u32(arena + a[0].off), klen, j
    cdef const unsigned char *k
    cdef Py_ssize_t i
    common = common - at if common > at else 0
    a[0].chunk = key_chunk(arena, a[0].off, at)
    for i in range(1, n):
        if i + 8 < n:
            rf_prefetch(arena + a[i + 8].off)  # (records lie anywhere in the arena)
        a[i].chunk = key_chunk(arena, a[i].off, at)
        if common < 8:
            common = 0
            continue
        klen = rf_load_u32(arena + a[i].off)
        if klen < at + common:
            common = klen - at if klen > at else 0
        k = arena + a[i].off + HEADER
        j = 0
        while j + 8 <= common and rf_load_be64(k + at + j) == rf_load_be64(first + at + j):
            j += 8
        while j < common and k[at + j] == first[at + j]:
            j += 1
        common = j
    return common


cdef void insertion_sort(KeyChunk *a, Py_ssize_t n, const unsigned char *arena) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef KeyChunk x
    for i in range(1, n):
        x = a[i]
        j = i
        while j > 0 and compare_keys(arena, a[j - 1].off, x.off) > 0:
            a[j] = a[j - 1]
            j -= 1
        a[j] = x


cdef int radix_sort(KeyChunk *a, KeyChunk *tmp, Py_ssize_t n, const unsigned char *arena,
                    uint64_t at, int depth, Py_ssize_t *counts) noexcept nogil:
    """Sort ``a`` (whose keys agree on their first ``at`` bytes) by key: least significant
    byte first over the 8-byte chunks at ``at`` (a byte on which all agree is skipped), then
    each run of equal chunks on from ``at`` + 8. ``tmp``: as long as ``a``; ``counts``: 8 x
    256, free for this call's use. -1 if out of memory (``a`` is then some permutation)."""
    cdef Py_ssize_t i, j, b, v, total, c
    cdef KeyChunk *src = a
    cdef KeyChunk *dst = tmp
    cdef KeyChunk *swap
    cdef uint64_t *offs
    cdef uint64_t *scratch
    cdef uint64_t longest
    cdef uint64_t alike = same_bytes(arena, a, n, at)  # (and the chunks at ``at``)
    if alike >= 8:  # (a prefix all these keys share: skip it at once, not 8 bytes a pass)
        at += alike - alike % 8
        for i in range(n):
            a[i].chunk = key_chunk(arena, a[i].off, at)
    memset(counts, 0, 8 * 256 * sizeof(Py_ssize_t))
    for i in range(n):
        for b in range(8):
            counts[b * 256 + ((a[i].chunk >> (8 * b)) & 0xFF)] += 1
    for b in range(8):
        if counts[b * 256 + ((src[0].chunk >> (8 * b)) & 0xFF)] == n:
            continue  # (every key has the same byte here)
        total = 0
        for v in range(256):
            c = counts[b * 256 + v]
            counts[b * 256 + v] = total
            total += c
        for i in range(n):
            v = (src[i].chunk >> (8 * b)) & 0xFF
            dst[counts[b * 256 + v]] = src[i]
            counts[b * 256 + v] += 1
        swap = src
        src = dst
        dst = swap
    if src != a:
        memcpy(a, src, n * sizeof(KeyChunk))
    i = 0
    while i < n:
        j = i + 1
        while j < n and a[j].chunk == a[i].chunk:
            j += 1
        longest = 0
        if j - i > RADIX_MIN_RUN:
            for c in range(i, j):
                if rf_load_u32(arena + a[c].off) > longest:
                    longest = rf_load_u32(arena + a[c].off)
        if j - i <= RADIX_MIN_RUN or longest <= at + 8:
            # (within a run of whole keys tied with zeros, shorter first: compare_keys)
            insertion_sort(a + i, j - i, arena)
        elif depth < RADIX_MAX_DEPTH:
            if radix_sort(a + i, tmp + i, j - i, arena, at + 8, depth + 1, counts) < 0:
                return -1
        else:
            offs = <uint64_t *>malloc(2 * (j - i) * sizeof(uint64_t))
            if offs == NULL:
                return -1
            scratch = offs + (j - i)
            for c in range(j - i):
                offs[c] = a[i + c].off
            merge_sort(offs, scratch, j - i, arena)
            for c in range(j - i):
                a[i + c].off = offs[c]
            free(offs)
        i = j
    return 0


cdef int sort_by_key(uint64_t *items, Py_ssize_t n, const unsigned char *arena) noexcept nogil:
    """Sort record offsets by key, as merge_sort does, in a few passes over an array of the
    keys' leading bytes instead of n log n comparisons that each read two records scattered
    over the arena (a snapshot of 100,000 keys sorted them in ~34 ms, every time). -1 if out
    of memory (``items`` unchanged)."""
    cdef KeyChunk *a = <KeyChunk *>malloc(2 * n * sizeof(KeyChunk) + 1)
    cdef Py_ssize_t *counts = <Py_ssize_t *>malloc(8 * 256 * sizeof(Py_ssize_t))
    cdef Py_ssize_t i
    cdef int ok
    if a == NULL or counts == NULL:
        free(a)
        free(counts)
        return -1
    for i in range(n):
        a[i].off = items[i]
    ok = radix_sort(a, a + n, n, arena, 0, 0, counts) if n > 1 else 0
    if ok == 0:
        for i in range(n):
            items[i] = a[i].off
    free(a)
    free(counts)
    return ok


cdef int sort_offsets(uint64_t *items, Py_ssize_t n, const unsigned char *arena) noexcept nogil:
    """Sort record offsets by key: by 8-byte chunks, else (no memory for that) by merges;
    -1 if there is no memory for either."""
    cdef uint64_t *scratch
    if sort_by_key(items, n, arena) >= 0:
        return 0
    scratch = <uint64_t *>malloc((n + 1) * sizeof(uint64_t))
    if scratch == NULL:
        return -1
    merge_sort(items, scratch, n, arena)
    free(scratch)
    return 0


cdef inline Py_hash_t key_hash(bytes key) except? -1:
    return PyObject_Hash(key)  # cached on the bytes object; _Py_HashBytes of its content


cdef inline void mark_garbage(unsigned char *arena, uint64_t off) noexcept:
    rf_store_u32(arena + off, rf_load_u32(arena + off) | (<uint32_t>1 << 31))


cdef inline Py_ssize_t probe(const uint64_t *slots, uint64_t mask, const unsigned char *arena,
                             const unsigned char *k, Py_ssize_t klen, uint64_t h) noexcept:
    """The slot of table ``slots`` holding key ``k`` (hash ``h``), or -1."""
    cdef uint64_t tag = (h >> 40) & TAG_MASK, i = h & mask, s, off
    while True:
        s = slots[i]
        if s == EMPTY:
            return -1
        if s != TOMB and (s & TAG_MASK) == tag:
            off = (s >> TAG_BITS) - 1
            if rf_load_u32(arena + off) == klen and memcmp(arena + off + HEADER, k, klen) == 0:
                return i
        i = (i + 1) & mask


cdef class KeyStore:
    """Keys and values (``bytes``), with reads in key order."""

    cdef unsigned char *_arena
    cdef uint64_t _used           # arena bytes written
    cdef uint64_t _cap            # arena bytes allocated
    cdef uint64_t _garbage        # arena bytes of records no longer live
    cdef bint _sliding            # a compaction is under way (see "the arena")
    cdef Shared *_share           # the arena, while a FrozenStore reads it (see freeze)
    cdef uint64_t _frozen_used    # ... the part of it that it reads
    cdef uint64_t *_deferred      # records there that became garbage since, not marked yet
    cdef Py_ssize_t _deferred_len, _deferred_cap
    cdef uint64_t _slide_from, _slide_to
    cdef uint64_t *_slots
    cdef uint64_t _mask           # slots - 1
    cdef uint64_t *_old           # the table before it grew, while its keys move; or NULL
    cdef uint64_t _old_mask
    cdef uint64_t _old_next       # its next slot to move
    cdef Py_ssize_t _count        # live keys
    cdef Py_ssize_t _tombs        # deleted slots
    cdef uint64_t **_blocks       # the sorted index: blocks of offsets; NULL: not built
    cdef uint32_t *_blens         # entries in each block (never 0)
    cdef Py_ssize_t _nblocks
    cdef Py_ssize_t _blocks_cap   # room in _blocks and _blens
    cdef Py_ssize_t _index_len    # entries in all blocks
    cdef uint64_t _extra[MAX_EXTRA]  # offsets of keys added since, unsorted
    cdef Py_ssize_t _extra_len
    cdef uint64_t _step           # slots of the old table moved per write (MIGRATE_STEP)
    cdef readonly long long size_bytes  # of the keys and values held

    def __cinit__(self):
        self._step = MIGRATE_STEP
        self._slots = <uint64_t *>malloc(MIN_SLOTS * sizeof(uint64_t))
        if self._slots == NULL:
            raise MemoryError()
        for i in range(MIN_SLOTS):
            self._slots[i] = EMPTY
        self._mask = MIN_SLOTS - 1

    def __dealloc__(self):
        if self._share != NULL:
            release_share(self._share)  # (the arena goes with the last of its readers)
        else:
            free(self._arena)
        free(self._slots)
        free(self._old)
        free(self._deferred)
        self._drop_index()

    def __len__(self):
        return self._count

    @property
    def table_moving(self):
        """Slots of the table before it grew still to look at (0: none; a step per write)."""
        return self._old_mask + 1 - self._old_next if self._old != NULL else 0

    @property
    def compacting(self):
        """Whether a compaction of the arena is under way (taken a step per write)."""
        return bool(self._sliding)

    def __contains__(self, key):
        if type(key) is not bytes:
            return False
        return self._find(key) != <Py_ssize_t>-1

    # -- the table ---------------------------------------------------------------------------
    # It grows in steps, not at once: doubling a table of 6M keys rehashed them all in one
    # write, 0.7 s of the loop (1.5 s at 12M). The old table stays beside the new one while
    # every later write moves MIGRATE_STEP of its slots over (a put_many fewer: MOVE_PER_CALL); a key looked up meanwhile is
    # found in either (and moved over on the way), so callers only ever see slots of the new.

    cdef Py_ssize_t _find(self, bytes key) except -2:
        """The slot holding ``key``, or -1."""
        return self._find_raw(
            <const unsigned char *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key),
            <uint64_t>key_hash(key),
        )

    cdef Py_ssize_t _find_raw(self, const unsigned char *k, Py_ssize_t klen, uint64_t h) noexcept:
        cdef Py_ssize_t i = probe(self._slots, self._mask, self._arena, k, klen, h)
        if i < 0 and self._old != NULL:
            i = probe(self._old, self._old_mask, self._arena, k, klen, h)
            if i >= 0:
                return self._move_over(i)
        return i

    cdef uint64_t _claim(self, uint64_t h) noexcept:
        """The first free slot (empty, or a tombstone: reused) of the table for hash ``h``."""
        cdef uint64_t j = h & self._mask
        while self._slots[j] != EMPTY and self._slots[j] != TOMB:
            j = (j + 1) & self._mask
        if self._slots[j] == TOMB:
            self._tombs -= 1
        return j

    cdef Py_ssize_t _move_over(self, uint64_t i) noexcept:
        """Move the key in slot ``i`` of the old table to the new one; its slot there."""
        cdef uint64_t s = self._old[i], off = (s >> TAG_BITS) - 1, j
        j = self._claim(<uint64_t>_Py_HashBytes(self._arena + off + HEADER, rf_load_u32(self._arena + off)))
        self._slots[j] = s
        self._old[i] = TOMB  # (not EMPTY: later keys of its probe run are still found)
        return j

    cdef void _migrate(self, uint64_t step) noexcept:
        """Move the next ``step`` slots of the old table over (all: the rest)."""
        cdef uint64_t i, end
        if self._old == NULL:
            return
        end = min(self._old_next + step, self._old_mask + 1)
        for i in range(self._old_next, end):
            if self._old[i] != EMPTY and self._old[i] != TOMB:
                self._move_over(i)
        self._old_next = end
        if end == self._old_mask + 1:
            free(self._old)
            self._old = NULL

    cdef int _resize(self, uint64_t slots) except -1:
        """Start moving to a table of ``slots`` (the keys follow in later writes)."""
        cdef uint64_t *new = <uint64_t *>calloc(slots, sizeof(uint64_t))  # (EMPTY is 0)
        if new == NULL:
            raise MemoryError()
        self._migrate(self._old_mask + 1)  # (a move still under way is finished first)
        self._old, self._old_mask, self._old_next = self._slots, self._mask, 0
        self._slots = new
        self._mask = slots - 1
        self._tombs = 0
        return 0

    cdef int _room_for_one(self) except -1:
        """Keep the table at most 3/4 full, tombstones counted (a move under way gets its
        steps: it is over long before the new table could fill)."""
        cdef uint64_t n = self._mask + 1
        self._migrate(self._step)
        if (self._count + self._tombs + 1) * 4 > n * 3:
            while (self._count + 1) * 2 > n:  # grow to at most half full
                n *= 2
            self._resize(n)
        return 0

    cdef uint64_t _append(self, const unsigned char *key, Py_ssize_t klen,
                          const unsigned char *value, Py_ssize_t vlen) except? 0:
        """A new record in the arena; its offset (the arena may move)."""
        cdef uint64_t need = HEADER + klen + vlen, cap, off
        cdef unsigned char *grown
        if self._used + need > self._cap:
            cap = self._cap * 2 if self._cap else 4096
            while cap < self._used + need:
                cap *= 2
            if cap > MAX_OFFSET:
                if self._used + need > MAX_OFFSET:
                    raise MemoryError("the KV store's arena is full (1 TiB)")
                cap = MAX_OFFSET
            if self._shared():  # (a FrozenStore reads this one: it keeps it)
                grown = <unsigned char *>malloc(cap)
                if grown == NULL:
                    raise MemoryError()
                memcpy(grown, self._arena, self._used)
                release_share(self._share)
                self._share = NULL
                self._arena = grown
                self._mark_deferred()
            else:
                grown = <unsigned char *>realloc(self._arena, cap)
                if grown == NULL:
                    raise MemoryError()
                self._arena = grown
            self._cap = cap
        off = self._used
        rf_store_u32(self._arena + off, <uint32_t>klen)
        rf_store_u32(self._arena + off + 4, <uint32_t>vlen)
        memcpy(self._arena + off + HEADER, key, klen)
        memcpy(self._arena + off + HEADER + klen, value, vlen)
        self._used += need
        return off

    cdef inline uint64_t _record_size(self, uint64_t off) noexcept:
        return HEADER + rf_load_u32(self._arena + off) + rf_load_u32(self._arena + off + 4)

    # -- writing -----------------------------------------------------------------------------

    def put(self, bytes key not None, bytes value not None):
        """Set ``key``; the length of the value it replaced, or -1 if it was new."""
        return self._put(key, value)

    cdef long long _put(self, bytes key, bytes value) except -2:
        cdef Py_ssize_t klen = PyBytes_GET_SIZE(key), vlen = PyBytes_GET_SIZE(value)
        if klen > MAX_KEY_LEN or vlen > MAX_LEN:
            raise ValueError("keys are at most 2 GiB and values at most 4 GiB")
        return self._put_raw(
            <const unsigned char *>PyBytes_AS_STRING(key), klen,
            <const unsigned char *>PyBytes_AS_STRING(value), vlen, <uint64_t>key_hash(key),
        )

    cdef long long _put_raw(self, const unsigned char *k, Py_ssize_t klen,
                            const unsigned char *v, Py_ssize_t vlen, uint64_t h) except -2:
        cdef Py_ssize_t slot
        cdef uint64_t tag, i, s, off, old_off, old_vlen
        cdef bint frozen
        slot = self._find_raw(k, klen, h)
        if slot >= 0:
            s = self._slots[slot]
            old_off = (s >> TAG_BITS) - 1
            old_vlen = rf_load_u32(self._arena + old_off + 4)
            frozen = self._shared() and old_off < self._frozen_used
            if old_vlen == <uint64_t>vlen and not frozen:
                memcpy(self._arena + old_off + HEADER + klen, v, vlen)
                # (garbage left by rewrites appended while a snapshot read the arena: a load
                # of rewrites in place never compacted it, and it grew at every snapshot)
                self._compact_some(0)
            else:
                if frozen:
                    self._defer_room()
                off = self._append(k, klen, v, vlen)
                self._slots[slot] = ((off + 1) << TAG_BITS) | (s & TAG_MASK)
                self._garbage += HEADER + klen + old_vlen
                self._moved(old_off, off)
                self._became_garbage(old_off)
                self._compact_some(HEADER + klen + vlen)
            self.size_bytes += vlen - <long long>old_vlen
            self._migrate(self._step)  # (a store only rewritten finishes its move too)
            return old_vlen
        self._room_for_one()
        off = self._append(k, klen, v, vlen)
        self._slots[self._claim(h)] = ((off + 1) << TAG_BITS) | ((h >> 40) & TAG_MASK)
        self._count += 1
        self.size_bytes += klen + vlen
        self._added(off)
        if self._sliding:
            self._slide(2 * (HEADER + klen + vlen) + SLIDE_STEP)
        return -1

    def put_many(self, keys, values):
        if len(keys) != len(values):
            raise ValueError("put_many: as many values as keys are needed")
        for key, value in zip(keys, values):
            if type(key) is not bytes or type(value) is not bytes:
                raise TypeError(
                    f"keys and values are bytes, not {type(key if type(key) is not bytes else value).__name__}"
                )
            self._put(key, value)

    def put_packed(self, data):
        """Set every pair of ``data`` (``raftfast.kv.commands.pack_pairs`` output), all or
        none: ValueError, and nothing changed, if it is not well formed."""
        cdef const unsigned char[::1] view = memoryview(data).cast("B")
        cdef const unsigned char *p
        cdef const unsigned char *rec
        cdef uint32_t count = 0, klen, vlen
        cdef Py_ssize_t off, j, n
        cdef uint64_t s
        cdef uint64_t *hashes
        cdef Py_ssize_t *offs
        if view.shape[0] == 0:
            raise ValueError("bad packed pairs: empty")
        p = &view[0]
        off = packed_pairs(data, p, view.shape[0], &count)
        n = count // 2
        # Each put reads a table slot and the record it points to, at random: two cache misses
        # that were a quarter of a follower's CPU under a batched load. So the hashes come
        # first, and while pair j is put, the slot of pair j + SLOT_AHEAD and the record of
        # pair j + RECORD_AHEAD are fetched (prefetches are hints: a table grown meanwhile
        # only makes one useless).
        hashes = <uint64_t *>malloc(n * sizeof(uint64_t) + 1)
        offs = <Py_ssize_t *>malloc(n * sizeof(Py_ssize_t) + 1)
        if hashes == NULL or offs == NULL:
            free(hashes)
            free(offs)
            raise MemoryError()
        if n * MIGRATE_STEP > MOVE_PER_CALL:
            self._step = max(MIN_MIGRATE_STEP, MOVE_PER_CALL // n)
        try:
            for j in range(n):
                rec = p + C_HEADER_SIZE + <Py_ssize_t>C_META_SIZE * (2 * j)
                klen = rf_load_u32(rec + 9)
                offs[j] = off
                hashes[j] = <uint64_t>_Py_HashBytes(p + off, klen)
                off += klen + rf_load_u32(rec + C_META_SIZE + 9)
            for j in range(min(n, SLOT_AHEAD)):
                rf_prefetch(&self._slots[hashes[j] & self._mask])
            for j in range(n):
                if j + SLOT_AHEAD < n:
                    rf_prefetch(&self._slots[hashes[j + SLOT_AHEAD] & self._mask])
                if j + RECORD_AHEAD < n:
                    s = self._slots[hashes[j + RECORD_AHEAD] & self._mask]
                    if s != EMPTY and s != TOMB:
                        rf_prefetch(self._arena + (s >> TAG_BITS) - 1)
                rec = p + C_HEADER_SIZE + <Py_ssize_t>C_META_SIZE * (2 * j)
                klen = rf_load_u32(rec + 9)
                vlen = rf_load_u32(rec + C_META_SIZE + 9)
                self._put_raw(p + offs[j], klen, p + offs[j] + klen, vlen, hashes[j])
        finally:
            self._step = MIGRATE_STEP
            free(hashes)
            free(offs)

    def delete(self, bytes key not None):
        """Remove ``key``; the length of its value, or -1 if it was absent."""
        return self._delete_raw(
            <const unsigned char *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key),
            <uint64_t>key_hash(key),
        )

    cdef long long _delete_raw(self, const unsigned char *k, Py_ssize_t klen, uint64_t h) except -2:
        cdef Py_ssize_t slot = self._find_raw(k, klen, h)
        cdef uint64_t off, vlen
        if slot < 0:
            return -1
        off = (self._slots[slot] >> TAG_BITS) - 1
        if self._shared() and off < self._frozen_used:
            self._defer_room()
        vlen = rf_load_u32(self._arena + off + 4)
        self._slots[slot] = TOMB
        self._tombs += 1
        self._count -= 1
        self.size_bytes -= klen + <long long>vlen
        self._garbage += HEADER + klen + vlen
        self._removed_key(off)
        self._became_garbage(off)
        self._migrate(MIGRATE_STEP)
        self._compact_some(0)
        return vlen

    # -- the sorted index --------------------------------------------------------------------

    cdef void _drop_index(self) noexcept:
        """Forget the index (rebuilt at the next ordered read)."""
        cdef Py_ssize_t b
        if self._blocks != NULL:
            for b in range(self._nblocks):
                free(self._blocks[b])
        free(self._blocks)
        free(self._blens)
        self._blocks = NULL
        self._blens = NULL
        self._nblocks = self._blocks_cap = self._index_len = self._extra_len = 0

    cdef int _set_index(self, uint64_t *items, Py_ssize_t n) except -1:
        """The index from the ``n`` sorted offsets at ``items`` (copied; the caller frees)."""
        cdef Py_ssize_t nb = (n + BLOCK_FILL - 1) // BLOCK_FILL, b, size
        self._drop_index()
        self._blocks = <uint64_t **>malloc((nb + 8) * sizeof(uint64_t *))
        self._blens = <uint32_t *>malloc((nb + 8) * sizeof(uint32_t))
        if self._blocks == NULL or self._blens == NULL:
            self._drop_index()
            raise MemoryError()
        self._blocks_cap = nb + 8
        for b in range(nb):
            size = min(<Py_ssize_t>BLOCK_FILL, n - b * BLOCK_FILL)
            self._blocks[b] = <uint64_t *>malloc(BLOCK * sizeof(uint64_t))
            if self._blocks[b] == NULL:
                self._nblocks = b
                self._drop_index()
                raise MemoryError()
            memcpy(self._blocks[b], items + b * BLOCK_FILL, size * sizeof(uint64_t))
            self._blens[b] = <uint32_t>size
        self._nblocks = nb
        self._index_len = n
        return 0

    cdef Py_ssize_t _block_at(self, const unsigned char *k, Py_ssize_t klen) noexcept:
        """The first block whose last key is not below ``k`` (_nblocks: none)."""
        cdef Py_ssize_t lo = 0, hi = self._nblocks, mid
        while lo < hi:
            mid = (lo + hi) // 2
            if compare_to(self._arena, self._blocks[mid][self._blens[mid] - 1], k, klen) < 0:
                lo = mid + 1
            else:
                hi = mid
        return lo

    cdef Py_ssize_t _in_block(self, Py_ssize_t b, const unsigned char *k, Py_ssize_t klen) noexcept:
        """The first entry of block ``b`` whose key is not below ``k``."""
        cdef Py_ssize_t lo = 0, hi = self._blens[b], mid
        cdef uint64_t *block = self._blocks[b]
        while lo < hi:
            mid = (lo + hi) // 2
            if compare_to(self._arena, block[mid], k, klen) < 0:
                lo = mid + 1
            else:
                hi = mid
        return lo

    cdef inline Py_ssize_t _block_of(self, uint64_t off, Py_ssize_t *at) noexcept:
        """Where record ``off``'s key is in the index: its block (``at``: its entry), or -1."""
        cdef const unsigned char *k = self._arena + off + HEADER
        cdef Py_ssize_t klen = rf_load_u32(self._arena + off)
        cdef Py_ssize_t b = self._block_at(k, klen)
        if b == self._nblocks:
            return -1
        at[0] = self._in_block(b, k, klen)
        if compare_to(self._arena, self._blocks[b][at[0]], k, klen) != 0:
            return -1
        return b

    cdef int _insert(self, uint64_t off) except -1:
        """Put record ``off``'s key (not in the index) in its place."""
        cdef const unsigned char *k = self._arena + off + HEADER
        cdef Py_ssize_t klen = rf_load_u32(self._arena + off), b, i, half = BLOCK // 2
        cdef uint64_t *block
        cdef uint64_t *upper
        if self._nblocks + 1 > self._blocks_cap and self._grow_blocks() < 0:
            return -1
        b = self._block_at(k, klen)
        if b == self._nblocks:  # past every key: the last block (or a first one)
            if b == 0:
                block = <uint64_t *>malloc(BLOCK * sizeof(uint64_t))
                if block == NULL:
                    raise MemoryError()
                self._blocks[0] = block
                self._blens[0] = 0
                self._nblocks = 1
            else:
                b -= 1
        i = self._in_block(b, k, klen)
        if self._blens[b] == BLOCK:  # full: its upper half becomes the next block
            upper = <uint64_t *>malloc(BLOCK * sizeof(uint64_t))
            if upper == NULL:
                raise MemoryError()
            memcpy(upper, self._blocks[b] + half, half * sizeof(uint64_t))
            memmove(self._blocks + b + 2, self._blocks + b + 1, (self._nblocks - b - 1) * sizeof(uint64_t *))
            memmove(self._blens + b + 2, self._blens + b + 1, (self._nblocks - b - 1) * sizeof(uint32_t))
            self._blocks[b + 1] = upper
            self._blens[b + 1] = <uint32_t>half
            self._blens[b] = <uint32_t>half
            self._nblocks += 1
            if i > half:
                b += 1
                i -= half
        block = self._blocks[b]
        memmove(block + i + 1, block + i, (self._blens[b] - i) * sizeof(uint64_t))
        block[i] = off
        self._blens[b] += 1
        self._index_len += 1
        return 0

    cdef int _grow_blocks(self) except -1:
        cdef Py_ssize_t cap = self._blocks_cap * 2 + 8
        cdef uint64_t **blocks = <uint64_t **>realloc(self._blocks, cap * sizeof(uint64_t *))
        cdef uint32_t *blens
        if blocks == NULL:
            raise MemoryError()
        self._blocks = blocks
        blens = <uint32_t *>realloc(self._blens, cap * sizeof(uint32_t))
        if blens == NULL:
            raise MemoryError()
        self._blens = blens
        self._blocks_cap = cap
        return 0

    cdef void _added(self, uint64_t off) noexcept:
        if self._blocks == NULL:
            return
        if self._extra_len == MAX_EXTRA and self._merge_extra() < 0:
            return  # (out of memory: the index was dropped, to be rebuilt)
        self._extra[self._extra_len] = off
        self._extra_len += 1

    cdef int _merge_extra(self) noexcept:
        """Put the keys waiting in ``_extra`` in the index (in key order: nearby blocks in
        turn). -1, and the index dropped, if memory ran out."""
        cdef uint64_t scratch[MAX_EXTRA]
        cdef Py_ssize_t i
        merge_sort(self._extra, scratch, self._extra_len, self._arena)
        for i in range(self._extra_len):
            try:
                self._insert(self._extra[i])
            except MemoryError:
                self._drop_index()
                return -1
        self._extra_len = 0
        return 0

    cdef void _removed_key(self, uint64_t off) noexcept:
        cdef Py_ssize_t i, b
        if self._blocks == NULL:
            return
        for i in range(self._extra_len):
            if self._extra[i] == off:
                self._extra_len -= 1
                self._extra[i] = self._extra[self._extra_len]
                return
        b = self._block_of(off, &i)
        if b < 0:
            return
        self._blens[b] -= 1
        self._index_len -= 1
        if self._blens[b]:
            memmove(self._blocks[b] + i, self._blocks[b] + i + 1, (self._blens[b] - i) * sizeof(uint64_t))
            return
        free(self._blocks[b])  # (no empty blocks: each has a last key)
        self._nblocks -= 1
        memmove(self._blocks + b, self._blocks + b + 1, (self._nblocks - b) * sizeof(uint64_t *))
        memmove(self._blens + b, self._blens + b + 1, (self._nblocks - b) * sizeof(uint32_t))

    cdef void _moved(self, uint64_t old, uint64_t new) noexcept:
        """Record ``old`` is moving to ``new`` (called while ``old`` is still whole: it is
        what the index is searched by)."""
        cdef Py_ssize_t i, b
        if self._blocks == NULL:
            return
        for i in range(self._extra_len):
            if self._extra[i] == old:
                self._extra[i] = new
                return
        b = self._block_of(old, &i)
        if b >= 0 and self._blocks[b][i] == old:
            self._blocks[b][i] = new

    cdef int _ordered(self) except -1:
        """Bring the index up to date: every live key once, in order."""
        cdef uint64_t *items
        cdef uint64_t s
        cdef Py_ssize_t n = 0, i
        cdef int sorted_
        if self._blocks != NULL:
            if self._extra_len and self._merge_extra() < 0:
                raise MemoryError()
            return 0
        self._migrate(self._old_mask + 1)  # (a pass over every key anyway)
        items = <uint64_t *>malloc((self._count + 1) * sizeof(uint64_t))
        if items == NULL:
            raise MemoryError()
        for i in range(self._mask + 1):
            s = self._slots[i]
            if s != EMPTY and s != TOMB:
                items[n] = (s >> TAG_BITS) - 1
                n += 1
        with nogil:
            sorted_ = sort_offsets(items, n, self._arena)
        try:
            if sorted_ < 0:
                raise MemoryError()
            self._set_index(items, n)
        finally:
            free(items)
        return 0

    # -- the arena ---------------------------------------------------------------------------
    # Once half of it is garbage, the live records slide down over it in arena order, a few
    # KiB per write (all at once this was 0.12 s of the loop at 3M keys, ~1 s near a 2 GiB
    # quota). _slide_from is the next record to look at and _slide_to where the next live one
    # goes: records before the first are compacted, from it on they are as they were, the
    # bytes between the two are no one's. A record is live if its key's slot points to it.

    cdef int _compact_some(self, uint64_t written) except -1:
        """Start compacting if half the arena is garbage, and take a step of a compaction under
        way: at least twice the ``written`` bytes this write appended, so it ends."""
        if self._shared():
            return 0  # (a FrozenStore reads the records where they are)
        if not self._sliding:
            if self._garbage < 65536 or self._garbage * 2 < self._used:
                return 0
            self._sliding = 1
            self._slide_from = self._slide_to = 0
        self._slide(2 * written + SLIDE_STEP)
        return 0

    cdef void _slide(self, uint64_t budget) noexcept:
        cdef uint64_t p, q, size, s
        cdef uint32_t klen
        cdef Py_ssize_t slot
        cdef unsigned char *arena = self._arena
        if self._shared():
            return  # (paused: a FrozenStore reads the records where they are)
        while self._slide_from < self._used and budget:
            p = self._slide_from
            klen = rf_load_u32(arena + p)
            size = HEADER + (klen & MAX_KEY_LEN) + rf_load_u32(arena + p + 4)
            slot = -1
            if not klen >> 31:
                slot = self._find_raw(arena + p + HEADER, klen, <uint64_t>_Py_HashBytes(arena + p + HEADER, klen))
            if slot >= 0 and (self._slots[slot] >> TAG_BITS) - 1 == p:
                q = self._slide_to
                if q != p:
                    self._moved(p, q)
                    memmove(arena + q, arena + p, size)
                    s = self._slots[slot]
                    self._slots[slot] = ((q + 1) << TAG_BITS) | (s & TAG_MASK)
                self._slide_to = q + size
            else:
                self._garbage -= size
            self._slide_from = p + size
            budget = budget - size if budget > size else 0
        if self._slide_from == self._used:
            self._used = self._slide_to
            self._sliding = 0
            self._shrink_arena()

    # -- snapshots: a frozen view of the arena ----------------------------------------------
    # A snapshot used to copy the arena and table (memcpy on the loop: ~26 ms per 1M keys of
    # 16 + 64 bytes, ~0.7 s near a 2 GiB quota). freeze() hands out a FrozenStore that reads
    # the records of this arena where they are, in the snapshot thread; until it lets go, this
    # store leaves the bytes it reads as they were: a value rewritten there is appended instead
    # (in place only past them), records becoming garbage there are listed, not marked (a
    # FrozenStore takes unmarked records for live ones), no compaction slides them, and an
    # arena that must grow is copied, not moved (the old one is the FrozenStore's).

    cdef bint _shared(self) noexcept:
        """Whether a FrozenStore still reads this arena (if not any more, the garbage listed
        meanwhile is marked now)."""
        if self._share == NULL:
            return 0
        if self._share.refs > 1:
            return 1
        free(self._share)  # (its readers are gone: the arena is this store's alone again)
        self._share = NULL
        self._mark_deferred()
        return 0

    cdef int _defer_room(self) except -1:
        """Room to list one more record that became garbage (before anything changes)."""
        cdef Py_ssize_t cap
        cdef uint64_t *grown
        if self._deferred_len == self._deferred_cap:
            cap = self._deferred_cap * 2 + 64
            grown = <uint64_t *>realloc(self._deferred, cap * sizeof(uint64_t))
            if grown == NULL:
                raise MemoryError()
            self._deferred = grown
            self._deferred_cap = cap
        return 0

    cdef void _became_garbage(self, uint64_t off) noexcept:
        """Record ``off`` is no longer live: mark it (so that walks of the arena skip it), or
        list it while a FrozenStore reads it (room made by _defer_room)."""
        if self._share != NULL and off < self._frozen_used:
            self._deferred[self._deferred_len] = off
            self._deferred_len += 1
        else:
            mark_garbage(self._arena, off)

    cdef void _mark_deferred(self) noexcept:
        cdef Py_ssize_t i
        for i in range(self._deferred_len):
            mark_garbage(self._arena, self._deferred[i])
        self._deferred_len = 0

    def freeze(self):
        """The store as of now, for ``dump`` (in another thread: it holds no lock), taken at
        once: a FrozenStore reading this arena where it is. While one is read, another freeze
        gets a copy."""
        cdef FrozenStore view
        cdef unsigned char *grown
        cdef uint64_t cap
        if self._shared():
            return self.copy()
        view = FrozenStore.__new__(FrozenStore)
        cap = min(2 * self._used + 4096, <uint64_t>MAX_OFFSET)
        if cap > self._cap:
            # (room for as much again as it holds, for what is written while it is read:
            # growing then is a copy on the loop; the pages are touched only when written)
            grown = <unsigned char *>realloc(self._arena, cap)
            if grown != NULL:
                self._arena = grown
                self._cap = cap
        self._share = <Shared *>malloc(sizeof(Shared))
        if self._share == NULL:
            raise MemoryError()
        self._share.data = self._arena
        self._share.refs = 2
        self._frozen_used = self._used
        view._share = self._share
        view._used = self._used
        view._count = self._count
        view.size_bytes = self.size_bytes
        if self._sliding:  # (paused while the view is read: the bytes between are no one's)
            view._skip_from, view._skip_to = self._slide_to, self._slide_from
        return view

    cdef void _shrink_arena(self) noexcept:
        """Give back what the arena holds past a quarter more than it uses."""
        cdef uint64_t cap = self._used + self._used // 4 + 4096
        cdef unsigned char *smaller
        if cap < self._cap:
            smaller = <unsigned char *>realloc(self._arena, cap)
            if smaller != NULL:  # (else it keeps the room it has)
                self._arena = smaller
                self._cap = cap

    # -- reading -----------------------------------------------------------------------------

    def get(self, bytes key not None):
        cdef Py_ssize_t slot = self._find(key)
        cdef uint64_t off
        if slot < 0:
            return None
        off = (self._slots[slot] >> TAG_BITS) - 1
        return self._value_at(off)

    cdef inline bytes _key_at(self, uint64_t off):
        return PyBytes_FromStringAndSize(<char *>self._arena + off + HEADER, rf_load_u32(self._arena + off))

    cdef inline bytes _value_at(self, uint64_t off):
        cdef uint32_t klen = rf_load_u32(self._arena + off)
        return PyBytes_FromStringAndSize(
            <char *>self._arena + off + HEADER + klen, rf_load_u32(self._arena + off + 4)
        )

    cdef Py_ssize_t _lower_bound(self, bytes key, Py_ssize_t *at) noexcept:
        """The block (``at``: the entry) of the first key not below ``key``; _nblocks: none."""
        cdef const unsigned char *k = <const unsigned char *>PyBytes_AS_STRING(key)
        cdef Py_ssize_t klen = PyBytes_GET_SIZE(key)
        cdef Py_ssize_t b = self._block_at(k, klen)
        at[0] = self._in_block(b, k, klen) if b < self._nblocks else 0
        return b

    def scan_page(self, bytes prefix not None, long long limit, bytes start not None = b"",
                  long long max_bytes = 0):
        """Items under ``prefix`` from key ``start`` on, in key order: at most ``limit`` of
        them (<= 0: no limit) and, past the first, at most ``max_bytes`` of keys and values (0:
        no limit). Returns (items, the key the next page starts at, or b"" after the last)."""
        cdef Py_ssize_t i, b, plen = PyBytes_GET_SIZE(prefix)
        cdef uint64_t off
        cdef uint32_t klen
        cdef long long size = 0
        cdef list out = []
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(prefix)
        self._ordered()
        b = self._lower_bound(max(prefix, start), &i)
        while b < self._nblocks:
            off = self._blocks[b][i]
            klen = rf_load_u32(self._arena + off)
            if klen < plen or memcmp(self._arena + off + HEADER, p, plen) != 0:
                break
            size += klen + rf_load_u32(self._arena + off + 4)
            if (len(out) == limit or (max_bytes and size > max_bytes)) and out:
                return out, self._key_at(off)
            out.append((self._key_at(off), self._value_at(off)))
            i += 1
            if i == self._blens[b]:
                b += 1
                i = 0
        return out, b""

    def items(self):
        """Every item in key order (the store must not change meanwhile)."""
        cdef Py_ssize_t b, i
        self._ordered()
        for b in range(self._nblocks):
            for i in range(self._blens[b]):
                yield self._key_at(self._blocks[b][i]), self._value_at(self._blocks[b][i])

    def dump(self):
        """(count, key lengths as u32 little-endian, value lengths likewise, the keys
        concatenated, the values concatenated), in key order: the snapshot's store section."""
        cdef uint64_t *items
        self._ordered()
        items = self._index_items()
        try:
            return columns(self._arena, items, self._index_len)
        finally:
            free(items)

    cdef uint64_t *_index_items(self) except NULL:
        """The index's offsets in one array, in key order (the caller frees it)."""
        cdef uint64_t *items = <uint64_t *>malloc((self._index_len + 1) * sizeof(uint64_t))
        cdef Py_ssize_t n = 0, b
        if items == NULL:
            raise MemoryError()
        for b in range(self._nblocks):
            memcpy(items + n, self._blocks[b], self._blens[b] * sizeof(uint64_t))
            n += self._blens[b]
        return items

    def copy(self):
        cdef KeyStore twin = KeyStore()
        cdef uint64_t slots = self._mask + 1
        cdef uint64_t *table = <uint64_t *>malloc(slots * sizeof(uint64_t))
        cdef unsigned char *arena = <unsigned char *>malloc(self._used + 1)
        cdef uint64_t *old = NULL
        cdef uint64_t *items
        cdef Py_ssize_t i
        if self._old != NULL:
            old = <uint64_t *>malloc((self._old_mask + 1) * sizeof(uint64_t))
        if table == NULL or arena == NULL or (self._old != NULL and old == NULL):
            free(table)
            free(arena)
            free(old)
            raise MemoryError()
        memcpy(table, self._slots, slots * sizeof(uint64_t))
        memcpy(arena, self._arena, self._used)
        for i in range(self._deferred_len):  # (its own arena: garbage is marked at once)
            mark_garbage(arena, self._deferred[i])
        if old != NULL:
            memcpy(old, self._old, (self._old_mask + 1) * sizeof(uint64_t))
        free(twin._slots)
        twin._slots, twin._mask = table, self._mask
        twin._old, twin._old_mask, twin._old_next = old, self._old_mask, self._old_next
        twin._arena, twin._used, twin._cap = arena, self._used, self._used + 1
        twin._garbage, twin._count, twin._tombs = self._garbage, self._count, self._tombs
        twin._sliding, twin._slide_from, twin._slide_to = self._sliding, self._slide_from, self._slide_to
        twin._drop_index()
        if self._blocks != NULL:
            try:
                items = self._index_items()
                try:
                    twin._set_index(items, self._index_len)
                finally:
                    free(items)
                memcpy(twin._extra, self._extra, self._extra_len * sizeof(uint64_t))
                twin._extra_len = self._extra_len
            except MemoryError:
                twin._drop_index()  # (rebuilt by its first ordered read)
        twin.size_bytes = self.size_bytes
        return twin


cdef tuple columns(const unsigned char *arena, const uint64_t *items, Py_ssize_t n):
    """``dump``'s parts from the records at ``items`` (in key order)."""
    cdef Py_ssize_t i
    cdef uint64_t off, ksum = 0, vsum = 0
    cdef uint32_t klen, vlen
    cdef unsigned char *kl
    cdef unsigned char *vl
    cdef unsigned char *kb
    cdef unsigned char *vb
    with nogil:  # (a snapshot thread's: the loop goes on meanwhile)
        for i in range(n):
            ksum += rf_load_u32(arena + items[i])
            vsum += rf_load_u32(arena + items[i] + 4)
    klens = PyBytes_FromStringAndSize(NULL, 4 * n)
    vlens = PyBytes_FromStringAndSize(NULL, 4 * n)
    keys = PyBytes_FromStringAndSize(NULL, ksum)
    values = PyBytes_FromStringAndSize(NULL, vsum)
    kl = <unsigned char *>PyBytes_AS_STRING(klens)
    vl = <unsigned char *>PyBytes_AS_STRING(vlens)
    kb = <unsigned char *>PyBytes_AS_STRING(keys)
    vb = <unsigned char *>PyBytes_AS_STRING(values)
    with nogil:
        for i in range(n):
            off = items[i]
            klen = rf_load_u32(arena + off)
            vlen = rf_load_u32(arena + off + 4)
            rf_store_u32(kl + 4 * i, klen)
            rf_store_u32(vl + 4 * i, vlen)
            memcpy(kb, arena + off + HEADER, klen)
            memcpy(vb, arena + off + HEADER + klen, vlen)
            kb += klen
            vb += vlen
    return n, klens, vlens, keys, values


@cython.final
cdef class FrozenStore:
    """A KeyStore as it was at ``KeyStore.freeze()``, for ``dump`` only: it reads the
    store's records where they are (the store leaves them be until this one is gone)."""

    cdef Shared *_share
    cdef uint64_t _used           # the arena's bytes it reads
    cdef uint64_t _skip_from, _skip_to  # ... but these (a compaction's gap)
    cdef Py_ssize_t _count
    cdef readonly long long size_bytes

    def __dealloc__(self):
        if self._share != NULL:
            release_share(self._share)

    def __len__(self):
        return self._count

    def dump(self):
        """As ``KeyStore.dump``: the live records found by a walk of the arena, sorted."""
        if self._share == NULL:
            raise TypeError("a FrozenStore comes from KeyStore.freeze()")
        cdef const unsigned char *arena = self._share.data
        cdef uint64_t *items = <uint64_t *>malloc((self._count + 1) * sizeof(uint64_t))
        cdef uint64_t p = 0, used = self._used, skip_from = self._skip_from, skip_to = self._skip_to
        cdef uint32_t klen
        cdef Py_ssize_t n = 0, count = self._count
        if items == NULL:
            raise MemoryError()
        try:
            with nogil:
                while p < used:
                    if p == skip_from and skip_to > p:
                        p = skip_to
                        continue
                    klen = rf_load_u32(arena + p)
                    if not klen >> 31:
                        if n == count:
                            n += 1  # (too many: said below)
                            break
                        items[n] = p
                        n += 1
                    p += HEADER + (klen & MAX_KEY_LEN) + rf_load_u32(arena + p + 4)
            if n != count or p > used:
                raise RuntimeError(f"a frozen KV store walked {n} live records, not {count}")
            with nogil:
                n = n if sort_offsets(items, n, arena) >= 0 else -1
            if n < 0:
                raise MemoryError()
            return columns(arena, items, n)
        finally:
            free(items)


cdef Py_ssize_t packed_pairs(object data, const unsigned char *p, Py_ssize_t n,
                             uint32_t *count) except -1:
    """Check packed pairs ``data`` at ``p`` (the batch format, an even count, no empty key);
    where the payloads start."""
    cdef uint64_t first
    cdef uint32_t i, klen
    cdef Py_ssize_t off
    try:
        off = parse_batch_of(data, p, n, &first, count)
    except BatchError as exc:
        raise ValueError(f"bad packed pairs: {exc}") from None
    if count[0] % 2:
        raise ValueError("bad packed pairs: an odd number of items")
    for i in range(0, count[0], 2):
        klen = rf_load_u32(p + C_HEADER_SIZE + <Py_ssize_t>C_META_SIZE * i + 9)
        if klen == 0:
            raise ValueError("bad packed pairs: an empty key")
        if klen > MAX_KEY_LEN:
            raise ValueError("bad packed pairs: a key over 2 GiB")
    return off


def check_packed(data):
    """ValueError unless ``data`` is well-formed packed pairs; (the number of pairs, the
    longest key's length, the longest value's)."""
    cdef const unsigned char[::1] view = memoryview(data).cast("B")
    cdef uint32_t count = 0, i, klen, vlen, longest_key = 0, longest_value = 0
    cdef const unsigned char *table
    if view.shape[0] == 0:
        raise ValueError("bad packed pairs: empty")
    packed_pairs(data, &view[0], view.shape[0], &count)
    table = &view[0] + C_HEADER_SIZE
    for i in range(0, count, 2):
        klen = rf_load_u32(table + <Py_ssize_t>C_META_SIZE * i + 9)
        vlen = rf_load_u32(table + <Py_ssize_t>C_META_SIZE * (i + 1) + 9)
        longest_key = max(longest_key, klen)
        longest_value = max(longest_value, vlen)
    return count // 2, longest_key, longest_value


def sum_u32(data):
    """The sum of the little-endian u32s ``data`` holds (a snapshot's length columns: the
    GIL let go, for a restore decoded in a worker thread)."""
    cdef const unsigned char[::1] view = memoryview(data).cast("B")
    cdef const unsigned char *p = &view[0] if view.shape[0] else NULL
    cdef Py_ssize_t i, n = view.shape[0] // 4
    cdef uint64_t total = 0
    if view.shape[0] % 4:
        raise ValueError("bytes length not a multiple of 4")
    with nogil:
        for i in range(n):
            total += rf_load_u32(p + 4 * i)
    return total


def load_store(Py_ssize_t count, klens, vlens, keys, values):
    """A store from ``dump``'s parts (any buffers). ValueError if they do not add up or the
    keys are not strictly ascending. (The GIL is let go while the store is built: a follower
    decodes a leader's snapshot in a worker thread while its loop goes on.)"""
    cdef const unsigned char[::1] kl = memoryview(klens).cast("B")
    cdef const unsigned char[::1] vl = memoryview(vlens).cast("B")
    cdef const unsigned char[::1] kb = memoryview(keys).cast("B")
    cdef const unsigned char[::1] vb = memoryview(values).cast("B")
    cdef KeyStore store = KeyStore()
    cdef uint64_t ksum, vsum, need, slots
    cdef uint64_t *items
    cdef int bad
    if count < 0 or kl.shape[0] != 4 * count or vl.shape[0] != 4 * count:
        raise ValueError("store: the length columns do not match the count")
    ksum, vsum = sum_u32(klens), sum_u32(vlens)
    if ksum != <uint64_t>kb.shape[0] or vsum != <uint64_t>vb.shape[0]:
        raise ValueError("store: the keys or values do not match their lengths")
    need = ksum + vsum + HEADER * <uint64_t>count
    if need > MAX_OFFSET:
        raise ValueError("store: over 1 TiB")
    slots = MIN_SLOTS
    while <uint64_t>count * 2 > slots:
        slots *= 2
    free(store._slots)
    store._slots = <uint64_t *>calloc(slots, sizeof(uint64_t))  # (EMPTY is 0)
    store._arena = <unsigned char *>malloc(need + 1)
    if store._slots == NULL or store._arena == NULL:
        raise MemoryError()
    store._mask = slots - 1
    store._cap = need + 1
    items = <uint64_t *>malloc((count + 1) * sizeof(uint64_t))  # (the index, in key order)
    if items == NULL:
        raise MemoryError()
    try:
        with nogil:
            bad = fill_store(
                store._arena, store._slots, store._mask, count,
                &kl[0] if count else NULL, &vl[0] if count else NULL,
                &kb[0] if kb.shape[0] else NULL, &vb[0] if vb.shape[0] else NULL,
                kb.shape[0], vb.shape[0], items, &store._used,
            )
        if bad == 3:  # (a buffer another thread wrote to meanwhile)
            raise ValueError("store: the keys or values do not match their lengths")
        if bad == 1:
            raise ValueError("store: a key over 2 GiB")
        if bad == 2:
            raise ValueError("store: keys are not strictly ascending")
        store._set_index(items, count)
    finally:
        free(items)
    store._count = count
    store.size_bytes = ksum + vsum
    return store


cdef int fill_store(unsigned char *arena, uint64_t *slots, uint64_t mask, Py_ssize_t count,
                    const unsigned char *kl, const unsigned char *vl, const unsigned char *kb,
                    const unsigned char *vb, uint64_t kb_len, uint64_t vb_len, uint64_t *items,
                    uint64_t *used) noexcept nogil:
    """load_store's records into ``arena`` and ``slots``, their offsets into ``items``; 0, or
    1 (a key over 2 GiB), 2 (keys not ascending) or 3 (lengths past the buffers: the sums
    checked were taken before the GIL was let go), ``used`` then covering the records made."""
    cdef uint64_t kpos = 0, vpos = 0, off = 0, prev = 0, h, j
    cdef uint32_t klen, vlen
    cdef Py_ssize_t i
    for i in range(count):
        klen = rf_load_u32(kl + 4 * i)
        vlen = rf_load_u32(vl + 4 * i)
        if klen > MAX_KEY_LEN:
            used[0] = off
            return 1
        if kpos + klen > kb_len or vpos + vlen > vb_len:
            used[0] = off
            return 3
        rf_store_u32(arena + off, klen)
        rf_store_u32(arena + off + 4, vlen)
        if klen:
            memcpy(arena + off + HEADER, kb + kpos, klen)
        if vlen:
            memcpy(arena + off + HEADER + klen, vb + vpos, vlen)
        if i and compare_keys(arena, prev, off) >= 0:
            used[0] = off
            return 2
        h = <uint64_t>hash_bytes_nogil(arena + off + HEADER, klen)
        j = h & mask
        while slots[j] != EMPTY:
            j = (j + 1) & mask
        slots[j] = ((off + 1) << TAG_BITS) | ((h >> 40) & TAG_MASK)
        items[i] = off
        prev = off
        kpos += klen
        vpos += vlen
        off += HEADER + klen + vlen
    used[0] = off
    return 0


# -- the KV state machine's plain writes ----------------------------------------------------------
# KVStateMachine.apply in Python took ~1.7 us a PUT (decoding, the client's window, the result
# remembered): a fifth of every node's CPU under single writes from pipelining clients
# (py-spy, 1x256). Here the commands most writes are, PUT and DELETE, are applied straight from
# their bytes; anything else is left to the state machine.

DEF CMD_HEADER = 21                 # op u8 | client_id u64 | sequence u64 | key length u32
DEF CMD_PUT = 1                     # (raftfast.kv.commands' OP_PUT and OP_DELETE)
DEF CMD_DELETE = 2
DEF MAX_ID = 0x7FFFFFFFFFFFFFFF     # MAX_CLIENT_ID and MAX_SEQUENCE (raftfast.limits)


cdef object _write(KeyStore store, int op, const unsigned char *k, Py_ssize_t klen,
                   Py_ssize_t vlen):
    cdef uint64_t h = <uint64_t>_Py_HashBytes(k, klen)
    if op == CMD_PUT:
        store._put_raw(k, klen, k + klen, vlen, h)
        return True
    return store._delete_raw(k, klen, h) >= 0


def apply_writes(KeyStore store not None, clients, list payloads not None, Py_ssize_t start,
                 long long window, Py_ssize_t max_clients, list results not None):
    """Apply ``payloads[start:]`` to ``store`` while they are well-formed PUT or DELETE
    commands (raftfast.kv.commands), each result appended to ``results``, with the
    exactly-once rules of KVStateMachine.apply (``clients``: its ClientTable, ``window`` and
    ``max_clients`` its limits); return the index of the first that is anything else (or
    ``len(payloads)``), for the state machine to apply. The twin's code is the reference:
    ``window_of`` and ``remember`` (raftfast.dedup) are inlined here for the usual case."""
    cdef Py_ssize_t i, n = len(payloads), size, klen, vlen, before
    cdef const unsigned char *p
    cdef int op
    cdef uint64_t cid, seq
    cdef long long max_seq, gone
    cdef object payload, window_obj, seq_obj, result, gen = clients.gen
    cdef object most_results = _dedup.MAX_RESULTS, window_of = _dedup.window_of
    cdef dict held_results
    cdef PyObject *found
    if not 0 <= start <= n:  # (no bounds checks in this module: a bad start read anywhere)
        raise IndexError(f"start {start} is outside the {n} payloads")
    for i in range(start, n):
        payload = payloads[i]
        if type(payload) is not bytes:
            return i
        size = PyBytes_GET_SIZE(payload)
        p = <const unsigned char *>PyBytes_AS_STRING(payload)
        if size < CMD_HEADER:
            return i
        op = p[0]
        cid = rf_load_u64(p + 1)
        seq = rf_load_u64(p + 9)
        klen = rf_load_u32(p + 17)
        if (op != CMD_PUT and op != CMD_DELETE) or cid > MAX_ID or seq > MAX_ID:
            return i
        if klen > size - CMD_HEADER or klen > MAX_KEY_LEN:
            return i
        vlen = size - CMD_HEADER - klen
        if (op == CMD_DELETE and vlen) or vlen > MAX_LEN:
            return i
        if cid == 0:
            results.append(_write(store, op, p + CMD_HEADER, klen, vlen))
            continue
        # window_of: the client's window, now the most recently active
        cid_obj = PyLong_FromUnsignedLongLong(cid)
        found = PyDict_GetItem(clients, cid_obj)
        if found != NULL and (<object>found).gen == gen:
            window_obj = <object>found
            clients.move_to_end(cid_obj)
        else:  # (a new client, or a window a frozen copy of the table shares)
            window_obj = window_of(clients, cid_obj, max_clients)
        max_seq = window_obj.max_seq
        if <long long>seq <= max_seq - window:  # a late duplicate: not applied
            results.append(op == CMD_PUT)
            continue
        held_results = window_obj.results
        seq_obj = PyLong_FromUnsignedLongLong(seq)
        found = PyDict_GetItem(held_results, seq_obj)
        if found != NULL and <object>found is not None:
            results.append(<object>found)
            continue
        result = _write(store, op, p + CMD_HEADER, klen, vlen)
        # remember: the result kept, the window slid past older ones
        before = len(held_results)
        if <long long>seq > max_seq:
            # (unsigned: seq 2**63 - 1 over max_seq -1 overflows a signed difference)
            if <uint64_t>seq - <uint64_t>max_seq >= <uint64_t>window:
                held_results.clear()
            else:
                for gone in range(max_seq - window + 1, <long long>seq - window + 1):
                    held_results.pop(gone, None)
            window_obj.max_seq = seq_obj
        held_results[seq_obj] = result
        clients.held += len(held_results) - before  # (a KV result is a bool: one unit)
        while clients.held > most_results and len(clients) > 1:  # (a table restored over it)
            clients.forget_oldest()
        results.append(result)
    return n


# -- etcd's records and events, outside the cycle collector ----------------------------------
# An etcd keyspace of 1,000,000 keys is ~2,000,000 of these (raftfast.etcd.mvcc); as ordinary
# objects each full pass of Python's cycle collector walked them all on the loop, 0.3-0.6 s
# (elections) every few hundred thousand writes. They hold only bytes, ints and (an event)
# records, so they can never be part of a cycle: the collector need not know them (and each
# is 16 bytes smaller). Final: a Python subclass would be tracked again.


@cython.no_gc
@cython.final
cdef class Record:
    """A key's state at one revision (immutable once made: history shares them)."""

    cdef readonly bytes key, value
    cdef readonly object create, mod, version, lease

    def __init__(self, bytes key not None, bytes value not None, create, mod, version, lease):
        self.key = key
        self.value = value
        self.create = create
        self.mod = mod
        self.version = version
        self.lease = lease

    def __eq__(self, other):
        if not isinstance(other, Record):
            return NotImplemented
        cdef Record o = <Record>other
        return (
            self.key == o.key
            and self.value == o.value
            and self.create == o.create
            and self.mod == o.mod
            and self.version == o.version
            and self.lease == o.lease
        )

    __hash__ = None

    def __repr__(self):
        return (
            f"Record({self.key!r}, {self.value[:20]!r}, create={self.create}, mod={self.mod}, "
            f"version={self.version}, lease={self.lease})"
        )


@cython.no_gc
@cython.final
cdef class Event:
    """One change: ``key`` became ``after`` (None: deleted) at revision ``revision``; it was
    ``prev`` (None: absent)."""

    cdef readonly bytes key
    cdef readonly Record after, prev
    cdef readonly object revision

    def __init__(self, bytes key not None, Record after, Record prev, revision):
        self.key = key
        self.after = after
        self.prev = prev
        self.revision = revision

    def nbytes(self):
        """About the bytes this event takes in a WatchResponse (with its prev_kv)."""
        return (
            len(self.key)
            + (len(self.after.value) if self.after is not None else 0)
            + (len(self.prev.value) if self.prev is not None else 0)
            + 64
        )

    def __repr__(self):
        return f"Event({self.key!r}, {self.after!r}, {self.prev!r}, {self.revision})"
