"""What every client-facing service (KV, StateMachine, Admin) shares: one mapping of errors to
gRPC statuses, the leader hint in the trailing metadata, the cluster-id check, the checks of
ids and sizes, deadlines.

    class MyService(Service, pb_grpc.MyServicer):
        @rpc
        async def Method(self, request, context): ...

Statuses (a message a human can act on with each):

* INVALID_ARGUMENT: ``BadRequest`` (validation at the boundary);
* FAILED_PRECONDITION: a ``ValueError`` from the node (the request makes no sense now: not a
  member, the last voter...), a state machine's ``CommandError``, a wrong ``cluster-id``;
* UNAVAILABLE: not the leader; ``leader-id`` and ``leader-address`` in the trailing metadata;
* ABORTED: a membership change is in progress (retry);
* DEADLINE_EXCEEDED: the call's deadline passed first;
* RESOURCE_EXHAUSTED: ``NoSpace`` (the quota);
* INTERNAL: anything else (logged; the node keeps serving).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from raftfast.dedup import owned_client_id
from raftfast.errors import (
    ChangeInProgressError,
    CommandError,
    DiskFullError,
    NotLeaderError,
    clipped,
    message_of,
)
from raftfast.limits import MAX_CLIENT_ID, MAX_SEQUENCE, check_node_id
from raftfast.proto import raftfast_pb2 as pb
from raftfast.security.roles import Authorizer
from raftfast.security.tls import caller_name

__all__ = ["BadRequest", "NoSpace", "Service", "rpc"]

log = logging.getLogger("raftfast.service")

T = TypeVar("T")
DEADLINE_MARGIN = 0.05  # seconds before the RPC deadline at which a service gives up itself
MODES = {
    pb.READ_LINEARIZABLE: "linearizable",
    pb.READ_LEASE: "lease",
    pb.READ_STALE: "stale",
}
DEADLINE_WRITE = "not committed within the deadline; the write may or may not have been applied"
DEADLINE_READ = "read not safe within the deadline (no confirmed leader in time)"


class BadRequest(Exception):
    """A request that fails validation: INVALID_ARGUMENT (or per-op code 3)."""


class NoSpace(Exception):
    """A write the quota refuses: RESOURCE_EXHAUSTED (see raftfast.kv.quota)."""


class Service:
    """The shared half of a client-facing service over ``node`` (the driver)."""

    peer_hints = False  # leader hints name peer addresses (the peer port's services)
    authorizer: Authorizer | None = None  # client certificates are checked (roles)

    def __init__(self, node: Any) -> None:
        self.node = node

    def own_client_id(self, client_id: int, context: grpc.aio.ServicerContext) -> int:
        """The id the exactly-once table knows a caller's ``client_id`` by: with client
        certificates, drawn from the certificate's name too (``owned_client_id``), so that no
        client can reuse another's id (0, no exactly-once, stays 0)."""
        if self.authorizer is None:
            return client_id
        return owned_client_id(client_id, caller_name(context))

    async def check_cluster(self, context: grpc.aio.ServicerContext) -> None:
        """Refuse a client that says it talks to another cluster (a misrouted address)."""
        for key, value in context.invocation_metadata() or ():
            if key == "cluster-id" and value != self.node.settings.cluster_id:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"wrong cluster: this node serves cluster {self.node.settings.cluster_id!r},"
                    f" the client expects {value[:300]!r}",
                )

    def leader_hint(self, exc: NotLeaderError) -> tuple[str | None, str | None]:
        """(leader id, its address) for a redirect, as far as known."""
        leader_id = exc.leader_id or None
        if leader_id is None:
            return None, None
        address_of = self.node.peer_address_of if self.peer_hints else self.node.address_of
        try:
            return leader_id, address_of(leader_id)
        except Exception:  # noqa: BLE001 - a hint is best effort
            return leader_id, None

    async def settle_leader(
        self, exc: BaseException, context: grpc.aio.ServicerContext
    ) -> BaseException:
        """A "not the leader" while no leader is known (an election is on), or while the one
        we know has gone silent (it may be dead): wait for the election's outcome, up to an
        election timeout within the call's deadline, so that the client goes straight to the
        new leader instead of to a dead one, or backing off blind."""
        if not isinstance(exc, NotLeaderError) or self.node.stopping:
            return exc
        if exc.leader_id and self.node.is_leader:
            return exc  # (a leader handing over names its successor)
        remaining = context.time_remaining()
        budget = self.node.election_timeout_s
        if remaining is not None:
            budget = min(budget, remaining - DEADLINE_MARGIN)
        leader = await self.node.leader_soon(budget)
        return NotLeaderError(str(exc), leader) if leader and leader != exc.leader_id else exc

    def not_leader_message(self, exc: NotLeaderError) -> str:
        leader_id, address = self.leader_hint(exc)
        if leader_id is None:
            detail = str(exc) if str(exc) not in ("", "not the leader") else ""
            return "not the leader; leader unknown" + (
                f" ({detail})" if detail else " (election in progress?), retry shortly"
            )
        return f"not the leader; leader is {leader_id} at {address or 'unknown address'}"

    @staticmethod
    async def timed(
        context: grpc.aio.ServicerContext, awaitable: Awaitable[T], deadline_message: str
    ) -> T:
        """Await a node call within the RPC's deadline (TimeoutError with the message), giving
        up slightly before it so that the explanatory status still reaches the client."""
        remaining = context.time_remaining()
        if remaining is None:
            return await awaitable
        margin = min(DEADLINE_MARGIN, remaining * 0.1)
        try:
            # (not wait_for: in Python 3.11 it wraps the awaitable in a Task of its own, a
            # noticeable share of a single write's CPU)
            async with asyncio.timeout(max(remaining - margin, 0.0)):
                return await awaitable
        except TimeoutError:
            raise TimeoutError(deadline_message) from None

    def read_mode(self, read_mode: int) -> str:
        if read_mode == pb.READ_DEFAULT:
            return self.node.settings.read_mode
        mode = MODES.get(read_mode)
        if mode is None:
            raise BadRequest(f"unknown read_mode {read_mode}")
        return mode

    def check_size(self, size: int) -> None:
        limit = self.node.settings.max_request_bytes
        if size > limit:
            raise BadRequest(f"request is {size} bytes; the limit is {limit} (--max-request-bytes)")

    @staticmethod
    def check_client_id(client_id: int) -> None:
        if client_id > MAX_CLIENT_ID:
            raise BadRequest(f"client_id {client_id} is out of range [0, {MAX_CLIENT_ID}]")

    @staticmethod
    def check_sequence(sequence: int) -> None:
        if sequence > MAX_SEQUENCE:
            raise BadRequest(f"sequence {sequence} is out of range [0, {MAX_SEQUENCE}]")

    @staticmethod
    def check_node_id(node_id: str) -> None:
        try:
            check_node_id(node_id)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None

    async def _refusal(
        self, failure: Exception, context: grpc.aio.ServicerContext, what: str
    ) -> tuple[grpc.StatusCode, str]:
        """The status a unary handler's ``failure`` is answered with (a NotLeaderError's
        leader named in the trailing metadata)."""
        exc = await self.settle_leader(failure, context)
        if isinstance(exc, NotLeaderError):
            leader_id, address = self.leader_hint(exc)
            if leader_id:
                md = (("leader-id", leader_id), ("leader-address", address or ""))
                context.set_trailing_metadata(md)
        return status_of(self, exc, what)

    def timeout_of(self, context: grpc.aio.ServicerContext, default: float = 60.0) -> float:
        """Seconds a long node call may take: the call's deadline, a little early."""
        remaining = context.time_remaining()
        return default if remaining is None else max(remaining - DEADLINE_MARGIN, 0.05)


