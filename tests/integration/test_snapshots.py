"""Snapshots with real processes: compaction, a far-behind follower catching up by
InstallSnapshot, and restarts from a snapshot."""

from __future__ import annotations

import pytest

from raftfast.client import SyncClient
from raftfast.tools.localcluster import ProcCluster, wait_for

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
    cluster.wait_applied(down, target, "the follower to catch up from a snapshot")
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


def test_a_snapshot_whose_install_a_crash_interrupted_is_completed_on_restart(tmp_path):
    """The leader's snapshot file is complete (renamed into the store) but the crash came before
    the WAL's "snapshot installed" record: the old, shorter log must not sit under it."""
    import asyncio

    from raftfast._accel import encode_uniform
    from raftfast.core.membership import Membership
    from raftfast.core.types import HardState
    from raftfast.kv.commands import encode_put
    from raftfast.kv.fsm import KVStateMachine
    from raftfast.server.driver import Driver as Node
    from raftfast.server.settings import NodeSettings
    from raftfast.storage.snapshot import SnapshotStore, pack_state
    from raftfast.storage.wal import WAL
    from raftfast.tools.localcluster import free_ports

    addrs = {f"n{i}": f"127.0.0.1:{p}" for i, p in enumerate(free_ports(3), 1)}
    data_dir = tmp_path / "n2"
    with WAL.open(str(data_dir / "wal")) as wal:  # the old log: entries 1..3 of term 1
        wal.append(HardState(1, "", 3), encode_uniform(1, 1, [b"", b"", b""], 1))
        wal.sync()
    fsm = KVStateMachine()
    fsm.apply(20, encode_put(0, 0, b"from-snapshot", b"yes"))
    SnapshotStore(str(data_dir / "snap")).save(
        20, 2, pack_state(Membership(addrs).encode(), fsm.dump())
    )

    async def main() -> None:
        node = Node(NodeSettings("n2", addrs["n2"], addrs, str(data_dir)))
        await node.start()
        try:
            log = node.raw.raft.log
            assert (log.first_index, log.last_index, log.committed) == (21, 20, 20)
            assert node.fsm.get(b"from-snapshot") == b"yes"
        finally:
            await node.stop()
        with WAL.open(str(data_dir / "wal")) as wal:  # and it is durable
            assert wal.recovered().log.first_index == 21

    asyncio.run(main())
