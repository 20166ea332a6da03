"""The WAL's syncs off the event loop, on a writer thread that never takes the GIL.

``WALWriter.sync`` takes what the WAL buffered (``WAL.begin_sync``), hands it to a
``FileWriter`` (compiled: a C thread, see raftfast/_sync.pyx; pure twin: a Python thread), and
finishes it (``WAL.end_sync``) from a reader callback on the writer's pipe: the loop is woken
once per sync, and the WAL's bookkeeping is done even if the task awaiting it was cancelled.
"""

from __future__ import annotations

import asyncio

from raftfast._accel import sync_impl
from raftfast.storage.wal import WAL, PendingSync

# Tests that fail system calls put the pure twin here (it calls os.writev and os.fdatasync).
FileWriter = sync_impl.FileWriter


class WALWriter:
    def __init__(self, wal: WAL) -> None:
        self._wal = wal
        self._writer = FileWriter()
        self._job: PendingSync | None = None
        self._done: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def sync(self, delay: float = 0.0) -> None:
        """Write and sync what the WAL buffered; raises StorageError if that failed."""
        done = self.start(delay)
        if done is not None:
            await done

    def start(self, delay: float = 0.0) -> asyncio.Future[None] | None:
        """Hand what the WAL buffered to the writer; the future is done once it is written
        and synced (StorageError if that failed). None if nothing was buffered. ``delay``
        (tests only): the writer starts that many seconds later."""
        if self._job is not None:
            raise RuntimeError("a sync is already in progress")
        job = self._wal.begin_sync()
        if job is None:
            return None
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            loop.add_reader(self._writer.fileno(), self._on_done)
        done = self._done = loop.create_future()
        self._job = job
        try:
            self._writer.submit(job.fd, job.pieces, self._wal.fsync, delay)
        except BaseException:
            self._job = self._done = None
            self._wal.end_sync(job, OSError("the WAL writer could not take the write"))
            raise
        # (a waiter that is cancelled does not cancel the sync: drain() still waits for it)
        return asyncio.shield(done)

    def _on_done(self) -> None:
        job, done = self._job, self._done
        if job is None or done is None:
            return
        try:
            outcome = self._writer.result()
        except OSError as exc:
            outcome = exc
        if outcome is None:  # (not done yet)
            return
        self._job = self._done = None
        try:
            self._wal.end_sync(job, outcome)
        except Exception as exc:  # noqa: BLE001 - the StorageError of a failed write
            if not done.done():
                done.set_exception(exc)
            return
        if not done.done():
            done.set_result(None)

    async def drain(self) -> None:
        """Wait for a sync in progress to finish (its waiter may have been cancelled)."""
        done = self._done
        if done is not None:
            await asyncio.wait([done])

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._writer.fileno())
        self._writer.close()
