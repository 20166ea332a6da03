"""SnapshotStore: durable save, lookup, retention, crash leftovers, chunked transfer."""

from __future__ import annotations

import os

import pytest

from raftfast.errors import CorruptionError, StorageError
from raftfast.storage.snapshot import KEEP, SnapshotMeta, SnapshotStore


def names(directory) -> list[str]:
    return sorted(os.listdir(directory))


@pytest.fixture
def store(tmp_path) -> SnapshotStore:
    return SnapshotStore(str(tmp_path / "snaps"))


def test_directory_is_created_and_empty_store_has_no_snapshot(tmp_path):
    path = tmp_path / "a" / "b"
    s = SnapshotStore(str(path))
    assert path.is_dir()
    assert s.latest() is None
    assert s.snapshots() == []


def test_save_latest_read_round_trip(store):
    data = bytes(range(256)) * 100
    meta = store.save(10, 3, data)
    assert meta == SnapshotMeta(
        10, 3, os.path.join(store.directory, f"snap-{10:016x}-{3:016x}.snap"), len(data)
    )
    assert names(store.directory) == [os.path.basename(meta.path)]
    assert store.latest() == meta
    assert store.read(meta) == data
    assert b"".join(store.read_chunks(meta, 1000)) == data
    reopened = SnapshotStore(store.directory)  # nothing is cached in memory
    assert reopened.latest() == meta
    assert reopened.read(reopened.latest()) == data


def test_empty_snapshot(store):
    meta = store.save(0, 0, b"")
    assert (meta.size, store.read(meta), list(store.read_chunks(meta))) == (0, b"", [])


def test_read_chunks_sizes(store):
    data = os.urandom(10_000)
    meta = store.save(5, 1, data)
    chunks = list(store.read_chunks(meta, chunk_bytes=4096))
    assert [len(c) for c in chunks] == [4096, 4096, 1808]
    assert b"".join(chunks) == data
    with pytest.raises(ValueError):
        store.read_chunks(meta, 0)


def test_latest_picks_highest_index_not_newest_write(store):
    store.save(30, 2, b"c")
    store.save(20, 2, b"b")  # written last, but older
    assert store.latest().index == 30
    store.save(30, 3, b"d")  # same index, higher term wins
    assert (store.latest().index, store.latest().term) == (30, 3)
    assert store.read(store.latest()) == b"d"


def test_keeps_the_newest_two(store):
    for i in range(1, 6):
        store.save(i * 10, 1, b"x%d" % i)
        assert len(store.snapshots()) == min(i, KEEP)
    assert [m.index for m in store.snapshots()] == [40, 50]
    assert all(not n.endswith(".tmp") for n in names(store.directory))


def test_an_older_snapshot_just_saved_is_kept(store):
    store.save(50, 1, b"a")
    store.save(60, 1, b"b")
    meta = store.save(10, 1, b"old")  # never deletes what it just wrote
    assert store.read(meta) == b"old"
    assert store.latest().index == 60


def test_crash_leftovers_are_ignored_and_cleaned(store):
    good = store.save(10, 1, b"good")
    d = store.directory
    leftovers = [
        f"snap-{20:016x}-{1:016x}.snap.abc123.tmp",  # a save interrupted before its rename
        f"snap-{30:016x}-{2:016x}.snap.x.tmp",
    ]
    for name in leftovers:
        with open(os.path.join(d, name), "wb") as f:
            f.write(b"partial")
    with open(os.path.join(d, "notes.txt"), "wb") as f:  # not ours: left alone
        f.write(b"hi")
    assert store.latest() == good
    assert names(d) == sorted([os.path.basename(good.path), "notes.txt"])
    assert SnapshotStore(d).latest() == good


def test_latest_does_not_delete_an_open_receivers_file(store):
    r = store.receive(7, 1)
    r.write(0, b"abc")
    assert store.latest() is None
    assert os.path.exists(r.temp_path)
    r.write(3, b"def")
    meta = r.finish()
    assert store.read(meta) == b"abcdef"


def test_receiver_in_order_chunks(store):
    data = os.urandom(5000)
    r = store.receive(100, 7)
    offset = 0
    for i in range(0, len(data), 777):
        r.write(offset, data[i : i + 777])
        offset += len(data[i : i + 777])
        assert r.offset == offset
        assert store.latest() is None  # nothing visible until finish
    meta = r.finish()
    assert (meta.index, meta.term, meta.size) == (100, 7, len(data))
    assert store.latest() == meta
    assert store.read(meta) == data
    assert names(store.directory) == [os.path.basename(meta.path)]
    with pytest.raises(ValueError):
        r.write(offset, b"more")  # finished
    r.abort()  # no-op after finish
    assert store.read(meta) == data


