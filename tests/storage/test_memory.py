"""MemoryStorage: the WAL's contract without a disk, plus crash() for the simulation."""

from __future__ import annotations

import pytest

from raftfast._accel import decode_batch, encode_uniform
from raftfast.core.types import HardState
from raftfast.errors import BatchError, StorageError
from raftfast.storage.base import LogStorage
from raftfast.storage.memory import MemoryStorage


def batch(first: int, term: int, n: int, tag: str = "e") -> bytes:
    return encode_uniform(first, term, [f"{tag}{first + i}".encode() for i in range(n)])


def contents(log) -> list[tuple[int, int, bytes]]:
    if log.last_index < log.first_index:
        return []
    first, terms, _, payloads = decode_batch(log.slice(log.first_index, log.last_index + 1))
    return [(first + i, t, p) for i, (t, p) in enumerate(zip(terms, payloads, strict=True))]


def test_fresh_storage_is_empty():
    s = MemoryStorage()
    assert isinstance(s, LogStorage)
    state = s.recovered()
    assert state.hard_state == HardState()
    assert (state.log.first_index, state.log.last_index, state.log.last_term) == (1, 0, 0)


def test_only_synced_state_survives_a_crash():
    s = MemoryStorage()
    s.append(HardState(1, "a", 0), batch(1, 1, 3))
    s.sync()
    s.append(HardState(2, "b", 2), batch(4, 2, 2))
    assert s.recovered().log.last_index == 3  # appends are buffered until sync
    s.crash()
    state = s.recovered()
    assert state.hard_state == HardState(1, "a", 0)
    assert contents(state.log) == [(i, 1, f"e{i}".encode()) for i in range(1, 4)]
    s.append(None, batch(4, 3, 1, tag="x"))  # the writer restarts from the synced last index
    s.sync()
    assert contents(s.recovered().log)[-1] == (4, 3, b"x4")


def test_recovered_is_an_independent_copy():
    s = MemoryStorage()
    s.append(HardState(1, "a", 0), batch(1, 1, 2))
    s.sync()
    first = s.recovered()
    first.log.append_batch(batch(3, 1, 1))  # the node mutates the log it was given
    first.log.truncate_after(1)
    s.append(None, batch(3, 2, 2))
    s.sync()
    assert contents(first.log) == [(1, 1, b"e1")]
    assert s.recovered().log.last_index == 4
    assert s.recovered().log is not s.recovered().log


def test_overlap_truncates_then_appends():
    s = MemoryStorage()
    s.append(None, batch(1, 1, 5))
    s.sync()
    s.append(None, batch(3, 2, 1, tag="x"))
    s.append(None, batch(4, 2, 1, tag="y"))
    s.append(None, batch(2, 3, 1, tag="z"))  # overwrites what is still unsynced, too
    s.sync()
    assert contents(s.recovered().log) == [(1, 1, b"e1"), (2, 3, b"z2")]


def test_append_validation():
    s = MemoryStorage()
    s.append(None, batch(1, 1, 2))
    with pytest.raises(ValueError, match="gap"):
        s.append(None, batch(4, 1, 1))
    with pytest.raises(BatchError):
        s.append(None, b"RFB1 garbage")
    s.append(None, encode_uniform(50, 1, []))  # an empty batch is ignored
    s.append(None, None)
    s.sync()
    assert s.recovered().log.last_index == 2


def test_failed_sync_makes_it_unusable_until_a_crash():
    s = MemoryStorage()
    s.append(HardState(1, "a", 0), batch(1, 1, 1))
    s.sync()
    s.fail_next_sync()
    s.append(HardState(2, "b", 0), batch(2, 2, 1))
    with pytest.raises(StorageError):
        s.sync()
    with pytest.raises(StorageError):
        s.sync()
    with pytest.raises(StorageError):
        s.append(None, batch(2, 2, 1))
    s.crash()
    assert s.recovered().hard_state == HardState(1, "a", 0)
    s.append(None, batch(2, 3, 1))
    s.sync()
    assert s.recovered().log.last_term == 3


def test_release_before():
    s = MemoryStorage()
    s.append(None, batch(1, 1, 5))
    s.release_before(3, 1)
    log = s.recovered().log
    assert (log.first_index, log.term_at(3), log.last_index) == (4, 1, 5)
    with pytest.raises(ValueError, match="compacted"):
        s.append(None, batch(3, 2, 1))
    s.release_before(9, 4)  # a snapshot past the last entry
    log = s.recovered().log
    assert (log.first_index, log.last_index, log.last_term) == (10, 9, 4)
    s.append(None, batch(10, 4, 1))
    s.sync()
    assert s.recovered().log.last_index == 10


def test_close():
    s = MemoryStorage()
    s.close()
    with pytest.raises(StorageError):
        s.sync()


def test_release_before_checks_the_term():
    s = MemoryStorage()
    s.append(None, batch(1, 1, 3))
    with pytest.raises(ValueError, match="term"):
        s.release_before(2, 5)
