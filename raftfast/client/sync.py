"""``SyncClient``: the blocking twin of ``Client``, for code without asyncio."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

import grpc

from raftfast._batch_py import to_bytes
from raftfast.client.blocking import FORKED, BlockingSession, NoTcpSession
from raftfast.client.calls import (
    DEFAULT_ENDPOINT,
    DEFAULT_TIMEOUT,
    DELETE,
    GET,
    PUT,
    BytesLike,
    ReadModeLike,
    not_raftfast,
    one_line,
    read_mode_of,
)
from raftfast.client.client import Client, cas_op
from raftfast.client.forks import client_thread_started
from raftfast.client.session import Op
from raftfast.errors import (
    ClusterUnavailableError,
    PermissionDeniedError,
    RaftfastError,
    RequestFailedError,
)

__all__ = ["SyncClient"]

_T = TypeVar("_T")


class SyncClient:
    """Blocking twin of ``Client`` for plain synchronous code.

    ``put``, ``get``, ``delete`` and ``cas`` go on a blocking connection of their own to the
    leader's Session stream over TCP (``BlockingSession``: a frame sent, its result read, no
    thread in between), where the node offers one. Every other call, and those of a thread that
    finds that connection busy (several threads at once), runs on a private event loop in a
    daemon thread: a ``Client`` whose calls from several threads share one pipelined session.
    Every method blocks until its result is in. Close it (``close()`` or ``with``) to stop the
    thread; one left open is closed when it is collected or when the interpreter exits, so no
    task of it is left pending.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str] = (DEFAULT_ENDPOINT,),
        *,
        timeout: float = DEFAULT_TIMEOUT,
        **options: Any,
    ) -> None:
        self._client = Client(endpoints, timeout=timeout, **options)  # (forks: refused?)
        self._options = {k: v for k, v in options.items() if k != "client_id"}
        self._loop = asyncio.new_event_loop()
        self._blocking: BlockingSession | None = None
        if options.get("session_transport", "auto") == "auto":
            # (not a bound method: the finalizer holds the session, which must not hold us)
            ports = functools.partial(_session_port, self._client, self._loop)
            self._blocking = BlockingSession(self._client, ports)
        self._closed = False
        self._pid = os.getpid()  # (its thread and connections are of this process only)
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="raftfast-client", daemon=True
        )
        self._thread.start()
        client_thread_started(self._thread)
        self._shutdown = weakref.finalize(
            self, _shutdown, self._client, self._blocking, self._loop, self._thread
        )

    @property
    def client_id(self) -> int:
        return self._client.client_id

    @property
    def leader(self) -> str | None:
        blocking = self._blocking
        return (blocking.leader if blocking is not None else None) or self._client.leader

    @property
    def endpoints(self) -> list[str]:
        return self._client.endpoints

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self._closed or os.getpid() != self._pid:
            coro.close()
            raise RaftfastError("client is closed" if self._closed else FORKED)
        try:
            return asyncio.run_coroutine_threadsafe(coro, self._loop).result()
        except concurrent.futures.CancelledError:
            if self._closed:  # (closed by another thread while this call ran)
                raise RaftfastError("client is closed") from None
            raise

    def close(self) -> None:
        """Close the client and stop its thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._shutdown()

    def _call(self, op: Op, timeout: float | None) -> Any:
        """``op`` on the blocking connection if it is free and usable, else on the loop."""
        if self._closed:
            raise RaftfastError("client is closed")
        blocking = self._blocking
        if blocking is not None and blocking.lock.acquire(blocking=False):
            try:
                return blocking.call(op, timeout)
            except NoTcpSession as exc:
                timeout = max(exc.remaining, 1e-3)  # (the loop's way, in the time left)
                if op.sequence:  # (a write that may be out under the blocking session's id)
                    return self._run(self._finish_as(exc.client_id, op, timeout))
            finally:
                blocking.lock.release()
        return self._run(_awaited(self._client._submit_one, op, timeout))

    async def _finish_as(self, client_id: int, op: Op, timeout: float) -> Any:
        """``op``, a write that may have reached a node under ``client_id`` with its sequence,
        by a ``Client`` with that id (gRPC where TCP fails): applied once whichever copy gets
        there. The twin never numbers a write of its own (``op`` has its number), so it
        shares no sequence with the blocking session's later writes."""
        async with Client(
            self._client.endpoints, timeout=timeout, client_id=client_id, **self._options
        ) as twin:
            return await twin._submit_one(op, timeout)

    def put(self, key: BytesLike, value: BytesLike, *, timeout: float | None = None) -> None:
        self._call(Op(PUT, to_bytes(key, "key"), to_bytes(value, "value")), timeout)

    def get(
        self,
        key: BytesLike,
        *,
        read_mode: ReadModeLike = None,
        timeout: float | None = None,
    ) -> bytes | None:
        op = Op(GET, to_bytes(key, "key"), read_mode=read_mode_of(read_mode))
        result: bytes | None = self._call(op, timeout)
        return result

    def delete(self, key: BytesLike, *, timeout: float | None = None) -> bool:
        result: bool = self._call(Op(DELETE, to_bytes(key, "key")), timeout)
        return result

    def cas(
        self,
        key: BytesLike,
        expected: BytesLike | None,
        new: BytesLike,
        *,
        timeout: float | None = None,
    ) -> bool:
        result: bool = self._call(cas_op(key, expected, new), timeout)
        return result

    def put_many(
        self,
        items: Iterable[tuple[BytesLike, BytesLike]],
        *,
        timeout: float | None = None,
    ) -> None:
        self._run(self._client.put_many(list(items), timeout=timeout))

    def scan(
        self,
        prefix: BytesLike = b"",
        limit: int = 1000,
        *,
        read_mode: ReadModeLike = None,
        timeout: float | None = None,
    ) -> list[tuple[bytes, bytes]]:
        return self._run(self._client.scan(prefix, limit, read_mode=read_mode, timeout=timeout))

    def status(
        self, endpoint: str | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        return self._run(self._client.status(endpoint, timeout=timeout))

    def transfer_leader(self, target: str, *, timeout: float | None = None) -> str:
        return self._run(self._client.transfer_leader(target, timeout=timeout))

    def save_snapshot(self, path: str, *, timeout: float | None = None) -> dict[str, int]:
        return self._run(self._client.save_snapshot(path, timeout=timeout))

    def members(self, *, timeout: float | None = None) -> dict[str, Any]:
        return self._run(self._client.members(timeout=timeout))

    def add_member(
        self, node_id: str, address: str, *, learner: bool = False, timeout: float | None = None
    ) -> dict[str, Any]:
        return self._run(
            self._client.add_member(node_id, address, learner=learner, timeout=timeout)
        )

    def promote_member(self, node_id: str, *, timeout: float | None = None) -> dict[str, Any]:
        return self._run(self._client.promote_member(node_id, timeout=timeout))

    def demote_member(self, node_id: str, *, timeout: float | None = None) -> dict[str, Any]:
        return self._run(self._client.demote_member(node_id, timeout=timeout))

    def alarms(self, *, timeout: float | None = None) -> dict[str, Any]:
        return self._run(self._client.alarms(timeout=timeout))

    def propose(self, command: BytesLike, *, timeout: float | None = None) -> bytes:
        return self._run(self._client.propose(command, timeout=timeout))

    def query(
        self, request: BytesLike, *, read_mode: ReadModeLike = None, timeout: float | None = None
    ) -> bytes:
        return self._run(self._client.query(request, read_mode=read_mode, timeout=timeout))

    def disarm_alarms(self, *, timeout: float | None = None) -> dict[str, Any]:
        return self._run(self._client.disarm_alarms(timeout=timeout))

    def remove_member(self, node_id: str, *, timeout: float | None = None) -> dict[str, Any]:
        return self._run(self._client.remove_member(node_id, timeout=timeout))


def _session_port(
    client: Client, loop: asyncio.AbstractEventLoop, target: str, timeout: float
) -> int:
    """``target``'s Session port over TCP, from its Status asked on ``loop`` (for
    ``BlockingSession``): PermissionDeniedError or RequestFailedError if it refuses to say,
    ClusterUnavailableError if it cannot be asked (why, without ``target``: the caller adds it
    to its last error)."""
    try:
        call = client._ask_session_port(target, timeout)
        return asyncio.run_coroutine_threadsafe(call, loop).result(timeout + 5)
    except concurrent.futures.TimeoutError:  # (the loop is stopping: the client closes)
        raise ClusterUnavailableError("no answer to Status") from None
    except concurrent.futures.CancelledError:  # (closed by another thread meanwhile)
        raise RaftfastError("client is closed") from None
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code(), one_line(exc.details() or exc.code().name.lower())
        if code == grpc.StatusCode.PERMISSION_DENIED:
            raise PermissionDeniedError(f"{target}: {details}") from None
        if code == grpc.StatusCode.UNIMPLEMENTED:
            raise RequestFailedError(not_raftfast(target, "Status"), code.name) from None
        if code == grpc.StatusCode.FAILED_PRECONDITION:  # (a node of another cluster)
            raise RequestFailedError(f"{target}: {details}", code.name) from None
        raise ClusterUnavailableError(details) from None  # (the caller names ``target``)


def _shutdown(
    client: Client,
    blocking: BlockingSession | None,
    loop: asyncio.AbstractEventLoop,
    thread: threading.Thread,
) -> None:
    """Close ``blocking`` and ``client`` (on its loop), then stop the loop and its thread (not
    a method: the finalizer must not keep the SyncClient alive)."""
    if blocking is not None:
        blocking.close()
    try:
        if thread.is_alive():
            asyncio.run_coroutine_threadsafe(_close(client), loop).result(timeout=10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()


async def _close(client: Client) -> None:
    """Close ``client``, then let every task still on the loop end (gRPC's own, which finish
    a call's status a moment after it returned), as ``asyncio.run`` does before closing."""
    await client.close()
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    if others:
        _, stuck = await asyncio.wait(others, timeout=1.0)
        for task in stuck:
            task.cancel()
        await asyncio.gather(*stuck, return_exceptions=True)


async def _awaited(
    submit: Callable[[Op, float | None], Awaitable[_T]], op: Op, timeout: float | None
) -> _T:
    """``submit(op, timeout)``'s result, called in the client's loop (run_coroutine_threadsafe
    takes a coroutine)."""
    return await submit(op, timeout)
