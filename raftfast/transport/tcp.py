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

A connection proves who it is before it may send much: its first frame (the sender sends an
empty one at once) names the sender, who must be the certificate's common name under TLS, and
is at most ``HANDSHAKE_BYTES``; every later frame must come from the same sender. A connection
that has not done so within ``HANDSHAKE_S``, or that stops in the middle of a record for
``STALL_S``, is dropped; at most ``MAX_CONNECTIONS`` are open, and a sender that connects again
replaces its older connection. So a stranger makes us hold at most one buffer of
``HANDSHAKE_BYTES`` (64 KiB) per connection here, for a few seconds.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from ssl import SSLContext
from typing import cast

import grpc
from google.protobuf.message import DecodeError

from raftfast.core.types import Message
from raftfast.heap import release_free_memory_soon
from raftfast.proto import raftfast_pb2 as pb

log = logging.getLogger("raftfast.transport")

MAX_RECORD_BYTES = 64 * 1024 * 1024  # a peer message, on this stream or the gRPC one
# A peer that stops reading (SIGSTOP, a full disk) must not make us buffer without bound:
# above this, frames for it are dropped, as on an unreachable peer, and Raft resends.
MAX_BUFFERED_BYTES = 32 * 1024 * 1024
_INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


class Refused(Exception):
    """A frame the receiver will not take; ends the stream like a gRPC status would."""

    def __init__(self, code: int, details: str, removed_at: int = 0) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.removed_at = removed_at  # the sender's id was removed at this index (0: no)

    @property
    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """The same, for a gRPC status."""
        return (("removed-at", str(self.removed_at)),) if self.removed_at else ()


