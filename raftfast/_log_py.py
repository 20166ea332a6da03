"""Pure-Python twin of ``raftfast._log``: the in-memory Raft log.

Entries live column-wise (terms in an ``array('Q')``, types in a ``bytearray``, payload lengths in
an ``array('I')`` and payload end offsets in an ``array('Q')``, over one ``bytearray`` of payload
bytes) so there is no Python object per entry.  Offsets are absolute byte positions since the
last reset; ``_offs[0]`` is the position of the first held payload, which lets ``compact`` drop a
prefix with a few memmoves instead of rebasing every offset.

The compiled module must behave identically, including exception types (see tests/test_parity.py).
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate
from operator import le

from raftfast._batch_py import HEADER_SIZE, META_SIZE, _columns, _join, _pack, _parse
from raftfast.errors import CompactedError, LogError, UnavailableError

__all__ = ["EntryLog"]

_U64_MAX = (1 << 64) - 1


def _check_u64(value: object, what: str) -> None:
    if not isinstance(value, int):
        raise TypeError(f"{what} must be an integer, not {type(value).__name__}")
    if not 0 <= value <= _U64_MAX:
        raise OverflowError(f"{what} {value} does not fit in an unsigned 64-bit field")


def _check_first(first_index: object) -> None:
    _check_u64(first_index, "first_index")
    if not 1 <= first_index < 1 << 62:  # type: ignore[operator]
        raise ValueError(f"first_index must be in [1, 2**62), got {first_index}")


class EntryLog:
    """Raft log entries ``first_index..last_index`` plus the term of ``first_index - 1``."""

    __slots__ = ("_first", "_prev_term", "_terms", "_types", "_lens", "_offs", "_buf")

    def __init__(self, first_index: int = 1, prev_term: int = 0) -> None:
        self.reset(first_index, prev_term)

    # -- bounds -----------------------------------------------------------------------------

    @property
    def first_index(self) -> int:
        return self._first

    @property
    def last_index(self) -> int:
        return self._first + len(self._terms) - 1

    @property
    def last_term(self) -> int:
        return self._terms[-1] if self._terms else self._prev_term

    @property
    def nbytes(self) -> int:
        return len(self._buf)

    def __len__(self) -> int:
        return len(self._terms)

    def __sizeof__(self) -> int:
        """Bytes held, including the columns and payload buffer (for memory accounting)."""
        columns = (self._terms, self._types, self._lens, self._offs, self._buf)
        return object.__sizeof__(self) + sum(sys.getsizeof(c) for c in columns)

    def __repr__(self) -> str:
        return (
            f"EntryLog(first_index={self._first}, last_index={self.last_index}, "
            f"last_term={self.last_term}, nbytes={len(self._buf)})"
        )

    def _check_held(self, index: int) -> int:
        """Position of ``index`` in the columns; raise if it is not held."""
        pos = index - self._first
        if pos < 0:
            raise CompactedError(f"index {index} is compacted (first index {self._first})")
        if pos >= len(self._terms):
            raise UnavailableError(f"index {index} is after last index {self.last_index}")
        return pos

    # -- reads ------------------------------------------------------------------------------

    def term_at(self, index: int) -> int:
        """Term of ``index``; ``first_index - 1`` answers with the snapshot term."""
        pos = index - self._first
        if pos < 0:
            if pos == -1:
                return self._prev_term
            raise CompactedError(f"index {index} is compacted (first index {self._first})")
        if pos >= len(self._terms):
            raise UnavailableError(f"index {index} is after last index {self.last_index}")
        return self._terms[pos]

    def entry(self, index: int) -> tuple[int, int, bytes]:
        """(term, type, payload) of a held entry."""
        pos = self._check_held(index)
        base = self._offs[0]
        payload = bytes(self._buf[self._offs[pos] - base : self._offs[pos + 1] - base])
        return self._terms[pos], self._types[pos], payload

    def _span(self, lo: int, hi: int, max_bytes: int) -> tuple[int, int]:
        """Positions [a, b) of entries [lo, hi), cut short once payloads would exceed
        ``max_bytes`` (at least one entry when lo < hi; 0: no limit)."""
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        first = self._first
        if lo < first:
            raise CompactedError(f"slice start {lo} is compacted (first index {first})")
        if hi > first + len(self._terms):
            raise UnavailableError(f"slice end {hi} is after last index {self.last_index} + 1")
        if lo > hi:
            raise UnavailableError(f"slice start {lo} is after its end {hi}")
        a = lo - first
        b = hi - first
        offs = self._offs
        if max_bytes and b > a and offs[b] - offs[a] > max_bytes:
            # Largest b' with offs[b'] - offs[a] <= max_bytes, but never fewer than one entry.
            b = max(bisect_right(offs, offs[a] + max_bytes, a + 1, b + 1) - 1, a + 1)
        return a, b

    def slice(self, lo: int, hi: int, max_bytes: int = 0) -> bytes:
        """Packed batch of entries [lo, hi), cut short once payloads would exceed ``max_bytes``.

        At least one entry is returned when lo < hi, so an oversized entry still makes progress;
        ``max_bytes == 0`` means no limit.
        """
        a, b = self._span(lo, hi, max_bytes)
        offs = self._offs
        base = offs[0]
        body = bytes(self._buf[offs[a] - base : offs[b] - base])
        return _pack(lo, self._terms[a:b], self._types[a:b], self._lens[a:b], body)

    def unpack(self, lo: int, hi: int, max_bytes: int = 0) -> tuple[int, list, list, list]:
        """``decode_batch(self.slice(lo, hi, max_bytes))`` — (lo, terms, types, payloads) —
        without the packed batch: its copy and checksum are for the disk and the wire, not
        for entries applied here."""
        a, b = self._span(lo, hi, max_bytes)
        offs, buf = self._offs, self._buf
        base = offs[0]
        payloads = [bytes(buf[offs[i] - base : offs[i + 1] - base]) for i in range(a, b)]
        return lo, list(self._terms[a:b]), list(self._types[a:b]), payloads

    def find_conflict(self, batch: bytes | bytearray | memoryview) -> int:
        """First index of ``batch`` whose entry is not in this log with the same term.

        Entries below ``first_index`` were committed and compacted, so they count as matching.
        Returns ``batch_last + 1`` when everything matches.
        """
        view, bfirst, count, _ = _parse(batch)
        last = self.last_index
        if bfirst > last + 1:
            raise UnavailableError(f"batch starts at {bfirst}, after last index {last} + 1")
        first = self._first
        index = max(bfirst, first)
        held_end = min(bfirst + count, last + 1)  # batch entries up to here are in the log
        if index < held_end:
            off = HEADER_SIZE + META_SIZE * (index - bfirst)
            theirs = _columns(view[off : off + META_SIZE * (held_end - index)])[0]
            ours = self._terms[index - first : held_end - first]
            if theirs != ours:
                for i, (t, u) in enumerate(zip(theirs, ours, strict=True)):
                    if t != u:
                        return index + i
        return held_end

    def find_conflict_by_term(self, index: int, term: int) -> int:
        """Largest j <= index with term_at(j) <= term (fast log backtracking), or first_index-1."""
        first = self._first
        hi = min(index, self.last_index) - first + 1  # candidate positions are [0, hi)
        if hi <= 0:
            return first - 1
        # Terms are non-decreasing, so the answer is the last position whose term <= term.
        pos = bisect_right(self._terms, term, 0, hi)
        return first + pos - 1

    # -- writes -----------------------------------------------------------------------------

    def append(self, term: int, payloads: Sequence[bytes], etype: int = 0) -> int:
        """Append entries of one term after last_index; return the new last_index."""
        _check_u64(term, "term")
        if not isinstance(etype, int):
            raise TypeError(f"type must be an integer, not {type(etype).__name__}")
        if not 0 <= etype <= 0xFF:
            raise OverflowError(f"type {etype} does not fit in an unsigned 8-bit field")
        if term < self.last_term:
            raise LogError(f"term {term} is below last term {self.last_term}")
        body, lengths = _join(payloads)  # validates every payload before anything is mutated
        n = len(lengths)
        self._buf += body
        self._append_columns(array("Q", (term,)) * n, bytes((etype,)) * n, lengths)
        return self.last_index

    def _append_columns(self, terms: array, types: bytes, lengths: array) -> None:
        """Extend the columns; the payload bytes must already be in ``_buf``."""
        ends = accumulate(lengths, initial=self._offs[-1])
        next(ends)
        self._offs.extend(ends)
        self._lens.extend(lengths)
        self._terms.extend(terms)
        self._types += types

    def append_batch(
        self, batch: bytes | bytearray | memoryview, start_index: int | None = None
    ) -> int:
        """Append ``batch``'s entries from ``start_index`` (default: its first) to its end.

        ``start_index`` lets a follower skip the prefix it already holds (see find_conflict).
        """
        view, bfirst, count, lengths = _parse(batch)
        last = self.last_index
        start = bfirst if start_index is None else start_index
        if start != last + 1:
            raise LogError(f"append at {start}, expected last index {last} + 1")
        if not bfirst <= start <= bfirst + count:
            raise LogError(f"start index {start} is outside batch [{bfirst}, {bfirst + count}]")
        skip = start - bfirst
        if skip == count:
            return last
        table_end = HEADER_SIZE + META_SIZE * count
        terms, types, _ = _columns(view[HEADER_SIZE + META_SIZE * skip : table_end])
        prev = self.last_term
        if terms[0] < prev or not all(map(le, terms, terms[1:])):
            for i, t in enumerate(terms):
                if t < prev:
                    raise LogError(f"entry {start + i} has term {t}, below previous term {prev}")
                prev = t
        self._buf += view[table_end + sum(lengths[:skip]) :]
        self._append_columns(terms, types, lengths[skip:])
        return self.last_index

    def truncate_after(self, index: int) -> None:
        """Drop entries after ``index`` (a follower discarding a conflicting suffix)."""
        last = self.last_index
        if index >= last:
            return
        if index < self._first - 1:
            raise CompactedError(f"cannot truncate after {index}: compacted below {self._first}")
        keep = index - self._first + 1
        del self._buf[self._offs[keep] - self._offs[0] :]
        del self._offs[keep + 1 :]
        del self._lens[keep:]
        del self._terms[keep:]
        del self._types[keep:]

    def compact(self, index: int) -> None:
        """Discard entries <= ``index`` (covered by a snapshot); remember term_at(index)."""
        if index < self._first:
            return
        last = self.last_index
        if index > last:
            raise UnavailableError(f"cannot compact through {index}: last index is {last}")
        drop = index - self._first + 1
        self._prev_term = self._terms[drop - 1]
        del self._buf[: self._offs[drop] - self._offs[0]]
        del self._offs[:drop]
        del self._lens[:drop]
        del self._terms[:drop]
        del self._types[:drop]
        self._first = index + 1

    def release_unused(self) -> None:
        """Give back the memory past the data (for a log at rest). A bytearray shrinks as it
        is cut, so there is nothing more to give back here."""

    def reset(self, first_index: int, prev_term: int) -> None:
        """Drop everything and start empty at ``first_index`` (snapshot install)."""
        _check_first(first_index)
        _check_u64(prev_term, "prev_term")
        self._first = first_index
        self._prev_term = prev_term
        self._terms = array("Q")
        self._types = bytearray()
        self._lens = array("I")
        self._offs = array("Q", (0,))
        self._buf = bytearray()
