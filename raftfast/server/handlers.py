"""gRPC services whose requests are parsed without raising.

With the generated ``add_<Service>Servicer_to_server``, bytes that are no request make the
parser raise, and gRPC answers UNKNOWN ("Unexpected DecodeError"). ``register`` builds the same
handlers from the service's descriptor, but a request that does not parse becomes a
``Malformed`` value: a call with one request is answered INVALID_ARGUMENT before its handler
runs; a stream's handler gets the ``Malformed`` among its requests (if ``tolerant_streams``)
and answers it itself, or the stream fails as before.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

import grpc

from raftfast.heap import release_free_memory

__all__ = ["MAX_UNREAD_ANSWER_BYTES", "Malformed", "method_handler", "register", "tolerant"]

# Answers to one-request calls that their clients have not read yet, in this process: gRPC
# holds each until its client reads it (10 connections of 200 Gets of 1 MB, never read, took a
# node to 5.6 GB and cost it its leadership). Past this, a call whose answer is bigger than
# _COUNTED_BYTES is refused with RESOURCE_EXHAUSTED until some are read; smaller answers (a
# Status, a put's) are not counted and always go.
MAX_UNREAD_ANSWER_BYTES = 128 * 1024 * 1024  # (each held costs ~3 times its size: copies)
_COUNTED_BYTES = 16 * 1024
# Once they are all read, the heap's free pages go back to the system if this many were held
# (glibc kept 1.4 of 2.9 GB after such a flood; raftfast.heap).
_TRIM_AFTER_BYTES = 32 * 1024 * 1024


class _UnreadAnswers:
    """Bytes of counted answers whose calls have not ended (their client has not read them)."""

    used = 0
    peak = 0  # (since the last time none were held)

    @classmethod
    def hold(cls, response: Any, context: grpc.aio.ServicerContext) -> bool:
        """Count ``response`` until its call ends; False if there is no room for it (a small
        one always goes: Status, a put's answer)."""
        size = response.ByteSize() if hasattr(response, "ByteSize") else 0
        if size < _COUNTED_BYTES:
            return True
        if cls.used and cls.used + size > MAX_UNREAD_ANSWER_BYTES:
            return False
        cls.used += size
        cls.peak = max(cls.peak, cls.used)
        context.add_done_callback(lambda _call: cls._release(size))
        return True

    @classmethod
    def _release(cls, size: int) -> None:
        cls.used -= size
        if cls.used == 0 and cls.peak >= _TRIM_AFTER_BYTES:
            cls.peak = 0
            asyncio.get_running_loop().call_later(1.0, release_free_memory)


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
    behavior: Callable, server_streaming: bool, bounded: bool = True, prefix: str = ""
) -> Callable:
    """``behavior`` of a one-request method, answering a ``Malformed`` INVALID_ARGUMENT;
    ``bounded``: a unary one is refused while too many answers are unread (see
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
        response = await behavior(request, context)
        if bounded and not _UnreadAnswers.hold(response, context):
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{prefix}this node holds {MAX_UNREAD_ANSWER_BYTES} bytes of answers its "
                "clients have not read, its maximum; retry later",
            )
        return response

    return unary


def method_handler(
    behavior: Callable,
    request_cls: Any,
    response_cls: Any,
    client_streaming: bool = False,
    server_streaming: bool = False,
    tolerant_streams: bool = False,
    prefix: str = "",
    bounded_answers: bool = True,
) -> grpc.RpcMethodHandler:
    """The handler of one method whose request parsing never raises (see the module doc);
    ``prefix`` begins the message of a refusal (etcd's: "etcdserver: "); ``bounded_answers``:
    refused while too many answers are unread (not a peer's: its votes must go through)."""
    parse = request_cls.FromString
    # (only our own async methods: the generated servicer's stubs answer UNIMPLEMENTED)
    ours = inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)
    if ours and not client_streaming:
        behavior = _refusing_malformed(behavior, server_streaming, bounded_answers, prefix)
    if ours and (not client_streaming or tolerant_streams):
        parse = tolerant(parse, request_cls.__name__, prefix)
    return _HANDLERS[client_streaming, server_streaming](
        behavior,
        request_deserializer=parse,
        response_serializer=response_cls.SerializeToString,
    )


def register(
    server: grpc.aio.Server,
    module: Any,
    name: str,
    servicer: Any,
    tolerant_streams: bool = False,
    prefix: str = "",
    bounded_answers: bool = True,
) -> None:
    """Serve ``servicer`` as service ``name`` of the generated ``module`` (its ``_pb2``)."""
    service = module.DESCRIPTOR.services_by_name[name]
    handlers = {
        m.name: method_handler(
            getattr(servicer, m.name),
            getattr(module, m.input_type.name),
            getattr(module, m.output_type.name),
            m.client_streaming,
            m.server_streaming,
            tolerant_streams,
            prefix,
            bounded_answers,
        )
        for m in service.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)
