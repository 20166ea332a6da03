"""The pipelined Session stream: queued ``put``/``get``/``delete``/``cas`` calls travel in
``SessionFrame``s on one bidirectional stream to the leader, matched to their results by frame
id; a failed stream is replaced and what was in flight on it retried (writes with their
sequences). ``SessionMixin`` is a part of ``Client`` (client.py): it uses the client's queues,
window, stubs and backoff.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Iterable
from typing import Any

import grpc

from raftfast.address import is_address, split_address
from raftfast.client.calls import (
    CODE_INVALID_ARGUMENT,
    CODE_NAMES,
    CODE_OK,
    CODE_PERMISSION_DENIED,
    CODE_RESOURCE_EXHAUSTED,
    CODE_UNAVAILABLE,
    GET,
    NOSPACE,
    PUT,
    PUT_MANY,
    RETRY_LATER_CODES,
    leader_hint,
    not_raftfast,
    one_line,
)
from raftfast.client.session_tcp import TcpSessionCall
from raftfast.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    NoSpaceError,
    PermissionDeniedError,
    RaftfastError,
    RequestFailedError,
)
from raftfast.proto import raftfast_pb2 as pb
from raftfast.transport.codec import nested_pieces

log = logging.getLogger("raftfast.client")


class Op:
    """One queued operation; ``sequence`` is assigned when a write is first sent."""

    __slots__ = (
        "kind",
        "key",
        "value",
        "expected",
        "expect_absent",
        "read_mode",
        "sequence",
        "fut",
        "stream",
        "sent_at",
        "attempts",
    )

    def __init__(
        self,
        kind: int,
        key: bytes,
        value: bytes = b"",
        expected: bytes = b"",
        expect_absent: bool = False,
        read_mode: int = 0,
    ) -> None:
        self.kind = kind
        self.key = key
        self.value = value
        self.expected = expected
        self.expect_absent = expect_absent
        self.read_mode = read_mode
        self.sequence = 0
        self.fut: asyncio.Future[Any] | None = None
        self.stream: Stream | None = None
        self.sent_at = 0.0
        self.attempts = 0


class Sequenced:
    """A write outside the Session stream (``propose``, a unary call) holding its sequence in
    the window of unresolved ones, as a queued write does (``_window_open``) until ``fut``
    is done."""

    __slots__ = ("sequence", "fut")

    def __init__(self, sequence: int, fut: asyncio.Future[None]) -> None:
        self.sequence = sequence
        self.fut = fut


class Stream:
    """One Session stream to one node and the frames in flight on it."""

    __slots__ = ("target", "call", "inflight", "got_result", "last_result", "restart", "reason")

    def __init__(self, target: str, call: Any) -> None:
        self.target = target
        self.call = call
        self.inflight: dict[int, list[Op]] = {}
        self.got_result = False  # any successful op result on this stream
        self.last_result = asyncio.get_running_loop().time()  # (opened: nothing yet)
        self.restart = asyncio.Event()
        self.reason: tuple[str, str, str] | None = None  # (kind, detail, leader hint)

    def request_restart(self, kind: str, detail: str, hint: str = "") -> None:
        if self.reason is None:
            self.reason = (kind, detail, hint)
            self.restart.set()


SESSION_TRANSPORTS = ("auto", "grpc")  # the node's TCP stream where offered / gRPC only
_NO_TCP_S = 10.0  # after a node's Session port could not be reached: gRPC there, this long
_SILENT_AFTER_S = 1.0  # a stream that answered nothing this long to a call that expired: dead
_STATUS_TIMEOUT_S = 2.0  # asking a node where its Session port is
# Connecting (TLS included) to a node's Session port: one that does not answer by then is
# taken to be behind a firewall that drops what is not for its gRPC port (a call's whole
# deadline must not go on it).
_CONNECT_S = 1.0
_SPLICE_BYTES = 64 * 1024  # an op value this big is spliced in (serialize_frame)
_FRAME_OPS = 3  # pb.SessionFrame.ops
_OP_VALUE = 3  # pb.Op.value


def serialize_frame(item: tuple[pb.SessionFrame, dict[int, bytes]]) -> bytes:
    """A ``SessionFrame`` whose big op values were left out, with them (op index -> value)
    spliced in (``nested_pieces``): protobuf's serializer copying put_many's packed pairs was
    a fifth of the load generator's CPU (py-spy)."""
    frame, big = item
    if not big:
        return frame.SerializeToString()
    pieces = [
        pb.SessionFrame(frame_id=frame.frame_id, client_id=frame.client_id).SerializeToString()
    ]
    for i, op in enumerate(frame.ops):
        pieces += nested_pieces(_FRAME_OPS, op.SerializeToString(), _OP_VALUE, big.get(i, b""))
    return b"".join(pieces)