def rpc(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """A unary handler of a ``Service``: the cluster id checked first, every exception mapped
    to its status (see the module docs), none escaping as a crash."""

    @functools.wraps(method)
    async def wrapper(self: Service, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            await self.check_cluster(context)
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as failure:  # noqa: BLE001 - every failure becomes a status
            code, message = await self._refusal(failure, context, method.__name__)
        # (out of the except block: nothing of the failure is held here, whose traceback's
        # frames hold the request; gRPC keeps the abort with the call)
        await context.abort(code, message)
        raise AssertionError("unreachable: context.abort always raises")

    return wrapper


def status_of(service: Service, exc: BaseException, what: str) -> tuple[grpc.StatusCode, str]:
    """The status and message a failure of ``what`` becomes (per op in a Session too); the
    message valid UTF-8, however it was made (``clipped``)."""
    code, message = _status_of(service, exc, what)
    return code, clipped(message)


def _status_of(service: Service, exc: BaseException, what: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, BadRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, NoSpace | DiskFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, NotLeaderError):
        return grpc.StatusCode.UNAVAILABLE, service.not_leader_message(exc)
    if isinstance(exc, ChangeInProgressError):
        return grpc.StatusCode.ABORTED, f"{exc}; retry"
    if isinstance(exc, CommandError):
        return grpc.StatusCode.FAILED_PRECONDITION, f"state machine: {exc}"
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or DEADLINE_WRITE
    if isinstance(exc, ValueError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    log.error("%s failed", what, exc_info=exc)
    failure = f"{type(exc).__name__}: {message_of(exc)}"
    return grpc.StatusCode.INTERNAL, f"internal error in {what}: {failure}"
