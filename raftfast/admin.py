"""The Admin gRPC service: operator actions on the cluster (membership, leadership transfer).

Every call is served by the leader; other nodes answer UNAVAILABLE with the leader's id and
address in the trailing metadata, like the KV service, so clients follow the redirect.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from raftfast.address import is_address
from raftfast.core.membership import ChangeKind
from raftfast.errors import ChangeInProgressError, NotLeaderError
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto import raftfast_pb2_grpc as pb_grpc

_DEFAULT_TIMEOUT = 60.0  # for callers that set no deadline
_MIN_TIMEOUT = 0.05


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, node) -> None:
        self.node = node

    async def _serve(self, context, action: Callable[[float], Awaitable[Any]]) -> Any:
        """Run ``action(timeout)`` and turn our errors into gRPC statuses."""
        remaining = context.time_remaining()
        timeout = _DEFAULT_TIMEOUT if remaining is None else max(remaining - 0.05, _MIN_TIMEOUT)
        try:
            return await action(timeout)
        except NotLeaderError as exc:
            address = self.node.address_of(exc.leader_id) if exc.leader_id else None
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
        if not node_id or len(node_id) > 256 or not node_id.isprintable() or " " in node_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad node id {node_id!r}")

    async def TransferLeader(self, request, context):  # noqa: N802 - gRPC naming
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
                f"bad address {request.address!r} (want HOST:PORT)",
            )

        async def action(timeout: float):
            return await self.node.add_member(request.id, request.address, request.learner, timeout)

        return await self._serve(context, action)

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
