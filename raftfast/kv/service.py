"""The client-facing KV gRPC service (grpc.aio) on top of a running raftfast node.

Writes become commands (``raftfast.kv.fsm``) proposed through ``node.propose``; reads wait for
``node.read_barrier`` and then read ``node.fsm`` directly. Errors map to gRPC status codes with a
message a human can act on:

* INVALID_ARGUMENT: empty or oversized key, oversized value, bad scan limit or read mode;
* UNAVAILABLE: this node is not the leader; trailing metadata ``leader-id`` and
  ``leader-address`` tell the client where to go (when a leader is known);
* DEADLINE_EXCEEDED: the call's deadline passed before the write committed / the read was safe;
* FAILED_PRECONDITION: the client sent ``cluster-id`` metadata naming another cluster;
* INTERNAL: anything unexpected (logged; the server keeps serving).

The Session stream pipelines: each SessionFrame is handled in its own task (one ``propose`` for
all its writes, then one ``read_barrier`` per distinct read mode for its reads, so reads in a
frame observe the frame's own writes), and results are written back as frames complete, not in
frame order. Errors there are reported per op (``OpResult.code``), never by ending the stream.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc

from raftfast.errors import NotLeaderError
from raftfast.kv.fsm import (
    KVStateMachine,
    encode_cas,
    encode_delete,
    encode_put,
    encode_put_many,
    unpack_pairs,
)
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto import raftfast_pb2_grpc as pb_grpc
from raftfast.settings import NodeSettings

__all__ = ["MAX_SCAN_LIMIT", "MAX_SESSION_INFLIGHT", "KVService", "NodeLike", "add_kv_service"]

log = logging.getLogger(__name__)

MAX_SCAN_LIMIT = 10_000  # items per Scan; ScanRequest.limit 0 means this
MAX_SESSION_INFLIGHT = 256  # frames of one Session handled concurrently (backpressure beyond)
DEADLINE_MARGIN = 0.05  # seconds before the RPC deadline at which the service gives up itself

CODE_OK = 0
CODE_INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]  # 3
CODE_DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]  # 4
CODE_INTERNAL = grpc.StatusCode.INTERNAL.value[0]  # 13
CODE_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]  # 14

_MODES = {
    pb.READ_LINEARIZABLE: "linearizable",
    pb.READ_LEASE: "lease",
    pb.READ_STALE: "stale",
}
_DEADLINE_WRITE = "not committed within the deadline; the write may or may not have been applied"
_DEADLINE_READ = "read not safe within the deadline (no confirmed leader in time)"

T = TypeVar("T")


class NodeLike(Protocol):
    """The part of the raftfast node this service uses (see raftfast/node.py)."""

    id: str
    fsm: KVStateMachine
    settings: NodeSettings

    async def propose(self, payloads: list[bytes]) -> list[bool | None]: ...

    async def read_barrier(self, mode: str) -> None: ...

    def address_of(self, node_id: str) -> str | None: ...

    def status(self) -> pb.StatusResponse: ...


class _BadRequest(Exception):
    """A request that fails validation; becomes INVALID_ARGUMENT (or per-op code 3)."""


def _rpc(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Map the exceptions of a unary handler to status codes so no error escapes as a crash."""

    @functools.wraps(method)
    async def wrapper(self: KVService, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            await self._check_cluster(context)
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except _BadRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except NotLeaderError as exc:
            leader_id, address = self._leader_hint(exc)
            md: tuple[tuple[str, str], ...] = ()
            if leader_id:
                md = (("leader-id", leader_id), ("leader-address", address or ""))
                context.set_trailing_metadata(md)
            await context.abort(grpc.StatusCode.UNAVAILABLE, self._not_leader_msg(exc), md)
        except TimeoutError as exc:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or _DEADLINE_WRITE)
        except Exception as exc:  # noqa: BLE001 - the server must survive any handler bug
            log.exception("KV %s failed", method.__name__)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}: {exc!r}"
            )
        raise AssertionError("unreachable: context.abort always raises")

    return wrapper


