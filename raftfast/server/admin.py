"""The Admin gRPC service: operator actions on the cluster (membership, leadership transfer,
alarms), and the peer ``Join`` of a node started with ``--join``.

Every change is served by the leader; other nodes answer UNAVAILABLE with the leader's id and
address in the trailing metadata, like the KV service, so clients follow the redirect. Errors
map to statuses in one place (``raftfast.server.services``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import closing
from typing import Any

import grpc

from raftfast.address import ADDRESS_FORM, is_address
from raftfast.core.membership import ChangeKind
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto import raftfast_pb2_grpc as pb_grpc
from raftfast.server.handlers import StreamBound
from raftfast.server.machine_identity import mismatch
from raftfast.server.services import BadRequest, Service, rpc

# SnapshotSave streams a node serves at once. Each holds its snapshot file open until its
# client has read it all (a pruned one stays on disk meanwhile) and each may have taken a new
# snapshot: unread streams must not pile up files. Past this, RESOURCE_EXHAUSTED.
SNAPSHOT_SAVES_AT_ONCE = 2


class AdminService(Service, pb_grpc.AdminServicer):
    def __init__(self, node) -> None:
        super().__init__(node)
        self._snapshot_saves = StreamBound(SNAPSHOT_SAVES_AT_ONCE)  # SnapshotSave streams

    @rpc
    async def TransferLeader(self, request, context):  # noqa: N802 - gRPC naming
        self.check_node_id(request.target)
        try:
            leader, term = await self.node.transfer_leadership(request.target)
        except TimeoutError as exc:
            # The answer, not the call's deadline: a client retrying it would hold proposals
            # for a hand-over at a time and end with gRPC's bare "Deadline Exceeded".
            raise ValueError(f"no hand-over: {exc}") from None
        return pb.TransferLeaderResponse(leader=leader, term=term)

    @rpc
    async def MemberList(self, request, context):  # noqa: N802
        return self.node.members()

    @rpc
    async def MemberAdd(self, request, context):  # noqa: N802
        self.check_node_id(request.id)
        _check_address(request.address)
        return await self.node.add_member(
            request.id, request.address, request.learner, self.timeout_of(context)
        )

    async def _change(self, kind: ChangeKind, request, context):
        self.check_node_id(request.id)
        return await self.node.change_member(kind, request.id, self.timeout_of(context))

    @rpc
    async def MemberPromote(self, request, context):  # noqa: N802
        return await self._change(ChangeKind.PROMOTE, request, context)

    @rpc
    async def MemberDemote(self, request, context):  # noqa: N802
        return await self._change(ChangeKind.DEMOTE, request, context)

    @rpc
    async def MemberRemove(self, request, context):  # noqa: N802
        return await self._change(ChangeKind.REMOVE, request, context)

    async def SnapshotSave(  # noqa: N802
        self, request: pb.SnapshotSaveRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.BackupChunk]:
        """Stream a fresh snapshot of the leader (``raftfast snapshot save``), at most
        ``SNAPSHOT_SAVES_AT_ONCE`` at a time (calls of the same applied index share a file)."""
        refusal = (
            f"too many snapshot saves: this node streams {SNAPSHOT_SAVES_AT_ONCE} at once "
            "at most; retry once one has finished"
        )
        async with self._snapshot_saves.held(context, refusal):
            meta, chunks = await self._backup_snapshot(request, context)
            with closing(chunks):  # (the file closes when the stream ends, read or not)
                yield pb.BackupChunk(index=meta.index, term=meta.term, size=meta.size)
                for chunk in chunks:
                    yield pb.BackupChunk(data=chunk)

    @rpc
    async def _backup_snapshot(self, request, context):
        return await self.node.backup_snapshot()

    @rpc
    async def AlarmList(self, request, context):  # noqa: N802
        if self.node.quota is None:
            return pb.AlarmResponse()  # (a state machine of the user's: no quota, no alarm)
        return self.node.quota.alarms()

    @rpc
    async def AlarmDisarm(self, request, context):  # noqa: N802
        if self.node.quota is None:
            return pb.AlarmResponse()
        return await asyncio.wait_for(self.node.quota.disarm(), self.timeout_of(context))


class JoinService(Service):
    """Peer ``Join`` (the peer service checked the cluster id, the id and, under TLS, that the
    caller holds that id's certificate): the members, or add the caller. Its leader hints are
    peer addresses: the joining node talks to the peer port."""

    peer_hints = True

    @rpc
    async def join(self, request: pb.JoinRequest, context) -> pb.MembersResponse:
        if request.list_only:
            return self.node.members(require_leader=False)
        _check_address(request.address)
        _check_machine(self.node.app, request)
        return await self.node.add_member(
            request.id, request.address, request.learner, self.timeout_of(context)
        )


def _check_machine(app: Any, request: pb.JoinRequest) -> None:
    """ValueError unless the joining node serves what ``app`` serves: its class's name
    (``state_machine``; "" from a node of an earlier release, which does not say), and what
    ``raftfast.server.machine_identity`` compares when both sides tell it (``machine``)."""
    ours, theirs = app.served, request.state_machine
    why = None
    if theirs and theirs != ours:
        why = f"this cluster serves {ours[:100]!r}, {request.id[:100]!r} serves {theirs[:100]!r}"
    elif app.identity and request.machine:
        why = mismatch(app.identity, request.machine)
        if why is not None:
            why = f"{request.id[:100]!r} does not serve this cluster's state machine: {why}"
    if why is not None:
        raise ValueError(
            f"{why}: a member must serve the same state machine (it would apply the cluster's "
            "commands to its own, and answer for it as leader)"
        )


def _check_address(address: str) -> None:
    if not is_address(address):
        raise BadRequest(f"bad address {address[:300]!r} (want {ADDRESS_FORM})")
