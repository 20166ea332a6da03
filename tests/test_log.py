"""EntryLog semantics and boundary errors, against both implementations."""

from __future__ import annotations

import os
import random
import sys

import pytest

from raftfast import COMPILED
from raftfast.errors import BatchError, CompactedError, LogError, UnavailableError

HUGE = 1 << 80


@pytest.fixture
def EntryLog(impls):  # noqa: N802 - it is a class
    return impls.log.EntryLog


def _log(EntryLog, terms=(1, 1, 2, 3, 3), first=1, prev_term=0):  # noqa: N803
    """A log whose entry at index first+k has term terms[k] and payload b"e<index>"."""
    log = EntryLog(first, prev_term)
    for k, term in enumerate(terms):
        log.append(term, [b"e%d" % (first + k)], k % 3)
    return log


def _state(log):
    return (log.first_index, log.last_index, log.last_term, log.nbytes, len(log))


# -- construction and reads -------------------------------------------------------------------


def test_fresh_log(EntryLog):  # noqa: N803
    log = EntryLog()
    assert _state(log) == (1, 0, 0, 0, 0)
    assert log.term_at(0) == 0
    with pytest.raises(UnavailableError):
        log.term_at(1)
    with pytest.raises(CompactedError):
        log.term_at(-1)
    with pytest.raises(CompactedError):
        log.entry(0)
    with pytest.raises(UnavailableError):
        log.entry(1)


def test_custom_start(EntryLog):  # noqa: N803
    log = EntryLog(first_index=10, prev_term=3)
    assert _state(log) == (10, 9, 3, 0, 0)
    assert log.term_at(9) == 3
    with pytest.raises(CompactedError):
        log.term_at(8)
    with pytest.raises(LogError):
        log.append(2, [b"x"])  # below the snapshot term
    assert log.append(3, [b"x"]) == 10


@pytest.mark.parametrize(("first", "prev"), [(0, 0), (-1, 0), (1 << 62, 0)])
def test_bad_start(EntryLog, first, prev):  # noqa: N803
    with pytest.raises((ValueError, OverflowError)):
        EntryLog(first, prev)


def test_bad_start_types(EntryLog):  # noqa: N803
    with pytest.raises(OverflowError):
        EntryLog(1, -1)
    with pytest.raises(TypeError):
        EntryLog(1.0, 0)


def test_append_and_read(EntryLog):  # noqa: N803
    log = EntryLog()
    assert log.append(1, [b"a", b"bb"]) == 2
    assert log.append(1, []) == 2
    assert log.append(4, [bytearray(b"ccc"), memoryview(b"")], 9) == 4
    assert _state(log) == (1, 4, 4, 6, 4)
    assert [log.term_at(i) for i in range(0, 5)] == [0, 1, 1, 4, 4]
    assert log.entry(1) == (1, 0, b"a")
    assert log.entry(3) == (4, 9, b"ccc")
    assert log.entry(4) == (4, 9, b"")
    for bad in (-HUGE, -1, 0):
        with pytest.raises(CompactedError):
            log.entry(bad)
    for bad in (5, HUGE):
        with pytest.raises(UnavailableError):
            log.entry(bad)
        with pytest.raises(UnavailableError):
            log.term_at(bad)
    with pytest.raises(CompactedError):
        log.term_at(-HUGE)


def test_append_errors_leave_log_unchanged(EntryLog):  # noqa: N803
    log = _log(EntryLog)
    before = (_state(log), log.slice(1, 6))
    with pytest.raises(LogError):
        log.append(2, [b"x"])
    with pytest.raises(TypeError):
        log.append(3, [b"ok", "not bytes"])
    with pytest.raises(OverflowError):
        log.append(-1, [b"x"])
    with pytest.raises(OverflowError):
        log.append(1 << 64, [b"x"])
    with pytest.raises(OverflowError):
        log.append(3, [b"x"], 256)
    with pytest.raises(TypeError):
        log.append(3.0, [b"x"])
    assert (_state(log), log.slice(1, 6)) == before


