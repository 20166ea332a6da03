"""Session streams that say nothing must not lock clients out: a full node ends the stream
idle longest to let a new one in (its client reconnects when it has work), over TCP and
gRPC; it refuses only when every stream is busy."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from raftfast.client import Client
from raftfast.proto import raftfast_pb2 as pb
from raftfast.server import kv_service
from raftfast.transport.tcp import record
from tests.hostile.test_session_frames import one_node

FULL = 8  # (the node's MAX_SESSIONS, made small)


@pytest.mark.parametrize("way", ["tcp", "grpc"])
def test_silent_sessions_make_way_for_a_client(tmp_path, monkeypatch, way):
    monkeypatch.setattr(kv_service, "MAX_SESSIONS", FULL)
    monkeypatch.setattr(kv_service, "IDLE_SESSION_S", 0.5, raising=False)

    async def main() -> None:
        async with one_node(tmp_path) as node:
            service = node._driver.app.kv_service
            hello = record(pb.SessionHello().SerializeToString())
            silent: list = []
            channel = grpc.aio.insecure_channel(node.settings.listen)
            try:
                for _ in range(FULL):
                    if way == "tcp":
                        _, writer = await asyncio.open_connection(
                            "127.0.0.1", node._driver.session_port
                        )
                        writer.write(hello)
                        silent.append(writer)
                    else:
                        silent.append(channel.stream_stream("/raftfast.v1.KV/Session")())
                deadline = time.monotonic() + 10
                while service.sessions_open < FULL:
                    assert time.monotonic() < deadline, service.sessions_open
                    await asyncio.sleep(0.01)
                started = time.monotonic()
                async with Client(node.settings.listen, timeout=10) as c:
                    await c.put(b"k", b"v")
                    assert await c.get(b"k") == b"v"
                assert time.monotonic() - started < 10
                assert service.sessions_open <= FULL
            finally:
                for s in silent:
                    if way == "tcp":
                        s.transport.abort()
                    else:
                        s.cancel()
                await channel.close()

    asyncio.run(asyncio.wait_for(main(), 60))
