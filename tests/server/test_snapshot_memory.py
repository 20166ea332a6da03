"""A node gives memory back once its log is at rest after a snapshot dropped the log it covers
(the log's buffer past its entries; the freed entries and the snapshot's copy of the state in
the heap: bench/memory.py), not while the log grows (the pages would be faulted in again)."""

from __future__ import annotations

import asyncio

import raftfast
from raftfast.server import snapshots
from raftfast.tools.localcluster import free_ports


def test_free_memory_is_released_once_the_compacted_log_is_at_rest(tmp_path, monkeypatch):
    released: list[int] = []
    monkeypatch.setattr(snapshots, "release_free_memory", lambda: released.append(1) or True)
    monkeypatch.setattr(snapshots, "RELEASE_AFTER_S", 3600.0)  # (not at rest yet)
    [port] = free_ports(1)
    counter = raftfast.ReplCounter()

    async def main() -> None:
        node = raftfast.Node(
            id="solo", listen=f"127.0.0.1:{port}", data_dir=str(tmp_path / "solo"),
            state_machine=raftfast.Objects(counter), tick_ms=20, snapshot_entries=5,
            snapshot_keep=0, snapshot_log_bytes=64,  # (a trim follows a drop of 16 bytes)
        )  # fmt: skip
        async with node:
            await node.wait_for_leader()
            driver = node._driver
            log_released: list[int] = []
            release_log = driver.raw.release_log_memory
            driver.raw.release_log_memory = lambda: log_released.append(1) or release_log()
            async with asyncio.timeout(20):
                while driver.raw.first_index < 50:  # (the log behind snapshots was dropped)
                    await counter.add(1)
            assert not released and not log_released
            monkeypatch.setattr(snapshots, "RELEASE_AFTER_S", 0.2)
            async with asyncio.timeout(20):
                while not released:
                    await asyncio.sleep(0.01)
            assert log_released == [1]
            # (the log given back is used again; a snapshot may follow the write at once,
            # so the entry is looked for in the log's last index, not among its entries)
            before, value = driver.raw.last_index, counter.value
            assert await counter.add(1) == counter.value == value + 1
            assert driver.raw.last_index > before

    asyncio.run(main())
