"""Client of a raftfast cluster: ``Client`` (asyncio) and ``SyncClient`` (plain blocking code).

::

    async with Client(["127.0.0.1:7001", "127.0.0.1:7002"], timeout=5.0) as c:
        await c.put("k", "v")
        assert await c.get("k") == b"v"

    with SyncClient("127.0.0.1:7001,127.0.0.1:7002") as c:
        c.put(b"k", b"v")

How it talks to the cluster:

* **Leader discovery.** Calls start at the known leader, else at the endpoints in turn. A node
  that is not the leader answers UNAVAILABLE with ``leader-address`` in its trailing metadata (or,
  on the Session stream, ``SessionResult.leader``); the client follows it. UNAVAILABLE without a
  hint, connection failures and server-side deadline expiries are retried with exponential
  backoff and jitter until the call's own deadline; then ``ClusterUnavailableError`` (nothing
  answered: no leader reachable) or ``DeadlineExceededError`` (its base class: a node was
  reached but the call did not complete). INVALID_ARGUMENT becomes ``InvalidArgumentError`` at
  once, without retry; any other status becomes ``RequestFailedError``.
* **Exactly-once writes.** The client has a random nonzero 63-bit ``client_id``; every write gets
  the next number of its sequence counter the first time it is sent, and every retry of that
  write resends the same sequence, so the servers apply it once. Because the servers remember
  only a window of recent sequences per client (``raftfast.dedup.DEDUP_WINDOW``), at most
  ``max_outstanding_writes`` sequences are unresolved at a time; further writes wait.
* **Automatic pipelining.** ``put``, ``get``, ``delete`` and ``cas`` are queued; one sender task
  drains the queue into ``SessionFrame`` messages of up to ``max_ops_per_frame`` operations on a
  single bidirectional ``Session`` stream to the leader, and results are matched by
  ``frame_id``. Many concurrent calls therefore travel as a few frames. When the stream fails,
  every operation still in flight is retried on a new stream (writes with their sequences).
  ``scan`` and ``status`` are unary calls.

Keys and values are ``bytes`` (``bytearray`` and ``memoryview`` are copied); ``str`` is encoded
as UTF-8; anything else raises ``TypeError``.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import threading
from collections import deque
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any, TypeAlias, TypeVar

import grpc

from raftfast._accel import chunk_payloads
from raftfast.address import is_address
from raftfast.errors import (
    ClusterUnavailableError,
    CommandError,
    DeadlineExceededError,
    InvalidArgumentError,
    NoSpaceError,
    PermissionDeniedError,
    RaftfastError,
    RequestFailedError,
)
from raftfast.kv.commands import pack_pairs
from raftfast.limits import check_node_id
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto import raftfast_pb2_grpc as pb_grpc
from raftfast.security.tls import TLSFiles, channel_credentials

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_TIMEOUT",
    "READ_MODES",
    "BytesLike",
    "Client",
    "ReadModeLike",
    "SyncClient",
    "TLSFiles",
    "message_to_dict",
    "parse_endpoints",
]

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

_PUT = pb.Op.PUT
_PUT_MANY = pb.Op.PUT_MANY
# put_many packs this much (or this many pairs) into one atomic write: big enough to make the
# per-write costs vanish, small enough to keep frames and log entries moderate.
_PUT_MANY_BYTES = 256 * 1024
_PUT_MANY_PAIRS = 4096
_SCAN_PAGE = 10_000  # items asked for per Scan page (the server's maximum)
_GET = pb.Op.GET
_DELETE = pb.Op.DELETE
_CAS = pb.Op.CAS

_CODE_OK = 0
_CODE_INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
_CODE_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
_CODE_PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]
_CODE_RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
_NOSPACE = "NOSPACE"  # how the cluster's quota refusals start (raftfast.kv.quota)
_REFUSED = "state machine:"  # how a state machine's refusals start (machine_service)
_STUBS = {"kv": pb_grpc.KVStub, "admin": pb_grpc.AdminStub, "machine": pb_grpc.StateMachineStub}
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
# Per-op codes retried on the same stream after a backoff (UNAVAILABLE is handled apart).
_RETRY_LATER_CODES = frozenset(
    code.value[0]
    for code in (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    )
)
_RETRYABLE_STATUS = frozenset(
    (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    )
)

_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    # Reconnect quickly after a node restarts (the defaults wait 1 s and up to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)

_T = TypeVar("_T")


# ---------------------------------------------------------------------------------- helpers


def parse_endpoints(endpoints: str | Iterable[str]) -> list[str]:
    """``"h1:p1,h2:p2"`` or an iterable of ``"host:port"`` -> a list; ValueError if malformed."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out: list[str] = []
    for raw in items:
        if not isinstance(raw, str):
            raise TypeError(f"endpoint must be a str, not {type(raw).__name__}")
        addr = raw.strip()
        if not addr:
            continue
        if not is_address(addr):
            raise ValueError(f"bad endpoint {addr!r} (want HOST:PORT)")
        if addr not in out:
            out.append(addr)
    if not out:
        raise ValueError("no endpoints given (want HOST:PORT[,HOST:PORT...])")
    return out


