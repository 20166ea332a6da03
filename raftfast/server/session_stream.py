"""The Session stream over plain TCP: ``KV.Session`` without gRPC.

A grpc.aio stream message costs ~0.2 ms of CPU at each end, most of it threads handing the
message on (the peers left gRPC for the same reason: raftfast/transport/tcp.py); a single
write is two messages. A node offers the same stream on a TCP port of its ``--listen`` host
(``--client-stream-port``), under the client port's TLS, and says where in ``Status``
(``session_port``); ``raftfast.Client`` uses it where offered, gRPC's Session call elsewhere.

Wire: records ``[u32 big-endian length][protobuf]``, as on the replication stream. The client
writes a ``SessionHello`` (the cluster it expects: the gRPC call's ``cluster-id`` metadata),
then ``SessionFrame``s; the node writes ``SessionResult``s, run by the very code that serves
the gRPC call (``KVService.Session``: the same checks, limits and per-op errors). A result
with ``frame_id`` 0 ends the stream with its ``code`` and ``error``, as the gRPC call would
have ended (a wrong cluster, no role to read, too many streams, a record too big or not a
frame: INVALID_ARGUMENT, the first frame the client has no answer to; 0 once a client that
half-closed has all its answers); then the node closes.

What a stranger can make a node hold: a connection says hello within ``HANDSHAKE_S`` in at
most ``HELLO_BYTES``; a record is at most ``--max-request-bytes`` plus a little (the gRPC
port's own limit); at most ``MAX_CONNECTIONS`` connections are open; a connection that stops
in the middle of a record for ``STALL_S`` is dropped; frames read ahead of the service are
few (``_READ_AHEAD``: past it, reading pauses and TCP holds the client back); over every
connection, unfinished records are at most ``MAX_HELD_BYTES`` (or four records of the largest
size, if more; past it, a connection that adds one is dropped, as on the replication stream)
and so are frames read ahead (past it, a connection that reads one ahead pauses until the
service takes it): 1,000 connections each holding all but the last byte of a 1.6 MB record
took a node to 2.4 GB, kept after they closed; the KV service's
limits on streams, frames under way and their bytes apply as on gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from typing import cast

import grpc
from google.protobuf.message import DecodeError

from raftfast.proto import raftfast_pb2 as pb
from raftfast.security.roles import SESSION_WHAT, Authorizer, Role
from raftfast.security.tls import TLSFiles
from raftfast.server.kv_service import MAX_SESSIONS, KVService, TooManyOps
from raftfast.server.log_counts import CountedWarning
from raftfast.transport import tcp

log = logging.getLogger("raftfast.session")

HELLO_BYTES = 4096  # the largest record before the hello
HANDSHAKE_S = tcp.HANDSHAKE_S  # to connect (TLS included) and say hello
STALL_S = tcp.STALL_S  # a client may pause this long in the middle of a record
MAX_CONNECTIONS = MAX_SESSIONS + 64  # (the last ones hear "too many streams", not a reset)
_FRAME_SLACK = 64 * 1024  # a frame's own fields beyond --max-request-bytes (gRPC allows 512K)
_READ_AHEAD = 64  # frames parsed and not yet taken by the service: past it, reading pauses
MAX_HELD_BYTES = tcp.MAX_PARTIAL_BYTES  # unfinished records, and frames read ahead, all streams
_DROPS_LOGGED_EVERY_S = 10.0  # (a flood's drops are logged as a count, not a line each)
SILENT_MAKES_WAY_S = 0.5  # a connection without a hello this long may be dropped for another
_LINGER_S = 2.0  # a refused client gets this long to read why before the connection goes
_OK = grpc.StatusCode.OK.value[0]
_INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
_RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
_PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]


class Ended(Exception):
    """The stream ends with a status (``code``, a grpc.StatusCode value)."""

    def __init__(self, code: int, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class StreamContext:
    """What ``KVService.Session`` reads of a ``grpc.aio.ServicerContext``, for a stream over
    TCP: the hello's cluster id as metadata, the certificate's name as auth data, no deadline
    (a stream has none; each op's deadline is the client's), and ``abort`` ending the stream."""

    def __init__(
        self,
        cluster_id: str,
        caller: str | None,
        send_now: Callable[[pb.SessionResult], bool] | None = None,
    ) -> None:
        self._metadata = (("cluster-id", cluster_id),) if cluster_id else ()
        self._auth = {"x509_common_name": [caller.encode()]} if caller is not None else {}
        # Write an answer at once, bypassing the stream's writer (False: it could not).
        self.send_now = send_now
        # Set by the service while it reads the stream: hand it a frame (its size, its bytes)
        # as it arrives, when no frame is queued before it (the caller's rule; the service's
        # own: none in hand, no budget would wait); False: it did not take it (queue it).
        self.take_frame: Callable[[int, bytes], bool] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def time_remaining(self) -> float | None:
        return None

    def set_trailing_metadata(self, metadata: object) -> None:
        pass  # (a leader hint travels in each op's result)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise Ended(code.value[0], details)

    @staticmethod
    def frame_refusal(frame: pb.SessionFrame | TooManyOps) -> str | None:
        """Why the service must end the stream at ``frame`` (its answer would end it)."""
        return None if frame.frame_id else "frame_id 0 is the stream's own; start at 1"


class _Connection(asyncio.BufferedProtocol):
    """One client's stream: records in, frames to the service, results out."""

    def __init__(self, server: SessionServer) -> None:
        self.server = server
        self.records = tcp._Records()
        self.records.limit = HELLO_BYTES
        self.transport: asyncio.Transport | None = None
        self.caller: str | None = None  # the TLS certificate's common name
        self.frames: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None  # serving, once the hello is in
        self.context: StreamContext | None = None  # (once the hello is in)
        self.queued_bytes = 0  # of the frames in ``frames``
        # Input is over (EOF, or a record we refuse: then the status to end with, once the
        # frames taken before it are answered); what else arrives is read and dropped.
        self.input_over = False
        self.failure: tuple[int, str] | None = None
        self.ended = False  # the end status is written
        self.reading = True
        self.writable = asyncio.Event()
        self.writable.set()
        self.opened = self.progress = 0.0  # loop times: connected, last record or none partial
        # bytes of unfinished records and of frames read ahead, as the server counts them
        self.counted = self.counted_ahead = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.opened = self.progress = asyncio.get_running_loop().time()
        server = self.server
        if len(server.connections) >= MAX_CONNECTIONS and not server.drop_a_silent_one():
            server.note_refused()
            self.transport.abort()
            return
        tcp.tune(transport)
        self.caller = tcp.common_name(transport.get_extra_info("peercert"))
        server.connections[self.transport] = self
        server.silent[self.transport] = self  # (until its hello)
        if server.authorizer is not None:  # (read to open, as the gRPC call's interceptor)
            # (the certificate says it all: one with no role to read is told now, not left
            # to hold a connection of the port's until its hello is overdue; a hunt's 1,200
            # such connections, reopened as they were dropped, kept clients out)
            context = StreamContext("", self.caller, self._send_now)
            why = server.authorizer.refusal(context, Role.READ, SESSION_WHAT)  # type: ignore[arg-type]
            if why is not None:
                self.end(_PERMISSION_DENIED, why)  # (still silent: first to make way)

    def _spoke(self) -> None:
        """No longer a connection that has said nothing (a hello, a refusal, or gone)."""
        self.server.silent.pop(self.transport, None)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.pop(self.transport, None)  # type: ignore[arg-type]
        self._spoke()
        self.let_go()
        self.writable.set()
        if self.task is not None:
            self.task.cancel()  # (as a cancelled gRPC call: its frames' waits end)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.records.get_buffer()

    def _recount(self) -> None:
        """Tell the server what this connection holds now: its unfinished record and the
        frames it read ahead."""
        held, ahead = self.records.held, self.queued_bytes
        if (held != self.counted or ahead != self.counted_ahead) and not self.closed:
            self.server.hold(held - self.counted, ahead - self.counted_ahead)
            self.counted, self.counted_ahead = held, ahead

    def _drop_read_ahead(self) -> None:
        """Frames read ahead that will never be served go (the stream is over)."""
        while not self.frames.empty():
            self.frames.get_nowait()
        self.queued_bytes = 0

    def let_go(self) -> None:
        """The connection is over (or being dropped): what it held goes now, not when a
        reference cycle through its task is collected, and the server stops counting it."""
        if self.closed:
            return
        self.closed = True
        self.server.hold(-self.counted, -self.counted_ahead)
        self.counted = self.counted_ahead = 0
        self.records.release()
        self._drop_read_ahead()

    def buffer_updated(self, nbytes: int) -> None:
        if self.input_over:
            self.records.clear()  # (read and dropped: closing with unread data sends a reset)
            self._recount()
            return
        try:
            completed = False
            for payload in self.records.updated(nbytes):
                completed = True
                if self.task is None:
                    self._hello(payload)
                    continue
                # Held as bytes, parsed by the service once its budgets have room for what
                # parsing makes of it (up to ~60 times its bytes: PARSED_OP_BYTES an op):
                # here and now if it has room and none is queued before it.
                raw = bytes(payload)
                take = self.context.take_frame if self.context is not None else None
                if take is not None and self.frames.empty() and take(len(raw), raw):
                    continue
                self.frames.put_nowait(raw)
                self.queued_bytes += len(raw)
            if completed or not self.records.partial:
                self.progress = asyncio.get_running_loop().time()
        except tcp.Refused as exc:
            # A frame too big is the request's fault, as over gRPC (an op over the limit is
            # INVALID_ARGUMENT there): the client fails that frame instead of sending it again.
            if self.task is None:
                self._stop_input((_RESOURCE_EXHAUSTED, f"{exc.details} for a hello"))
            else:
                self._stop_input((_INVALID_ARGUMENT, f"{exc.details} for --max-request-bytes"))
            return
        except Ended as exc:
            self._stop_input((exc.code, exc.details))
            return
        self._recount()
        server = self.server
        bound = server.max_held_bytes()
        if server.held_bytes > bound and self.records.partial:
            server.dropped_for_held(self)
            return
        # Read ahead a little, counted in frames and in bytes (a stranger's frames are not in
        # the service's budget until it takes them), and not past the bound over every stream:
        # past it, TCP holds the client back until the service takes what it read ahead.
        full = (
            self.frames.qsize() >= _READ_AHEAD
            or self.queued_bytes >= self.records.limit
            or (server.read_ahead_bytes > bound and self.queued_bytes > 0)
        )
        if full and self.reading and self.transport is not None:
            self.reading = False
            self.transport.pause_reading()

    def _stop_input(self, failure: tuple[int, str] | None) -> None:
        """No more frames: the frames taken are answered, then the stream ends (with
        ``failure``, else OK). Before the hello, at once."""
        if self.input_over:
            return
        self._spoke()
        self.input_over = True
        self.failure = failure
        self.records.clear()
        self._recount()
        if self.task is None:
            code, details = failure or (_OK, "")
            self.end(code, details)
        else:
            self.frames.put_nowait(None)
        if not self.reading and self.transport is not None and not self.transport.is_closing():
            self.reading = True  # (read and drop: a reset could overtake the answers)
            self.transport.resume_reading()

    def _hello(self, payload: memoryview) -> None:
        self._spoke()
        try:
            hello = pb.SessionHello.FromString(payload)
        except DecodeError as exc:
            raise Ended(_INVALID_ARGUMENT, f"not a SessionHello: {exc}") from None
        # (its role was checked as it connected: read to open, as the gRPC call's interceptor)
        context = self.context = StreamContext(hello.cluster_id, self.caller, self._send_now)
        self.records.limit = self.server.max_record_bytes()
        self.task = asyncio.create_task(self._serve(context), name="raftfast-session")

    async def _frames(self) -> AsyncIterator[tuple[int, bytes | pb.SessionFrame]]:
        frames = self.frames
        parsed_here = not isinstance(self.server.service, KVService)  # (the noop server's)
        while True:
            raw = await frames.get()
            if raw is None:
                return
            self.queued_bytes -= len(raw)
            self._recount()
            low = frames.qsize() < _READ_AHEAD // 2 and self.queued_bytes < self.records.limit // 2
            if not self.reading and low and not self.input_over:
                self.reading = True
                if self.transport is not None and not self.transport.is_closing():
                    self.transport.resume_reading()
            # (KVService parses it, once its budgets have room for what parsing makes of it)
            yield len(raw), pb.SessionFrame.FromString(raw) if parsed_here else raw

    def _send_now(self, result: pb.SessionResult) -> bool:
        """Write ``result`` now, from the callback that built it, unless the writer would hold
        it (the client does not read) or the stream is over: a turn of the loop less an
        answer, ~0.08 ms of a put under 8 clients x 1."""
        transport = self.transport
        if self.ended or transport is None or transport.is_closing() or not self.writable.is_set():
            return False
        transport.write(tcp.record(result.SerializeToString()))
        return True

    async def _serve(self, context: StreamContext) -> None:
        transport = self.transport
        assert transport is not None
        results = self.server.service.Session(self._frames(), context)  # type: ignore[arg-type]
        try:
            async for result in results:
                if self.ended or transport.is_closing():
                    break
                transport.write(tcp.record(result.SerializeToString()))
                if not self.writable.is_set():
                    await self.writable.wait()  # (the client does not read: hold the results)
            code, details = self.failure or (_OK, "")
            self.end(code, details)  # (every frame taken is answered)
        except Ended as exc:
            self.end(exc.code, exc.details)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a stream must never take the node down
            log.exception("Session stream failed")
            self.end(grpc.StatusCode.INTERNAL.value[0], f"session failed: {exc!r}")
        finally:
            await results.aclose()  # (the service's own cleanup: its count of streams)

    def eof_received(self) -> bool:
        """The client is done: answer what it sent, then end (a record cut off by the end is
        refused). Over TLS, which cannot half-close, the connection simply ends."""
        if self.server.ssl is not None:
            return False
        if self.records.partial:
            self._stop_input((_INVALID_ARGUMENT, "the stream ended inside a record"))
        else:
            self._stop_input(None)
        return True  # (keep our side open for the answers)

    def end(self, code: int, details: str) -> None:
        """Write the status that ends the stream (once) and close: half-close and linger
        where TCP can, so that the status is read before the connection goes."""
        transport = self.transport
        if self.ended or transport is None or transport.is_closing():
            return
        self.ended = self.input_over = True
        self.records.clear()
        self._drop_read_ahead()
        self._recount()
        result = pb.SessionResult(frame_id=0, code=code, error=details)
        transport.write(tcp.record(result.SerializeToString()))
        if not self.reading:
            self.reading = True
            transport.resume_reading()
        if not transport.can_write_eof():
            transport.close()  # (TLS: after the status is out, if the client reads it)
            asyncio.get_running_loop().call_later(_LINGER_S, transport.abort)
            return
        try:
            transport.write_eof()
        except OSError:  # (the client is gone already)
            transport.abort()
            return
        asyncio.get_running_loop().call_later(_LINGER_S, transport.abort)

    def overdue(self, now: float) -> str | None:
        """Why this connection should be dropped now, or None."""
        if self.task is None and not self.input_over and now - self.opened > HANDSHAKE_S:
            return f"no hello within {HANDSHAKE_S:g}s"
        if self.records.partial and now - self.progress > STALL_S:
            return f"a record unfinished for {STALL_S:g}s"
        if not self.records.partial:
            self.records.shrink()
        return None


