"""The segmented WAL: round trips, group commit, torn tails, corruption and compaction."""

from __future__ import annotations

import errno
import glob
import os
import random

import pytest

from raftfast._accel import decode_batch, encode_uniform
from raftfast.core.types import HardState
from raftfast.errors import BatchError, CorruptionError, FormatVersionError, StorageError
from raftfast.storage.base import LogStorage
from raftfast.storage.memory import MemoryStorage
from raftfast.storage.wal import (
    _FORMAT,
    NEWEST_SEGMENT_FILE,
    REC_FORMAT,
    REC_HARD_STATE,
    WAL,
    WAL_FORMAT,
    _encode_hard_state,
    _record,
)

from .walutil import batch, contents, records, reopen


@pytest.fixture
def wal(tmp_path):
    w = WAL.open(str(tmp_path / "wal"))
    yield w
    w.close()


def test_fresh_open_creates_directory_and_first_segment(tmp_path):
    path = tmp_path / "a" / "b"
    with WAL.open(str(path)) as w:
        assert isinstance(w, LogStorage)
        state = w.recovered()
        assert state.hard_state == HardState()
        assert (state.log.first_index, state.log.last_index, state.log.last_term) == (1, 0, 0)
        assert [os.path.basename(p) for p in w.segments] == ["0000000000000000.wal"]
    assert [r[1] for r in records(path / "0000000000000000.wal")] == [REC_FORMAT, 1]


def test_round_trip_across_reopen(wal):
    wal.append(HardState(1, "n1", 0), batch(1, 1, 3))
    wal.append(None, batch(4, 1, 2))
    wal.sync()
    wal.append(HardState(2, "nœud-2", 4), None)
    wal.sync()
    w = reopen(wal)
    try:
        state = w.recovered()
        assert state.hard_state == HardState(2, "nœud-2", 4)
        assert contents(state.log) == [(i, 1, f"e{i}".encode()) for i in range(1, 6)]
        w.append(None, batch(6, 2, 1))  # the writer continues where recovery ended
        w.sync()
        w = reopen(w)
        assert contents(w.recovered().log)[-1] == (6, 2, b"e6")
    finally:
        w.close()


def test_unsynced_appends_are_lost(wal):
    wal.append(HardState(1, "a", 0), batch(1, 1, 2))
    wal.sync()
    wal.append(HardState(2, "b", 0), batch(3, 2, 2))
    w = reopen(wal)  # close does not sync: like a crash
    try:
        assert w.recovered().hard_state == HardState(1, "a", 0)
        assert w.recovered().log.last_index == 2
    finally:
        w.close()


def test_truncation_on_overlap_survives_reopen(tmp_path):
    w = WAL.open(str(tmp_path), segment_bytes=150)
    try:
        w.append(HardState(1, "a", 0), batch(1, 1, 10))
        w.sync()
        w.append(HardState(2, "b", 0), batch(6, 2, 3, tag="x"))  # overwrite 6..10 with 6..8
        w.sync()
        w.append(None, batch(9, 2, 1, tag="y"))
        w.sync()
        w.append(None, batch(9, 3, 1, tag="z"))  # overwrite within the buffer's own history
        w.sync()
        expect = [(i, 1, f"e{i}".encode()) for i in range(1, 6)]
        expect += [(6, 2, b"x6"), (7, 2, b"x7"), (8, 2, b"x8"), (9, 3, b"z9")]
        w = reopen(w, segment_bytes=150)
        assert len(w.segments) > 1
        assert contents(w.recovered().log) == expect
    finally:
        w.close()


def test_append_validation(wal):
    wal.append(None, batch(1, 1, 2))
    with pytest.raises(ValueError, match="gap"):
        wal.append(None, batch(4, 1, 1))
    with pytest.raises(BatchError):
        wal.append(None, batch(3, 1, 1)[:-1])
    wal.append(None, encode_uniform(99, 1, []))  # empty: ignored, wherever it claims to start
    wal.append(None, b"")
    wal.sync()
    w = reopen(wal)
    try:
        assert w.recovered().log.last_index == 2
    finally:
        w.close()


