"""The client's end of the Session stream over plain TCP (raftfast/server/session_stream.py).

``TcpSessionCall`` behaves as the part of a ``grpc.aio`` stream-stream call the Session loop
uses (``write``, ``read``, ``cancel``, ``done``, ``code``, ``details``,
``trailing_metadata``), so the loop's retries, redirects and deadlines are the same on
either; a failure is an ``AioRpcError`` with the status the node ended the stream with, or
UNAVAILABLE when the connection failed (``connect_failed``: it never opened; "timeout" if it
was not answered in time, a firewall's silence, "refused" if it failed otherwise).
``answered``: the node said anything at all (a result, or the status it ended with).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import grpc
from google.protobuf.message import DecodeError

from raftfast.proto import raftfast_pb2 as pb
from raftfast.transport import tcp

log = logging.getLogger("raftfast.client")
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
_CODES = {code.value[0]: code for code in grpc.StatusCode}
MAX_RESULT_BYTES = 256 * 1024 * 1024  # an answer is at most a few MiB of values (the node)


class _Protocol(asyncio.Protocol):
    def __init__(self, call: TcpSessionCall) -> None:
        self.call = call
        self.records = tcp._Records()
        self.records.limit = MAX_RESULT_BYTES

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp.tune(transport)

    def data_received(self, data: bytes) -> None:
        call = self.call
        try:
            for payload in self.records.feed(data):
                result = pb.SessionResult.FromString(payload)
                call._answered()
                if result.frame_id == 0:
                    call._end(_CODES.get(result.code, grpc.StatusCode.UNKNOWN), result.error)
                    return
                call._deliver(result)
        except (tcp.Refused, DecodeError) as exc:
            call._end(grpc.StatusCode.INTERNAL, f"unreadable answer on the Session stream: {exc}")
        except Exception as exc:  # noqa: BLE001 - (on_result) the stream ends, the client goes on
            log.exception("a Session result could not be taken")
            call._end(grpc.StatusCode.INTERNAL, f"a result could not be taken: {exc!r}")

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc is not None else ""
        self.call._end(_UNAVAILABLE, f"the Session stream's connection closed{reason}")

    def pause_writing(self) -> None:
        self.call._writable.clear()

    def resume_writing(self) -> None:
        self.call._writable.set()


class TcpSessionCall:
    """One Session stream to ``host:port`` (over TLS with ``ssl_context``), opened at once;
    ``serialize`` turns what ``write`` is given into a ``SessionFrame``'s bytes."""

    def __init__(
        self,
        host: str,
        port: int,
        hello: pb.SessionHello,
        serialize: Any,
        connect_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        on_answer: Callable[[], None] | None = None,
    ) -> None:
        self.target = f"{host}:{port}"
        self.connect_failed = ""  # "timeout" | "refused": the connection never opened
        self._serialize = serialize
        self._on_answer = on_answer
        self.answered = False
        # Where results go as they arrive; None: ``read`` returns them. (``read`` still ends
        # with the stream either way.)
        self.on_result: Callable[[pb.SessionResult], None] | None = None
        self._transport: asyncio.Transport | None = None
        self._results: deque[pb.SessionResult] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._tls = ssl_context is not None  # (tcp.write_record)
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._opened = asyncio.ensure_future(
            self._open(host, port, hello.SerializeToString(), connect_timeout, ssl_context)
        )

    async def _open(
        self,
        host: str,
        port: int,
        hello: bytes,
        timeout: float,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        extra: dict[str, Any] = {"ssl": ssl_context, "server_hostname": host} if ssl_context else {}
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: _Protocol(self), host, port, **extra), timeout
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self.connect_failed = "timeout" if isinstance(exc, TimeoutError) else "refused"
            self._end(_UNAVAILABLE, f"cannot open the Session stream at {self.target}: {exc!r}")
            return
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if self._code is not None:  # (cancelled meanwhile)
            transport.close()
            return
        self._transport.write(tcp.record(hello))

    # -- what the Session loop calls --------------------------------------------------------

    def writable_now(self) -> bool:
        """``write_now`` may be called: the connection is open, not over, not held back."""
        return self._transport is not None and self._code is None and self._writable.is_set()

    def write_now(self, item: Any) -> None:
        """``write`` when ``writable_now()``: at once, from any task."""
        tcp.write_record(self._transport, [self._serialize(item)], self._tls)  # type: ignore[arg-type]

    async def write(self, item: Any) -> None:
        if self._transport is None:
            await asyncio.shield(self._opened)
        if self._code is not None:
            raise self._error()
        transport = self._transport
        assert transport is not None
        tcp.write_record(transport, [self._serialize(item)], self._tls)
        if not self._writable.is_set():
            await self._writable.wait()  # (the node does not read: hold back, as HTTP/2 does)
            if self._code is not None:
                raise self._error()

    async def read(self) -> Any:
        while not self._results:
            if self._code is not None:
                if self._code == grpc.StatusCode.OK:
                    return grpc.aio.EOF
                raise self._error()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._results.popleft()

    def cancel(self) -> bool:
        if self._code is not None:
            return False
        self._opened.cancel()  # (still connecting: stop)
        self._end(grpc.StatusCode.CANCELLED, "cancelled by the client")
        return True

    def done(self) -> bool:
        return self._code is not None

    async def code(self) -> grpc.StatusCode | None:
        return self._code

    async def details(self) -> str:
        return self._details

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        return grpc.aio.Metadata()  # (a leader hint travels in each op's result)

    # -- from the connection ----------------------------------------------------------------

    def _answered(self) -> None:
        if not self.answered:
            self.answered = True
            if self._on_answer is not None:
                self._on_answer()

    def _deliver(self, result: pb.SessionResult) -> None:
        if self.on_result is not None:
            self.on_result(result)  # (straight from the connection: no task step in between)
            return
        self._results.append(result)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _end(self, code: grpc.StatusCode, details: str) -> None:
        """The stream is over (the first reason counts); wake whoever waits."""
        if self._code is None:
            self._code, self._details = code, details
        if self._transport is not None:
            self._transport.close()
        self._writable.set()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _error(self) -> grpc.aio.AioRpcError:
        assert self._code is not None
        return grpc.aio.AioRpcError(
            self._code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=self._details
        )