class SessionServer(tcp.RecordListener):
    """The Session streams over TCP of one node's KV ``service``."""

    what = "Session stream"
    max_connections = MAX_CONNECTIONS

    def __init__(
        self,
        service: KVService,
        authorizer: Authorizer | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(ssl_context)
        self.service = service
        self.authorizer = authorizer
        # the connections that have not said hello yet, oldest first
        self.silent: dict[asyncio.Transport, _Connection] = {}
        every = _DROPS_LOGGED_EVERY_S  # (a flood's drops are logged as a count, not a line each)
        self._held_drops = CountedWarning(
            log, "dropped %d Session stream(s): %d bytes of unfinished records held, over %d", every
        )
        self._refusals = CountedWarning(
            log, "refused %d Session stream(s): %d connections open, none silent a while", every
        )
        self._made_way = CountedWarning(
            log, "dropped %d Session stream(s) silent for %gs or more, to let newcomers in", every
        )

    def protocol(self) -> _Connection:
        return _Connection(self)

    def _room(self) -> int:
        # (a connection that has said nothing yet makes way for a new one: drop_a_silent_one)
        return self.max_connections - len(self.connections) + len(self.silent)

    def drop_a_silent_one(self) -> bool:
        """Make room for a new connection: drop the oldest that has not said hello yet, if it
        has been silent ``SILENT_MAKES_WAY_S`` (a client says it at once; one whose hello is
        on its way, not read yet, is not dropped). False if none: the newcomer is refused."""
        oldest = next(iter(self.silent.items()), None)  # (the others are younger still)
        if oldest is None:
            return False
        transport, connection = oldest
        if asyncio.get_running_loop().time() - connection.opened < SILENT_MAKES_WAY_S:
            return False
        del self.silent[transport]
        self.connections.pop(transport, None)
        connection.let_go()
        transport.abort()
        self._made_way.note(SILENT_MAKES_WAY_S)
        return True

    def note_refused(self) -> None:
        """A connection refused with the port full."""
        self._refusals.note(MAX_CONNECTIONS)

    def max_record_bytes(self) -> int:
        return self.service.node.settings.max_request_bytes + _FRAME_SLACK

    def max_held_bytes(self) -> int:
        """The bound on unfinished records over every connection, and the same on frames
        read ahead (a few records of the largest size at least, whatever
        --max-request-bytes says)."""
        return max(MAX_HELD_BYTES, 4 * self.max_record_bytes())

    def dropped_for_held(self, connection: _Connection) -> None:
        """Drop a connection that added an unfinished record past ``max_held_bytes`` (its
        client reconnects and sends again: a write carries its id, applied once). It stops
        counting at once: the others read in this turn of the loop are not dropped for it."""
        connection.let_go()
        if connection.transport is not None:
            connection.transport.abort()
        self._held_drops.note(self.held_bytes, self.max_held_bytes())


def server_context(files: TLSFiles, client_cert_auth: bool) -> ssl.SSLContext:
    """TLS for the stream as for the client port: our certificate; the client's checked
    against ``files.ca_file`` with ``client_cert_auth``."""
    if files.cert_file is None or files.key_file is None:
        raise ValueError("a TLS server needs a certificate and its key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(files.cert_file, files.key_file)
    if client_cert_auth:
        if files.ca_file is None:
            raise ValueError("checking client certificates needs the CA that signs them")
        ctx.load_verify_locations(cafile=files.ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
