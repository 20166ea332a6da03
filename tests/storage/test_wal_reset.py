"""install_snapshot: the WAL (record type 4) and MemoryStorage discard the whole log durably."""

from __future__ import annotations

import glob
import os
import random
import struct

import pytest

from raftfast._accel import decode_batch
from raftfast.core.types import HardState
from raftfast.errors import StorageError
from raftfast.storage.memory import MemoryStorage
from raftfast.storage.wal import REC_SNAPSHOT, WAL, _record

from .walutil import HEADER, batch, contents, records, reopen


def bounds(log) -> tuple[int, int, int]:
    """(first index, last index, prev term) of a recovered log."""
    return log.first_index, log.last_index, log.term_at(log.first_index - 1)


def filled(path: str, n: int = 20, **kw) -> WAL:
    """A WAL holding entries 1..n (entry i has term i // 5 + 1), synced one by one."""
    w = WAL.open(path, **kw)
    for i in range(1, n + 1):
        w.append(HardState(i // 5 + 1, "a", i - 1), batch(i, i // 5 + 1, 1))
        w.sync()
    return w


class Counter:
    def __init__(self, real):
        self.real = real
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        return self.real(*args)


# -- the WAL ----------------------------------------------------------------------------------


def test_install_then_append_then_reopen(tmp_path):
    w = filled(str(tmp_path))
    try:
        w.install_snapshot(30, 7)  # past the end of the log
        w.append(HardState(7, "b", 30), batch(31, 7, 3, tag="n"))
        w.sync()
        w = reopen(w)
        state = w.recovered()
        assert bounds(state.log) == (31, 33, 7)
        assert contents(state.log) == [(i, 7, f"n{i}".encode()) for i in range(31, 34)]
        assert state.hard_state == HardState(7, "b", 30)
    finally:
        w.close()


def test_entries_after_index_do_not_come_back(tmp_path):
    w = filled(str(tmp_path))
    try:
        w.install_snapshot(10, 9)  # entries 11..20 existed (terms 3..5): all gone
        w = reopen(w)
        assert bounds(w.recovered().log) == (11, 10, 9)
        assert contents(w.recovered().log) == []
        w.append(None, batch(11, 9, 2, tag="new"))
        w.sync()
        w = reopen(w)
        assert contents(w.recovered().log) == [(11, 9, b"new11"), (12, 9, b"new12")]
        assert w.recovered().log.term_at(10) == 9
    finally:
        w.close()


def test_install_discards_unsynced_appends_but_keeps_their_hard_state(tmp_path):
    w = filled(str(tmp_path), n=5)
    try:
        w.append(HardState(9, "c", 5), batch(6, 9, 4))  # not synced yet
        w.install_snapshot(7, 8)
        w = reopen(w)
        state = w.recovered()
        assert bounds(state.log) == (8, 7, 8) and contents(state.log) == []
        assert state.hard_state == HardState(9, "c", 5)
    finally:
        w.close()


def test_install_below_the_compaction_point(tmp_path):
    w = filled(str(tmp_path))
    try:
        w.release_before(15, 4)
        w.install_snapshot(12, 6)  # lower than both the last index and the compaction point
        w.append(None, batch(13, 6, 1, tag="x"))
        w.sync()
        w = reopen(w)
        assert bounds(w.recovered().log) == (13, 13, 6)
        assert contents(w.recovered().log) == [(13, 6, b"x13")]
        w.release_before(13, 6)  # compaction after the install moves the point further
        w = reopen(w)
        assert bounds(w.recovered().log) == (14, 13, 6)
    finally:
        w.close()


def test_latest_install_wins(tmp_path):
    w = filled(str(tmp_path))
    try:
        w.install_snapshot(40, 9)
        w.append(None, batch(41, 9, 2))
        w.install_snapshot(25, 8)
        w.append(None, batch(26, 10, 1, tag="z"))
        w.sync()
        w = reopen(w)
        assert bounds(w.recovered().log) == (26, 26, 8)
        assert contents(w.recovered().log) == [(26, 10, b"z26")]
    finally:
        w.close()


def test_appends_after_install_are_validated(tmp_path):
    w = filled(str(tmp_path))
    try:
        w.install_snapshot(10, 3)
        with pytest.raises(ValueError, match="compacted"):
            w.append(None, batch(10, 3, 1))
        with pytest.raises(ValueError, match="gap"):
            w.append(None, batch(12, 3, 1))
        with pytest.raises(ValueError):
            w.install_snapshot(-1, 0)
        with pytest.raises(ValueError):
            w.install_snapshot(1 << 62, 0)
    finally:
        w.close()
    with pytest.raises(StorageError):
        w.install_snapshot(5, 1)  # closed


def test_record_layout_and_one_write_one_fdatasync(tmp_path, monkeypatch):
    w = filled(str(tmp_path), n=3)
    write, datasync = Counter(os.writev), Counter(os.fdatasync)
    monkeypatch.setattr(os, "writev", write)
    monkeypatch.setattr(os, "fdatasync", datasync)
    try:
        w.append(HardState(5, "", 0), batch(4, 5, 1))  # pending: goes out in the same write
        w.install_snapshot(0x1122, 0x33)
        assert (write.calls, datasync.calls) == (1, 1)
        seg = w.segments[-1]
        off, rtype, size = records(seg)[-1]
        assert (rtype, size) == (REC_SNAPSHOT, HEADER.size + 16)
        data = open(seg, "rb").read()
        assert data[off:] == b"".join(_record(REC_SNAPSHOT, struct.pack("<QQ", 0x1122, 0x33)))
    finally:
        w.close()


def test_torn_tail_after_the_install_record(tmp_path):
    w = filled(str(tmp_path))
    w.install_snapshot(8, 2)
    w.append(None, batch(9, 2, 2, tag="k"))
    w.sync()
    seg = w.segments[-1]
    w.close()
    torn = b"".join(_record(2, batch(11, 2, 3)))
    for cut in (1, 8, 9, len(torn) - 1):
        with open(seg, "ab") as f:
            f.write(torn[:cut])
        w = WAL.open(str(tmp_path))
        try:
            assert bounds(w.recovered().log) == (9, 10, 2)
            assert contents(w.recovered().log) == [(9, 2, b"k9"), (10, 2, b"k10")]
        finally:
            w.close()


def test_crash_in_the_middle_of_the_install_write(tmp_path):
    """A torn install record was never acknowledged: the old log comes back whole."""
    src = tmp_path / "src"
    w = filled(str(src), n=6)
    seg = w.segments[-1]
    before = os.path.getsize(seg)
    w.install_snapshot(3, 1)
    w.close()
    data = open(seg, "rb").read()
    assert len(data) - before == HEADER.size + 16
    for cut in range(before, len(data) + 1):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        (d / os.path.basename(seg)).write_bytes(data[:cut])
        w = WAL.open(str(d))
        try:
            log = w.recovered().log
            if cut == len(data):
                assert bounds(log) == (4, 3, 1)
            else:
                assert bounds(log) == (1, 6, 0) and len(contents(log)) == 6
            assert os.path.getsize(w.segments[0]) == (cut if cut == len(data) else before)
        finally:
            w.close()


def test_install_deletes_older_segments(tmp_path):
    w = filled(str(tmp_path), n=30, segment_bytes=150)
    try:
        for i in range(1, 31):  # one sync each: many segments
            w.append(None, batch(i, 10, 1, tag="s"))
            w.sync()
        assert len(w.segments) > 5
        w.install_snapshot(12, 10)  # entries 13..30 live in the old segments: deleted anyway
        assert len(w.segments) == 1
        assert os.path.basename(w.segments[0]) != "0000000000000000.wal"
        w = reopen(w, segment_bytes=150)  # a first segment other than 0: the record explains it
        assert bounds(w.recovered().log) == (13, 12, 10)
        for i in range(13, 40):
            w.append(HardState(11, "", i - 1), batch(i, 11, 1))
            w.sync()
        w.release_before(35, 11)  # may delete the segment holding the install record
        w = reopen(w, segment_bytes=150)
        state = w.recovered()
        assert bounds(state.log) == (36, 39, 11)
        assert state.hard_state == HardState(11, "", 38)
    finally:
        w.close()


def test_crash_while_deleting_old_segments(tmp_path, monkeypatch):
    w = filled(str(tmp_path), n=30, segment_bytes=120)
    assert len(w.segments) > 3
    real_unlink = os.unlink
    calls = []

    def unlink_once(path):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(5, "Input/output error")
        real_unlink(path)

    monkeypatch.setattr(os, "unlink", unlink_once)
    with pytest.raises(StorageError):
        w.install_snapshot(5, 2)  # durable, but only one old segment got deleted
    monkeypatch.undo()
    w.close()
    n_left = len(glob.glob(os.path.join(tmp_path, "*.wal")))
    assert n_left > 2
    w = WAL.open(str(tmp_path), segment_bytes=120)
    try:
        assert bounds(w.recovered().log) == (6, 5, 2) and contents(w.recovered().log) == []
        w.append(None, batch(6, 2, 1))
        w.sync()
        w.release_before(6, 2)  # the stale segments hold nothing that matters: deleted
        assert len(w.segments) == 1
        w = reopen(w, segment_bytes=120)
        assert bounds(w.recovered().log) == (7, 6, 2)
    finally:
        w.close()


# -- MemoryStorage ----------------------------------------------------------------------------


def test_memory_install_semantics():
    s = MemoryStorage()
    s.append(HardState(1, "a", 0), batch(1, 1, 10))
    s.sync()
    syncs = s.syncs
    s.install_snapshot(4, 3)
    assert s.syncs == syncs + 1
    assert bounds(s.recovered().log) == (5, 4, 3)
    s.crash()  # synced immediately
    assert bounds(s.recovered().log) == (5, 4, 3) and contents(s.recovered().log) == []
    with pytest.raises(ValueError, match="compacted"):
        s.append(None, batch(4, 3, 1))
    s.append(HardState(2, "b", 4), batch(5, 3, 1))
    s.install_snapshot(2, 1)  # pending entries dropped, pending hard state kept, one sync
    assert s.syncs == syncs + 2
    assert s.recovered().hard_state == HardState(2, "b", 4)
    assert bounds(s.recovered().log) == (3, 2, 1)
    s.fail_next_sync()
    with pytest.raises(StorageError):
        s.install_snapshot(9, 9)
    s.crash()
    assert bounds(s.recovered().log) == (3, 2, 1)
    with pytest.raises(ValueError):
        s.install_snapshot(-1, 0)


@pytest.mark.parametrize("seed", range(6))
def test_random_histories_with_installs_match_memory_storage(tmp_path, seed):
    """Appends, overwrites, syncs, compactions, installs (below, inside and past the log),
    rotations and crashes with torn writes: the WAL recovers what MemoryStorage says."""
    rng = random.Random(seed)
    path = str(tmp_path / "w")
    model = MemoryStorage()

    def open_wal() -> WAL:
        return WAL.open(path, segment_bytes=rng.choice([60, 100, 300, 2000]))

    def check(step: int) -> None:
        got, want = w.recovered(), model.recovered()
        assert got.hard_state == want.hard_state, step
        assert bounds(got.log)[0::2] == bounds(want.log)[0::2], step
        assert contents(got.log) == contents(want.log), step

    w = open_wal()
    first_ok, last, term = 1, 0, 1
    try:
        for step in range(150):
            op = rng.random()
            if op < 0.5:
                first = rng.randint(max(first_ok, last - 5), last + 1)
                term += int(rng.random() < 0.3)
                b = batch(first, term, rng.randint(1, 4), tag=f"s{step}-")
                hs = HardState(term, rng.choice(["", "a"]), first_ok - 1) if op < 0.2 else None
                for s in (w, model):
                    s.append(hs, b)
                last = first + len(decode_batch(b)[1]) - 1
            elif op < 0.7:
                w.sync()
                model.sync()
            elif op < 0.78:
                model.sync()
                log = model.recovered().log
                index = rng.randint(first_ok, last + rng.choice([1, 1, 4]))
                t = log.term_at(index) if index <= log.last_index else term
                w.release_before(index, t)
                model.release_before(index, t)
                first_ok, last = max(first_ok, index + 1), max(last, index)
            elif op < 0.88:
                index = rng.randint(max(0, first_ok - 8), last + 6)
                term += int(rng.random() < 0.5)
                w.install_snapshot(index, term)
                model.install_snapshot(index, term)
                first_ok, last = index + 1, index
            else:  # crash, maybe in the middle of writing the next record
                w.close()
                model.crash()
                if rng.random() < 0.5:
                    torn = b"".join(
                        _record(REC_SNAPSHOT, struct.pack("<QQ", last + 3, term))
                        if rng.random() < 0.3
                        else _record(2, batch(last + 1, term, 3))
                    )
                    torn = torn[: rng.randint(1, len(torn) - 1)]
                    with open(sorted(glob.glob(os.path.join(path, "*.wal")))[-1], "ab") as f:
                        f.write(torn)
                w = open_wal()
                check(step)
                log = model.recovered().log
                first_ok, last = log.first_index, log.last_index
                term = max(term, log.last_term)
        w.sync()
        model.sync()
        w.close()
        w = open_wal()
        check(-1)
    finally:
        w.close()
