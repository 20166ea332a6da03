"""The embeddable node: Raft for your own state machine, in your own process.

::

    async with raftfast.Node(
        id="n1", listen="127.0.0.1:7001", data_dir="data/n1", state_machine=Counter(),
        peers={"n1": "127.0.0.1:7001", "n2": "127.0.0.1:7002", "n3": "127.0.0.1:7003"},
    ) as node:
        result = await node.propose(b"+1")      # from any member: followers forward it
        value = await node.query(b"")           # linearizable unless mode= lease or stale
        node.is_leader, node.leader, await node.status()

``SyncNode`` is the blocking twin for code without asyncio (its event loop runs in a thread).
Several nodes can run in one process. Every keyword that ``raftfast-node`` takes as a flag is a
keyword here (``tick_ms=20``, ``peer_listen=...``, TLS files...).

A proposal is exactly-once: it carries this node's client id and a sequence number, and keeps
them when it is retried (at a new leader after a leader change, say), so it is applied once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import secrets
import threading
import weakref
from collections import deque
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc

from raftfast._batch_py import to_bytes
from raftfast.client.calls import CHANNEL_OPTIONS, BytesLike
from raftfast.dedup import owned_client_id
from raftfast.errors import (
    ClusterUnavailableError,
    CommandError,
    DeadlineExceededError,
    InvalidArgumentError,
    NotLeaderError,
    PermissionDeniedError,
    RaftfastError,
)
from raftfast.exactly_once import frame_command
from raftfast.limits import MAX_CLIENT_ID, MAX_TIMEOUT_S
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto import raftfast_pb2_grpc as pb_grpc
from raftfast.security.tls import TLSFiles, certificate_name, channel_credentials
from raftfast.server.machine_service import as_result_bytes, asked, command_refusal
from raftfast.server.settings import NodeSettings
from raftfast.statemachine import StateMachine, missing_methods

__all__ = ["Node", "SyncNode"]

log = logging.getLogger("raftfast.node")
_DEFAULT_TIMEOUT_S = 30.0  # a call's deadline unless the node's or the call's says otherwise

T = TypeVar("T")
_MODES = {"linearizable": pb.READ_LINEARIZABLE, "lease": pb.READ_LEASE, "stale": pb.READ_STALE}
_RETRY_S = 0.05  # first pause between attempts while no leader answers (doubling, to 1 s)
_STOPPED_CHECK_S = 0.5  # how often a SyncNode caller looks whether the node stopped meanwhile
# Proposals of one node unresolved at a time (a Client's default): a member refuses a sequence
# DEDUP_WINDOW (4,096) behind a newer one of the same client as a late duplicate, not applied,
# and forwarded proposals arrive in any order (6,000 at once from a follower: hundreds refused).
MAX_UNRESOLVED_PROPOSALS = 4000
# State machines a node has started with: what they applied is in them, and a new node on the
# same data directory would replay its log onto it (every count doubled, silently).
# (by identity, id -> the machine: machines equal by value are still different machines)
_SERVED: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


class Node:
    """One member of a cluster replicating ``state_machine`` (see the module docs)."""

    def __init__(
        self,
        id: str,  # noqa: A002 - the name every other raftfast command uses
        listen: str,
        data_dir: str,
        state_machine: StateMachine,
        peers: dict[str, str] | None = None,
        *,
        client_tls: TLSFiles | None = None,
        timeout: float = _DEFAULT_TIMEOUT_S,
        **settings: Any,
    ) -> None:
        """``peers``: every founding member, this one included (id -> address); omit it with
        ``join="HOST:PORT"`` of a member to join a running cluster. ``client_tls``: how this
        node reaches the leader's client port when it forwards, if that serves TLS: the CA
        that signed the nodes' certificates and, with ``client_cert_auth``, the certificate it
        presents. ``timeout``: the default deadline of a call."""
        if peers is None:  # (joining: the cluster tells us the others)
            peers = {id: settings.get("peer_listen") or listen}
        self.settings = NodeSettings(
            id=id, listen=listen, peers=dict(peers), data_dir=data_dir, **settings
        )
        self.settings.validate()
        if state_machine is not None and (missing := missing_methods(state_machine)):
            raise TypeError(
                f"state_machine {type(state_machine).__name__} has no {', '.join(missing)} "
                "(a raftfast.StateMachine's methods)"
            )
        if isinstance(state_machine, type):
            raise TypeError(
                f"state_machine must be an instance ({state_machine.__name__}()), not the class"
            )
        if client_tls is not None and not isinstance(client_tls, TLSFiles):
            raise TypeError(
                f"client_tls must be a raftfast.TLSFiles, not {type(client_tls).__name__}"
            )
        self.state_machine = state_machine
        # (a bad one refused here, not at every call that takes the default)
        self.timeout = _DEFAULT_TIMEOUT_S if timeout is None else self._seconds(timeout)
        self._client_tls = client_tls
        self._driver: Any = None
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None  # (the one it runs in, once started)
        self._client_id = secrets.randbelow(MAX_CLIENT_ID) + 1
        self._owned_id: int | None = None  # (_own_client_id)
        self._sequences = _Sequences(MAX_UNRESOLVED_PROPOSALS)
        self._may_start_again = False  # (after a failed start: start() below)
        self._channels: dict[str, grpc.aio.Channel] = {}
        bind = getattr(state_machine, "bind", None)  # (raftfast.Objects: calls propose)
        if bind is not None:
            bind(self.propose, self.query)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> Node:
        from raftfast.server.driver import Driver  # (the driver; this is its public face)

        if self._stopped:
            # Its state machine holds what it applied: a start would replay the log onto it.
            raise RaftfastError(
                "this node was stopped: make a new Node, with a new state machine, to start it "
                "again"
            )
        if self._driver is not None:
            raise RaftfastError("this node is started already")
        if not self._may_start_again:
            _claim(self.state_machine)
        self._driver = Driver(self.settings, self.state_machine)
        self._loop = asyncio.get_running_loop()
        try:
            await self._driver.start()
        except BaseException:
            # (nothing applied to it past a snapshot, which this node's next start restores
            # again, replacing the whole state: it may start again; another node, on another
            # data directory, may not have it)
            self._may_start_again = self._driver.applied_index <= self._driver._snapshot_index
            self._driver = None  # (closed: it may be started again)
            raise
        return self

    async def stop(self) -> None:
        """Leave gracefully (as on SIGTERM): what is under way finishes, then everything
        closes. Idempotent. To run the member again, make a new Node (with a new state
        machine) on the same data directory."""
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
        if self._driver is not None:
            self._stopped = True
            await self._driver.stop()

    async def __aenter__(self) -> Node:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- state -----------------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self.settings.id

    @property
    def is_leader(self) -> bool:
        return self._running(any_loop=True).is_leader

    @property
    def leader(self) -> str | None:
        """The leader's id, as this node knows it (None while there is none)."""
        return self._running(any_loop=True).raw.leader or None

    async def status(self) -> dict[str, Any]:
        from raftfast.client import message_to_dict

        return message_to_dict(self._running().status())

    async def wait_for_leader(self, timeout: float | None = None) -> str:
        """The leader's id, once there is one."""
        total = self._seconds(timeout)
        deadline = asyncio.get_running_loop().time() + total
        delay = _RETRY_S
        while (leader := self.leader) is None:
            if asyncio.get_running_loop().time() > deadline:
                raise ClusterUnavailableError(f"no leader within {total:g}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
        return leader

    # -- commands and queries --------------------------------------------------------------

    async def propose(self, command: BytesLike, *, timeout: float | None = None) -> bytes:
        """Apply ``command`` on every member, exactly once; the state machine's result as
        bytes (None as b"", a str as UTF-8; an exception it returned is raised here as
        ``CommandError``), the same whichever member proposes: a follower forwards to the
        leader, and results travel as bytes; a follower returns once it has applied the
        command too (or at the deadline). A command over ``max_request_bytes`` is refused
        (``InvalidArgumentError``), here as at any member. A str command is sent as UTF-8."""
        command = to_bytes(command, "command")
        if len(command) > self.settings.max_request_bytes:
            raise InvalidArgumentError(
                f"a command of {len(command)} bytes; the limit is "
                f"{self.settings.max_request_bytes} (max_request_bytes)"
            )
        refusal = command_refusal(self._running().fsm, command)
        if refusal is not None:  # (as at the leader: a command refused never is logged)
            raise InvalidArgumentError(refusal)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._seconds(timeout)
        sequence, done = await self._sequences.take(deadline)
        try:
            framed = frame_command(self._own_client_id(), sequence, command)
            request = pb.ProposeRequest(
                client_id=self._client_id, sequence=sequence, command=command
            )

            async def local() -> Any:
                (result,) = await self._running().propose([framed])
                return as_result_bytes(result)

            async def remote(stub: pb_grpc.StateMachineStub, left: float) -> Any:
                response = await stub.Propose(request, timeout=left)
                await self._applied_here(response.index, response.term, deadline)
                return response.result

            return await self._at_leader(local, remote, max(deadline - loop.time(), 0.001))
        finally:
            self._sequences.release(done)

    async def _applied_here(self, index: int, term: int, deadline: float) -> None:
        """Until this node has applied ``index`` (of ``term``) too, so that its own state
        shows a command the leader applied (``await d.set(k, v); d[k]`` on a follower, as
        PySyncObj's), or until ``deadline``: the command is done either way. The leader's
        answer says that entry is committed: applied here at once if this log holds it."""
        # (TimeoutError: the deadline; RaftfastError: the node stops or fails meanwhile)
        with contextlib.suppress(TimeoutError, RaftfastError):
            driver = self._running()
            if driver.applied_index >= index:
                return
            driver.learn_commit(index, term)
            async with asyncio.timeout_at(deadline):
                await driver.wait_applied(index)

    def _own_client_id(self) -> int:
        """The id the leader's exactly-once table knows this node's commands by: with client
        certificates, the StateMachine service mixes the caller's name into the id a forwarded
        command carries (``owned_client_id``), so a command proposed here is framed with the
        same mix for the certificate this node forwards with: a retry is the same command
        whether it goes here or to another leader."""
        if self._owned_id is None:
            if not self.settings.client_cert_auth:
                self._owned_id = self._client_id
            else:
                tls = self._client_tls
                name = certificate_name(tls.cert_file) if tls and tls.cert_file else None
                self._owned_id = owned_client_id(self._client_id, name)
        return self._owned_id

    async def query(
        self, request: BytesLike, *, mode: str = "linearizable", timeout: float | None = None
    ) -> bytes:
        """Ask the state machine ``request`` (read-only). ``linearizable`` (the default) and
        ``lease`` read at the leader (a follower forwards); ``stale`` reads this node's state
        as it is. A str request is sent as UTF-8."""
        request = to_bytes(request, "request")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(_MODES)}, not {mode!r}")
        driver = self._running()
        if mode == "stale":
            return self._query_here(bytes(request))
        message = pb.QueryRequest(request=bytes(request), read_mode=_MODES[mode])

        async def local() -> Any:
            await driver.read_barrier(mode)
            return self._query_here(bytes(request))

        async def remote(stub: pb_grpc.StateMachineStub, left: float) -> Any:
            return (await stub.Query(message, timeout=left)).result

        return await self._at_leader(local, remote, timeout)

    # -- membership and leadership ---------------------------------------------------------

    async def add_member(
        self, node_id: str, address: str, *, learner: bool = False, timeout: float | None = None
    ) -> dict[str, Any]:
        """Add ``node_id`` at ``address`` (a learner; a voter once caught up, unless
        ``learner``). At the leader: call it there (``is_leader``), or use a Client."""
        from raftfast.client import message_to_dict

        answer = await self._running().add_member(node_id, address, learner, self._seconds(timeout))
        return message_to_dict(answer)

    async def promote_member(self, node_id: str, *, timeout: float | None = None) -> dict:
        return await self._change("promote", node_id, timeout)

    async def demote_member(self, node_id: str, *, timeout: float | None = None) -> dict:
        return await self._change("demote", node_id, timeout)

    async def remove_member(self, node_id: str, *, timeout: float | None = None) -> dict:
        return await self._change("remove", node_id, timeout)

    async def transfer_leader(self, target: str) -> str:
        """Hand leadership to ``target`` (from the leader); the new leader's id."""
        leader, _term = await self._running().transfer_leadership(target)
        return leader

    async def _change(self, kind: str, node_id: str, timeout: float | None) -> dict:
        from raftfast.client import message_to_dict
        from raftfast.core.membership import ChangeKind

        answer = await self._running().change_member(
            ChangeKind(kind), node_id, self._seconds(timeout)
        )
        return message_to_dict(answer)

    # -- internals -------------------------------------------------------------------------

    def _query_here(self, request: bytes) -> Any:
        return asked(self._running().fsm, request)  # (as from any other member)

    def _seconds(self, timeout: float | None) -> float:
        """A call's timeout: ``timeout``, or the node's when None (0 meant the default)."""
        if timeout is None:
            return self.timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise InvalidArgumentError(
                f"a timeout is a positive number of seconds, not {timeout!r}"
            )
        return min(timeout, MAX_TIMEOUT_S) * 1.0  # (as a client's: 10**400 and inf are a year)

    def _running(self, any_loop: bool = False) -> Any:
        """The driver; RaftfastError if the node is not running, or (unless ``any_loop``: a
        plain read, as ``is_leader``) if the caller runs in another event loop."""
        if self._driver is None or self._stopped:
            raise RaftfastError("the node is not running (use `async with` or start())")
        driver = self._driver
        if not any_loop and (driver.stopping or driver.removed or driver.failed is not None):
            # (it stopped by itself: a call forwarded from it to the leader waited out its
            # timeout, or was done there with its result never seen here)
            raise RaftfastError(_why_stopped(driver))
        try:
            loop = None if any_loop else asyncio.get_running_loop()
        except RuntimeError:
            loop = None  # (a plain read from a thread: a query here)
        if loop is not None and loop is not self._loop:
            # (its futures and channels belong to its loop: from another, a call waited out
            # its timeout, or broke the node's forwarding for good)
            raise RaftfastError(
                "this Node runs in another event loop (another thread): call it from there "
                "(asyncio.run_coroutine_threadsafe), or use SyncNode, whose methods any "
                "thread may call"
            )
        return self._driver

    async def _at_leader(self, local, remote, timeout: float | None) -> Any:
        """``local()`` if this node leads, else ``remote(stub, seconds left)`` at the leader;
        again (the same request) until the deadline while there is no leader or it moves."""
        loop = asyncio.get_running_loop()
        total = self._seconds(timeout)
        deadline = loop.time() + total
        delay = _RETRY_S
        last = "no leader known"
        while (left := deadline - loop.time()) > 0:
            driver = self._running()
            try:
                if driver.is_leader:
                    # (not wait_for: in 3.11 it can swallow a cancellation that comes as the
                    # call ends, and a caller's own timeout around a loop of calls never fires)
                    async with asyncio.timeout(left):
                        return await local()
                leader = self.leader
                address = driver.address_of(leader) if leader else None
                if address:
                    return await remote(self._stub(address), left)
            except NotLeaderError as exc:
                last = str(exc)
            except TimeoutError:
                last = "not done at this node, the leader, in time"  # (not "no leader known")
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    details = exc.details() or "refused"
                    raise CommandError(details.removeprefix("state machine:").strip()) from None
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:  # (as it is refused here)
                    raise InvalidArgumentError(f"the leader refused: {exc.details()}") from None
                if exc.code() == grpc.StatusCode.PERMISSION_DENIED:  # (as a Client's is typed)
                    raise PermissionDeniedError(f"the leader refused: {exc.details()}") from None
                if exc.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.CANCELLED,
                ):
                    raise RaftfastError(f"the leader refused: {exc.details()}") from None
                last = exc.details() or exc.code().name
            await asyncio.sleep(min(delay, max(deadline - loop.time(), 0)))
            delay = min(delay * 2, 1.0)
        raise DeadlineExceededError(f"not done within {total:g}s ({last})")

    def _stub(self, address: str) -> pb_grpc.StateMachineStub:
        channel = self._channels.get(address)
        if channel is None:
            if self._client_tls is None and self.settings.cert_file:
                # (in plain text every forwarded call waited out its timeout: "Socket closed")
                raise RaftfastError(
                    "this node forwards calls to the leader's client port, which serves TLS: "
                    "give the Node client_tls=raftfast.TLSFiles(ca_file) (with "
                    "client_cert_auth, and a certificate and key of a client allowed to write)"
                )
            # (a Client's options: without them a result over 4 MiB, applied, came back as
            # "the leader refused")
            if self._client_tls is None:
                channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.secure_channel(
                    address, channel_credentials(self._client_tls), options=CHANNEL_OPTIONS
                )
            self._channels[address] = channel
        return pb_grpc.StateMachineStub(channel)


