"""Pure-Python twin of ``raftfast._batch``: packed entry batches, CRC32C and small hot helpers.

The compiled module is the fast path; this twin exists so raftfast runs (and is tested) without a
C compiler.  Both must accept and reject exactly the same inputs with the same exception types,
which ``tests/test_parity.py`` checks.

Packed batch format (little-endian), shared by the wire and the WAL::

    header  (20 B): magic b"RFB1" | count u32 | first_index u64 | crc32c u32
    table   (13 B * count): term u64 | type u8 | length u32
    payloads concatenated in order

The CRC32C covers every byte of the batch except the CRC field itself: the first 16 header bytes
(magic, count, first_index), then the table and payloads, i.e.
``crc32c(batch[20:], crc32c(batch[:16]))``.  So any single flipped bit, header included, is caught.

Out-of-range numeric fields (negative, or too wide for their u64/u8 slot) raise OverflowError and
non-integers raise TypeError, matching what the compiled module's C conversions do.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from itertools import accumulate

from raftfast.errors import BatchError

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "META_SIZE",
    "batch_info",
    "chunk_payloads",
    "commit_index",
    "count_field",
    "crc32c",
    "decode_batch",
    "encode_batch",
    "encode_uniform",
    "entries_of_type",
]

MAGIC = b"RFB1"
HEADER_SIZE = 20
META_SIZE = 13
MAX_COUNT = 0xFFFFFFFF

_U64_MAX = (1 << 64) - 1
_HEADER = struct.Struct("<4sIQI")
_CRC_OFFSET = 16  # header bytes before the CRC field, which the CRC covers
_CRC_COVERED = struct.Struct("<4sIQ")  # magic | count | first_index
_CRC_FIELD = struct.Struct("<I")
_BIG_ENDIAN = sys.byteorder == "big"
assert array("Q").itemsize == 8 and array("I").itemsize == 4, "unexpected array item sizes"


def _make_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC_TABLE = _make_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC32C (Castagnoli) of ``data``; pass a previous result as ``crc`` to continue it."""
    if not 0 <= crc <= 0xFFFFFFFF:
        raise OverflowError("crc must be an unsigned 32-bit value")
    table = _CRC_TABLE
    c = crc ^ 0xFFFFFFFF
    if not isinstance(data, bytes):
        data = memoryview(data).tobytes()  # iterating bytes is the fastest loop
    for b in data:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _check_u64(value: object, what: str) -> None:
    if not isinstance(value, int):
        raise TypeError(f"{what} must be an integer, not {type(value).__name__}")
    if not 0 <= value <= _U64_MAX:
        raise OverflowError(f"{what} {value} does not fit in an unsigned 64-bit field")


def _check_u8(value: object, what: str) -> None:
    if not isinstance(value, int):
        raise TypeError(f"{what} must be an integer, not {type(value).__name__}")
    if not 0 <= value <= 0xFF:
        raise OverflowError(f"{what} {value} does not fit in an unsigned 8-bit field")


def _table(terms: array, types: bytes | bytearray, lengths: array) -> bytearray:
    """Interleave the term/type/length columns into the 13-byte records of an entry table.

    Thirteen strided slice assignments copy the columns in C, so there is no per-entry Python work.
    """
    tb = terms.tobytes()
    lb = lengths.tobytes()
    table = bytearray(META_SIZE * len(terms))
    for k in range(8):
        table[k::META_SIZE] = tb[k::8]
    table[8::META_SIZE] = types
    for k in range(4):
        table[9 + k :: META_SIZE] = lb[k::4]
    return table


def _columns(table: bytes | bytearray | memoryview) -> tuple[array, bytes, array]:
    """Split an entry table back into (terms u64 array, types bytes, lengths u32 array)."""
    raw = bytes(table)
    n = len(raw) // META_SIZE
    tb = bytearray(8 * n)
    for k in range(8):
        tb[k::8] = raw[k::META_SIZE]
    lb = bytearray(4 * n)
    for k in range(4):
        lb[k::4] = raw[9 + k :: META_SIZE]
    terms = array("Q", tb)
    lengths = array("I", lb)
    if _BIG_ENDIAN:
        terms.byteswap()
        lengths.byteswap()
    return terms, raw[8::META_SIZE], lengths


def _u64_array(values: Iterable[int], what: str) -> array:
    try:
        return array("Q", values)
    except (TypeError, OverflowError):
        for v in values:
            _check_u64(v, what)
        raise


