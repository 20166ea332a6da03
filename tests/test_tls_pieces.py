"""Under TLS a frame is written as few pieces as it can be (``tcp.tls_pieces``): every piece a
transport is given becomes a TLS record of its own, a call into the ssl module on each end. A
small append was 6 records, a client's frame 2; here over a real TLS connection (uvloop, as the
node runs, and asyncio's own loop) they are one, and what arrives is the same bytes."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator

import pytest
import uvloop

from raftfast.client.session_tcp import TcpSessionCall
from raftfast.core.types import Message, MsgType
from raftfast.proto import raftfast_pb2 as pb
from raftfast.tools.localcluster import free_ports, make_certs
from raftfast.transport import tcp
from raftfast.transport.codec import frame_pieces
from raftfast.transport.tcp import TLS_JOIN_BYTES, tls_pieces
from tests.polling import until

BIG = b"B" * TLS_JOIN_BYTES


@pytest.mark.parametrize(
    "pieces, expected",
    [
        ([], []),
        ([b"a"], [b"a"]),
        ([b"a", b"", b"bc"], [b"abc"]),
        ([b"ab", BIG, b"c", b"d"], [b"ab", BIG, b"cd"]),
        ([BIG, BIG], [BIG, BIG]),
        ([b"x" * (TLS_JOIN_BYTES - 1), b"y"], [b"x" * (TLS_JOIN_BYTES - 1) + b"y"]),
    ],
)
def test_runs_of_small_pieces_are_joined_and_big_ones_kept(pieces, expected):
    assert tls_pieces(pieces) == expected
    assert b"".join(tls_pieces(pieces)) == b"".join(pieces)


class _Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()

    def data_received(self, data: bytes) -> None:
        self.data += data


def _contexts(tmp_path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    make_certs(tmp_path, ["n1"])
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "n1-peer.crt", tmp_path / "n1-peer.key")
    client = ssl.create_default_context(cafile=str(tmp_path / "peer-ca.crt"))
    return server, client


def _count_writes(monkeypatch) -> list[int]:
    """The sizes of the plaintexts handed to the ssl module (each one a TLS record, or more)."""
    sizes: list[int] = []
    write = ssl.SSLObject.write

    def counted(self, data):
        sizes.append(len(data))
        return write(self, data)

    monkeypatch.setattr(ssl.SSLObject, "write", counted)
    return sizes


@contextlib.asynccontextmanager
async def _tls_server(server_ctx: ssl.SSLContext) -> AsyncIterator[tuple[_Sink, int]]:
    """A TLS server on 127.0.0.1 that keeps what it is sent: (its sink, its port)."""
    sink = _Sink()
    port = free_ports(1)[0]
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: sink, "127.0.0.1", port, ssl=server_ctx)
    try:
        yield sink, port
    finally:
        server.close()


LOOPS = pytest.mark.parametrize("run", [uvloop.run, asyncio.run], ids=["uvloop", "asyncio"])


@LOOPS
def test_a_small_append_is_one_record_and_a_big_one_keeps_its_batch_whole(
    tmp_path, monkeypatch, run
):
    server_ctx, client_ctx = _contexts(tmp_path)
    sizes = _count_writes(monkeypatch)

    async def main() -> None:
        async with _tls_server(server_ctx) as (sink, port):
            stream = await tcp.connect("localhost", port, 30, client_ctx)
            small = Message(MsgType.APPEND, "n1", "n2", 3, 10, 3, b"e" * 100, 9, context=1)
            big = Message(MsgType.APPEND, "n1", "n2", 3, 11, 3, b"E" * 200_000, 9, context=2)
            expected = bytearray()
            for m in (small, big):
                pieces = frame_pieces("c1", "n1", [m])
                assert len(pieces) > 2  # (what it was: a record per piece)
                expected += tcp.record(b"".join(pieces))
                sizes.clear()
                assert stream.write(pieces)
                want = len(expected)
                await until("the frame", lambda want=want: len(sink.data) == want)
                if m is small:
                    assert len(sizes) == 1
                else:  # (the head joined; the batch as it was, not copied)
                    assert sizes[1:] == [len(m.entries)] and len(sizes) == 2
            assert bytes(sink.data) == bytes(expected)
            stream.close()

    run(main())


@LOOPS
def test_a_clients_frame_is_one_record(tmp_path, monkeypatch, run):
    server_ctx, client_ctx = _contexts(tmp_path)
    sizes = _count_writes(monkeypatch)

    async def main() -> None:
        async with _tls_server(server_ctx) as (sink, port):
            hello = pb.SessionHello(cluster_id="c1")
            call = TcpSessionCall(
                "localhost", port, hello, lambda f: f.SerializeToString(), 30, client_ctx
            )
            await until("the connection", call.writable_now)
            said = len(tcp.record(hello.SerializeToString()))
            await until("the hello", lambda: len(sink.data) == said)
            frame = pb.SessionFrame(frame_id=1, client_id=7)
            frame.ops.add(kind=1, key=b"k", value=b"v" * 64, sequence=1)
            sizes.clear()
            call.write_now(frame)
            payload = tcp.record(frame.SerializeToString())
            await until("the frame", lambda: len(sink.data) == said + len(payload))
            assert sizes == [len(payload)]
            assert bytes(sink.data).endswith(payload)
            call.cancel()

    run(main())
