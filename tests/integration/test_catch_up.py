"""A follower down for 300,000 writes catches up by snapshot (real processes, default
snapshot settings: a snapshot every 100,000 entries, 10,000 kept behind it: the leader
snapshots three times and compacts its log past the follower while it is down). A million
keys and the catch-up time: bench/memory.py (make bench)."""

from __future__ import annotations

import time

from raftfast.client import SyncClient
from raftfast.tools.localcluster import ProcCluster

from .load import write_each

WRITES = 300_000  # (a million took ~50 s of make test; three snapshots show as much)


def test_a_node_down_for_300_000_writes_catches_up_by_snapshot(tmp_path):
    with ProcCluster(tmp_path) as cluster:
        leader = cluster.wait_leader()
        down = next(n for n in cluster.ids if n != leader)
        cluster.kill(down)
        up = [cluster.addrs[n] for n in cluster.ids if n != down]

        started = time.monotonic()
        write_each(up, "k", WRITES)
        print(f"{WRITES} writes with one node down: {time.monotonic() - started:.1f}s")
        leader = cluster.wait_leader(among=[n for n in cluster.ids if n != down])
        status = cluster.status(leader)
        assert status.first_index > 1, "the leader never compacted its log"
        cluster.start(down, first_time=False)
        started = time.monotonic()
        cluster.wait_applied(
            down, status.commit_index, "the node to catch up", timeout=180, every=0.2
        )
        print(f"caught up in {time.monotonic() - started:.1f}s")
        assert "installed a snapshot" in cluster.logs[down].read_text()
        with SyncClient([cluster.addrs[down]], timeout=30) as c:
            for i in (0, 1, WRITES // 2, WRITES - 1):
                assert c.get(f"k{i}", read_mode="stale") == f"{i}".encode()
