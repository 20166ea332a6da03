"""Packed batch format, CRC32C, chunk_payloads and commit_index, against both implementations."""

from __future__ import annotations

import os
import random
import struct
from array import array

import pytest

from raftfast.errors import BatchError

HEADER = struct.Struct("<4sIQI")


def _batch(impls, first=7, terms=(1, 1, 2), payloads=(b"a", b"", b"xyz"), types=(0, 5, 255)):
    return impls.batch.encode_batch(first, list(terms), list(payloads), list(types))


# -- crc32c -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0),
        (b"123456789", 0xE3069283),
        (b"a", 0xC1D04330),
        (bytes(32), 0x8A9136AA),  # RFC 3720 (iSCSI) B.4 vectors
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
    ],
    ids=["empty", "123456789", "a", "zeros32", "ones32", "inc32", "dec32"],
)
def test_crc32c_known_vectors(impls, data, expected):
    assert impls.batch.crc32c(data) == expected


def test_crc32c_continuation_and_alignment(impls):
    rng = random.Random(1)
    data = rng.randbytes(300)
    whole = impls.batch.crc32c(data)
    for cut in (0, 1, 3, 7, 8, 9, 64, 299, 300):
        assert impls.batch.crc32c(data[cut:], impls.batch.crc32c(data[:cut])) == whole
    # Unaligned starts and odd lengths exercise the slicing-by-8 prologue and tail.
    from raftfast import _batch_py

    view = memoryview(bytearray(data))
    for start in range(9):
        for length in (0, 1, 7, 8, 9, 17, 100):
            expected = _batch_py.crc32c(data[start : start + length])
            assert impls.batch.crc32c(view[start : start + length]) == expected


def test_crc32c_instruction_and_tables_agree():
    """Where the CPU has a CRC32C instruction the compiled module uses it; its tables (the
    path of every other CPU) must give the same results."""
    _batch = pytest.importorskip("raftfast._batch")
    if os.environ.get("RAFTFAST_PUREPYTHON"):
        pytest.skip("the compiled module's paths: checked in the compiled run")
    rng = random.Random(3)
    # (the instruction runs three streams over blocks of 256 and 8,192 bytes, then combines
    # them: lengths around three of either block)
    for length in (
        0,
        1,
        3,
        7,
        8,
        9,
        15,
        16,
        17,
        100,
        767,
        768,
        775,
        4099,
        24_575,
        24_576,
        24_583,
        70_000,
        300_001,
    ):
        data = rng.randbytes(length)
        for start in (0, 1, 5):
            part = memoryview(data)[start:]
            seed = rng.randrange(1 << 32)
            assert _batch.crc32c(part, seed) == _batch.crc32c_tables(part, seed)
    print("CRC32C instruction:", _batch.crc32c_hardware())


def test_crc32c_large_input(impls):
    from raftfast import _batch_py

    data = random.Random(2).randbytes(100_000)  # above the compiled module's nogil threshold
    expected = _batch_py.crc32c(data)
    assert impls.batch.crc32c(data) == expected
    assert impls.batch.crc32c(bytearray(data)) == expected


def test_crc32c_argument_errors(impls):
    with pytest.raises(TypeError):
        impls.batch.crc32c("text")
    with pytest.raises(OverflowError):
        impls.batch.crc32c(b"x", -1)
    with pytest.raises(OverflowError):
        impls.batch.crc32c(b"x", 1 << 32)


# -- encode / decode --------------------------------------------------------------------------


def test_layout_is_exactly_as_specified(impls):
    data = _batch(impls)
    magic, count, first, crc = HEADER.unpack_from(data)
    assert (magic, count, first) == (b"RFB1", 3, 7)
    assert impls.batch.HEADER_SIZE == 20 and impls.batch.META_SIZE == 13
    table = data[20 : 20 + 39]
    assert list(struct.iter_unpack("<QBI", table)) == [(1, 0, 1), (1, 5, 0), (2, 255, 3)]
    assert data[59:] == b"axyz"
    # The CRC covers everything but its own field: header[:16] (magic, count, first), then the rest.
    assert crc == impls.batch.crc32c(data[20:], impls.batch.crc32c(data[:16]))
    assert crc == impls.batch.crc32c(data[:16] + data[20:])
    assert len(data) == 20 + 13 * 3 + 4


