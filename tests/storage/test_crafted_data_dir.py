"""A crafted or damaged data directory is refused at start with one clear line, naming the
file: never a traceback, never a node that runs but can never work, and never a huge file read
whole into memory."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest

from raftfast._accel import EntryLog, encode_uniform
from raftfast.core.types import ENTRY_CONFIG, HardState
from raftfast.errors import CorruptionError
from raftfast.limits import MAX_TERM_OR_INDEX
from raftfast.storage import snapshot as snapshot_mod
from raftfast.storage import wal as wal_mod
from raftfast.storage.base import RecoveredState
from raftfast.storage.snapshot import SnapshotStore, read_state_header, state_header
from raftfast.storage.wal import (
    _FORMAT,
    REC_BATCH,
    REC_COMPACTED,
    REC_FORMAT,
    REC_HARD_STATE,
    WAL,
    WAL_FORMAT,
    _record,
)
from raftfast.tools.localcluster import free_ports
from tests.fault.test_bad_input import one_error_line, run_node

_HS = struct.Struct("<QQH")


def _rec(rtype: int, payload: bytes) -> bytes:
    return b"".join(_record(rtype, payload))


def _hard_state(term: int, commit: int = 0, vote: bytes = b"") -> bytes:
    # Encoded by hand: the WAL's own encoder may refuse what a crafted file holds.
    return _rec(REC_HARD_STATE, _HS.pack(term, commit, len(vote)) + vote)


def _segment(wal_dir: Path, *records: bytes) -> Path:
    wal_dir.mkdir(parents=True, exist_ok=True)
    seg = wal_dir / "0000000000000000.wal"
    seg.write_bytes(_rec(REC_FORMAT, _FORMAT.pack(b"RFW", WAL_FORMAT)) + b"".join(records))
    return seg


def _refused(wal_dir: Path) -> CorruptionError:
    with pytest.raises(CorruptionError) as info:
        WAL.open(str(wal_dir)).close()
    exc = info.value
    assert exc.path and exc.path in str(exc) and f"byte offset {exc.offset}" in str(exc), exc
    return exc


# -- terms ------------------------------------------------------------------------------------


@pytest.mark.parametrize("term", [MAX_TERM_OR_INDEX + 1, (1 << 63), (1 << 64) - 1])
def test_a_hard_state_term_out_of_range_is_refused(tmp_path, term):
    seg = _segment(tmp_path / "w", _hard_state(term))
    exc = _refused(tmp_path / "w")
    assert exc.path == str(seg) and f"term {term}" in str(exc)
    _segment(tmp_path / "w", _hard_state(MAX_TERM_OR_INDEX, 0, b"n1"))  # the largest one is fine
    with WAL.open(str(tmp_path / "w")) as w:
        assert w.recovered().hard_state == HardState(MAX_TERM_OR_INDEX, "n1", 0)


def test_a_commit_index_out_of_range_is_refused(tmp_path):
    _segment(tmp_path / "w", _hard_state(1, (1 << 64) - 1))
    assert "commit" in str(_refused(tmp_path / "w"))


@pytest.mark.parametrize("vote", [b"a b", b"n\x001", b"x" * 300])
def test_a_vote_that_names_no_possible_node_is_refused(tmp_path, vote):
    _segment(tmp_path / "w", _hard_state(1, 0, vote))
    assert "vote" in str(_refused(tmp_path / "w"))


def test_a_compaction_term_out_of_range_is_refused(tmp_path):
    compacted = _rec(REC_COMPACTED, struct.pack("<QQ", 5, (1 << 64) - 1))
    _segment(tmp_path / "w", _hard_state(1), compacted)
    assert "term" in str(_refused(tmp_path / "w"))


def test_an_entry_term_out_of_range_is_refused(tmp_path):
    batch = encode_uniform(1, MAX_TERM_OR_INDEX + 1, [b"a"])
    _segment(tmp_path / "w", _hard_state(MAX_TERM_OR_INDEX), _rec(REC_BATCH, batch))
    assert f"entry term {MAX_TERM_OR_INDEX + 1} is out of range" in str(_refused(tmp_path / "w"))


def test_an_entry_above_the_hard_state_term_is_named():
    log = EntryLog()
    log.append(1000, [b"x"])
    with pytest.raises(CorruptionError, match=r"entry 1 has term 1000, above .* term 1") as info:
        RecoveredState(HardState(1, "", 0), log).check_terms("/d/wal")
    assert info.value.path == "/d/wal"
    RecoveredState(HardState(1000, "", 0), log).check_terms("/d/wal")  # equal is fine
    # An empty log after a snapshot whose hard state was not written yet (a crash between the
    # "snapshot installed" record and the next sync) is not corrupt: the node relearns its term.
    RecoveredState(HardState(1, "", 0), EntryLog(11, 7)).check_terms("/d/wal")


# -- configuration entries --------------------------------------------------------------------


def test_a_configuration_entry_that_does_not_decode_is_refused(tmp_path):
    batch = encode_uniform(1, 1, [b"garbage{"], ENTRY_CONFIG)
    seg = _segment(tmp_path / "w", _hard_state(1), _rec(REC_BATCH, batch))
    exc = _refused(tmp_path / "w")
    assert exc.path == str(seg) and "configuration entry 1" in str(exc)


# -- sizes ------------------------------------------------------------------------------------


def test_a_segment_larger_than_any_the_wal_writes_is_refused_unread(tmp_path):
    seg = _segment(tmp_path / "w", _hard_state(1))
    limit = wal_mod.DEFAULT_SEGMENT_BYTES + wal_mod.MAX_SEGMENT_OVERSHOOT
    with open(seg, "r+b") as f:
        f.truncate(limit + 1)  # sparse: nothing is written
    exc = _refused(tmp_path / "w")
    assert exc.path == str(seg) and f"{limit + 1} bytes" in str(exc)
    assert seg.stat().st_size == limit + 1  # not cut as a "torn tail" either


def test_a_larger_segment_size_setting_reads_larger_segments(tmp_path, monkeypatch):
    monkeypatch.setattr(wal_mod, "MAX_SEGMENT_OVERSHOOT", 100)  # (keeps the files small)
    monkeypatch.setattr(wal_mod, "DEFAULT_SEGMENT_BYTES", 100)
    with WAL.open(str(tmp_path / "w"), segment_bytes=1000) as w:
        w.append(HardState(1, "", 0), encode_uniform(1, 1, [b"x" * 500]))
        w.sync()
    with pytest.raises(CorruptionError, match="more than any segment"):
        WAL.open(str(tmp_path / "w"), segment_bytes=100).close()  # 200 bytes at most
    with WAL.open(str(tmp_path / "w"), segment_bytes=1000) as w:
        assert w.recovered().log.last_index == 1


class _Zeros(io.RawIOBase):
    """A huge file of zeros that records how much each read asked for."""

    def __init__(self, head: bytes) -> None:
        self.head, self.asked = head, []

    def read(self, n: int = -1) -> bytes:
        self.asked.append(n)
        out, self.head = self.head[:n], self.head[n:]
        return out + bytes(min(n, 1 << 21) - len(out))  # (a real file would give all n)


def test_a_snapshot_membership_length_is_bounded_before_it_is_read():
    membership = b'{"format":1}'
    head = bytearray(state_header(membership))
    struct.pack_into("<I", head, 4, 0xFFFFFFFF)  # a crafted membership length of 4 GiB
    f = _Zeros(bytes(head))
    with pytest.raises(CorruptionError, match="bad snapshot header"):
        read_state_header(f, "/d/snap/s.snap")  # type: ignore[arg-type]
    assert max(f.asked) <= snapshot_mod.MAX_MEMBERSHIP_BYTES


def test_a_snapshot_membership_too_long_is_refused_by_every_reader(tmp_path):
    store = SnapshotStore(str(tmp_path / "snap"), fsync=False)
    big = b" " * (snapshot_mod.MAX_MEMBERSHIP_BYTES + 1)
    meta = store.save(5, 1, state_header(big) + b"state")
    with pytest.raises(CorruptionError):
        store.read_membership(meta)
    with pytest.raises(CorruptionError):
        store.open_state(meta)


@pytest.mark.parametrize(
    "index, term", [(MAX_TERM_OR_INDEX, 1), (1, MAX_TERM_OR_INDEX + 1), ((1 << 64) - 1, 1)]
)
def test_a_snapshot_named_out_of_range_is_refused(tmp_path, index, term):
    snap = tmp_path / "snap"
    snap.mkdir()
    path = snap / f"snap-{index:016x}-{term:016x}.snap"
    path.write_bytes(state_header(b'{"format":1,"learners":{},"voters":{}}'))
    with pytest.raises(CorruptionError) as info:
        SnapshotStore(str(snap)).latest()
    assert info.value.path == str(path) and "out of range" in str(info.value)


# -- the node ---------------------------------------------------------------------------------


def _node_args(data: Path) -> list[str]:
    port = free_ports(1)[0]
    return ["--id", "n1", "--peers", f"n1=127.0.0.1:{port}", "--data-dir", str(data)]


def _start_refused(data: Path, tmp_path: Path) -> str:
    proc = run_node(_node_args(data), tmp_path, timeout=60)  # (it exits at once: no port used)
    assert proc.returncode == 1, proc.stderr
    return one_error_line(proc)


def test_node_with_a_term_that_cannot_grow_exits_1(tmp_path):
    seg = _segment(tmp_path / "d" / "wal", _hard_state((1 << 64) - 1))
    line = _start_refused(tmp_path / "d", tmp_path)
    assert str(seg) in line and "term 18446744073709551615" in line, line


def test_node_with_a_garbage_configuration_entry_exits_1(tmp_path):
    batch = encode_uniform(1, 1, [b"\xff not json"], ENTRY_CONFIG)
    seg = _segment(tmp_path / "d" / "wal", _hard_state(1), _rec(REC_BATCH, batch))
    line = _start_refused(tmp_path / "d", tmp_path)
    assert str(seg) in line and "configuration entry 1" in line, line


def test_node_with_a_huge_sparse_segment_exits_1_without_reading_it(tmp_path):
    seg = _segment(tmp_path / "d" / "wal", _hard_state(1))
    with open(seg, "r+b") as f:
        f.truncate(6 << 30)  # the hunt's 6 GiB (sparse: no disk space)
    line = _start_refused(tmp_path / "d", tmp_path)
    assert str(seg) in line and f"{6 << 30} bytes" in line, line
    assert seg.stat().st_size == 6 << 30
