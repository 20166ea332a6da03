"""Peer transport: gRPC for the control RPCs, plain TCP (or gRPC) for the replication stream.

Outbound: one long-lived replication stream per peer. Everything the core has for that peer
(AppendEntries frames, acks, heartbeats) at the end of a Ready goes out as one ``Frame``, so
the per-message cost is paid once per batch, not once per Raft message. The stream runs over
plain TCP (``tcp.py``) when the peer offers it (``ReplicationEndpoint``), since a grpc.aio
stream message costs ~0.2 ms of CPU per end and ~0.4 ms of round trip; otherwise, or with
``stream="grpc"``, over the gRPC ``Replicate`` stream. Pipelining comes from the core's
in-flight window. Vote requests go on a TCP stream that is open and not backed up, else by
the unary ``RequestVote`` RPC, so an election never waits behind a stream; snapshots go over
``InstallSnapshot``.

Peers may share a port with clients, whose cap of calls under way counts theirs too: a client
holding every call that port takes refuses peers' RPCs as well. So what Raft needs to go on
avoids new calls once streams are up: votes travel on the streams, and the first frame of a
TCP stream says where its sender takes streams (``Frame.endpoint``), so a node that cannot ask
by ``ReplicationEndpoint`` still dials back.

Inbound: ``PeerService`` checks the cluster id and the sender, decodes, and steps the core.
Messages are never queued while a peer is unreachable: Raft retransmits, and a stale backlog
would only delay the fresh state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from raftfast.address import split_address
from raftfast.core.types import Message, MsgType
from raftfast.errors import DiskFullError
from raftfast.etcd.errors import EtcdError
from raftfast.limits import MAX_ID_BYTES, MAX_TERM_OR_INDEX, node_id_problem
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto import raftfast_pb2_grpc as pb_grpc
from raftfast.security.tls import TLSFiles, caller_name, channel_credentials
from raftfast.transport import PEER_STREAMS, tcp
from raftfast.transport.codec import (
    CodecError,
    frame,
    frame_pieces,
    message_from_pb,
    message_to_pb,
)

log = logging.getLogger("raftfast.transport")

_VOTES = (MsgType.VOTE, MsgType.PRE_VOTE)
_MAX_FRAME_MESSAGES = 1024
_CLOSE_GRACE_S = 1.0  # a peer that left keeps its stream this long
# A stream that fell back to gRPC because the TCP port did not answer is closed after this
# long, so that TCP is tried again (the port may have been firewalled or busy for a moment).
_FALLBACK_S = 30.0
_STABLE_S = 1.0  # a stream that lived this long was up: the next one is dialled at once
REFUSED_FOR_S = 5.0  # a peer's refusal counts this long (refused_by: health)
# A vote behind more than this on a stream (a deposed leader's backlog) goes by RPC instead.
_VOTE_BACKLOG_BYTES = 256 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", tcp.MAX_RECORD_BYTES),  # one limit on either stream
    ("grpc.max_receive_message_length", tcp.MAX_RECORD_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    # A restarted peer is dialled again within 50-200 ms (gRPC's defaults wait 1 s, then up to
    # 120 s): until then it cannot answer its leader, who may lose its quorum contact.
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 200),
]


class _Peer:
    def __init__(self, peer_id: str, address: str) -> None:
        self.id = peer_id
        self.address = address
        self.queue: list[Message] = []
        self.wake = asyncio.Event()
        self.connected = False
        self.channel: grpc.aio.Channel | None = None
        self.stream: tcp.OutboundStream | None = None  # set while the stream runs over TCP
        self.client_address = ""  # where it serves clients, as it told us
        self.endpoint: pb.StreamEndpoint | None = None  # where it takes streams, as it told us
        self.refused = False  # it refused our last stream (until one stays up)
        self.refused_at = -REFUSED_FOR_S  # (time.monotonic) when it last refused us


_STATUS = {c.value[0]: c for c in grpc.StatusCode}


def _open_level(peer: _Peer) -> int:
    """A stream's opening is news, unless the peer refused the one before (once a minute)."""
    return logging.DEBUG if peer.refused else logging.INFO


def _code(status: grpc.StatusCode) -> int:
    return status.value[0]


