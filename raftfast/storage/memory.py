"""In-memory ``LogStorage`` for unit tests and the deterministic simulation.

It keeps the WAL's contract, including what a power loss does: ``crash()`` forgets everything
appended since the last sync. The synced state is a HardState plus an EntryLog (batches applied
at sync time), so a simulation with hundreds of seeds stays fast.
"""

from __future__ import annotations

from typing import Any

from raftfast._accel import EntryLog
from raftfast.core.types import HardState
from raftfast.errors import StorageError
from raftfast.storage.base import RecoveredState, apply_batch, check_batch, copy_log

__all__ = ["MemoryStorage"]


class MemoryStorage:
    """A ``LogStorage`` whose "disk" is a HardState and an EntryLog."""

    def __init__(self) -> None:
        self._hard_state = HardState()  # synced
        self._log: Any = EntryLog(1, 0)  # synced
        self._pending: list[tuple[HardState | None, bytes | None, int, int]] = []
        self._first_index = 1  # writer's view, including unsynced appends
        self._last_index = 0
        self._fail_next = False
        self._failed = False
        self._closed = False
        self.syncs = 0  # successful syncs that wrote something (tests assert on it)

    def recovered(self) -> RecoveredState:
        """What survived the last crash: an independent copy, safe for the node to mutate."""
        return RecoveredState(self._hard_state, copy_log(self._log))

    def append(self, hard_state: HardState | None, batch: bytes | None) -> None:
        """Buffer until ``sync``; a batch at or before the last index overwrites from there."""
        self._check_usable()
        first = count = 0
        if batch:
            first, count = check_batch(batch, self._first_index, self._last_index)
            if count:
                self._last_index = first + count - 1
        if hard_state is not None or count:
            self._pending.append((hard_state, batch if count else None, first, count))

    def sync(self) -> None:
        """Apply everything appended since the last sync to the synced state."""
        self._check_usable()
        if self._fail_next:
            self._fail_next = False
            self._failed = True
            raise StorageError("injected sync failure")
        if not self._pending:
            return
        log = self._log
        for hard_state, batch, first, count in self._pending:
            if hard_state is not None:
                self._hard_state = hard_state
            if batch is not None:
                apply_batch(log, batch, first, count)
        self._pending.clear()
        self.syncs += 1

    def release_before(self, index: int, term: int) -> None:
        """Compact the synced log through ``index`` (syncing pending appends first, as the WAL).

        Entries kept after ``index`` must follow ``term`` (checked here; the WAL cannot check).
        """
        self.sync()
        log = self._log
        if index < log.first_index:
            return
        if index >= log.last_index:
            log.reset(index + 1, term)  # a snapshot past our last entry replaces the whole log
        elif log.term_at(index) != term:
            raise ValueError(f"entry {index} has term {log.term_at(index)}, not {term}")
        else:
            log.compact(index)
        self._first_index = log.first_index
        self._last_index = max(self._last_index, index)

    def install_snapshot(self, index: int, term: int) -> None:
        """Discard the whole log and restart it empty at ``index + 1`` with prev term ``term``,
        durably at once (as the WAL: pending appends are synced first; their entries are
        dropped with the rest, their hard state is kept).
        """
        if not 0 <= index < (1 << 62) - 1 or not 0 <= term < 1 << 64:
            raise ValueError(f"snapshot index {index} or term {term} is out of range")
        wrote = bool(self._pending)
        self.sync()  # with the record below, one write (and one count in ``syncs``)
        self._log.reset(index + 1, term)
        self._first_index = index + 1
        self._last_index = index
        if not wrote:
            self.syncs += 1

    def close(self) -> None:
        """Stop accepting calls; like the WAL, unsynced appends are dropped."""
        self._pending.clear()
        self._closed = True

    # -- fault injection -----------------------------------------------------------------------

    def crash(self) -> None:
        """Power loss and restart: unsynced appends vanish and the storage is usable again."""
        self._pending.clear()
        self._first_index = self._log.first_index
        self._last_index = self._log.last_index
        self._fail_next = self._failed = self._closed = False

    def fail_next_sync(self) -> None:
        """Make the next ``sync`` raise StorageError (and the storage unusable until ``crash``)."""
        self._fail_next = True

    def _check_usable(self) -> None:
        if self._failed:
            raise StorageError("storage failed earlier; crash() to restart it")
        if self._closed:
            raise StorageError("storage is closed")
