"""etcd3aio (PyPI: an asyncio etcd v3 client no one here wrote) against the etcd v3 API of a
real 3-node raftfast cluster.

etcd3aio registers etcd's own etcdserverpb protobuf descriptors, which clash with
raftfast.proto.etcd's in one process (the same symbols in the default descriptor pool), so it
runs in a process of its own: ``clients/etcd3aio_script.py``, one scenario a run, printing what
it saw as JSON; the tests assert on that.

etcd3aio dials every endpoint it is given on one channel with gRPC's round_robin policy (calls
spread over them; see ``test_cluster_and_status``). The tests give it the leader's address
alone, a follower's alone (then everything goes through the follower, which hands the leader's
work to the leader), or all three.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from raftfast.etcd.api import API_VERSION, member_id
from raftfast.tools.localcluster import ProcCluster

SCRIPT = Path(__file__).parent / "clients" / "etcd3aio_script.py"
RUN_TIMEOUT = 180.0  # one scenario (the script has its own deadlines, shorter)
COMPACTED = "etcdserver: mvcc: required revision has been compacted"
FUTURE_REV = "etcdserver: mvcc: required revision is a future revision"
LEASE_NOT_FOUND = "etcdserver: requested lease not found"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with ProcCluster(tmp_path_factory.mktemp("etcd3aio")) as c:
        c.wait_leader()
        yield c


def addresses(cluster: ProcCluster, which: str) -> list[str]:
    """The endpoints to give the client: the leader's, a follower's, or all."""
    leader = cluster.wait_leader()
    if which == "leader":
        return [cluster.addrs[leader]]
    if which == "follower":
        return [cluster.addrs[next(n for n in cluster.ids if n != leader)]]
    return cluster.endpoints


def run(cluster: ProcCluster, scenario: str, which: str, prefix: str) -> tuple[dict, list[str]]:
    """Run ``scenario`` against ``which`` endpoints: (what it printed, the endpoints)."""
    endpoints = addresses(cluster, which)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), scenario, ",".join(endpoints), prefix],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert proc.returncode == 0, f"etcd3aio {scenario} failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), endpoints


def kv(key: str, value: str, create: int, mod: int, version: int, lease: int = 0) -> dict:
    return {
        "key": key,
        "value": value,
        "create": create,
        "mod": mod,
        "version": version,
        "lease": lease,
    }


def rpc_error(code: str, details: str) -> dict:
    return {"code": code, "details": details}


@pytest.mark.parametrize("which", ["leader", "follower", "all"])
def test_put_get_prefix_delete(cluster, which):
    p = f"kv-{which}/"
    out, _ = run(cluster, "kv", which, p)
    r1, r2 = out["revisions"]
    assert r2 == r1 + 1
    assert out["prev_kv"] == kv(p + "a", "1", r1, r1, 1)
    assert out["get"] == [kv(p + "a", "2", r1, r2, 2)]
    assert out["get_old"] == [kv(p + "a", "1", r1, r1, 1)]
    assert [(x["key"], x["value"]) for x in out["prefix"]] == [
        (p + "a", "2"),
        (p + "b", "3"),
        (p + "c", "4"),
    ]
    assert out["prefix_count"] == 3
    assert out["keys_only"] == [[p + "a", ""], [p + "b", ""], [p + "c", ""]]
    assert out["count_only"] == [3, 0]
    assert out["limited"] == [p + "c", p + "b"] and out["limited_more"] is True
    assert out["deleted"] == 1 and out["deleted_prev"] == [kv(p + "a", "2", r1, r2, 2)]
    assert out["after_delete"] == 0
    assert out["deleted_rest"] == 2 and out["left"] == 0


def test_transactions_with_compares(cluster):
    p = "txn/"
    out, _ = run(cluster, "txn", "follower", p)
    first, won = out["first_revision"], out["won_revision"]
    assert out["won"] is True
    assert [(x["key"], x["value"]) for x in out["won_range"]] == [(p + "other", "x")]
    assert out["lost"] is False
    assert out["lost_range"] == [kv(p + "k", "b", first, won, 2)]
    assert out["created"] is True and out["again"] is False
    assert [x["value"] for x in out["again_range"]] == ["1"]  # (the first one's)
    # GREATER, NOT_EQUAL, LESS; a read at a past revision inside the txn sees that revision
    assert out["mixed"] is True
    assert out["mixed_old"] == [kv(p + "k", "a", first, first, 1)]
    assert out["mixed_deleted"] == 1
    assert out["state"] == {p + "k": "b", p + "new": "1"}  # (no failure branch ran a write)


def test_watch_from_a_past_revision_then_live_then_compacted(cluster):
    p = "watch/"
    out, _ = run(cluster, "watch", "follower", p)
    revs, live = out["revisions"], out["live_revisions"]
    assert out["seen_before_live"] == 3  # (the history came before any live write)
    assert out["events"] == [
        ["PUT", p + "0", "v0", revs[0], None],
        ["PUT", p + "1", "v1", revs[1], None],
        ["PUT", p + "2", "v2", revs[2], None],
        ["PUT", p + "3", "v3", live[0], None],
        ["DELETE", p + "0", "", live[1], "v0"],  # (prev_kv asked for)
        ["PUT", p + "end", "e", live[2], None],
    ]
    assert out["compacted_get"] == rpc_error("OUT_OF_RANGE", COMPACTED)
    canceled = out["compacted_watch"]
    assert canceled["canceled"] is True and canceled["compact_revision"] == live[2]
    assert canceled["events"] == 0 and canceled["reason"] in ("", COMPACTED)


def test_leases_keep_alive_expiry_and_revoke(cluster):
    p = "lease/"
    out, _ = run(cluster, "lease", "follower", p)
    lease = out["id"]
    assert out["ttl"] == 3 and out["attached"] == lease
    info = out["ttl_info"]
    assert info["id"] == lease and info["granted"] == 3 and 0 < info["ttl"] <= 3
    assert info["keys"] == [p + "k"]
    assert out["listed"] is True
    # kept alive past its TTL: the key stayed all along
    assert out["present_while_kept"] and set(out["present_while_kept"]) == {1}
    assert out["keeper_alive"] is True
    assert out["renewed"] == [lease, 3]
    # then left alone: expired, its key gone
    assert out["expired_ttl"] == -1
    # revoked: both its keys gone at once; the lease unknown from then on
    assert out["left_after_revoke"] == []
    assert out["put_with_revoked"] == rpc_error("NOT_FOUND", LEASE_NOT_FOUND)
    assert out["revoke_again"] == rpc_error("NOT_FOUND", LEASE_NOT_FOUND)


def test_lock_and_election(cluster):
    out, _ = run(cluster, "lock", "all", "recipes/")
    # the second locker got in only after the first let go
    assert out["lock_timeline"] == ["a+", "a-", "b+", "b-"]
    assert out["lock_keys_left"] == 0
    assert out["election_order"] == ["alpha-", "beta+"]
    assert out["leaders"] == ["alpha", "beta"]
    assert out["election_keys_left"] == 0


@pytest.mark.parametrize("which", ["leader", "follower", "all"])
def test_cluster_and_status(cluster, which):
    out, endpoints = run(cluster, "cluster", which, "unused/")
    members = sorted(out["members"], key=lambda m: m["name"])
    assert [m["name"] for m in members] == ["n1", "n2", "n3"]
    for m in members:
        assert m["ID"] == member_id(m["name"])
        assert m["clientURLs"] == [f"http://{cluster.addrs[m['name']]}"]
        assert m["isLearner"] is False
    ids = {member_id(n) for n in cluster.ids}
    status = out["status"]
    assert status["version"] == API_VERSION
    assert status["leader"] in ids and status["raftTerm"] >= 1 and status["raftIndex"] >= 1
    # who answered: exactly the members given (round robin over all of them when given all)
    by_address = {addr: nid for nid, addr in cluster.addrs.items()}
    assert out["answered_by"] == sorted(member_id(by_address[a]) for a in endpoints)


def test_errors_have_etcds_codes_and_messages(cluster):
    out, _ = run(cluster, "errors", "follower", "errors/")
    assert out["compacted_get"] == rpc_error("OUT_OF_RANGE", COMPACTED)
    assert out["compacted_compact"] == rpc_error("OUT_OF_RANGE", COMPACTED)
    assert out["future_get"] == rpc_error("OUT_OF_RANGE", FUTURE_REV)
    assert out["unknown_lease_put"] == rpc_error("NOT_FOUND", LEASE_NOT_FOUND)
    assert out["unknown_lease_revoke"] == rpc_error("NOT_FOUND", LEASE_NOT_FOUND)
    assert out["unknown_lease_ttl"] == -1
    assert out["value"] == "2"  # (the refused put changed nothing)
