"""The space quota: writes stop before memory or a disk runs out, not after.

A write that would take the state (bytes of keys and values) past ``--quota-backend-bytes``
is refused with RESOURCE_EXHAUSTED and raises the NOSPACE alarm through the log (etcd's
model): every node, and every later leader, then refuses writes other than deletes until an
operator has freed space and cleared it (``raftfast alarm disarm``). Reads are served
throughout. Every node also watches its own disk: one with less than ``DISK_RESERVE_BYTES``
free raises the alarm (a follower asks the leader to), since each node's log must be able to
grow.

Only the leader decides on writes (a follower redirects them). Cheap on the write path: the
state machine keeps its size as it applies; the exact count (a pass over the store) is taken
only when that says the quota is reached, at most once a second, and the disk's free space is
asked at most once a second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, NamedTuple, Protocol

from raftfast.kv.commands import NOSPACE, encode_alarm
from raftfast.kv.fsm import KVStateMachine
from raftfast.proto import raftfast_pb2 as pb
from raftfast.storage.fsutil import DISK_RESERVE_BYTES, free_bytes

if TYPE_CHECKING:  # (the quota serves a node: it must not import the server)
    from raftfast.server.settings import NodeSettings

__all__ = ["NOSPACE_PREFIX", "Quota"]

log = logging.getLogger(__name__)

NOSPACE_PREFIX = "NOSPACE"  # refusals start with it: clients tell them from a busy server
_EVERY_S = 1.0  # at most this often: the disk's free space, an exact count of the state


class _Shortage(NamedTuple):
    why: str  # what is short, with the figures
    remedy: str  # what an operator does about it
    certain: bool  # counted exactly (not an upper bound): the alarm may be raised


class _Node(Protocol):
    id: str
    fsm: KVStateMachine
    settings: NodeSettings

    async def propose(self, payloads: list[bytes]) -> list: ...


class Quota:
    def __init__(self, node: _Node) -> None:
        self.node = node
        self._raising: asyncio.Task | None = None
        self._disk_checked = -_EVERY_S
        self._disk_free: int | None = None  # None: not known (yet)
        self._recounted = -_EVERY_S

    def refusal(self, nbytes: int) -> str | None:
        """Why a write of about ``nbytes`` may not grow the state now (NOSPACE...), or None.
        For the leader to ask."""
        if NOSPACE in self.node.fsm.alarms:
            return (
                f"{NOSPACE_PREFIX}: the NOSPACE alarm is raised: writes other than deletes are "
                "refused until space is freed and `raftfast alarm disarm` clears it"
            )
        short = self._short_of_space(nbytes)
        if short is None:
            return None
        if short.certain:
            self.raise_alarm(short.why)
        return f"{NOSPACE_PREFIX}: {short.why}; {short.remedy}, then `raftfast alarm disarm`"

    def disk_short(self, nbytes: int = 0) -> str | None:
        """Why this node's disk has no room for ``nbytes`` more, or None."""
        now = time.monotonic()
        if now - self._disk_checked >= _EVERY_S:
            self._disk_checked = now
            try:
                self._disk_free = free_bytes(self.node.settings.data_dir)
            except OSError:
                self._disk_free = None  # not knowable here: say nothing rather than refuse
        if self._disk_free is not None and self._disk_free - nbytes < DISK_RESERVE_BYTES:
            return (
                f"node {self.node.id}'s disk has {self._disk_free} bytes free; it keeps "
                f"{DISK_RESERVE_BYTES} free for the log"
            )
        return None

    def _short_of_space(self, nbytes: int) -> _Shortage | None:
        """Why there is no room for ``nbytes`` more, or None. The state's size is an upper
        bound between exact counts: over the quota by it, but counted exactly less than a
        second ago, the write is refused (not certain: no alarm raised)."""
        fsm = self.node.fsm
        limit = self.node.settings.quota_backend_bytes
        if fsm.size_bytes + nbytes > limit:
            now = time.monotonic()
            certain = now - self._recounted >= _EVERY_S
            if certain:
                self._recounted = now
                fsm.recount()
            if fsm.size_bytes + nbytes > limit:
                why = (
                    f"the state holds {fsm.size_bytes} bytes (keys and values, and what each key "
                    "costs besides), and "
                    f"--quota-backend-bytes is {limit}"
                )
                return _Shortage(why, "delete keys", certain)
        why = self.disk_short(nbytes)
        if why is None:
            return None
        # A full disk is freed where it is; deleting keys only helps once a snapshot is taken.
        remedy = "free space on that disk (its --data-dir's file system), or delete keys"
        return _Shortage(why, remedy, True)

    def raised(self) -> bool:
        return NOSPACE in self.node.fsm.alarms

    def alarms(self) -> pb.AlarmResponse:
        fsm = self.node.fsm
        return pb.AlarmResponse(
            alarms=sorted(a.decode() for a in fsm.alarms),
            state_bytes=fsm.size_bytes,
            quota_bytes=self.node.settings.quota_backend_bytes,
        )

    async def disarm(self) -> pb.AlarmResponse:
        """Clear the NOSPACE alarm (through the log: on the leader) once there is room again:
        for a tenth of the quota, or a request of the largest size if that is less; ValueError
        saying why not otherwise. (A follower short of disk raises it again.)"""
        if NOSPACE in self.node.fsm.alarms:
            settings = self.node.settings
            room = min(settings.max_request_bytes, settings.quota_backend_bytes // 10)
            self._recounted = -_EVERY_S  # count exactly
            short = self._short_of_space(room)
            if short is not None:
                raise ValueError(f"no room yet: {short.why}; {short.remedy} first")
            await self.node.propose([encode_alarm(NOSPACE, False)])
            log.warning("node %s cleared the NOSPACE alarm", self.node.id)
        return self.alarms()

    def raise_alarm(self, why: str) -> None:
        """Propose the NOSPACE alarm (once at a time; only the leader can)."""
        if NOSPACE in self.node.fsm.alarms:
            return
        if self._raising is None or self._raising.done():
            log.warning("node %s raises the NOSPACE alarm: %s", self.node.id, why)
            self._raising = asyncio.get_running_loop().create_task(self._propose())

    async def _propose(self) -> None:
        try:
            await self.node.propose([encode_alarm(NOSPACE, True)])
        except Exception as exc:  # noqa: BLE001 - raised again by the next refused write
            log.info("node %s could not raise the NOSPACE alarm yet: %s", self.node.id, exc)