def _join(payloads: Sequence[bytes]) -> tuple[bytes, array]:
    """Concatenate bytes-like payloads; return (body, u32 byte lengths)."""
    body = b"".join(payloads)  # TypeError for anything not bytes-like
    try:
        lengths = array("I", map(len, payloads))
        if sum(lengths) != len(body):  # len() counts items, not bytes, for wide memoryviews
            lengths = array("I", [memoryview(p).nbytes for p in payloads])
    except OverflowError:
        raise OverflowError("payload longer than 4 GiB") from None
    return body, lengths


def _pack(first_index: int, terms: array, types: bytes, lengths: array, body: bytes) -> bytes:
    """Build header + table + body; ``body`` is the concatenated payloads."""
    if len(terms) > MAX_COUNT:
        raise ValueError(f"too many entries for one batch: {len(terms)}")
    if _BIG_ENDIAN:
        terms = array("Q", terms)
        terms.byteswap()
        lengths = array("I", lengths)
        lengths.byteswap()
    table = _table(terms, types, lengths)
    head = _CRC_COVERED.pack(MAGIC, len(terms), first_index)
    crc = crc32c(body, crc32c(table, crc32c(head)))
    return head + _CRC_FIELD.pack(crc) + table + body


def encode_batch(
    first_index: int,
    terms: Sequence[int],
    payloads: Sequence[bytes],
    types: Sequence[int] | None = None,
) -> bytes:
    """Pack entries ``first_index, first_index+1, ...`` into one checksummed batch."""
    _check_u64(first_index, "first_index")
    n = len(terms)
    if len(payloads) != n:
        raise ValueError(f"{n} terms but {len(payloads)} payloads")
    if types is not None and len(types) != n:
        raise ValueError(f"{n} terms but {len(types)} types")
    # Validation order (payloads, types, terms) matches the compiled module.
    body, lengths = _join(payloads)
    if types is None:
        tbytes = bytes(n)
    else:
        try:
            tbytes = bytes(types)
        except ValueError:
            for t in types:
                _check_u8(t, "type")
            raise
    return _pack(first_index, _u64_array(terms, "term"), tbytes, lengths, body)


def encode_uniform(first_index: int, term: int, payloads: Sequence[bytes], etype: int = 0) -> bytes:
    """Pack entries that share one term and type (the leader's proposal path)."""
    _check_u64(first_index, "first_index")
    _check_u64(term, "term")
    _check_u8(etype, "type")
    body, lengths = _join(payloads)
    n = len(lengths)
    return _pack(first_index, array("Q", (term,)) * n, bytes((etype,)) * n, lengths, body)


def _parse(data: bytes | bytearray | memoryview) -> tuple[memoryview, int, int, array]:
    """Validate a packed batch fully; return (byte view, first_index, count, lengths)."""
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    size = len(view)
    if size < HEADER_SIZE:
        raise BatchError(f"batch too short: {size} bytes, the header alone is {HEADER_SIZE}")
    magic, count, first_index, crc = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise BatchError(f"bad batch magic {bytes(magic)!r}, expected {MAGIC!r}")
    if count > (size - HEADER_SIZE) // META_SIZE:
        raise BatchError(f"batch count {count} is impossible in {size} bytes")
    table_end = HEADER_SIZE + META_SIZE * count
    lengths = _columns(view[HEADER_SIZE:table_end])[2]
    expected = table_end + sum(lengths)
    if expected != size:
        raise BatchError(f"batch size mismatch: its table describes {expected} bytes, got {size}")
    if crc32c(view[HEADER_SIZE:], crc32c(view[:_CRC_OFFSET])) != crc:
        raise BatchError("batch CRC32C mismatch")
    return view, first_index, count, lengths


def decode_batch(
    data: bytes | bytearray | memoryview,
) -> tuple[int, list[int], list[int], list[bytes]]:
    """Validate and unpack a batch into (first_index, terms, types, payloads)."""
    view, first_index, count, _ = _parse(data)
    table_end = HEADER_SIZE + META_SIZE * count
    terms, types, lengths = _columns(view[HEADER_SIZE:table_end])
    raw = data if type(data) is bytes else bytes(view)  # slicing bytes is the cheapest copy
    ends = accumulate(lengths, initial=table_end)
    start = next(ends)
    payloads = []
    for end in ends:
        payloads.append(raw[start:end])
        start = end
    return first_index, terms.tolist(), list(types), payloads


