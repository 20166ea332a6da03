"""gRPC health checking and reflection on the client port of real nodes."""

from __future__ import annotations

import signal
import socket

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from raftfast.client import SyncClient
from raftfast.server import health
from raftfast.tools.localcluster import ProcCluster, wait_for
from tests.unread_calls import UnreadCalls

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ("", "raftfast.v1.KV", "raftfast.v1.Admin")


def check(cluster: ProcCluster, nid: str, service: str = "") -> int:
    with cluster.channel(nid) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_serving_on_a_healthy_cluster_not_serving_when_cut_off_and_reflection(tmp_path):
    with ProcCluster(tmp_path) as cluster:
        leader = cluster.wait_leader()
        with SyncClient(cluster.endpoints, timeout=30) as c:
            c.put("a", "1")
        for nid in cluster.ids:
            for service in SERVICES:
                wait_for(
                    f"{nid} to serve {service or 'the server'}",
                    lambda nid=nid, service=service: check(cluster, nid, service) == SERVING,
                )
        with cluster.channel(leader) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for name in ("nope", "x" * 1_000_000):  # (the answer names it, shortened)
                with pytest.raises(grpc.RpcError) as info:
                    stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert info.value.code() == grpc.StatusCode.NOT_FOUND
                assert len(info.value.details()) < 200

        # Reflection lists the services and describes them.
        with cluster.channel(leader) as ch:
            db = ProtoReflectionDescriptorDatabase(ch)
            services = set(db.get_services())
            assert {"raftfast.v1.KV", "raftfast.v1.Admin", "grpc.health.v1.Health"} <= services
            assert "raftfast.v1.Peer" not in services  # (for nodes, not clients)
            kv = DescriptorPool(db).FindServiceByName("raftfast.v1.KV")
            assert {"Put", "Get", "Session", "Status"} <= {m.name for m in kv.methods}

        # The leader, cut off from the others, steps down (check-quorum): NOT_SERVING.
        for nid in cluster.ids:
            if nid != leader:
                cluster.kill(nid)
        wait_for(
            "the cut-off node to stop serving",
            lambda: all(check(cluster, leader, s) == NOT_SERVING for s in SERVICES),
            timeout=30,
        )
        assert cluster.status(leader).role != "leader"


def test_serving_needs_a_leader_and_the_start_s_commit_index_applied_and_not_stopping():
    """... and a leader that does not refuse this node."""
    import asyncio
    from types import SimpleNamespace

    from raftfast.server.health import Health

    async def run() -> None:
        refusing: set[str] = set()  # (peers that refuse this node's streams)
        transport = SimpleNamespace(refused_by=refusing.__contains__)
        driver = SimpleNamespace(
            raw=SimpleNamespace(leader=""), applied_index=0, stopping=False, transport=transport
        )
        health = Health(driver, ("raftfast.v1.KV",))
        health.ready_from = 10  # (committed when it started: applied before it serves)

        async def status(service: str = "") -> int:
            ctx = SimpleNamespace()
            answer = await health.servicer.Check(
                health_pb2.HealthCheckRequest(service=service), ctx
            )
            return answer.status

        health.update()
        assert await status() == NOT_SERVING and await status("raftfast.v1.KV") == NOT_SERVING
        driver.raw.leader = "n2"
        health.update()
        assert await status() == NOT_SERVING  # (still replaying)
        driver.applied_index = 10
        health.update()
        assert await status() == SERVING and await status("raftfast.v1.KV") == SERVING
        driver.raw.leader = ""  # (an election, or cut off)
        health.update()
        assert await status() == NOT_SERVING
        driver.raw.leader = "n3"
        health.update()
        assert await status() == SERVING
        refusing.add("n3")  # (the leader refuses us: a wiped member, say)
        health.update()
        assert await status() == NOT_SERVING
        refusing.clear()
        health.update()
        assert await status() == SERVING
        health.shutdown()
        health.update()
        assert await status() == NOT_SERVING and await status("raftfast.v1.KV") == NOT_SERVING

    asyncio.run(run())


def _unread_watch(port: int) -> socket.socket:
    """A Health/Watch stream from a raw HTTP/2 client that gives the server no flow-control
    window and reads nothing: the server's first write of a status never completes."""
    calls = UnreadCalls(port)
    calls.open("/grpc.health.v1.Health/Watch")  # (an empty request)
    return calls.sock


def test_watch_streams_their_clients_do_not_read_hold_up_nothing_else(tmp_path):
    """Unread Watch streams on every node: the nodes still elect, change their health for
    the clients that do read, and stop when told (the library's servicer held a lock while it
    wrote: the ticker, so elections, and the shutdown waited for such a client forever)."""
    with ProcCluster(tmp_path) as cluster:
        first = cluster.wait_leader()
        ports = {nid: int(addr.rsplit(":", 1)[1]) for nid, addr in cluster.addrs.items()}
        unread = [_unread_watch(port) for port in ports.values()]
        try:
            cluster.kill(first)
            second = cluster.wait_leader(among=[n for n in cluster.ids if n != first])
            cluster.kill(second)
            cluster.start(first, first_time=False)
            third = cluster.wait_leader(among=[n for n in cluster.ids if n != second])
            assert third != second
            for nid in (first, third):
                wait_for(f"{nid} to serve", lambda nid=nid: check(cluster, nid) == SERVING)
            for nid in (first, third):
                cluster.procs[nid].send_signal(signal.SIGTERM)
            for nid in (first, third):  # (else stop_all kills them after its own wait)
                wait_for(f"{nid} to stop", lambda nid=nid: cluster.exited(nid) is not None)
        finally:
            for sock in unread:
                sock.close()


@pytest.mark.parametrize(
    ("path", "most"),
    [
        ("/grpc.health.v1.Health/Watch", health.MAX_WATCHES),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", (
            health.MAX_REFLECTION_STREAMS
        )),
    ],
)  # fmt: skip
def test_streams_anyone_may_hold_open_are_bounded_and_checks_still_answer(tmp_path, path, most):
    """8,192 unread health Watch streams (a certificate without a role may open them) took
    every call the client port serves: no client got in. Past the bound, refused."""
    extra = 10
    with ProcCluster(tmp_path, 1) as cluster:
        nid = cluster.wait_leader()
        calls = UnreadCalls(int(cluster.addrs[nid].rsplit(":", 1)[1]))
        try:
            for _ in range(most + extra):
                calls.open(path, None if "Reflection" in path else b"")  # (held open)

            def refused() -> list[int] | None:
                calls.pump(0.2)
                got = [stream for stream, code in calls.status.items() if code == "8"]
                return got if len(got) >= extra else None

            assert len(wait_for(f"{extra} of the streams refused", refused)) == extra
            # (only those: a refused stream whose request is still open is reset after it)
            assert len(calls.status) == extra and calls.reset <= set(calls.status), calls.status
            assert check(cluster, nid) == SERVING  # (and a client gets in)
            with SyncClient([cluster.addrs[nid]], timeout=30) as c:
                c.put("a", "1")
        finally:
            calls.close()
        # The streams gone, their places are free again.
        wait_for("a Watch to be served again", lambda: _watch_answers(cluster, nid))


def _watch_answers(cluster: ProcCluster, nid: str) -> bool:
    with cluster.channel(nid) as ch:
        stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=5)
        return next(stream).status == SERVING
