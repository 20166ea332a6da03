"""What the client's two ways of calling share: the unary calls (``Client._unary``) and the
pipelined Session stream (``session.py``): argument types and checks, the operation kinds, how
status codes map to errors, leader hints, channel options."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import Any, TypeAlias

import grpc

from raftfast.address import ADDRESS_FORM, is_address
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto import raftfast_pb2_grpc as pb_grpc

BytesLike: TypeAlias = bytes | bytearray | memoryview | str
ReadModeLike: TypeAlias = str | int | None

DEFAULT_ENDPOINT = "127.0.0.1:7001"
DEFAULT_TIMEOUT = 5.0
READ_MODES: dict[str, int] = {
    "default": pb.READ_DEFAULT,
    "linearizable": pb.READ_LINEARIZABLE,
    "lease": pb.READ_LEASE,
    "stale": pb.READ_STALE,
}

PUT = pb.Op.PUT
PUT_MANY = pb.Op.PUT_MANY
GET = pb.Op.GET
DELETE = pb.Op.DELETE
CAS = pb.Op.CAS

CODE_OK = 0
CODE_INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
CODE_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
CODE_PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]
CODE_RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
NOSPACE = "NOSPACE"  # how the cluster's quota refusals start (raftfast.kv.quota)
REFUSED = "state machine:"  # how a state machine's refusals start (machine_service)
STUBS = {"kv": pb_grpc.KVStub, "admin": pb_grpc.AdminStub, "machine": pb_grpc.StateMachineStub}
CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
# Per-op codes retried on the same stream after a backoff (UNAVAILABLE is handled apart).
RETRY_LATER_CODES = frozenset(
    code.value[0]
    for code in (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    )
)
# CANCELLED: a node that shuts down cancels the calls it was serving; another node answers.
RETRYABLE_STATUS = frozenset(
    (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    )
)

CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    # Reconnect quickly after a node restarts (the defaults wait 1 s and up to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def parse_endpoints(endpoints: str | Iterable[str]) -> list[str]:
    """``"h1:p1,h2:p2"`` or an iterable of ``"host:port"`` -> a list; ValueError if malformed."""
    if isinstance(endpoints, str):
        items = endpoints.split(",")
    elif isinstance(endpoints, Iterable):
        items = list(endpoints)
    else:
        raise TypeError(f"endpoints must be a str or a list of str, not {type(endpoints).__name__}")
    out: list[str] = []
    for raw in items:
        if not isinstance(raw, str):
            raise TypeError(f"endpoint must be a str, not {type(raw).__name__}")
        addr = raw.strip()
        if not addr:
            continue
        if not is_address(addr):
            raise ValueError(f"bad endpoint {addr!r} (want {ADDRESS_FORM})")
        if addr not in out:
            out.append(addr)
    if not out:
        raise ValueError("no endpoints given (want HOST:PORT[,HOST:PORT...])")
    return out


def read_mode_of(mode: ReadModeLike) -> int:
    if mode is None:
        return pb.READ_DEFAULT
    if isinstance(mode, str):
        try:
            return READ_MODES[mode.lower()]
        except KeyError:
            raise ValueError(
                f"unknown read mode {mode!r} (want one of {', '.join(READ_MODES)})"
            ) from None
    if isinstance(mode, int) and not isinstance(mode, bool) and mode in READ_MODES.values():
        return int(mode)
    raise ValueError(f"unknown read mode {mode!r} (want one of {', '.join(READ_MODES)})")


def not_raftfast(target: str, method: str, details: str = "") -> str:
    """What UNIMPLEMENTED means to a client: retrying cannot help. (A raftfast node says why
    in ``details``: one serving a state machine of its own has no key/value calls.)"""
    if details.startswith("raftfast: "):
        return f"{target}: {details.removeprefix('raftfast: ')}"
    if method in ("Propose", "Query"):
        return (
            f"{target} serves no state machine of yours: it runs raftfast's key/value store, or "
            "it is not a raftfast server"
        )
    return f"not a raftfast server at {target} (it does not implement {method})"


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def leader_hint(metadata: Any) -> str:
    """The ``leader-address`` of trailing metadata, or "" (also when it is not HOST:PORT)."""
    for item in metadata or ():
        try:
            key, value = item
        except (TypeError, ValueError):
            continue
        if key == "leader-address":
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            return value if is_address(value) else ""
    return ""


def message_to_dict(msg: Any) -> dict[str, Any]:
    """Every field of a proto message (defaults included) as plain Python values."""
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.message_type is not None:
            if field.is_repeated:
                out[field.name] = [message_to_dict(v) for v in value]
            else:
                out[field.name] = message_to_dict(value)
        elif field.is_repeated:
            out[field.name] = list(value)
        else:
            out[field.name] = value
    return out


def new_client_id() -> int:
    while True:
        cid = secrets.randbits(63)
        if cid:
            return cid
