"""etcd's "require leader" (clientv3.WithRequireLeader: etcdctl's watch, Kubernetes' watches).

A call whose metadata has the key "hasleader" with "true" as its first value is refused at
once with UNAVAILABLE "etcdserver: no leader" when this member knows no leader: a one-request
call of any method (a serializable Range, MemberList, Status included), and a stream (Watch,
LeaseKeepAlive, Snapshot) at its start. The Watch and LeaseKeepAlive streams opened so are
tracked: every election timeout the member looks whether it knows a leader, and after
``MAX_NO_LEADER_CHECKS`` looks in a row without one it ends every such stream with that
status, so that a client cut off with its member goes to another (etcdctl watch prints
"watch was canceled (etcdserver: no leader)" and exits). As etcd's ``newUnaryInterceptor``,
``newStreamInterceptor`` and ``monitorLeader`` (server/etcdserver/api/v3rpc/interceptor.go).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from raftfast.etcd import errors
from raftfast.etcd.watch import abort_call

if TYPE_CHECKING:
    from raftfast.server.driver import Driver

__all__ = ["MAX_NO_LEADER_CHECKS", "REQUIRE_LEADER_KEY", "LeaderRequired", "asks_for_leader"]

log = logging.getLogger(__name__)

REQUIRE_LEADER_KEY = "hasleader"  # (etcd's rpctypes.MetadataRequireLeaderKey)
_HAS_LEADER = "true"
# Looks without a leader, one an election timeout, before the tracked streams are ended (etcd's
# maxNoLeaderCnt: reconnecting streams costs more than refusing new calls).
MAX_NO_LEADER_CHECKS = 3


def asks_for_leader(context: grpc.aio.ServicerContext) -> bool:
    """Whether the call's metadata asks for a leader: its first "hasleader" is "true" (one
    scan of a few entries, ~1 us)."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUIRE_LEADER_KEY:
            return value == _HAS_LEADER
    return False


class LeaderRequired:
    """The require-leader checks of one member, and its streams opened so."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        # a tracked stream -> how it is ended (its status sent, its handler stopped)
        self._streams: dict[object, Callable[[], None]] = {}
        self._monitor: asyncio.Task[None] | None = None
        self._ending: set[asyncio.Task[None]] = set()

    def check(self, context: grpc.aio.ServicerContext) -> bool:
        """Whether the call asks for a leader; EtcdError NO_LEADER if it does and this member
        knows none."""
        if not asks_for_leader(context):
            return False
        if not self.driver.raw.leader:
            raise errors.NO_LEADER
        return True

    async def check_stream(self, context: grpc.aio.ServicerContext) -> bool:
        """``check`` at a stream's start: the call ended with NO_LEADER (AbortError) rather
        than the error raised."""
        try:
            return self.check(context)
        except errors.EtcdError as exc:
            await context.abort(exc.code, exc.message)
            raise  # (abort raises)

    def track(self, end: Callable[[], None]) -> Callable[[], None]:
        """Track a stream that asked for a leader: ``end()`` ends it once the member has known
        no leader for MAX_NO_LEADER_CHECKS election timeouts. Returns what forgets it (called
        when the stream ends, however it ends)."""
        token = object()
        self._streams[token] = end
        if self._monitor is None:
            self._monitor = asyncio.get_running_loop().create_task(self._watch_leader())
        return lambda: self._streams.pop(token, None)

    def ender(self, context: grpc.aio.ServicerContext) -> Callable[[], None]:
        """How to end a stream whose handler is the current task: NO_LEADER sent, then its
        handler cancelled (a keep-alive may be waiting on the leader for seconds)."""
        handler = asyncio.current_task()

        def end() -> None:
            task = asyncio.get_running_loop().create_task(_end_call(context, handler))
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)

        return end

    async def _watch_leader(self) -> None:
        """Every election timeout while streams are tracked: whether a leader is known."""
        driver = self.driver
        misses = 0
        try:
            while self._streams and not driver.stopping:
                await asyncio.sleep(driver.election_timeout_s)
                misses = 0 if driver.raw.leader else misses + 1
                if misses >= MAX_NO_LEADER_CHECKS and self._streams:
                    ends = list(self._streams.values())
                    self._streams.clear()
                    log.warning(
                        "no leader for %d election timeouts: %d stream(s) that require one ended",
                        misses,
                        len(ends),
                    )
                    for end in ends:
                        end()
        finally:
            self._monitor = None


async def _end_call(context: grpc.aio.ServicerContext, handler: asyncio.Task | None) -> None:
    no_leader = errors.NO_LEADER
    await abort_call(context, no_leader.code, no_leader.message)
    if handler is not None and not handler.done():
        handler.cancel()  # (after the status: a cancelled handler's call ends CANCELLED)
