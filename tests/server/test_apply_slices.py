"""Applying committed entries holds the loop for a slice of time at most: what is left waits
for the next turn of the loop, in order, with everything committed after it. A Ready hands
over up to 8 MiB of entries, and 8 MiB of etcd Txns of tiny puts held every node 1.7 s, long
enough for elections (a hostile hunt); here a state machine of the test's takes 4 ms a
command and 150 commands come in one Ready."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import BinaryIO

import raftfast
from raftfast.core.types import Committed
from raftfast.server.snapshots import SnapshotMixin
from raftfast.tools.localcluster import free_ports
from tests.loop_gaps import longest_gap

COMMANDS = 150
COST_S = 0.004  # per command: 0.6 s in all


class Slow(raftfast.StateMachine):
    def __init__(self) -> None:
        self.indexes: list[int] = []
        self.total = 0

    def apply(self, index: int, command: bytes) -> object:
        time.sleep(COST_S)  # (holds the loop's thread, as a costly command does)
        self.indexes.append(index)
        self.total += int(command)
        return str(self.total).encode()

    def query(self, request: bytes) -> bytes:
        return str(self.total).encode()

    def snapshot(self, out: BinaryIO) -> None:
        out.write(str(self.total).encode())

    def restore(self, inp: BinaryIO) -> None:
        self.total = int(inp.read())


def _node(tmp_path, machine: Slow) -> raftfast.Node:
    port = free_ports(1)[0]
    return raftfast.Node(
        id="n1",
        listen=f"127.0.0.1:{port}",
        peers={"n1": f"127.0.0.1:{port}"},
        data_dir=str(tmp_path / "n1"),
        state_machine=machine,
        tick_ms=20,
    )


def test_a_long_apply_lets_the_loop_run_between_slices(tmp_path):
    async def main() -> None:
        machine = Slow()
        node = _node(tmp_path, machine)
        await node.start()
        try:
            await node.wait_for_leader(timeout=30)

            async def propose_all() -> list:
                proposals = [node.propose(b"1", timeout=60) for _ in range(COMMANDS)]
                return await asyncio.gather(*proposals)

            gap, results = await longest_gap(propose_all)
            # every command applied once, in log order, each answered with its own result
            assert sorted(int(r) for r in results) == list(range(1, COMMANDS + 1))
            assert machine.indexes == sorted(machine.indexes)
            assert len(machine.indexes) == COMMANDS
            # At once this was one gap of ~0.6 s; in slices of 10 ms the longest is a slice
            # and a command plus what a busy machine adds.
            assert gap < 0.3, f"the loop stood still {gap:.3f} s"
        finally:
            await node.stop()

    asyncio.run(main())


def test_entries_held_when_the_node_stops_are_applied_and_answered(tmp_path):
    # Committed, so answered with their results: failed ("shutting down"), a client without
    # an id that retried would have had its write applied twice (a review).
    async def main() -> None:
        machine = Slow()
        node = _node(tmp_path, machine)
        await node.start()
        await node.wait_for_leader(timeout=30)
        calls = [asyncio.ensure_future(node.propose(b"1", timeout=60)) for _ in range(COMMANDS)]
        deadline = time.monotonic() + 30
        while not machine.indexes:  # (the first slice applied: the rest is held)
            assert time.monotonic() < deadline, "nothing applied"
            await asyncio.sleep(0.001)
        await node.stop()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert sorted(int(r) for r in results) == list(range(1, COMMANDS + 1)), [
            r for r in results if isinstance(r, BaseException)
        ][:1]

    asyncio.run(main())


def test_a_snapshot_drops_the_held_entries_it_holds():
    def committed(first: int, count: int) -> Committed:
        return Committed(first, [1] * count, [0] * count, [b"x%d" % i for i in range(count)])

    node = SimpleNamespace(_held_commits=[committed(10, 5), committed(15, 5), committed(20, 3)])
    SnapshotMixin._drop_held_through(node, 16)
    assert [(c.first, c.last) for c in node._held_commits] == [(17, 19), (20, 22)]
    assert node._held_commits[0].payloads == [b"x2", b"x3", b"x4"]
    SnapshotMixin._drop_held_through(node, 30)
    assert node._held_commits == []
