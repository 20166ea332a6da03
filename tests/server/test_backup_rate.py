"""A backup takes a new snapshot unless the newest covers it, at most one per
BACKUP_SNAPSHOT_EVERY_S: a loop of write, save, cancel forced a snapshot each time (with
100,000 client ids every snapshot held the loop: 14 leader changes in 40 s, a hostile hunt).
A save that comes sooner waits, the saves that waited share the next snapshot, and each still
covers every write acknowledged before it."""

from __future__ import annotations

import asyncio
import time

import raftfast.server.snapshots as snapshots
from raftfast.kv.commands import encode_put
from tests.server.test_session_stream import one_node

EVERY_S = 1.0


def test_backups_force_one_snapshot_per_interval_and_cover_every_write(tmp_path, monkeypatch):
    monkeypatch.setattr(snapshots, "BACKUP_SNAPSHOT_EVERY_S", EVERY_S)

    async def main() -> None:
        async with one_node(tmp_path) as node:
            driver = node._driver
            taken = 0
            take = driver._take_snapshot

            async def counted() -> None:
                nonlocal taken
                taken += 1
                await take()

            driver._take_snapshot = counted

            async def save() -> int:
                meta, chunks = await driver.backup_snapshot()
                chunks.close()
                return meta.index

            async def put(i: int) -> int:
                await driver.propose([encode_put(0, 0, b"k%d" % i, b"v")])
                return driver.applied_index

            started = time.monotonic()
            for i in range(3):
                written = await put(i)
                assert await save() >= written  # (covers what was acknowledged before it)
            # three saves, each after a write: three snapshots, one interval apart
            assert taken == 3
            assert time.monotonic() - started >= 2 * EVERY_S * 0.9
            # saves that come together within the interval share one snapshot
            written = await put(99)
            indexes = await asyncio.gather(save(), save(), save())
            assert min(indexes) >= written
            assert taken == 4
            # and a save when nothing new was written takes none, at once
            before = time.monotonic()
            await save()
            assert taken == 4 and time.monotonic() - before < EVERY_S

    asyncio.run(main())
