"""gRPC services whose requests are parsed without raising.

With the generated ``add_<Service>Servicer_to_server``, bytes that are no request make the
parser raise, and gRPC answers UNKNOWN ("Unexpected DecodeError"). ``register`` builds the same
handlers from the service's descriptor, but a request that does not parse becomes a
``Malformed`` value: a call with one request is answered INVALID_ARGUMENT before its handler
runs; a stream's handler gets the ``Malformed`` among its requests (if ``tolerant_streams``)
and answers it itself, or the stream fails as before.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import grpc

__all__ = ["Malformed", "method_handler", "register", "tolerant"]

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


def _refusing_malformed(behavior: Callable, server_streaming: bool) -> Callable:
    """``behavior`` of a one-request method, answering a ``Malformed`` INVALID_ARGUMENT."""
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
        return await behavior(request, context)

    return unary


def method_handler(
    behavior: Callable,
    request_cls: Any,
    response_cls: Any,
    client_streaming: bool = False,
    server_streaming: bool = False,
    tolerant_streams: bool = False,
    prefix: str = "",
) -> grpc.RpcMethodHandler:
    """The handler of one method whose request parsing never raises (see the module doc);
    ``prefix`` begins the message of a refusal (etcd's: "etcdserver: ")."""
    parse = request_cls.FromString
    # (only our own async methods: the generated servicer's stubs answer UNIMPLEMENTED)
    ours = inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)
    if ours and not client_streaming:
        behavior = _refusing_malformed(behavior, server_streaming)
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
        )
        for m in service.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)
