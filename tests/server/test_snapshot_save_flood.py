"""Snapshot streams whose clients never read (raftfast's Admin/SnapshotSave, etcd's
Maintenance/Snapshot: ``etcdctl snapshot save``) cannot make a node take snapshot after
snapshot and hold every file open (pruned snapshots stayed on disk while their streams
waited): a node serves a few at once and refuses more with RESOURCE_EXHAUSTED; once those
clients are gone, backups work again."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

import raftfast
from raftfast.server import admin
from raftfast.storage.snapshot import SnapshotStore
from raftfast.tools.localcluster import ProcCluster, free_ports, wait_for
from tests.unread_calls import UnreadCalls

RESOURCE_EXHAUSTED = "8"
SNAPSHOT_SAVE = "/raftfast.v1.Admin/SnapshotSave"
ETCD_SNAPSHOT = "/etcdserverpb.Maintenance/Snapshot"


def _open_snapshot_files(pid: int | str = "self") -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if ".snap" in target:
            out.append(target)
    return out


def test_unread_snapshot_saves_are_bounded_and_refused_past_the_limit(tmp_path):
    [port] = free_ports(1)
    counter = raftfast.ReplCounter()
    calls = 8

    async def main() -> None:
        node = raftfast.Node(
            id="solo", listen=f"127.0.0.1:{port}", data_dir=str(tmp_path / "solo"),
            state_machine=raftfast.Objects(counter), tick_ms=20,
        )  # fmt: skip
        async with node:
            await node.wait_for_leader()
            snapshot_dir = node._driver.snapshots.directory
            limit = admin.SNAPSHOT_SAVES_AT_ONCE
            raw = await asyncio.to_thread(UnreadCalls, port)
            try:
                streams = []
                for _ in range(calls):
                    await counter.add(1)  # (something new applied: each call wants a snapshot)
                    streams.append(await asyncio.to_thread(raw.open, SNAPSHOT_SAVE))
                    await asyncio.to_thread(raw.pump, 0.2)
                loop = asyncio.get_running_loop()
                until = loop.time() + 10
                while len(raw.status) < calls - limit and loop.time() < until:
                    await asyncio.to_thread(raw.pump, 0.1)
                # A bounded number of snapshot files held open (and on disk).
                assert len(_open_snapshot_files()) <= limit, _open_snapshot_files()
                assert len([n for n in os.listdir(snapshot_dir) if ".snap" in n]) <= 3
                refused = [s for s in streams if raw.status.get(s) == RESOURCE_EXHAUSTED]
                assert len(refused) == calls - limit, raw.status
                assert not raw.reset and len(raw.status) == calls - limit  # (the rest wait)
            finally:
                await asyncio.to_thread(raw.close)

            # The client gone, its streams end and close their files: backups work again.
            async with asyncio.timeout(10):
                while _open_snapshot_files():
                    await asyncio.sleep(0.05)
            backup = tmp_path / "backup"
            async with raftfast.Client([f"127.0.0.1:{port}"], timeout=30) as client:
                info = await client.save_snapshot(str(backup))
            assert info["index"] >= calls and backup.stat().st_size > info["size"]
            assert not _open_snapshot_files()

    asyncio.run(main())


def test_read_chunks_closed_unread_closes_its_file_at_once(tmp_path):
    store = SnapshotStore(str(tmp_path), fsync=False)
    meta = store.save(1, 1, b"x" * 10)
    chunks = store.read_chunks(meta)
    assert len(_open_snapshot_files()) == 1
    chunks.close()  # (never iterated: closed all the same)
    assert not _open_snapshot_files()
    assert b"".join(store.read_chunks(meta)) == b"x" * 10 and not _open_snapshot_files()


def test_unread_etcd_snapshots_are_bounded_and_refused_past_the_limit(tmp_path):
    calls = 8
    with ProcCluster(tmp_path, 1) as cluster:
        leader = cluster.wait_leader()
        pid = cluster.procs[leader].pid
        port = int(cluster.addrs[leader].rsplit(":", 1)[1])
        limit = admin.SNAPSHOT_SAVES_AT_ONCE
        raw = UnreadCalls(port)
        try:
            with raftfast.SyncClient([cluster.addrs[leader]], timeout=30) as client:
                streams = []
                for i in range(calls):
                    client.put(b"k", b"%d" % i)  # (each call wants a snapshot of its own)
                    streams.append(raw.open(ETCD_SNAPSHOT))
                    raw.pump(0.2)
                until = time.monotonic() + 10
                while len(raw.status) < calls - limit and time.monotonic() < until:
                    raw.pump(0.1)
                assert len(_open_snapshot_files(pid)) <= limit, _open_snapshot_files(pid)
                refused = [s for s in streams if raw.status.get(s) == RESOURCE_EXHAUSTED]
                assert len(refused) == calls - limit, raw.status
                assert not raw.reset and len(raw.status) == calls - limit  # (the rest wait)
        finally:
            raw.close()

        # The client gone, its streams end and close their files: etcdctl's backups work again.
        wait_for("the unread streams' files closed", lambda: not _open_snapshot_files(pid), 10)
        backup = tmp_path / "etcd.backup"
        saved = subprocess.run(
            ["etcdctl", f"--endpoints={cluster.addrs[leader]}", "snapshot", "save", str(backup)],
            env={**os.environ, "ETCDCTL_API": "3"}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert saved.returncode == 0, saved.stderr
        assert backup.stat().st_size > 0 and not _open_snapshot_files(pid)