def op_result_value(kind: int, result: Any) -> Any:
    """What a call returns for an op the node did (``result``: its OpResult, code OK)."""
    if kind == PUT or kind == PUT_MANY:
        return None
    if kind == GET:
        return result.value if result.ok else None
    return result.ok


def is_retried_later(code: int, error: str) -> bool:
    """An op refused for now (busy, its deadline on the node passed): sent again after a
    backoff. NOSPACE is not: the cluster is full until an operator frees space."""
    return code in RETRY_LATER_CODES and not (
        code == CODE_RESOURCE_EXHAUSTED and error.startswith(NOSPACE)
    )


def op_error(code: int, error: str, target: str) -> RaftfastError:
    """The error a call raises for an op the node refused for good (not UNAVAILABLE, not
    ``is_retried_later``)."""
    if code == CODE_RESOURCE_EXHAUSTED and error.startswith(NOSPACE):
        return NoSpaceError(f"{target}: {one_line(error)}")
    if code == CODE_INVALID_ARGUMENT:
        return InvalidArgumentError(one_line(error or "invalid argument"))
    if code == CODE_PERMISSION_DENIED:
        return PermissionDeniedError(f"{target}: {one_line(error)}")
    name = CODE_NAMES.get(code, str(code))
    return RequestFailedError(f"{target}: {one_line(error or name)}", name)


def frame_bytes(ops: Iterable[Op]) -> int:
    """What a frame of ``ops`` counts against ``max_frame_bytes`` (the write loop's measure)."""
    return sum(len(op.key) + len(op.value) + len(op.expected) + 16 for op in ops)


async def _refused_frame(call: Any, unanswered: list[list[Op]]) -> int | None:
    """Which of the unanswered frames (in the order sent) ended the stream by being too big
    for the node, or None. Over TCP the node ends the stream with INVALID_ARGUMENT at such a
    frame, having answered every frame before it and read none after: the first. Over gRPC,
    gRPC itself ends the stream with RESOURCE_EXHAUSTED at a message above the node's limit
    (its words: "Received message larger than max"), answers of earlier frames may be lost
    with it: the biggest."""
    if not unanswered or not call.done():
        return None
    code = await call.code()
    if isinstance(call, TcpSessionCall):
        return 0 if code == grpc.StatusCode.INVALID_ARGUMENT else None
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (
        await call.details() or ""
    ):
        sizes = [frame_bytes(ops) for ops in unanswered]
        return sizes.index(max(sizes))
    return None


