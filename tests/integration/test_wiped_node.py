"""A member whose data directory was wiped and that starts again under its old id (a new disk;
systemd restarting it with its first-start flags) must not vote or count towards a commit: it
would have elected a stale node and lost an acknowledged write (a helper's reproducer,
/tmp/hunt_ops/wipe_loss.py). Its peers refuse it (raftfast/server/incarnations.py) until it
is removed and added back."""

from __future__ import annotations

import shutil
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from raftfast.client import SyncClient
from raftfast.tools.localcluster import ProcCluster, wait_for

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest()
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status


def test_a_wiped_member_cannot_vote_until_removed_and_added_back(tmp_path):
    with ProcCluster(tmp_path) as cluster:
        old_leader = cluster.wait_leader()
        stale, wiped = [n for n in cluster.ids if n != old_leader]
        cluster.kill(stale, signal.SIGTERM)  # it will miss the write
        with SyncClient([cluster.addrs[old_leader]], timeout=30) as c:
            c.put("K", "acknowledged")  # (held by the old leader and `wiped` only)
        cluster.kill(old_leader)  # SIGKILL
        cluster.kill(wiped, signal.SIGTERM)
        shutil.rmtree(tmp_path / wiped)
        cluster.start(wiped)  # no node.json: its first-start flags, --id and --peers
        cluster.start(stale, first_time=False)

        # The stale node refuses the wiped one's vote: no leader of the two, whose log lacks K
        wait_for(
            f"{stale} to refuse {wiped}",
            lambda: "speaks from a new data directory" in cluster.logs[stale].read_text(),
            timeout=60,
        )
        assert cluster.leader(among=[stale, wiped]) is None
        cluster.start(old_leader, first_time=False)
        cluster.wait_leader(among=[old_leader, stale])
        with SyncClient([cluster.addrs[old_leader], cluster.addrs[stale]], timeout=30) as c:
            assert c.get("K") == b"acknowledged"
            c.put("after", "1")
            # what its log tells the operator: remove it, add it back, start it with --join
            assert "refuses this node" in cluster.logs[wiped].read_text()
            # ... and what a load balancer hears: not serving, though it knows the leader (it
            # said SERVING with nothing applied, and its etcd requests waited out their deadline)
            leader = cluster.wait_leader(among=[old_leader, stale])
            wait_for(f"{wiped} to know the leader", lambda: cluster.status(wiped).leader == leader)
            wait_for(f"{leader} to serve", lambda: _health(cluster.addrs[leader]) == SERVING)
            assert _health(cluster.addrs[wiped]) == NOT_SERVING
            c.remove_member(wiped)
        cluster.kill(wiped)
        shutil.rmtree(tmp_path / wiped)
        cluster.joins[wiped] = cluster.addrs[stale]
        cluster.start(wiped)  # --join: added back, anew
        cluster.wait_applied(wiped, cluster.status(stale).commit_index, "the new one to catch up")
        with SyncClient([cluster.addrs[wiped]], timeout=30) as c:
            assert c.get("K", read_mode="stale") == b"acknowledged"
            assert c.get("after", read_mode="stale") == b"1"