def record(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


# Under TLS every piece a transport is given is a TLS record of its own: a call into the ssl
# module to write it, and on the other end one to read it (uvloop's SSL transport). A small
# append was 6 records, its acknowledgement 4, a client's frame 2: joined, each is one, and
# the sequential put p50 under TLS went from ~0.46 to ~0.42 ms (no fsync). A big piece (a
# batch of entries) goes as it is: a copy of it costs more than the record it spares.
TLS_JOIN_BYTES = 16 * 1024


def tls_pieces(pieces: list[bytes]) -> list[bytes]:
    """``pieces`` with each run of small ones (under ``TLS_JOIN_BYTES`` each) joined into one.
    (A run is not capped: a frame of many small pieces becomes one piece; a big piece's small
    head stays a record of its own.)"""
    out: list[bytes] = []
    run: list[bytes] = []
    for piece in pieces:
        if len(piece) < TLS_JOIN_BYTES:
            run.append(piece)
            continue
        if run:
            out.append(b"".join(run))
            run = []
        out.append(piece)
    if run:
        out.append(b"".join(run))
    return out


def write_record(transport: asyncio.Transport, pieces: list[bytes], tls: bool) -> None:
    """Write ``pieces`` as one record (``record``'s length prefix, then the pieces as they are:
    one writev on uvloop), their small ones joined first when the transport is ``tls``."""
    pieces = [sum(map(len, pieces)).to_bytes(4, "big"), *pieces]
    transport.writelines(tls_pieces(pieces) if tls else pieces)


_MIN_READ = 256 * 1024  # room offered to a read (uvloop reads up to 256 KiB at a time)
_SHRINK_ABOVE = 8 * 1024 * 1024  # an idle buffer bigger than this goes back to _MIN_READ
_IDLE_S = 1.0  # a stream without a big record for this long gives back its buffer


class _Records:
    """Splits a byte stream into length-prefixed records.

    The stream is read straight into one buffer (``get_buffer`` / ``updated``, for an
    ``asyncio.BufferedProtocol``), and each record is handed out as a view of it: a frame of a
    few MiB was copied three times on its way in (the read's bytes, appended to a buffer, cut
    out as bytes), ~7% of a follower's CPU under a batched load (perf). The buffer grows only
    as data arrives (at most twice what is held, plus one read), never to a size a header
    merely claims, nor past one record while the limit is small (a stranger's connection)."""

    def __init__(self) -> None:
        self._buf = bytearray()  # (until the first read)
        self._start = 0  # the first byte not yet handed out
        self._end = 0  # the end of what was read
        self.limit = MAX_RECORD_BYTES  # the largest record taken

    @property
    def partial(self) -> bool:
        """Part of a record has arrived, not all of it."""
        return self._end > self._start

    @property
    def held(self) -> int:
        """Bytes of unfinished records held."""
        return self._end - self._start

    def get_buffer(self) -> memoryview:
        """Where the next read goes. (Called between reads: no view of the buffer is alive,
        so it may move.)"""
        buf, start, end = self._buf, self._start, self._end
        held = end - start
        room = min(_MIN_READ, self.limit + 4)  # (a stranger's first record is small)
        if held >= 4:
            size = int.from_bytes(buf[start : start + 4], "big")
            if size <= self.limit:  # (a bigger one is refused once its header is taken)
                room = max(room, min(start + 4 + size - end, held + _MIN_READ))
        if len(buf) - end < room:
            if held + room <= len(buf):
                buf[:held] = buf[start:end]  # (the unfinished record to the front)
            else:  # (a new buffer, not a resize: a view of the old one may still be alive)
                self._buf = bytearray(held + room)
                self._buf[:held] = buf[start:end]
            self._start, self._end = 0, held
            return memoryview(self._buf)[held:]
        if not held and len(buf) > _SHRINK_ABOVE:
            self._buf = bytearray(room)
            self._start = self._end = end = 0
        return memoryview(self._buf)[end:]

    def clear(self) -> None:
        """Drop what is held."""
        self._start = self._end = 0

    def release(self) -> None:
        """Drop what is held and give back the buffer (the connection is over: its protocol
        object may live on, in a reference cycle, until the garbage collector's next pass)."""
        self._buf = bytearray()
        self._start = self._end = 0

    def shrink(self) -> None:
        """Give back a buffer grown for big records, if it holds nothing now."""
        if not self.partial and len(self._buf) > _MIN_READ:
            self._buf = bytearray()
            self._start = self._end = 0

    def updated(self, nbytes: int) -> Iterator[memoryview]:
        """``nbytes`` were read into the buffer; yield each record they complete, as a view
        that is released once the loop over them moves on. The limit is checked as each
        record is reached, so a caller may raise it between two records of one read."""
        self._end += nbytes
        return self._records()

    def feed(self, data: bytes) -> Iterator[memoryview]:
        """Take ``data`` (a stream read as bytes); yield each record it completes."""
        written = 0
        while written < len(data):
            with self.get_buffer() as room:
                n = min(len(room), len(data) - written)
                room[:n] = data[written : written + n]
            self._end += n
            written += n
        return self._records()

    def _records(self) -> Iterator[memoryview]:
        with memoryview(self._buf) as view:
            while self._end - self._start >= 4:
                start = self._start
                size = int.from_bytes(view[start : start + 4], "big")
                if size > self.limit:
                    raise Refused(_INVALID_ARGUMENT, f"record of {size} bytes is too large")
                end = start + 4 + size
                if self._end < end:
                    break
                self._start = end
                if self._start == self._end:
                    self._start = self._end = 0
                with view[end - size : end] as payload:
                    yield payload


# A peer machine that vanishes without a reset (power loss, a partition) must not keep our
# stream "connected" for TCP's default ~15 minutes of retransmissions: after this long with data
# unacknowledged, or this long idle and unanswered, the kernel drops the connection, the core
# hears the peer is unreachable, and a fresh stream is dialled. (A peer *process* that hangs
# while its kernel still answers, say under SIGSTOP, is not detected here, unlike with gRPC's
# keepalive pings: frames for it wait in socket buffers, then are dropped above
# MAX_BUFFERED_BYTES. Raft does not need to know: the leader's window for it fills and stops.)
DEAD_PEER_S = 10
_REFUSAL_LINGER_S = 2.0  # a refused sender gets this long to read the refusal and hang up
HANDSHAKE_BYTES = 64 * 1024  # the largest record before the sender has named itself
HANDSHAKE_S = 5.0  # to connect (TLS included) and name the sender
# TLS handshakes under way at once on a listener (more: one is dropped). asyncio's TLS takes
# a 256 KiB buffer a connection, and glibc keeps what a flood freed: 1,344 silent connections
# at once (both listeners full) took a node from 50 to 195 MiB, more each flood.
MAX_HANDSHAKES = 256
STALL_S = 10.0  # a named sender may pause this long in the middle of a record
MAX_CONNECTIONS = 256  # inbound connections at once (a cluster needs one per peer)
# Unfinished records held at once, over every connection; past it, the connection that grew
# the pile is dropped (its sender reconnects: Raft sends again what was lost).
MAX_PARTIAL_BYTES = 256 * 1024 * 1024
# Once a listener's connections let go of a pile of records this big, the heap's free pages go
# back to the system (glibc kept ~2.4 GB after 1,000 connections each held an unfinished
# Session record of 1.6 MB and closed; raftfast.heap).
TRIM_AFTER_BYTES = 32 * 1024 * 1024
_TRIM_EVERY_S = 10.0  # (at most: each trim holds glibc's arena lock for a few ms)
_SWEEP_S = 1.0
_SWEEP_LOGGED_S = 10.0  # connections a sweep dropped are logged at most this often


def tune(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        tune_socket(sock)


def tune_socket(sock: socket.socket) -> None:
    """No Nagle delay; a peer that vanished is noticed within ~DEAD_PEER_S."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, DEAD_PEER_S * 1000)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, DEAD_PEER_S // 2)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, DEAD_PEER_S // 2)


class _Inbound(asyncio.BufferedProtocol):
    def __init__(self, server: ReplicationServer) -> None:
        self.server = server
        self.records = _Records()
        self.records.limit = HANDSHAKE_BYTES
        self.transport: asyncio.Transport | None = None
        self.refused = False
        self.sender: str | None = None  # who the first frame named (checked): no more limits
        self.identity: str | None = None  # the TLS certificate's common name
        self.opened = self.progress = 0.0  # loop times: connected, last record or empty buffer
        self.big_record_at = 0.0  # loop time of the last record bigger than a read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.opened = self.progress = asyncio.get_running_loop().time()
        if len(self.server.connections) >= MAX_CONNECTIONS:
            log.warning("replication stream refused: %d connections open", MAX_CONNECTIONS)
            self.transport.abort()
            return
        tune(transport)
        self.identity = common_name(transport.get_extra_info("peercert"))
        self.server.connections[self.transport] = self

    def connection_lost(self, exc: Exception | None) -> None:
        if self.server.connections.pop(self.transport, None) is not None:
            self.server.hold(-self.records.held)
        self.records.release()
        if self.sender is not None and self.server.senders.get(self.sender) is self:
            del self.server.senders[self.sender]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.records.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self.refused:
            # After a refusal: read and dropped, so that closing sends no reset.
            self.server.hold(-self.records.held)  # (the read is not counted yet)
            self.records.clear()
            return
        completed = False
        held = self.records.held  # (before the read)
        try:
            for payload in self.records.updated(nbytes):
                completed = True
                if len(payload) > _MIN_READ:
                    self.big_record_at = asyncio.get_running_loop().time()
                try:
                    f = pb.Frame.FromString(payload)
                except DecodeError as exc:
                    raise Refused(_INVALID_ARGUMENT, f"undecodable frame: {exc}") from None
                if self.sender is not None and f.src != self.sender:
                    raise Refused(
                        _INVALID_ARGUMENT, f"frame of {f.src!r} on the stream of {self.sender!r}"
                    )
                msgs = self.server.check(f, self.identity)
                if self.sender is None:
                    self._authenticated(f.src)
                    if f.HasField("endpoint") and self.server.learned is not None:
                        self.server.learned(f.src, f.endpoint)
                self.server.deliver(msgs)
            if completed or not self.records.partial:
                self.progress = asyncio.get_running_loop().time()
        except Refused as exc:
            log.debug("refused a replication stream: %s", exc.details)
            self.refused = True
            transport.write(
                record(
                    pb.StreamRefusal(
                        code=exc.code, details=exc.details, removed_at=exc.removed_at
                    ).SerializeToString()
                )
            )
            # Half-close and keep reading: closing with unread data would send a reset, which
            # can overtake the refusal. The sender hangs up once it has read it. (TLS cannot
            # half-close: there, close once the refusal is out.)
            if transport.can_write_eof():
                transport.write_eof()
                asyncio.get_running_loop().call_later(_REFUSAL_LINGER_S, transport.abort)
            else:
                transport.close()
        finally:
            self.server.hold(self.records.held - held)
        if self.server.held_bytes > MAX_PARTIAL_BYTES and self.records.partial:
            log.warning(
                "dropped a replication stream: %d bytes of unfinished records held",
                self.server.held_bytes,
            )
            transport.abort()

    def _authenticated(self, sender: str) -> None:
        """The first frame checked out: lift the size limit; an older stream of the same
        sender (it reconnected) goes."""
        self.sender = sender
        self.records.limit = MAX_RECORD_BYTES
        older = self.server.senders.get(sender)
        self.server.senders[sender] = self
        if older is not None and older.transport is not None:
            older.transport.abort()

    def overdue(self, now: float) -> str | None:
        """Why this connection should be dropped now, or None."""
        if self.sender is None and now - self.opened > HANDSHAKE_S:
            return f"no frame within {HANDSHAKE_S:g}s"
        if self.records.partial and now - self.progress > STALL_S:
            return f"a record unfinished for {STALL_S:g}s"
        if now - self.big_record_at > _IDLE_S:
            self.records.shrink()  # (a stream that went quiet keeps no buffer of its busiest frame)
        return None

    def eof_received(self) -> bool:
        return False  # the sender hung up: close our side too


async def listen(
    factory: Callable[[], asyncio.BaseProtocol],
    host: str,
    port: int,
    ssl: SSLContext | None = None,
    room: Callable[[], int] | None = None,
) -> tuple[asyncio.AbstractServer | TlsAcceptor, int]:
    """A server on ``host:port`` (0: a free port, the same on every address of ``host``), TLS
    with ``ssl``; returns it and its port. Under TLS, a connection is counted from the moment
    it is accepted, against ``room()`` (``TlsAcceptor``)."""
    if ssl is not None:
        acceptor = TlsAcceptor(factory, ssl, room or (lambda: MAX_CONNECTIONS))
        return acceptor, await acceptor.start(host, port)
    loop = asyncio.get_running_loop()
    for _attempt in range(10):
        server = await loop.create_server(factory, host, port)
        ports = {sock.getsockname()[1] for sock in server.sockets}
        if len(ports) == 1:
            return server, ports.pop()
        # A name with several addresses ("localhost": ::1 and 127.0.0.1) got a different
        # free port on each; clients must find the stream on one port, whatever they dial.
        first = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        try:
            server = await loop.create_server(factory, host, first)
        except OSError:
            continue  # taken on the other address meanwhile: try another port
        return server, first
    raise OSError(f"no free port on every address of {host!r}")


def _listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address of ``host`` this machine supports, all on one port
    (0: a free one)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addresses = list(dict.fromkeys((family, addr) for family, _, _, _, addr in infos))
    for _attempt in range(10):
        sockets: list[socket.socket] = []
        chosen = port
        try:
            for family, addr in addresses:
                try:
                    sock = socket.socket(family, socket.SOCK_STREAM)
                except OSError:
                    continue  # (say, IPv6 on a kernel without it: "localhost" still works)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((addr[0], chosen, *addr[2:]))  # (an IPv6 scope id kept)
                chosen = sock.getsockname()[1]
                sock.listen(128)
                sock.setblocking(False)
            if not sockets:
                raise OSError(f"cannot listen on {host!r}: no address family it has works here")
            return sockets
        except OSError:
            for sock in sockets:
                sock.close()
            if port or len(sockets) <= 1:
                raise  # (the port asked for is taken; or the first bind failed)
            # A free port on the first address was taken on another: try another port.
    raise OSError(f"no free port on every address of {host!r}")


class _Handshake:
    """An accepted connection in its TLS handshake."""

    __slots__ = ("sock", "source", "started")

    def __init__(self, sock: socket.socket, source: str) -> None:
        self.sock = sock
        self.source = source  # the peer's address, without the port
        self.started = False  # (once started, asyncio's transport owns the socket)


class TlsAcceptor:
    """A TLS listener that counts a connection from its accept, not from the end of its
    handshake: an asyncio TLS server makes the protocol only once the handshake is done, so a
    flood of connections that never finish one was not counted against the listener's limit
    and each held a descriptor for up to HANDSHAKE_S. Here at most ``room()`` connections (and
    MAX_HANDSHAKES) are in their handshake at once: when one more arrives, the oldest of those
    from the address that has the most under way is dropped (not the newcomer: a slow flood of
    silent connections, each reopened when dropped, would otherwise keep peers and clients
    out), and when the listener's established connections leave no room at all, the newcomer
    is closed at once. The handshake itself is asyncio's (``loop.connect_accepted_socket``),
    with HANDSHAKE_S to finish."""

    def __init__(
        self,
        factory: Callable[[], asyncio.BaseProtocol],
        ssl: SSLContext,
        room: Callable[[], int],
    ) -> None:
        self.factory = factory
        self.ssl = ssl
        self.room = room
        self.handshaking: dict[asyncio.Task[None], _Handshake] = {}
        # the same, by the address they come from, each in arrival order (oldest first)
        self.by_source: dict[str, dict[asyncio.Task[None], None]] = {}
        self.sockets: list[socket.socket] = []
        self._closed = False
        self._dropped: list[asyncio.Task[None]] = []  # the handshakes close() ended
        self._dropped_since_trim = 0
        self._logged: dict[str, float] = {}

    async def start(self, host: str, port: int) -> int:
        self.sockets = _listening_sockets(host, port)
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            # (a reader callback, not a task in sock_accept: cancelled under a flood, that
            # raced the accept it had under way on the plain asyncio loop)
            loop.add_reader(sock.fileno(), self._accept, sock)
        return self.sockets[0].getsockname()[1]

    def _log(self, what: str, message: str, *args: object) -> None:
        """A warning at most every 10 s per kind (a flood must not flood the log)."""
        now = asyncio.get_running_loop().time()
        if now - self._logged.get(what, -1e9) > 10:
            self._logged[what] = now
            log.warning(message, *args)

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(128):  # (what a wake-up found waiting, at most a backlog's worth)
            try:
                sock, address = listening.accept()
                source = address[0]  # (the host of an IPv4 or IPv6 address; no port)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:  # out of descriptors: let some go before trying again
                self._log("accept", "TLS listener cannot accept: %s", exc)
                self._pause(listening)
                return
            room = self.room()
            if room <= 0:
                sock.close()
                self._log("full", "TLS connection refused: the listener is full")
                continue
            room = min(room, MAX_HANDSHAKES)
            while len(self.handshaking) >= room:
                self._drop(self._evictable())
                self._log("evicted", "TLS handshakes dropped for newer ones: a flood?")
            sock.setblocking(False)
            pending = _Handshake(sock, source)
            task = asyncio.create_task(self._handshake(pending))
            self.handshaking[task] = pending
            self.by_source.setdefault(source, {})[task] = None
            task.add_done_callback(self._finished)

    def _evictable(self) -> asyncio.Task[None]:
        """The oldest handshake of the address that has the most under way: a stranger
        flooding from one address makes way with its own connections, not others'."""
        busiest = max(self.by_source.values(), key=len)
        return next(iter(busiest))

    def _pause(self, listening: socket.socket) -> None:
        """Stop accepting on ``listening`` for 0.1 s (out of descriptors: no busy loop)."""
        loop = asyncio.get_running_loop()
        loop.remove_reader(listening.fileno())

        def resume() -> None:
            if not self._closed:
                loop.add_reader(listening.fileno(), self._accept, listening)

        loop.call_later(0.1, resume)

    async def _handshake(self, pending: _Handshake) -> None:
        pending.started = True
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                self.factory, pending.sock, ssl=self.ssl, ssl_handshake_timeout=HANDSHAKE_S
            )
        except (OSError, ValueError) as exc:  # (ssl.SSLError is an OSError)
            log.debug("TLS handshake failed: %r", exc)
            self._dropped_since_trim += 1

    def _drop(self, task: asyncio.Task[None]) -> None:
        task.cancel()  # (its transport closes the socket; _finished, one never started)
        self._finished(task)
        self._dropped_since_trim += 1

    def _finished(self, task: asyncio.Task[None]) -> None:
        pending = self.handshaking.pop(task, None)
        if pending is None:
            return  # (dropped before it was done)
        same = self.by_source[pending.source]
        del same[task]
        if not same:
            del self.by_source[pending.source]
        if not pending.started:
            pending.sock.close()
        if not self.handshaking and self._dropped_since_trim >= MAX_HANDSHAKES:
            # A flood is over: give back what its handshakes' buffers left in the heap.
            self._dropped_since_trim = 0
            release_free_memory_soon()

    def close(self) -> None:
        self._closed = True
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            loop.remove_reader(sock.fileno())
            sock.close()
        self._dropped = list(self.handshaking)
        for task in self._dropped:
            self._drop(task)

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._dropped, return_exceptions=True)


