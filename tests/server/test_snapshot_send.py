"""A leader whose snapshot could not be sent (its file pruned by a newer one, a read error)
tells its core so, and sends another: until the core hears how a send ended, it sends that
follower nothing else. A send that raised used to be heard of by no one: the follower stayed
behind until the next leader (found looking for a chaos schedule whose follower never caught up)."""

from __future__ import annotations

import asyncio

import raftfast
from raftfast.errors import StorageError
from tests.server import in_process

from .test_embedded import Counter


def _node(nid: str, peers: dict[str, str], tmp_path) -> raftfast.Node:
    return in_process.node(nid, peers, tmp_path, Counter(), snapshot_entries=20, snapshot_keep=0)


def test_a_snapshot_that_could_not_be_sent_is_sent_again(tmp_path):
    async def main() -> None:
        peers = in_process.peers(3)
        nodes = {nid: _node(nid, peers, tmp_path) for nid in peers}
        for node in nodes.values():
            await node.start()
        try:
            leader_id = await nodes["n1"].wait_for_leader(timeout=30)
            leader = nodes[leader_id]
            behind = next(nid for nid in nodes if nid != leader_id)
            await nodes[behind].stop()
            for _ in range(100):  # (snapshots every 20 entries: the log behind it goes)
                await leader.propose(b"1", timeout=30)
            store = leader._driver.snapshots
            read_chunks = store.read_chunks
            failed = []

            def once_unreadable(meta, *args, **kwargs):
                if not failed:
                    failed.append(meta.index)
                    raise StorageError(f"cannot read snapshot {meta.path}: gone")
                return read_chunks(meta, *args, **kwargs)

            store.read_chunks = once_unreadable
            nodes[behind] = _node(behind, peers, tmp_path)
            await nodes[behind].start()
            target = (await leader.status())["commit_index"]
            deadline = asyncio.get_running_loop().time() + 30
            while (await nodes[behind].status()).get("applied_index", 0) < target:
                assert asyncio.get_running_loop().time() < deadline, "the follower stayed behind"
                await asyncio.sleep(0.05)
            assert failed, "no snapshot was sent"
            assert await nodes[behind].query(b"") == b"100"
        finally:
            for node in nodes.values():
                await node.stop()

    asyncio.run(main())
