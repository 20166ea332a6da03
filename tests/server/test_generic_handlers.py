"""A node serves every method of its client port through generic handlers, none as a
registered method: grpc.aio's server waits on one pending request per registered method for
every call it accepts (raftfast.server.handlers.GenericOnly), so each one made every call
dearer. Every service still answers, reflection with its asyncio servicer (the sync one holds
a thread of the loop's default pool for each open stream)."""

from __future__ import annotations

import asyncio
import os
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from raftfast.core.types import Role
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto import raftfast_pb2_grpc as pb_grpc
from raftfast.proto.etcd import rpc_pb2 as etcd_pb
from raftfast.proto.etcd import rpc_pb2_grpc as etcd_grpc
from raftfast.server import driver as driver_module
from raftfast.server.driver import Driver
from raftfast.server.settings import NodeSettings
from raftfast.tools.localcluster import free_ports

SERVING = health_pb2.HealthCheckResponse.SERVING
POOL_THREADS = min(32, (os.cpu_count() or 1) + 4)  # (ThreadPoolExecutor's default)


def test_no_registered_methods_and_every_kind_of_service_answers(tmp_path, monkeypatch):
    registered: list[str] = []
    make_server = driver_module._server

    def spied(*args, **kwargs):
        server = make_server(*args, **kwargs)
        real = server.add_registered_method_handlers

        def spy(service_name, method_handlers):
            registered.append(service_name)
            return real(service_name, method_handlers)

        server.add_registered_method_handlers = spy
        return server

    monkeypatch.setattr(driver_module, "_server", spied)

    async def run() -> None:
        addr = f"127.0.0.1:{free_ports(1)[0]}"
        settings = NodeSettings(
            id="n1", listen=addr, peers={"n1": addr}, data_dir=str(tmp_path), tick_ms=10
        )
        node = Driver(settings)
        await node.start()
        try:
            deadline = time.monotonic() + 30
            while node.raw.raft.role != Role.LEADER:
                assert time.monotonic() < deadline, "n1 did not lead"
                await asyncio.sleep(0.01)
            assert registered == []
            async with grpc.aio.insecure_channel(addr) as ch:
                etcd_kv, kv = etcd_grpc.KVStub(ch), pb_grpc.KVStub(ch)
                await etcd_kv.Put(etcd_pb.PutRequest(key=b"k", value=b"etcd"), timeout=10)
                ranged = await etcd_kv.Range(etcd_pb.RangeRequest(key=b"k"), timeout=10)
                assert [item.value for item in ranged.kvs] == [b"etcd"]
                await kv.Put(pb.PutRequest(key=b"k", value=b"ours"), timeout=10)
                assert (await kv.Get(pb.GetRequest(key=b"k"), timeout=10)).value == b"ours"
                health = health_pb2_grpc.HealthStub(ch)
                request = health_pb2.HealthCheckRequest(service="")
                while (await health.Check(request, timeout=10)).status != SERVING:
                    assert time.monotonic() < deadline, "not SERVING"
                    await asyncio.sleep(0.01)
                members = await pb_grpc.AdminStub(ch).MemberList(pb.MemberListRequest(), timeout=10)
                assert [m.id for m in members.members] == ["n1"]
                with grpc.insecure_channel(addr) as sync_ch:
                    services = await asyncio.to_thread(
                        lambda: set(ProtoReflectionDescriptorDatabase(sync_ch).get_services())
                    )
                assert {"etcdserverpb.KV", "raftfast.v1.KV", "grpc.health.v1.Health"} <= services
                # More open reflection streams than the loop's default pool has threads: the
                # pool still runs work, and each stream still answers.
                stub = reflection_pb2_grpc.ServerReflectionStub(ch)
                ask = reflection_pb2.ServerReflectionRequest(list_services="")
                streams = [stub.ServerReflectionInfo() for _ in range(POOL_THREADS + 4)]
                loop = asyncio.get_running_loop()
                async with asyncio.timeout(30):  # (the sync servicer: the 7th never answers)
                    for call in streams:
                        await call.write(ask)
                        assert (await call.read()).list_services_response.service
                    assert await loop.run_in_executor(None, sum, (1, 2)) == 3
                for call in streams:
                    call.cancel()
                try:
                    missing = await ch.unary_unary("/raftfast.v1.KV/Nope")(b"", timeout=10)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNIMPLEMENTED, exc
                else:
                    raise AssertionError(f"an unknown method answered {missing!r}")
        finally:
            await node.stop()

    asyncio.run(run())
