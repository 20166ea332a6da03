"""While the leader's own write syncs, a big proposal (a put_many, a big value) goes to the
followers at once (driver._FEED_WHILE_SYNCING_BYTES), not after that sync: the followers'
acknowledgements commit it, and the leader applies it and answers, while its own disk still
holds the write before it. Here the leader's sync is held at a gate for as long as the test
likes. Small proposals wait for the next Ready (to share its frame to each follower)."""

from __future__ import annotations

import asyncio

import raftfast
from raftfast.kv.commands import encode_put
from raftfast.kv.fsm import KVStateMachine
from raftfast.server import driver as driver_module
from raftfast.tools.localcluster import free_ports
from tests.polling import until

BIG = getattr(driver_module, "_FEED_WHILE_SYNCING_BYTES", 64 * 1024) + 1024


def _node(nid: str, peers: dict[str, str], tmp_path) -> raftfast.Node:
    return raftfast.Node(
        id=nid,
        listen=peers[nid],
        peers=peers,
        data_dir=str(tmp_path / nid),
        state_machine=KVStateMachine(),
        tick_ms=20,
    )


def test_a_big_proposal_commits_while_the_leaders_own_sync_is_held(tmp_path):
    async def main() -> None:
        ports = free_ports(3)
        peers = {f"n{i + 1}": f"127.0.0.1:{p}" for i, p in enumerate(ports)}
        nodes = {nid: _node(nid, peers, tmp_path) for nid in peers}
        for node in nodes.values():
            await node.start()
        gate = asyncio.Event()
        held = asyncio.Event()
        try:
            leader_id = await nodes["n1"].wait_for_leader(timeout=30)
            driver = nodes[leader_id]._driver
            await asyncio.wait_for(driver.propose([encode_put(0, 0, b"warm", b"up")]), 30)

            writer = driver._wal_writer
            start = writer.start

            def gated_start(delay: float = 0.0):
                synced = start(delay)
                if synced is None:
                    return None

                async def hold() -> None:
                    await synced
                    held.set()
                    await gate.wait()

                return asyncio.ensure_future(hold())

            writer.start = gated_start
            first = asyncio.ensure_future(driver.propose([encode_put(0, 0, b"first", b"1")]))
            await asyncio.wait_for(held.wait(), 30)  # (that Ready's own sync is done, and held)
            assert driver._syncing
            # The first write's entries went out before the sync: the followers committed it.
            await asyncio.wait_for(first, 30)

            small = asyncio.ensure_future(driver.propose([encode_put(0, 0, b"small", b"2")]))
            big = asyncio.ensure_future(driver.propose([encode_put(0, 0, b"big", b"x" * BIG)]))
            await asyncio.wait_for(asyncio.shield(big), 30)  # (fails before the change)
            assert driver._syncing and not gate.is_set()
            # (fed with the big one, in order: both are in the log the followers hold)
            await asyncio.wait_for(asyncio.shield(small), 30)
            assert driver.fsm.get(b"big") == b"x" * BIG

            gate.set()
            writer.start = start
            last = encode_put(0, 0, b"last", b"3")
            await asyncio.wait_for(driver.propose([last]), 30)
            for node in nodes.values():
                fsm = node._driver.fsm
                await until("converged", lambda fsm=fsm: fsm.get(b"last") == b"3")
                assert fsm.get(b"big") == b"x" * BIG
                assert fsm.get(b"small") == b"2"
        finally:
            gate.set()
            for node in nodes.values():
                await node.stop()

    asyncio.run(main())
