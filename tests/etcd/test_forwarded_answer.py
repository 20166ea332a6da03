"""A request a follower forwarded, done at the leader, is answered before the client's deadline
even if the follower never catches up to it (a member its peers refused, say: a put done at
the leader was answered "context deadline exceeded", and the client retried it)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from raftfast.etcd.api import EtcdAPI
from raftfast.proto.etcd import rpc_pb2 as pb


class _Transport:
    def __init__(self) -> None:
        self.forwarded: list[str] = []

    async def forward(self, leader: str, method: str, request: bytes, timeout: float):
        self.forwarded.append(method)
        return pb.PutResponse().SerializeToString(), 10**6  # (the leader applied far ahead)


def _follower() -> SimpleNamespace:
    async def leader_soon(_timeout: float) -> str:
        return "n1"

    return SimpleNamespace(
        id="n2",
        settings=SimpleNamespace(
            cluster_id="default",
            max_request_bytes=1 << 20,
            auto_compaction_mode="revision",
            auto_compaction_retention="0",
        ),
        stopping=False,
        is_leader=False,
        raw=SimpleNamespace(leader="n1"),
        leader_soon=leader_soon,
        election_timeout_s=0.5,
        transport=_Transport(),
        applied_index=0,  # (and it never moves)
    )


def test_a_forwarded_write_is_answered_before_the_deadline_though_never_caught_up() -> None:
    async def main() -> None:
        driver = _follower()
        api = EtcdAPI(driver)  # type: ignore[arg-type]
        started = time.monotonic()
        answer = await api.handle("KV/Put", pb.PutRequest(key=b"k", value=b"v"), 5.0)
        took = time.monotonic() - started
        assert answer == pb.PutResponse().SerializeToString()
        # (it waited for the follower to catch up, then answered 0.5 s before the deadline of
        # etcdctl's default 5 s: room for a busy machine)
        assert 4.0 <= took <= 4.95, took
        assert driver.transport.forwarded == ["KV/Put"]

    asyncio.run(asyncio.wait_for(main(), 30))
