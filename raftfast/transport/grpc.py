"""Peer transport over grpc.aio.

Outbound: one long-lived ``Replicate`` stream per peer. Everything the core has for that peer
(AppendEntries frames, acks, heartbeats) is coalesced into one ``Frame`` per write, so the
per-message gRPC cost (~0.5 ms of CPU) is paid once per batch, not once per Raft message.
Pipelining comes from the core's in-flight window; gRPC's HTTP/2 flow control bounds the rest.
Vote requests use the unary ``RequestVote`` RPC so an election never waits behind a stream.

Inbound: ``PeerService`` checks the cluster id and the sender, decodes, and steps the core.
Messages are never queued while a peer is unreachable: Raft retransmits, and a stale backlog
would only delay the fresh state.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator

import grpc

from raftfast.core.types import Message, MsgType
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto import raftfast_pb2_grpc as pb_grpc
from raftfast.transport.codec import CodecError, frame, message_from_pb, message_to_pb

log = logging.getLogger("raftfast.transport")

_VOTES = (MsgType.VOTE, MsgType.PRE_VOTE)
_MAX_FRAME_MESSAGES = 1024
_CLOSE_GRACE_S = 1.0  # a peer that left keeps its stream this long
# No real term or index comes near this. A forged term close to 2**64 would be adopted and made
# durable, and then no election could ever bump it again: the cluster would be dead for good.
_MAX_TERM_OR_INDEX = 1 << 62
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
]


class _Peer:
    def __init__(self, peer_id: str, address: str) -> None:
        self.id = peer_id
        self.address = address
        self.queue: list[Message] = []
        self.wake = asyncio.Event()
        self.connected = False
        self.channel: grpc.aio.Channel | None = None


NOT_A_MEMBER = "is not (or no longer) a member of this cluster"
_REMOVED_AT = re.compile(r"removed at index (\d+)")


class PeerTransport:
    """Sends core messages to peers; ``on_unreachable(peer)`` is called when a stream breaks,
    ``on_refused(peer)`` when a peer refuses us because we are not a member (any more)."""

    def __init__(
        self,
        node_id: str,
        cluster_id: str,
        peers: dict[str, str],
        on_unreachable: Callable[[str], None],
        on_refused: Callable[[str, int], None] | None = None,
    ) -> None:
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.on_unreachable = on_unreachable
        self.on_refused = on_refused
        self._peers = {pid: _Peer(pid, addr) for pid, addr in peers.items() if pid != node_id}
        self._tasks: dict[str, asyncio.Task] = {}
        self._leaving: list[tuple[_Peer, asyncio.Task | None]] = []  # closed after a grace
        self._started = False
        self._closed = False

    def start(self) -> None:
        self._started = True
        for peer in self._peers.values():
            self._open(peer)

    def _open(self, peer: _Peer) -> None:
        peer.channel = grpc.aio.insecure_channel(peer.address, options=CHANNEL_OPTIONS)
        self._tasks[peer.id] = asyncio.create_task(self._stream_loop(peer))

    def set_peers(self, peers: dict[str, str]) -> None:
        """Follow a membership change: open streams to new peers (or new addresses), close the
        streams of nodes that left."""
        if self._closed:
            return
        wanted = {pid: addr for pid, addr in peers.items() if pid != self.node_id}
        for pid, peer in list(self._peers.items()):
            if wanted.get(pid) != peer.address:
                del self._peers[pid]
                # Give what is queued for it (say, the heartbeat telling a removed node that
                # its removal committed) a moment to leave before the stream closes.
                leaving = (peer, self._tasks.pop(pid, None))
                self._leaving.append(leaving)
                asyncio.get_running_loop().call_later(_CLOSE_GRACE_S, self._close_peer, leaving)
        for pid, addr in wanted.items():
            if pid not in self._peers:
                peer = self._peers[pid] = _Peer(pid, addr)
                if self._started:
                    self._open(peer)

    def _close_peer(self, leaving: tuple[_Peer, asyncio.Task | None]) -> None:
        if leaving not in self._leaving:
            return  # close() got there first
        self._leaving.remove(leaving)
        peer, task = leaving
        if task is not None:
            task.cancel()
        if peer.channel is not None:
            asyncio.create_task(peer.channel.close(grace=None))

    async def close(self) -> None:
        self._closed = True
        leaving, self._leaving = self._leaving, []
        tasks = [*self._tasks.values(), *(task for _, task in leaving if task is not None)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for peer in [*self._peers.values(), *(peer for peer, _ in leaving)]:
            if peer.channel is not None:
                await peer.channel.close(grace=None)

    def send(self, msgs: list[Message]) -> None:
        for m in msgs:
            peer = self._peers.get(m.dst)
            if peer is None:
                continue
            if m.type in _VOTES:
                asyncio.create_task(self._send_vote(peer, m))
            elif peer.connected:
                peer.queue.append(m)
                peer.wake.set()

    async def send_snapshot(self, m: Message, chunks: Iterable[bytes]) -> bool:
        """Stream a snapshot (``m`` names its index/term) to ``m.dst``; True once it is durable
        there. The whole stream is one InstallSnapshot call: on failure it restarts from 0."""
        peer = self._peers.get(m.dst)
        if peer is None or peer.channel is None:
            return False
        meta = message_to_pb(m)

        def requests() -> Iterator[pb.SnapshotChunk]:
            offset = 0
            for data in chunks:
                yield pb.SnapshotChunk(
                    cluster_id=self.cluster_id, meta=meta, offset=offset, data=data
                )
                offset += len(data)
            yield pb.SnapshotChunk(cluster_id=self.cluster_id, meta=meta, offset=offset, done=True)

        try:
            await pb_grpc.PeerStub(peer.channel).InstallSnapshot(requests(), timeout=600)
            return True
        except grpc.RpcError as exc:
            log.warning("snapshot to %s failed: %s %s", peer.id, exc.code(), exc.details())
            return False

    async def _send_vote(self, peer: _Peer, m: Message) -> None:
        try:
            stub = pb_grpc.PeerStub(peer.channel)
            await stub.RequestVote(frame(self.cluster_id, self.node_id, [m]), timeout=2.0)
        except grpc.RpcError as exc:
            log.debug("vote request to %s failed: %s", peer.id, exc.code())
            self._check_refused(peer, exc)

    def _check_refused(self, peer: _Peer, exc: grpc.RpcError) -> None:
        if (
            self.on_refused is not None
            and exc.code() == grpc.StatusCode.PERMISSION_DENIED
            and NOT_A_MEMBER in (exc.details() or "")
        ):
            found = _REMOVED_AT.search(exc.details() or "")
            self.on_refused(peer.id, int(found.group(1)) if found else 0)

    async def _frames(self, peer: _Peer) -> AsyncIterator[pb.Frame]:
        while True:
            await peer.wake.wait()
            peer.wake.clear()
            while peer.queue:
                batch = peer.queue[:_MAX_FRAME_MESSAGES]
                del peer.queue[:_MAX_FRAME_MESSAGES]
                yield frame(self.cluster_id, self.node_id, batch)

    async def _stream_loop(self, peer: _Peer) -> None:
        backoff = 0.05
        stub = pb_grpc.PeerStub(peer.channel)
        while not self._closed:
            try:
                await asyncio.wait_for(peer.channel.channel_ready(), timeout=1.0)
                call = stub.Replicate(self._frames(peer))
                peer.connected = True
                backoff = 0.05
                log.info("stream to %s (%s) open", peer.id, peer.address)
                async for _ack in call:
                    pass
            except (TimeoutError, grpc.RpcError) as exc:
                detail = exc.code() if isinstance(exc, grpc.RpcError) else "timeout"
                log.debug("stream to %s down: %s", peer.id, detail)
                if isinstance(exc, grpc.RpcError):
                    self._check_refused(peer, exc)
            finally:
                if peer.connected:
                    peer.connected = False
                    peer.queue.clear()
                    self.on_unreachable(peer.id)
            if self._closed:
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)


class PeerService(pb_grpc.PeerServicer):
    """Inbound peer traffic: validate, decode, hand to ``deliver`` (which steps the core)."""

    def __init__(
        self,
        cluster_id: str,
        members: Callable[[str], bool] | set[str],
        deliver: Callable[[list], None],
        snapshots=None,
        removed_at: Callable[[str], int] | None = None,
    ):
        """``members`` says whose traffic we take: a set of ids, or a predicate (membership
        changes; a node takes traffic from ids it does not know yet, since a member added
        recently may already lead, and refuses nodes whose removal it saw committed).
        ``snapshots(meta)`` returns a receiver (write(offset, data), finish(), abort()) for an
        incoming snapshot; after ``finish`` the meta message is delivered like any other."""
        self.cluster_id = cluster_id
        self.accepts = members if callable(members) else members.__contains__
        self.removed_at = removed_at  # index of the committed removal of a refused id (or 0)
        self.deliver = deliver
        self.snapshots = snapshots

    async def _check(self, f: pb.Frame, context: grpc.aio.ServicerContext) -> list[Message]:
        if f.cluster_id != self.cluster_id:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"cluster id mismatch: this node is in {self.cluster_id!r}, "
                f"the sender in {f.cluster_id!r}",
            )
        if not f.src or not self.accepts(f.src):
            index = self.removed_at(f.src) if self.removed_at and f.src else 0
            where = f" (removed at index {index})" if index else ""
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"node id {f.src!r} {NOT_A_MEMBER}{where}"
            )
        try:
            msgs = [message_from_pb(p) for p in f.messages]
        except CodecError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        for m in msgs:
            if m.src != f.src:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"message from {m.src!r} in a frame of {f.src!r}",
                )
            if max(m.term, m.index, m.log_term, m.commit, m.hint) >= _MAX_TERM_OR_INDEX:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{m.type.name} from {m.src!r}: term or index out of range",
                )
        return msgs

    async def Replicate(self, request_iterator, context):  # noqa: N802 - gRPC naming
        async for f in request_iterator:
            self.deliver(await self._check(f, context))
        return
        yield  # an async generator: the response stream stays open until the sender closes

    async def RequestVote(self, request, context):  # noqa: N802
        self.deliver(await self._check(request, context))
        return pb.PeerEmpty()

    async def TimeoutNow(self, request, context):  # noqa: N802
        self.deliver(await self._check(request, context))
        return pb.PeerEmpty()

    async def InstallSnapshot(self, request_iterator, context):  # noqa: N802
        if self.snapshots is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node takes no snapshots")
        receiver, meta = None, None
        try:
            async for chunk in request_iterator:
                (m,) = await self._check(
                    pb.Frame(
                        cluster_id=chunk.cluster_id, src=chunk.meta.src, messages=[chunk.meta]
                    ),
                    context,
                )
                if m.type != MsgType.SNAPSHOT or (meta is not None and m != meta):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad snapshot chunk")
                if receiver is None:
                    meta, receiver = m, self.snapshots(m)
                try:
                    receiver.write(chunk.offset, chunk.data)
                except ValueError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                if chunk.done:
                    receiver.finish()
                    receiver = None
                    self.deliver([meta])
                    return pb.PeerEmpty()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "snapshot stream ended early")
        finally:
            if receiver is not None:
                receiver.abort()
