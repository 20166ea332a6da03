"""etcd's gRPC services (etcdserverpb KV, Lease, Cluster, Maintenance; Watch is in
``raftfast.etcd.watch``) on a node's client port: each call is handed to ``EtcdAPI.handle``,
and its ``EtcdError`` becomes the status etcd would send. Bytes that are no request are
answered INVALID_ARGUMENT (``raftfast.server.handlers``). Nothing else escapes: an unexpected
failure is logged and answered INTERNAL, and the node goes on serving."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import closing
from typing import Any

import grpc

from raftfast.errors import DiskFullError, NotLeaderError, clipped
from raftfast.etcd import errors
from raftfast.etcd.api import EtcdAPI
from raftfast.etcd.errors import EtcdError
from raftfast.etcd.watch import WatchService
from raftfast.proto.etcd import rpc_pb2 as pb
from raftfast.proto.etcd import rpc_pb2_grpc as pb_grpc
from raftfast.server.admin import SNAPSHOT_SAVES_AT_ONCE
from raftfast.server.handlers import Malformed, StreamBound, register
from raftfast.storage.backup import BackupInfo, header_bytes, seal, seal_size

__all__ = ["SERVICE_NAMES", "add_etcd_services"]

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    "etcdserverpb.KV",
    "etcdserverpb.Watch",
    "etcdserverpb.Lease",
    "etcdserverpb.Cluster",
    "etcdserverpb.Maintenance",
)

# Open LeaseKeepAlive streams, node-wide (an etcd client keeps one for all its leases): idle
# streams hold a place of the port's MAX_CONCURRENT_RPCS each, and the streams' bounds together
# leave room for one-request calls.
MAX_KEEPALIVE_STREAMS = 2_048


async def _call(
    api: EtcdAPI,
    method: str,
    request: Any,
    context: grpc.aio.ServicerContext,
    check_leader: bool = True,
):
    """``request`` answered, or its EtcdError sent as the call's status. ``check_leader``: a
    call that asks for a leader is refused first if this member knows none (etcd's
    interceptors): a one-request call's; a stream's requests are not, it was at its start."""
    try:
        if check_leader:
            api.leader_required.check(context)
        if isinstance(request, Malformed):  # (in a stream: a one-request call never gets here)
            raise EtcdError(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await api.handle(method, request, context.time_remaining())
    except EtcdError as exc:
        await context.abort(exc.code, clipped(exc.message))
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

    def __init__(self, api: EtcdAPI) -> None:
        super().__init__(api)
        self._keepalives = StreamBound(MAX_KEEPALIVE_STREAMS)

    async def LeaseKeepAlive(  # noqa: N802 - gRPC naming
        self,
        request_iterator: AsyncIterator[pb.LeaseKeepAliveRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.LeaseKeepAliveResponse]:
        leader_required = self.api.leader_required
        asked = await leader_required.check_stream(context)
        untrack = leader_required.track(leader_required.ender(context)) if asked else None
        too_many = errors.TOO_MANY_REQUESTS
        try:
            async with self._keepalives.held(context, too_many.message, too_many.code):
                async for request in request_iterator:
                    yield await _call(
                        self.api, "Lease/LeaseKeepAlive", request, context, check_leader=False
                    )
        finally:
            if untrack is not None:
                untrack()


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

    def __init__(self, api: EtcdAPI) -> None:
        super().__init__(api)
        self._snapshots = StreamBound(SNAPSHOT_SAVES_AT_ONCE)  # Snapshot streams under way

    async def Snapshot(  # noqa: N802 - gRPC naming
        self, request: pb.SnapshotRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SnapshotResponse]:
        """etcd's ``snapshot save``: this member's state as a raftfast backup file, the one
        ``raftfast snapshot save`` writes (``raftfast-node --restore`` reads it; etcdctl's
        ``snapshot status`` and ``restore`` read etcd's database files only). As etcd's, the
        state of the member asked: on the leader every write acknowledged before the call, on
        a follower what it has applied. At most SNAPSHOT_SAVES_AT_ONCE at a time (each holds a
        snapshot file open until its client has read it)."""
        # (refused at its start, as etcd's; one under way is not ended: it reads a file, and
        # ends soon)
        await self.api.leader_required.check_stream(context)
        too_many = errors.TOO_MANY_REQUESTS
        async with self._snapshots.held(context, too_many.message, too_many.code):
            driver = self.api.driver
            mode = "linearizable" if driver.is_leader else "stale"
            try:
                meta, chunks = await driver.backup_snapshot(mode)
            except NotLeaderError:
                await context.abort(errors.LEADER_CHANGED.code, errors.LEADER_CHANGED.message)
            except DiskFullError as exc:  # (the node logged it; it goes on)
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, clipped(f"etcdserver: {exc}")
                )
            except Exception as exc:  # noqa: BLE001 - a status, never a crash
                log.error("etcd snapshot failed", exc_info=exc)
                await context.abort(grpc.StatusCode.INTERNAL, clipped(f"etcdserver: {exc}"))
            with closing(chunks):  # (the file closes when the stream ends, read or not)
                crc = await asyncio.to_thread(chunks.crc32c, meta.size)
                head = header_bytes(BackupInfo(meta.index, meta.term, meta.size, crc))
                digest = hashlib.sha256(head)
                left = meta.size + seal_size(len(head) + meta.size)
                yield pb.SnapshotResponse(header=self.api.header(), remaining_bytes=left, blob=head)
                for chunk in chunks:
                    digest.update(chunk)
                    left -= len(chunk)
                    yield pb.SnapshotResponse(remaining_bytes=left, blob=chunk)
                yield pb.SnapshotResponse(blob=seal(digest, len(head) + meta.size))


# The methods that only read (their big answers may be refused once built:
# raftfast.server.handlers); every other one is refused, if at all, before it runs.
_READS = frozenset(
    {"Range", "LeaseTimeToLive", "LeaseLeases", "MemberList", "Status", "Hash", "HashKV"}
)


def add_etcd_services(server: grpc.aio.Server, api: EtcdAPI) -> WatchService:
    """Serve the etcd API on ``server``; returns the Watch service (to be told of applies)."""
    watch = WatchService(api)
    for name, servicer in (
        ("KV", KVService(api)),
        ("Lease", LeaseService(api)),
        ("Cluster", ClusterService(api)),
        ("Maintenance", MaintenanceService(api)),
        ("Watch", watch),
    ):
        register(
            server, pb, name, servicer, tolerant_streams=True, prefix="etcdserver: ", reads=_READS
        )
    return watch
