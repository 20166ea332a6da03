"""The client-facing KV gRPC service (grpc.aio) on top of a running raftfast node.

Writes become commands (``raftfast.kv.commands``) proposed through ``node.propose``; reads wait for
``node.read_barrier`` and then read ``node.fsm`` directly. Errors map to gRPC status codes with a
message a human can act on:

* INVALID_ARGUMENT: empty or oversized key, oversized value or request (``--max-request-bytes``),
  client id or sequence out of range, bad scan limit, start key or read mode;
* UNAVAILABLE: this node is not the leader; trailing metadata ``leader-id`` and
  ``leader-address`` tell the client where to go (when a leader is known);
* DEADLINE_EXCEEDED: the call's deadline passed before the write committed / the read was safe;
* FAILED_PRECONDITION: the client sent ``cluster-id`` metadata naming another cluster;
* RESOURCE_EXHAUSTED: "NOSPACE: ..." past the quota (``raftfast.kv.quota``: deletes still go),
  or too many open Session streams (retry later);
* INTERNAL: anything unexpected (logged; the server keeps serving).

Scans are paged: an answer holds at most ``MAX_SCAN_LIMIT`` items and about ``MAX_SCAN_BYTES``,
and ``next_key`` says where the next page starts (the client follows it).

The Session stream pipelines: each SessionFrame is handled in its own task (one ``propose`` for
all its writes, then one ``read_barrier`` per distinct read mode for its reads, so reads in a
frame observe the frame's own writes), and results are written back as frames complete, not in
frame order; a frame of up to ``FAST_FRAME_OPS`` PUTs and DELETEs is proposed as it is read and
answered from a callback, with no task (``_writes_now``; frames are still proposed in the order
they came). Errors there are reported per op (``OpResult.code``), never by ending the stream.
What one client can make a node hold is bounded: a frame has at most ``MAX_FRAME_OPS`` ops and
``--max-request-bytes``; a stream has ``MAX_SESSION_INFLIGHT`` frames under way; the frames under
way on all streams together stay under ``MAX_SESSION_BYTES`` (a stream's reader waits, and gRPC's
flow control holds the client back); a stream's answers not yet sent stay under
``MAX_STREAM_BYTES``, and all streams' under ``MAX_UNSENT_BYTES`` (but for one small answer a
stream that holds none); at most ``MAX_SESSIONS`` streams are open.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine, Sequence
from functools import partial
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError

from raftfast._accel import batch_impl, check_packed
from raftfast.errors import NotLeaderError
from raftfast.kv.commands import (
    encode_cas,
    encode_delete,
    encode_put,
    encode_put_many,
)
from raftfast.kv.fsm import KVStateMachine
from raftfast.kv.quota import Quota
from raftfast.limits import MAX_CLIENT_ID, MAX_FRAME_OPS, MAX_SEQUENCE
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto import raftfast_pb2_grpc as pb_grpc
from raftfast.security.roles import Authorizer, Role
from raftfast.security.tls import caller_name
from raftfast.server.handlers import READS, WRITES, method_handler
from raftfast.server.services import (
    DEADLINE_READ,
    DEADLINE_WRITE,
    BadRequest,
    NoSpace,
    Service,
    rpc,
    status_of,
)
from raftfast.server.settings import NodeSettings

count_field = batch_impl.count_field

__all__ = [
    "MAX_FRAME_OPS",
    "MAX_SCAN_BYTES",
    "MAX_SCAN_LIMIT",
    "MAX_SESSION_BYTES",
    "MAX_SESSION_INFLIGHT",
    "MAX_SESSIONS",
    "MAX_UNSENT_BYTES",
    "KVService",
    "NodeLike",
    "add_kv_service",
]

log = logging.getLogger(__name__)

MAX_SCAN_LIMIT = 10_000  # items per Scan page; ScanRequest.limit 0 means this
# Bytes of keys and values per Scan page (at least one item): under gRPC's default 4 MiB
# receive limit, so that any gRPC client can read a page.
MAX_SCAN_BYTES = 2 * 1024 * 1024
MAX_SESSION_INFLIGHT = 256  # frames of one Session handled concurrently (backpressure beyond)
# A Session frame of at most this many PUTs and DELETEs is proposed as it is read, with no task
# of its own (KVService._writes_now); bigger frames share their task's cost among their ops.
FAST_FRAME_OPS = 256
MAX_SESSION_BYTES = 64 * 1024 * 1024  # Session frames under way, node-wide
MAX_SESSIONS = 1024  # open Session streams, node-wide
# Of them, what one client certificate (not an admin's) may hold with --auth-roles: a reader
# held all 1,024 with streams whose answers it never read, and kept every other client out.
SESSION_SHARE = MAX_SESSIONS // 4
# A full node ends the stream idle longest to open a new one, if it has been idle this long
# (1,024 streams that said nothing locked every other client out).
IDLE_SESSION_S = 5.0
MAX_ANSWER_BYTES = 2 * 1024 * 1024  # values in the answer to one frame (the first always)
MAX_STREAM_BYTES = 16 * 1024 * 1024  # one stream's frames under way and answers unsent
# Answers unsent on all streams together. Past it, a stream's next answer waits until there is
# room again, unless the stream holds no answer and this one is small (SMALL_ANSWER_BYTES): a
# client that reads its answers is still served while others do not read theirs. 1,024 streams
# of MAX_STREAM_BYTES each, never read, held 16 GiB.
MAX_UNSENT_BYTES = 256 * 1024 * 1024
SMALL_ANSWER_BYTES = 64 * 1024
# Bytes of values a loop turn copies into answers, node-wide (past it, the next turn).
TURN_ANSWER_BYTES = 2 * 1024 * 1024
# ... where each step of an op's own work (checked; a read looked up, answered: ~1 us each)
# counts as this many bytes, and a unary read (gRPC's share too) as that many: a turn does
# ~700-2,000 ops (~2-6 ms) or ~256 reads, and then the one that takes it over the budget (a
# frame of 10,000 ops: ~15 ms more). Frames of 10,000 GETs of absent keys had counted 0 and
# held a leader 0.8-2.4 s (elections).
TURN_OP_BYTES = 1024
TURN_CALL_BYTES = 8 * 1024
# What a parsed op (or an op's result) holds in memory beyond its bytes on the wire (upb's
# objects: ~100 bytes measured): a 20 KB frame of 10,000 empty ops is ~1 MB once parsed, and
# the budgets count that.
PARSED_OP_BYTES = 128
# What a frame under way costs besides its bytes: its task (~7.6 KB measured) and its share of
# the loop's turns (the frames a Ready completes all run before the loop polls again). The
# budgets count it, so a node has at most MAX_SESSION_BYTES / FRAME_BYTES (2,048) frames under
# way: counted by their bytes alone, 1,024 streams of 256 one-op frames (3.7 MB sent, never
# read) made 262,144 tasks, 2 GB, and a loop that answered nothing for 28 s (8 KiB a frame
# still let 8,192 at once hold it ~0.6-1.7 s at a time).
FRAME_BYTES = 32 * 1024

CODE_INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]  # 3
CODE_PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]  # 7
CODE_RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]  # 8
CODE_INTERNAL = grpc.StatusCode.INTERNAL.value[0]  # 13


class NodeLike(Protocol):
    """The part of the raftfast node this service uses (see raftfast/server/driver.py)."""

    id: str
    fsm: KVStateMachine
    settings: NodeSettings

    @property
    def is_leader(self) -> bool: ...

    async def propose(self, payloads: list[bytes]) -> list[bool | None]: ...

    # (optional) def submit(self, payloads: list[bytes]) -> asyncio.Future: ``propose``'s
    # future, for frames of up to FAST_FRAME_OPS writes (``KVService._writes_now``); without it
    # they take the general path.

    async def read_barrier(self, mode: str) -> None: ...

    def address_of(self, node_id: str) -> str | None: ...

    def status(self) -> pb.StatusResponse: ...


class KVService(Service, pb_grpc.KVServicer):
    """Serves the KV API of one node; stateless apart from the node it wraps."""

    def __init__(
        self, node: NodeLike, authorizer: Authorizer | None = None, quota: Quota | None = None
    ) -> None:
        super().__init__(node)
        self.authorizer = authorizer  # None: every client may write
        self._uses: set[_SessionUse] = set()  # Session streams open
        self._quota = quota or Quota(node)
        self._budget = _ByteBudget(MAX_SESSION_BYTES)
        self._unsent = _UnsentAnswers(MAX_UNSENT_BYTES)
        self._turn = _TurnBytes(TURN_ANSWER_BYTES)

    @property
    def sessions_open(self) -> int:
        return len(self._uses)

    @property
    def _sessions(self) -> int:
        return len(self._uses)

    def _counted_owner(self, context: grpc.aio.ServicerContext) -> str | None:
        """The client a Session stream counts for (its certificate's name), or None: no
        roles here, or an admin (never counted)."""
        if self.authorizer is None:
            return None
        name = caller_name(context)
        if name is None or self.authorizer.role_of_name(name) is Role.ADMIN:
            return None
        return name

    def _make_way(self, among: Collection[_SessionUse] | None = None) -> bool:
        """The node (or a client's share: ``among``, its streams) is full: the stream idle
        longest (for at least IDLE_SESSION_S, nothing under way) is ended (its client opens
        another when it has work), else False."""
        now = asyncio.get_running_loop().time()
        candidates = self._uses if among is None else among
        idle = [s for s in candidates if s.idle_since(now) >= IDLE_SESSION_S]
        if not idle:
            return False
        oldest = min(idle, key=lambda s: s.last)
        self._uses.discard(oldest)
        oldest.done.put_nowait(_EVICTED)
        return True

    # -- helpers --------------------------------------------------------------------------

    def _check_key(self, key: bytes, what: str = "key") -> None:
        if not key:
            raise BadRequest(f"{what} must not be empty")
        limit = self.node.settings.max_key_bytes
        if len(key) > limit:
            raise BadRequest(f"{what} is {len(key)} bytes; the limit is {limit}")

    def _check_value(self, value: bytes, what: str = "value") -> None:
        limit = self.node.settings.max_value_bytes
        if len(value) > limit:
            raise BadRequest(f"{what} is {len(value)} bytes; the limit is {limit}")

    def _space_refusal(self, nbytes: int) -> str | None:
        """Why the quota refuses a write that grows the state (the leader decides: a
        follower's proposal is redirected anyway)."""
        return self._quota.refusal(nbytes) if self.node.is_leader else None

    def _check_space(self, nbytes: int) -> None:
        why = self._space_refusal(nbytes)
        if why is not None:
            raise NoSpace(why)

    @staticmethod
    def _check_client_id(client_id: int) -> None:
        if client_id > MAX_CLIENT_ID:
            raise BadRequest(f"client_id {client_id} is out of range [0, {MAX_CLIENT_ID}]")

    @staticmethod
    def _check_sequence(sequence: int) -> None:
        if sequence > MAX_SEQUENCE:
            raise BadRequest(f"sequence {sequence} is out of range [0, {MAX_SEQUENCE}]")

    def _check_write(self, request: Any) -> None:
        """What every unary write checks first: its size and its exactly-once numbers."""
        self.check_size(request.ByteSize())
        self.check_client_id(request.client_id)
        self.check_sequence(request.sequence)

    def _put_many(self, client_id: int, op: pb.Op) -> bytes:
        """Validate a PUT_MANY op (every key and value within the limits) and encode it."""
        if op.key:
            raise BadRequest("PUT_MANY carries its keys in value; key must be empty")
        value = op.value  # (each read of a bytes field is a copy of it)
        try:
            pairs, longest_key, longest_value = check_packed(value)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        if not pairs:
            raise BadRequest("PUT_MANY needs at least one key")
        settings = self.node.settings
        if longest_key > settings.max_key_bytes:
            raise BadRequest(f"a key is {longest_key} bytes; the limit is {settings.max_key_bytes}")
        if longest_value > settings.max_value_bytes:
            raise BadRequest(
                f"a value is {longest_value} bytes; the limit is {settings.max_value_bytes}"
            )
        return encode_put_many(client_id, op.sequence, value)

    async def _write(self, context: grpc.aio.ServicerContext, payload: bytes) -> bool:
        results = await self.timed(context, self.node.propose([payload]), DEADLINE_WRITE)
        if len(results) != 1 or results[0] is None:
            raise RuntimeError(f"node returned {results!r} for one command")
        return bool(results[0])

    # -- unary RPCs -----------------------------------------------------------------------

    @rpc
    async def Put(
        self, request: pb.PutRequest, context: grpc.aio.ServicerContext
    ) -> pb.PutResponse:
        """Set a key. ``index`` is an applied index at or after the write (read-your-write)."""
        self._check_write(request)
        key, value = request.key, request.value  # (each read of a bytes field is a copy)
        self._check_key(key)
        self._check_value(value)
        self._check_space(request.ByteSize())
        client_id = self.own_client_id(request.client_id, context)
        payload = encode_put(client_id, request.sequence, key, value)
        await self._write(context, payload)
        return pb.PutResponse(index=self.node.fsm.applied_index)

    @rpc
    async def Get(
        self, request: pb.GetRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetResponse:
        self._check_key(request.key)
        mode = self.read_mode(request.read_mode)
        await self.timed(context, self.node.read_barrier(mode), DEADLINE_READ)
        await self._turn.room()
        value = self.node.fsm.get(request.key)
        self._turn.add(TURN_CALL_BYTES + 3 * _value_size(value))
        if value is None:
            return pb.GetResponse(found=False)
        return pb.GetResponse(found=True, value=value)

    @rpc
    async def Delete(
        self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteResponse:
        self._check_write(request)
        self._check_key(request.key)
        client_id = self.own_client_id(request.client_id, context)
        payload = encode_delete(client_id, request.sequence, request.key)
        return pb.DeleteResponse(deleted=await self._write(context, payload))

    @rpc
    async def CompareAndSwap(
        self, request: pb.CasRequest, context: grpc.aio.ServicerContext
    ) -> pb.CasResponse:
        self._check_write(request)
        self._check_key(request.key)
        self._check_value(request.value)
        self._check_value(request.expected, "expected value")
        if request.expect_absent and request.expected:
            raise BadRequest("expect_absent is set, so expected must be empty")
        self._check_space(request.ByteSize())
        expected = None if request.expect_absent else request.expected
        payload = encode_cas(
            self.own_client_id(request.client_id, context),
            request.sequence,
            request.key,
            expected,
            request.value,
        )
        return pb.CasResponse(swapped=await self._write(context, payload))

    @rpc
    async def Scan(
        self, request: pb.ScanRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScanResponse:
        """One page of the keys under ``prefix`` (see the module docs)."""
        limit = self.node.settings.max_key_bytes
        if len(request.prefix) > limit:
            raise BadRequest(f"prefix is {len(request.prefix)} bytes; the limit is {limit}")
        if request.start and (
            len(request.start) > limit or not request.start.startswith(request.prefix)
        ):
            raise BadRequest("start must be a key under prefix (a previous answer's next_key)")
        if request.limit > MAX_SCAN_LIMIT:
            raise BadRequest(
                f"scan limit {request.limit} is above the maximum {MAX_SCAN_LIMIT}"
                " (0 means the maximum)"
            )
        mode = self.read_mode(request.read_mode)
        await self.timed(context, self.node.read_barrier(mode), DEADLINE_READ)
        # (64 full pages released by one read barrier were built in one turn: 0.3-0.5 s)
        await self._turn.room()
        items, next_key = self.node.fsm.scan_page(
            request.prefix, request.limit or MAX_SCAN_LIMIT, request.start, MAX_SCAN_BYTES
        )
        self._turn.add(
            TURN_CALL_BYTES + sum(3 * (len(k) + len(v)) + TURN_OP_BYTES for k, v in items)
        )
        return pb.ScanResponse(
            items=[pb.KeyValue(key=k, value=v) for k, v in items], next_key=next_key
        )

    @rpc
    async def Status(
        self, request: pb.StatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatusResponse:
        status = self.node.status()
        if inspect.isawaitable(status):
            status = await status
        return status

    # -- Session stream -------------------------------------------------------------------

    async def Session(
        self,
        request_iterator: AsyncIterator[tuple[int, pb.SessionFrame | TooManyOps | bytes]],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.SessionResult]:
        """Pipelined ops: frames run concurrently, results stream back as they complete.
        Each request is ``(its size in bytes, the frame)``, the frame parsed or its bytes
        (parsed here: see ``add_kv_service``)."""
        await self.check_cluster(context)
        owner = self._counted_owner(context)
        if owner is not None:
            mine = [use for use in self._uses if use.owner == owner]
            if len(mine) >= SESSION_SHARE and not self._make_way(mine):
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"client {owner[:100]!r} has {len(mine)} Session streams open here, the "
                    "most one client may have (a quarter of the node's), all busy; retry later",
                )
        if len(self._uses) >= MAX_SESSIONS and not self._make_way():
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this node has {MAX_SESSIONS} Session streams open, all busy; retry later",
            )
        # (the role interceptor let the stream open: its reads are allowed; its writes?)
        no_writes = (
            self.authorizer.refusal(context, Role.WRITE, "a write")
            if self.authorizer is not None
            else None
        )
        done: asyncio.Queue[tuple[pb.SessionResult, int] | BaseException | object | None]
        done = asyncio.Queue()
        use = _SessionUse(done, owner)
        self._uses.add(use)
        # frames read whose answer is not sent yet, 1 each (a budget, not a Semaphore: it can
        # be taken without awaiting, in ``take_frame``)
        slots = _ByteBudget(MAX_SESSION_INFLIGHT)
        held = _StreamBytes(self._budget, self._unsent)
        tasks: set[asyncio.Task[None]] = set()
        outstanding = 0  # frames started whose answer is not sent or queued for the writer
        general_unfinished = 0  # frames in tasks of their own (the general path) not finished
        ended = False
        read_all = False  # the reader is done (None is queued for the writer)
        send_now = getattr(context, "send_now", None)  # (TCP streams: session_stream.py)

        async def run(
            size: int, cost: int, frame: pb.SessionFrame, applied: asyncio.Future | None = None
        ) -> None:
            """A frame in a task of its own; or, given ``applied``, the rest of one proposed
            by ``_writes_now`` whose answer could not be given in the callback."""
            nonlocal general_unfinished
            settled = False
            answer = 0

            async def settle(nbytes: int) -> None:
                nonlocal settled, answer
                settled, answer = True, nbytes
                await held.request_done(cost, nbytes)

            try:
                if applied is None:
                    result = await self._session_frame(frame, size, context, no_writes, settle)
                else:
                    result = await self._writes_result(frame, applied, context)
            except Exception as exc:  # noqa: BLE001 - _session_frame should not raise
                log.exception("Session frame %d failed", frame.frame_id)
                err = pb.OpResult(code=CODE_INTERNAL, error=f"internal error: {exc!r}")
                result = pb.SessionResult(frame_id=frame.frame_id, results=[err])
            finally:
                if applied is None:
                    general_unfinished -= 1
            if not settled:
                await settle(0)
            answered(result, answer)

        def answered(result: pb.SessionResult, answer: int) -> None:
            # The whole answer counts, not only its values: per-op errors can make it many
            # times the request (10,000 empty ops: 20 KB in, ~1 MB of errors out).
            held_bytes = result.ByteSize() + PARSED_OP_BYTES * len(result.results)
            if held_bytes > answer:
                held.built(held_bytes - answer)  # (built already: waiting would free nothing)
                answer = held_bytes
            done.put_nowait((result, answer))

        def on_writes_applied(
            size: int, cost: int, frame: pb.SessionFrame, fut: asyncio.Future
        ) -> None:
            """A ``_writes_now`` frame's results are in: its answer, here if nothing has to wait
            (the usual case), else in a task, as the general path would give it."""
            if ended:
                return  # (the stream is gone: ``held.close`` gave back what the frame held)
            nonlocal outstanding
            if (
                fut.cancelled()
                or fut.exception() is not None
                or len(fut.result()) != len(frame.ops)
                or self._turn.full()
                or not held.request_done_now(cost)
            ):
                start(run(size, cost, frame, fut))  # (the general path's answer, or wait)
                return
            try:
                result = self._writes_answer(frame, fut.result())
            except Exception as exc:  # noqa: BLE001 - (its request is given back: answer it here)
                log.exception("Session frame %d: its answer could not be built", frame.frame_id)
                err = pb.OpResult(code=CODE_INTERNAL, error=f"internal error: {exc!r}")
                result = pb.SessionResult(frame_id=frame.frame_id, results=[err])
            try:
                sent = send_now is not None and done.empty() and send_now(result)
            except Exception:  # noqa: BLE001 - the writer sends it (or ends the stream)
                log.exception("a Session answer could not be sent from its callback")
                sent = False
            if not sent:
                answered(result, 0)
                return
            # Sent here (over TCP, when nothing is queued and the client reads): what the
            # writer does after it sends an answer, without the turn of the loop it takes.
            outstanding -= 1
            answer_gone()
            if read_all and not outstanding:
                done.put_nowait(_NUDGE)  # (the writer may be waiting for this last answer)

        def answer_gone() -> None:
            """A frame's answer is sent (by the writer or from its callback): its slot is free."""
            slots.give(1)
            use.frames -= 1
            use.last = asyncio.get_running_loop().time()

        def start(coro: Coroutine[Any, Any, None]) -> None:
            task = asyncio.create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        bad_frame: str | None = None  # why the stream ends after the answers, if it must
        frame_refusal = getattr(context, "frame_refusal", None)  # (the TCP stream's own rule)

        def begin(size: int, cost: int, frame: pb.SessionFrame) -> None:
            """A frame read and counted in the budgets: proposed at once (``_writes_now``) or
            started in a task of its own."""
            nonlocal outstanding, general_unfinished
            outstanding += 1
            # (a frame of up to FAST_FRAME_OPS writes goes at once, unless one before it is still
            # on the general path: frames are proposed in the order they came)
            try:
                applied = (
                    None
                    if general_unfinished
                    else self._writes_now(frame, size, context, no_writes)
                )
            except Exception:  # noqa: BLE001 - nothing is proposed: the general path says why
                log.exception("Session frame %d: the short way failed", frame.frame_id)
                applied = None
            if applied is not None:
                applied.add_done_callback(partial(on_writes_applied, size, cost, frame))
                return
            general_unfinished += 1
            start(run(size, cost, frame))

        def take_frame(size: int, raw: bytes) -> bool:
            """A frame handed over by the TCP stream as it arrives (``StreamContext``), taken
            here if nothing would wait and nothing came before it: no turn of the loop for
            ``read_frames`` to wake in. False: it goes the usual way, in the queue."""
            if ended or read_all or in_hand:
                return False
            bound = _frame_bound(size)
            if not (slots.fits_now(1) and held.request_fits_now(bound)):
                return False
            try:
                frame = parse_frame(raw)
            except Exception:  # noqa: BLE001 - read_frames says why, and ends the stream
                return False
            if frame_refusal is not None and frame_refusal(frame) is not None:
                return False
            slots.take_now(1)
            held.take_request_now(bound)
            use.frames += 1
            use.last = asyncio.get_running_loop().time()
            cost = _frame_cost(size, frame)
            held.give_request(bound - cost)
            begin(size, cost, frame)
            return True

        in_hand = False  # read_frames holds a frame it has not begun yet

        async def read_frames() -> None:
            nonlocal bad_frame, read_all, in_hand
            try:
                async for size, item in request_iterator:
                    in_hand = True
                    use.frames += 1
                    use.last = asyncio.get_running_loop().time()
                    await slots.take(1)
                    if isinstance(item, bytes):
                        # Counted before it is parsed, as the most parsing can make of it
                        # (each op PARSED_OP_BYTES, the smallest op 2 bytes), then as parsed.
                        bound = _frame_bound(size)
                        await held.take_request(bound)
                        try:
                            frame = parse_frame(item)
                            bad_frame = frame_refusal(frame) if frame_refusal else None
                        except DecodeError as exc:
                            bad_frame = f"not a SessionFrame: {exc}"
                        if bad_frame is not None:
                            held.give_request(bound)
                            use.frames -= 1
                            slots.give(1)
                            break
                        cost = _frame_cost(size, frame)
                        held.give_request(bound - cost)
                    else:
                        frame = item
                        cost = _frame_cost(size, frame)
                        await held.take_request(cost)
                    in_hand = False
                    begin(size, cost, frame)
                in_hand = False
                read_all = True
                done.put_nowait(None)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # noqa: BLE001 - hand the failure to the writer
                read_all = True  # (the stream ends: take_frame takes nothing more)
                done.put_nowait(exc)

        reader = asyncio.create_task(read_frames())
        if hasattr(context, "take_frame"):
            context.take_frame = take_frame
        try:
            finished_reading = False
            while not finished_reading or outstanding:
                item = await done.get()
                if item is None:
                    finished_reading = True
                elif item is _NUDGE:
                    continue
                elif item is _EVICTED:
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE,
                        "this node is full of Session streams: an idle one made way; reconnect",
                    )
                elif isinstance(item, BaseException):
                    if isinstance(item, grpc.aio.AbortError | grpc.RpcError):
                        return  # the stream itself is gone (client cancelled or reset)
                    log.error("Session reader failed: %r", item)
                    await context.abort(grpc.StatusCode.INTERNAL, f"session failed: {item!r}")
                else:
                    outstanding -= 1
                    result, answer = item  # type: ignore[misc]
                    yield result  # (waits while the client does not read: flow control)
                    held.answer_sent(answer)
                    answer_gone()
            if bad_frame is not None:  # (every frame before it is answered)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad_frame)
        finally:
            ended = True
            if hasattr(context, "take_frame"):
                context.take_frame = None
            self._uses.discard(use)
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)
            held.close()

    def _writes_now(
        self,
        frame: pb.SessionFrame | TooManyOps,
        size: int,
        context: grpc.aio.ServicerContext,
        no_writes: str | None,
    ) -> asyncio.Future | None:
        """The usual frame -- up to FAST_FRAME_OPS PUTs and DELETEs, each well formed, from a
        client that may write, on a stream with no deadline, with room in this turn of the loop
        and under the quota -- proposed here and now: the future of its results (``Driver.submit``).
        None for any other frame, and for one the node refuses (not the leader): the general
        path, ``_session_frame``, takes it in a task of its own, with the same checks and
        errors. Under 8 clients x 1 put in flight a frame's task cost two turns of the
        leader's loop, ~0.06 ms each, of a put's ~1.4 ms there. (Its ops are checked and
        encoded inline, as ``_session_frame`` does: a call per op is ~1 us of a 10,000-op
        frame's ~13 ms.)"""
        submit = getattr(self.node, "submit", None)
        ops = frame.ops
        if (
            submit is None
            or no_writes is not None
            or not 0 < len(ops) <= FAST_FRAME_OPS
            or self._turn.full()
            or context.time_remaining() is not None
            or self._refuse_frame(frame, size) is not None
        ):
            return None
        settings = self.node.settings
        max_key, max_value = settings.max_key_bytes, settings.max_value_bytes
        client_id = self.own_client_id(frame.client_id, context)
        payloads = []
        for op in ops:
            kind, key, seq = op.kind, op.key, op.sequence
            if not (0 < len(key) <= max_key and seq <= MAX_SEQUENCE):
                return None
            # (cannot raise: the client id was checked by _refuse_frame)
            if kind == _PUT:
                value = op.value
                if len(value) > max_value:
                    return None
                payloads.append(encode_put(client_id, seq, key, value))
            elif kind == _DELETE:
                payloads.append(encode_delete(client_id, seq, key))
            else:
                return None
        if self._space_refusal(size) is not None:
            return None
        try:
            applied = submit(payloads)
        except NotLeaderError:
            return None
        self._turn.add(TURN_CALL_BYTES + len(ops) * TURN_OP_BYTES)
        return applied

    def _writes_answer(self, frame: pb.SessionFrame, applied: list) -> pb.SessionResult:
        """The answer of a ``_writes_now`` frame whose results are ``applied`` (one per op)."""
        self._turn.add(len(applied) * TURN_OP_BYTES)
        results = [_MALFORMED if ok is None else _DONE[bool(ok)] for ok in applied]
        return pb.SessionResult(frame_id=frame.frame_id, results=results)

    async def _writes_result(
        self, frame: pb.SessionFrame, applied: asyncio.Future, context: grpc.aio.ServicerContext
    ) -> pb.SessionResult:
        """The answer of a ``_writes_now`` frame, as ``_session_frame`` gives it, once ``applied``
        is done: its results, or every op failed with the node's error (and a leader hint)."""
        try:
            if applied.cancelled():  # (nothing cancels it: the node fails it, if anything)
                raise RuntimeError("the write's proposal was cancelled")
            results = applied.result()  # (raises the node's error)
            if len(results) != len(frame.ops):
                raise RuntimeError(
                    f"node returned {len(results)} results for {len(frame.ops)} commands"
                )
            if self._turn.full():
                await self._turn.room()
            return self._writes_answer(frame, results)
        except Exception as exc:  # noqa: BLE001 - reported per op
            err, leader = self._op_error(await self.settle_leader(exc, context))
            return pb.SessionResult(
                frame_id=frame.frame_id, results=[err] * len(frame.ops), leader=leader
            )

    def _refuse_frame(self, frame: pb.SessionFrame, size: int) -> str | None:
        """Why a whole frame is refused before any of its ops runs, or None."""
        if isinstance(frame, TooManyOps):
            return f"a frame has at most {MAX_FRAME_OPS} ops, this one more"
        if len(frame.ops) > MAX_FRAME_OPS:
            return f"a frame has at most {MAX_FRAME_OPS} ops, this one {len(frame.ops)}"
        try:
            self.check_size(size)
            self.check_client_id(frame.client_id)
        except BadRequest as exc:
            return str(exc)
        return None

    async def _session_frame(
        self,
        frame: pb.SessionFrame,
        size: int,
        context: grpc.aio.ServicerContext,
        no_writes: str | None = None,
        settle: Callable[[int], Awaitable[None]] | None = None,
    ) -> pb.SessionResult:
        """Run one frame; never raises (every failure becomes a per-op code). ``no_writes``:
        why this client may not write (its write ops are refused), or None. ``settle(n)`` is
        awaited before the answers to reads are built: the request is done with, ``n`` bytes
        of answers are to come (it may wait for room)."""
        ops = frame.ops
        refusal = self._refuse_frame(frame, size)
        if refusal is not None:
            # One result, not one per op: no client of ours sends such a frame, and a
            # stranger's 800,000 empty ops must not become 800,000 errors (40 MiB).
            err = pb.OpResult(code=CODE_INVALID_ARGUMENT, error=refusal)
            return pb.SessionResult(frame_id=frame.frame_id, results=[err])
        await self._turn.room()  # (checking 10,000 ops is ~15 ms: one such frame a turn)
        self._turn.add(TURN_CALL_BYTES + len(ops) * TURN_OP_BYTES)
        results: list[pb.OpResult | None] = [None] * len(ops)
        leader = ""
        client_id = self.own_client_id(frame.client_id, context)
        try:
            writes: list[int] = []
            payloads: list[bytes] = []
            reads: dict[str, list[int]] = {}
            grows = False  # a write other than a delete: the quota decides
            settings = self.node.settings
            max_key, max_value = settings.max_key_bytes, settings.max_value_bytes
            for i, op in enumerate(ops):
                if op.kind == _PUT and no_writes is None:
                    # (the usual op, checked and encoded inline: the general path below, a
                    # call per check, cost ~1 us an op)
                    key, value, seq = op.key, op.value, op.sequence
                    if 0 < len(key) <= max_key and len(value) <= max_value and seq <= MAX_SEQUENCE:
                        # (cannot raise: the client id was checked by _refuse_frame)
                        payloads.append(encode_put(client_id, seq, key, value))
                        writes.append(i)
                        grows = True
                        continue
                try:
                    if op.kind != pb.Op.GET:
                        if no_writes is not None:
                            results[i] = pb.OpResult(code=CODE_PERMISSION_DENIED, error=no_writes)
                            continue
                        self.check_sequence(op.sequence)
                    if op.kind == pb.Op.PUT_MANY:
                        payloads.append(self._put_many(client_id, op))
                        writes.append(i)
                        grows = True
                        continue
                    key = op.key  # (each read of a bytes field is a copy of it: once)
                    self._check_key(key)
                    if op.kind == pb.Op.GET:
                        reads.setdefault(self.read_mode(op.read_mode), []).append(i)
                        continue
                    if op.kind == pb.Op.PUT:
                        value = op.value
                        self._check_value(value)
                        payload = encode_put(client_id, op.sequence, key, value)
                        grows = True
                    elif op.kind == pb.Op.DELETE:
                        payload = encode_delete(client_id, op.sequence, key)
                    elif op.kind == pb.Op.CAS:
                        value, expected = op.value, op.expected
                        self._check_value(value)
                        self._check_value(expected, "expected value")
                        if op.expect_absent and expected:
                            raise BadRequest("expect_absent is set, so expected must be empty")
                        if op.expect_absent:
                            expected = None
                        payload = encode_cas(client_id, op.sequence, key, expected, value)
                        grows = True
                    else:
                        raise BadRequest(f"unknown op kind {op.kind}")
                except (BadRequest, ValueError) as exc:
                    results[i] = pb.OpResult(code=CODE_INVALID_ARGUMENT, error=str(exc))
                    continue
                writes.append(i)
                payloads.append(payload)

            no_space = self._space_refusal(size) if grows else None
            if no_space is not None:
                # Deletes still go: they are how space is freed.
                err = pb.OpResult(code=CODE_RESOURCE_EXHAUSTED, error=no_space)
                kept = [(i, p) for i, p in zip(writes, payloads, strict=True) if _frees(ops[i])]
                for i in writes:
                    if not _frees(ops[i]):
                        results[i] = err
                writes, payloads = [i for i, _ in kept], [p for _, p in kept]

            if payloads:
                try:
                    applied = await self.timed(context, self.node.propose(payloads), DEADLINE_WRITE)
                    # (the frames one apply completed all built their results in one turn:
                    # 32 frames of 10,000 PUTs, ~1 s, and leaders lost their leadership)
                    if self._turn.full():
                        await self._turn.room()
                    self._turn.add(len(writes) * TURN_OP_BYTES)
                    if len(applied) != len(payloads):
                        raise RuntimeError(
                            f"node returned {len(applied)} results for {len(payloads)} commands"
                        )
                    for i, ok in zip(writes, applied, strict=True):
                        results[i] = _MALFORMED if ok is None else _DONE[bool(ok)]
                except Exception as exc:  # noqa: BLE001 - reported per op
                    err, hint = self._op_error(await self.settle_leader(exc, context))
                    leader = leader or hint
                    for i in writes:
                        results[i] = err

            if reads:
                modes = list(reads)
                outcomes = await asyncio.gather(
                    *(self.timed(context, self.node.read_barrier(m), DEADLINE_READ) for m in modes),
                    return_exceptions=True,
                )
                answerable: list[int] = []
                for mode, outcome in zip(modes, outcomes, strict=True):
                    if isinstance(outcome, asyncio.CancelledError):
                        raise outcome
                    if isinstance(outcome, BaseException):
                        err, hint = self._op_error(await self.settle_leader(outcome, context))
                        leader = leader or hint
                        for i in reads[mode]:
                            results[i] = err
                        continue
                    answerable += reads[mode]
                await self._answer_reads(ops, answerable, results, settle)
        except Exception as exc:  # noqa: BLE001 - a frame must never kill the stream
            log.exception("Session frame %d failed", frame.frame_id)
            err = pb.OpResult(code=CODE_INTERNAL, error=f"internal error: {exc!r}")
            results = [r if r is not None else err for r in results]
        return pb.SessionResult(frame_id=frame.frame_id, results=results, leader=leader)

    async def _answer_reads(
        self,
        ops: Sequence[pb.Op],
        reads: list[int],
        results: list[pb.OpResult | None],
        settle: Callable[[int], Awaitable[None]] | None,
    ) -> None:
        """Fill in the answers of the reads (all safe to serve now): at most MAX_ANSWER_BYTES
        of values a frame (the first always), the rest RESOURCE_EXHAUSTED (the client asks
        again), so that a frame of a few KB cannot make a node build gigabytes."""
        fsm = self.node.fsm
        turn = self._turn
        answered = []
        total = 0
        for i in reads:
            if turn.full():  # (an await per op was a fifth of the loop under a GET flood)
                await turn.room()
            # (its size only: frames waiting in ``settle`` with their values held 2.3 GB;
            # the store has no way to learn it without copying the value out)
            size = _value_size(fsm.get(ops[i].key))
            turn.add(size + TURN_OP_BYTES)
            if answered and total + size > MAX_ANSWER_BYTES:
                results[i] = _ANSWER_TOO_BIG
                continue
            total += size
            answered.append(i)
        if settle is not None:
            await settle(total)
        for i in answered:
            if turn.full():
                await turn.room()
            value = fsm.get(ops[i].key)  # (as of now: settling may have waited)
            turn.add(3 * _value_size(value) + TURN_OP_BYTES)  # (copied into its result, sent)
            results[i] = _DONE[False] if value is None else pb.OpResult(ok=True, value=value)

    def _op_error(self, exc: BaseException) -> tuple[pb.OpResult, str]:
        """Per-op result for a failed node call, and the leader address hint ("" if none)."""
        code, message = status_of(self, exc, "Session")
        address = self.leader_hint(exc)[1] if isinstance(exc, NotLeaderError) else None
        return pb.OpResult(code=code.value[0], error=message), address or ""


_UNARY = {  # name -> its request (answers: handlers' serializer)
    "Put": pb.PutRequest,
    "Get": pb.GetRequest,
    "Delete": pb.DeleteRequest,
    "CompareAndSwap": pb.CasRequest,
    "Scan": pb.ScanRequest,
    "Status": pb.StatusRequest,
}


_READS = ("Get", "Scan", "Status")  # (their big answers may be refused once built: handlers)


# The smallest op on the wire: its tag and an empty length (``\x1a\x00``). A frame of at most
# MAX_FRAME_OPS * this many bytes cannot hold too many ops: only a bigger one is counted.
_SMALLEST_OP_BYTES = 2
_OPS_FIELD = pb.SessionFrame.DESCRIPTOR.fields_by_name["ops"].number


def _frame_bound(size: int) -> int:
    """What a Session frame of ``size`` bytes is counted as before it is parsed: the most
    parsing can make of it (each op PARSED_OP_BYTES, the smallest op 2 bytes)."""
    return size + PARSED_OP_BYTES * min(size // _SMALLEST_OP_BYTES, MAX_FRAME_OPS) + FRAME_BYTES


def _frame_cost(size: int, frame: pb.SessionFrame) -> int:
    """... and once parsed (its ops counted)."""
    return size + PARSED_OP_BYTES * len(frame.ops) + FRAME_BYTES


class TooManyOps:
    """Stands for a frame with more than MAX_FRAME_OPS ops, refused unparsed: parsed, a 1.5 MB
    frame of 780,000 empty ops took ~45 ms of the loop and ~73 MB (8 streams of them, 2 GB)."""

    ops = ()
    client_id = 0

    def __init__(self, frame_id: int) -> None:
        self.frame_id = frame_id


def parse_frame(raw: bytes | memoryview) -> pb.SessionFrame | TooManyOps:
    """A SessionFrame from its bytes (DecodeError if it is not one), or, if it has more ops
    than MAX_FRAME_OPS, a ``TooManyOps`` for it: its ops are counted first, not parsed."""
    if len(raw) > MAX_FRAME_OPS * _SMALLEST_OP_BYTES:
        if count_field(raw, _OPS_FIELD, MAX_FRAME_OPS) > MAX_FRAME_OPS:
            return TooManyOps(_frame_id(raw))
    return pb.SessionFrame.FromString(raw)


def _frame_id(raw: bytes | memoryview) -> int:
    """The frame_id of a frame that starts with it (as every serializer writes it: fields in
    order), else 0."""
    if not raw or raw[0] != 0x08:
        return 0
    value = shift = 0
    for b in bytes(raw[1:11]):
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value & 0xFFFFFFFFFFFFFFFF
        shift += 7
    return 0


def _sized_frame(raw: bytes) -> tuple[int, bytes]:
    """A Session request with its size on the wire, which the limits count; ``Session``
    parses it once its budgets have room for what parsing makes of it."""
    return len(raw), raw


def add_kv_service(
    server: grpc.aio.Server,
    node: NodeLike,
    authorizer: Authorizer | None = None,
    quota: Quota | None = None,
) -> KVService:
    """Register a KVService for ``node`` on ``server`` and return it. The generated
    ``add_KVServicer_to_server``, but for the deserializer of Session requests."""
    service = KVService(node, authorizer, quota)
    handlers = {
        name: method_handler(
            getattr(service, name), request, answers=READS if name in _READS else WRITES
        )
        for name, request in _UNARY.items()
    }
    handlers["Session"] = grpc.stream_stream_rpc_method_handler(
        service.Session,
        request_deserializer=_sized_frame,
        response_serializer=pb.SessionResult.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("raftfast.v1.KV", handlers),)
    )
    return service


class _TurnBytes:
    """Bytes of values copied in the loop's current turn, node-wide: past ``limit``, whoever
    would copy more first lets the loop go on to its reads, timers and heartbeats. (When a
    read barrier resolved, every frame waiting on it built its answers in that one turn:
    16 streams of 1 MiB GETs, never read, stalled a leader 0.6-1 s and it lost leadership.)

    Those that wait queue, first come first served. A new turn lets go about as many as its
    room holds at what a step has cost lately (each charges its work with ``add`` in the step
    that follows ``room``: only then is it known); one let go that finds the turn full after
    all goes back to the head of the line. (Each waiter re-checking every turn cost the loop
    more than it waited for: 8,192 reads, ~0.2 s.)"""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.step = 1024.0  # what a step has cost lately (bytes charged per ``add``)
        self._reset: asyncio.Handle | None = None
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._back = 0  # of those let go this turn, how many found it full (at the head, in order)

    def full(self) -> bool:
        """Whether ``room`` would wait (asking first saves an await per op)."""
        return self.used >= self.limit or bool(self._waiting)

    async def room(self) -> None:
        if self.used < self.limit and not self._waiting:
            return
        loop = asyncio.get_running_loop()
        back = False
        while True:
            turn = loop.create_future()
            if back:
                self._waiting.insert(self._back, turn)
                self._back += 1
            else:
                self._waiting.append(turn)
            if self._reset is None:
                self._reset = loop.call_soon(self._next_turn)  # (nothing else would let it go)
            try:
                await turn
            except asyncio.CancelledError:
                if not turn.done():
                    self._waiting.remove(turn)
                raise
            if self.used < self.limit:
                return
            back = True  # (the ones let go before it filled the turn: the next one, first)

    def add(self, n: int) -> None:
        self.used += n
        self.step += (n - self.step) / 16
        if self._reset is None:  # (runs first thing in the next turn)
            self._reset = asyncio.get_running_loop().call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self.used = 0
        self._reset = None
        self._back = 0
        let_go = max(1, int(self.limit // max(self.step, 1.0)))
        while self._waiting and let_go:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                let_go -= 1
        if self._waiting:
            self._reset = asyncio.get_running_loop().call_soon(self._next_turn)


_EVICTED = object()  # (in a stream's queue of results: it made way for a new stream)
_NUDGE = object()  # (... the last answer under way was sent without the writer: see if done)


class _SessionUse:
    """When a Session stream was last used, its frames read and not yet answered, and the
    client it is counted for (``SESSION_SHARE``; None: not counted)."""

    __slots__ = ("done", "frames", "last", "owner")

    def __init__(self, done: asyncio.Queue[Any], owner: str | None = None) -> None:
        self.done = done  # (its results: ``_EVICTED`` ends it)
        self.frames = 0
        self.last = asyncio.get_running_loop().time()
        self.owner = owner

    def idle_since(self, now: float) -> float:
        return now - self.last if not self.frames else 0.0


# Results many ops share: a SessionResult copies the messages it is given, so one of each
# serves every frame (a new OpResult per op was two thirds of building a frame's answer).
_PUT = pb.Op.PUT
_DELETE = pb.Op.DELETE
_DONE = {True: pb.OpResult(ok=True), False: pb.OpResult(ok=False)}
_MALFORMED = pb.OpResult(code=CODE_INTERNAL, error="command was rejected as malformed")
_ANSWER_TOO_BIG = pb.OpResult(
    code=CODE_RESOURCE_EXHAUSTED,
    error=f"the answers to this frame pass {MAX_ANSWER_BYTES} bytes: ask for this one again",
)


def _value_size(value: bytes | None) -> int:
    return len(value) if value is not None else 0


def _frees(op: pb.Op) -> bool:
    return op.kind == pb.Op.DELETE


class _Wait:
    """One taker in a ``_Line``: its future resolves once its ``n`` bytes are counted."""

    __slots__ = ("fut", "n", "stream")

    def __init__(self, n: int, stream: _StreamBytes | None = None) -> None:
        self.fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.n = n
        self.stream = stream


class _Line:
    """Takers waiting for room, let in in the order they came: a release wakes only those it
    makes room for. (An event set at each release woke every waiter to look again: with
    thousands of frames waiting, a node spent its loop on wake-ups.)"""

    def __init__(self) -> None:
        self._waits: collections.deque[_Wait] = collections.deque()
        self._gone = 0  # waits in the line whose taker stopped waiting (dropped lazily)

    async def wait(self, wait: _Wait, give: Callable[[int], None]) -> None:
        """Queue ``wait`` and wait to be let in. Cancelled, it calls ``give``: with what it was
        counted for if it was let in meanwhile, else with 0 (it may have been first in line,
        holding up others that fit now)."""
        self._waits.append(wait)
        try:
            await wait.fut
        except asyncio.CancelledError:
            if wait.fut.done() and not wait.fut.cancelled():
                give(wait.n)
            else:
                wait.fut.cancel()
                self._gone += 1
                if self._gone > 64 and self._gone > len(self._waits) // 2:
                    self._waits = collections.deque(w for w in self._waits if not w.fut.done())
                    self._gone = 0
                give(0)
            raise

    def head(self) -> _Wait | None:
        """The first taker still waiting."""
        while self._waits:
            wait = self._waits[0]
            if not wait.fut.done():
                return wait
            self._waits.popleft()
            self._gone -= wait.fut.cancelled()
        return None

    def let_in(self, wait: _Wait) -> None:
        """``wait`` is counted: wake it (it leaves the line when it reaches the head)."""
        wait.fut.set_result(None)
        if self._waits and self._waits[0] is wait:
            self._waits.popleft()


class _ByteBudget:
    """Bytes in use, shared by every stream: ``take`` waits while taking ``n`` more would pass
    the limit (unless nothing is in use: one oversized item still goes through), in line."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._line = _Line()

    def _fits(self, n: int) -> bool:
        return not self.used or self.used + n <= self.limit

    def fits_now(self, n: int) -> bool:
        """Whether ``take(n)`` would take it without waiting."""
        return self._line.head() is None and self._fits(n)

    def take_now(self, n: int) -> bool:
        """``take(n)`` if it would not wait (True); else nothing (False)."""
        if not self.fits_now(n):
            return False
        self.used += n
        return True

    async def take(self, n: int) -> None:
        if not self.take_now(n):
            await self._line.wait(_Wait(n), self.give)

    def give(self, n: int) -> None:
        self.used -= n
        while (wait := self._line.head()) is not None and self._fits(wait.n):
            self.used += wait.n
            self._line.let_in(wait)


class _UnsentAnswers:
    """Answers built and not yet sent, over every stream: ``take`` waits (in line) while taking
    ``n`` more would pass the limit, unless the stream holds no answer and ``n`` is small (its
    client reads: it is served one answer at a time while the node is full of others')."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._line = _Line()

    def fits_now(self, stream: _StreamBytes, n: int) -> bool:
        """Whether ``take(stream, n)`` would take it without waiting."""
        return (not stream.unsent and n <= SMALL_ANSWER_BYTES) or (
            self._line.head() is None and self.used + n <= self.limit
        )

    async def take(self, stream: _StreamBytes, n: int) -> None:
        if self.fits_now(stream, n):
            self.count(stream, n)
            return
        wait = _Wait(n, stream)
        stream.waits.append(wait)
        try:
            await self._line.wait(wait, lambda k: self.give(stream, k))
        finally:
            stream.waits.remove(wait)

    def count(self, stream: _StreamBytes, n: int) -> None:
        self.used += n
        stream.unsent += n

    def give(self, stream: _StreamBytes, n: int) -> None:
        self.used -= n
        stream.unsent -= n
        if not stream.unsent:  # (its next small answer may go now, whoever is first in line)
            for wait in stream.waits:
                if not wait.fut.done():
                    if wait.n <= SMALL_ANSWER_BYTES:
                        self.count(stream, wait.n)
                        self._line.let_in(wait)
                    break
        while (wait := self._line.head()) is not None and self.used + wait.n <= self.limit:
            self.count(wait.stream, wait.n)  # type: ignore[arg-type] # (every wait here has one)
            self._line.let_in(wait)


class _StreamBytes:
    """The bytes one Session stream holds: the requests of its frames under way (in its own
    budget and the node's) and the answers it has not sent yet (in its own budget and the
    node's budget of answers: a client that does not read its answers holds up itself, and,
    past that node-wide limit, only the large answers of others)."""

    def __init__(self, node: _ByteBudget, answers: _UnsentAnswers) -> None:
        self.node = node
        self.own = _ByteBudget(MAX_STREAM_BYTES)
        self.node_held = 0
        self.answers = answers
        self.unsent = 0  # (of ``answers``)
        self.waits: list[_Wait] = []  # its answers waiting in ``answers``' line

    async def take_request(self, n: int) -> None:
        await self.own.take(n)
        await self.node.take(n)
        self.node_held += n

    def request_fits_now(self, n: int) -> bool:
        """Whether ``take_request(n)`` would take it without waiting."""
        return self.own.fits_now(n) and self.node.fits_now(n)

    def take_request_now(self, n: int) -> bool:
        """``take_request(n)`` if it would not wait (True); else nothing (False)."""
        if not self.request_fits_now(n):
            return False
        self.own.take_now(n)
        self.node.take_now(n)
        self.node_held += n
        return True

    def give_request(self, n: int) -> None:
        """``n`` bytes of a request taken are not held (any more)."""
        self.node.give(n)
        self.node_held -= n
        self.own.give(n)

    async def request_done(self, n: int, answer: int) -> None:
        """A frame's request is processed; room for its ``answer`` (waits for it)."""
        self.give_request(n)
        await self.take_answer(answer)

    def request_done_now(self, n: int) -> bool:
        """``request_done(n, 0)``, if that would not wait (True); else nothing (False)."""
        if not (self.own.fits_now(0) and self.answers.fits_now(self, 0)):
            return False
        self.give_request(n)  # (giving lets waiters in: what did not wait before cannot now)
        return True

    async def take_answer(self, n: int) -> None:
        await self.own.take(n)  # (first: a stream waiting for its own room holds up only itself)
        try:
            await self.answers.take(self, n)
        except BaseException:
            self.own.give(n)
            raise

    def built(self, n: int) -> None:
        """``n`` more bytes of an answer already built (counted without waiting for room)."""
        self.own.used += n
        self.answers.count(self, n)

    def answer_sent(self, answer: int) -> None:
        self.own.give(answer)
        self.answers.give(self, answer)

    def close(self) -> None:
        """The stream ended: what its frames still held of the node's budgets goes back."""
        self.node.give(self.node_held)
        self.node_held = 0
        if self.unsent:
            self.answers.give(self, self.unsent)