class KVService(pb_grpc.KVServicer):
    """Serves the KV API of one node; stateless apart from the node it wraps."""

    def __init__(self, node: NodeLike) -> None:
        self.node = node

    # -- helpers --------------------------------------------------------------------------

    async def _check_cluster(self, context: grpc.aio.ServicerContext) -> None:
        """Refuse a client that says it talks to another cluster (a misrouted address)."""
        for key, value in context.invocation_metadata() or ():
            if key == "cluster-id" and value != self.node.settings.cluster_id:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"wrong cluster: this node serves cluster {self.node.settings.cluster_id!r},"
                    f" the client expects {value!r}",
                )

    def _leader_hint(self, exc: NotLeaderError) -> tuple[str | None, str | None]:
        leader_id = exc.leader_id or None
        if leader_id is None:
            return None, None
        try:
            return leader_id, self.node.address_of(leader_id)
        except Exception:  # noqa: BLE001 - a hint is best effort
            return leader_id, None

    def _not_leader_msg(self, exc: NotLeaderError) -> str:
        leader_id, address = self._leader_hint(exc)
        if leader_id is None:
            return "not the leader; leader unknown (election in progress?), retry shortly"
        return f"not the leader; leader is {leader_id} at {address or 'unknown address'}"

    @staticmethod
    async def _timed(
        context: grpc.aio.ServicerContext, awaitable: Awaitable[T], deadline_msg: str
    ) -> T:
        """Await a node call within the RPC's deadline (TimeoutError with ``deadline_msg``).

        Gives up slightly before the deadline so the explanatory status still reaches the
        client instead of its own bare "Deadline Exceeded".
        """
        remaining = context.time_remaining()
        if remaining is None:
            return await awaitable
        margin = min(DEADLINE_MARGIN, remaining * 0.1)
        try:
            return await asyncio.wait_for(awaitable, max(remaining - margin, 0.0))
        except TimeoutError:
            raise TimeoutError(deadline_msg) from None

    def _check_key(self, key: bytes, what: str = "key") -> None:
        if not key:
            raise _BadRequest(f"{what} must not be empty")
        limit = self.node.settings.max_key_bytes
        if len(key) > limit:
            raise _BadRequest(f"{what} is {len(key)} bytes; the limit is {limit}")

    def _check_value(self, value: bytes, what: str = "value") -> None:
        limit = self.node.settings.max_value_bytes
        if len(value) > limit:
            raise _BadRequest(f"{what} is {len(value)} bytes; the limit is {limit}")

    def _put_many(self, client_id: int, op: pb.Op) -> bytes:
        """Validate a PUT_MANY op (every key and value within the limits) and encode it."""
        if op.key:
            raise _BadRequest("PUT_MANY carries its keys in value; key must be empty")
        try:
            keys, values = unpack_pairs(op.value)
        except ValueError as exc:
            raise _BadRequest(str(exc)) from None
        if not keys:
            raise _BadRequest("PUT_MANY needs at least one key")
        settings = self.node.settings
        longest_key, longest_value = max(map(len, keys)), max(map(len, values))
        if longest_key > settings.max_key_bytes:
            raise _BadRequest(
                f"a key is {longest_key} bytes; the limit is {settings.max_key_bytes}"
            )
        if longest_value > settings.max_value_bytes:
            raise _BadRequest(
                f"a value is {longest_value} bytes; the limit is {settings.max_value_bytes}"
            )
        return encode_put_many(client_id, op.sequence, op.value)

    def _mode(self, read_mode: int) -> str:
        if read_mode == pb.READ_DEFAULT:
            return self.node.settings.read_mode
        mode = _MODES.get(read_mode)
        if mode is None:
            raise _BadRequest(f"unknown read_mode {read_mode}")
        return mode

    async def _write(self, context: grpc.aio.ServicerContext, payload: bytes) -> bool:
        results = await self._timed(context, self.node.propose([payload]), _DEADLINE_WRITE)
        if len(results) != 1 or results[0] is None:
            raise RuntimeError(f"node returned {results!r} for one command")
        return bool(results[0])

    # -- unary RPCs -----------------------------------------------------------------------

    @_rpc
    async def Put(
        self, request: pb.PutRequest, context: grpc.aio.ServicerContext
    ) -> pb.PutResponse:
        """Set a key. ``index`` is an applied index at or after the write (read-your-write)."""
        self._check_key(request.key)
        self._check_value(request.value)
        payload = encode_put(request.client_id, request.sequence, request.key, request.value)
        await self._write(context, payload)
        return pb.PutResponse(index=self.node.fsm.applied_index)

    @_rpc
    async def Get(
        self, request: pb.GetRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetResponse:
        self._check_key(request.key)
        mode = self._mode(request.read_mode)
        await self._timed(context, self.node.read_barrier(mode), _DEADLINE_READ)
        value = self.node.fsm.get(request.key)
        if value is None:
            return pb.GetResponse(found=False)
        return pb.GetResponse(found=True, value=value)

    @_rpc
    async def Delete(
        self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteResponse:
        self._check_key(request.key)
        payload = encode_delete(request.client_id, request.sequence, request.key)
        return pb.DeleteResponse(deleted=await self._write(context, payload))

    @_rpc
    async def CompareAndSwap(
        self, request: pb.CasRequest, context: grpc.aio.ServicerContext
    ) -> pb.CasResponse:
        self._check_key(request.key)
        self._check_value(request.value)
        self._check_value(request.expected, "expected value")
        if request.expect_absent and request.expected:
            raise _BadRequest("expect_absent is set, so expected must be empty")
        expected = None if request.expect_absent else request.expected
        payload = encode_cas(
            request.client_id, request.sequence, request.key, expected, request.value
        )
        return pb.CasResponse(swapped=await self._write(context, payload))

    @_rpc
    async def Scan(
        self, request: pb.ScanRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScanResponse:
        limit = self.node.settings.max_key_bytes
        if len(request.prefix) > limit:
            raise _BadRequest(f"prefix is {len(request.prefix)} bytes; the limit is {limit}")
        if request.limit > MAX_SCAN_LIMIT:
            raise _BadRequest(
                f"scan limit {request.limit} is above the maximum {MAX_SCAN_LIMIT}"
                " (0 means the maximum)"
            )
        mode = self._mode(request.read_mode)
        await self._timed(context, self.node.read_barrier(mode), _DEADLINE_READ)
        items = self.node.fsm.scan(request.prefix, request.limit or MAX_SCAN_LIMIT)
        return pb.ScanResponse(items=[pb.KeyValue(key=k, value=v) for k, v in items])

    @_rpc
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
        request_iterator: AsyncIterator[pb.SessionFrame],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.SessionResult]:
        """Pipelined ops: frames run concurrently, results stream back as they complete."""
        await self._check_cluster(context)
        done: asyncio.Queue[pb.SessionResult | BaseException | None] = asyncio.Queue()
        slots = asyncio.Semaphore(MAX_SESSION_INFLIGHT)
        tasks: set[asyncio.Task[None]] = set()
        outstanding = 0  # frames started whose result the writer has not yet taken

        async def run(frame: pb.SessionFrame) -> None:
            try:
                result = await self._session_frame(frame, context)
            except Exception as exc:  # noqa: BLE001 - _session_frame should not raise
                log.exception("Session frame %d failed", frame.frame_id)
                err = pb.OpResult(code=CODE_INTERNAL, error=f"internal error: {exc!r}")
                result = pb.SessionResult(frame_id=frame.frame_id, results=[err] * len(frame.ops))
            finally:
                slots.release()
            done.put_nowait(result)

        async def read_frames() -> None:
            nonlocal outstanding
            try:
                async for frame in request_iterator:
                    await slots.acquire()
                    outstanding += 1
                    task = asyncio.create_task(run(frame))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                done.put_nowait(None)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # noqa: BLE001 - hand the failure to the writer
                done.put_nowait(exc)

        reader = asyncio.create_task(read_frames())
        try:
            finished_reading = False
            while not finished_reading or outstanding:
                item = await done.get()
                if item is None:
                    finished_reading = True
                elif isinstance(item, BaseException):
                    if isinstance(item, grpc.aio.AbortError | grpc.RpcError):
                        return  # the stream itself is gone (client cancelled or reset)
                    log.error("Session reader failed: %r", item)
                    await context.abort(grpc.StatusCode.INTERNAL, f"session failed: {item!r}")
                else:
                    outstanding -= 1
                    yield item
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)

    async def _session_frame(
        self, frame: pb.SessionFrame, context: grpc.aio.ServicerContext
    ) -> pb.SessionResult:
        """Run one frame; never raises (every failure becomes a per-op code)."""
        ops = frame.ops
        results: list[pb.OpResult | None] = [None] * len(ops)
        leader = ""
        try:
            writes: list[int] = []
            payloads: list[bytes] = []
            reads: dict[str, list[int]] = {}
            for i, op in enumerate(ops):
                try:
                    if op.kind == pb.Op.PUT_MANY:
                        payloads.append(self._put_many(frame.client_id, op))
                        writes.append(i)
                        continue
                    self._check_key(op.key)
                    if op.kind == pb.Op.GET:
                        reads.setdefault(self._mode(op.read_mode), []).append(i)
                        continue
                    if op.kind == pb.Op.PUT:
                        self._check_value(op.value)
                        payload = encode_put(frame.client_id, op.sequence, op.key, op.value)
                    elif op.kind == pb.Op.DELETE:
                        payload = encode_delete(frame.client_id, op.sequence, op.key)
                    elif op.kind == pb.Op.CAS:
                        self._check_value(op.value)
                        self._check_value(op.expected, "expected value")
                        if op.expect_absent and op.expected:
                            raise _BadRequest("expect_absent is set, so expected must be empty")
                        expected = None if op.expect_absent else op.expected
                        payload = encode_cas(
                            frame.client_id, op.sequence, op.key, expected, op.value
                        )
                    else:
                        raise _BadRequest(f"unknown op kind {op.kind}")
                except (_BadRequest, ValueError) as exc:
                    results[i] = pb.OpResult(code=CODE_INVALID_ARGUMENT, error=str(exc))
                    continue
                writes.append(i)
                payloads.append(payload)

            if payloads:
                try:
                    applied = await self._timed(
                        context, self.node.propose(payloads), _DEADLINE_WRITE
                    )
                    if len(applied) != len(payloads):
                        raise RuntimeError(
                            f"node returned {len(applied)} results for {len(payloads)} commands"
                        )
                    for i, ok in zip(writes, applied, strict=True):
                        if ok is None:
                            results[i] = pb.OpResult(
                                code=CODE_INTERNAL, error="command was rejected as malformed"
                            )
                        else:
                            results[i] = pb.OpResult(ok=bool(ok))
                except Exception as exc:  # noqa: BLE001 - reported per op
                    err, hint = self._op_error(exc)
                    leader = leader or hint
                    for i in writes:
                        results[i] = err

            if reads:
                modes = list(reads)
                outcomes = await asyncio.gather(
                    *(
                        self._timed(context, self.node.read_barrier(m), _DEADLINE_READ)
                        for m in modes
                    ),
                    return_exceptions=True,
                )
                fsm = self.node.fsm
                for mode, outcome in zip(modes, outcomes, strict=True):
                    if isinstance(outcome, asyncio.CancelledError):
                        raise outcome
                    if isinstance(outcome, BaseException):
                        err, hint = self._op_error(outcome)
                        leader = leader or hint
                        for i in reads[mode]:
                            results[i] = err
                        continue
                    for i in reads[mode]:
                        value = fsm.get(ops[i].key)
                        results[i] = (
                            pb.OpResult(ok=False)
                            if value is None
                            else pb.OpResult(ok=True, value=value)
                        )
        except Exception as exc:  # noqa: BLE001 - a frame must never kill the stream
            log.exception("Session frame %d failed", frame.frame_id)
            err = pb.OpResult(code=CODE_INTERNAL, error=f"internal error: {exc!r}")
            results = [r if r is not None else err for r in results]
        return pb.SessionResult(frame_id=frame.frame_id, results=results, leader=leader)

    def _op_error(self, exc: BaseException) -> tuple[pb.OpResult, str]:
        """Per-op result for a failed node call, and the leader address hint ("" if none)."""
        if isinstance(exc, NotLeaderError):
            _, address = self._leader_hint(exc)
            msg = self._not_leader_msg(exc)
            return pb.OpResult(code=CODE_UNAVAILABLE, error=msg), address or ""
        if isinstance(exc, TimeoutError):
            return pb.OpResult(code=CODE_DEADLINE_EXCEEDED, error=str(exc) or _DEADLINE_WRITE), ""
        log.error("Session node call failed: %r", exc)
        return pb.OpResult(code=CODE_INTERNAL, error=f"internal error: {exc!r}"), ""


def add_kv_service(server: grpc.aio.Server, node: NodeLike) -> KVService:
    """Register a KVService for ``node`` on ``server`` and return it."""
    service = KVService(node)
    pb_grpc.add_KVServicer_to_server(service, server)
    return service