def entries_of_type(data: bytes | bytearray | memoryview, etype: int) -> list[tuple[int, bytes]]:
    """Validate a batch and return ``(index, payload)`` of its entries of type ``etype``.

    The core uses it to spot the rare configuration entry in a frame without decoding the rest.
    """
    _check_u8(etype, "etype")
    view, first_index, count, lengths = _parse(data)
    table_end = HEADER_SIZE + META_SIZE * count
    types = _columns(view[HEADER_SIZE:table_end])[1]
    if etype not in types:
        return []
    out = []
    start = table_end
    for i, length in enumerate(lengths):
        if types[i] == etype:
            out.append((first_index + i, bytes(view[start : start + length])))
        start += length
    return out


def batch_info(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """Validate a batch fully (including its CRC) and return (first_index, count)."""
    _, first_index, count, _ = _parse(data)
    return first_index, count


def to_bytes(x: object, what: str) -> bytes:
    """``x`` as bytes: str as UTF-8, bytearray and memoryview copied; TypeError otherwise."""
    if type(x) is bytes:
        return x
    if isinstance(x, str):
        return x.encode("utf-8")
    if isinstance(x, bytes | bytearray | memoryview):
        return bytes(x)
    raise TypeError(f"{what} must be bytes or str, not {type(x).__name__}")


def flatten_pairs(items: Iterable) -> list[bytes]:
    """``[key, value, key, value, ...]`` of (key, value) pairs, each as bytes (str as UTF-8,
    bytearray and memoryview copied); TypeError for anything else (a client's put_many)."""
    out: list[bytes] = []
    for item in items:
        if isinstance(item, str | bytes | bytearray | memoryview):
            # (a 2-character string unpacked as a pair: put_many(["ab"]) wrote a = b)
            raise TypeError(f"put_many takes (key, value) pairs, got a {type(item).__name__}")
        key, value = item
        out.append(to_bytes(key, "key"))
        out.append(to_bytes(value, "value"))
    return out


def chunk_payloads(
    payloads: Sequence[bytes], max_bytes: int, max_count: int
) -> list[tuple[int, int]]:
    """Greedily split proposals into [start, end) runs that each fit one batch.

    A run holds at most ``max_count`` payloads totalling at most ``max_bytes``, except that a
    single payload larger than ``max_bytes`` travels alone rather than being refused.
    """
    if max_bytes <= 0 or max_count <= 0:
        raise ValueError("max_bytes and max_count must be positive")
    out: list[tuple[int, int]] = []
    start = 0
    used = 0
    for i, p in enumerate(payloads):
        n = len(p)
        if i > start and (i - start >= max_count or used + n > max_bytes):
            out.append((start, i))
            start = i
            used = 0
        used += n
    if len(payloads) > start:
        out.append((start, len(payloads)))
    return out


def commit_index(match_indexes: Sequence[int], /) -> int:
    """Highest index stored on a majority: the (n//2+1)-th largest match index."""
    n = len(match_indexes)
    if n == 0:
        raise ValueError("commit_index needs at least one match index")
    return sorted(match_indexes, reverse=True)[n // 2]


def _varint(data: memoryview, i: int) -> tuple[int, int] | None:
    """The protobuf varint at ``data[i:]`` and the offset after it; None if it is cut off or
    longer than 10 bytes."""
    value = shift = 0
    n = len(data)
    while i < n and shift < 70:
        b = data[i]
        i += 1
        if shift < 64:
            value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value & _U64_MAX, i
        shift += 7
    return None


def count_field(data: bytes | bytearray | memoryview, field: int, limit: int) -> int:
    """How many times the field numbered ``field`` occurs at the top level of the protobuf
    message ``data``, without parsing it: counting stops past ``limit`` (``limit + 1`` then).
    A message it cannot walk to its end (the wire format breaks, or it holds a group, which
    the parser skips over with whatever it holds) counts ``limit + 1`` too: its ops cannot be
    counted, and the parser would keep them (a review: a group in front hid 780,000 ops)."""
    view = memoryview(data).cast("B")
    n = len(view)
    i = count = 0
    while i < n and count <= limit:
        read = _varint(view, i)
        if read is None:
            break
        tag, i = read
        if tag >> 3 == field:
            count += 1
        wire = tag & 7
        if wire == 0:
            read = _varint(view, i)
            if read is None:
                break
            i = read[1]
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            read = _varint(view, i)
            if read is None or read[0] > n - read[1]:
                break
            i = read[1] + read[0]
        else:
            return limit + 1
    else:
        return count if i <= n else limit + 1  # (a fixed-size field cut short: cannot tell)
    return limit + 1 if count <= limit else count