# -- slice ------------------------------------------------------------------------------------


def _decoded(impls, log, lo, hi, max_bytes=0):
    """The decoded slice, which ``unpack`` gives without the packed batch."""
    decoded = impls.batch.decode_batch(log.slice(lo, hi, max_bytes))
    assert log.unpack(lo, hi, max_bytes) == decoded
    return decoded


def test_slice_round_trip(impls, EntryLog):  # noqa: N803
    log = _log(EntryLog)
    first, terms, types, payloads = _decoded(impls, log, 2, 5)
    assert (first, terms, types, payloads) == (2, [1, 2, 3], [1, 2, 0], [b"e2", b"e3", b"e4"])
    assert impls.batch.batch_info(log.slice(1, 6)) == (1, 5)


def test_slice_empty_ranges(impls, EntryLog):  # noqa: N803
    log = _log(EntryLog)
    assert _decoded(impls, log, 1, 1) == (1, [], [], [])
    assert _decoded(impls, log, 6, 6) == (6, [], [], [])
    assert _decoded(impls, log, 3, 3) == (3, [], [], [])
    assert _decoded(impls, EntryLog(4, 2), 4, 4) == (4, [], [], [])


@pytest.mark.parametrize("method", ["slice", "unpack"])
def test_slice_bounds(EntryLog, method):  # noqa: N803
    log = _log(EntryLog)
    log.compact(2)
    read = getattr(log, method)
    with pytest.raises(CompactedError):
        read(2, 4)
    with pytest.raises(CompactedError):
        read(-HUGE, 4)
    with pytest.raises(CompactedError):
        read(2, HUGE)  # the start is checked first
    with pytest.raises(UnavailableError):
        read(3, 7)
    with pytest.raises(UnavailableError):
        read(3, HUGE)
    with pytest.raises(UnavailableError):
        read(5, 4)
    with pytest.raises(ValueError):
        read(3, 4, -1)


def test_slice_max_bytes(impls, EntryLog):  # noqa: N803
    log = EntryLog()
    log.append(1, [b"a" * 10, b"b" * 10, b"c" * 30, b"d" * 5])

    def indexes(lo, hi, max_bytes):
        first, terms, _, payloads = _decoded(impls, log, lo, hi, max_bytes)
        return list(range(first, first + len(terms))), [len(p) for p in payloads]

    assert indexes(1, 5, 0) == ([1, 2, 3, 4], [10, 10, 30, 5])  # 0 = unlimited
    assert indexes(1, 5, 20) == ([1, 2], [10, 10])  # exact fit
    assert indexes(1, 5, 19) == ([1], [10])
    assert indexes(1, 5, 5) == ([1], [10])  # always at least one entry
    assert indexes(3, 5, 1) == ([3], [30])
    assert indexes(2, 5, 45) == ([2, 3, 4], [10, 30, 5])
    assert indexes(2, 4, 1 << 70) == ([2, 3], [10, 30])
    assert indexes(2, 2, 1) == ([], [])


# -- append_batch -----------------------------------------------------------------------------


def test_append_batch_default_and_start_index(impls, EntryLog):  # noqa: N803
    source = _log(EntryLog)
    batch = source.slice(1, 6)
    log = EntryLog()
    assert log.append_batch(source.slice(1, 3)) == 2
    assert log.append_batch(batch, 3) == 5  # skip the two entries already held
    assert log.slice(1, 6) == batch
    assert log.append_batch(batch, 6) == 5  # start just past the batch: nothing to do
    assert log.append_batch(impls.batch.encode_batch(6, [], [])) == 5
    assert [log.entry(i) for i in range(1, 6)] == [source.entry(i) for i in range(1, 6)]


