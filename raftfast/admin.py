"""The Admin gRPC service: operator actions on the cluster (membership, leadership transfer,
alarms), and the peer ``Join`` of a node started with ``--join``.

Every call is served by the leader; other nodes answer UNAVAILABLE with the leader's id and
address in the trailing metadata, like the KV service, so clients follow the redirect.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from raftfast.address import is_address
from raftfast.core.membership import ChangeKind
from raftfast.errors import ChangeInProgressError, NotLeaderError
from raftfast.limits import check_node_id
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto import raftfast_pb2_grpc as pb_grpc

_DEFAULT_TIMEOUT = 60.0  # for callers that set no deadline
_MIN_TIMEOUT = 0.05


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, node) -> None:
        self.node = node

    async def _serve(
        self, context, action: Callable[[float], Awaitable[Any]], peers: bool = False
    ) -> Any:
        """Run ``action(timeout)`` and turn our errors into gRPC statuses. The leader hint is
        its client address, or with ``peers`` its peer address."""
        remaining = context.time_remaining()
        timeout = _DEFAULT_TIMEOUT if remaining is None else max(remaining - 0.05, _MIN_TIMEOUT)
        address_of = self.node.peer_address_of if peers else self.node.address_of
        try:
            return await action(timeout)
        except NotLeaderError as exc:
            address = address_of(exc.leader_id) if exc.leader_id else None
            if exc.leader_id and address:
                context.set_trailing_metadata(
                    (("leader-id", exc.leader_id), ("leader-address", address))
                )
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"not the leader: {exc}")
        except ChangeInProgressError as exc:
            await context.abort(grpc.StatusCode.ABORTED, f"{exc}; retry")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except TimeoutError as exc:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))

    @staticmethod
    async def _check_id(context, node_id: str) -> None:
        try:
            check_node_id(node_id)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def TransferLeader(self, request, context):  # noqa: N802 - gRPC naming
        await self._check_id(context, request.target)

        async def action(_timeout: float):
            leader, term = await self.node.transfer_leadership(request.target)
            return pb.TransferLeaderResponse(leader=leader, term=term)

        return await self._serve(context, action)

    async def MemberList(self, request, context):  # noqa: N802
        async def action(_timeout: float):
            return self.node.members()

        return await self._serve(context, action)

    async def MemberAdd(self, request, context):  # noqa: N802
        await self._check_id(context, request.id)
        if not is_address(request.address):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"bad address {request.address[:300]!r} (want HOST:PORT)",
            )

        async def action(timeout: float):
            return await self.node.add_member(request.id, request.address, request.learner, timeout)

        return await self._serve(context, action)

    async def AlarmList(self, request, context):  # noqa: N802
        return self.node.quota.alarms()

    async def AlarmDisarm(self, request, context):  # noqa: N802
        async def action(timeout: float):
            return await asyncio.wait_for(self.node.quota.disarm(), timeout)

        return await self._serve(context, action)

    async def join(self, request: pb.JoinRequest, context) -> pb.MembersResponse:
        """Peer ``Join`` (the peer service checked the cluster id, the id and, under TLS, that
        the caller holds that id's certificate): the members, or add the caller."""
        if request.list_only:
            return self.node.members(require_leader=False)
        if not is_address(request.address):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"bad address {request.address[:300]!r} (want HOST:PORT)",
            )

        async def action(timeout: float):
            return await self.node.add_member(request.id, request.address, False, timeout)

        return await self._serve(context, action, peers=True)

    async def _change(self, kind: ChangeKind, request, context):
        await self._check_id(context, request.id)

        async def action(timeout: float):
            return await self.node.change_member(kind, request.id, timeout)

        return await self._serve(context, action)

    async def MemberPromote(self, request, context):  # noqa: N802
        return await self._change(ChangeKind.PROMOTE, request, context)

    async def MemberDemote(self, request, context):  # noqa: N802
        return await self._change(ChangeKind.DEMOTE, request, context)

    async def MemberRemove(self, request, context):  # noqa: N802
        return await self._change(ChangeKind.REMOVE, request, context)