def test_receiver_streams_from_read_chunks(tmp_path):
    leader = SnapshotStore(str(tmp_path / "leader"))
    follower = SnapshotStore(str(tmp_path / "follower"))
    src = leader.save(42, 5, os.urandom(3000))
    r = follower.receive(src.index, src.term)
    offset = 0
    for chunk in leader.read_chunks(src, 1024):
        r.write(offset, chunk)
        offset += len(chunk)
    got = r.finish()
    assert follower.read(got) == leader.read(src)


def test_out_of_order_offset_is_refused(store):
    r = store.receive(5, 1)
    r.write(0, b"abcd")
    for bad in (0, 2, 5, 100):
        with pytest.raises(ValueError, match="expected 4"):
            r.write(bad, b"zz")
    assert r.offset == 4  # nothing written by the refused chunks
    r.write(4, b"ef")  # the sender restarts from r.offset
    assert store.read(r.finish()) == b"abcdef"


def test_abort_leaves_nothing(store):
    store.save(1, 1, b"keep")
    before = names(store.directory)
    r = store.receive(9, 2)
    r.write(0, b"partial")
    r.abort()
    r.abort()  # idempotent
    assert names(store.directory) == before
    assert store.latest().index == 1
    with pytest.raises(ValueError):
        r.write(7, b"x")
    with pytest.raises(ValueError):
        r.finish()


def test_receiver_context_manager_aborts_on_error(store):
    with pytest.raises(RuntimeError), store.receive(3, 1) as r:
        r.write(0, b"abc")
        raise RuntimeError("connection lost")
    assert names(store.directory) == []


def test_failed_write_cleans_up(store, monkeypatch):
    def enospc(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", enospc)
    with pytest.raises(StorageError, match="No space"):
        store.save(1, 1, b"data")
    monkeypatch.undo()
    assert names(store.directory) == []


def test_read_detects_a_changed_size(store):
    meta = store.save(1, 1, b"0123456789")
    with open(meta.path, "r+b") as f:
        f.truncate(4)
    with pytest.raises(CorruptionError, match="expected 10"):
        store.read(meta)
    with pytest.raises(CorruptionError, match="expected 10"):
        b"".join(store.read_chunks(meta, 3))


def test_bad_index_or_term(store):
    with pytest.raises(ValueError):
        store.save(-1, 0, b"")
    with pytest.raises(ValueError):
        store.receive(0, 1 << 64)
    assert names(store.directory) == []


def test_save_fsyncs_file_and_directory(tmp_path, monkeypatch):
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    s = SnapshotStore(str(tmp_path / "s"))
    calls.clear()
    s.save(1, 1, b"x")
    assert len(calls) >= 2  # the file, then the directory after the rename
    calls.clear()
    SnapshotStore(str(tmp_path / "t"), fsync=False).save(1, 1, b"x")
    assert calls == []


def test_a_snapshot_renamed_or_copied_under_another_name_is_refused(tmp_path):
    # (a hunt renamed the newest snapshot to another term or a higher index, or copied an
    # older one under a newer name: the node trusted the name and lost acknowledged writes)
    store = SnapshotStore(str(tmp_path / "snap"))
    members = b'{"format":1,"learners":{},"voters":{"n1":"127.0.0.1:7001"}}'
    made = store.create(180, 1, members)
    made.out.write(b"state")
    meta = made.finish()
    membership, f = store.open_state(meta)
    with f:
        assert f.read() == b"state"
    assert b'"snapshot_at":[180,1]' in membership
    directory = os.path.dirname(meta.path)
    for index, term, how in [(180, 2, os.rename), (4095, 1, os.rename), (188, 1, os.link)]:
        other = os.path.join(directory, f"snap-{index:016x}-{term:016x}.snap")
        how(meta.path, other)
        moved = store.latest()
        assert moved is not None and (moved.index, moved.term) == (index, term)
        with pytest.raises(CorruptionError, match="renamed or copied") as exc:
            store.open_state(moved)
        assert exc.value.path == other
        if how is os.rename:
            os.rename(other, meta.path)
        else:
            os.unlink(other)
    membership, f = store.open_state(store.latest())  # (back under its own name)
    f.close()


def test_a_snapshot_without_its_position_still_opens(tmp_path):
    from raftfast.storage.snapshot import state_header

    store = SnapshotStore(str(tmp_path / "snap"))
    members = b'{"format":1,"learners":{},"voters":{"n1":"127.0.0.1:7001"}}'
    meta = store.save(7, 1, state_header(members) + b"state")  # (as written before)
    membership, f = store.open_state(meta)
    with f:
        assert membership == members and f.read() == b"state"


def test_a_snapshot_path_that_is_not_a_directory_is_named_as_such(tmp_path):
    path = tmp_path / "snap"
    path.write_bytes(b"")
    with pytest.raises(StorageError, match=f"{path} is not a directory; a directory is expected"):
        SnapshotStore(str(path))