def common_name(cert: dict | None) -> str | None:
    """The subject's common name of a certificate as ``SSLObject.getpeercert()`` gives it."""
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


class RecordListener:
    """A listener of record streams: its connections (protocols with ``overdue(now)``, which
    add themselves to ``connections``), swept every ``_SWEEP_S`` for those too slow to say
    who they are or stalled mid-record; ``close`` drops them all. A subclass makes the
    protocol of a connection (``protocol``)."""

    what = "stream"  # (for the log)
    max_connections = MAX_CONNECTIONS  # (its protocols refuse past it; TLS: its handshakes too)

    def __init__(self, ssl: SSLContext | None = None) -> None:
        self.ssl = ssl
        self.connections: dict[asyncio.Transport, asyncio.BaseProtocol] = {}
        self._server: asyncio.AbstractServer | TlsAcceptor | None = None
        self._sweeper: asyncio.Task | None = None
        # Unfinished records its connections hold, over all of them; a Session stream's frames
        # read ahead (complete, waiting for the service); the most of both since the last trim.
        self.held_bytes = 0
        self.read_ahead_bytes = 0
        self._held_peak = 0
        self._trimmed_at = float("-inf")

    def hold(self, delta: int, read_ahead: int = 0) -> None:
        """The connections hold ``delta`` bytes more of unfinished records and ``read_ahead``
        more of frames read ahead (less, if negative). Once a pile of ``TRIM_AFTER_BYTES`` or
        more is (nearly) all let go, the heap's free pages go back to the system, off the loop
        (a big heap's trim takes a few ms), at most every ``_TRIM_EVERY_S``."""
        self.held_bytes += delta
        self.read_ahead_bytes += read_ahead
        pile = self.held_bytes + self.read_ahead_bytes
        if pile > self._held_peak:
            self._held_peak = pile
        elif self._held_peak >= TRIM_AFTER_BYTES and pile <= TRIM_AFTER_BYTES // 16:
            self._held_peak = 0
            now = time.monotonic()
            if now - self._trimmed_at >= _TRIM_EVERY_S:
                self._trimmed_at = now
                release_free_memory_soon()

    def protocol(self) -> asyncio.BaseProtocol:
        raise NotImplementedError

    async def start(self, host: str, port: int = 0) -> int:
        """Listen on ``host:port`` (0: any free port); returns the port."""
        self._server, port = await listen(self.protocol, host, port, self.ssl, self._room)
        self._sweeper = asyncio.create_task(self._sweep(), name=f"raftfast-{self.what}-sweep")
        return port

    def _room(self) -> int:
        return self.max_connections - len(self.connections)

    async def _sweep(self) -> None:
        """Drop overdue connections; say so in the log at most every ``_SWEEP_LOGGED_S``, as
        counts (a line each was ~160 lines a second under a flood of silent connections)."""
        loop = asyncio.get_running_loop()
        dropped: Counter[str] = Counter()
        logged_at = float("-inf")
        while True:
            await asyncio.sleep(_SWEEP_S)
            now = loop.time()
            for transport, connection in list(self.connections.items()):
                why = connection.overdue(now)  # type: ignore[attr-defined]
                if why is not None:
                    dropped[why] += 1
                    transport.abort()
            if dropped and now - logged_at >= _SWEEP_LOGGED_S:
                said = "; ".join(f"{n} for {why}" for why, n in dropped.items())
                log.info("dropped %d %s(s): %s", dropped.total(), self.what, said)
                dropped.clear()
                logged_at = now

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for transport in list(self.connections):
            transport.abort()
        if self._server is not None:
            await self._server.wait_closed()