def test_round_trip(impls):
    rng = random.Random(3)
    payloads = [rng.randbytes(rng.randrange(0, 300)) for _ in range(50)]
    terms = sorted(rng.randrange(0, 1 << 64) for _ in range(50))
    types = [rng.randrange(256) for _ in range(50)]
    data = impls.batch.encode_batch(1 << 40, terms, payloads, types)
    assert impls.batch.decode_batch(data) == (1 << 40, terms, types, payloads)
    assert impls.batch.batch_info(data) == (1 << 40, 50)
    # bytearray and memoryview inputs decode identically.
    assert impls.batch.decode_batch(bytearray(data)) == impls.batch.decode_batch(data)
    assert impls.batch.batch_info(memoryview(data)) == (1 << 40, 50)
    wanted = types[7]
    assert impls.batch.entries_of_type(data, wanted) == [
        ((1 << 40) + i, p)
        for i, (t, p) in enumerate(zip(types, payloads, strict=True))
        if t == wanted
    ]
    assert impls.batch.entries_of_type(bytearray(data), wanted) == impls.batch.entries_of_type(
        data, wanted
    )
    with pytest.raises(OverflowError):
        impls.batch.entries_of_type(data, 256)


def test_a_batch_that_checked_out_is_checked_again_wherever_it_can_differ(impls):
    """The compiled twin leaves out the CRC for the very bytes object that checked out last
    (bytes cannot change): a copy, a bytearray changed in place, a look-alike are checked."""
    batch = _batch(impls)
    log = impls.log.EntryLog(7)
    for _ in range(2):  # (the second time: the object that checked out)
        assert impls.batch.batch_info(batch) == (7, 3)
        assert impls.batch.decode_batch(batch)[3] == [b"a", b"", b"xyz"]
        assert impls.batch.entries_of_type(batch, 5) == [(8, b"")]
        assert log.find_conflict(batch) == 7
    mutable = bytearray(batch)
    assert impls.batch.batch_info(mutable) == (7, 3)
    mutable[-1] ^= 1  # (a payload byte: only the CRC tells)
    bad = bytes(mutable)
    for data in (mutable, bad, memoryview(bad)):
        for check in (
            impls.batch.batch_info,
            impls.batch.decode_batch,
            lambda d: impls.batch.entries_of_type(d, 5),
            log.find_conflict,
            log.append_batch,
        ):
            with pytest.raises(BatchError, match="CRC"):
                check(data)
        assert impls.batch.batch_info(batch) == (7, 3)  # (the good one, between the bad ones)
    assert log.append_batch(batch) == 9 and log.entry(9) == (2, 255, b"xyz")


def test_entries_of_type_indexes_do_not_wrap_past_2_to_the_64(impls):
    # Found by the parity test: the compiled module computed first + i in 64 bits.
    data = impls.batch.encode_uniform(2**64 - 1, 1, [b"a", b"b"])
    assert impls.batch.entries_of_type(data, 0) == [(2**64 - 1, b"a"), (2**64, b"b")]


def test_empty_batch(impls):
    data = impls.batch.encode_batch(5, [], [])
    assert len(data) == 20
    assert impls.batch.decode_batch(data) == (5, [], [], [])
    assert impls.batch.batch_info(data) == (5, 0)
    assert impls.batch.encode_uniform(5, 9, []) == data


def test_types_default_to_zero_and_bytes_like_payloads(impls):
    data = impls.batch.encode_batch(1, [3, 3], [bytearray(b"ab"), memoryview(b"cde")])
    assert impls.batch.decode_batch(data) == (1, [3, 3], [0, 0], [b"ab", b"cde"])
    wide = array("I", [1, 2])  # an 8-byte buffer whose len() is 2
    assert impls.batch.decode_batch(impls.batch.encode_batch(1, [1], [wide]))[3] == [wide.tobytes()]


def test_encode_uniform_matches_encode_batch(impls):
    payloads = [b"p%d" % i for i in range(10)]
    assert impls.batch.encode_uniform(3, 4, payloads, 2) == impls.batch.encode_batch(
        3, [4] * 10, payloads, [2] * 10
    )
    assert impls.batch.encode_uniform(3, 4, payloads) == impls.batch.encode_batch(
        3, [4] * 10, payloads
    )


