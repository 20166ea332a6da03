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
  backoff (20 ms doubling up to ``backoff_max``, 100 ms) and jitter until the call's own
  deadline, so a new leader is found within about 100 ms of its election (a follower asked
  while an election is on answers once it knows the winner). Then ``ClusterUnavailableError``
  (nothing answered: no leader reachable) or ``DeadlineExceededError`` (its base class: a node was
  reached but the call did not complete). INVALID_ARGUMENT becomes ``InvalidArgumentError`` at
  once, without retry; any other status becomes ``RequestFailedError``.
* **Exactly-once writes.** The client has a random nonzero 63-bit ``client_id``; every write gets
  the next number of its sequence counter the first time it is sent, and every retry of that
  write resends the same sequence, so the servers apply it once. Because the servers remember
  only a window of recent sequences per client (``raftfast.dedup.DEDUP_WINDOW``), at most
  ``max_outstanding_writes`` sequences are unresolved at a time; further writes wait.
* **Automatic pipelining.** ``put``, ``get``, ``delete`` and ``cas`` are queued; one sender task
  drains the queue into ``SessionFrame`` messages of up to ``max_ops_per_frame`` operations
  and ``max_frame_bytes`` on a single bidirectional ``Session`` stream to the leader, and
  results are matched by ``frame_id``. Many concurrent calls therefore travel as a few frames.
  When the stream fails, every operation still in flight is retried on a new stream (writes
  with their sequences). A frame of several ops that a node refuses as too big (its
  ``--max-request-bytes`` is below ``max_frame_bytes``) goes again as frames of half its size,
  and so on: an op too big for the node fails alone (``InvalidArgumentError``), at once.
  ``scan`` and ``status`` are unary calls.
* **The stream's transport.** Where a node offers the Session stream over plain TCP (its
  ``Status`` names the port: ``--client-stream-port``), the client uses it (under the same TLS):
  a gRPC stream message costs ~0.2 ms of CPU at each end, and a write is two.
  ``session_transport="grpc"`` keeps to the gRPC call; a node whose TCP port cannot be reached
  is asked over gRPC for 10 s before the client tries TCP there again.

Keys and values are ``bytes`` (``bytearray`` and ``memoryview`` are copied); ``str`` is encoded
as UTF-8; anything else raises ``TypeError``.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc

from raftfast._accel import chunk_payloads, encode_uniform, flatten_pairs
from raftfast._batch_py import to_bytes  # (flatten_pairs's, for one key or value)
from raftfast.address import ADDRESS_FORM, is_address
from raftfast.client.calls import (
    CAS,
    CHANNEL_OPTIONS,
    DEFAULT_ENDPOINT,
    DEFAULT_TIMEOUT,
    DELETE,
    GET,
    NOSPACE,
    PUT,
    PUT_MANY,
    READ_MODES,
    REFUSED,
    RETRYABLE_STATUS,
    STUBS,
    BytesLike,
    ReadModeLike,
    leader_hint,
    message_to_dict,
    new_client_id,
    not_raftfast,
    one_line,
    parse_endpoints,
    read_mode_of,
)
from raftfast.client.deadlines import Deadlines
from raftfast.client.forks import refuse_if_forked_while_open
from raftfast.client.session import (
    SESSION_TRANSPORTS,
    Op,
    Sequenced,
    SessionMixin,
    SessionStub,
    Stream,
)
from raftfast.dedup import DEDUP_WINDOW
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
from raftfast.limits import MAX_FRAME_OPS, MAX_TIMEOUT_S, check_node_id
from raftfast.proto import raftfast_pb2 as pb
from raftfast.security.tls import TLSFiles, channel_credentials
from raftfast.storage.backup import BackupInfo, BackupWriter, backup_target

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_TIMEOUT",
    "READ_MODES",
    "BytesLike",
    "Client",
    "ReadModeLike",
    "TLSFiles",
    "message_to_dict",
    "parse_endpoints",
]

# put_many packs this much (or this many pairs) into one atomic write: big enough to make the
# per-write costs vanish, small enough to keep frames and log entries moderate.
_PUT_MANY_BYTES = 256 * 1024
_PUT_MANY_PAIRS = 4096
_SCAN_PAGE = 10_000  # items asked for per Scan page (the server's maximum)

_STUBS = {**STUBS, "session": SessionStub}  # (Session with spliced frames)