def _why_stopped(driver: Any) -> str:
    if driver.failed is not None:
        return f"the node stopped after a fatal error: {driver.failed} (stop() it)"
    if driver.removed:
        return "the node was removed from the cluster: it stops (stop() it)"
    return "the node is stopping"


def _claim(state_machine: Any) -> None:
    """Refuse a state machine another node started with (``_SERVED``)."""
    if state_machine is not None and _SERVED.get(id(state_machine)) is state_machine:
        raise RaftfastError(
            "this state machine served a node already and holds what that node applied: give "
            "each Node a new one (it is restored from the data directory's snapshot and log)"
        )
    with contextlib.suppress(TypeError):  # (no weak reference to it: __slots__ without one)
        _SERVED[id(state_machine)] = state_machine


class _Sequences:
    """A node's proposal sequences, at most ``most`` unresolved at a time (see
    MAX_UNRESOLVED_PROPOSALS): a proposal takes the next one once the oldest unresolved is
    near enough, and releases it when done, whatever its outcome."""

    def __init__(self, most: int) -> None:
        self._most = most
        self._last = 0
        self._unresolved: deque[tuple[int, asyncio.Future]] = deque()
        self._lock: asyncio.Lock | None = None

    async def take(self, deadline: float) -> tuple[int, asyncio.Future]:
        """The next sequence and its done future; DeadlineExceededError if the window stays
        full until ``deadline`` (the loop's time)."""
        loop = asyncio.get_running_loop()
        if self._lock is None:
            self._lock = asyncio.Lock()
        try:
            async with asyncio.timeout_at(deadline):
                async with self._lock:  # (one waits for the oldest, the others for their turn)
                    while self._full():
                        await asyncio.wait([self._unresolved[0][1]])
        except TimeoutError:
            raise DeadlineExceededError(
                f"{self._most} of this node's proposals still unresolved at the deadline"
            ) from None
        self._last += 1
        done = loop.create_future()
        self._unresolved.append((self._last, done))
        return self._last, done

    def release(self, done: asyncio.Future) -> None:
        if not done.done():
            done.set_result(None)
        self._drop_done()

    def _full(self) -> bool:
        """Would the next sequence be ``most`` past the oldest unresolved one?"""
        self._drop_done()
        unresolved = self._unresolved
        return bool(unresolved) and self._last + 1 - unresolved[0][0] >= self._most

    def _drop_done(self) -> None:
        """Forget the resolved ones at the head."""
        unresolved = self._unresolved
        while unresolved and unresolved[0][1].done():
            unresolved.popleft()


