"""The StateMachine gRPC service: a user's state machine (``raftfast-node --state-machine``)
answers ``Propose`` (a command, exactly-once) and ``Query`` (a read) from any client.

A command is proposed framed with its client id and sequence (``raftfast.exactly_once``): a
retry gets the first answer. Results travel as bytes (None as b""; a str as UTF-8); an
exception the state machine returned, or its query raised, is FAILED_PRECONDITION
"state machine: ..." (``CommandError`` in the client).
"""

from __future__ import annotations

from typing import Any

import grpc

from raftfast.errors import CommandError, message_of
from raftfast.exactly_once import frame_command
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto import raftfast_pb2_grpc as pb_grpc
from raftfast.security.roles import Authorizer
from raftfast.server.services import DEADLINE_READ, DEADLINE_WRITE, BadRequest, Service, rpc

# UNIMPLEMENTED's text for the key/value calls on such a node (raftfast.client shows it).
NO_KV_STORE = (
    "raftfast: this node serves a state machine of its own (--state-machine), not the "
    "key/value store: send its commands with Propose and Query (Client.propose, Client.query)"
)

__all__ = ["NO_KV_STORE", "MachineService", "StatusOnly", "as_result_bytes", "command_refusal"]


class MachineService(Service, pb_grpc.StateMachineServicer):
    def __init__(self, node: Any, authorizer: Authorizer | None = None) -> None:
        super().__init__(node)
        self.authorizer = authorizer  # (client certificates are checked: ids are owned)

    @rpc
    async def Propose(  # noqa: N802 - gRPC naming
        self, request: pb.ProposeRequest, context: grpc.aio.ServicerContext
    ) -> pb.ProposeResponse:
        self.check_size(len(request.command))  # (the command: as Node.propose counts it)
        self.check_client_id(request.client_id)
        self.check_sequence(request.sequence)
        client_id = self.own_client_id(request.client_id, context)  # (as over KV)
        refusal = command_refusal(self.node.fsm, request.command)
        if refusal is not None:
            raise BadRequest(refusal)  # (refused here, it never reaches the log)
        command = frame_command(client_id, request.sequence, request.command)
        (result,) = await self.timed(context, self.node.propose([command]), DEADLINE_WRITE)
        applied = self.node.applied_index
        return pb.ProposeResponse(
            result=as_result_bytes(result), index=applied, term=self.node.raw.term_at(applied)
        )

    @rpc
    async def Query(  # noqa: N802
        self, request: pb.QueryRequest, context: grpc.aio.ServicerContext
    ) -> pb.QueryResponse:
        self.check_size(len(request.request))
        mode = self.read_mode(request.read_mode)
        await self.timed(context, self.node.read_barrier(mode), DEADLINE_READ)
        return pb.QueryResponse(result=asked(self.node.fsm, request.request))


class StatusOnly(Service, pb_grpc.KVServicer):
    """``KV.Status`` on a node that serves a state machine of its own (every node answers
    it: clients and tools find the leader with it); the other KV calls are UNIMPLEMENTED."""

    @rpc
    async def Status(self, request, context):  # noqa: N802
        return self.node.status()


async def _no_kv_store(self, request, context):  # noqa: ARG001 - a servicer method's signature
    # (the client shows the text: it said "not a raftfast server" to `raftfast get` here)
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, NO_KV_STORE)


for _method in pb.DESCRIPTOR.services_by_name["KV"].methods:
    if _method.name != "Status":
        setattr(StatusOnly, _method.name, _no_kv_store)


def as_result_bytes(result: Any, applied: bool = True) -> bytes:
    """A state machine's result as it travels; CommandError for an exception it returned
    (``applied``: a command's result, not a query's)."""
    if isinstance(result, BaseException):
        raise CommandError(message_of(result))
    if result is None:
        return b""
    if isinstance(result, bytes | bytearray | memoryview):
        return bytes(result)
    if isinstance(result, str):
        try:
            return result.encode()
        except UnicodeEncodeError as exc:  # (a lone surrogate: it was applied all the same)
            raise CommandError(
                f"{'applied, but ' if applied else ''}its result cannot be sent: text that is "
                f"not UTF-8 ({exc.reason} at {exc.start})"
            ) from None
    raise CommandError(
        f"{'applied, but ' if applied else ''}its result is a {type(result).__name__}: a state "
        "machine's results are bytes, str or None (they travel between members as bytes)"
    )


def asked(fsm: Any, request: bytes) -> bytes:
    """The state machine's answer to ``request`` (its ``query``) as it travels
    (``as_result_bytes``), or CommandError for any exception it raises but KeyboardInterrupt
    (SystemExit too: a query must not stop the node, nor each node the client tries next)."""
    try:
        result = fsm.query(request)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - the state machine's refusal, not ours
        raise CommandError(f"{type(exc).__name__}: {message_of(exc)}") from None
    return as_result_bytes(result, applied=False)


def command_refusal(fsm: Any, command: bytes) -> str | None:
    """Why the state machine's optional ``check`` refuses ``command`` (None: it takes it), as
    a client reads it: a ValueError's message, any other exception's type too."""
    check = getattr(fsm, "check", None)  # (the KV store, or a duck-typed machine: none)
    if check is None:
        return None
    try:
        check(command)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - a user's check: any refusal is the client's
        # (SystemExit too: one request made every node it reached exit, the client retrying)
        message = message_of(exc)
        named = message if type(exc) is ValueError else f"{type(exc).__name__}: {message}"
        return f"command refused: {named}"
    return None