class SessionStub:
    """KV's Session method with ``serialize_frame`` (the generated stub's serializer takes
    a whole SessionFrame)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.Session = channel.stream_stream(
            "/raftfast.v1.KV/Session",
            request_serializer=serialize_frame,
            response_deserializer=pb.SessionResult.FromString,
        )


class SessionMixin:
    """The Session stream of a ``Client``."""

    def _wake_writer(self) -> None:
        assert self._wake is not None
        self._wake.set()

    def _submit_one(self, op: Op, timeout: float | None) -> asyncio.Future[Any]:
        """Queue ``op``; its future is its result. (A plain function: a coroutine more per
        call, started and resumed, was a tenth of the client's CPU at 1x256.)"""
        loop = self._ensure_started()
        total = self._call_timeout(timeout)
        op.fut = fut = loop.create_future()
        self._pending.append(op)
        if not self._write_now():
            self._wake_writer()
        self._deadlines.add(op, total)
        return fut

    def _expire(self, ops: Iterable[Op], total: float) -> None:
        """Deadline of a call: fail its unfinished ops; a silent stream is restarted."""
        stream = self._stream
        for op in ops:
            fut = op.fut
            if fut is None or fut.done():
                continue
            sent_on = op.stream
            reached = sent_on is not None and sent_on.got_result
            fut.set_exception(
                self._timeout_error(
                    total, self._last_error, reached, "leader", sent_on.target if sent_on else None
                )
            )
            if (
                sent_on is not None
                and sent_on is stream
                and sent_on.last_result < op.sent_at
                and self._loop is not None
                and self._loop.time() - sent_on.last_result >= _SILENT_AFTER_S
            ):
                # Nothing came back on this stream since the op was sent, nor for a while: it
                # looks dead. (Not sooner: one caller's 1 ms deadlines restarted the stream
                # every other caller shares, p99 1.7 -> 193 ms.)
                sent_on.request_restart(
                    "silent", f"no answer from {sent_on.target} within {total:g}s"
                )
        if self._writer_blocked:
            self._wake_writer()

    def _fail_pending(self, err: Exception) -> None:
        """Fail every queued call with ``err``."""
        pending, self._pending = self._pending, deque()
        for op in pending:
            if op.fut is not None and not op.fut.done():
                op.fut.set_exception(err)

    def _requeue(self, ops: list[Op], front: bool = True) -> None:
        live = [op for op in ops if op.fut is not None and not op.fut.done()]
        if not live:
            return
        if self._closed:  # (in flight when the client closed: they end now, not at deadline)
            err = RaftfastError("client is closed")
            for op in live:
                op.fut.set_exception(err)  # type: ignore[union-attr]
            return
        if front:
            self._pending.extendleft(reversed(live))
        else:
            self._pending.extend(live)
        self._wake_writer()

    def _smaller_frames(self, ops: list[Op]) -> None:
        """The node refused a frame of several ops as too big (its --max-request-bytes is
        below our max_frame_bytes): from now on frames of at most half that size. The ops
        go again (a refused frame runs none of them); halving each time, they end up one to a
        frame, where an op too big for the node fails alone."""
        self._max_bytes = max(1, min(self._max_bytes, frame_bytes(ops) // 2))

    def _window_open(self) -> bool:
        out = self._outstanding
        self._drop_finished()
        return not out or self._seq + 1 - out[0].sequence < self._max_outstanding

    def _drop_finished(self) -> None:
        """Forget the finished writes at the head of the window (and their values)."""
        out = self._outstanding
        while out and out[0].fut is not None and out[0].fut.done():
            out.popleft()

    async def _take_sequence(self, total: float) -> Sequenced:
        """The next write sequence for a unary write, once the window has room for it (as a
        queued write waits in _next_frame): a node refuses a sequence DEDUP_WINDOW behind a
        newer one of the same client as a late duplicate, not applied (10,000 proposals at
        once from one client: a quarter refused so, some of them applied). The wait counts
        against the call's ``total`` seconds, started now. ``_release`` it when the call ends."""
        loop = self._ensure_started()
        if self._window_lock is None:
            self._window_lock = asyncio.Lock()
        try:
            async with asyncio.timeout(total):
                # One waits for the oldest write at a time, the others for their turn (all
                # woken by each finished write: 20,000 at once took 190 us of CPU each).
                async with self._window_lock:
                    while not self._window_open():
                        # (the oldest unresolved write: waited on, never cancelled from here)
                        await asyncio.wait([self._outstanding[0].fut])
                    return self._new_slot(loop)
        except TimeoutError:
            raise DeadlineExceededError(
                f"deadline of {total:g}s exceeded waiting for one of this client's "
                f"{self._max_outstanding} unresolved writes to finish"
            ) from None

    def _new_slot(self, loop: asyncio.AbstractEventLoop) -> Sequenced:
        self._seq += 1
        slot = Sequenced(self._seq, loop.create_future())
        self._outstanding.append(slot)
        return slot

    def _release(self, slot: Sequenced) -> None:
        if not slot.fut.done():
            slot.fut.set_result(None)
        self._drop_finished()
        if self._writer_blocked:
            self._wake_writer()

    async def _session_loop(self) -> None:
        """``_session_rounds``, started again after a failure it did not expect (logged; the
        calls waiting fail with it): one must not leave every later call to its deadline."""
        while True:
            try:
                await self._session_rounds()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the client goes on
                log.exception("the client's session failed")
                self._fail_pending(RaftfastError(f"the client's session failed: {exc!r}"))
                await asyncio.sleep(self._backoff(0))

    async def _session_rounds(self) -> None:
        """Keep one Session stream to the leader while there is work; redirect and retry."""
        assert self._wake is not None
        wake = self._wake
        failures = 0
        redirects = 0
        while True:
            while not self._pending:
                wake.clear()
                await wake.wait()
            target = self._leader or self._endpoints[self._rr % len(self._endpoints)]
            call = await self._open_session(target)
            stream = Stream(target, call)
            if isinstance(call, TcpSessionCall):
                call.on_result = functools.partial(self._on_result, stream)
            self._stream = stream
            writer = asyncio.create_task(self._write_loop(stream))
            reader = asyncio.create_task(self._read_loop(stream))
            restart = asyncio.create_task(stream.restart.wait())
            try:
                await asyncio.wait((writer, reader, restart), return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._stream = None
                self._writer_blocked = False
                for task in (writer, reader, restart):
                    task.cancel()
                call.cancel()
                await asyncio.gather(writer, reader, restart, return_exceptions=True)
                unanswered = [stream.inflight[fid] for fid in sorted(stream.inflight)]
                stream.inflight.clear()
                refused = await _refused_frame(call, unanswered)
                if refused is not None:
                    ops = unanswered.pop(refused)
                    if len(ops) == 1:  # (an op over max_frame_bytes travels alone)
                        details = await call.details() or "too big for the node"
                        err = InvalidArgumentError(f"{target}: {one_line(details)}")
                        if ops[0].fut is not None and not ops[0].fut.done():
                            ops[0].fut.set_exception(err)
                    else:
                        self._smaller_frames(ops)
                        unanswered.insert(0, ops)
                self._requeue([op for ops in unanswered for op in ops])

            if stream.reason is not None:
                kind, detail, hint = stream.reason
            else:
                kind, hint = "failed", ""
                detail = "session stream ended"
                for task in (reader, writer):
                    if task.done() and not task.cancelled():
                        exc = task.exception()
                        if exc is not None:
                            detail = f"session failed: {exc!r}"
                        elif task.result() is not None:
                            detail, hint = task.result()
                        break
            if stream.got_result:
                failures = 0
            if isinstance(call, TcpSessionCall) and not call.answered:
                # (it never opened, or it closed before the node said a word: a node that
                # is full, or anything in the way that takes connections and drops them)
                self._tcp_unreachable(target, call.connect_failed == "timeout")
            code = await call.code() if call.done() else None
            if code == grpc.StatusCode.PERMISSION_DENIED:
                # Our certificate may not open a session there: retrying cannot help.
                self._fail_pending(
                    PermissionDeniedError(f"{target}: {one_line(await call.details() or '')}")
                )
                continue
            if code == grpc.StatusCode.UNIMPLEMENTED:
                details = one_line(await call.details() or "")
                error = RequestFailedError(not_raftfast(target, "Session", details), code.name)
                self._fail_pending(error)
                continue
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                # A node of another cluster (cluster_id): as a unary call there, at once.
                details = one_line(await call.details() or "")
                self._fail_pending(RequestFailedError(f"{target}: {details}", code.name))
                continue
            self._last_error = f"{target}: {one_line(detail)}"
            if hint and hint != target and redirects <= 2 * len(self._endpoints) + 2:
                self._leader = hint
                redirects += 1
                continue
            redirects = 0
            if kind == "backoff":
                self._leader = target
            else:
                if self._leader == target:
                    self._leader = None
                self._rr += 1
            if not self._pending:
                continue  # idle: reconnect when there is work again
            await asyncio.sleep(self._backoff(failures))
            failures += 1

    async def _open_session(self, target: str) -> Any:
        """A Session stream to ``target``: over TCP where it offers that, else the gRPC call."""
        port = await self._session_port(target)
        if not port:
            return self._stub(target, "session").Session(metadata=self._metadata)
        if self._tls is not None and self._ssl_context is None:
            self._ssl_context = self._tls.client_context()
        host = split_address(target)[0]
        return TcpSessionCall(
            host,
            port,
            self._hello,
            serialize_frame,
            min(self._timeout, _CONNECT_S),
            self._ssl_context,
            on_answer=lambda: self._tcp_failures.pop(target, None),
        )

    def _tcp_unreachable(self, target: str, timed_out: bool) -> None:
        """A Session port that failed us without a word is asked for again (the node may
        have restarted on another); twice in a row, or once silent (a firewall), the gRPC
        call there for _NO_TCP_S."""
        self._session_ports.pop(target, None)
        failures = 2 if timed_out else self._tcp_failures.get(target, (0, 0.0))[0] + 1
        self._tcp_failures[target] = (failures, self._loop.time())

    async def _session_port(self, target: str) -> int:
        """The port of ``target``'s Session stream over TCP (0: none, or not now)."""
        if self._session_transport == "grpc":
            return 0
        failures, last = self._tcp_failures.get(target, (0, 0.0))
        if failures >= 2:
            if self._loop.time() - last < _NO_TCP_S:
                return 0
            del self._tcp_failures[target]
        known = self._session_ports.get(target)
        if known is not None:
            return known
        try:
            port = await self._ask_session_port(target, min(self._timeout, _STATUS_TIMEOUT_S))
        except grpc.aio.AioRpcError:
            return 0  # (the gRPC call this time: it reports why the node cannot be used)
        self._session_ports[target] = port
        return port

    async def _ask_session_port(self, target: str, timeout: float) -> int:
        """Where ``target``'s Session stream over TCP is (0: nowhere), from its Status: one
        call, its ``AioRpcError`` if it fails."""
        status = await self._stub(target).Status(
            pb.StatusRequest(), timeout=timeout, metadata=self._metadata
        )
        port: int = status.session_port
        return port

    def _write_now(self) -> bool:
        """Write what is pending from the caller's own task, when nothing is in flight, the
        writer task sleeps for want of work and the stream can take a frame at once (over
        TCP): no hand-over to the writer task and back (one task step and a future less per
        call). False: wake it. (With frames in flight, calls wait for the writer and share a
        frame: written at once, 256 calls in flight went out one to a frame, 2.5x slower.)"""
        stream = self._stream
        if not self._writer_idle or stream is None or stream.reason is not None or stream.inflight:
            return False
        call = stream.call
        if not isinstance(call, TcpSessionCall) or not call.writable_now():
            return False
        item, blocked = self._next_frame(stream)
        if item is not None:
            call.write_now(item)
        return not blocked and not self._pending

    def _next_frame(
        self, stream: Stream
    ) -> tuple[tuple[pb.SessionFrame, dict[int, bytes]] | None, bool]:
        """The next frame of pending ops (taken from ``_pending``, in flight on ``stream``
        from now on) with its big values, or None; and whether ops wait for the window of
        unresolved write sequences."""
        pending = self._pending
        assert self._loop is not None
        max_ops = self._max_ops
        max_bytes = self._max_bytes  # (a refused frame lowers it: _smaller_frames)
        frame = pb.SessionFrame(frame_id=self._frame_id + 1, client_id=self._client_id)
        add = frame.ops.add
        big: dict[int, bytes] = {}  # spliced in by serialize_frame
        batch: list[Op] = []
        nbytes = 0
        blocked = False
        while pending and len(batch) < max_ops:
            op = pending[0]
            if op.fut is None or op.fut.done():
                pending.popleft()
                continue
            size = len(op.key) + len(op.value) + len(op.expected) + 16  # (frame_bytes, inline)
            if batch and nbytes + size > max_bytes:
                break
            if op.kind != GET and op.sequence == 0:
                if not self._window_open():
                    blocked = True
                    break
                self._seq += 1
                op.sequence = self._seq
                self._outstanding.append(op)
            pending.popleft()
            value = op.value
            if len(value) >= _SPLICE_BYTES:
                big[len(batch)] = value
                value = b""
            add(
                kind=op.kind,
                key=op.key,
                value=value,
                expected=op.expected,
                expect_absent=op.expect_absent,
                sequence=op.sequence,
                read_mode=op.read_mode,
            )
            batch.append(op)
            nbytes += size
        if not batch:
            return None, blocked
        self._frame_id += 1
        now = self._loop.time()
        for op in batch:
            op.stream = stream
            op.sent_at = now
        stream.inflight[self._frame_id] = batch
        return (frame, big), blocked

    async def _write_loop(self, stream: Stream) -> tuple[str, str] | None:
        assert self._wake is not None and self._loop is not None
        wake = self._wake
        pending = self._pending
        call = stream.call
        while True:
            while not pending:
                wake.clear()
                self._writer_idle = True  # (_write_now may write meanwhile)
                try:
                    await wake.wait()
                finally:
                    self._writer_idle = False
            if stream.reason is not None:
                return None  # this stream is being replaced: send nothing more on it
            item, blocked = self._next_frame(stream)
            if item is not None:
                try:
                    await call.write(item)
                except grpc.aio.AioRpcError as exc:
                    return self._stream_failure(exc.code(), exc.details(), exc.trailing_metadata())
                except asyncio.InvalidStateError:
                    return await self._call_failure(call)
            elif blocked:
                # Too many unresolved write sequences: wait until some finish.
                self._writer_blocked = True
                wake.clear()
                try:
                    await wake.wait()
                finally:
                    self._writer_blocked = False

    async def _read_loop(self, stream: Stream) -> tuple[str, str]:
        call = stream.call
        while True:
            try:
                result = await call.read()
            except grpc.aio.AioRpcError as exc:
                return self._stream_failure(exc.code(), exc.details(), exc.trailing_metadata())
            if result is grpc.aio.EOF:
                return await self._call_failure(call)
            self._on_result(stream, result)

    async def _call_failure(self, call: Any) -> tuple[str, str]:
        code = await call.code()
        details = await call.details()
        metadata = await call.trailing_metadata()
        if code == grpc.StatusCode.OK:
            return "the server closed the session stream", leader_hint(metadata)
        return self._stream_failure(code, details, metadata)

    @staticmethod
    def _stream_failure(code: Any, details: str | None, metadata: Any) -> tuple[str, str]:
        name = getattr(code, "name", str(code)).lower()
        return f"{name}: {one_line(details or '')}", leader_hint(metadata)

    def _on_result(self, stream: Stream, result: Any) -> None:
        ops = stream.inflight.pop(result.frame_id, None)
        if ops is None:
            return
        results = result.results
        if len(results) == 1 < len(ops) and results[0].code != CODE_OK:
            # The node refused the frame as a whole. INVALID_ARGUMENT: too big for it (none
            # of its ops is bad alone: each is checked on its own when it runs): smaller.
            if results[0].code == CODE_INVALID_ARGUMENT:
                self._smaller_frames(ops)
                self._requeue(ops)
                return
            results = [results[0]] * len(ops)
        unavailable: list[Op] = []
        later: list[Op] = []
        first_error = ""
        ok = False
        for i, op in enumerate(ops):
            fut = op.fut
            if fut is None or fut.done():
                continue
            if i >= len(results):  # a malformed answer: retry what it did not cover
                later.append(op)
                continue
            r = results[i]
            code = r.code
            if code == CODE_OK:
                ok = True
                fut.set_result(op_result_value(op.kind, r))
            elif code == CODE_UNAVAILABLE:
                unavailable.append(op)
                first_error = first_error or r.error or "unavailable"
            elif is_retried_later(code, r.error):
                later.append(op)
                first_error = first_error or r.error or CODE_NAMES.get(code, str(code))
            else:
                fut.set_exception(op_error(code, r.error, stream.target))
        if ok:
            stream.got_result = True
            stream.last_result = self._loop.time() if self._loop is not None else 0.0
            self._last_error = None
        if first_error:
            self._last_error = f"{stream.target}: {one_line(first_error)}"
        if unavailable:
            leader = result.leader if is_address(result.leader) else ""
            if leader and leader == stream.target:
                later.extend(unavailable)  # the leader itself is not ready: wait, same stream
            else:
                self._requeue(unavailable)
                kind = "redirect" if leader else "rotate"
                stream.request_restart(kind, first_error, leader)
        if later:
            delay = self._backoff(max(op.attempts for op in later))
            for op in later:
                op.attempts += 1
            assert self._loop is not None
            self._loop.call_later(delay, self._requeue, later)
        # (not only when the next write is sent: an idle client held up to a window of
        # finished writes' values, 47 MiB after a burst of 100 KB puts)
        self._drop_finished()
        if self._writer_blocked:
            self._wake_writer()