def test_rotation_and_recovery_across_segments(tmp_path):
    w = WAL.open(str(tmp_path), segment_bytes=200)
    try:
        for i in range(1, 31):
            w.append(HardState(i, "n", i - 1), batch(i, i, 1))
            w.sync()
        segments = w.segments
        assert len(segments) >= 5
        for seg in segments:  # every segment describes itself
            assert [r[1] for r in records(seg)[:2]] == [REC_FORMAT, 1]
        names = [int(os.path.basename(p)[:16], 16) for p in segments]
        assert names == list(range(len(names)))
        w = reopen(w, segment_bytes=200)
        state = w.recovered()
        assert state.hard_state == HardState(30, "n", 29)
        assert contents(state.log) == [(i, i, f"e{i}".encode()) for i in range(1, 31)]
    finally:
        w.close()


class Counter:
    def __init__(self, real):
        self.real = real
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        return self.real(*args)


def test_group_commit_is_one_write_and_one_fdatasync(tmp_path, monkeypatch):
    w = WAL.open(str(tmp_path), segment_bytes=300)
    write = Counter(os.writev)
    datasync = Counter(os.fdatasync)
    monkeypatch.setattr(os, "writev", write)
    monkeypatch.setattr(os, "fdatasync", datasync)
    try:
        w.sync()  # nothing buffered: no I/O at all
        assert (write.calls, datasync.calls) == (0, 0)
        for rnd in range(6):  # some of these syncs rotate to a new segment
            first = 1 + rnd * 5
            for k in range(5):
                w.append(HardState(rnd + 1, "n", first + k - 1), batch(first + k, rnd + 1, 1))
            w.sync()
            assert (write.calls, datasync.calls) == (rnd + 1, rnd + 1)
        assert len(w.segments) > 1
    finally:
        w.close()


def test_fsync_false_never_syncs(tmp_path, monkeypatch):
    def forbidden(fd):
        raise AssertionError("fsync=False must not sync")

    monkeypatch.setattr(os, "fdatasync", forbidden)
    monkeypatch.setattr(os, "fsync", forbidden)
    w = WAL.open(str(tmp_path / "w"), segment_bytes=100, fsync=False)
    try:
        for i in range(1, 11):
            w.append(HardState(i, "", 0), batch(i, i, 1))
            w.sync()
        w.release_before(5, 5)
        w = reopen(w, segment_bytes=100, fsync=False)
        assert contents(w.recovered().log)[0][0] == 6
    finally:
        w.close()


def test_torn_tail_at_every_offset_is_truncated(tmp_path, caplog):
    src = tmp_path / "src"
    w = WAL.open(str(src))
    w.append(HardState(1, "a", 0), batch(1, 1, 3))
    w.sync()
    seg = w.segments[0]
    before = os.path.getsize(seg)
    w.append(HardState(2, "b", 3), batch(4, 2, 3))  # one write: [hard state][batch]
    w.sync()
    w.close()
    data = open(seg, "rb").read()
    hs_end = before + records(seg)[-2][2]
    assert records(seg)[-2][1] == 1 and hs_end < len(data)

    for cut in range(before, len(data)):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        (d / os.path.basename(seg)).write_bytes(data[:cut])
        w = WAL.open(str(d))
        try:
            state = w.recovered()
            whole_hs = cut >= hs_end
            assert state.hard_state == (HardState(2, "b", 3) if whole_hs else HardState(1, "a", 0))
            assert state.log.last_index == 3, cut
            assert os.path.getsize(w.segments[0]) == (hs_end if whole_hs else before), cut
            cut_off = cut - (hs_end if whole_hs else before)
            said = [r.getMessage() for r in caplog.records if "torn tail" in r.getMessage()]
            assert bool(said) == bool(cut_off), (cut, said)  # (a cut is said, with its size)
            assert not said or f"of {cut_off} bytes" in said[-1]
            caplog.clear()
            w.append(None, batch(4, 3, 1, tag="new"))
            w.sync()
            w = reopen(w)
            assert contents(w.recovered().log)[-1] == (4, 3, b"new4"), cut
        finally:
            w.close()


