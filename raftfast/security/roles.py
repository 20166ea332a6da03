"""Client roles: who may call what on the client port.

With ``--client-cert-auth`` a client is known by its certificate's common name, and
``--auth-roles FILE`` (TOML) gives each name a role::

    [roles]
    dashboard = "read"    # Get, Scan, Status, member list
    app = "write"         # + Put, Delete, CAS, put_many, Session writes
    ops = "admin"         # + membership, leadership transfer, snapshots, alarms

A name missing from the file may do nothing. Without ``--auth-roles`` every client whose
certificate checks out is admin; without ``--client-cert-auth`` every client is (plain mode).
Refusals are PERMISSION_DENIED with a message naming the role needed.

One interceptor (``RoleInterceptor``) checks every call against the least role its method needs
(``METHOD_ROLES``, or ``STANDARD_METHOD_ROLES`` for gRPC's own services; a method not listed
needs admin), once per call, never per entry. The Session stream carries reads and writes: it
needs ``read`` to open, and the KV service refuses its write ops per op for a client below
``write``. Health checks (``OPEN_METHODS``) need no role: any client whose certificate checks
out may ask whether the node is serving (a load balancer's probe need not be able to read the
data); reflection (the API's description, public anyway) needs ``read``.
"""

from __future__ import annotations

import inspect
import tomllib
from collections.abc import Awaitable, Callable
from enum import IntEnum
from typing import Any

import grpc

from raftfast.security.tls import caller_name

__all__ = [
    "METHOD_ROLES",
    "OPEN_METHODS",
    "STANDARD_METHOD_ROLES",
    "Authorizer",
    "ClientShares",
    "Role",
    "RoleInterceptor",
    "load_roles",
    "read_toml",
]


class Role(IntEnum):
    READ = 1
    WRITE = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


_KV = "/raftfast.v1.KV/"
# (what a refused Session stream is said to need: the client never named the stream)
SESSION_WHAT = "reading (a Session stream)"
_ADMIN = "/raftfast.v1.Admin/"
_MACHINE = "/raftfast.v1.StateMachine/"
METHOD_ROLES: dict[str, Role] = {
    _KV + "Get": Role.READ,
    _KV + "Scan": Role.READ,
    _KV + "Status": Role.READ,
    _KV + "Session": Role.READ,  # its writes need write, checked per op
    _KV + "Put": Role.WRITE,
    _KV + "Delete": Role.WRITE,
    _KV + "CompareAndSwap": Role.WRITE,
    _MACHINE + "Query": Role.READ,
    _MACHINE + "Propose": Role.WRITE,
    _ADMIN + "MemberList": Role.READ,
    _ADMIN + "AlarmList": Role.READ,
}
_ETCD = "/etcdserverpb."
METHOD_ROLES.update(
    {
        _ETCD + "KV/Range": Role.READ,
        _ETCD + "KV/Put": Role.WRITE,
        _ETCD + "KV/DeleteRange": Role.WRITE,
        _ETCD + "KV/Txn": Role.WRITE,  # (even one that only reads)
        _ETCD + "KV/Compact": Role.WRITE,
        _ETCD + "Watch/Watch": Role.READ,
        _ETCD + "Lease/LeaseGrant": Role.WRITE,
        _ETCD + "Lease/LeaseRevoke": Role.WRITE,
        _ETCD + "Lease/LeaseKeepAlive": Role.WRITE,
        _ETCD + "Lease/LeaseTimeToLive": Role.READ,
        _ETCD + "Lease/LeaseLeases": Role.READ,
        _ETCD + "Cluster/MemberList": Role.READ,
        _ETCD + "Maintenance/Status": Role.READ,
        _ETCD + "Maintenance/Hash": Role.READ,
        _ETCD + "Maintenance/HashKV": Role.READ,
        # (the rest: MemberAdd/Remove/Promote, Alarm, Defragment, MoveLeader need admin)
    }
)
# gRPC's own services on the client port (raftfast/server/health.py)
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
STANDARD_METHOD_ROLES: dict[str, Role] = {
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Role.READ,
}


