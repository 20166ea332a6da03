"""A time limit on a one-request call's request, from the call's start.

gRPC counts a call from its headers, and for a method of one request grpc.aio waits for that
request with no limit: calls whose request never comes (a stranger's, in plain mode; any
certificate holder's, with TLS) held a port's ``MAX_CONCURRENT_RPCS`` until their connections
closed, and every other client, admin included, was refused RESOURCE_EXHAUSTED meanwhile.

``ArrivalLimit`` serves every one-request method as a stream (the same on the wire: a client
sends one message, then half-closes) and takes its one request with a time limit: a call whose
request has not arrived within ``REQUEST_ARRIVAL_S`` is ended (DEADLINE_EXCEEDED), freeing its
place. It comes after the role check (a caller without the method's role is refused at the
call's start, before anything is waited for) and before the request timer.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from raftfast.server.handlers import Twins

__all__ = ["REQUEST_ARRIVAL_S", "ArrivalLimit"]

# Long enough for a request of the largest size over a slow link once its headers came; short
# enough that calls left without their request free their places soon.
REQUEST_ARRIVAL_S = 10.0


class ArrivalLimit(grpc.aio.ServerInterceptor):
    """Ends a one-request call whose request has not arrived within ``limit_s``."""

    def __init__(self, limit_s: float | None = None) -> None:
        self.limit_s = REQUEST_ARRIVAL_S if limit_s is None else limit_s
        self._limited = Twins(lambda handler, _method: _limited(handler, self.limit_s))

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_streaming:
            return handler  # unknown methods (UNIMPLEMENTED at once) and streams: as they are
        return self._limited.of(handler, details.method)


def _limited(handler: grpc.RpcMethodHandler, limit_s: float) -> grpc.RpcMethodHandler:
    """``handler`` (of one request) served as a stream whose one request must come in time."""
    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    missing = f"the request did not arrive within {limit_s:g} s of the call's start"

    async def first(context: grpc.aio.ServicerContext) -> Any:
        # (read, not the request iterator: a generator left after its first message would
        # hold that message as long as the call's objects live)
        try:
            async with asyncio.timeout(limit_s):
                request = await context.read()
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, missing)
        except Exception as exc:  # noqa: BLE001 - a parser that raises (not one of ours)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {exc}"[:300])
        if request is grpc.aio.EOF:  # (half-closed at once)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the call ended without its request"
            )
        return request

    async def answer(inner: Callable, request: Any, context: grpc.aio.ServicerContext) -> Any:
        result = inner(request, context)  # (a servicer's default method is not async)
        return await result if inspect.isawaitable(result) else result

    if not handler.response_streaming:
        inner = handler.unary_unary

        async def stream_unary(requests, context):
            try:
                return await answer(inner, await first(context), context)
            except grpc.aio.AbortError as aborted:
                raise _lightened(aborted) from None

        return grpc.stream_unary_rpc_method_handler(stream_unary, **serializers)

    streaming = handler.unary_stream
    if inspect.iscoroutinefunction(streaming):  # (one that writes its answers itself)

        async def writes(requests, context):
            try:
                return await streaming(await first(context), context)
            except grpc.aio.AbortError as aborted:
                raise _lightened(aborted) from None

        return grpc.stream_stream_rpc_method_handler(writes, **serializers)

    async def streamed(requests, context):
        try:
            async for response in streaming(await first(context), context):
                yield response
        except grpc.aio.AbortError as aborted:
            raise _lightened(aborted) from None

    return grpc.stream_stream_rpc_method_handler(streamed, **serializers)


def _lightened(aborted: grpc.aio.AbortError) -> grpc.aio.AbortError:
    """``aborted`` without what it was raised through. gRPC keeps a call's AbortError with the
    call, whose context the handlers' frames hold: a cycle, freed only by a full collection,
    and the frames in its traceback (and in that of the error it was raised over) hold the
    request. 500 refused Gets of a 2 MiB key held ~1 GB of a node until one ran."""
    aborted.__traceback__ = None
    aborted.__context__ = None
    return aborted
