"""The driver's snapshot part: taking a snapshot of the state machine (streamed into a file)
and compacting the log behind it, streaming our newest one to a follower that lags, receiving
one from the leader and installing it.

``SnapshotMixin`` is a part of ``Driver`` (raftfast/server/driver.py): it uses the driver's
``raw``, ``fsm``, ``snapshots`` store, ``wal`` and fsync thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO, TypeVar

import grpc

from raftfast.core.membership import Membership
from raftfast.core.types import Committed, Message, MsgType
from raftfast.errors import (
    CommandError,
    CorruptionError,
    DiskFullError,
    StorageError,
    message_of,
)
from raftfast.heap import release_free_memory
from raftfast.server.incarnations import Incarnations
from raftfast.server.log_counts import CountedWarning
from raftfast.server.metrics import NodeMetrics
from raftfast.storage.fsutil import DISK_RESERVE_BYTES, free_bytes
from raftfast.storage.snapshot import SnapshotChunks, SnapshotMeta, with_state_machine
from raftfast.transport import tcp

log = logging.getLogger("raftfast.node")
T = TypeVar("T")

SNAPSHOT_RETRY_S = 30.0  # after a state machine could not be snapshotted, or its disk was full
# A leader waits this long before it sends a follower a snapshot again after one failed,
# doubling up to SNAPSHOT_RESEND_MAX_S (a follower without room for it was sent one 10-20
# times a second: its memory grew by 0.5 GB, and an election followed).
SNAPSHOT_RESEND_S = 0.5
SNAPSHOT_RESEND_MAX_S = 10.0
# A backup takes a new snapshot unless the newest covers it, at most one per this long: a save
# that comes sooner waits, and the saves that waited share the next one. A loop of write,
# save, cancel forced a snapshot each time (with 100,000 client ids, 14 leader changes in
# 40 s: a hostile hunt); an operator's saves are hours apart.
BACKUP_SNAPSHOT_EVERY_S = 5.0
# The log is at rest once it grew by less than RELEASE_GROWTH bytes in RELEASE_AFTER_S (a
# trickle of writes re-faults a few pages; a load re-faulted ~100 MB/s: _release_memory_at_rest).
RELEASE_AFTER_S = 0.5
RELEASE_GROWTH = 1 << 20


class SnapshotRefusedError(CommandError):
    """The state machine's ``snapshot`` raised (its state holds what it cannot write): not a
    disk failure. The node goes on with its log and tries again later."""


class SnapshotMixin:
    """Snapshots: take, send, receive, install, restore (a part of ``Driver``)."""

    # (set up by Driver.__init__)
    _snapshot_index: int
    _log_bytes_kept: int
    _incoming_snapshot: SnapshotMeta | None
    _snapshot_lock: asyncio.Lock  # one snapshot at a time (the loop's, or a backup's)
    _compact_to: int  # a snapshot was taken here: the loop drops the log it covers
    _snapshot_retry_at: float  # (time.monotonic) after a refused snapshot, not before
    _snapshot_resend_s: dict[str, float]  # a follower's wait after its snapshot failed
    _no_room_warning: CountedWarning
    _backup_taken_at: float  # (time.monotonic) when a backup last took a snapshot
    _release_at_rest: bool  # a compaction kept memory to give back once the log is at rest
    _trim_at_rest: bool  # ... and dropped enough that the heap's free pages go back too
    _release_seen: tuple[int, float]  # the log's bytes when the wait began, and when (monotonic)
    _committed_members: set[str]
    # A leader's snapshot decoded in a worker thread (_restore_off_loop), and meanwhile the
    # committed entries that come after it, applied once it is in (Driver._apply)
    _restoring: asyncio.Task | None
    _held_commits: list[Committed]
    incarnations: Incarnations
    metrics: NodeMetrics

    def _snapshot_due(self) -> bool:
        """Every ``snapshot_entries`` applied entries, and whenever the log held in memory grew
        by ``snapshot_log_bytes`` since the last snapshot left it (big values overwritten again
        and again make a small state but a big log; what a snapshot cannot drop, say entries
        not yet committed, does not make it snapshot again and again)."""
        behind = self.applied_index - self._snapshot_index
        grown = self.raw.log_bytes - self._log_bytes_kept
        due = behind >= self.settings.snapshot_entries or (
            behind > 0 and grown >= self.settings.snapshot_log_bytes
        )
        return due and time.monotonic() >= self._snapshot_retry_at and self._restoring is None

    async def backup_snapshot(
        self, read_mode: str = "linearizable"
    ) -> tuple[SnapshotMeta, SnapshotChunks]:
        """A snapshot covering every write acknowledged before the call (leader only: a
        linearizable read barrier first; ``read_mode`` "stale": what this node has applied,
        as etcd's snapshot of a member), a new one unless the newest covers it, and its
        content in chunks (the file is open already: a later prune cannot take it away; the
        caller closes it). Calls while nothing new was applied share the newest file."""
        await self.read_barrier(read_mode)
        needed = self.applied_index  # (every write acknowledged before the call is in)
        latest = self.snapshots.latest()
        wait = self._backup_taken_at + BACKUP_SNAPSHOT_EVERY_S - time.monotonic()
        if wait > 0 and (latest is None or latest.index < needed):
            await asyncio.sleep(wait)
        async with self._snapshot_lock:
            meta = self.snapshots.latest()
            if meta is None or meta.index < needed:
                try:
                    await self._take_snapshot()
                except DiskFullError as exc:
                    self._no_room_for_snapshot(f"a backup's failed: {exc}")
                    raise
                self._backup_taken_at = time.monotonic()
                meta = self.snapshots.latest()
            assert meta is not None
            return meta, self.snapshots.read_chunks(meta)

    def _start_snapshot(self) -> None:
        """The loop found a snapshot due: take it in the background, so that the loop goes on
        answering the leader (or its followers) meanwhile."""

        async def take() -> None:
            async with self._snapshot_lock:
                try:
                    await self._take_snapshot()
                except DiskFullError as exc:
                    self._snapshot_retry_at = time.monotonic() + SNAPSHOT_RETRY_S
                    self._no_room_for_snapshot(
                        f"it goes on with its log and tries again in {SNAPSHOT_RETRY_S:g}s: {exc}"
                    )
                except SnapshotRefusedError as exc:
                    # (every node would stop at the same point of the log, and again after
                    # each restart: the state cannot be written, the node can go on)
                    self._snapshot_retry_at = time.monotonic() + SNAPSHOT_RETRY_S
                    self.metrics.snapshots_refused += 1
                    log.error(
                        "node %s cannot take a snapshot; it goes on with its log and tries "
                        "again in %gs: %s",
                        self.id,
                        SNAPSHOT_RETRY_S,
                        exc,
                    )
                except Exception as exc:  # noqa: BLE001 - a failed disk: the node stops
                    self._fatal(exc)

        self._snapshot_task = asyncio.create_task(take(), name="raftfast-snapshot")

    async def _take_snapshot(self) -> None:
        """Snapshot the state machine into a file, point in time. A state machine with
        ``frozen()`` (the KV store) hands over a copy, cheap to take, that is serialized in the
        snapshot thread; any other is serialized here, in the loop. The file is written and
        fsynced in the snapshot thread (not the WAL's: appends must not queue behind it). The
        log it covers is dropped later, between two Readys (``_compact_log``)."""
        while self._restoring is not None:
            # (the state is being replaced, and the log no longer has the index it is at)
            await asyncio.shield(self._restoring)
        loop = asyncio.get_running_loop()
        raw = self.raw
        index = self.applied_index
        term = raw.term_at(index)
        config = self.raw.membership_at(index).encode()
        if self.app.state_machine_name is not None:
            config = with_state_machine(config, self.app.state_machine_name)
        # (the snapshot stops, deleted, rather than take the room the log needs meanwhile)
        snapshot = self.snapshots.create(index, term, config, DISK_RESERVE_BYTES // 2)
        try:
            with _refused_unless_os_error(index):
                freeze = getattr(self.fsm, "frozen", None)
                frozen = freeze() if freeze is not None else None
                if frozen is None:
                    self.fsm.snapshot(snapshot.out)  # (into the page cache; synced in the thread)

            def write() -> SnapshotMeta:
                if frozen is not None:
                    with _refused_unless_os_error(index):
                        frozen.snapshot(snapshot.out)
                return snapshot.finish()

            meta = await loop.run_in_executor(self._snapshot_pool, write)
        except BaseException:
            snapshot.abort()
            raise
        self._snapshot_index = max(self._snapshot_index, index)  # (one installed meanwhile)
        self._compact_to = max(self._compact_to, index)
        self._wake.set()
        log.info("node %s took a snapshot at %d (%d bytes)", self.id, index, meta.size)

    async def _compact_log(self) -> None:
        """Drop the log a new snapshot covers (keeping ``snapshot_keep`` entries for followers
        that lag a little, unless they hold a quarter of ``snapshot_log_bytes``: then none).
        Called by the loop between two Readys."""
        raw, index = self.raw, self._compact_to
        self._compact_to = 0
        keep = self.settings.snapshot_keep
        if raw.log_bytes >= self.settings.snapshot_log_bytes // 4:
            keep = 0
        upto = min(index - keep, raw.stable_index)
        if upto >= raw.first_index:
            upto_term = raw.term_at(upto)
            held = raw.log_bytes
            raw.compact(upto)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._fsync_pool, self.wal.release_before, upto, upto_term)
            self._release_at_rest = True
            if held - raw.log_bytes >= self.settings.snapshot_log_bytes // 4:
                self._trim_at_rest = True
            self._release_seen = (raw.log_bytes, time.monotonic())
        self._log_bytes_kept = raw.log_bytes

    def _release_memory_at_rest(self) -> None:
        """Once the log is at rest (``RELEASE_GROWTH``), give back what a compaction kept: the
        log's memory past its entries and, after a big drop, the heap's free pages (the entries
        dropped, the snapshot's copy of the state). Not at the compaction itself: under a
        steady load the log grows back before the next one, and pages given back were faulted
        in again (~10% of a node's CPU under batched puts, perf). Called by the loop between
        two Readys, every tick at least."""
        now, size = time.monotonic(), self.raw.log_bytes
        since_bytes, since = self._release_seen
        if size - since_bytes >= RELEASE_GROWTH:
            self._release_seen = (size, now)
            return
        if now - since < RELEASE_AFTER_S:
            return
        self._release_at_rest = False
        self.raw.release_log_memory()
        if self._trim_at_rest:
            self._trim_at_rest = False
            # (Not awaited: glibc holds its heap's lock while it trims, a few ms, longer the
            # more the heap is fragmented.)
            self._snapshot_pool.submit(release_free_memory)

    def _receive_snapshot(self, meta: Message) -> _IncomingSnapshot:
        """A leader streams us a snapshot: where to write it. Only the leader of our term may
        (anyone else could replace our state), and only as much as the disk can take."""
        raw = self.raw
        if meta.src != raw.leader or meta.term != raw.term:
            raise tcp.Refused(
                grpc.StatusCode.FAILED_PRECONDITION.value[0],
                f"snapshots are taken from the leader of term {raw.term} only "
                f"({raw.leader or 'none known here'}), not from {meta.src!r} of term {meta.term}",
            )
        free = free_bytes(self.snapshots.directory)
        if free <= DISK_RESERVE_BYTES:
            why = (
                f"node {self.id}'s disk has {free} bytes free and keeps {DISK_RESERVE_BYTES} "
                "for its log: no room for a snapshot"
            )
            self._no_room_for_snapshot(f"it refused the leader's: {why}")
            raise tcp.Refused(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], why)
        receiver = self.snapshots.receive(meta.index, meta.log_term)
        return _IncomingSnapshot(self, receiver, free - DISK_RESERVE_BYTES)

    def _no_room_for_snapshot(self, what_now: str) -> None:
        """A snapshot (ours, or the leader's for us) found no room on the disk: say so (at most
        once a minute), count it, and raise NOSPACE (where the state machine has the alarm):
        with the log growing instead, the disk fills up further."""
        self.metrics.snapshots_no_room += 1
        self._no_room_warning.note(self.id, what_now)
        self.app.disk_full(f"a snapshot found no room on node {self.id}'s disk")

    async def _install_snapshot(self, meta: tuple[int, int]) -> None:
        """The core replaced its log with a leader's snapshot (``Ready.snapshot``): the state
        machine follows. A state machine with ``restore_later`` (the KV store: seconds for 1M
        keys, which held the loop: no heartbeat answered, no client served) decodes it in a
        worker thread while this Ready goes on (its acknowledgement needs only the durable
        file and WAL record); until it is swapped in, the old state stays whole and current
        for reads that may be stale, and nothing else moves it: entries committed meanwhile
        are held (``Driver._apply``), reads that wait for an index wait, no snapshot of it is
        taken. Any other state machine (a user's, restored in place) restores here, in the
        loop, as at startup."""
        snap = self._incoming_snapshot
        if snap is None or (snap.index, snap.term) != meta:
            raise RuntimeError(f"asked to install snapshot {meta}, but received {snap}")
        self._incoming_snapshot = None  # (another may arrive while this one is restored)
        if self._restoring is not None:
            await asyncio.shield(self._restoring)  # (the one before, then this one)
        loop = asyncio.get_running_loop()
        self._drop_held_through(snap.index)  # (entries handed out before it, not applied yet)
        # The log restarts after the snapshot before the state machine jumps to it: a crash in
        # between restarts from the (durable) snapshot file with a consistent log.
        await loop.run_in_executor(self._fsync_pool, self.wal.install_snapshot, *meta)
        # (now, with the WAL's record: a node stopped before the restore ends must not
        # keep incarnations the snapshot made stale, a restart does not install it again)
        self.incarnations.snapshot_installed(snap.index)
        restore_later = _restore_later(self.fsm)
        if restore_later is None:
            self._installed(snap, self._restore(snap))
            return
        self._restoring = asyncio.create_task(
            self._restore_off_loop(snap, restore_later), name="raftfast-restore"
        )
        self._restoring.add_done_callback(self._restore_ended)

    def _drop_held_through(self, index: int) -> None:
        """A snapshot at ``index`` replaces the state: held entries up to it are in it (held
        because an apply stops after a slice of time: Driver._apply)."""
        kept = []
        for c in self._held_commits:
            if c.last > index:
                cut = max(index + 1 - c.first, 0)
                kept.append(Committed(c.first + cut, *(part[cut:] for part in c[1:])))
        self._held_commits = kept

    async def _restore_off_loop(
        self, snap: SnapshotMeta, restore_later: Callable[[BinaryIO], Callable[[], None]]
    ) -> None:
        loop = asyncio.get_running_loop()
        membership, swap = await loop.run_in_executor(
            None, self._read_snapshot, snap, restore_later
        )
        swap()  # (on the loop, in one go: no read sees half of it)
        self._restored_at(snap.index)
        self._installed(snap, membership)
        held, self._held_commits = self._held_commits, []
        self._restoring = None
        for committed in held:  # (in order, before any new Ready's)
            self._apply(committed)
        self._release_reads()
        self._wake.set()

    def _restore_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            # As when it failed in the loop: the node stops (_restoring stays: nothing more is
            # applied to the old state)
            self._fatal(task.exception())

    def _installed(self, snap: SnapshotMeta, membership: Membership) -> None:
        self._committed_members = set(membership.members())
        log.info("node %s installed a snapshot at %d from the leader", self.id, snap.index)

    def _restore(self, meta: SnapshotMeta) -> Membership:
        """The state machine from snapshot ``meta``, in the loop; its configuration."""
        membership, _ = self._read_snapshot(meta, self.fsm.restore)
        self._restored_at(meta.index)
        return membership

    def _restored_at(self, index: int) -> None:
        self.applied_index = self._snapshot_index = index
        self.app.applied()  # (watchers: the state jumped)

    def _read_snapshot(
        self, meta: SnapshotMeta, restore: Callable[[BinaryIO], T]
    ) -> tuple[Membership, T]:
        """Snapshot ``meta``'s configuration, and what ``restore`` makes of its state."""
        raw_membership, inp = self.snapshots.open_state(meta)
        with inp:
            try:
                membership = Membership.decode(raw_membership)
            except ValueError as exc:
                raise CorruptionError(f"{meta.path}: {exc}", meta.path, 0) from None
            try:
                return membership, restore(inp)
            except CorruptionError as exc:
                if exc.path or meta.path in str(exc):
                    raise
                # (the state machine's own words, "KV snapshot CRC mismatch", named no file)
                try:
                    named = type(exc)(f"{meta.path}: {exc}", meta.path, exc.offset)
                except Exception:  # noqa: BLE001 - a user's subclass may take other arguments
                    named = CorruptionError(f"{meta.path}: {exc}", meta.path, exc.offset)
                raise named from exc
            except OSError:
                raise
            except Exception as exc:  # noqa: BLE001 - a user's state machine may raise anything
                # (one line naming the file, not a traceback through the user's code)
                raise CorruptionError(
                    f"{meta.path}: the state machine cannot read this snapshot: "
                    f"{type(exc).__name__}: {message_of(exc)}",
                    meta.path,
                    0,
                ) from exc  # (the cause kept for a debugger; the node says one line)

    async def _send_snapshot(self, m: Message) -> None:
        """The core asked for a snapshot to go to ``m.dst``: stream our newest one. Whatever
        happens, the core hears how it ended: until then it sends that follower nothing else."""
        ok = False
        started = time.perf_counter()
        try:
            meta = self.snapshots.latest()
            if meta is not None and meta.index >= m.index:
                membership = self.snapshots.read_membership(meta)
                named = Message(
                    MsgType.SNAPSHOT, m.src, m.dst, m.term, meta.index, meta.term, membership
                )
                log.info("node %s sends snapshot %d to %s", self.id, meta.index, m.dst)
                ok = await self.transport.send_snapshot(named, self.snapshots.read_chunks(meta))
                self.metrics.snapshot_send.observe(time.perf_counter() - started)
        except (StorageError, OSError) as exc:  # (a newer snapshot pruned this one, say)
            log.warning("node %s could not send a snapshot to %s: %s", self.id, m.dst, exc)
        except Exception:  # noqa: BLE001 - reported all the same; a bug shows its traceback
            log.exception("node %s could not send a snapshot to %s", self.id, m.dst)
        finally:
            if ok:
                self.metrics.snapshots_sent += 1
                self._snapshot_resend_s.pop(m.dst, None)
            else:
                self.metrics.snapshots_send_failed += 1  # (or none new enough to send)
        if not ok:
            # (the core sends that follower nothing until it hears: a pause before it retries)
            wait = self._snapshot_resend_s.get(m.dst, SNAPSHOT_RESEND_S / 2) * 2
            self._snapshot_resend_s[m.dst] = min(wait, SNAPSHOT_RESEND_MAX_S)
            await asyncio.sleep(self._snapshot_resend_s[m.dst])
        # (not to the core of a later term, which may have a snapshot of its own under way)
        if self.raw is not None and not self.stopping and self.raw.term == m.term:
            self.raw.report_snapshot(m.dst, ok)
            self._wake.set()


class _IncomingSnapshot:
    """Writes a leader's snapshot into our store; once complete, the node remembers it until the
    core asks for it to be installed (``Ready.snapshot``)."""

    def __init__(self, node: SnapshotMixin, receiver, max_bytes: int) -> None:
        self._node = node
        self._receiver = receiver
        self._max_bytes = max_bytes
        self._started = time.perf_counter()

    def write(self, offset: int, data: bytes) -> None:
        """Write a chunk; DiskFullError if the disk has no room for it (the file deleted)."""
        try:
            if offset + len(data) > self._max_bytes:
                self._receiver.abort()
                raise DiskFullError(
                    f"the leader's snapshot is bigger than the {self._max_bytes} bytes node "
                    f"{self._node.id}'s disk has room for (its free space, less "
                    f"{DISK_RESERVE_BYTES} kept for its log)"
                )
            self._receiver.write(offset, data)
        except DiskFullError as exc:
            self._node._no_room_for_snapshot(f"it refused the leader's: {exc}")
            raise

    def finish(self) -> None:
        try:
            self._node._incoming_snapshot = self._receiver.finish()
        except DiskFullError as exc:
            self._node._no_room_for_snapshot(f"it refused the leader's: {exc}")
            raise
        metrics = self._node.metrics
        metrics.snapshots_received += 1
        metrics.snapshot_receive.observe(time.perf_counter() - self._started)

    def abort(self) -> None:
        self._receiver.abort()


@contextlib.contextmanager
def _refused_unless_os_error(index: int) -> Iterator[None]:
    """A state machine's snapshot (or frozen state) that raises is refused, not fatal (every
    node would stop at the same point of the log, and again after each restart); a failed disk
    (OSError) stops the node."""
    try:
        yield
    except (OSError, StorageError, KeyboardInterrupt):
        raise  # (StorageError: the snapshot's own file, as DiskFullError: not the state machine)
    except BaseException as exc:  # (SystemExit and CancelledError too: the state machine's)
        raise SnapshotRefusedError(
            f"the state machine's snapshot failed at index {index}: {type(exc).__name__}: {exc}"
        ) from exc


def log_holds(entries, index: int, term: int) -> bool:
    """Does the log hold entry ``index`` with ``term`` (or start right after it)?"""
    if not entries.first_index - 1 <= index <= entries.last_index:
        return False
    return entries.term_at(index) == term


def _restore_later(fsm: object) -> Callable[[BinaryIO], Callable[[], None]] | None:
    """``fsm.restore_later``, unless a subclass overrides ``restore`` below the class that
    defines it (that ``restore_later`` knows nothing of the override: a subclass of
    KVStateMachine rebuilding something of its own in ``restore`` would miss it)."""
    mro = type(fsm).__mro__
    later = next((c for c in mro if "restore_later" in vars(c)), None)
    restore = next((c for c in mro if "restore" in vars(c)), None)
    if later is None or (
        restore is not None and restore is not later and issubclass(restore, later)
    ):
        return None
    return fsm.restore_later  # type: ignore[attr-defined]
