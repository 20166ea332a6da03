"""A node gives the heap's free pages back after a snapshot dropped the log it covers (the
freed entries and the snapshot's copy of the state stayed resident: bench/memory.py)."""

from __future__ import annotations

import asyncio

import raftfast
from raftfast.server import snapshots
from raftfast.tools.localcluster import free_ports


def test_free_memory_is_released_after_the_log_is_compacted(tmp_path, monkeypatch):
    released: list[int] = []
    monkeypatch.setattr(snapshots, "release_free_memory", lambda: released.append(1) or True)
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
            async with asyncio.timeout(20):
                while not released:
                    await counter.add(1)
            assert driver.raw.first_index > 1  # (the log behind the snapshot was dropped)

    asyncio.run(main())
