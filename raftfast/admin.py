"""The Admin gRPC service: operator actions on the cluster (leadership transfer for now)."""

from __future__ import annotations

import grpc

from raftfast.errors import NotLeaderError
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto import raftfast_pb2_grpc as pb_grpc


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, node) -> None:
        self.node = node

    async def TransferLeader(self, request, context):  # noqa: N802 - gRPC naming
        try:
            leader, term = await self.node.transfer_leadership(request.target)
        except NotLeaderError as exc:
            address = self.node.address_of(exc.leader_id) if exc.leader_id else None
            if exc.leader_id and address:
                context.set_trailing_metadata(
                    (("leader-id", exc.leader_id), ("leader-address", address))
                )
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"not the leader: {exc}")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except TimeoutError as exc:
            await context.abort(grpc.StatusCode.ABORTED, str(exc))
        return pb.TransferLeaderResponse(leader=leader, term=term)