# A config or roles file is a few KB. tomllib's time grows with the square of a dotted key's
# depth (``a.a.a...b = 1``: 64 KiB on one line took 12 s): both bounds keep it under a second.
MAX_TOML_BYTES = 64 * 1024
MAX_TOML_LINE_BYTES = 4096  # (a line holding a path of PATH_MAX fits)


def read_toml(path: str, what: str) -> dict[str, Any]:
    """The TOML file ``path`` (``what`` names it in messages: "config file"); ValueError with
    one line if it cannot be read or is not TOML."""
    try:
        with open(path, "rb") as f:  # (not only regular files: --config <(...) is fine)
            raw = f.read(MAX_TOML_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_TOML_BYTES:
        raise ValueError(f"{what} {path} is larger than {MAX_TOML_BYTES} bytes")
    for number, line in enumerate(raw.splitlines(), 1):
        if len(line) > MAX_TOML_LINE_BYTES:
            raise ValueError(
                f"{what} {path}: line {number} is longer than {MAX_TOML_LINE_BYTES} bytes"
            )
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"bad TOML in {what} {path}: not UTF-8 ({exc.reason})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"bad TOML in {what} {path}: {exc}") from None
    except RecursionError:  # (x = [[[[...: tomllib recurses once per level)
        raise ValueError(f"bad TOML in {what} {path}: nested too deeply") from None


def load_roles(path: str) -> dict[str, Role]:
    """The ``[roles]`` table of a TOML file; ValueError with one line if it is not one."""
    data = read_toml(path, "the roles file")
    unknown = set(data) - {"roles"}
    if unknown:
        raise ValueError(f"{path}: unknown table or key {sorted(unknown)[0]!r} (want [roles])")
    table = data.get("roles", {})
    if not isinstance(table, dict):
        raise ValueError(f"{path}: roles must be a table of name = role")
    roles: dict[str, Role] = {}
    for name, role in table.items():
        if not name.strip():  # (no certificate is named so: a slip, say so)
            raise ValueError(f"{path}: a client name is empty or only spaces ({name!r})")
        label = role.lower() if isinstance(role, str) else role
        if label not in ("read", "write", "admin"):
            raise ValueError(f"{path}: the role of {name!r} must be read, write or admin")
        roles[name] = Role[label.upper()]
    return roles


class Authorizer:
    """Maps a call's certificate name to its role. ``roles`` None: every checked client is
    admin; ``checked`` False (no client certificates): every client is."""

    def __init__(self, roles: dict[str, Role] | None, checked: bool) -> None:
        self.roles = roles
        self.checked = checked

    def role_of(self, context: grpc.aio.ServicerContext) -> Role | None:
        return self.role_of_name(caller_name(context))

    def role_of_name(self, name: str | None) -> Role | None:
        """The role of the certificate named ``name`` (None: the connection checked none)."""
        if not self.checked or self.roles is None:
            return Role.ADMIN
        return self.roles.get(name) if name is not None else None

    def refusal(self, context: grpc.aio.ServicerContext, need: Role, what: str) -> str | None:
        """Why the caller may not do ``what`` (which needs ``need``), or None if it may."""
        name = caller_name(context)
        role = self.role_of_name(name)
        if role is not None and role >= need:
            return None
        return self.refusal_of(name, role, need, what)

    @staticmethod
    def refusal_of(name: str | None, role: Role | None, need: Role, what: str) -> str:
        if role is None:
            return f"client {name!r} has no role here; {what} needs {need.label}"
        return f"client {name!r} has role {role.label}; {what} needs {need.label}"


Handler = Callable[..., Any]


class ClientShares:
    """What one client (a certificate's name) may hold of a port at once: ``most_calls`` calls
    under way, and ``most_streams[method]`` streams of each bounded kind. A node-wide bound
    (the port's calls, its Session or Watch streams) that any one certificate could fill
    locked every other client out, admin included, for as long as that client held it (calls
    whose answers it never read; streams it kept open: hunts). Admin is not counted."""

    def __init__(
        self, most_calls: int, most_streams: dict[str, int], most_calls_roleless: int = 64
    ) -> None:
        self.most_calls = most_calls
        self.most_streams = most_streams
        # (a certificate without a role may only ask for health: it needs few calls)
        self.most_calls_roleless = min(most_calls, most_calls_roleless)
        self.calls: dict[str, int] = {}  # name -> calls under way
        self.streams: dict[tuple[str, str], int] = {}  # (name, method) -> streams open

    def take(
        self, name: str, method: str, context: grpc.aio.ServicerContext, has_role: bool = True
    ) -> str | None:
        """Count the call until it ends; or why not (a refusal: it is not counted)."""
        calls = self.calls.get(name, 0)
        if calls >= (self.most_calls if has_role else self.most_calls_roleless):
            share = "a quarter of the node's" if has_role else "a client without a role"
            return (
                f"client {name[:100]!r} has {calls} calls under way here, the most one client "
                f"may have ({share}); retry once some have ended"
            )
        most = self.most_streams.get(method)
        key = (name, method)
        if most is not None:
            open_ = self.streams.get(key, 0)
            if open_ >= most:
                service, _, kind = method[1:].rpartition("/")
                what = f"{service.rsplit('.', 1)[-1]} {kind}"  # ("Health Watch")
                return (
                    f"client {name[:100]!r} has {open_} {what} streams open here, the most one "
                    "client may have (a quarter of the node's); close some"
                )
            self.streams[key] = open_ + 1
        self.calls[name] = calls + 1
        context.add_done_callback(lambda _call: self._ended(name, key if most else None))
        return None

    def _ended(self, name: str, key: tuple[str, str] | None) -> None:
        left = self.calls.pop(name, 1) - 1
        if left:
            self.calls[name] = left
        if key is not None:
            left = self.streams.pop(key, 1) - 1
            if left:
                self.streams[key] = left


class RoleInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a call whose caller's role is below its method's (before the handler runs),
    or that would take the caller past its share of the port (``shares``: admin's calls are
    not counted)."""

    def __init__(self, authorizer: Authorizer, shares: ClientShares | None = None) -> None:
        self.authorizer = authorizer
        self.shares = shares

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        need = METHOD_ROLES.get(method)
        if need is None and method not in OPEN_METHODS:
            need = STANDARD_METHOD_ROLES.get(method, Role.ADMIN)
        if need is None and self.shares is None:
            return handler  # (the TLS handshake checked the certificate)
        what = method.rsplit("/", 1)[-1]
        if method == _KV + "Session":
            what = SESSION_WHAT
        auth, shares = self.authorizer, self.shares

        async def check(context: grpc.aio.ServicerContext) -> None:
            name = caller_name(context)  # (read once: it builds the whole auth context)
            role = auth.role_of_name(name)
            if need is not None and (role is None or role < need):
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED, auth.refusal_of(name, role, need, what)
                )
            if shares is not None and role is not Role.ADMIN:
                why = shares.take(name or "", method, context, has_role=role is not None)
                if why is not None:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why)

        return _guarded(handler, check)


def _guarded(handler: grpc.RpcMethodHandler, check: Callable[[Any], Awaitable[None]]):
    """``handler`` with ``check(context)`` run first."""
    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary_unary(request, context):
            await check(context)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **serializers)
    if handler.stream_unary is not None:
        inner = handler.stream_unary

        async def stream_unary(requests, context):
            await check(context)
            return await inner(requests, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **serializers)
    streaming = handler.unary_stream or handler.stream_stream
    make = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream is not None
        else grpc.stream_stream_rpc_method_handler
    )

    if inspect.iscoroutinefunction(streaming):  # (one that writes its answers itself)

        async def writes(request_or_requests, context):
            await check(context)
            return await streaming(request_or_requests, context)

        return make(writes, **serializers)

    async def streamed(request_or_requests, context):
        await check(context)
        async for response in streaming(request_or_requests, context):
            yield response

    return make(streamed, **serializers)