@pytest.mark.parametrize("garbage", [b"\0" * 4096, b"\0\0\0\0\0\0\0\0\x02partial", b"\xff" * 7])
def test_garbage_tail_is_truncated(wal, garbage):
    wal.append(HardState(1, "a", 0), batch(1, 1, 2))
    wal.sync()
    seg = wal.segments[-1]
    size = os.path.getsize(seg)
    wal.close()
    with open(seg, "ab") as f:
        f.write(garbage)
    w = WAL.open(wal.path)
    try:
        assert w.recovered().log.last_index == 2
        assert os.path.getsize(seg) == size
    finally:
        w.close()


def flip(path, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ (1 << bit)]))


def test_flipped_bit_in_old_record_refuses_to_start(tmp_path):
    w = WAL.open(str(tmp_path))
    for i in range(1, 4):
        w.append(HardState(i, "a", 0), batch(i, 1, 1))
        w.sync()
    seg = w.segments[0]
    w.close()
    off, rtype, _ = records(seg)[3]  # the first batch record, followed by intact records
    assert rtype == 2
    flip(seg, off + 30)
    with pytest.raises(CorruptionError) as exc:
        WAL.open(str(tmp_path))
    err = exc.value
    assert (err.path, err.offset) == (seg, off)
    assert seg in str(err) and f"byte offset {off}" in str(err)
    assert os.path.getsize(seg) == sum(r[2] for r in records(seg))  # nothing was truncated


def test_bad_length_in_the_middle_refuses_to_start(tmp_path):
    w = WAL.open(str(tmp_path))
    for i in range(1, 4):
        w.append(None, batch(i, 1, 1))
        w.sync()
    seg = w.segments[0]
    w.close()
    off = records(seg)[1][0]
    flip(seg, off + 3, 6)  # the length now runs far past the end of the file
    with pytest.raises(CorruptionError, match="intact record follows") as exc:
        WAL.open(str(tmp_path))
    assert (exc.value.path, exc.value.offset) == (seg, off)


def test_damage_in_a_non_last_segment_refuses_to_start(tmp_path):
    w = WAL.open(str(tmp_path), segment_bytes=100)
    for i in range(1, 8):
        w.append(None, batch(i, 1, 1))
        w.sync()
    first, second = w.segments[:2]
    w.close()
    last_off, _, last_len = records(first)[-1]
    flip(first, last_off + last_len - 1)  # the last record of a segment that is not the last
    with pytest.raises(CorruptionError, match="not the last segment") as exc:
        WAL.open(str(tmp_path))
    assert (exc.value.path, exc.value.offset) == (first, last_off)
    flip(first, last_off + last_len - 1)
    os.truncate(second, os.path.getsize(second) - 1)  # ends mid-record
    with pytest.raises(CorruptionError, match="not the last segment") as exc:
        WAL.open(str(tmp_path))
    assert exc.value.path == second


def _segments_written(path, entries: int = 9) -> list[str]:
    """A WAL at ``path`` of segments of ~100 bytes holding entries 1..``entries``, one a sync;
    its segments' paths (closed)."""
    with WAL.open(str(path), segment_bytes=100) as w:
        for i in range(1, entries + 1):
            w.append(None, batch(i, 1, 1))
            w.sync()
        return w.segments


def test_missing_segments_refuse_to_start(tmp_path):
    segments = _segments_written(tmp_path)
    assert len(segments) >= 3
    os.rename(segments[1], str(tmp_path / "aside"))
    with pytest.raises(CorruptionError, match="missing") as exc:
        WAL.open(str(tmp_path))
    assert exc.value.path == segments[1]
    os.rename(str(tmp_path / "aside"), segments[1])
    os.unlink(segments[0])  # no compaction record explains its absence
    with pytest.raises(CorruptionError, match="missing") as exc:
        WAL.open(str(tmp_path))
    assert exc.value.path == segments[1]