def cas_op(key: BytesLike, expected: BytesLike | None, new: BytesLike) -> Op:
    """The op of ``cas(key, expected, new)``."""
    if expected is None:
        return Op(CAS, to_bytes(key, "key"), to_bytes(new, "new"), expect_absent=True)
    return Op(
        CAS, to_bytes(key, "key"), to_bytes(new, "new"), expected=to_bytes(expected, "expected")
    )


# What gRPC says when the address answers, but not with HTTP/2 (a node's replication or Session
# port, a web server): "not a raftfast server" (exit 5), not "no node reachable" (exit 3).
_NOT_GRPC = ("Failed parsing HTTP/2", "Trying to connect an http1.x server")


class Client(SessionMixin):
    """Asynchronous raftfast client (see the module docstring).

    ``endpoints``: "host:port,host:port" or a list of "host:port". ``timeout``: the default
    deadline in seconds of every call (each method also takes ``timeout=``; above a year, inf
    included, it is a year). ``cluster_id``: when given, sent as ``cluster-id`` metadata so a
    node of another cluster refuses the calls (printable ASCII, as gRPC metadata).

    ``tls``: connect over TLS, trusting ``tls.ca_file`` (None: the system's CAs) and, if the
    cluster checks client certificates, presenting ``tls.cert_file``/``tls.key_file``
    (``TLSFiles("ca.crt", "app.crt", "app.key")``).

    A Client binds to the event loop it is first used in. Close it (``await c.close()`` or
    ``async with``) to release its channels: its background task holds it, so one dropped
    unclosed is never collected. Make clients after a fork, not before (raftfast.client.forks).
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
        backoff_max: float = 0.1,  # while no leader answers: a new one is found within this
        tls: TLSFiles | None = None,
        session_transport: str = "auto",
    ) -> None:
        refuse_if_forked_while_open()
        self._endpoints = parse_endpoints(endpoints)
        if cluster_id is not None and not isinstance(cluster_id, str):
            raise TypeError(f"cluster_id must be a str, not {type(cluster_id).__name__}")
        if cluster_id and not all(" " <= c <= "~" for c in cluster_id):
            raise ValueError("cluster_id must be printable ASCII (it travels as gRPC metadata)")
        if session_transport not in SESSION_TRANSPORTS:
            raise ValueError(f"session_transport must be one of {', '.join(SESSION_TRANSPORTS)}")
        if tls is not None and not isinstance(tls, TLSFiles):
            raise TypeError(f"tls must be a raftfast.TLSFiles, not {type(tls).__name__}")
        self._credentials = channel_credentials(tls) if tls is not None else None
        self._tls = tls
        self._ssl_context: ssl.SSLContext | None = None  # (made on first use)
        self._session_transport = session_transport
        self._session_ports: dict[str, int] = {}  # address -> its Session port over TCP (0: none)
        # address -> (Session streams over TCP that could not connect in a row, when the last)
        self._tcp_failures: dict[str, tuple[int, float]] = {}
        self._hello = pb.SessionHello(cluster_id=cluster_id or "")
        self._timeout = self._check_timeout(timeout)
        if client_id is None:
            client_id = new_client_id()
        if not isinstance(client_id, int) or not 0 < client_id < 2**63:
            raise ValueError("client_id must be an integer in [1, 2**63)")
        for name, count in (
            ("max_ops_per_frame", max_ops_per_frame),
            ("max_frame_bytes", max_frame_bytes),
            ("max_outstanding_writes", max_outstanding_writes),
        ):
            if isinstance(count, bool) or not isinstance(count, int):
                raise TypeError(f"{name} must be an int, not {type(count).__name__}")
        if max_ops_per_frame < 1 or max_frame_bytes < 1 or max_outstanding_writes < 1:
            raise ValueError("frame and window limits must be positive")
        if max_ops_per_frame > MAX_FRAME_OPS:
            raise ValueError(f"max_ops_per_frame is at most {MAX_FRAME_OPS} (what a node takes)")
        if max_outstanding_writes >= DEDUP_WINDOW:
            # (a node remembers a client's last DEDUP_WINDOW writes: a retried write older
            # than that could be applied twice)
            raise ValueError(f"max_outstanding_writes must be below {DEDUP_WINDOW}")
        for name, seconds in (("backoff_base", backoff_base), ("backoff_max", backoff_max)):
            if isinstance(seconds, bool) or not isinstance(seconds, int | float):
                raise TypeError(f"{name} must be a number, not {type(seconds).__name__}")
            if not 0 <= seconds <= 60:
                raise ValueError(f"{name} must be within [0, 60] seconds, got {seconds}")
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
        self._pending: deque[Op] = deque()
        # writes with a sequence, in sequence order (queued ops; proposals: Sequenced)
        self._outstanding: deque[Op | Sequenced] = deque()
        self._window_lock: asyncio.Lock | None = None  # (proposals waiting for the window)
        self._wake: asyncio.Event | None = None
        self._deadlines: Deadlines | None = None  # (of the calls in flight: set with _loop)
        self._writer_blocked = False
        self._writer_idle = False  # the writer task waits for work (SessionMixin._write_now)
        self._stream: Stream | None = None
        self._session_task: asyncio.Task[None] | None = None
        self._closed = False
        self._closing: asyncio.Event | None = None  # (set by close(): ends backoffs' sleeps)

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
        if self._closing is not None:
            self._closing.set()
        task, self._session_task = self._session_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._fail_pending(RaftfastError("client is closed"))
        if self._deadlines is not None:
            for op in self._deadlines.drain():
                op.fut.set_exception(RaftfastError("client is closed"))
        self._outstanding.clear()
        channels, self._channels = list(self._channels.values()), {}
        self._stubs.clear()
        for channel in channels:
            await channel.close()

    # -- key/value API (pipelined on the Session stream) -------------------------------------

    async def put(self, key: BytesLike, value: BytesLike, *, timeout: float | None = None) -> None:
        """Set ``key`` to ``value``."""
        op = Op(PUT, to_bytes(key, "key"), to_bytes(value, "value"))
        await self._submit_one(op, timeout)

    async def get(
        self,
        key: BytesLike,
        *,
        read_mode: ReadModeLike = None,
        timeout: float | None = None,
    ) -> bytes | None:
        """The value of ``key``, or None. ``read_mode``: linearizable, lease, stale or default."""
        op = Op(GET, to_bytes(key, "key"), read_mode=read_mode_of(read_mode))
        result: bytes | None = await self._submit_one(op, timeout)
        return result

    async def delete(self, key: BytesLike, *, timeout: float | None = None) -> bool:
        """Delete ``key``; True if it existed."""
        op = Op(DELETE, to_bytes(key, "key"))
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
        result: bool = await self._submit_one(cas_op(key, expected, new), timeout)
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
        flat = flatten_pairs(items)  # key, value, key, ... (compiled: no call per pair)
        ops = []
        for start, end in chunk_payloads(flat[1::2], _PUT_MANY_BYTES, _PUT_MANY_PAIRS):
            group = flat[2 * start : 2 * end]
            if not all(group[0::2]):
                raise InvalidArgumentError("key must not be empty")
            ops.append(Op(PUT_MANY, b"", encode_uniform(0, 0, group)))  # (= pack_pairs)
        if not ops:
            return
        loop = self._ensure_started()
        total = self._call_timeout(timeout)
        futs = []
        for op in ops:
            op.fut = loop.create_future()
            futs.append(op.fut)
        self._pending.extend(ops)
        if not self._write_now():
            self._wake_writer()
        assert self._deadlines is not None
        for op in ops:
            self._deadlines.add(op, total)
        try:
            results = await asyncio.gather(*futs, return_exceptions=True)
        finally:
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
        snapshot. ``timeout`` applies to each page. ``scan_pages`` hands each page over as it
        comes (a whole keyspace need not be held at once).
        """
        items: list[tuple[bytes, bytes]] = []
        async for page in self.scan_pages(prefix, limit, read_mode=read_mode, timeout=timeout):
            items += page
        return items

    async def scan_pages(
        self,
        prefix: BytesLike = b"",
        limit: int = 0,
        *,
        read_mode: ReadModeLike = None,
        timeout: float | None = None,
    ) -> AsyncIterator[list[tuple[bytes, bytes]]]:
        """``scan``, a page of (key, value) pairs at a time (``limit`` 0: all of them)."""
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"limit must be an int, not {type(limit).__name__}")
        if limit < 0:
            raise ValueError(f"limit must be 0 (all) or positive, got {limit}")
        request = pb.ScanRequest(
            prefix=to_bytes(prefix, "prefix"), read_mode=read_mode_of(read_mode)
        )
        count = 0
        while True:
            request.limit = min(limit - count, _SCAN_PAGE) if limit else 0
            _, response = await self._unary("Scan", request, timeout)
            page = [(item.key, item.value) for item in response.items]
            count += len(page)
            yield page
            if not response.next_key or (limit and count >= limit):
                return
            request.start = response.next_key

    async def status(
        self, endpoint: str | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """The StatusResponse of one node as a dict (``members`` as a list of dicts).

        ``endpoint`` None: the leader if known, else the first endpoint that answers. The dict
        also has ``endpoint``: the address that answered.
        """
        if endpoint is not None and not is_address(endpoint):
            raise ValueError(f"bad endpoint {endpoint!r} (want {ADDRESS_FORM})")
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
        command = to_bytes(command, "command")
        total = self._call_timeout(timeout)
        loop = self._ensure_started()
        started = loop.time()
        slot = await self._take_sequence(total)
        try:
            request = pb.ProposeRequest(
                client_id=self._client_id, sequence=slot.sequence, command=command
            )
            left = max(total - (loop.time() - started), 0.001)  # (the window's wait spent)
            _, response = await self._unary("Propose", request, left, service="machine")
        finally:
            self._release(slot)
        return response.result

    async def query(
        self, request: BytesLike, *, read_mode: ReadModeLike = None, timeout: float | None = None
    ) -> bytes:
        """Ask the cluster's state machine ``request`` (read-only): linearizable by default,
        ``read_mode`` lease or stale at will. CommandError if its query raised."""
        message = pb.QueryRequest(
            request=to_bytes(request, "request"), read_mode=read_mode_of(read_mode)
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

    async def save_snapshot(self, path: str, *, timeout: float | None = None) -> dict[str, int]:
        """Write a backup of the whole cluster state to ``path``: the leader takes a snapshot
        covering every write acknowledged before the call and streams it here. Returns its
        ``index``, ``term``, ``size`` and ``crc32c``. ``raftfast-node --restore`` starts a new
        cluster from the file (docs/operations.md)."""

        backup_target(path)  # (OSError before asking the leader for anything)

        async def consume(call: Any) -> BackupInfo:
            writer = BackupWriter(path)
            try:
                meta = None
                async for chunk in call:
                    if meta is None:
                        meta = chunk
                    writer.write(chunk.data)
                if meta is None:
                    raise RequestFailedError("the snapshot stream ended empty", "DATA_LOSS")
                return writer.finish(meta.index, meta.term, meta.size)
            except BaseException:
                writer.abort()
                raise

        _, info = await self._unary(
            "SnapshotSave", pb.SnapshotSaveRequest(), timeout, service="admin", consume=consume
        )
        return {"index": info.index, "term": info.term, "size": info.size, "crc32c": info.crc}

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
            raise ValueError(f"bad address {address!r} (want {ADDRESS_FORM})")
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
        """A call's deadline in seconds: positive; past MAX_TIMEOUT_S (inf included) it is
        MAX_TIMEOUT_S."""
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise TypeError(f"timeout must be a number, not {type(timeout).__name__}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        return MAX_TIMEOUT_S if timeout > MAX_TIMEOUT_S else float(timeout)  # (10**400: no float)

    def _call_timeout(self, timeout: float | None) -> float:
        return self._timeout if timeout is None else self._check_timeout(timeout)

    def _ensure_started(self) -> asyncio.AbstractEventLoop:
        if self._closed:
            raise RaftfastError("client is closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._wake = asyncio.Event()
            self._deadlines = Deadlines(loop, self._expire)
            self._closing = asyncio.Event()
        elif self._loop is not loop:
            raise RuntimeError("this Client is bound to the event loop it was first used in")
        task = self._session_task
        if task is None or task.done():  # (done: cancelled by the application, at a shutdown)
            self._start_session(loop)
        return loop

    def _start_session(self, loop: asyncio.AbstractEventLoop) -> None:
        task = loop.create_task(self._session_loop(), name="raftfast-session")
        task.add_done_callback(self._session_ended)
        self._session_task = task

    def _session_ended(self, task: asyncio.Task[None]) -> None:
        """The session task ended (cancelled: it never returns): an application that cancels
        every task but its own, say. If calls still wait for it, it starts again now, not at
        the next call; when the client closes, or the loop ends (its tasks cancelled, and
        with them the calls), it does not."""
        loop = self._loop
        if self._closed or task is not self._session_task or loop is None or loop.is_closed():
            return
        if any(op.fut is not None and not op.fut.done() for op in self._pending):
            self._start_session(loop)

    def _stub(self, address: str, service: str = "kv") -> Any:
        """The stub of ``service`` (kv, admin or machine) for ``address``; the services share
        one channel per address."""
        if self._closed:  # (a channel opened now would never be closed)
            raise RaftfastError("client is closed")
        stub = self._stubs.get((address, service))
        if stub is None:
            channel = self._channels.get(address)
            if channel is None:
                if self._credentials is None:
                    channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
                else:
                    channel = grpc.aio.secure_channel(
                        address, self._credentials, options=CHANNEL_OPTIONS
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
        at: str | None = None,
    ) -> RaftfastError:
        """``at``: the one address asked (else the client's endpoints)."""
        if last_error is not None and not reached:
            if any(sign in last_error for sign in _NOT_GRPC):  # (retrying cannot help)
                return RequestFailedError(
                    f"not a raftfast server at {at or ','.join(self._endpoints)}: it does not "
                    f"speak gRPC ({one_line(last_error)})",
                    "UNAVAILABLE",
                )
            return ClusterUnavailableError(
                f"no {what} reachable at {at or ','.join(self._endpoints)} within {total:g}s"
                f" (last error: {one_line(last_error)}){self._tls_hint(last_error)}"
            )
        where = f" waiting for {target}" if target else ""
        return DeadlineExceededError(f"deadline of {total:g}s exceeded{where}")

    def _tls_hint(self, last_error: str) -> str:
        """What to try when the server closed the connection at once: that is how a TLS
        server answers a plain client, or one without the certificate it asks for."""
        if "Socket closed" not in last_error:
            return ""
        if self._tls is None:
            return (
                "; if the cluster uses TLS, trust its CA (raftfast --cacert FILE; "
                "Client(tls=TLSFiles(ca_file)))"
            )
        if self._tls.cert_file is None:
            return (
                "; if the cluster checks client certificates, present one (raftfast --cert "
                "FILE --key FILE; TLSFiles(ca_file, cert_file, key_file))"
            )
        return ""

    async def _unary(
        self,
        method: str,
        request: Any,
        timeout: float | None,
        *,
        endpoint: str | None = None,
        what: str = "leader",
        service: str = "kv",
        consume: Callable[[Any], Awaitable[Any]] | None = None,
    ) -> tuple[str, Any]:
        """One unary call with redirects and retries until the deadline; (address, response).
        ``consume``: the call is server-streaming; its answer is what ``consume(call)`` returns
        (it reads the whole stream; a failure part way is retried like a failed call)."""
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
            if self._closed:  # (closed while this call backed off: it ends now)
                raise RaftfastError("client is closed")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise self._timeout_error(total, last_error, False, what, target, endpoint)
            rpc = getattr(self._stub(target, service), method)
            try:
                call = rpc(request, timeout=remaining, metadata=self._metadata)
                response = await (call if consume is None else consume(call))
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._closed and (task is None or not task.cancelling()):
                    # (closing the channel cancels its calls; the caller was not cancelled)
                    raise RaftfastError("client is closed") from None
                raise
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                details = one_line(exc.details() or code.name.lower())
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidArgumentError(details) from None
                if code == grpc.StatusCode.PERMISSION_DENIED:
                    raise PermissionDeniedError(f"{target}: {details}") from None
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith(NOSPACE):
                    raise NoSpaceError(f"{target}: {details}") from None
                if code == grpc.StatusCode.FAILED_PRECONDITION and details.startswith(REFUSED):
                    raise CommandError(details[len(REFUSED) :].strip()) from None
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    raise RequestFailedError(
                        not_raftfast(target, method, details), code.name
                    ) from None
                if code == grpc.StatusCode.CANCELLED and self._closed:
                    raise RaftfastError("client is closed") from None
                if code not in RETRYABLE_STATUS:
                    raise RequestFailedError(f"{target}: {details}", code.name) from None
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and loop.time() >= deadline - 0.1:
                    # (the node gives up DEADLINE_MARGIN before the deadline, saying why: a
                    # learner that has not caught up, say; that is the answer, not another
                    # endpoint's "not the leader" in the time left)
                    raise DeadlineExceededError(
                        f"deadline of {total:g}s exceeded at {target}: {details}"
                    ) from None
                last_error = f"{target}: {details}"
                if endpoint is None:
                    hint = leader_hint(exc.trailing_metadata())
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
                    await self._back_off(delay)
                continue
            return target, response

    async def _back_off(self, seconds: float) -> None:
        """Sleep ``seconds``, or until the client closes."""
        closing = self._closing
        assert closing is not None  # (set with the loop: _ensure_started)
        try:
            async with asyncio.timeout(seconds):
                await closing.wait()
        except TimeoutError:
            pass
