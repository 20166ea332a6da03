"""While the leader's own write syncs, a big proposal (a put_many, a big value) goes to the
followers at once (driver._FEED_WHILE_SYNCING_BYTES), not after that sync: the followers'
acknowledgements commit it, and the leader applies it and answers, while its own disk still
holds the write before it. Here the leader's sync is held at a gate for as long as the test
likes. Small proposals wait for the next Ready (to share its frame to each follower), and the
leader's own WAL gets everything once, in order."""

from __future__ import annotations

import asyncio

import raftfast
from raftfast.kv.commands import encode_put
from raftfast.kv.fsm import KVStateMachine
from raftfast.server import driver as driver_module
from raftfast.storage.wal import WAL
from tests.polling import until
from tests.server import in_process

BIG = getattr(driver_module, "_FEED_WHILE_SYNCING_BYTES", 64 * 1024) + 1024
VALUES = [b"1", b"2", b"x" * BIG, b"3"]


def _node(nid: str, peers: dict[str, str], tmp_path) -> raftfast.Node:
    return in_process.node(nid, peers, tmp_path, KVStateMachine())


def test_a_big_proposal_commits_while_the_leaders_own_sync_is_held(tmp_path):
    async def main() -> None:
        peers = in_process.peers(3)
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
            # A small one alone waits for the next Ready, behind the held sync. (Nothing but
            # a big proposal wakes the pump to feed: the wait cannot end it early.)
            await asyncio.sleep(0.2)
            assert not small.done() and len(driver._proposals) == 1
            big = asyncio.ensure_future(driver.propose([encode_put(0, 0, b"big", b"x" * BIG)]))
            await asyncio.wait_for(asyncio.shield(big), 30)  # (fails before the change)
            assert driver._syncing and not gate.is_set()
            # (fed with the big one, in order: both are in the log the followers hold)
            await asyncio.wait_for(asyncio.shield(small), 30)
            assert driver.fsm.get(b"big") == b"x" * BIG
            assert not driver._proposals and not driver._big_proposal
            # (counted: one batch fed while the sync was out, the small write with the big)
            assert driver.metrics.proposal_batches["while_syncing"] == 1

            gate.set()
            writer.start = start
            await asyncio.wait_for(driver.propose([encode_put(0, 0, b"last", b"3")]), 30)
            for node in nodes.values():
                fsm = node._driver.fsm
                await until("converged", lambda fsm=fsm: fsm.get(b"last") == b"3")
                assert fsm.get(b"big") == b"x" * BIG
                assert fsm.get(b"small") == b"2"
        finally:
            gate.set()
            for node in nodes.values():
                await node.stop()

        # The leader's own WAL holds each of them once, in the order proposed: the entries fed
        # while its sync was held went into its next Ready's write.
        with WAL.open(tmp_path / leader_id / "wal", fsync=False) as wal:
            log = wal.recovered().log
            _, _, _, payloads = log.unpack(log.first_index, log.last_index + 1)
        keys = [b"first", b"small", b"big", b"last"]
        commands = [encode_put(0, 0, key, value) for key, value in zip(keys, VALUES, strict=True)]
        assert [p for p in payloads if p in commands] == commands

    asyncio.run(main())