def test_a_missing_newest_segment_refuses_to_start(tmp_path):
    # (deleted, a directory copied in part: the node started on what was left, its newest
    # acknowledged entries gone, without a word)
    segments = _segments_written(tmp_path)
    marker = tmp_path / NEWEST_SEGMENT_FILE
    assert marker.read_text() == os.path.basename(segments[-1])[:16] + "\n"
    os.rename(segments[-1], str(tmp_path / "aside"))
    with pytest.raises(CorruptionError, match="newest segment this WAL made is missing") as exc:
        WAL.open(str(tmp_path))
    assert exc.value.path == segments[-1]
    for path in segments[:-1]:
        os.unlink(path)  # (every one of them)
    with pytest.raises(CorruptionError, match="newest segment"):
        WAL.open(str(tmp_path))
    os.rename(str(tmp_path / "aside"), segments[-1])
    marker.write_text("not a number\n")
    with pytest.raises(CorruptionError, match="not a segment number"):
        WAL.open(str(tmp_path))


def test_a_directory_without_the_newest_segment_file_still_opens(tmp_path):
    _segments_written(tmp_path, 5)
    os.unlink(tmp_path / NEWEST_SEGMENT_FILE)  # (as written before the file existed)
    with WAL.open(str(tmp_path), segment_bytes=100) as w:
        assert w.recovered().log.last_index == 5
        before = len(w.segments)
        for i in range(6, 10):
            w.append(None, batch(i, 1, 1))
            w.sync()
        assert len(w.segments) > before  # (a new segment: the file is written again)
        newest = os.path.basename(w.segments[-1])[:16]
    assert (tmp_path / NEWEST_SEGMENT_FILE).read_text() == newest + "\n"


def write_segment(path, *recs: list[bytes]) -> None:
    with open(path, "wb") as f:
        for r in recs:
            f.write(b"".join(r))


def test_index_gap_between_batches_refuses_to_start(tmp_path):
    hs = _record(1, _encode_hard_state(HardState(1, "", 0)))
    first = _record(2, batch(1, 1, 3))
    write_segment(tmp_path / "0000000000000000.wal", hs, first, _record(2, batch(5, 1, 1)))
    with pytest.raises(CorruptionError, match="gap") as exc:
        WAL.open(str(tmp_path))
    assert exc.value.offset == sum(map(len, hs + first))


def test_intact_record_with_bad_content_refuses_to_start(tmp_path):
    hs = _record(1, _encode_hard_state(HardState(1, "", 0)))
    write_segment(tmp_path / "0000000000000000.wal", hs, _record(2, b"RFB1 not a batch"))
    with pytest.raises(CorruptionError, match="bad record content"):
        WAL.open(str(tmp_path))
    write_segment(tmp_path / "0000000000000000.wal", _record(2, batch(1, 1, 1)))
    with pytest.raises(CorruptionError, match="hard-state record"):
        WAL.open(str(tmp_path))