NOT_A_MEMBER = "is not (or no longer) a member of this cluster"
NEW_DATA_DIRECTORY = "speaks from a new data directory"  # (raftfast/server/incarnations.py)
_REFUSAL_LOG_S = 60.0  # a refusal we cannot mend by retrying: logged once a minute a peer
# What a peer answers when it refuses us (not when it is down or busy)
_REFUSALS = frozenset(
    {
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.INVALID_ARGUMENT,
    }
)


class PeerTransport:
    """Sends core messages to peers; ``on_unreachable(peer)`` is called when a stream breaks,
    ``on_refused(peer, index)`` when a peer refuses us because we are not a member (any more).
    ``stream`` is "tcp" (the default: TCP where the peer offers it) or "grpc". With ``tls``
    (our peer certificate and the peer CA) every connection is TLS, both ways authenticated."""

    def __init__(
        self,
        node_id: str,
        cluster_id: str,
        peers: dict[str, str],
        on_unreachable: Callable[[str], None],
        on_refused: Callable[[str, int], None] | None = None,
        stream: str = "tcp",
        tls: TLSFiles | None = None,
        incarnation: int = 0,
    ) -> None:
        if stream not in PEER_STREAMS:
            raise ValueError(f"stream must be one of {', '.join(PEER_STREAMS)}, not {stream!r}")
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.incarnation = incarnation  # our data directory's (raftfast/server/incarnations.py)
        self.stream_kind = stream
        self.on_unreachable = on_unreachable
        self.on_refused = on_refused
        self._peers = {pid: _Peer(pid, addr) for pid, addr in peers.items() if pid != node_id}
        self._tasks: dict[str, asyncio.Task] = {}
        self._leaving: list[tuple[_Peer, asyncio.Task | None]] = []  # closed after a grace
        self._started = False
        self._closed = False
        self._credentials = channel_credentials(tls) if tls else None
        self._ssl = tls.client_context() if tls else None
        self._refusals_logged: dict[str, float] = {}
        self._votes: set[asyncio.Task] = set()  # vote RPCs under way (held until done)
        # Where we take TCP streams, said in each stream's first frame (None: not said).
        self.endpoint: pb.StreamEndpoint | None = None

    def start(self) -> None:
        self._started = True
        for peer in self._peers.values():
            self._open(peer)

    def _open(self, peer: _Peer) -> None:
        peer.channel = self.channel(peer.address)
        self._tasks[peer.id] = asyncio.create_task(self._stream_loop(peer))

    def channel(self, address: str) -> grpc.aio.Channel:
        """A gRPC channel to a peer's address (TLS with our peer certificate, if we have one)."""
        if self._credentials is None:
            return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        return grpc.aio.secure_channel(address, self._credentials, options=CHANNEL_OPTIONS)

    def learned(self, peer_id: str, endpoint: pb.StreamEndpoint) -> None:
        """``peer_id`` told us (its stream's first frame) where it takes streams."""
        peer = self._peers.get(peer_id)
        if peer is not None:
            peer.endpoint = endpoint
            peer.client_address = endpoint.client_address

    def client_address_of(self, peer_id: str) -> str:
        """Where ``peer_id`` serves clients, as it told us ("" if it has not)."""
        peer = self._peers.get(peer_id)
        return peer.client_address if peer is not None else ""

    def refused_by(self, peer_id: str) -> bool:
        """Whether ``peer_id`` refused us within the last ``REFUSED_FOR_S`` (a node it refuses
        is refused again at each reconnect, a fraction of a second apart; one refusal that
        passed, a change not yet applied there, counts for no longer)."""
        peer = self._peers.get(peer_id)
        return peer is not None and time.monotonic() - peer.refused_at < REFUSED_FOR_S

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
        if peer.stream is not None:
            peer.stream.close()
        if peer.channel is not None:
            asyncio.create_task(peer.channel.close(grace=None))

    async def close(self) -> None:
        self._closed = True
        leaving, self._leaving = self._leaving, []
        tasks = [
            *self._tasks.values(),
            *(task for _, task in leaving if task is not None),
            *self._votes,
        ]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for peer in [*self._peers.values(), *(peer for peer, _ in leaving)]:
            if peer.stream is not None:
                peer.stream.close()
            if peer.channel is not None:
                await peer.channel.close(grace=None)

    def unreachable(self) -> set[str]:
        """The peers whose stream is down now."""
        return {pid for pid, peer in self._peers.items() if not peer.connected}

    @staticmethod
    def _vote_streams(peer: _Peer) -> bool:
        """A vote for ``peer`` can go on its TCP stream: open and not backed up."""
        stream = peer.stream
        return peer.connected and stream is not None and stream.backlog() < _VOTE_BACKLOG_BYTES

    def all_direct(self) -> bool:
        """True if ``send`` writes everything at once: no connected peer is on the gRPC stream
        (whose frames leave from a task of this event loop, later)."""
        return all(p.stream is not None for p in self._peers.values() if p.connected)

    def send(self, msgs: list[Message]) -> None:
        direct: list[_Peer] = []
        for m in msgs:
            peer = self._peers.get(m.dst)
            if peer is None:
                continue
            if m.type in _VOTES and not self._vote_streams(peer):
                task = asyncio.create_task(self._send_vote(peer, m))
                self._votes.add(task)
                task.add_done_callback(self._votes.discard)
            elif peer.connected:
                peer.queue.append(m)
                if peer.stream is None:
                    peer.wake.set()  # the gRPC request iterator picks it up
                elif len(peer.queue) == 1:
                    direct.append(peer)
        # TCP: written now, one frame per peer, without a hop through a task.
        for peer in direct:
            stream = peer.stream
            for batch in self._take_batches(peer):
                if stream is None or not stream.write(
                    frame_pieces(self.cluster_id, self.node_id, batch, self.incarnation)
                ):
                    log.debug(
                        "dropped %d messages for %s (stream closed or backed up)",
                        len(batch),
                        peer.id,
                    )

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

    async def report_alarm(self, peer_id: str, why: str) -> None:
        """Ask ``peer_id`` (the leader) to raise the NOSPACE alarm: our disk is nearly full."""
        peer = self._peers.get(peer_id)
        if peer is None or peer.channel is None:
            return
        report = pb.AlarmReport(
            cluster_id=self.cluster_id, src=self.node_id, alarm="NOSPACE", why=why
        )
        try:
            await pb_grpc.PeerStub(peer.channel).ReportAlarm(report, timeout=2.0)
        except grpc.RpcError as exc:
            log.info("NOSPACE report to %s failed: %s %s", peer_id, exc.code(), exc.details())

    async def forward(
        self, peer_id: str, method: str, request: bytes, timeout: float
    ) -> tuple[bytes, int]:
        """Hand a client request to ``peer_id`` (the leader); its answer and its applied index
        once it answered. The leader's refusal, or a failure to reach it, as an EtcdError."""
        peer = self._peers.get(peer_id)
        if peer is None or peer.channel is None:
            raise EtcdError(grpc.StatusCode.UNAVAILABLE, f"etcdserver: leader {peer_id} unknown")
        forward = pb.ForwardRequest(
            cluster_id=self.cluster_id, src=self.node_id, method=method, request=request
        )
        try:
            response = await pb_grpc.PeerStub(peer.channel).Forward(forward, timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise EtcdError(
                    grpc.StatusCode.UNAVAILABLE, "etcdserver: request timed out"
                ) from None
            if code == grpc.StatusCode.UNAVAILABLE and not (exc.details() or "").startswith(
                "etcdserver:"
            ):
                raise EtcdError(
                    code, "etcdserver: request timed out, possibly due to connection lost"
                ) from None
            raise EtcdError(code, exc.details() or str(code)) from None
        return response.response, response.applied_index

    async def _send_vote(self, peer: _Peer, m: Message) -> None:
        try:
            stub = pb_grpc.PeerStub(peer.channel)
            await stub.RequestVote(
                frame(self.cluster_id, self.node_id, [m], self.incarnation), timeout=2.0
            )
        except grpc.RpcError as exc:
            log.debug("vote request to %s failed: %s", peer.id, exc.code())
            self._check_refused_rpc(peer, exc)

    def _check_refused(
        self, peer: _Peer, code: grpc.StatusCode | None, details: str | None, removed_at: int
    ) -> None:
        """A peer refused us (or the call failed: ``code``): say why, once a minute a peer (we
        retry meanwhile: a node that every peer refused said nothing of it but "stream open"
        ten times a second); if because our id was removed, tell the node (with the index)."""
        if code in _REFUSALS:
            peer.refused = True  # (its next "open" is no news)
            peer.refused_at = now = time.monotonic()
            if now - self._refusals_logged.get(peer.id, -_REFUSAL_LOG_S) >= _REFUSAL_LOG_S:
                self._refusals_logged[peer.id] = now
                lost = NEW_DATA_DIRECTORY in (details or "")  # (this node's state is gone)
                log.log(
                    logging.ERROR if lost else logging.WARNING,
                    "%s refuses this node: %s",
                    peer.id,
                    details,
                )
        if (
            self.on_refused is not None
            and code == grpc.StatusCode.PERMISSION_DENIED
            and NOT_A_MEMBER in (details or "")
        ):
            self.on_refused(peer.id, removed_at)

    def _check_refused_rpc(self, peer: _Peer, exc: grpc.RpcError) -> None:
        metadata = dict(exc.trailing_metadata() or ())
        try:
            removed_at = int(metadata.get("removed-at", 0))
        except ValueError:
            removed_at = 0
        self._check_refused(peer, exc.code(), exc.details(), removed_at)

    def _take_batches(self, peer: _Peer) -> Iterator[list[Message]]:
        """Empty ``peer.queue`` in frames' worth of at most _MAX_FRAME_MESSAGES messages."""
        while peer.queue:
            batch = peer.queue[:_MAX_FRAME_MESSAGES]
            del peer.queue[:_MAX_FRAME_MESSAGES]
            yield batch

    async def _frames(self, peer: _Peer) -> AsyncIterator[pb.Frame]:
        """The gRPC stream's request iterator."""
        while True:
            await peer.wake.wait()
            peer.wake.clear()
            for batch in self._take_batches(peer):
                yield frame(self.cluster_id, self.node_id, batch, self.incarnation)

    async def _tcp_address(self, peer: _Peer, stub: pb_grpc.PeerStub) -> tuple[str, int] | None:
        """Where the peer takes the TCP replication stream, or None for the gRPC stream (and,
        on the way, where it serves clients)."""
        try:
            endpoint = await stub.ReplicationEndpoint(pb.PeerEmpty(), timeout=2.0)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None  # a node without it
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or peer.endpoint is None:
                raise
            # Its port takes no more calls (a client holds them all): dial where it said.
            endpoint = peer.endpoint
            log.debug("%s takes no calls (%s): its stream port as it said", peer.id, exc.details())
        peer.endpoint = endpoint
        peer.client_address = endpoint.client_address
        offset = endpoint.port_offset
        if self.stream_kind != "tcp":
            return None
        host, port = split_address(peer.address)
        if not offset or not 0 < port + offset < 65536:
            return None
        return host, port + offset

    async def _run_tcp(self, peer: _Peer, host: str, port: int) -> None:
        try:
            stream = await tcp.connect(host, port, timeout=2.0, ssl=self._ssl)
            # The first frame names us: until it has, the receiver takes only small records.
            stream.write(
                frame_pieces(
                    self.cluster_id,
                    self.node_id,
                    [],
                    self.incarnation,
                    endpoint=self.endpoint,
                    dst=peer.id,
                )
            )
        except (TimeoutError, OSError) as exc:
            # Reachable over gRPC but not on the stream port (a firewall, a port forward of
            # the gRPC port only): replicate over gRPC rather than not at all.
            log.warning(
                "no TCP stream to %s at %s:%d (%r): replicating over gRPC for %gs",
                peer.id,
                host,
                port,
                exc,
                _FALLBACK_S,
            )
            try:
                async with asyncio.timeout(_FALLBACK_S):
                    await self._run_grpc(peer, pb_grpc.PeerStub(peer.channel))
            except TimeoutError:
                log.info("retrying the TCP stream to %s", peer.id)
            return
        peer.stream, peer.connected = stream, True
        log.log(
            _open_level(peer), "stream to %s (%s, tcp port %d) open", peer.id, peer.address, port
        )
        try:
            await stream.closed
        finally:
            peer.stream = None
            stream.close()
        refusal = stream.refusal
        if refusal is not None:
            log.debug("stream to %s refused: %s", peer.id, refusal.details)
            self._check_refused(
                peer, _STATUS.get(refusal.code), refusal.details, refusal.removed_at
            )

    async def _run_grpc(self, peer: _Peer, stub: pb_grpc.PeerStub) -> None:
        call = stub.Replicate(self._frames(peer))
        peer.connected = True
        log.log(_open_level(peer), "stream to %s (%s) open", peer.id, peer.address)
        async for _ack in call:
            pass

    async def _stream_loop(self, peer: _Peer) -> None:
        backoff = 0.05
        stub = pb_grpc.PeerStub(peer.channel)
        loop = asyncio.get_running_loop()
        while not self._closed:
            started = loop.time()
            try:
                async with asyncio.timeout(1.0):  # (not wait_for: see tcp.connect)
                    await peer.channel.channel_ready()
                address = await self._tcp_address(peer, stub)
                if address is not None:
                    await self._run_tcp(peer, *address)
                else:
                    await self._run_grpc(peer, stub)
            except (TimeoutError, OSError, grpc.RpcError) as exc:
                detail = exc.code() if isinstance(exc, grpc.RpcError) else repr(exc)
                log.debug("stream to %s down: %s", peer.id, detail)
                if isinstance(exc, grpc.RpcError):
                    self._check_refused_rpc(peer, exc)
            except Exception as exc:  # noqa: BLE001 - keep the peer's loop alive, whatever it was
                log.warning("stream to %s failed: %r", peer.id, exc)
            finally:
                if peer.connected:
                    if loop.time() - started >= _STABLE_S:
                        backoff = 0.05  # it was up: reconnect soon
                        peer.refused = False
                    peer.connected = False
                    peer.queue.clear()
                    self.on_unreachable(peer.id)
            if self._closed:
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 0.2)