class ReplicationServer(RecordListener):
    """Inbound replication streams. ``check(frame, identity)`` returns the frame's messages or
    raises ``Refused`` (``identity``: the sender's certificate common name under TLS, else
    None); ``deliver(messages)`` steps the core; ``learned(sender, endpoint)`` hears where a
    sender takes streams itself, if its first frame says."""

    what = "replication stream"

    def __init__(
        self,
        check: Callable[[pb.Frame, str | None], list[Message]],
        deliver: Callable[[list[Message]], None],
        ssl: SSLContext | None = None,
        learned: Callable[[str, pb.StreamEndpoint], None] | None = None,
    ) -> None:
        super().__init__(ssl)
        self.check = check
        self.deliver = deliver
        self.learned = learned  # (sender, where it takes streams): its first frame said so
        self.senders: dict[str, _Inbound] = {}  # the authenticated connection of each sender

    def protocol(self) -> _Inbound:
        return _Inbound(self)


class OutboundStream(asyncio.Protocol):
    """Our end of a stream to one peer: ``write`` frames; ``closed`` resolves when it ends,
    with ``refusal`` set if the peer refused us."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.refusal: pb.StreamRefusal | None = None
        self._records = _Records()
        self._tls = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._tls = transport.get_extra_info("ssl_object") is not None
        tune(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            payloads = [bytes(p) for p in self._records.feed(data)]
            if not payloads:
                return  # the rest of the refusal is on its way
            self.refusal = pb.StreamRefusal.FromString(payloads[0])
        except (Refused, DecodeError):
            pass  # not a refusal we can read: just a broken stream
        self.close()

    def backlog(self) -> int:
        """Bytes written and not yet sent."""
        transport = self.transport
        return 0 if transport is None else transport.get_write_buffer_size()

    def write(self, pieces: list[bytes]) -> bool:
        """Send one serialized ``pb.Frame``, given in pieces (``codec.frame_pieces``: written
        with one writev where the loop is uvloop, joined by asyncio's own; under TLS, small
        ones joined here: ``tls_pieces``); False if it was dropped (closed or backed up)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        if transport.get_write_buffer_size() > MAX_BUFFERED_BYTES:
            return False
        write_record(transport, pieces, self._tls)
        return True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(
    host: str, port: int, timeout: float, ssl: SSLContext | None = None
) -> OutboundStream:
    """Dial a peer's stream (over TLS with ``ssl``, checking its certificate for ``host``)."""
    loop = asyncio.get_running_loop()
    extra = {"ssl": ssl, "server_hostname": host} if ssl else {}
    # (not wait_for: in 3.11 it can swallow the cancellation of a node's stop that comes as
    # the connection is made, and the stop then waits on the stream)
    async with asyncio.timeout(timeout):
        _transport, stream = await loop.create_connection(OutboundStream, host, port, **extra)
    return stream
