"""--quota-backend-bytes on a real cluster: past it writes stop with NOSPACE (an alarm every
node and every later leader knows, shown by `raftfast status`), reads and deletes go on, and
`raftfast alarm disarm` clears it once space is freed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from raftfast.client import SyncClient
from raftfast.errors import NoSpaceError, RequestFailedError
from raftfast.kv.fsm import KEY_OVERHEAD
from raftfast.tools.localcluster import ProcCluster, wait_for

ROOT = Path(__file__).resolve().parents[2]
QUOTA = 256 * 1024


@pytest.fixture
def cluster(tmp_path):
    with ProcCluster(tmp_path, 3, extra=["--quota-backend-bytes", str(QUOTA)]) as c:
        yield c


def cli(cluster: ProcCluster, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "raftfast.client.cli", "--endpoints", ",".join(cluster.endpoints)]
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(ROOT)}
    )


def test_writes_stop_at_the_quota_and_go_on_once_space_is_freed(cluster):
    cluster.wait_leader()
    value = b"v" * 1000
    written = []
    with SyncClient(cluster.endpoints, timeout=30) as c:
        with pytest.raises(NoSpaceError, match="quota-backend-bytes"):
            for i in range(QUOTA // 1000 + 10):
                c.put(b"k%04d" % i, value)
                written.append(b"k%04d" % i)
        assert len(written) >= QUOTA // (1000 + 5 + KEY_OVERHEAD) - 10  # (each key counts)
        assert len(written) <= QUOTA // (1000 + 5 + KEY_OVERHEAD) + 1
        wait_for(
            "every node to know the alarm",
            lambda: all(cluster.status(n).alarms == ["NOSPACE"] for n in cluster.ids),
        )
        with pytest.raises(NoSpaceError):
            c.put("small", "1")  # the alarm refuses even what would fit
        assert c.get(written[0]) == value  # reads go on
        status = cli(cluster, "status")
        assert status.returncode == 0 and "ALARM NOSPACE" in status.stdout
        put = cli(cluster, "put", "more", "1")
        assert put.returncode == 5 and put.stderr.count("\n") == 1 and "NOSPACE" in put.stderr
        # Still full: the alarm stays. A new leader keeps it too.
        with pytest.raises(RequestFailedError, match="no room yet"):
            c.disarm_alarms()
        leader = cluster.leader()
        c.transfer_leader(next(n for n in cluster.ids if n != leader))
        with pytest.raises(NoSpaceError):
            c.put("small", "1")
        for key in written[: len(written) // 2]:
            assert c.delete(key)  # deletes go on
        disarm = cli(cluster, "alarm", "disarm")
        assert disarm.returncode == 0 and "no alarm" in disarm.stdout, disarm.stderr
        c.put("after", "1")
        assert c.get("after") == b"1" and c.alarms()["alarms"] == []


def test_a_follower_with_a_nearly_full_disk_raises_the_alarm(cluster):
    leader = cluster.wait_leader()
    follower = next(n for n in cluster.ids if n != leader)
    with SyncClient(cluster.endpoints, timeout=30) as c:
        c.put("before", "1")
        cluster.kill(follower)
        env, cluster.env = cluster.env, {**os.environ, "RAFTFAST_FAULT_DISK_FREE_BYTES": "1000"}
        try:
            cluster.start(follower, first_time=False)
        finally:
            cluster.env = env
        wait_for(
            "the leader to raise NOSPACE for its follower",
            lambda: all(cluster.status(n).alarms == ["NOSPACE"] for n in cluster.ids),
        )
        with pytest.raises(NoSpaceError):
            c.put("after", "1")
        assert c.get("before") == b"1"
        cluster.kill(follower)
        cluster.start(follower, first_time=False)  # room again
        c.disarm_alarms()
        c.put("after", "1")
        assert c.get("after") == b"1"
