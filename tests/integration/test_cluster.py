"""Real 3-node clusters of `raftfast-node` processes on 127.0.0.1 (ephemeral ports).

Deadlines are generous (CI is a loaded 2-core machine); nothing sleeps to "settle": every wait
polls a condition. Each test stops every process it started, by PID, in a finally block.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time

import grpc
import pytest

from raftfast.client import Client, SyncClient
from raftfast.errors import RequestFailedError
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto import raftfast_pb2_grpc as pb_grpc
from raftfast.tools.localcluster import ProcCluster
from tests.gates import limit


@pytest.fixture
def cluster(tmp_path):
    with ProcCluster(tmp_path) as c:
        yield c


def test_leader_elected_and_reads_through_any_node(cluster):
    leader = cluster.wait_leader()
    follower = next(n for n in cluster.ids if n != leader)
    with SyncClient([cluster.addrs[follower]], timeout=20) as c:
        c.put("a", "1")
        assert c.get("a") == b"1"
        assert c.cas("a", "1", "2") is True
        assert c.cas("a", "1", "3") is False
        assert c.get("a") == b"2"
        assert c.delete("a") is True
        assert c.get("a") is None
    st = cluster.status(leader)
    assert st.role == "leader" and {m.id for m in st.members} == set(cluster.ids)


def test_kill9_leader_new_leader_fast_and_no_acknowledged_write_lost(cluster):
    old = cluster.wait_leader()
    acked: dict[str, str] = {}
    with SyncClient(cluster.endpoints, timeout=20) as c:
        for i in range(200):
            c.put(f"k{i}", f"v{i}")
            acked[f"k{i}"] = f"v{i}"
        cluster.kill(old)
        killed_at = time.monotonic()
        others = [n for n in cluster.ids if n != old]
        new = cluster.wait_leader(timeout=30, among=others)
        elapsed = time.monotonic() - killed_at
        assert new != old
        print(f"\nnew leader {elapsed:.2f}s after kill -9 of the old one")
        # (target 3 s; a loaded machine can delay an election by seconds: make bench holds 3)
        assert elapsed < limit(test=15.0, bench=3.0), f"new leader only after {elapsed:.2f}s"
        for k, v in acked.items():
            assert c.get(k) == v.encode()
        c.put("after", "x")
        # The old leader restarts from its data directory and catches up.
        cluster.start(old, first_time=False)
        target = cluster.status(new).commit_index
        cluster.wait_applied(old, target, "the old leader to catch up", timeout=30)
        with SyncClient([cluster.addrs[old]], timeout=20) as c2:
            assert c2.get("after", read_mode="stale") == b"x"


def test_follower_down_during_10000_writes_catches_up(cluster):
    leader = cluster.wait_leader()
    down = next(n for n in cluster.ids if n != leader)
    cluster.kill(down)

    async def write_many() -> None:
        async with Client(cluster.endpoints, timeout=30) as c:
            await c.put_many([(f"w{i}", f"{i}") for i in range(10_000)])

    asyncio.run(write_many())
    target = cluster.status(leader).commit_index
    cluster.start(down, first_time=False)
    cluster.wait_applied(down, target, "the follower to catch up")
    with SyncClient([cluster.addrs[down]], timeout=20) as c:
        assert c.get("w9999", read_mode="stale") == b"9999"
        assert c.get("w0", read_mode="stale") == b"0"


def test_full_cluster_restart_keeps_every_acknowledged_write(cluster):
    cluster.wait_leader()
    with SyncClient(cluster.endpoints, timeout=20) as c:
        for i in range(100):
            c.put(f"r{i}", f"{i}")
    for nid in cluster.ids:
        cluster.kill(nid)
    for nid in cluster.ids:
        cluster.start(nid, first_time=False)
    cluster.wait_leader()
    with SyncClient(cluster.endpoints, timeout=20) as c:
        for i in range(100):
            assert c.get(f"r{i}") == f"{i}".encode()


def test_graceful_sigterm_stops_a_node(cluster):
    """SIGTERM on a leader hands leadership to a caught-up voter first (the log says so, and
    the next term is the hand-over's: one term later, not an election after a timeout)."""
    leader = cluster.wait_leader()
    term = cluster.status(leader).term
    with SyncClient(cluster.endpoints, timeout=20) as c:
        for i in range(20):
            c.put(f"t{i}", "x")
    proc = cluster.procs[leader]
    cluster.kill(leader, signal.SIGTERM)
    assert proc.returncode == 0
    log = cluster.logs[leader].read_text()
    handed = re.search(r"handed leadership to (\S+) before stopping", log)
    assert handed, log[-2000:]
    new = cluster.wait_leader(among=[n for n in cluster.ids if n != leader])
    assert new == handed.group(1)
    assert cluster.status(new).term == term + 1
    with SyncClient([cluster.addrs[new]], timeout=20) as c:
        assert c.get("t19") == b"x"


def _leader_stub(cluster):
    leader = cluster.wait_leader()
    channel = grpc.insecure_channel(cluster.addrs[leader])
    return channel, pb_grpc.KVStub(channel)


def test_retried_write_with_same_client_and_sequence_applies_once(cluster):
    channel, stub = _leader_stub(cluster)
    with channel:
        req = pb.CasRequest(key=b"once", expect_absent=True, value=b"1", client_id=77, sequence=1)
        assert stub.CompareAndSwap(req, timeout=20).swapped is True
        # The retry must return the first result, not be applied again (which would fail).
        assert stub.CompareAndSwap(req, timeout=20).swapped is True
        put = pb.PutRequest(key=b"once", value=b"2", client_id=77, sequence=2)
        stub.Put(put, timeout=20)
        again = pb.CasRequest(key=b"once", expect_absent=True, value=b"X", client_id=77, sequence=1)
        assert stub.CompareAndSwap(again, timeout=20).swapped is True  # cached, not re-run
        assert stub.Get(pb.GetRequest(key=b"once"), timeout=20).value == b"2"


def test_oversized_and_malformed_requests_are_rejected_and_node_keeps_serving(cluster):
    channel, stub = _leader_stub(cluster)
    with channel:
        bad = [
            lambda: stub.Put(pb.PutRequest(key=b"k" * 5000, value=b"v"), timeout=20),
            lambda: stub.Put(pb.PutRequest(key=b"k", value=b"v" * (1024 * 1024 + 1)), timeout=20),
            lambda: stub.Put(pb.PutRequest(key=b"", value=b"v"), timeout=20),
            lambda: stub.Get(pb.GetRequest(key=b""), timeout=20),
        ]
        for call in bad:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details()
        # Garbage bytes on the wire: the server must answer, not crash.
        raw = channel.unary_unary(
            "/raftfast.v1.KV/Put",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError):
            raw(b"\xff\xff\xff\xff\x0f", timeout=20)
        stub.Put(pb.PutRequest(key=b"still", value=b"ok"), timeout=20)
        assert stub.Get(pb.GetRequest(key=b"still"), timeout=20).value == b"ok"


def test_transfer_leadership_under_load(cluster):
    old = cluster.wait_leader()
    target = next(n for n in cluster.ids if n != old)

    async def run() -> tuple[str, int]:
        async with Client(cluster.endpoints, timeout=20) as c:
            load = asyncio.create_task(c.put_many([(f"t{i}", "v") for i in range(20_000)]))
            await asyncio.sleep(0.2)  # the load is in flight
            for attempt in range(5):
                try:
                    leader = await c.transfer_leader(target)
                    break
                except RequestFailedError as exc:
                    # (a hand-over given up for time: the target had not caught up within two
                    # election timeouts, on a loaded machine; the old leader leads on, and an
                    # operator asks again)
                    if "did not take over" not in str(exc) or attempt == 4:
                        raise
            await load  # every write of the load is acknowledged despite the change
            values = await asyncio.gather(*(c.get(f"t{i}") for i in range(0, 20_000, 997)))
            return leader, sum(v == b"v" for v in values)

    leader, found = asyncio.run(run())
    assert leader == target
    assert cluster.wait_leader() == target
    assert found == len(range(0, 20_000, 997))


def test_cli_transfer_leader(cluster):
    import subprocess
    import sys

    old = cluster.wait_leader()
    target = next(n for n in cluster.ids if n != old)
    cmd = [sys.executable, "-m", "raftfast.client.cli", "--endpoints", ",".join(cluster.endpoints)]
    out = subprocess.run([*cmd, "transfer-leader", target], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert target in out.stdout
    bad = subprocess.run([*cmd, "transfer-leader", "nobody"], capture_output=True, text=True)
    assert bad.returncode == 5 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1

    # A voter that is down cannot take over: the node says so (exit 5), and the command does
    # not retry the hand-over (proposals waiting each time) until its deadline (it ended
    # with exit 3 and gRPC's bare "Deadline Exceeded" after the whole --timeout).
    down = next(n for n in cluster.ids if n != target)
    cluster.kill(down)
    cmd = [*cmd[:-1], cluster.addrs[target], "--timeout", "60"]
    refused = subprocess.run([*cmd, "transfer-leader", down], capture_output=True, text=True)
    assert refused.returncode == 5, refused.stderr
    [line] = refused.stderr.strip().splitlines()
    assert "no hand-over" in line and down in line, line