async def _cancel_the_rest() -> None:
    """Cancel every other task of the running loop, and let them end (a few seconds at most)."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=5)


class SyncNode:
    """``Node`` for code without asyncio: the node runs in an event loop of its own, in a
    thread; every method blocks until it is done. ``with SyncNode(...) as node:``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.node = Node(*args, **kwargs)
        bind = getattr(self.node.state_machine, "bind", None)
        if bind is not None:  # (replicated objects' calls block here, instead)
            bind(self.propose, self.query)
        self._loop, self._thread = self._new_loop()
        self._started = False
        self._stopped = False

    def _new_loop(self) -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=loop.run_forever, name=f"raftfast-{self.node.id}", daemon=True
        )
        return loop, thread

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if not self._thread.is_alive():
            coro.close()
            raise RaftfastError("the node is stopped (or not started)")
        if threading.current_thread() is self._thread:
            coro.close()  # (it would wait for the very thread that waits: for ever)
            raise RaftfastError(
                "a SyncNode's methods block, so its own thread cannot call them (from inside "
                "a replicated method or a state machine's apply): call them from another thread"
            )
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        while True:
            try:
                return future.result(timeout=_STOPPED_CHECK_S)
            except concurrent.futures.CancelledError:  # (stop() ends what is under way)
                raise RaftfastError("the node stopped before the call was done") from None
            except TimeoutError:
                if future.done():  # (done meanwhile: its result, or its own TimeoutError)
                    return future.result()
                if not self._thread.is_alive():  # (stopped meanwhile: never to be done)
                    raise RaftfastError("the node stopped before the call was done") from None

    def start(self) -> SyncNode:
        if self._stopped:
            raise RaftfastError(
                "this node was stopped: make a new SyncNode, with a new state machine, to start "
                "it again"
            )
        if self._started:
            raise RaftfastError("this node is started already")
        self._thread.start()
        try:
            self._run(self.node.start())
        except BaseException:
            self._close_loop()
            self._loop, self._thread = self._new_loop()  # (it may be started again)
            raise
        self._started = True
        return self

    def stop(self) -> None:
        if threading.current_thread() is self._thread:
            # (it would wait for its own thread, then leave its port and WAL open for good)
            raise RaftfastError(
                "a SyncNode cannot stop itself from its own thread (from inside a replicated "
                "method or a state machine's apply): call stop() from another thread"
            )
        if self._thread.is_alive():
            try:
                self._run(self.node.stop())
            finally:
                self._close_loop()
                self._stopped = True

    def _close_loop(self) -> None:
        if self._thread.is_alive():  # (calls still under way end: their callers are told)
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(_cancel_the_rest(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    def __enter__(self) -> SyncNode:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def id(self) -> str:
        return self.node.id

    @property
    def is_leader(self) -> bool:
        return self.node.is_leader

    @property
    def leader(self) -> str | None:
        return self.node.leader

    def status(self) -> dict[str, Any]:
        return self._run(self.node.status())

    def wait_for_leader(self, timeout: float | None = None) -> str:
        return self._run(self.node.wait_for_leader(timeout))

    def propose(self, command: BytesLike, *, timeout: float | None = None) -> bytes:
        return self._run(self.node.propose(command, timeout=timeout))

    def query(
        self, request: BytesLike, *, mode: str = "linearizable", timeout: float | None = None
    ) -> bytes:
        return self._run(self.node.query(request, mode=mode, timeout=timeout))

    def add_member(
        self, node_id: str, address: str, *, learner: bool = False, timeout: float | None = None
    ) -> dict:
        return self._run(self.node.add_member(node_id, address, learner=learner, timeout=timeout))

    def promote_member(self, node_id: str, *, timeout: float | None = None) -> dict:
        return self._run(self.node.promote_member(node_id, timeout=timeout))

    def demote_member(self, node_id: str, *, timeout: float | None = None) -> dict:
        return self._run(self.node.demote_member(node_id, timeout=timeout))

    def remove_member(self, node_id: str, *, timeout: float | None = None) -> dict:
        return self._run(self.node.remove_member(node_id, timeout=timeout))

    def transfer_leader(self, target: str) -> str:
        return self._run(self.node.transfer_leader(target))
