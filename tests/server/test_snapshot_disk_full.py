"""A snapshot that finds no room on its disk (a hunt on real small file systems): the node's
own stops short of the room the log needs (it had filled the disk, and the next log write
stopped the node: two at once lost the quorum), a leader's for a follower is refused with
RESOURCE_EXHAUSTED and resent after a growing pause (it was resent 10-20 times a second), and
either raises NOSPACE; the node goes on, and snapshots again once there is room."""

from __future__ import annotations

import asyncio
import errno
import os
import time

import pytest

import raftfast.server.snapshots as node_snapshots
import raftfast.storage.snapshot as snapshot_store
from raftfast.errors import DiskFullError, StorageError
from raftfast.kv.commands import NOSPACE, encode_put
from raftfast.kv.fsm import KVStateMachine
from raftfast.storage.snapshot import SnapshotStore
from tests.polling import until
from tests.server import in_process


def _temp_files(directory) -> list[str]:
    return [name for name in os.listdir(directory) if name.endswith(".tmp")]


def test_a_snapshot_stops_where_the_disk_would_keep_less_than_asked(tmp_path, monkeypatch):
    store = SnapshotStore(str(tmp_path), fsync=False)
    free = {"bytes": 100 << 20}
    monkeypatch.setattr(snapshot_store, "free_bytes", lambda _path: free["bytes"])
    receiver = store.receive(7, 1, keep_free=32 << 20)
    receiver.write(0, b"x" * (1 << 20))
    receiver.write(1 << 20, b"x" * (1 << 20))  # (asked: 100 MiB free)
    free["bytes"] = 33 << 20
    with pytest.raises(DiskFullError, match="stopped at 2097152 bytes: the disk has 34603008"):
        receiver.write(2 << 20, b"x" * (2 << 20))  # (it would leave 31 MiB)
    assert not _temp_files(tmp_path) and store.latest() is None


def test_one_big_write_is_asked_for_in_pieces(tmp_path, monkeypatch):
    """The KV store writes its values in one piece as big as the state (the review: an 80 MB
    one went through unasked and left the disk empty)."""
    store = SnapshotStore(str(tmp_path), fsync=False)
    monkeypatch.setattr(snapshot_store, "free_bytes", lambda _path: free_now())
    written = {"bytes": 0}
    write_all = snapshot_store._write_all

    def counting(fd, data):
        write_all(fd, data)
        written["bytes"] += len(data)

    def free_now() -> int:
        return (50 << 20) - written["bytes"]

    monkeypatch.setattr(snapshot_store, "_write_all", counting)
    receiver = store.receive(7, 1, keep_free=32 << 20)
    with pytest.raises(DiskFullError, match="stopped at 16777216 bytes"):
        receiver.write(0, bytes(40 << 20))  # (the first 8 MiB pieces fit; the third not)
    assert free_now() >= 32 << 20 and not _temp_files(tmp_path)
    # (without keep_free the space is not asked)
    unchecked = store.receive(8, 1)
    for i in range(3):
        unchecked.write(i << 20, b"x" * (1 << 20))
    assert unchecked.finish().index == 8


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
def test_a_full_disk_is_told_from_a_failed_one(tmp_path, monkeypatch, code):
    store = SnapshotStore(str(tmp_path), fsync=False)

    def failing(_fd, _data):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(snapshot_store, "_write_all", failing)
    receiver = store.receive(7, 1)
    with pytest.raises(StorageError) as info:
        receiver.write(0, b"x")
    assert isinstance(info.value, DiskFullError) == (code != errno.EIO)
    assert not _temp_files(tmp_path)


def test_a_node_without_room_for_its_snapshot_goes_on_and_raises_nospace(tmp_path, monkeypatch):
    free = {"bytes": 0}
    monkeypatch.setattr(snapshot_store, "free_bytes", lambda _path: free["bytes"])
    monkeypatch.setattr(node_snapshots, "SNAPSHOT_RETRY_S", 0.3)

    async def main() -> None:
        peers = in_process.peers(1)
        node = in_process.node("n1", peers, tmp_path, KVStateMachine(), snapshot_entries=20)
        async with node:
            await node.wait_for_leader(timeout=30)
            driver = node._driver
            for i in range(30):
                await asyncio.wait_for(driver.propose([encode_put(0, 0, b"k%d" % i, b"v")]), 30)
            await until("a snapshot to find no room", lambda: driver.metrics.snapshots_no_room)
            await until("NOSPACE to be raised", lambda: NOSPACE in driver.fsm.alarms)
            assert driver.failed is None and driver._snapshot_index == 0
            assert not _temp_files(tmp_path / "n1" / "snap")
            free["bytes"] = 1 << 40
            retry_at = driver._snapshot_retry_at
            await until("the time to try again", lambda: time.monotonic() >= retry_at)
            await driver.quota.disarm()
            for i in range(3):  # (a node alone looks for a snapshot due as it writes)
                await asyncio.wait_for(driver.propose([encode_put(0, 0, b"after%d" % i, b"")]), 30)
            await until("a snapshot once there is room", lambda: driver._snapshot_index >= 20)
            assert NOSPACE not in driver.fsm.alarms and driver.failed is None

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_follower_without_room_refuses_the_leaders_snapshot_and_it_waits(tmp_path, monkeypatch):
    room = {"free": 1 << 40}
    # (the free space a node asks when a leader's snapshot comes: only the receiving side)
    monkeypatch.setattr(node_snapshots, "free_bytes", lambda _path: room["free"])

    async def main() -> None:
        peers = in_process.peers(3)

        def make(nid: str):
            return in_process.node(
                nid, peers, tmp_path, KVStateMachine(), snapshot_entries=20, snapshot_keep=0
            )

        nodes = {nid: make(nid) for nid in peers}
        for n in nodes.values():
            await n.start()
        try:
            leader_id = await nodes["n1"].wait_for_leader(timeout=30)
            behind = next(nid for nid in nodes if nid != leader_id)
            await nodes[behind].stop()
            leader = nodes[leader_id]._driver
            for i in range(100):
                await asyncio.wait_for(leader.propose([encode_put(0, 0, b"k%d" % i, b"v")]), 30)
            await until("the leader to compact its log", lambda: leader.raw.first_index > 50)

            room["free"] = 1 << 20  # (less than the 64 MiB a node keeps for its log)
            nodes[behind] = make(behind)
            await nodes[behind].start()
            follower = nodes[behind]._driver
            await until(
                "the follower to refuse a snapshot", lambda: follower.metrics.snapshots_no_room
            )
            failed = leader.metrics.snapshots_send_failed
            await asyncio.sleep(3.0)  # (a window to count the resends in)
            resent = leader.metrics.snapshots_send_failed - failed
            # (0.5 + 1 + 2 s of pauses: at most 3 in the window; it was 10-20 a second)
            assert 1 <= resent <= 4, resent
            await until("NOSPACE at the leader", lambda: NOSPACE in leader.fsm.alarms)
            assert follower.failed is None and leader.failed is None

            room["free"] = 1 << 40
            await until(
                "the follower to catch up once there is room",
                lambda: (
                    follower.applied_index >= leader.applied_index - 1
                    and follower.fsm.get(b"k99") == b"v"
                ),
                30.0,
            )
        finally:
            for n in nodes.values():
                await n.stop()

    asyncio.run(asyncio.wait_for(main(), 90))
