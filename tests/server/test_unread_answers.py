"""Calls whose clients never read the answer, or never send the request, cannot grow a node
without bound: gRPC holds each answer until its client reads it, and each call under way.
A hunt took a node to 5.6 GB and its leadership with 2,000 unread Gets of 1 MB, and to 1.2 GB
with 100,000 calls whose request never came. Past MAX_UNREAD_ANSWER_BYTES of unread answers
a call is refused (RESOURCE_EXHAUSTED), and at most MAX_CONCURRENT_RPCS calls are under way a
port; once the client is gone, everything is served again."""

from __future__ import annotations

import asyncio

import grpc

import raftfast
from raftfast.kv.fsm import KVStateMachine
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto.etcd import rpc_pb2 as etcd_pb
from raftfast.proto.etcd import rpc_pb2_grpc as etcd_grpc
from raftfast.server import driver, handlers
from raftfast.tools.localcluster import free_ports
from tests.unread_calls import UnreadCalls

RESOURCE_EXHAUSTED = "8"
GET = "/raftfast.v1.KV/Get"


def _node(tmp_path) -> raftfast.Node:
    [port] = free_ports(1)
    return raftfast.Node(
        id="solo", listen=f"127.0.0.1:{port}", data_dir=str(tmp_path / "solo"),
        state_machine=KVStateMachine(), tick_ms=20,
    )  # fmt: skip


async def _answered(raw: UnreadCalls, count: int, seconds: float = 10) -> None:
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while len(raw.status) < count and loop.time() < until:
        await asyncio.to_thread(raw.pump, 0.1)


def test_unread_answers_are_bounded_then_calls_are_refused(tmp_path, monkeypatch):
    limit = 8 << 20
    monkeypatch.setattr(handlers, "MAX_UNREAD_ANSWER_BYTES", limit)
    calls = 40

    async def main() -> None:
        async with _node(tmp_path) as node:
            await node.wait_for_leader()
            address = node.settings.listen
            async with (
                raftfast.Client([address], timeout=30) as client,
                grpc.aio.insecure_channel(address) as channel,
            ):
                etcd = etcd_grpc.KVStub(channel)
                await client.put(b"big", b"x" * (1 << 20))
                await etcd.Put(etcd_pb.PutRequest(key=b"e", value=b"1" * (1 << 20)))
                raw = await asyncio.to_thread(UnreadCalls, int(address.rsplit(":", 1)[1]))
                try:
                    get = pb.GetRequest(key=b"big", read_mode=pb.READ_STALE).SerializeToString()
                    for _ in range(calls):
                        await asyncio.to_thread(raw.open, GET, get)
                        await asyncio.to_thread(raw.pump, 0.05)
                    await _answered(raw, calls - limit // (1 << 20) - 2)
                    refused = [s for s, code in raw.status.items() if code == RESOURCE_EXHAUSTED]
                    # ~8 answers of 1 MB held, the rest refused
                    assert len(refused) >= calls - limit // (1 << 20) - 2, raw.status
                    assert handlers._UnreadAnswers.used <= limit + (2 << 20)
                    # Small answers still go (Status: how an operator sees the node).
                    assert (await client.status())["role"] == "leader"
                    # A write is never refused once done: its big answer (the previous value)
                    # counts past the bound (the review: applied, then told RESOURCE_EXHAUSTED).
                    answer = await etcd.Put(
                        etcd_pb.PutRequest(key=b"e", value=b"2" * (1 << 20), prev_kv=True)
                    )
                    assert answer.prev_kv.value == b"1" * (1 << 20)
                finally:
                    await asyncio.to_thread(raw.close)
                loop = asyncio.get_running_loop()
                until = loop.time() + 10
                while handlers._UnreadAnswers.used and loop.time() < until:
                    await asyncio.sleep(0.05)
                assert handlers._UnreadAnswers.used == 0  # (the client gone: its answers too)
                assert await client.get(b"big") == b"x" * (1 << 20)

    asyncio.run(main())


def test_calls_under_way_are_capped_a_port(tmp_path, monkeypatch):
    cap = 50
    monkeypatch.setattr(driver, "MAX_CONCURRENT_RPCS", cap)

    async def main() -> None:
        async with _node(tmp_path) as node:
            await node.wait_for_leader()
            address = node.settings.listen
            raw = await asyncio.to_thread(UnreadCalls, int(address.rsplit(":", 1)[1]))
            try:
                for _ in range(cap + 20):  # (headers only: the request never comes)
                    await asyncio.to_thread(raw.open, GET, None)
                await _answered(raw, 20)
                assert sorted(raw.status.values()) == [RESOURCE_EXHAUSTED] * 20, raw.status
            finally:
                await asyncio.to_thread(raw.close)
            async with raftfast.Client([address], timeout=30) as client:
                await client.put(b"k", b"v")  # (the client gone, its calls ended)
                assert await client.get(b"k") == b"v"

    asyncio.run(main())
