"""Snapshots with real processes: compaction, a far-behind follower catching up by
InstallSnapshot, and restarts from a snapshot."""

from __future__ import annotations

import pytest

from raftfast.client import SyncClient
from raftfast.localcluster import ProcCluster, wait_for

from .load import write_each

SNAPSHOT_FLAGS = ["--snapshot-entries", "2000", "--snapshot-keep", "500"]


@pytest.fixture
def cluster(tmp_path):
    with ProcCluster(tmp_path, extra=SNAPSHOT_FLAGS) as c:
        yield c


def _write(cluster: ProcCluster, prefix: str, count: int) -> None:
    write_each(cluster.endpoints, prefix, count)


def test_far_behind_follower_catches_up_by_snapshot_and_restarts_from_it(cluster):
    leader = cluster.wait_leader()
    down = next(n for n in cluster.ids if n != leader)
    cluster.kill(down)
    _write(cluster, "s", 30_000)  # many snapshots: the entries it misses are compacted away
    target = cluster.status(leader).commit_index
    cluster.start(down, first_time=False)
    wait_for(
        "the follower to catch up from a snapshot",
        lambda: cluster.status(down).applied_index >= target,
        timeout=60,
    )
    log_text = cluster.logs[down].read_text()
    assert "installed a snapshot" in log_text
    with SyncClient([cluster.addrs[down]], timeout=20) as c:
        assert c.get("s0", read_mode="stale") == b"0"
        assert c.get("s29999", read_mode="stale") == b"29999"
    # Every node restarts from its snapshot plus the log after it.
    for nid in cluster.ids:
        cluster.kill(nid)
    for nid in cluster.ids:
        cluster.start(nid, first_time=False)
    cluster.wait_leader()
    with SyncClient(cluster.endpoints, timeout=20) as c:
        for i in range(0, 30_000, 1499):
            assert c.get(f"s{i}") == str(i).encode()


def test_log_stays_bounded_by_snapshots(cluster):
    cluster.wait_leader()
    _write(cluster, "b", 20_000)
    for nid in cluster.ids:
        st = wait_for(
            f"{nid} to snapshot and compact",
            lambda nid=nid: (s := cluster.status(nid)).snapshot_index >= 16_000 and s,
            timeout=30,
        )
        # Snapshots every 2,000 entries, 500 kept behind: the log holds a few thousand at most.
        assert st.last_index - st.first_index < 2_000 + 500 + 5_000, st