def test_append_batch_errors(impls, EntryLog):  # noqa: N803
    enc = impls.batch.encode_batch
    log = _log(EntryLog)
    before = (_state(log), log.slice(1, 6))
    with pytest.raises(LogError):
        log.append_batch(enc(7, [3], [b"x"]))  # gap
    with pytest.raises(LogError):
        log.append_batch(enc(5, [3], [b"x"]))  # overlap without start_index
    with pytest.raises(LogError):
        log.append_batch(enc(5, [3, 3], [b"x", b"y"]), 5)  # start_index != last + 1
    with pytest.raises(LogError):
        log.append_batch(enc(7, [3], [b"x"]), 6)  # start before the batch
    with pytest.raises(LogError):
        log.append_batch(enc(3, [3], [b"x"]), 6)  # start after batch_last + 1
    with pytest.raises(LogError):
        log.append_batch(enc(6, [3], [b"x"]), HUGE)
    with pytest.raises(LogError):
        log.append_batch(enc(6, [2], [b"x"]))  # term below last_term
    with pytest.raises(LogError):
        log.append_batch(enc(6, [4, 3], [b"x", b"y"]))  # decreasing inside the batch
    with pytest.raises(LogError):
        log.append_batch(enc((1 << 64) - 1, [3], [b"x"]))
    with pytest.raises(BatchError):
        log.append_batch(enc(6, [3], [b"x"])[:-1])
    with pytest.raises(TypeError):
        log.append_batch("not a batch")
    assert (_state(log), log.slice(1, 6)) == before


def test_append_batch_checks_only_appended_terms(impls, EntryLog):  # noqa: N803
    log = _log(EntryLog)  # last term 3
    batch = impls.batch.encode_batch(4, [1, 3, 5], [b"x", b"y", b"z"])
    assert log.append_batch(batch, 6) == 6  # the skipped entry (term 1) is not re-checked
    assert log.entry(6) == (5, 0, b"z")


# -- find_conflict ----------------------------------------------------------------------------


def test_find_conflict(impls, EntryLog):  # noqa: N803
    enc = impls.batch.encode_batch
    log = _log(EntryLog)  # terms 1 1 2 3 3 at 1..5
    assert log.find_conflict(log.slice(1, 6)) == 6
    assert log.find_conflict(log.slice(2, 4)) == 4
    assert log.find_conflict(enc(3, [2, 3, 3, 3], [b""] * 4)) == 6  # runs past the end
    assert log.find_conflict(enc(3, [2, 4], [b"", b""])) == 4
    assert log.find_conflict(enc(1, [2], [b""])) == 1
    assert log.find_conflict(enc(6, [3], [b""])) == 6
    assert log.find_conflict(enc(6, [], [])) == 6
    assert log.find_conflict(enc(2, [], [])) == 2
    with pytest.raises(UnavailableError):
        log.find_conflict(enc(7, [3], [b""]))
    with pytest.raises(UnavailableError):
        log.find_conflict(enc(7, [], []))
    with pytest.raises(UnavailableError):
        log.find_conflict(enc((1 << 64) - 1, [3, 3], [b"", b""]))
    with pytest.raises(BatchError):
        log.find_conflict(b"RFB1")


def test_find_conflict_treats_compacted_entries_as_matching(impls, EntryLog):  # noqa: N803
    enc = impls.batch.encode_batch
    log = _log(EntryLog)
    log.compact(3)
    # Index 1..3 are gone; even a "wrong" term there counts as matching (it was committed).
    assert log.find_conflict(enc(1, [9, 9, 9, 3, 3], [b""] * 5)) == 6
    assert log.find_conflict(enc(1, [9, 9, 9, 3, 4], [b""] * 5)) == 5
    assert log.find_conflict(enc(1, [9, 9], [b""] * 2)) == 3


# -- find_conflict_by_term --------------------------------------------------------------------


