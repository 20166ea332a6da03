"""The Raft log as the algorithm sees it: entries plus commit, applied and durable positions.

Entries live in an ``EntryLog`` (compiled or pure twin). The log has a first index from day one:
everything before ``first_index`` was compacted into a snapshot whose last entry is
``(first_index - 1, prev_term)``.
"""

from __future__ import annotations

from raftfast._accel import batch_impl
from raftfast.core.types import Committed
from raftfast.errors import CompactedError, UnavailableError


def batch_count(batch: bytes) -> int:
    """Number of entries in a packed batch (header field; the batch was validated before)."""
    return int.from_bytes(batch[4:8], "little") if batch else 0


def _body_bytes(batch: bytes, count: int) -> int:
    """The payloads' bytes in a packed batch of ``count`` entries (header and table aside)."""
    return len(batch) - batch_impl.HEADER_SIZE - batch_impl.META_SIZE * count


# Slices a log remembers (see slice): one per follower of a big cluster and its WAL's; and
# the bytes they may hold in all, for a log at rest (the newest alone may hold more).
_SLICES_KEPT = 6
_SLICES_BYTES = 4 << 20


class RaftLog:
    __slots__ = ("entries", "committed", "applied", "stable", "_truncated_floor", "_slices")

    def __init__(self, entries, committed: int = 0, applied: int = 0) -> None:
        self.entries = entries
        snapshot_index = entries.first_index - 1
        # A torn write may have kept a hard state whose commit is past the surviving entries.
        # The commit index is not always synced (a Ready that only moves it is not), so the
        # state machine's snapshot may be ahead of it: what a snapshot holds is committed.
        self.committed = max(snapshot_index, min(max(committed, applied), entries.last_index))
        # The state machine may come from a snapshot newer than the log's compaction point.
        self.applied = max(snapshot_index, min(applied, self.committed))
        self.stable = entries.last_index  # everything recovered from storage is durable
        self._truncated_floor: int | None = None
        # (lo, hi, max_bytes, batch): the last few slices asked for, and what they gave, newest
        # first (see slice)
        self._slices: list[tuple[int, int, int, bytes]] = []

    # -- reading -------------------------------------------------------------------------------

    @property
    def last_index(self) -> int:
        return self.entries.last_index

    @property
    def last_term(self) -> int:
        return self.entries.last_term

    @property
    def first_index(self) -> int:
        return self.entries.first_index

    def term_at(self, index: int) -> int:
        """Term of ``index``, or 0 when it is outside the log (compacted or not yet there)."""
        try:
            return self.entries.term_at(index)
        except (CompactedError, UnavailableError):
            return 0

    def match_term(self, index: int, term: int) -> bool:
        if index < self.entries.first_index - 1 or index > self.entries.last_index:
            return False
        return self.entries.term_at(index) == term

    def slice(self, lo: int, hi: int, max_bytes: int, prefix: bool = False) -> bytes:
        """``entries.slice(lo, hi, max_bytes)``, the last few remembered. A slice is a copy and
        a checksum, and the same one is often asked for again: a leader's followers are mostly
        at the same index, a leader writes to its WAL the entries it has just sent (the limit
        aside: the same batch when it was not cut), and a follower writes to its WAL the batch
        it was just sent (see merge). ``prefix``: fewer entries from ``lo`` will do (a leader
        sends the rest in its next message): followers a few entries apart then share the
        batches one of them was sent, where each had a copy of its own (with 4 followers, 4 in
        10 slices were copies; ~13% of the leader's CPU under batched puts)."""
        slices = self._slices
        for i, (slo, shi, smax, batch) in enumerate(slices):
            if slo != lo:
                continue
            count = batch_count(batch)
            if (shi == hi and smax == max_bytes) or (
                (lo + count == hi or (prefix and lo < lo + count < hi))
                and (not max_bytes or _body_bytes(batch, count) <= max_bytes)
            ):  # (the very slice, all of [lo, hi) within the limit, or a prefix of it)
                if i:
                    slices.insert(0, slices.pop(i))  # (kept longest: the one most asked for)
                return batch
        batch = self.entries.slice(lo, hi, max_bytes)
        self._remember(lo, hi, max_bytes, batch)
        return batch

    def _remember(self, lo: int, hi: int, max_bytes: int, batch: bytes) -> None:
        if hi <= lo:
            return  # (an empty append's: made at no cost, not worth a place)
        slices = self._slices
        slices.insert(0, (lo, hi, max_bytes, batch))
        while len(slices) > 1 and (
            len(slices) > _SLICES_KEPT or sum(len(s[3]) for s in slices) > _SLICES_BYTES
        ):
            slices.pop()

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Raft §5.4.1: is a candidate's log at least as up to date as ours?"""
        our_term = self.entries.last_term
        return last_term > our_term or (last_term == our_term and last_index >= self.last_index)

    # -- writing -------------------------------------------------------------------------------

    def append(self, term: int, payloads, etype: int) -> int:
        return self.entries.append(term, payloads, etype)

    def merge(self, batch: bytes, committed: int) -> None:
        """Follower side of AppendEntries: skip entries we have, truncate a conflict, append."""
        conflict = self.entries.find_conflict(batch)
        first = int.from_bytes(batch[8:16], "little")
        if conflict >= first + batch_count(batch):
            return  # every entry already present
        if conflict <= committed:
            raise AssertionError(
                f"entry {conflict} conflicts with committed index {committed}: safety violated"
            )
        if conflict <= self.entries.last_index:
            self.truncate_after(conflict - 1)
        self.entries.append_batch(batch, conflict)
        if conflict == first:  # the entries are the batch's, as they are: it is their slice
            self._remember(first, first + batch_count(batch), 0, batch)

    def truncate_after(self, index: int) -> None:
        self._slices = []  # (entries after index change)
        self.entries.truncate_after(index)
        if index < self.stable:
            self.stable = index
        if self._truncated_floor is not None and index < self._truncated_floor:
            self._truncated_floor = index

    def restore(self, index: int, term: int) -> None:
        """Install a snapshot ending at (index, term): the whole log is replaced by it."""
        self._slices = []
        self.entries.reset(index + 1, term)
        self.committed = index
        self.stable = index
        if self._truncated_floor is not None:
            self._truncated_floor = index  # an outstanding write is void past the snapshot

    def compact(self, index: int) -> None:
        """Drop entries up to ``index``: they are in a durable snapshot and applied."""
        if index > self.applied or index > self.stable:
            raise ValueError(
                f"cannot compact to {index}: applied {self.applied}, durable {self.stable}"
            )
        if index >= self.entries.first_index:
            self._slices = []
            self.entries.compact(index)

    def commit_to(self, index: int) -> bool:
        if index > self.committed:
            if index > self.last_index:
                raise AssertionError(f"commit {index} beyond last index {self.last_index}")
            self.committed = index
            return True
        return False

    # -- the Ready cycle -----------------------------------------------------------------------

    def unstable_batch(self) -> tuple[bytes, int, int]:
        """Entries not yet handed to storage: (packed batch, last index, last term)."""
        last = self.entries.last_index
        if last <= self.stable:
            return b"", 0, 0
        return self.slice(self.stable + 1, last + 1, 0), last, self.entries.last_term

    def begin_persist(self) -> None:
        """A Ready with entries was handed out; watch for truncations while it is written."""
        self._truncated_floor = self.entries.last_index

    def end_persist(self, last_index: int) -> None:
        """Storage made the Ready's entries durable. A truncation meanwhile voids its suffix."""
        floor = self._truncated_floor
        self._truncated_floor = None
        durable = last_index if floor is None else min(last_index, floor)
        if durable > self.stable:
            self.stable = durable

    def committed_entries(self, max_bytes: int, after: int | None = None) -> Committed | None:
        """Committed entries after ``after`` (default: those not yet applied), up to about
        ``max_bytes`` of payloads, or None."""
        start = self.applied if after is None else after
        if self.committed <= start:
            return None
        return Committed(*self.entries.unpack(start + 1, self.committed + 1, max_bytes))