def test_encode_argument_errors(impls):
    enc = impls.batch.encode_batch
    with pytest.raises(ValueError):
        enc(1, [1, 2], [b"a"])
    with pytest.raises(ValueError):
        enc(1, [1], [b"a"], [0, 0])
    with pytest.raises(OverflowError):
        enc(-1, [1], [b"a"])
    with pytest.raises(OverflowError):
        enc(1 << 64, [1], [b"a"])
    with pytest.raises(OverflowError):
        enc(1, [-1], [b"a"])
    with pytest.raises(OverflowError):
        enc(1, [1 << 64], [b"a"])
    with pytest.raises(OverflowError):
        enc(1, [1], [b"a"], [256])
    with pytest.raises(OverflowError):
        enc(1, [1], [b"a"], [-1])
    with pytest.raises(TypeError):
        enc(1.0, [1], [b"a"])
    with pytest.raises(TypeError):
        enc(1, [1.5], [b"a"])
    with pytest.raises(TypeError):
        enc(1, [1], ["text"])
    with pytest.raises(TypeError):
        enc(1, [1], [None])
    uni = impls.batch.encode_uniform
    with pytest.raises(OverflowError):
        uni(1, -1, [b"a"])
    with pytest.raises(OverflowError):
        uni(1, 1, [b"a"], 256)
    with pytest.raises(TypeError):
        uni(1, 1, [1])
    with pytest.raises(TypeError):
        uni(1, 1.0, [b"a"])


# -- validation -------------------------------------------------------------------------------


def test_every_truncation_is_rejected(impls):
    data = _batch(impls)
    for n in range(len(data)):
        with pytest.raises(BatchError):
            impls.batch.decode_batch(data[:n])
        with pytest.raises(BatchError):
            impls.batch.batch_info(data[:n])


def test_trailing_bytes_rejected(impls):
    with pytest.raises(BatchError, match="size"):
        impls.batch.decode_batch(_batch(impls) + b"\0")


def test_bad_magic(impls):
    data = b"XFB1" + _batch(impls)[4:]
    with pytest.raises(BatchError, match="magic"):
        impls.batch.decode_batch(data)
    with pytest.raises(BatchError, match="magic"):
        impls.batch.batch_info(data)


def test_absurd_count(impls):
    data = bytearray(_batch(impls))
    struct.pack_into("<I", data, 4, 0xFFFFFFFF)
    with pytest.raises(BatchError, match="count"):
        impls.batch.decode_batch(bytes(data))


def test_size_mismatch_from_table_length(impls):
    data = bytearray(_batch(impls))
    struct.pack_into("<I", data, 20 + 9, 2)  # first entry claims 2 payload bytes, not 1
    with pytest.raises(BatchError, match="size"):
        impls.batch.decode_batch(bytes(data))


def test_crc_mismatch(impls):
    data = bytearray(_batch(impls))
    data[-1] ^= 0x01
    with pytest.raises(BatchError, match="CRC"):
        impls.batch.decode_batch(bytes(data))
    with pytest.raises(BatchError, match="CRC"):
        impls.batch.batch_info(bytes(data))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda impls: _batch(impls), id="mixed"),
        pytest.param(lambda impls: impls.batch.encode_batch(5, [], []), id="empty"),
        pytest.param(lambda impls: impls.batch.encode_uniform(1 << 40, 3, [b"p"] * 4), id="uni"),
    ],
)
def test_every_bit_flip_is_rejected(impls, make):
    # Header included: the CRC covers magic, count and first_index, not just table and payloads.
    data = make(impls)
    for pos in range(len(data)):
        for bit in range(8):
            mutated = bytearray(data)
            mutated[pos] ^= 1 << bit
            for arg in (bytes(mutated), mutated, memoryview(mutated)):
                with pytest.raises(BatchError):
                    impls.batch.decode_batch(arg)
                with pytest.raises(BatchError):
                    impls.batch.batch_info(arg)


def test_header_field_flips_fail_the_crc(impls):
    # A changed first_index or count that is still structurally consistent is caught by the CRC.
    data = _batch(impls)
    for offset, fmt, value in [(8, "<Q", 8), (8, "<Q", 7 | 1 << 63)]:
        mutated = bytearray(data)
        struct.pack_into(fmt, mutated, offset, value)
        with pytest.raises(BatchError, match="CRC"):
            impls.batch.batch_info(bytes(mutated))
    empty = bytearray(impls.batch.encode_batch(5, [], []))
    empty[8] ^= 0x01  # first_index 5 -> 4 in an empty batch: only the CRC can tell
    with pytest.raises(BatchError, match="CRC"):
        impls.batch.decode_batch(bytes(empty))


def test_batch_error_is_value_error(impls):
    with pytest.raises(ValueError):
        impls.batch.decode_batch(b"short")


def test_decode_rejects_non_buffers(impls):
    with pytest.raises(TypeError):
        impls.batch.decode_batch("RFB1" + "\0" * 16)


# -- chunk_payloads ---------------------------------------------------------------------------