def test_failed_fdatasync_makes_the_wal_unusable(wal, monkeypatch):
    wal.append(HardState(1, "a", 0), batch(1, 1, 1))
    wal.sync()

    def eio(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", eio)
    wal.append(HardState(2, "b", 0), batch(2, 2, 1))
    with pytest.raises(StorageError, match="Input/output"):
        wal.sync()
    monkeypatch.undo()  # even once the disk "recovers", the WAL does not pretend
    with pytest.raises(StorageError):
        wal.sync()
    with pytest.raises(StorageError):
        wal.append(None, batch(3, 2, 1))
    with pytest.raises(StorageError):
        wal.release_before(1, 1)
    w = reopen(wal)
    try:
        assert w.recovered().log.last_index >= 1
    finally:
        w.close()


def test_failed_write_makes_the_wal_unusable(wal, monkeypatch):
    def enospc(fd, buffers):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", enospc)
    wal.append(HardState(1, "a", 0), batch(1, 1, 1))
    with pytest.raises(StorageError, match="No space"):
        wal.sync()
    monkeypatch.undo()
    with pytest.raises(StorageError):
        wal.sync()


def test_short_writes_are_completed(wal, monkeypatch):
    # 7 bytes at a time, ending inside one buffer or across two (a record's header is 9)
    monkeypatch.setattr(os, "writev", lambda fd, bufs: os.write(fd, b"".join(bufs)[:7]))
    wal.append(HardState(1, "a", 0), batch(1, 1, 3))
    wal.sync()
    monkeypatch.undo()
    w = reopen(wal)
    try:
        assert w.recovered().log.last_index == 3
    finally:
        w.close()


@pytest.mark.parametrize("make", ["file", "dangling link"])
def test_a_wal_path_that_is_not_a_directory_is_named_as_such(tmp_path, make):
    path = tmp_path / "wal"
    if make == "file":
        path.write_bytes(b"")
    else:
        path.symlink_to(tmp_path / "nowhere")
    what = "not a directory" if make == "file" else "a link to nothing"
    with pytest.raises(StorageError, match=f"{path} is {what}; a directory is expected there"):
        WAL.open(str(path))


def test_second_open_of_the_same_directory_is_refused(wal):
    with pytest.raises(StorageError, match="already open"):
        WAL.open(wal.path)


def test_closed_wal_refuses_calls(wal):
    wal.close()
    with pytest.raises(StorageError):
        wal.append(None, batch(1, 1, 1))
    wal.close()  # idempotent


def test_release_before_deletes_old_segments(tmp_path):
    w = WAL.open(str(tmp_path), segment_bytes=120)
    try:
        for i in range(1, 21):
            w.append(HardState(i, "n", i), batch(i, i, 1))
            w.sync()
        before = w.segments
        w.release_before(10, 10)
        deleted = [p for p in before if p not in w.segments]
        assert deleted and deleted == before[: len(deleted)]  # the oldest ones
        assert not any(os.path.exists(p) for p in deleted)
        with pytest.raises(ValueError, match="compacted"):
            w.append(None, batch(10, 20, 1))
        w = reopen(w, segment_bytes=120)
        state = w.recovered()
        assert (state.log.first_index, state.log.term_at(10)) == (11, 10)
        assert contents(state.log) == [(i, i, f"e{i}".encode()) for i in range(11, 21)]
        assert state.hard_state == HardState(20, "n", 20)
        w.release_before(10, 10)  # not an advance: ignored
        w.release_before(25, 21)  # a snapshot past the last entry
        w.append(None, batch(26, 21, 2))
        w.sync()
        w = reopen(w, segment_bytes=120)
        state = w.recovered()
        assert (state.log.first_index, state.log.term_at(25)) == (26, 21)
        assert contents(state.log) == [(26, 21, b"e26"), (27, 21, b"e27")]
    finally:
        w.close()


def test_compaction_of_a_truncated_suffix(tmp_path):
    w = WAL.open(str(tmp_path))
    try:
        w.append(None, batch(1, 1, 10))
        w.append(None, batch(3, 2, 2))  # the log is now 1..4: 5..10 are gone
        w.release_before(4, 2)
        w = reopen(w)
        log = w.recovered().log
        assert (log.first_index, log.last_index, log.last_term) == (5, 4, 2)
    finally:
        w.close()


@pytest.mark.parametrize("seed", range(6))
def test_random_histories_match_memory_storage(tmp_path, seed):
    """Overwrites, syncs, crashes with torn writes, compactions, snapshots past the end and
    rotations: the WAL recovers exactly what the in-memory model says survived."""
    rng = random.Random(seed)
    path = str(tmp_path / "w")
    model = MemoryStorage()

    def open_wal() -> WAL:
        return WAL.open(path, segment_bytes=rng.choice([60, 100, 300, 2000]))

    w = open_wal()
    last, term, compacted = 0, 1, 0
    try:
        for step in range(150):
            op = rng.random()
            if op < 0.55:
                first = rng.randint(max(compacted + 1, last - 5), last + 1)
                term += int(rng.random() < 0.3)
                b = batch(first, term, rng.randint(1, 4), tag=f"s{step}-")
                hs = HardState(term, rng.choice(["", "a", "b"]), compacted) if op < 0.2 else None
                for s in (w, model):
                    s.append(hs, b)
                last = first + batch_len(b) - 1
            elif op < 0.8:
                w.sync()
                model.sync()
            elif op < 0.88:
                model.sync()
                index = rng.randint(compacted + 1, last + rng.choice([1, 1, 4]))
                log = model.recovered().log
                t = log.term_at(index) if index <= log.last_index else term
                w.release_before(index, t)
                model.release_before(index, t)
                compacted, last = index, max(last, index)
            else:  # crash, maybe in the middle of writing the next record
                w.close()
                model.crash()
                if rng.random() < 0.5:
                    torn = b"".join(_record(2, batch(last + 1, term, 3)))
                    torn = torn[: rng.randint(1, len(torn) - 1)]
                    with open(sorted(glob.glob(os.path.join(path, "*.wal")))[-1], "ab") as f:
                        f.write(torn if rng.random() < 0.7 else bytes(rng.randint(1, 200)))
                w = open_wal()
                got, want = w.recovered(), model.recovered()
                assert got.hard_state == want.hard_state, step
                assert got.log.first_index == want.log.first_index, step
                prev = got.log.first_index - 1
                assert got.log.term_at(prev) == want.log.term_at(prev), step
                assert contents(got.log) == contents(want.log), step
                last = want.log.last_index
                term = max(term, want.log.last_term)
    finally:
        w.close()


def batch_len(b: bytes) -> int:
    return len(decode_batch(b)[1])


# -- format versions ------------------------------------------------------------------------


def _segment_with(path, *recs: tuple[int, bytes]) -> None:
    path.write_bytes(b"".join(b"".join(_record(rtype, payload)) for rtype, payload in recs))


def test_a_segment_of_a_newer_format_is_refused_by_name(tmp_path):
    seg = tmp_path / "0000000000000000.wal"
    _segment_with(
        seg,
        (REC_FORMAT, _FORMAT.pack(b"RFW", WAL_FORMAT + 1)),
        (REC_HARD_STATE, _encode_hard_state(HardState(1, "", 0))),
        (2, batch(1, 1, 1)),
    )
    with pytest.raises(FormatVersionError) as exc:
        WAL.open(str(tmp_path))
    assert f"WAL format {WAL_FORMAT + 1}" in str(exc.value) and "upgrade raftfast" in str(exc.value)
    assert str(seg) in str(exc.value)


def test_a_segment_written_before_format_records_still_opens(tmp_path):
    seg = tmp_path / "0000000000000000.wal"
    _segment_with(
        seg,
        (REC_HARD_STATE, _encode_hard_state(HardState(2, "n1", 1))),
        (2, batch(1, 2, 2)),
    )
    with WAL.open(str(tmp_path)) as w:
        state = w.recovered()
        assert state.hard_state == HardState(2, "n1", 1)
        assert state.log.last_index == 2


def test_a_format_record_anywhere_but_first_is_corruption(tmp_path):
    seg = tmp_path / "0000000000000000.wal"
    fmt = (REC_FORMAT, _FORMAT.pack(b"RFW", WAL_FORMAT))
    hs = (REC_HARD_STATE, _encode_hard_state(HardState(1, "", 0)))
    _segment_with(seg, fmt, hs, fmt, hs)
    with pytest.raises(CorruptionError, match="format record inside the segment"):
        WAL.open(str(tmp_path))


def test_a_crash_after_the_format_record_of_a_new_segment_is_a_torn_head(tmp_path):
    """Only the format record of the last segment made it to disk: that segment's head is
    written again, and what it must hold (the hard state) comes from the earlier segment."""
    with WAL.open(str(tmp_path), segment_bytes=1) as w:
        w.append(HardState(3, "n2", 0), batch(1, 3, 1))
        w.sync()
        w.append(None, batch(2, 3, 1))
        w.sync()
        segs = list(w.segments)
    last = segs[-1]
    with open(last, "r+b") as f:
        f.truncate(len(b"".join(_record(REC_FORMAT, _FORMAT.pack(b"RFW", WAL_FORMAT)))))
    with WAL.open(str(tmp_path), segment_bytes=1) as w:
        state = w.recovered()
        assert (state.hard_state.term, state.log.last_index) == (3, 1)
        w.append(None, batch(2, 3, 1))
        w.sync()
    with WAL.open(str(tmp_path)) as w:
        state = w.recovered()
        assert (state.hard_state.term, state.log.last_index) == (3, 2)
    assert [r[1] for r in records(last)][:2] == [REC_FORMAT, REC_HARD_STATE]