def test_find_conflict_by_term(EntryLog):  # noqa: N803
    log = _log(EntryLog, terms=(1, 1, 2, 3, 3, 5))  # indexes 1..6
    f = log.find_conflict_by_term
    assert f(6, 5) == 6
    assert f(6, 4) == 5
    assert f(6, 3) == 5
    assert f(6, 2) == 3
    assert f(3, 3) == 3
    assert f(6, 1) == 2
    assert f(6, 0) == 0  # term_at(0) == 0 <= 0
    assert f(6, -1) == 0  # none: first_index - 1
    assert f(HUGE, HUGE) == 6
    assert f(100, 2) == 3
    assert f(0, 9) == 0
    assert f(-HUGE, 9) == 0
    log.compact(3)
    assert f(6, 1) == 3  # none left at or below term 1: first_index - 1
    assert f(6, 3) == 5
    assert f(2, 9) == 3


# -- truncate / compact / reset ---------------------------------------------------------------


def test_truncate_after(EntryLog):  # noqa: N803
    log = _log(EntryLog)
    log.truncate_after(5)
    log.truncate_after(HUGE)
    assert log.last_index == 5
    log.truncate_after(3)
    assert _state(log) == (1, 3, 2, 6, 3)
    with pytest.raises(UnavailableError):
        log.entry(4)
    assert log.append(2, [b"new"]) == 4  # a lower term than the truncated tail is fine now
    assert log.entry(4) == (2, 0, b"new")
    log.truncate_after(0)
    assert _state(log) == (1, 0, 0, 0, 0)
    log.compact(0)
    with pytest.raises(CompactedError):
        log.truncate_after(-1)
    with pytest.raises(CompactedError):
        log.truncate_after(-HUGE)


def test_truncate_after_compaction(EntryLog):  # noqa: N803
    log = _log(EntryLog)
    log.compact(2)
    log.truncate_after(2)  # keep nothing, down to the snapshot point
    assert _state(log) == (3, 2, 1, 0, 0)
    with pytest.raises(CompactedError):
        log.truncate_after(1)


def test_compact(impls, EntryLog):  # noqa: N803
    log = _log(EntryLog)
    log.compact(0)  # below first_index: no-op
    log.compact(-HUGE)
    assert log.first_index == 1
    log.compact(2)
    assert _state(log) == (3, 5, 3, 6, 3)
    assert log.term_at(2) == 1
    with pytest.raises(CompactedError):
        log.term_at(1)
    with pytest.raises(CompactedError):
        log.entry(2)
    assert log.entry(3) == (2, 2, b"e3")
    assert impls.batch.decode_batch(log.slice(3, 6))[3] == [b"e3", b"e4", b"e5"]
    log.compact(2)  # already compacted: no-op
    with pytest.raises(UnavailableError):
        log.compact(6)
    with pytest.raises(UnavailableError):
        log.compact(HUGE)
    log.compact(5)
    assert _state(log) == (6, 5, 3, 0, 0)
    assert log.append(3, [b"f"]) == 6


def test_reset(EntryLog):  # noqa: N803
    log = _log(EntryLog)
    log.reset(100, 7)
    assert _state(log) == (100, 99, 7, 0, 0)
    assert log.term_at(99) == 7
    with pytest.raises(CompactedError):
        log.entry(5)
    with pytest.raises(ValueError):
        log.reset(0, 0)
    with pytest.raises(OverflowError):
        log.reset(5, -1)
    assert _state(log) == (100, 99, 7, 0, 0)  # failed resets change nothing
    assert log.append(8, [b"x"]) == 100