def _to_bytes(value: object, what: str) -> bytes:
    if type(value) is bytes:
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"{what} must be bytes or str, not {type(value).__name__}")


def _read_mode(mode: ReadModeLike) -> int:
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


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _leader_hint(metadata: Any) -> str:
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


def _new_client_id() -> int:
    while True:
        cid = secrets.randbits(63)
        if cid:
            return cid


class _Op:
    """One queued operation; ``sequence`` is assigned when a write is first sent."""

    __slots__ = (
        "kind",
        "key",
        "value",
        "expected",
        "expect_absent",
        "read_mode",
        "sequence",
        "fut",
        "stream",
        "sent_at",
        "attempts",
    )

    def __init__(
        self,
        kind: int,
        key: bytes,
        value: bytes = b"",
        expected: bytes = b"",
        expect_absent: bool = False,
        read_mode: int = 0,
    ) -> None:
        self.kind = kind
        self.key = key
        self.value = value
        self.expected = expected
        self.expect_absent = expect_absent
        self.read_mode = read_mode
        self.sequence = 0
        self.fut: asyncio.Future[Any] | None = None
        self.stream: _Stream | None = None
        self.sent_at = 0.0
        self.attempts = 0


class _Stream:
    """One Session stream to one node and the frames in flight on it."""

    __slots__ = ("target", "call", "inflight", "got_result", "last_result", "restart", "reason")

    def __init__(self, target: str, call: Any) -> None:
        self.target = target
        self.call = call
        self.inflight: dict[int, list[_Op]] = {}
        self.got_result = False  # any successful op result on this stream
        self.last_result = float("-inf")
        self.restart = asyncio.Event()
        self.reason: tuple[str, str, str] | None = None  # (kind, detail, leader hint)

    def request_restart(self, kind: str, detail: str, hint: str = "") -> None:
        if self.reason is None:
            self.reason = (kind, detail, hint)
            self.restart.set()


# ---------------------------------------------------------------------------------- Client


