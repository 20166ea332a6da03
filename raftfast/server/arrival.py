"""A time limit on a one-request call's request, while many calls wait for theirs.

gRPC counts a call from its headers, and for a method of one request grpc.aio waits for that
request with no limit: calls whose request never came (a stranger's, in plain mode; any
certificate holder's, with TLS: health Check needs no role) held a port's
``MAX_CONCURRENT_RPCS`` places for as long as their connections stayed open, after one burst
(hunts: 9 connections of 1,024 such calls), and every other client, admin included, was
refused RESOURCE_EXHAUSTED meanwhile.

``ArrivalLimit`` serves every one-request method as a stream (the same on the wire: a client
sends one message, then half-closes) and reads its one request itself. While more than
``CROWDED_WAITING`` calls of the port wait for their request, those that have waited
``REQUEST_ARRIVAL_S`` or more are ended (RESOURCE_EXHAUSTED), oldest first, freeing their
places. With fewer waiting a request takes as long as its client allows (a big one over a slow
link: twelve 1 MiB puts at once over 1 MB/s took up to 12 s). It comes after the role check (a
caller without the method's role is refused at the call's start, before anything is waited
for) and before the request timer.

(A call whose answer its client gives no room for holds its place too, until the connection
closes: no Python API of grpc.aio ends a call whose message is still queued; cancelling the
handler's task or aborting it do not. docs/security.md, "Not done".)
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from raftfast.server.handlers import Twins

__all__ = ["CROWDED_WAITING", "REQUEST_ARRIVAL_S", "ArrivalLimit"]

# How long a call may wait for its request once the port is crowded (long enough for a
# request of the largest size over a slow link; short enough that places held by calls whose
# request never comes are soon free again), and what crowded is: more calls waiting for their
# request than this (well under the ~4,500 places the streams leave one-request calls).
REQUEST_ARRIVAL_S = 10.0
CROWDED_WAITING = 256
_SWEEP_S = 1.0  # while crowded, how often the calls that wait longest are looked at


class ArrivalLimit(grpc.aio.ServerInterceptor):
    """Ends one-request calls that have waited ``limit_s`` or more for their request while
    more than ``crowded`` wait (see the module doc)."""

    def __init__(self, limit_s: float | None = None, crowded: int | None = None) -> None:
        self.limit_s = REQUEST_ARRIVAL_S if limit_s is None else limit_s
        self.crowded = CROWDED_WAITING if crowded is None else crowded
        # The calls waiting for their request, longest first: each one's task -> since when.
        self.waiting: dict[asyncio.Task, float] = {}
        self.ended: set[asyncio.Task] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self._limited = Twins(lambda handler, _method: _limited(handler, self))

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_streaming:
            return handler  # unknown methods (UNIMPLEMENTED at once) and streams: as they are
        return self._limited.of(handler, details.method)

    def _end_longest(self) -> None:
        self._sweep = None
        loop = asyncio.get_running_loop()
        too_old = loop.time() - self.limit_s
        for task, since in list(self.waiting.items()):
            if len(self.waiting) <= self.crowded or since > too_old:
                break
            del self.waiting[task]
            self.ended.add(task)
            task.cancel()
        if len(self.waiting) > self.crowded:
            self._sweep = loop.call_later(_SWEEP_S, self._end_longest)

    async def first(self, context: grpc.aio.ServicerContext) -> Any:
        """The call's one request (read, not taken from the request iterator: a generator
        left after its first message would hold that message as long as the call's objects
        live), or the call ended (see the module doc)."""
        task = asyncio.current_task()
        if task is None:  # (not in a task: nothing to end)
            return await context.read()
        loop = asyncio.get_running_loop()
        self.waiting[task] = loop.time()
        if len(self.waiting) > self.crowded and self._sweep is None:
            self._sweep = loop.call_later(_SWEEP_S, self._end_longest)
        try:
            request = await context.read()
        except asyncio.CancelledError:
            if task not in self.ended:
                raise
            task.uncancel()  # (ended here: answered, not cancelled)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the request did not arrive within {self.limit_s:g} s of the call's start, "
                "while many calls waited for theirs; retry",
            )
        except Exception as exc:  # noqa: BLE001 - a parser that raises (not one of ours)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {exc}"[:300])
        finally:
            self.waiting.pop(task, None)
            self.ended.discard(task)
        if request is grpc.aio.EOF:  # (half-closed at once)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the call ended without its request"
            )
        return request


def _limited(handler: grpc.RpcMethodHandler, gate: ArrivalLimit) -> grpc.RpcMethodHandler:
    """``handler`` (of one request) served as a stream whose one request ``gate`` reads."""
    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    first = gate.first

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
            responses = streaming(await first(context), context)
            if not hasattr(responses, "__aiter__"):  # (a servicer's generator that is not async)
                for response in responses:
                    yield response
                return
            async for response in responses:
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
