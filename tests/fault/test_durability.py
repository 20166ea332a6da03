"""kill -9 of the whole cluster under a heavy pipelined write load loses no acknowledged write.

Only what a node wrote before it died survives a kill -9, so any write acknowledged before a
quorum had written it (a follower answering on receipt, a leader counting an unwritten copy)
shows up here as a missing key after the restart.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal

from raftfast.client import Client
from raftfast.tools.localcluster import ProcCluster

ROUNDS = 4


async def _load_then_kill(cluster: ProcCluster, round_no: int, rng: random.Random) -> set[str]:
    """Pipelined puts; the instant the ``kill_at``-th acknowledgement arrives, kill -9 every
    node. The newest acknowledged writes are then the ones most likely to be unwritten, if
    anything acknowledges too early."""
    acked: set[str] = set()
    kill_at = rng.randint(2_000, 8_000)
    killed = asyncio.Event()

    def kill_all() -> None:
        for proc in cluster.procs.values():
            os.kill(proc.pid, signal.SIGKILL)  # all at once: no node gets to write more
        killed.set()

    async with Client(cluster.endpoints, timeout=10) as client:

        async def put(key: str) -> None:
            try:
                await client.put(key, key)
            except Exception:  # noqa: BLE001 - unacknowledged: allowed to be lost
                return
            acked.add(key)
            if len(acked) >= kill_at and not killed.is_set():
                kill_all()

        async def load() -> None:
            i = 0
            while not killed.is_set():
                await asyncio.gather(*(put(f"r{round_no}-{i + j}") for j in range(300)))
                i += 300

        task = asyncio.create_task(load())
        await asyncio.wait_for(killed.wait(), timeout=120)
        for nid in list(cluster.procs):
            cluster.kill(nid)  # reap
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return acked


async def _missing(cluster: ProcCluster, keys: set[str]) -> list[str]:
    ordered = sorted(keys)
    async with Client(cluster.endpoints, timeout=30) as client:
        values = []
        for i in range(0, len(ordered), 5000):
            chunk = ordered[i : i + 5000]
            values += await asyncio.gather(*(client.get(k) for k in chunk))
    return [k for k, v in zip(ordered, values, strict=True) if v != k.encode()]


def test_whole_cluster_kill9_under_load_loses_no_acknowledged_write(tmp_path):
    rng = random.Random(7)
    # Followers get a slow, jittery disk (each group commit starts 0-40 ms late): any window in
    # which a follower acknowledges an entry before writing it grows wide enough to hit.
    with ProcCluster(tmp_path, 3, env={"RAFTFAST_FAULT_DISK_DELAY_MS": "40"}) as cluster:
        all_acked: set[str] = set()
        for round_no in range(ROUNDS):
            old_leader = cluster.wait_leader(timeout=60)
            acked = asyncio.run(_load_then_kill(cluster, round_no, rng))
            assert len(acked) > 100, "the load made too little progress to test anything"
            all_acked |= acked
            # Two nodes (a majority) come back first and must elect a leader holding every
            # acknowledged write on their own: on even rounds the two followers, on odd rounds
            # the old leader and one follower.
            followers = [n for n in cluster.ids if n != old_leader]
            first = followers if round_no % 2 == 0 else [old_leader, rng.choice(followers)]
            for nid in first:
                cluster.start(nid, first_time=False)
            cluster.wait_leader(timeout=60, among=first)
            for nid in cluster.ids:
                if nid not in first:
                    cluster.start(nid, first_time=False)
            lost = asyncio.run(_missing(cluster, all_acked))
            assert not lost, f"{len(lost)} acknowledged writes lost after kill -9: {lost[:5]}"