class Client:
    """Asynchronous raftfast client (see the module docstring).

    ``endpoints``: "host:port,host:port" or a list of "host:port". ``timeout``: the default
    deadline in seconds of every call (each method also takes ``timeout=``). ``cluster_id``:
    when given, sent as ``cluster-id`` metadata so a node of another cluster refuses the calls.

    ``tls``: connect over TLS, trusting ``tls.ca_file`` (None: the system's CAs) and, if the
    cluster checks client certificates, presenting ``tls.cert_file``/``tls.key_file``
    (``TLSFiles("ca.crt", "app.crt", "app.key")``).

    A Client binds to the event loop it is first used in. Close it (``await c.close()`` or
    ``async with``) to release its channels.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str] = (DEFAULT_ENDPOINT,),
        *,
        timeout: float = DEFAULT_TIMEOUT,
        cluster_id: str | None = None,
        client_id: int | None = None,
        max_ops_per_frame: int = 4096,
        max_frame_bytes: int = 1024 * 1024,
        max_outstanding_writes: int = 4000,
        backoff_base: float = 0.02,
        backoff_max: float = 1.0,
        tls: TLSFiles | None = None,
    ) -> None:
        self._endpoints = parse_endpoints(endpoints)
        if tls is not None and not isinstance(tls, TLSFiles):
            raise TypeError(f"tls must be a raftfast.TLSFiles, not {type(tls).__name__}")
        self._credentials = channel_credentials(tls) if tls is not None else None
        self._timeout = self._check_timeout(timeout)
        if client_id is None:
            client_id = _new_client_id()
        if not isinstance(client_id, int) or not 0 < client_id < 2**63:
            raise ValueError("client_id must be an integer in [1, 2**63)")
        if max_ops_per_frame < 1 or max_frame_bytes < 1 or max_outstanding_writes < 1:
            raise ValueError("frame and window limits must be positive")
        self._client_id = client_id
        self._metadata: tuple[tuple[str, str], ...] | None = (
            (("cluster-id", cluster_id),) if cluster_id else None
        )
        self._max_ops = max_ops_per_frame
        self._max_bytes = max_frame_bytes
        self._max_outstanding = max_outstanding_writes
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max

        self._leader: str | None = None
        self._rr = 0  # index of the next endpoint to try when no leader is known
        self._seq = 0  # last write sequence handed out
        self._frame_id = 0
        self._last_error: str | None = None  # why the last attempt to reach the leader failed

        self._loop: asyncio.AbstractEventLoop | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[tuple[str, str], Any] = {}  # (address, service) -> stub
        self._pending: deque[_Op] = deque()
        self._outstanding: deque[_Op] = deque()  # writes with a sequence, in sequence order
        self._wake: asyncio.Event | None = None
        self._writer_blocked = False
        self._stream: _Stream | None = None
        self._session_task: asyncio.Task[None] | None = None
        self._closed = False

    # -- public properties -------------------------------------------------------------------

    @property
    def client_id(self) -> int:
        return self._client_id

    @property
    def endpoints(self) -> list[str]:
        return list(self._endpoints)

    @property
    def leader(self) -> str | None:
        """The address the client currently believes is the leader's, if any."""
        return self._leader

    @property
    def timeout(self) -> float:
        return self._timeout

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the session, fail queued calls and close every channel. Idempotent."""
        if self._closed:
            return
        self._closed = True
        task, self._session_task = self._session_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        err = RaftfastError("client is closed")
        for op in self._pending:
            if op.fut is not None and not op.fut.done():
                op.fut.set_exception(err)
        self._pending.clear()
        self._outstanding.clear()
        channels, self._channels = list(self._channels.values()), {}
        self._stubs.clear()
        for channel in channels:
            await channel.close()

    # -- key/value API (pipelined on the Session stream) -------------------------------------

    async def put(self, key: BytesLike, value: BytesLike, *, timeout: float | None = None) -> None:
        """Set ``key`` to ``value``."""
        op = _Op(_PUT, _to_bytes(key, "key"), _to_bytes(value, "value"))
        await self._submit_one(op, timeout)

    async def get(
        self,
        key: BytesLike,
        *,
        read_mode: ReadModeLike = None,
        timeout: float | None = None,
    ) -> bytes | None:
        """The value of ``key``, or None. ``read_mode``: linearizable, lease, stale or default."""
        op = _Op(_GET, _to_bytes(key, "key"), read_mode=_read_mode(read_mode))
        result: bytes | None = await self._submit_one(op, timeout)
        return result

    async def delete(self, key: BytesLike, *, timeout: float | None = None) -> bool:
        """Delete ``key``; True if it existed."""
        op = _Op(_DELETE, _to_bytes(key, "key"))
        result: bool = await self._submit_one(op, timeout)
        return result

    async def cas(
        self,
        key: BytesLike,
        expected: BytesLike | None,
        new: BytesLike,
        *,
        timeout: float | None = None,
    ) -> bool:
        """Set ``key`` to ``new`` if its value is ``expected`` (None: if it is absent)."""
        if expected is None:
            op = _Op(_CAS, _to_bytes(key, "key"), _to_bytes(new, "new"), expect_absent=True)
        else:
            op = _Op(
                _CAS,
                _to_bytes(key, "key"),
                _to_bytes(new, "new"),
                expected=_to_bytes(expected, "expected"),
            )
        result: bool = await self._submit_one(op, timeout)
        return result

    async def put_many(
        self,
        items: Iterable[tuple[BytesLike, BytesLike]],
        *,
        timeout: float | None = None,
    ) -> None:
        """Put many pairs at once; raise the first failure once all finished.

        The pairs travel packed, in groups of up to 256 KiB / 4,096 pairs; each group is one
        atomic, exactly-once write (one log entry), so the per-write costs are paid per group,
        not per pair. Groups are pipelined in order; when one fails, others may have been
        applied. Within a group, a later pair wins over an earlier one with the same key.
        """
        pairs = [(_to_bytes(k, "key"), _to_bytes(v, "value")) for k, v in items]
        ops = []
        for start, end in chunk_payloads([v for _, v in pairs], _PUT_MANY_BYTES, _PUT_MANY_PAIRS):
            group = pairs[start:end]
            if not all(k for k, _ in group):
                raise InvalidArgumentError("key must not be empty")
            ops.append(_Op(_PUT_MANY, b"", pack_pairs(group)))
        if not ops:
            return
        loop = self._ensure_started()
        total = self._call_timeout(timeout)
        futs = []
        for op in ops:
            op.fut = loop.create_future()
            futs.append(op.fut)
        self._pending.extend(ops)
        self._wake_writer()
        handle = loop.call_later(total, self._expire, ops, total)
        try:
            results = await asyncio.gather(*futs, return_exceptions=True)
        finally:
            handle.cancel()
            for fut in futs:
                if not fut.done():
                    fut.cancel()
        for res in results:
            if isinstance(res, BaseException):
                raise res

    # -- unary API ---------------------------------------------------------------------------

    async def scan(
        self,
        prefix: BytesLike = b"",
        limit: int = 1000,
        *,
        read_mode: ReadModeLike = None,
        timeout: float | None = None,
    ) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` (key, value) pairs whose key starts with ``prefix``, in key order;
        ``limit`` 0: all of them.

        The server answers in pages (at most 10,000 items and about 2 MiB each), which this
        follows; each page is read at its own moment, so a scan over several pages is not one
        snapshot. ``timeout`` applies to each page.
        """
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"limit must be an int, not {type(limit).__name__}")
        if limit < 0:
            raise ValueError(f"limit must be 0 (all) or positive, got {limit}")
        request = pb.ScanRequest(
            prefix=_to_bytes(prefix, "prefix"), read_mode=_read_mode(read_mode)
        )
        items: list[tuple[bytes, bytes]] = []
        while True:
            request.limit = min(limit - len(items), _SCAN_PAGE) if limit else 0
            _, response = await self._unary("Scan", request, timeout)
            items += [(item.key, item.value) for item in response.items]
            if not response.next_key or (limit and len(items) >= limit):
                return items
            request.start = response.next_key

    async def status(
        self, endpoint: str | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """The StatusResponse of one node as a dict (``members`` as a list of dicts).

        ``endpoint`` None: the leader if known, else the first endpoint that answers. The dict
        also has ``endpoint``: the address that answered.
        """
        if endpoint is not None and not is_address(endpoint):
            raise ValueError(f"bad endpoint {endpoint!r} (want HOST:PORT)")
        target, response = await self._unary(
            "Status", pb.StatusRequest(), timeout, endpoint=endpoint, what="node"
        )
        out = message_to_dict(response)
        out["endpoint"] = target
        return out

    async def transfer_leader(self, target: str, *, timeout: float | None = None) -> str:
        """Hand leadership to node ``target``; returns the leader once the call completes."""
        if not isinstance(target, str) or not target:
            raise ValueError("target must be a node id")
        _, response = await self._unary(
            "TransferLeader", pb.TransferLeaderRequest(target=target), timeout, service="admin"
        )
        self._leader = None  # rediscover: the leader just changed
        return response.leader

    # -- a state machine of the user's (raftfast-node --state-machine) ------------------------

    async def propose(self, command: BytesLike, *, timeout: float | None = None) -> bytes:
        """Apply ``command`` to the cluster's state machine, exactly once (a retry reuses its
        sequence number); its result. CommandError if the state machine refused it."""
        self._ensure_started()
        self._seq += 1
        request = pb.ProposeRequest(
            client_id=self._client_id,
            sequence=self._seq,
            command=_to_bytes(command, "command"),
        )
        _, response = await self._unary("Propose", request, timeout, service="machine")
        return response.result

    async def query(
        self, request: BytesLike, *, read_mode: ReadModeLike = None, timeout: float | None = None
    ) -> bytes:
        """Ask the cluster's state machine ``request`` (read-only): linearizable by default,
        ``read_mode`` lease or stale at will. CommandError if its query raised."""
        message = pb.QueryRequest(
            request=_to_bytes(request, "request"), read_mode=_read_mode(read_mode)
        )
        _, response = await self._unary("Query", message, timeout, service="machine")
        return response.result

    async def alarms(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The raised alarms (``alarms``: ["NOSPACE"] while writes are refused), with the
        state's size (``state_bytes``) and the quota (``quota_bytes``)."""
        _, response = await self._unary("AlarmList", pb.AlarmRequest(), timeout, service="admin")
        return message_to_dict(response)

    async def disarm_alarms(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Clear the NOSPACE alarm once space is freed (RequestFailedError FAILED_PRECONDITION
        while it still is not); returns what ``alarms`` returns."""
        _, response = await self._unary("AlarmDisarm", pb.AlarmRequest(), timeout, service="admin")
        return message_to_dict(response)

    # -- membership ------------------------------------------------------------------------

    async def members(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The cluster configuration as the leader sees it: ``members`` (dicts with ``id``,
        ``address``, ``role`` voter|learner and ``match_index``), ``leader``, ``config_index``,
        ``committed``, ``commit_index`` and ``cluster_id``."""
        _, response = await self._unary(
            "MemberList", pb.MemberListRequest(), timeout, service="admin"
        )
        return message_to_dict(response)

    async def add_member(
        self, node_id: str, address: str, *, learner: bool = False, timeout: float | None = None
    ) -> dict[str, Any]:
        """Add node ``node_id`` serving at ``address`` (HOST:PORT) as a learner and, unless
        ``learner``, promote it to voter once it has caught up. Returns the new configuration.
        Adding a node that is already a member at that address is not an error."""
        check_node_id(node_id)
        if not is_address(address):
            raise ValueError(f"bad address {address!r} (want HOST:PORT)")
        request = pb.MemberAddRequest(id=node_id, address=address, learner=learner)
        _, response = await self._unary("MemberAdd", request, timeout, service="admin")
        return message_to_dict(response)

    async def promote_member(self, node_id: str, *, timeout: float | None = None) -> dict:
        """Make learner ``node_id`` a voter; returns the new configuration."""
        return await self._member_call("MemberPromote", node_id, timeout)

    async def demote_member(self, node_id: str, *, timeout: float | None = None) -> dict:
        """Make voter ``node_id`` a learner; returns the new configuration."""
        return await self._member_call("MemberDemote", node_id, timeout)

    async def remove_member(self, node_id: str, *, timeout: float | None = None) -> dict:
        """Remove ``node_id`` (the leader too: it hands over, then shuts down)."""
        out = await self._member_call("MemberRemove", node_id, timeout)
        self._leader = None
        return out

    async def _member_call(self, method: str, node_id: str, timeout: float | None) -> dict:
        check_node_id(node_id)
        _, response = await self._unary(
            method, pb.MemberRequest(id=node_id), timeout, service="admin"
        )
        return message_to_dict(response)

    # -- internals: common -------------------------------------------------------------------

    @staticmethod
    def _check_timeout(timeout: float) -> float:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise TypeError(f"timeout must be a number, not {type(timeout).__name__}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        return float(timeout)

    def _call_timeout(self, timeout: float | None) -> float:
        return self._timeout if timeout is None else self._check_timeout(timeout)

    def _ensure_started(self) -> asyncio.AbstractEventLoop:
        if self._closed:
            raise RaftfastError("client is closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._wake = asyncio.Event()
        elif self._loop is not loop:
            raise RuntimeError("this Client is bound to the event loop it was first used in")
        if self._session_task is None:
            self._session_task = loop.create_task(self._session_loop(), name="raftfast-session")
        return loop

    def _stub(self, address: str, service: str = "kv") -> Any:
        """The stub of ``service`` (kv, admin or machine) for ``address``; the services share
        one channel per address."""
        stub = self._stubs.get((address, service))
        if stub is None:
            channel = self._channels.get(address)
            if channel is None:
                if self._credentials is None:
                    channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
                else:
                    channel = grpc.aio.secure_channel(
                        address, self._credentials, options=_CHANNEL_OPTIONS
                    )
                self._channels[address] = channel
            stub = self._stubs[address, service] = _STUBS[service](channel)
        return stub

    def _backoff(self, attempt: int) -> float:
        delay = min(self._backoff_max, self._backoff_base * (2 ** min(attempt, 30)))
        return delay * random.uniform(0.5, 1.0)

    def _next_endpoint(self) -> str:
        self._rr += 1
        return self._endpoints[self._rr % len(self._endpoints)]

    def _timeout_error(
        self,
        total: float,
        last_error: str | None,
        reached: bool,
        what: str = "leader",
        target: str | None = None,
    ) -> DeadlineExceededError:
        if last_error is not None and not reached:
            return ClusterUnavailableError(
                f"no {what} reachable at {','.join(self._endpoints)} within {total:g}s"
                f" (last error: {_one_line(last_error)})"
            )
        where = f" waiting for {target}" if target else ""
        return DeadlineExceededError(f"deadline of {total:g}s exceeded{where}")

    async def _unary(
        self,
        method: str,
        request: Any,
        timeout: float | None,
        *,
        endpoint: str | None = None,
        what: str = "leader",
        service: str = "kv",
    ) -> tuple[str, Any]:
        """One unary call with redirects and retries until the deadline; (address, response)."""
        loop = self._ensure_started()
        total = self._call_timeout(timeout)
        deadline = loop.time() + total
        if endpoint is not None:
            target = endpoint
        elif self._leader is not None:
            target = self._leader
        else:
            target = self._endpoints[self._rr % len(self._endpoints)]
        attempt = 0  # backoff rounds so far
        tried = 0  # endpoints tried since the last backoff
        redirects = 0
        last_error: str | None = None
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise self._timeout_error(total, last_error, False, what, target)
            rpc = getattr(self._stub(target, service), method)
            try:
                response = await rpc(request, timeout=remaining, metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                details = _one_line(exc.details() or code.name.lower())
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidArgumentError(details) from None
                if code == grpc.StatusCode.PERMISSION_DENIED:
                    raise PermissionDeniedError(f"{target}: {details}") from None
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith(_NOSPACE):
                    raise NoSpaceError(f"{target}: {details}") from None
                if code == grpc.StatusCode.FAILED_PRECONDITION and details.startswith(_REFUSED):
                    raise CommandError(details[len(_REFUSED) :].strip()) from None
                if code not in _RETRYABLE_STATUS:
                    raise RequestFailedError(f"{target}: {details}", code.name) from None
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and loop.time() >= deadline - 1e-3:
                    raise self._timeout_error(
                        total, last_error, last_error is None, what, target
                    ) from None
                last_error = f"{target}: {details}"
                if endpoint is None:
                    hint = _leader_hint(exc.trailing_metadata())
                    if hint and hint != target and redirects <= 2 * len(self._endpoints) + 2:
                        self._leader = target = hint
                        redirects += 1
                        continue
                    if self._leader == target:
                        self._leader = None
                    target = self._next_endpoint()
                    tried += 1
                    if tried < len(self._endpoints):
                        continue  # try every endpoint once before backing off
                tried = 0
                redirects = 0
                delay = min(self._backoff(attempt), deadline - loop.time())
                attempt += 1
                if delay > 0:
                    await asyncio.sleep(delay)
                continue
            return target, response

    # -- internals: pipelined ops ------------------------------------------------------------

    def _wake_writer(self) -> None:
        assert self._wake is not None
        self._wake.set()

    async def _submit_one(self, op: _Op, timeout: float | None) -> Any:
        loop = self._ensure_started()
        total = self._call_timeout(timeout)
        op.fut = fut = loop.create_future()
        self._pending.append(op)
        self._wake_writer()
        handle = loop.call_later(total, self._expire, (op,), total)
        try:
            return await fut
        finally:
            handle.cancel()

    def _expire(self, ops: Iterable[_Op], total: float) -> None:
        """Deadline of a call: fail its unfinished ops; a silent stream is restarted."""
        stream = self._stream
        for op in ops:
            fut = op.fut
            if fut is None or fut.done():
                continue
            sent_on = op.stream
            reached = sent_on is not None and sent_on.got_result
            fut.set_exception(
                self._timeout_error(
                    total, self._last_error, reached, "leader", sent_on.target if sent_on else None
                )
            )
            if sent_on is not None and sent_on is stream and sent_on.last_result < op.sent_at:
                # Nothing came back on this stream since the op was sent: it looks dead.
                sent_on.request_restart(
                    "silent", f"no answer from {sent_on.target} within {total:g}s"
                )
        if self._writer_blocked:
            self._wake_writer()

    def _fail_pending(self, err: Exception) -> None:
        """Fail every queued call with ``err``."""
        pending, self._pending = self._pending, deque()
        for op in pending:
            if op.fut is not None and not op.fut.done():
                op.fut.set_exception(err)

    def _requeue(self, ops: list[_Op], front: bool = True) -> None:
        live = [op for op in ops if op.fut is not None and not op.fut.done()]
        if not live or self._closed:
            return
        if front:
            self._pending.extendleft(reversed(live))
        else:
            self._pending.extend(live)
        self._wake_writer()

    def _window_open(self) -> bool:
        out = self._outstanding
        while out and out[0].fut is not None and out[0].fut.done():
            out.popleft()
        return not out or self._seq + 1 - out[0].sequence < self._max_outstanding

    async def _session_loop(self) -> None:
        """Keep one Session stream to the leader while there is work; redirect and retry."""
        assert self._wake is not None
        wake = self._wake
        failures = 0
        redirects = 0
        while True:
            while not self._pending:
                wake.clear()
                await wake.wait()
            target = self._leader or self._endpoints[self._rr % len(self._endpoints)]
            call = self._stub(target).Session(metadata=self._metadata)
            stream = _Stream(target, call)
            self._stream = stream
            writer = asyncio.create_task(self._write_loop(stream))
            reader = asyncio.create_task(self._read_loop(stream))
            restart = asyncio.create_task(stream.restart.wait())
            try:
                await asyncio.wait((writer, reader, restart), return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._stream = None
                self._writer_blocked = False
                for task in (writer, reader, restart):
                    task.cancel()
                call.cancel()
                await asyncio.gather(writer, reader, restart, return_exceptions=True)
                retry = [op for fid in sorted(stream.inflight) for op in stream.inflight[fid]]
                stream.inflight.clear()
                self._requeue(retry)

            if stream.reason is not None:
                kind, detail, hint = stream.reason
            else:
                kind, hint = "failed", ""
                detail = "session stream ended"
                for task in (reader, writer):
                    if task.done() and not task.cancelled():
                        exc = task.exception()
                        if exc is not None:
                            detail = f"session failed: {exc!r}"
                        elif task.result() is not None:
                            detail, hint = task.result()
                        break
            if stream.got_result:
                failures = 0
            if call.done() and await call.code() == grpc.StatusCode.PERMISSION_DENIED:
                # Our certificate may not open a session there: retrying cannot help.
                self._fail_pending(
                    PermissionDeniedError(f"{target}: {_one_line(await call.details() or '')}")
                )
                continue
            self._last_error = f"{target}: {_one_line(detail)}"
            if hint and hint != target and redirects <= 2 * len(self._endpoints) + 2:
                self._leader = hint
                redirects += 1
                continue
            redirects = 0
            if kind == "backoff":
                self._leader = target
            else:
                if self._leader == target:
                    self._leader = None
                self._rr += 1
            if not self._pending:
                continue  # idle: reconnect when there is work again
            await asyncio.sleep(self._backoff(failures))
            failures += 1

    async def _write_loop(self, stream: _Stream) -> tuple[str, str] | None:
        assert self._wake is not None and self._loop is not None
        wake = self._wake
        pending = self._pending
        loop = self._loop
        call = stream.call
        max_ops = self._max_ops
        max_bytes = self._max_bytes
        while True:
            while not pending:
                wake.clear()
                await wake.wait()
            if stream.reason is not None:
                return None  # this stream is being replaced: send nothing more on it
            self._frame_id += 1
            frame_id = self._frame_id
            frame = pb.SessionFrame(frame_id=frame_id, client_id=self._client_id)
            add = frame.ops.add
            batch: list[_Op] = []
            nbytes = 0
            blocked = False
            while pending and len(batch) < max_ops:
                op = pending[0]
                if op.fut is None or op.fut.done():
                    pending.popleft()
                    continue
                size = len(op.key) + len(op.value) + len(op.expected) + 16
                if batch and nbytes + size > max_bytes:
                    break
                if op.kind != _GET and op.sequence == 0:
                    if not self._window_open():
                        blocked = True
                        break
                    self._seq += 1
                    op.sequence = self._seq
                    self._outstanding.append(op)
                pending.popleft()
                add(
                    kind=op.kind,
                    key=op.key,
                    value=op.value,
                    expected=op.expected,
                    expect_absent=op.expect_absent,
                    sequence=op.sequence,
                    read_mode=op.read_mode,
                )
                batch.append(op)
                nbytes += size
            if batch:
                now = loop.time()
                for op in batch:
                    op.stream = stream
                    op.sent_at = now
                stream.inflight[frame_id] = batch
                try:
                    await call.write(frame)
                except grpc.aio.AioRpcError as exc:
                    return self._stream_failure(exc.code(), exc.details(), exc.trailing_metadata())
                except asyncio.InvalidStateError:
                    return await self._call_failure(call)
            elif blocked:
                # Too many unresolved write sequences: wait until some finish.
                self._writer_blocked = True
                wake.clear()
                try:
                    await wake.wait()
                finally:
                    self._writer_blocked = False

    async def _read_loop(self, stream: _Stream) -> tuple[str, str]:
        call = stream.call
        while True:
            try:
                result = await call.read()
            except grpc.aio.AioRpcError as exc:
                return self._stream_failure(exc.code(), exc.details(), exc.trailing_metadata())
            if result is grpc.aio.EOF:
                return await self._call_failure(call)
            self._on_result(stream, result)

    async def _call_failure(self, call: Any) -> tuple[str, str]:
        code = await call.code()
        details = await call.details()
        metadata = await call.trailing_metadata()
        if code == grpc.StatusCode.OK:
            return "the server closed the session stream", _leader_hint(metadata)
        return self._stream_failure(code, details, metadata)

    @staticmethod
    def _stream_failure(code: Any, details: str | None, metadata: Any) -> tuple[str, str]:
        name = getattr(code, "name", str(code)).lower()
        return f"{name}: {_one_line(details or '')}", _leader_hint(metadata)

    def _on_result(self, stream: _Stream, result: Any) -> None:
        ops = stream.inflight.pop(result.frame_id, None)
        if ops is None:
            return
        results = result.results
        unavailable: list[_Op] = []
        later: list[_Op] = []
        first_error = ""
        ok = False
        for i, op in enumerate(ops):
            fut = op.fut
            if fut is None or fut.done():
                continue
            if i >= len(results):  # a malformed answer: retry what it did not cover
                later.append(op)
                continue
            r = results[i]
            code = r.code
            if code == _CODE_OK:
                ok = True
                kind = op.kind
                if kind == _PUT or kind == _PUT_MANY:
                    fut.set_result(None)
                elif kind == _GET:
                    fut.set_result(r.value if r.ok else None)
                else:
                    fut.set_result(r.ok)
            elif code == _CODE_UNAVAILABLE:
                unavailable.append(op)
                first_error = first_error or r.error or "unavailable"
            elif code == _CODE_RESOURCE_EXHAUSTED and r.error.startswith(_NOSPACE):
                fut.set_exception(NoSpaceError(f"{stream.target}: {_one_line(r.error)}"))
            elif code in _RETRY_LATER_CODES:
                later.append(op)
                first_error = first_error or r.error or _CODE_NAMES.get(code, str(code))
            elif code == _CODE_INVALID_ARGUMENT:
                fut.set_exception(InvalidArgumentError(_one_line(r.error or "invalid argument")))
            elif code == _CODE_PERMISSION_DENIED:
                fut.set_exception(PermissionDeniedError(f"{stream.target}: {_one_line(r.error)}"))
            else:
                name = _CODE_NAMES.get(code, str(code))
                fut.set_exception(
                    RequestFailedError(f"{stream.target}: {_one_line(r.error or name)}", name)
                )
        if ok:
            stream.got_result = True
            stream.last_result = self._loop.time() if self._loop is not None else 0.0
            self._last_error = None
        if first_error:
            self._last_error = f"{stream.target}: {_one_line(first_error)}"
        if unavailable:
            leader = result.leader if is_address(result.leader) else ""
            if leader and leader == stream.target:
                later.extend(unavailable)  # the leader itself is not ready: wait, same stream
            else:
                self._requeue(unavailable)
                kind = "redirect" if leader else "rotate"
                stream.request_restart(kind, first_error, leader)
        if later:
            delay = self._backoff(max(op.attempts for op in later))
            for op in later:
                op.attempts += 1
            assert self._loop is not None
            self._loop.call_later(delay, self._requeue, later)
        if self._writer_blocked:
            self._wake_writer()


# ---------------------------------------------------------------------------------- SyncClient


class SyncClient:
    """Blocking twin of ``Client`` for plain synchronous code.

    Runs a private event loop in a daemon thread; every method blocks until its result is in.
    Thread-safe: calls from several threads share one pipelined session. Close it (``close()``
    or ``with``) to stop the thread.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str] = (DEFAULT_ENDPOINT,),
        *,
        timeout: float = DEFAULT_TIMEOUT,
        **options: Any,
    ) -> None:
        self._client = Client(endpoints, timeout=timeout, **options)
        self._loop = asyncio.new_event_loop()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="raftfast-client", daemon=True
        )
        self._thread.start()

    @property
    def client_id(self) -> int:
        return self._client.client_id

    @property
    def leader(self) -> str | None:
        return self._client.leader

    @property
    def endpoints(self) -> list[str]:
        return self._client.endpoints

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self._closed:
            coro.close()
            raise RaftfastError("client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        """Close the client and stop its thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result(timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self._loop.close()

    def put(self, key: BytesLike, value: BytesLike, *, timeout: float | None = None) -> None:
        self._run(self._client.put(key, value, timeout=timeout))

    def get(
        self,
        key: BytesLike,
        *,
        read_mode: ReadModeLike = None,
        timeout: float | None = None,
    ) -> bytes | None:
        return self._run(self._client.get(key, read_mode=read_mode, timeout=timeout))

    def delete(self, key: BytesLike, *, timeout: float | None = None) -> bool:
        return self._run(self._client.delete(key, timeout=timeout))

    def cas(
        self,
        key: BytesLike,
        expected: BytesLike | None,
        new: BytesLike,
        *,
        timeout: float | None = None,
    ) -> bool:
        return self._run(self._client.cas(key, expected, new, timeout=timeout))

    def put_many(
        self,
        items: Iterable[tuple[BytesLike, BytesLike]],
        *,
        timeout: float | None = None,
    ) -> None:
        self._run(self._client.put_many(list(items), timeout=timeout))

    def scan(
        self,
        prefix: BytesLike = b"",
        limit: int = 1000,
        *,
        read_mode: ReadModeLike = None,
        timeout: float | None = None,
    ) -> list[tuple[bytes, bytes]]:
        return self._run(self._client.scan(prefix, limit, read_mode=read_mode, timeout=timeout))

    def status(
        self, endpoint: str | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        return self._run(self._client.status(endpoint, timeout=timeout))

    def transfer_leader(self, target: str, *, timeout: float | None = None) -> str:
        return self._run(self._client.transfer_leader(target, timeout=timeout))

    def members(self, *, timeout: float | None = None) -> dict[str, Any]:
        return self._run(self._client.members(timeout=timeout))

    def add_member(
        self, node_id: str, address: str, *, learner: bool = False, timeout: float | None = None
    ) -> dict[str, Any]:
        return self._run(
            self._client.add_member(node_id, address, learner=learner, timeout=timeout)
        )

    def promote_member(self, node_id: str, *, timeout: float | None = None) -> dict[str, Any]:
        return self._run(self._client.promote_member(node_id, timeout=timeout))

    def demote_member(self, node_id: str, *, timeout: float | None = None) -> dict[str, Any]:
        return self._run(self._client.demote_member(node_id, timeout=timeout))

    def alarms(self, *, timeout: float | None = None) -> dict[str, Any]:
        return self._run(self._client.alarms(timeout=timeout))

    def propose(self, command: BytesLike, *, timeout: float | None = None) -> bytes:
        return self._run(self._client.propose(command, timeout=timeout))

    def query(
        self, request: BytesLike, *, read_mode: ReadModeLike = None, timeout: float | None = None
    ) -> bytes:
        return self._run(self._client.query(request, read_mode=read_mode, timeout=timeout))

    def disarm_alarms(self, *, timeout: float | None = None) -> dict[str, Any]:
        return self._run(self._client.disarm_alarms(timeout=timeout))

    def remove_member(self, node_id: str, *, timeout: float | None = None) -> dict[str, Any]:
        return self._run(self._client.remove_member(node_id, timeout=timeout))
