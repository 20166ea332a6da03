"""The leader's clock work for the etcd API: lease expiry and auto-compaction.

Leases: which leases exist is replicated state (``MVCCStore.leases``); when each expires is the
leader's alone, kept here in memory (monotonic clock). A keep-alive renews a lease for its
granted TTL. An expired lease is revoked through the log (a LeaseRevoke entry: its keys are
deleted in one revision, on every node). A new leader starts every lease afresh, its full TTL
plus an election timeout from its first term as leader (as etcd's lessor "promotes"), so a
leader change never expires a lease early; a lease is therefore never revoked before its TTL.
Followers keep no expiry: they ask the leader (``Forward``).

Auto-compaction (``--auto-compaction-mode``/``--auto-compaction-retention``, etcd's flags):
"revision" keeps the newest N revisions of history; "periodic" keeps a duration's worth (samples
of the revision every tenth of it). The leader proposes the Compact; retention 0 turns it off.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import re
import time
from collections import deque
from itertools import islice
from typing import TYPE_CHECKING

from raftfast.etcd.mvcc import encode
from raftfast.kv.commands import OP_ETCD
from raftfast.proto.etcd import rpc_pb2 as pb

if TYPE_CHECKING:
    from raftfast.etcd.api import EtcdAPI

__all__ = ["Lessor", "parse_retention"]

log = logging.getLogger(__name__)

_EVERY_S = 0.1  # how often expiry is checked
_REVOKE_BATCH = 500  # leases revoked in one proposal at most (etcd: 1,000 a second)
_OP_ETCD = bytes((OP_ETCD,))


MAX_RETENTION_REVISIONS = 2**63 - 1  # (a revision is an int64)
MAX_RETENTION_S = (2**63 - 1) / 1e9  # (etcd's: a Go duration, ~292 years)


def parse_retention(mode: str, retention: str) -> float:
    """The retention as a number: revisions ("revision" mode) or seconds ("periodic": "1h",
    "30m", "90s", or a bare number of hours, as etcd reads it). ValueError if malformed or
    beyond ``MAX_RETENTION_REVISIONS`` / ``MAX_RETENTION_S``."""
    text = retention.strip()
    if mode == "revision":
        if not text.isdigit() or len(text) > 40:
            raise ValueError(f"--auto-compaction-retention {retention[:40]!r}: want revisions (N)")
        revisions = int(text)
        if revisions > MAX_RETENTION_REVISIONS:
            raise ValueError(
                f"--auto-compaction-retention: at most {MAX_RETENTION_REVISIONS} revisions"
            )
        return float(revisions)
    seconds = _periodic_seconds(mode, retention, text)
    if not seconds <= MAX_RETENTION_S:  # (a number too long to read is inf here)
        raise ValueError(f"--auto-compaction-retention: at most {MAX_RETENTION_S:.0f} seconds")
    return seconds


def _periodic_seconds(mode: str, retention: str, text: str) -> float:
    """The "periodic" retention in seconds (inf if a number is too long for a float)."""
    if mode != "periodic":
        raise ValueError(f"--auto-compaction-mode {mode!r}: want periodic or revision")
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text) * 3600
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"--auto-compaction-retention {retention[:40]!r}: want e.g. 1h, 30m, 90s")
    for number, unit in parts:
        total += float(number) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
    return total


class Deadlines(dict):
    """Lease id -> when it expires (the leader's clock), and a heap of (when, id) that finds
    the expired ones without a walk over every lease (with 76,000 leases that walk, ten times
    a second, kept an idle leader at 7% of a core). A heap entry is stale once its lease was
    renewed or is gone (its time is no longer the dict's); the heap is built again when the
    stale ones outnumber the live. Times are set by item assignment only (``update`` and
    ``setdefault`` would leave them off the heap)."""

    def __init__(self, deadlines: dict[int, float] | None = None) -> None:
        super().__init__(deadlines or {})
        self._rebuild()

    def _rebuild(self) -> None:
        self._heap = [(at, i) for i, at in self.items()]
        heapq.heapify(self._heap)

    def __setitem__(self, lease_id: int, at: float) -> None:
        super().__setitem__(lease_id, at)
        heapq.heappush(self._heap, (at, lease_id))
        if len(self._heap) > 2 * len(self) + 1024:
            self._rebuild()

    def clear(self) -> None:
        super().clear()
        self._heap = []

    def due(self, now: float, most: int) -> list[int]:
        """Up to ``most`` leases whose time is ``now`` or before, the earliest first (taken off
        the heap: the caller gives each a time again)."""
        heap, out = self._heap, []
        while heap and heap[0][0] <= now and len(out) < most:
            at, lease_id = heapq.heappop(heap)
            if self.get(lease_id) == at and lease_id not in out[-1:]:
                out.append(lease_id)
        return out


class Lessor:
    def __init__(self, api: EtcdAPI) -> None:
        self.api = api
        self.driver = api.driver
        self.expiry = Deadlines()  # lease id -> when it expires (the leader's clock)
        self._term = 0  # the term we lead in (0: not leading)
        self._synced: tuple[object, int] | None = None  # (store, its lease_changes) synced to
        s = self.driver.settings
        # A lease shorter than an election or two could expire during a leader change
        # (etcd's minimum is 1.5 election timeouts, rounded up).
        self.min_ttl = max(1, math.ceil(1.5 * self.driver.election_timeout_s))
        self._mode = s.auto_compaction_mode
        self._retention = parse_retention(s.auto_compaction_mode, s.auto_compaction_retention)
        self._samples: deque[tuple[float, int]] = deque()  # periodic: (time, revision)
        self._compacting: asyncio.Task | None = None

    # -- leases (on the leader) -------------------------------------------------------------

    def sync(self) -> None:
        """Follow leadership and the replicated lease set (cheap: called often)."""
        raw = self.driver.raw
        # (while a snapshot is restored the store is the old one, and a lease kept alive
        # meanwhile is renewed only after it: no clock runs on leases until then)
        if not self.driver.is_leader or self.driver.restoring:
            if self._term:
                self.expiry.clear()
                self._term = 0
            self._synced = None  # (nor hold a store a snapshot restore may replace)
            return
        store = self.api.store
        changes = store.lease_changes
        before = self._synced
        # (``is``: stores compared with == compare their dumps, the whole state, on the loop)
        same = before is not None and before[0] is store
        if self._term == raw.term and same and before[1] == changes:
            return  # (nothing granted or revoked since: no walk over every lease per call)
        self._synced = (store, changes)
        now = time.monotonic()
        leases = store.leases
        if self._term != raw.term:
            # newly leader: every lease starts afresh (see the module docs)
            grace = self.driver.election_timeout_s
            self.expiry = Deadlines({i: now + lease.ttl + grace for i, lease in leases.items()})
            self._term = raw.term
            return
        expiry = self.expiry
        log = store.lease_log
        if same and changes - before[1] <= len(log):
            # the leases granted or revoked since (a walk over 100,000 leases after each
            # grant had grants fall from ~1,200 to ~390 a second)
            for i in islice(reversed(log), changes - before[1]):
                lease = leases.get(i)
                if lease is None:
                    expiry.pop(i, None)
                elif i not in expiry:
                    expiry[i] = now + lease.ttl
            return
        # (another store, a snapshot's, or more changes than it remembers: every lease)
        if len(expiry) != len(leases) or any(i not in leases for i in expiry):
            for i in [i for i in expiry if i not in leases]:
                del expiry[i]
            for i, lease in leases.items():
                if i not in expiry:
                    expiry[i] = now + lease.ttl

    def granted(self, lease_id: int, ttl: int) -> None:
        self.sync()
        self.expiry[lease_id] = time.monotonic() + ttl

    def renew(self, lease_id: int) -> int:
        """Keep ``lease_id`` alive for its TTL again: the TTL, or 0 if it is gone."""
        self.sync()
        lease = self.api.store.leases.get(lease_id)
        if lease is None or lease_id not in self.expiry:
            return 0
        if self.expiry[lease_id] <= time.monotonic():
            return 0  # expired: its revocation is on the way
        self.expiry[lease_id] = time.monotonic() + lease.ttl
        return lease.ttl

    def remaining(self, lease_id: int) -> int:
        """Whole seconds ``lease_id`` has left, as etcd's LeaseTimeToLive counts them (cut, not
        rounded: 99 just after a grant of 100, 0 in its last second); -1: gone or expired."""
        self.sync()
        at = self.expiry.get(lease_id)
        if at is None:
            return -1
        left = at - time.monotonic()
        return int(left) if left > 0 else -1

    async def run(self) -> None:
        """Revoke expired leases, compact history: while the node runs."""
        driver = self.driver
        while not driver.stopping:
            await asyncio.sleep(_EVERY_S)
            try:
                self.sync()
                if driver.is_leader and not driver.restoring:
                    await self._revoke_expired()
                    self._auto_compact()
            except Exception as exc:  # noqa: BLE001 - tried again next round
                log.info("lease expiry or compaction deferred: %s", exc)

    async def _revoke_expired(self) -> None:
        now = time.monotonic()
        expired = self.expiry.due(now, _REVOKE_BATCH)
        if not expired:
            return
        for i in expired:
            self.expiry[i] = now + 1.0  # (not again before this proposal had its chance)
        payloads = [_OP_ETCD + encode(pb.LeaseRevokeRequest(ID=i)) for i in expired]
        await self.driver.propose(payloads)
        log.debug("revoked %d expired leases", len(expired))

    # -- auto-compaction (on the leader) ----------------------------------------------------

    def _auto_compact(self) -> None:
        if not self._retention or (self._compacting and not self._compacting.done()):
            return
        store = self.api.store
        if self._mode == "revision":
            target = store.revision - int(self._retention)
            # (not for every revision: compact in steps of a tenth of the retention)
            step = max(int(self._retention) // 10, 1)
            if target - store.compact_revision < step:
                return
        else:
            now = time.monotonic()
            samples = self._samples
            if not samples or now - samples[-1][0] >= self._retention / 10:
                samples.append((now, store.revision))
            target = 0
            while samples and now - samples[0][0] >= self._retention:
                target = samples.popleft()[1]
            if target <= store.compact_revision:
                return
        request = pb.CompactionRequest(revision=target)
        self._compacting = asyncio.get_running_loop().create_task(self._compact(request))

    async def _compact(self, request: pb.CompactionRequest) -> None:
        try:
            await self.driver.propose([_OP_ETCD + encode(request)])
            log.info("auto-compacted the etcd keyspace to revision %d", request.revision)
        except Exception as exc:  # noqa: BLE001 - the next round tries again
            log.info("auto-compaction deferred: %s", exc)