def _reference_chunks(sizes, max_bytes, max_count):
    out, start, used = [], 0, 0
    for i, n in enumerate(sizes):
        if i > start and (i - start >= max_count or used + n > max_bytes):
            out.append((start, i))
            start, used = i, 0
        used += n
    if len(sizes) > start:
        out.append((start, len(sizes)))
    return out


def test_chunk_payloads_edges(impls):
    chunk = impls.batch.chunk_payloads
    assert chunk([], 10, 10) == []
    assert chunk([b"x" * 50], 10, 10) == [(0, 1)]  # oversized payload travels alone
    assert chunk([b"a", b"x" * 50, b"b"], 10, 10) == [(0, 1), (1, 2), (2, 3)]
    assert chunk([b"aaaaa", b"bbbbb", b"c"], 10, 10) == [(0, 2), (2, 3)]  # exact fit
    assert chunk([b"a"] * 5, 100, 2) == [(0, 2), (2, 4), (4, 5)]
    assert chunk([b"a"] * 3, 100, 1) == [(0, 1), (1, 2), (2, 3)]
    assert chunk([b""] * 4, 1, 3) == [(0, 3), (3, 4)]
    assert chunk([b"a"] * 3, 1 << 70, 1 << 70) == [(0, 3)]
    for bad in ((0, 1), (1, 0), (-5, 1), (1, -5)):
        with pytest.raises(ValueError):
            chunk([b"a"], *bad)


def test_chunk_payloads_invariants(impls):
    rng = random.Random(4)
    for _ in range(300):
        sizes = [rng.choice((0, 1, 5, 30, 200)) for _ in range(rng.randrange(0, 40))]
        max_bytes, max_count = rng.randrange(1, 300), rng.randrange(1, 12)
        payloads = [b"x" * n for n in sizes]
        got = impls.batch.chunk_payloads(payloads, max_bytes, max_count)
        assert got == _reference_chunks(sizes, max_bytes, max_count)
        assert [i for a, b in got for i in range(a, b)] == list(range(len(sizes)))
        for a, b in got:
            assert 0 < b - a <= max_count
            assert sum(sizes[a:b]) <= max_bytes or b - a == 1


# -- commit_index -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("matches", "expected"),
    [
        ([7], 7),
        ([5, 4, 2], 4),
        ([5, 4, 2, 1], 2),
        ([2, 5, 4], 4),
        ([1, 2, 3, 4, 5], 3),
        ([3, 3, 3], 3),
        ([0, 0, 9], 0),
        ([10, 10, 1, 1], 1),
        ([1 << 70, 1 << 70, 1], 1 << 70),  # beyond int64: falls back to Python sorting
        (list(range(100)), 49),  # more voters than the C fast path holds
        ((9, 8, 7), 8),
    ],
)
def test_commit_index(impls, matches, expected):
    assert impls.batch.commit_index(matches) == expected


def test_commit_index_random_against_sorted(impls):
    rng = random.Random(5)
    for _ in range(500):
        vals = [rng.randrange(-3, 1 << rng.choice((4, 40, 63))) for _ in range(rng.randrange(1, 9))]
        assert impls.batch.commit_index(vals) == sorted(vals, reverse=True)[len(vals) // 2]


def test_commit_index_empty(impls):
    with pytest.raises(ValueError):
        impls.batch.commit_index([])


# -- flatten_pairs ----------------------------------------------------------------------------


def test_flatten_pairs(impls):
    flat = impls.batch.flatten_pairs([(b"a", "é"), ("k", bytearray(b"v")), (memoryview(b"m"), b"")])
    assert flat == [b"a", "é".encode(), b"k", b"v", b"m", b""]
    assert all(type(x) is bytes for x in flat)
    assert impls.batch.flatten_pairs(iter([])) == []
    with pytest.raises(TypeError, match="key must be bytes or str, not int"):
        impls.batch.flatten_pairs([(1, b"v")])
    with pytest.raises(TypeError, match="value must be bytes or str, not NoneType"):
        impls.batch.flatten_pairs([(b"k", None)])
    with pytest.raises(ValueError):
        impls.batch.flatten_pairs([(b"k", b"v", b"x")])
    with pytest.raises(TypeError):
        impls.batch.flatten_pairs([5])
    # (a 2-character string is no pair: put_many(["ab"]) wrote key a = b)
    for item in ("ab", b"ab", bytearray(b"ab"), memoryview(b"ab")):
        with pytest.raises(TypeError, match="takes .key, value. pairs"):
            impls.batch.flatten_pairs([item])
    with pytest.raises(TypeError, match="takes .key, value. pairs, got a str"):
        impls.batch.flatten_pairs({"ab": "v"})  # (a dict's iteration: its keys)
