"""A grpc.aio server that speaks raftfast's KV protocol and does nothing: every put succeeds at
once, every get finds nothing. ``raftfast bench --noop`` measures it with the very same client
and load as a real cluster, so "cluster rate / no-op rate" tells how much of gRPC's own
per-message rate the replication leaves (the throughput targets are stated that way). It serves
the Session stream over TCP too, as a node does (raftfast/server/session_stream.py), so that
our client's ceiling is measured on the transport it uses against a cluster.

    python -m raftfast.tools.noop_server --listen 127.0.0.1:7999
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from types import SimpleNamespace

import grpc

from raftfast.address import split_address
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto import raftfast_pb2_grpc as pb_grpc
from raftfast.server.handlers import GenericOnly
from raftfast.server.session_stream import SessionServer
from raftfast.server.settings import MAX_REQUEST_BYTES
from raftfast.transport.grpc import CHANNEL_OPTIONS

_OK = pb.OpResult(ok=True)


class NoopSessions:
    """What ``SessionServer`` needs of the KV service: every frame answered at once."""

    node = SimpleNamespace(settings=SimpleNamespace(max_request_bytes=MAX_REQUEST_BYTES))

    async def Session(self, frames, context):  # noqa: N802
        async for _size, frame in frames:
            yield pb.SessionResult(frame_id=frame.frame_id, results=[_OK] * len(frame.ops))


class NoopKV(pb_grpc.KVServicer):
    session_port = 0

    async def Put(self, request, context):  # noqa: N802 - gRPC naming
        return pb.PutResponse()

    async def Get(self, request, context):  # noqa: N802
        return pb.GetResponse(found=False)

    async def Session(self, request_iterator, context):  # noqa: N802
        async for frame in request_iterator:
            yield pb.SessionResult(frame_id=frame.frame_id, results=[_OK] * len(frame.ops))

    async def Status(self, request, context):  # noqa: N802
        return pb.StatusResponse(
            id="noop", role="leader", leader="noop", session_port=self.session_port
        )


async def serve(listen: str) -> None:
    server = grpc.aio.server(options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)])
    kv = NoopKV()
    pb_grpc.add_KVServicer_to_server(kv, GenericOnly(server))  # (as the nodes do)
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen}")
    sessions = SessionServer(NoopSessions())  # type: ignore[arg-type]
    kv.session_port = await sessions.start(split_address(listen)[0])
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=0.2)
    await sessions.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raftfast.tools.noop_server")
    p.add_argument("--listen", required=True, metavar="HOST:PORT")
    args = p.parse_args(argv)
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(serve(args.listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
