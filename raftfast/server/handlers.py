"""gRPC services whose requests are parsed without raising.

With the generated ``add_<Service>Servicer_to_server``, bytes that are no request make the
parser raise, and gRPC answers UNKNOWN ("Unexpected DecodeError"). ``register`` builds the same
handlers from the service's descriptor, but a request that does not parse becomes a
``Malformed`` value: a call with one request is answered INVALID_ARGUMENT before its handler
runs; a stream's handler gets the ``Malformed`` among its requests (if ``tolerant_streams``)
and answers it itself, or the stream fails as before.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import grpc

from raftfast.heap import release_free_memory_soon
from raftfast.server.log_counts import CountedWarning

__all__ = [
    "FREE",
    "MAX_UNREAD_ANSWER_BYTES",
    "READS",
    "WRITES",
    "Malformed",
    "StreamBound",
    "Twins",
    "method_handler",
    "quiet_answers_not_sent",
    "register",
    "tolerant",
]

# Answers to one-request calls that their clients have not read yet, in this process: gRPC
# holds each until its client reads it (10 connections of 200 Gets of 1 MB, never read, took a
# node to 5.6 GB and cost it its leadership). Answers of _COUNTED_BYTES or more count; past
# the bound, a read whose answer is that big is refused with RESOURCE_EXHAUSTED (its smaller
# answers, a Status, still go), and so is a write before it is proposed (after, never: it is
# done). Answers on their way to clients that do read count too, while they travel.
MAX_UNREAD_ANSWER_BYTES = 128 * 1024 * 1024  # (each held costs ~3 times its size: copies)
_COUNTED_BYTES = 16 * 1024
# Once they are all read, the heap's free pages go back to the system if this many were held
# (glibc kept 1.4 of 2.9 GB after such a flood; raftfast.heap).
_TRIM_AFTER_BYTES = 32 * 1024 * 1024
# How a method's answers are bounded (``method_handler``): READS are refused once built if
# there is no room; WRITES (the default: what is not known to be a read) before they run;
# FREE are neither (a peer's calls: its votes must go through).
READS, WRITES, FREE = "reads", "writes", "free"


class _UnreadAnswers:
    """Bytes of counted answers whose calls have not ended (their client has not read them).
    One count a process (embedded nodes share it; a SyncNode's loop runs in its own thread)."""

    used = 0
    peak = 0  # (since the last time none were held)
    _lock = threading.Lock()

    @classmethod
    def full(cls) -> bool:
        return cls.used > MAX_UNREAD_ANSWER_BYTES

    @classmethod
    def hold(cls, size: int, context: grpc.aio.ServicerContext, may_refuse: bool) -> bool:
        """Count an answer of ``size`` bytes until its call ends; False (and not counted) if
        there is no room for it and ``may_refuse`` (a small one always goes: Status, a put's
        answer)."""
        if size < _COUNTED_BYTES:
            return True
        with cls._lock:
            if may_refuse and cls.used and cls.used + size > MAX_UNREAD_ANSWER_BYTES:
                return False
            cls.used += size
            cls.peak = max(cls.peak, cls.used)
        context.add_done_callback(lambda _call: cls._release(size))
        return True

    @classmethod
    def _release(cls, size: int) -> None:
        with cls._lock:
            cls.used -= size
            trim = cls.used == 0 and cls.peak >= _TRIM_AFTER_BYTES
            if trim:
                cls.peak = 0
        if trim:
            release_free_memory_soon()


def _refusal(prefix: str) -> str:
    return (
        f"{prefix}this node's process holds {MAX_UNREAD_ANSWER_BYTES} bytes of answers its "
        "clients have not read, its maximum; retry later"
    )


_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class Malformed:
    """A request that did not parse (garbage bytes, a message nested past protobuf's limit)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def tolerant(parse: Callable[[bytes], Any], name: str, prefix: str = "") -> Callable[[bytes], Any]:
    """``parse``, returning a ``Malformed`` where it would raise (its message ``prefix``ed)."""

    def parse_or_say_why(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, too deep a message...
            return Malformed(f"{prefix}malformed {name}: {exc}"[:300])

    return parse_or_say_why


def _refusing_malformed(
    behavior: Callable, server_streaming: bool, answers: str = WRITES, prefix: str = ""
) -> Callable:
    """``behavior`` of a one-request method, answering a ``Malformed`` INVALID_ARGUMENT;
    ``answers``: how a unary one's answers are bounded (READS, WRITES or FREE: see
    ``MAX_UNREAD_ANSWER_BYTES``)."""
    if server_streaming:

        async def streamed(request, context):
            if isinstance(request, Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            async for response in behavior(request, context):
                yield response

        return streamed

    async def unary(request, context):
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        if answers == FREE:
            return await behavior(request, context)
        if answers == WRITES and _UnreadAnswers.full():
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, _refusal(prefix))
        # Serialized here, once: its size is what is counted (``_serialize`` passes it on).
        data = _serialize(await behavior(request, context))
        if not _UnreadAnswers.hold(len(data), context, may_refuse=answers == READS):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, _refusal(prefix))
        return data

    return unary


def method_handler(
    behavior: Callable,
    request_cls: Any,
    client_streaming: bool = False,
    server_streaming: bool = False,
    tolerant_streams: bool = False,
    prefix: str = "",
    answers: str = WRITES,
) -> grpc.RpcMethodHandler:
    """The handler of one method whose request parsing never raises (see the module doc);
    ``prefix`` begins the message of a refusal (etcd's: "etcdserver: "); ``answers``: READS,
    WRITES or FREE (how its answers are bounded: see ``MAX_UNREAD_ANSWER_BYTES``)."""
    parse = request_cls.FromString
    # (only our own async methods: the generated servicer's stubs answer UNIMPLEMENTED)
    ours = inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)
    if ours and not client_streaming:
        behavior = _refusing_malformed(behavior, server_streaming, answers, prefix)
    if ours and (not client_streaming or tolerant_streams):
        parse = tolerant(parse, request_cls.__name__, prefix)
    return _HANDLERS[client_streaming, server_streaming](
        behavior,
        request_deserializer=parse,
        response_serializer=_serialize,
    )


def _serialize(response: Any) -> bytes:
    """An answer on the wire (one serialized already passes: counted ones, built in parts)."""
    return response if isinstance(response, bytes) else response.SerializeToString()


class Twins:
    """The twin ``make(handler, method)`` builds of a method's handler (timed, time-limited),
    made once per method: a service's own handlers are the same object call after call (an
    interceptor's that comes after another's that wraps each call gets a new one each time).
    Only served methods have handlers: one entry per method served."""

    def __init__(self, make: Callable[[grpc.RpcMethodHandler, str], grpc.RpcMethodHandler]):
        self._make = make
        self._twins: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def of(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        cached = self._twins.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        twin = self._make(handler, method)
        self._twins[method] = (handler, twin)
        return twin


class GenericOnly:
    """``server`` as a generated ``add_*_to_server`` sees it: the handlers it adds are generic
    ones only, never registered methods.

    For every call it accepts, grpc.aio's server waits (``asyncio.wait``) on one pending
    request per registered method and one for all generic ones: with the ~70 methods of a
    node's client port that wait, its set and its callbacks were ~10% of a leader's CPU under
    etcd's unary puts. A call's generic handler is found by asking each service's handler in
    turn, in the order they were added (a dozen dict lookups at most)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, name: str, handlers: Any) -> None:
        """Left out: the same handlers come as generic ones too."""


