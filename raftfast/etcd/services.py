"""etcd's gRPC services (etcdserverpb KV, Lease, Cluster, Maintenance; Watch is in
``raftfast.etcd.watch``) on a node's client port: each call is handed to ``EtcdAPI.handle``,
and its ``EtcdError`` becomes the status etcd would send. Bytes that are no request are answered
INVALID_ARGUMENT (``Malformed``). Nothing else escapes: an unexpected failure is logged and
answered INTERNAL, and the node goes on serving."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from raftfast.etcd import errors
from raftfast.etcd.api import EtcdAPI
from raftfast.etcd.errors import EtcdError
from raftfast.etcd.watch import WatchService
from raftfast.proto.etcd import rpc_pb2 as pb
from raftfast.proto.etcd import rpc_pb2_grpc as pb_grpc

__all__ = ["SERVICE_NAMES", "add_etcd_services"]

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    "etcdserverpb.KV",
    "etcdserverpb.Watch",
    "etcdserverpb.Lease",
    "etcdserverpb.Cluster",
    "etcdserverpb.Maintenance",
)


class Malformed:
    """A request that did not parse (garbage bytes, a Txn nested past protobuf's limit): its
    handler answers INVALID_ARGUMENT. (A deserializer that raises makes gRPC answer UNKNOWN.)"""

    __slots__ = ("error",)

    def __init__(self, error: EtcdError) -> None:
        self.error = error


def _parser(cls: type) -> Any:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, too deep a message...
            return Malformed(errors.invalid(f"malformed {cls.__name__}: {exc}"[:300]))

    return parse


async def _call(api: EtcdAPI, method: str, request: Any, context: grpc.aio.ServicerContext):
    try:
        if isinstance(request, Malformed):
            raise request.error
        return await api.handle(method, request, context.time_remaining())
    except EtcdError as exc:
        await context.abort(exc.code, exc.message)
    except (grpc.aio.AbortError, asyncio.CancelledError):
        raise
    except Exception as exc:  # noqa: BLE001 - a status, never a crash
        log.error("etcd %s failed", method, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"etcdserver: internal error: {exc!r}")


def _unary(method: str):
    async def handler(self, request, context):
        return await _call(self.api, method, request, context)

    handler.__name__ = method.split("/")[1]
    return handler


class _Base:
    def __init__(self, api: EtcdAPI) -> None:
        self.api = api


class KVService(_Base, pb_grpc.KVServicer):
    Range = _unary("KV/Range")
    Put = _unary("KV/Put")
    DeleteRange = _unary("KV/DeleteRange")
    Txn = _unary("KV/Txn")
    Compact = _unary("KV/Compact")


class LeaseService(_Base, pb_grpc.LeaseServicer):
    LeaseGrant = _unary("Lease/LeaseGrant")
    LeaseRevoke = _unary("Lease/LeaseRevoke")
    LeaseTimeToLive = _unary("Lease/LeaseTimeToLive")
    LeaseLeases = _unary("Lease/LeaseLeases")

    async def LeaseKeepAlive(  # noqa: N802 - gRPC naming
        self,
        request_iterator: AsyncIterator[pb.LeaseKeepAliveRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.LeaseKeepAliveResponse]:
        async for request in request_iterator:
            yield await _call(self.api, "Lease/LeaseKeepAlive", request, context)


class ClusterService(_Base, pb_grpc.ClusterServicer):
    MemberAdd = _unary("Cluster/MemberAdd")
    MemberRemove = _unary("Cluster/MemberRemove")
    MemberList = _unary("Cluster/MemberList")
    MemberPromote = _unary("Cluster/MemberPromote")


class MaintenanceService(_Base, pb_grpc.MaintenanceServicer):
    Alarm = _unary("Maintenance/Alarm")
    Status = _unary("Maintenance/Status")
    Defragment = _unary("Maintenance/Defragment")
    Hash = _unary("Maintenance/Hash")
    HashKV = _unary("Maintenance/HashKV")
    MoveLeader = _unary("Maintenance/MoveLeader")


def add_etcd_services(server: grpc.aio.Server, api: EtcdAPI) -> WatchService:
    """Serve the etcd API on ``server``; returns the Watch service (to be told of applies)."""
    watch = WatchService(api)
    _register(server, "KV", KVService(api))
    _register(server, "Lease", LeaseService(api))
    _register(server, "Cluster", ClusterService(api))
    _register(server, "Maintenance", MaintenanceService(api))
    _register(server, "Watch", watch)
    return watch


_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _register(server: grpc.aio.Server, name: str, servicer: Any) -> None:
    """What the generated ``add_<name>Servicer_to_server`` does, but with request parsers that
    never raise (``Malformed``)."""
    service = pb.DESCRIPTOR.services_by_name[name]
    handlers = {
        m.name: _HANDLERS[m.client_streaming, m.server_streaming](
            getattr(servicer, m.name),
            request_deserializer=_parser(getattr(pb, m.input_type.name)),
            response_serializer=getattr(pb, m.output_type.name).SerializeToString,
        )
        for m in service.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)
