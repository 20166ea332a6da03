"""The durable-log contract shared by the WAL and the in-memory storage.

The driver is the only writer: it ``append``s each Ready's hard state and entries (cheap,
buffered) and then ``sync``s them with one write and one fdatasync (group commit). The core never
touches storage; it starts from ``recovered()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from raftfast._accel import EntryLog, batch_info
from raftfast.core.types import HardState
from raftfast.errors import CorruptionError

__all__ = ["LogStorage", "RecoveredState", "apply_batch", "check_batch", "copy_log"]


@dataclass(slots=True)
class RecoveredState:
    """What a node restarts from.

    ``log.first_index - 1`` and ``log.term_at(log.first_index - 1)`` are the index and term of the
    last compaction point (0 and 0 for a log that was never compacted).
    """

    hard_state: HardState
    log: Any  # an EntryLog (compiled or pure twin)

    def check_terms(self, where: str) -> None:
        """CorruptionError naming ``where`` if the log holds an entry of a term above the hard
        state's: a node's term is never below its entries' (it adopts a term before it writes
        an entry of it, and the WAL writes the hard state first), so such a log was not written
        by a node, and a node started on it would campaign with a log "newer" than any other.
        EntryLog refuses terms that decrease, so the last entry's term is the highest. (The
        WAL does not check this itself: it stores any terms, and its tests rely on that.)"""
        log, term = self.log, self.hard_state.term
        if log.last_index >= log.first_index and log.last_term > term:
            raise CorruptionError(
                f"{where}: entry {log.last_index} has term {log.last_term}, above the hard "
                f"state's term {term} (the persisted current term)",
                where,
            )


@runtime_checkable
class LogStorage(Protocol):
    """Durable Raft state: the hard state and the log, written by group commit."""

    def recovered(self) -> RecoveredState:
        """The state found at open (for MemoryStorage: what survived the last crash)."""
        ...

    def append(self, hard_state: HardState | None, batch: bytes | None) -> None:
        """Buffer a hard state and/or a packed batch; nothing is durable until ``sync``.

        A batch starting at or before the last index written so far replaces everything from
        its first index on (a follower overwriting a conflicting suffix). An empty batch is
        ignored; a batch that would leave a gap raises ValueError.
        """
        ...

    def sync(self) -> None:
        """Make everything appended since the last sync durable (one write, one fdatasync).

        Raises StorageError on failure, after which every call raises StorageError.
        """
        ...

    def release_before(self, index: int, term: int) -> None:
        """Record that entries <= ``index`` (whose last has ``term``) live in a snapshot now."""
        ...

    def install_snapshot(self, index: int, term: int) -> None:
        """Discard the whole log (even entries after ``index``) and restart it after the
        installed snapshot (index, term); durable when it returns."""
        ...

    def close(self) -> None:
        """Release resources. Does not sync: unsynced appends are lost, as in a crash."""
        ...


def check_batch(batch: bytes, first_index: int, last_index: int) -> tuple[int, int]:
    """Validate a batch about to be appended to a log spanning [first_index, last_index].

    Returns the batch's (first, count). Raises BatchError for a malformed batch and ValueError
    for one that would leave a gap or rewrite compacted entries: both are caller bugs, caught
    before anything reaches the disk.
    """
    first, count = batch_info(batch)
    if count and first > last_index + 1:
        raise ValueError(f"batch starts at {first}, after last index {last_index} + 1 (a gap)")
    if count and first < first_index:
        raise ValueError(f"batch starts at {first}, before first index {first_index} (compacted)")
    return first, count


def apply_batch(log: Any, batch: bytes | memoryview, first: int, count: int) -> None:
    """Apply a batch to ``log`` with Raft's overwrite rule, as the writer did.

    After a batch ``[first, end]`` the writer's log ends at ``end``; entries below
    ``log.first_index`` are compacted and skipped. Raises ValueError on a gap.
    """
    if count == 0:
        return
    lo = log.first_index
    end = first + count - 1
    if end < lo:  # wholly compacted, but it still cut off whatever followed it
        log.truncate_after(lo - 1)
        return
    start = max(first, lo)
    if start > log.last_index + 1:
        raise ValueError(f"batch starts at {first}, after last index {log.last_index} + 1 (a gap)")
    log.truncate_after(start - 1)
    log.append_batch(batch, start)


def copy_log(log: Any) -> Any:
    """An independent EntryLog with the same entries and compaction point."""
    first = log.first_index
    out = EntryLog(first, log.term_at(first - 1))
    if log.last_index >= first:
        out.append_batch(log.slice(first, log.last_index + 1))
    return out