def register(
    server: grpc.aio.Server,
    module: Any,
    name: str,
    servicer: Any,
    tolerant_streams: bool = False,
    prefix: str = "",
    reads: Collection[str] = (),
    free: bool = False,
) -> None:
    """Serve ``servicer`` as service ``name`` of the generated ``module`` (its ``_pb2``):
    ``reads`` names its methods that only read (their big answers may be refused once built);
    ``free``: none of its answers is bounded (a peer's)."""
    service = module.DESCRIPTOR.services_by_name[name]
    handlers = {
        m.name: method_handler(
            getattr(servicer, m.name),
            getattr(module, m.input_type.name),
            m.client_streaming,
            m.server_streaming,
            tolerant_streams,
            prefix,
            FREE if free else READS if m.name in reads else WRITES,
        )
        for m in service.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


class StreamBound:
    """How many calls of one kind are under way, against their bound (``most``): ``held``
    refuses one past it before it starts (RESOURCE_EXHAUSTED unless told otherwise) and
    counts it until it ends, however it ends. For streams a client may hold open without
    reading: snapshot saves, health watches, reflection."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.open = 0

    @contextlib.asynccontextmanager
    async def held(
        self,
        context: grpc.aio.ServicerContext,
        refusal: str,
        code: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED,
    ) -> AsyncIterator[None]:
        if self.open >= self.most:
            await context.abort(code, refusal)
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1


class _AnswerNotSent(logging.Filter):
    """grpc.aio logs an ERROR and a traceback whenever it cannot send a call's answer: its
    client has gone (cancelled, disconnected, or refused the answer as too big for it), or
    the answer is over the server's own send limit. The first is a line anyone can cause per
    call (etcd's Node.js client refusing a 7.5 MB Range wrote four): each becomes a DEBUG
    line, and a WARNING says how many at most once a minute."""

    def __init__(self) -> None:
        super().__init__()
        self.counted = CountedWarning(
            _log,
            "%d answer(s) not sent (their clients left, or an answer was over the send "
            "limit); the last: %s",
            60.0,
        )

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if type(exc).__name__ != "ExecuteBatchError":
            return True
        _log.debug("an answer was not sent: %s", record.getMessage())
        self.counted.note(record.getMessage())
        return False


_log = logging.getLogger("raftfast.server")
_ANSWER_NOT_SENT = _AnswerNotSent()


def quiet_answers_not_sent() -> None:
    """Make grpc.aio's tracebacks for answers it could not send DEBUG lines and a counted
    warning (``_AnswerNotSent``; once a process: a node's server calls it)."""
    logger = logging.getLogger("grpc._cython.cygrpc")
    if _ANSWER_NOT_SENT not in logger.filters:
        logger.addFilter(_ANSWER_NOT_SENT)
