"""The replication stream over plain TCP: the ``Replicate`` stream without gRPC.

A grpc.aio stream message costs ~0.2 ms of CPU at each end and adds ~0.4 ms to a round trip;
on an asyncio protocol the same frame costs tens of microseconds. Raft sends at least two peer
messages per write (the append and its acknowledgement), so this is most of a write's latency.

Wire: the sender writes records ``[u32 big-endian length][pb.Frame]``, exactly the frames the
gRPC ``Replicate`` stream carries, and never reads anything but a refusal. The receiver checks
each frame like the gRPC service does (cluster id, sender, ranges) and delivers it; if it
refuses one it writes a single ``[u32 length][pb.StreamRefusal]`` record, half-closes, and
drops whatever else arrives until the sender hangs up. Answers travel on the receiver's own
stream back, as on gRPC. A node learns where a peer listens with the ``ReplicationEndpoint``
RPC: an offset from the peer's gRPC port (0: the peer only takes the gRPC stream).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import cast

import grpc
from google.protobuf.message import DecodeError

from raftfast.core.types import Message
from raftfast.proto import raftfast_pb2 as pb

log = logging.getLogger("raftfast.transport")

MAX_RECORD_BYTES = 64 * 1024 * 1024  # a peer message, on this stream or the gRPC one
# A peer that stops reading (SIGSTOP, a full disk) must not make us buffer without bound:
# above this, frames for it are dropped, as on an unreachable peer, and Raft resends.
MAX_BUFFERED_BYTES = 32 * 1024 * 1024
_INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


class Refused(Exception):
    """A frame the receiver will not take; ends the stream like a gRPC status would."""

    def __init__(self, code: int, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def record(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


class _Records:
    """Splits a byte stream into length-prefixed records."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        out = []
        start = 0
        while len(buf) - start >= 4:
            size = int.from_bytes(buf[start : start + 4], "big")
            if size > MAX_RECORD_BYTES:
                raise Refused(_INVALID_ARGUMENT, f"record of {size} bytes is too large")
            end = start + 4 + size
            if len(buf) < end:
                break
            out.append(bytes(buf[start + 4 : end]))
            start = end
        if start:
            del buf[:start]
        return out


# A peer machine that vanishes without a reset (power loss, a partition) must not keep our
# stream "connected" for TCP's default ~15 minutes of retransmissions: after this long with data
# unacknowledged, or this long idle and unanswered, the kernel drops the connection, the core
# hears the peer is unreachable, and a fresh stream is dialled. (A peer *process* that hangs
# while its kernel still answers, say under SIGSTOP, is not detected here, unlike with gRPC's
# keepalive pings: frames for it wait in socket buffers, then are dropped above
# MAX_BUFFERED_BYTES. Raft does not need to know: the leader's window for it fills and stops.)
DEAD_PEER_S = 10
_REFUSAL_LINGER_S = 2.0  # a refused sender gets this long to read the refusal and hang up


def _tune(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, DEAD_PEER_S * 1000)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, DEAD_PEER_S // 2)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, DEAD_PEER_S // 2)


class _Inbound(asyncio.Protocol):
    def __init__(self, server: ReplicationServer) -> None:
        self.server = server
        self.records = _Records()
        self.transport: asyncio.Transport | None = None
        self.refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        _tune(transport)
        self.server.connections.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self.refused:
            return  # after a refusal: read and dropped, so that closing sends no reset
        try:
            for payload in self.records.feed(data):
                try:
                    f = pb.Frame.FromString(payload)
                except DecodeError as exc:
                    raise Refused(_INVALID_ARGUMENT, f"undecodable frame: {exc}") from None
                self.server.deliver(self.server.check(f))
        except Refused as exc:
            log.debug("refused a replication stream: %s", exc.details)
            self.refused = True
            transport.write(
                record(pb.StreamRefusal(code=exc.code, details=exc.details).SerializeToString())
            )
            # Half-close and keep reading: closing with unread data would send a reset, which
            # can overtake the refusal. The sender hangs up once it has read it.
            transport.write_eof()
            asyncio.get_running_loop().call_later(_REFUSAL_LINGER_S, transport.abort)

    def eof_received(self) -> bool:
        return False  # the sender hung up: close our side too


class ReplicationServer:
    """Inbound replication streams. ``check(frame)`` returns the frame's messages or raises
    ``Refused``; ``deliver(messages)`` steps the core."""

    def __init__(
        self,
        check: Callable[[pb.Frame], list[Message]],
        deliver: Callable[[list[Message]], None],
    ) -> None:
        self.check = check
        self.deliver = deliver
        self.connections: set[asyncio.Transport] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int = 0) -> int:
        """Listen on ``host:port`` (0: any free port); returns the port."""
        loop = asyncio.get_running_loop()
        for _attempt in range(10):
            server = await loop.create_server(lambda: _Inbound(self), host, port)
            ports = {sock.getsockname()[1] for sock in server.sockets}
            if len(ports) == 1:
                self._server = server
                return ports.pop()
            # A name with several addresses ("localhost": ::1 and 127.0.0.1) got a different
            # free port on each; peers must find the stream on one port, whatever they dial.
            first = server.sockets[0].getsockname()[1]
            server.close()
            await server.wait_closed()
            try:
                server = await loop.create_server(lambda: _Inbound(self), host, first)
            except OSError:
                continue  # taken on the other address meanwhile: try another port
            self._server = server
            return server.sockets[0].getsockname()[1]
        raise OSError(f"no free port on every address of {host!r}")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for transport in list(self.connections):
            transport.abort()
        if self._server is not None:
            await self._server.wait_closed()


class OutboundStream(asyncio.Protocol):
    """Our end of a stream to one peer: ``write`` frames; ``closed`` resolves when it ends,
    with ``refusal`` set if the peer refused us."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.refusal: pb.StreamRefusal | None = None
        self._records = _Records()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        _tune(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            payloads = self._records.feed(data)
            if not payloads:
                return  # the rest of the refusal is on its way
            self.refusal = pb.StreamRefusal.FromString(payloads[0])
        except (Refused, DecodeError):
            pass  # not a refusal we can read: just a broken stream
        self.close()

    def write(self, frame: bytes) -> bool:
        """Send one serialized ``pb.Frame``; False if it was dropped (closed or backed up)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        if transport.get_write_buffer_size() > MAX_BUFFERED_BYTES:
            return False
        transport.write(record(frame))
        return True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(host: str, port: int, timeout: float) -> OutboundStream:
    loop = asyncio.get_running_loop()
    _transport, stream = await asyncio.wait_for(
        loop.create_connection(OutboundStream, host, port), timeout
    )
    return stream
