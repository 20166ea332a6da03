"""gRPC health checking (``grpc.health.v1.Health``) and server reflection on the client port.

Health: one status for ``""`` (the server) and for each raftfast service the node serves
(``raftfast.v1.KV``, ``raftfast.v1.Admin``, and ``raftfast.v1.StateMachine`` with a state
machine of one's own), all the same:

* SERVING once the node knows a leader of its term (itself included) and has applied at least
  the commit index it knew when it started (its WAL's; so a restarted node is not sent
  traffic before it has replayed what it had acknowledged);
* NOT_SERVING otherwise: no leader known (an election, or cut off from the others: a follower
  forgets its leader after an election timeout without word from it; a leader that cannot
  reach a quorum steps down, check-quorum), still catching up, refused by its leader (a
  member restarted on a wiped data directory, whose peers refuse it: it was SERVING with
  nothing applied, and its etcd requests waited out their deadlines), and from the moment
  the node starts stopping (for good).

The driver asks ``update`` on every tick; only a change is passed to the servicer (which
wakes the Watch streams). Nothing here waits for a client: a Watch stream its client does not
read holds up only itself (grpc_health's own asyncio servicer held a lock while it wrote, and
every status change waited for it: one such client stopped a node's ticker, so its elections,
and its shutdown).

Reflection (``grpc.reflection.v1alpha.ServerReflection``) lists the client services, health
and reflection itself, so ``grpcurl`` and the like can list and call the API without the
.proto file.

Both are streams anyone may hold open (health needs no role): at most ``MAX_WATCHES`` Watch
and ``MAX_REFLECTION_STREAMS`` reflection streams at once, more are refused with
RESOURCE_EXHAUSTED. 8,192 unread Watch streams (a certificate without a role can open them)
took every call the client port serves: no client got in (a hostile hunt). A load balancer
needs a few; ``Check`` is never refused.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from raftfast.server.handlers import GenericOnly, StreamBound

if TYPE_CHECKING:
    from raftfast.server.driver import Driver

__all__ = ["ADMIN_SERVICE", "Health", "enable_reflection"]

ADMIN_SERVICE = "raftfast.v1.Admin"
HEALTH_SERVICE = health.SERVICE_NAME  # grpc.health.v1.Health
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

log = logging.getLogger(__name__)

MAX_WATCHES = 256
MAX_REFLECTION_STREAMS = 64


def _refusal(what: str, most: int) -> str:
    return f"this node serves at most {most} {what} streams at once"


class HealthServicer(health_pb2_grpc.HealthServicer):
    """``grpc.health.v1.Health`` for a fixed set of services: ``Check``, and ``Watch`` streams
    that send each status as it changes (the newest one: a stream that fell behind skips the
    ones between, as the protocol allows). ``set`` never waits."""

    def __init__(self, services: tuple[str, ...], status: int) -> None:
        self._status = dict.fromkeys(services, status)
        self._watches = StreamBound(MAX_WATCHES)
        self._changed = asyncio.Event()  # set, and replaced, at every change
        self._final = False

    def set(self, status: int) -> None:
        """Every service's status (after ``shutdown``: nothing changes any more)."""
        if self._final:
            return
        for service in self._status:
            self._status[service] = status
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def shutdown(self) -> None:
        """NOT_SERVING for good."""
        self.set(_NOT_SERVING)
        self._final = True

    async def Check(self, request, context):  # noqa: N802 - gRPC naming
        status = self._status.get(request.service)
        if status is None:
            # (a stranger's name may be megabytes: a status message that long is not sent)
            name = request.service[:100]
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {name!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def List(self, request, context):  # noqa: N802 - gRPC naming
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._status.items()
            }
        )

    async def Watch(self, request, context):  # noqa: N802 - gRPC naming
        async with self._watches.held(context, _refusal("health Watch", MAX_WATCHES)):
            await self._watch(request.service, context)

    async def _watch(self, service: str, context: grpc.aio.ServicerContext) -> None:
        sent = None
        while True:
            changed = self._changed
            status = self._status.get(service, _UNKNOWN)
            if status == sent:
                await changed.wait()
                continue
            try:
                await context.write(health_pb2.HealthCheckResponse(status=status))
            except Exception as exc:  # noqa: BLE001 - the client went away: its stream is over
                log.debug("a health Watch stream ended: %r", exc)
                return
            sent = status


class Health:
    """The health servicer of one driver, its services NOT_SERVING until ``update`` finds the
    node ready."""

    def __init__(self, driver: Driver, services: tuple[str, ...]) -> None:
        self.driver = driver
        self.servicer = HealthServicer(("", *services), _NOT_SERVING)
        self.serving = False
        self.ready_from = 0  # the commit index known at start: applied before SERVING

    def add_to(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, GenericOnly(server))

    def ready(self) -> bool:
        d = self.driver
        raw = d.raw
        return (
            not d.stopping
            and raw is not None
            and bool(raw.leader)
            and d.applied_index >= self.ready_from
            # (a leader that refuses us, say as a wiped member, sends us nothing to apply)
            and not d.transport.refused_by(raw.leader)
        )

    def update(self) -> None:
        """Pass the node's status on, if it changed (cheap otherwise: a few attribute reads)."""
        serving = self.ready()
        if serving != self.serving:
            self.serving = serving
            self.servicer.set(_SERVING if serving else _NOT_SERVING)

    def shutdown(self) -> None:
        """NOT_SERVING for good (the node is stopping)."""
        self.serving = False
        self.servicer.shutdown()


def enable_reflection(server: grpc.aio.Server, services: tuple[str, ...]) -> None:
    """Reflection on ``server`` for ``services``, health and reflection itself, by its
    asyncio servicer, named here: ``enable_server_reflection`` picks one by the server's type
    and takes a GenericOnly for a sync server (whose servicer holds a thread per open stream)."""
    names = (*services, HEALTH_SERVICE, reflection.SERVICE_NAME)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        _Reflection(names), GenericOnly(server)
    )


class _Reflection(reflection.aio.ReflectionServicer):
    """grpc_reflection's servicer, its streams bounded (MAX_REFLECTION_STREAMS) and its
    answers written here: a client that went away with answers unread made gRPC log an ERROR
    and a traceback per stream (any client's to cause)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__(names)
        self._streams = StreamBound(MAX_REFLECTION_STREAMS)

    async def ServerReflectionInfo(self, request_iterator, context):  # noqa: N802
        async with self._streams.held(context, _refusal("reflection", MAX_REFLECTION_STREAMS)):
            try:
                async for answer in super().ServerReflectionInfo(request_iterator, context):
                    try:
                        await context.write(answer)
                    except Exception as exc:  # noqa: BLE001 - the client went away: it is over
                        log.debug("a reflection stream ended: %r", exc)
                        return
            except DecodeError as exc:  # (bytes that are no request: the client's doing)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {exc}")
            except Exception as exc:
                if not context.done():
                    raise
                log.debug("a reflection stream ended: %r", exc)  # (its reads failed, the same)