def test_many_compact_cycles_stay_correct(impls, EntryLog):  # noqa: N803
    """A follower's steady state: append, compact most of the log, repeat."""
    rng = random.Random(6)
    log = EntryLog()
    model: dict[int, tuple[int, int, bytes]] = {}
    term = 1
    for cycle in range(400):
        if cycle % 50 == 0:
            term += 1
        payloads = [rng.randbytes(rng.randrange(0, 200)) for _ in range(rng.randrange(1, 40))]
        start = log.last_index + 1
        log.append(term, payloads, cycle % 256)
        for k, p in enumerate(payloads):
            model[start + k] = (term, cycle % 256, p)
        keep = rng.randrange(0, 10)
        upto = max(log.last_index - keep, log.first_index - 1)
        log.compact(upto)
        for i in range(log.first_index - 1 - 50, log.first_index):
            model.pop(i, None)
        held = range(log.first_index, log.last_index + 1)
        assert log.nbytes == sum(len(model[i][2]) for i in held)
        assert len(log) == len(held) <= 10
        for i in held:
            assert log.entry(i) == model[i]
    # Grow big once, then compact to nothing and grow again: the buffers must be reusable.
    log.append(term, [b"z" * 1000] * 2000)
    log.compact(log.last_index - 1)
    assert log.nbytes == 1000
    log.append(term, [b"y"] * 3)
    assert impls.batch.decode_batch(log.slice(log.first_index, log.last_index + 1))[3] == [
        b"z" * 1000,
        b"y",
        b"y",
        b"y",
    ]


def test_memory_is_released_after_compaction(EntryLog):  # noqa: N803
    log = EntryLog()
    log.append(1, [b"x" * 1000] * 4000)
    assert sys.getsizeof(log) > 4_000_000
    for _ in range(3):
        log.compact(log.last_index - 1)
        log.append(1, [b"y" * 10])
    log.release_unused()  # (a compaction keeps the buffers for the entries to come)
    assert sys.getsizeof(log) < 64 * 1024
    log.append(1, [b"z" * 1000] * 4000)
    log.truncate_after(log.first_index)
    assert sys.getsizeof(log) < 64 * 1024
    assert log.entry(log.first_index) == (1, 0, b"y" * 10)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGESIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.skipif(not COMPILED, reason="the compiled log's buffer (the pure one is bytes)")
def test_release_unused_gives_back_the_pages_a_compaction_left_behind():
    # More than a quarter of the buffer still in use: it is not shrunk, and the pages the
    # moved payloads left stayed resident (a node held ~65 MiB for ~28 MiB of log).
    from raftfast import _log

    log = _log.EntryLog()
    log.append(1, [b"x" * 1_000_000] * 48)  # (a 64 MiB buffer, 48 MiB of it touched)
    grown = _rss_bytes()
    log.compact(log.first_index + 27)  # 20 MiB kept, moved to the front
    assert log.nbytes == 20_000_000
    # The compaction keeps the pages: the entries to come use them without faulting them in.
    assert grown - _rss_bytes() < 8 << 20
    log.release_unused()
    assert grown - _rss_bytes() > 20 << 20  # (the 28 MiB left behind, given back)
    assert log.entry(log.first_index) == (1, 0, b"x" * 1_000_000)
    log.append(1, [b"y" * 1_000_000] * 30)  # (the pages given back are used again)
    assert log.entry(log.last_index) == (1, 0, b"y" * 1_000_000)


def test_append_skewed_payload_sizes(EntryLog):  # noqa: N803
    """Small payloads first, then a huge one: growing the buffer mid-append must be right."""
    log = EntryLog()
    payloads = [b""] * 50 + [b"a"] * 50 + [bytes(range(256)) * 2000, memoryview(b"tail")]
    assert log.append(3, payloads) == 102
    assert log.nbytes == 50 + 512_000 + 4
    assert log.entry(101)[2] == bytes(range(256)) * 2000
    assert log.entry(102) == (3, 0, b"tail")
    before = (_state(log), log.slice(1, 103))
    with pytest.raises(TypeError):
        log.append(3, [b"q" * 100_000] * 5 + [object()])  # fails after the buffer grew
    assert (_state(log), log.slice(1, 103)) == before
    assert log.append(3, [b"ok"]) == 103
    assert log.entry(103) == (3, 0, b"ok")


def test_truncate_then_regrow(EntryLog):  # noqa: N803
    log = EntryLog()
    for round_ in range(20):
        log.append(round_ + 1, [b"%d-%d" % (round_, i) for i in range(500)])
        log.truncate_after(log.first_index + 10)
        assert log.entry(log.last_index)[2] == b"0-10"
        assert len(log) == 11