# Replicate and InstallSnapshot streams open at once (a member keeps one of each to each peer):
# idle ones, a stranger's in plain mode, hold a place of the port's calls each.
MAX_PEER_STREAMS = 256


class PeerService(pb_grpc.PeerServicer):
    """Inbound peer traffic: validate, decode, hand to ``deliver`` (which steps the core)."""

    def __init__(
        self,
        cluster_id: str,
        members: Callable[[str], bool] | set[str],
        deliver: Callable[[list], None],
        snapshots=None,
        removed_at: Callable[[str], int] | None = None,
        authenticated: bool = False,
        join: Callable[[pb.JoinRequest, grpc.aio.ServicerContext], Awaitable[Any]] | None = None,
        alarm: Callable[[str, str], str | None] | None = None,
        forward: Callable[[str, bytes], Awaitable[tuple[bytes, int]]] | None = None,
        incarnations: Callable[[str, int], str | None] | None = None,
        node_id: str = "",
    ):
        """``members`` says whose traffic we take: a set of ids, or a predicate (membership
        changes; a node takes traffic from ids it does not know yet, since a member added
        recently may already lead, and refuses nodes whose removal it saw committed).
        ``snapshots(meta)`` returns a receiver (write(offset, data), finish(), abort()) for an
        incoming snapshot, or raises ``tcp.Refused``; after ``finish`` the meta message is
        delivered like any other. ``authenticated``: peers connect over TLS, and a sender must
        be the common name of its certificate. ``join(request, context)`` serves ``Join``;
        ``alarm(src, why)`` takes a member's NOSPACE report (why it is refused, or None);
        ``forward(method, request)`` answers a client request a member hands us (the etcd
        API's: raises an EtcdError for its status). ``incarnations(src, incarnation)`` says
        why a member speaking from another data directory than before is refused (or None).
        ``node_id``: ours; traffic meant for another id is refused (its address reaches us)."""
        self.cluster_id = cluster_id
        self.node_id = node_id
        self.incarnations = incarnations
        self.accepts = members if callable(members) else members.__contains__
        self.removed_at = removed_at  # index of the committed removal of a refused id (or 0)
        self.deliver = deliver
        self.snapshots = snapshots
        self.authenticated = authenticated
        self.join = join
        self.alarm = alarm
        self.forward = forward
        self._streams_open = 0  # Replicate and InstallSnapshot streams under way
        self.stream_offset = 0  # TCP replication port - gRPC port, once listening (0: gRPC only)
        self.client_address = ""  # where this node serves clients (told to peers)

    def check(
        self, f: pb.Frame, identity: str | None = None, snapshot: bool = False
    ) -> list[Message]:
        """The frame's messages, or ``tcp.Refused`` with the status its stream ends with.
        ``identity``: who the connection authenticated (its certificate's common name).
        A SNAPSHOT message comes only with its data (``snapshot``: InstallSnapshot's)."""
        self.check_cluster(f.cluster_id)
        self.check_sender(f.src, identity)
        self.check_addressee(f.dst)
        if not self.accepts(f.src):
            index = self.removed_at(f.src) if self.removed_at and f.src else 0
            where = f" (removed at index {index})" if index else ""
            raise tcp.Refused(
                _code(grpc.StatusCode.PERMISSION_DENIED),
                f"node id {f.src!r} {NOT_A_MEMBER}{where}",
                removed_at=index,
            )
        if self.incarnations is not None:
            why = self.incarnations(f.src, f.incarnation)
            if why is not None:
                raise tcp.Refused(_code(grpc.StatusCode.FAILED_PRECONDITION), why)
        invalid = _code(grpc.StatusCode.INVALID_ARGUMENT)
        try:
            msgs = [message_from_pb(p) for p in f.messages]
        except CodecError as exc:
            raise tcp.Refused(invalid, str(exc)) from None
        for m in msgs:
            if m.src != f.src:
                raise tcp.Refused(invalid, f"message from {m.src!r} in a frame of {f.src!r}")
            if (m.type == MsgType.SNAPSHOT) != snapshot:
                raise tcp.Refused(invalid, "a snapshot travels alone, by InstallSnapshot")
            if len(m.dst.encode()) > MAX_ID_BYTES:  # (src is the frame's, checked above)
                raise tcp.Refused(invalid, f"{m.type.name} from {m.src!r}: dst is too long")
            self.check_addressee(m.dst)
            if max(m.term, m.index, m.log_term, m.commit, m.hint, m.context) > MAX_TERM_OR_INDEX:
                raise tcp.Refused(
                    invalid, f"{m.type.name} from {m.src!r}: term or index out of range"
                )
        return msgs

    def check_cluster(self, cluster_id: str) -> None:
        if cluster_id != self.cluster_id:
            raise tcp.Refused(
                _code(grpc.StatusCode.FAILED_PRECONDITION),
                f"cluster id mismatch: this node is in {self.cluster_id!r}, "
                f"the sender in {cluster_id[:300]!r}",
            )

    def check_addressee(self, dst: str) -> None:
        """Traffic meant for another member (``dst``; "": not said) is refused: the sender was
        given an address of ours for it (an operator's alias, `localhost` for `127.0.0.1`)."""
        if dst and self.node_id and dst != self.node_id:
            raise tcp.Refused(
                _code(grpc.StatusCode.FAILED_PRECONDITION),
                f"this is {self.node_id!r}, not {dst[:40]!r}: the address given for "
                f"{dst[:40]!r} reaches {self.node_id!r}",
            )

    def check_sender(self, sender: str, identity: str | None) -> None:
        """A usable node id and, under TLS, the holder of its certificate."""
        problem = node_id_problem(sender)
        if problem is not None:
            raise tcp.Refused(
                _code(grpc.StatusCode.INVALID_ARGUMENT), f"bad sender id {sender[:40]!r}: {problem}"
            )
        if self.authenticated and sender != identity:
            raise tcp.Refused(
                _code(grpc.StatusCode.PERMISSION_DENIED),
                f"{sender[:40]!r} cannot speak on a connection authenticated as {identity!r}",
            )

    async def _check(
        self, f: pb.Frame, context: grpc.aio.ServicerContext, snapshot: bool = False
    ) -> list[Message]:
        try:
            return self.check(f, caller_name(context), snapshot)
        except tcp.Refused as exc:
            await context.abort(_STATUS[exc.code], exc.details, exc.trailing_metadata)
            raise  # not reached: abort raises

    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        if self.join is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node takes no joins")
        try:
            # (a removed node's id may join again: no member check)
            self.check_cluster(request.cluster_id)
            self.check_sender(request.id, caller_name(context))
        except tcp.Refused as exc:
            await context.abort(_STATUS[exc.code], exc.details, exc.trailing_metadata)
        return await self.join(request, context)

    async def _stream_opens(self, context: grpc.aio.ServicerContext) -> None:
        """Count a Replicate or InstallSnapshot stream (``_stream_ends`` uncounts it), or
        refuse it past MAX_PEER_STREAMS."""
        if self._streams_open >= MAX_PEER_STREAMS:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this node has {MAX_PEER_STREAMS} peer streams open; retry later",
            )
        self._streams_open += 1

    def _stream_ends(self) -> None:
        self._streams_open -= 1

    async def Replicate(self, request_iterator, context):  # noqa: N802 - gRPC naming
        await self._stream_opens(context)
        try:
            async for f in request_iterator:
                self.deliver(await self._check(f, context))
        except DecodeError as exc:  # (bytes that are no frame: the sender's doing)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed frame: {exc}")
        finally:
            self._stream_ends()
        return
        yield  # an async generator: the response stream stays open until the sender closes

    async def ReportAlarm(self, request: pb.AlarmReport, context):  # noqa: N802
        try:
            self.check_cluster(request.cluster_id)
            self.check_sender(request.src, caller_name(context))
            if self.alarm is None or not self.accepts(request.src):
                raise tcp.Refused(_code(grpc.StatusCode.PERMISSION_DENIED), "not taken here")
        except tcp.Refused as exc:
            await context.abort(_STATUS[exc.code], exc.details, exc.trailing_metadata)
        refusal = self.alarm(request.src, request.why[:300])
        if refusal is not None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, refusal)
        return pb.PeerEmpty()

    async def Forward(self, request: pb.ForwardRequest, context):  # noqa: N802
        try:
            self.check_cluster(request.cluster_id)
            self.check_sender(request.src, caller_name(context))
            if self.forward is None or not self.accepts(request.src):
                raise tcp.Refused(_code(grpc.StatusCode.PERMISSION_DENIED), "not taken here")
        except tcp.Refused as exc:
            await context.abort(_STATUS[exc.code], exc.details, exc.trailing_metadata)
        try:
            response, applied = await self.forward(request.method, request.request)
        except EtcdError as exc:
            await context.abort(exc.code, exc.message)
        return pb.ForwardResponse(response=response, applied_index=applied)

    async def ReplicationEndpoint(self, request, context):  # noqa: N802
        return pb.StreamEndpoint(port_offset=self.stream_offset, client_address=self.client_address)

    async def RequestVote(self, request, context):  # noqa: N802
        self.deliver(await self._check(request, context))
        return pb.PeerEmpty()

    async def InstallSnapshot(self, request_iterator, context):  # noqa: N802
        if self.snapshots is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node takes no snapshots")
        await self._stream_opens(context)
        receiver, meta = None, None
        try:
            async for chunk in request_iterator:
                (m,) = await self._check(
                    pb.Frame(
                        cluster_id=chunk.cluster_id, src=chunk.meta.src, messages=[chunk.meta]
                    ),
                    context,
                    snapshot=True,
                )
                if meta is not None and m != meta:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad snapshot chunk")
                if receiver is None:
                    try:
                        meta, receiver = m, self.snapshots(m)
                    except tcp.Refused as exc:
                        await context.abort(_STATUS[exc.code], exc.details, exc.trailing_metadata)
                try:
                    receiver.write(chunk.offset, chunk.data)
                except ValueError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                except DiskFullError as exc:
                    receiver = None  # (deleted)
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
                if chunk.done:
                    try:
                        receiver.finish()
                    except DiskFullError as exc:
                        receiver = None
                        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
                    receiver = None
                    self.deliver([meta])
                    return pb.PeerEmpty()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "snapshot stream ended early")
        except DecodeError as exc:  # (bytes that are no chunk)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed chunk: {exc}")
        finally:
            self._stream_ends()
            if receiver is not None:
                receiver.abort()
