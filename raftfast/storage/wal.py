"""Segmented write-ahead log with group commit (the byte layout is in docs/disk-format.md).

Why this shape:

- ``append`` only buffers, so the driver can hand over every Ready cheaply; ``sync`` then writes
  the whole buffer with one ``os.writev`` and one ``os.fdatasync`` (group commit), which is what
  bounds Raft's latency and throughput.
- Records carry their own CRC32C, so recovery can tell a torn tail (the last write of a crash,
  never acknowledged: cut it off) from corruption anywhere else (refuse to start: silently
  dropping acknowledged entries would break Raft's safety).
- Segments let compaction delete old entries by unlinking whole files; each segment starts with
  a format record (its version, so a newer layout is refused by name instead of read as
  corruption) and a hard-state record, so it is self-describing.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn

from raftfast._accel import EntryLog, batch_info, crc32c, entries_of_type
from raftfast._sync_py import datasync, write_all
from raftfast.core.membership import Membership
from raftfast.core.types import ENTRY_CONFIG, HardState
from raftfast.errors import CorruptionError, FormatVersionError, LogError, StorageError
from raftfast.limits import MAX_TERM_OR_INDEX, node_id_problem
from raftfast.storage.base import RecoveredState, apply_batch, check_batch
from raftfast.storage.fsutil import (
    FILE_MODE,
    make_directory,
    open_regular,
    read_small_file,
    write_file_atomically,
)

__all__ = [
    "REC_BATCH",
    "REC_COMPACTED",
    "REC_FORMAT",
    "REC_HARD_STATE",
    "REC_SNAPSHOT",
    "WAL",
    "WAL_FORMAT",
]

log = logging.getLogger(__name__)

WAL_FORMAT = 1  # the segment layout this code writes and reads (docs/disk-format.md)

REC_HARD_STATE = 1  # payload: term u64 | commit u64 | vote length u16 | vote utf-8
REC_BATCH = 2  # payload: a packed entry batch, as is
REC_COMPACTED = 3  # payload: index u64 | term u64 — entries <= index live in a snapshot
REC_SNAPSHOT = 4  # payload: index u64 | term u64 — snapshot installed: the log restarts after it
REC_FORMAT = 5  # payload: magic "RFW" | version u16 — the first record of a segment

_HEADER = struct.Struct("<IIB")  # payload length | crc32c(type byte + payload) | type
_HARD_STATE = struct.Struct("<QQH")
_COMPACTED = struct.Struct("<QQ")
_FORMAT = struct.Struct("<3sH")
_FORMAT_MAGIC = b"RFW"
_MAX_COMPACTED = (1 << 62) - 1  # EntryLog's first index (compaction index + 1) is below 2**62
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
# A segment grows past segment_bytes by at most one sync (one Ready's records), and no Ready
# comes near this. A bigger file is not a segment raftfast wrote: it is refused before it is
# read (a crafted 6 GiB sparse file was read whole: 6.2 GB of memory at start).
MAX_SEGMENT_OVERSHOOT = 1 << 30
_TYPE_CRC = {
    t: crc32c(bytes((t,)))
    for t in (REC_HARD_STATE, REC_BATCH, REC_COMPACTED, REC_SNAPSHOT, REC_FORMAT)
}
_TYPE_BYTE = re.compile(rb"[\x01-\x05]")  # candidate type bytes when looking past a bad record
_SEGMENT_NAME = re.compile(r"^([0-9a-f]{16})\.wal$")


@dataclass(slots=True)
class _Segment:
    seq: int
    path: str
    max_index: int = 0  # highest entry index ever written here; release_before relies on it


@dataclass(slots=True)
class _Record:
    offset: int
    end: int
    rtype: int
    value: Any  # HardState | (first, count) for a batch | (index, term) for compaction/snapshot


class PendingSync(NamedTuple):
    """A sync taken out of the WAL (``begin_sync``): write ``pieces`` to ``fd``, in order."""

    fd: int
    pieces: list[bytes]
    hard_state: HardState | None
    max_index: int


def _segment_name(seq: int) -> str:
    return f"{seq:016x}.wal"


# The number of the newest segment the WAL made, written (atomically) once that segment's name
# is durable: a lower bound on what must be there. Without it, a data directory whose newest
# segments were deleted (a clean-up, a partial copy) started on what was left, its acknowledged
# writes gone without a word. A directory written before it has none: nothing is checked.
# (Two fsyncs more per new segment, on the thread that rotates: once per 64 MiB by default.)
NEWEST_SEGMENT_FILE = "newest-segment"
_NEWEST_SEGMENT = re.compile(r"([0-9a-f]{16})\n")


def _record(rtype: int, payload: bytes) -> list[bytes]:
    """Header and payload as separate pieces, so a large batch is copied only by the final join."""
    crc = crc32c(payload, _TYPE_CRC[rtype])
    return [_HEADER.pack(len(payload), crc, rtype), payload]


def _encode_hard_state(hs: HardState) -> bytes:
    vote = hs.vote.encode()
    if len(vote) > 0xFFFF:
        raise ValueError(f"vote id is {len(vote)} bytes; at most 65535 fit a hard-state record")
    return _HARD_STATE.pack(hs.term, hs.commit, len(vote)) + vote


def _decode(rtype: int, payload: memoryview) -> object:
    """The value of an intact record; ValueError if its content is not what the writer makes."""
    if rtype == REC_BATCH:
        return batch_info(payload)  # BatchError is a ValueError
    if rtype == REC_HARD_STATE:
        if len(payload) < _HARD_STATE.size:
            raise ValueError(f"hard-state record is {len(payload)} bytes")
        term, commit, n = _HARD_STATE.unpack_from(payload)
        if len(payload) != _HARD_STATE.size + n:
            raise ValueError(f"hard-state vote length {n} does not match the record")
        # A term past the range every boundary checks could never be bumped to one a peer
        # accepts: the node would start and never work.
        if term > MAX_TERM_OR_INDEX or commit > MAX_TERM_OR_INDEX:
            raise ValueError(f"hard-state term {term} or commit {commit} is out of range")
        vote = bytes(payload[_HARD_STATE.size :]).decode()
        if vote and node_id_problem(vote):  # "" is no vote; anything else names a node
            raise ValueError(f"hard-state vote {vote[:40]!r}: {node_id_problem(vote)}")
        return HardState(term, vote, commit)
    if rtype in (REC_COMPACTED, REC_SNAPSHOT):
        what = "compaction" if rtype == REC_COMPACTED else "snapshot-installed"
        if len(payload) != _COMPACTED.size:
            raise ValueError(f"{what} record is {len(payload)} bytes")
        index, term = _COMPACTED.unpack(payload)
        if index >= _MAX_COMPACTED:  # the log would start past EntryLog's range
            raise ValueError(f"{what} index {index} is out of range")
        if term > MAX_TERM_OR_INDEX:
            raise ValueError(f"{what} term {term} is out of range")
        return index, term
    if rtype == REC_FORMAT:
        if len(payload) != _FORMAT.size:
            raise ValueError(f"format record is {len(payload)} bytes")
        magic, version = _FORMAT.unpack(payload)
        if magic != _FORMAT_MAGIC:
            raise ValueError(f"format record magic {bytes(magic)!r}")
        return version
    raise ValueError(f"unknown record type {rtype}")


class _Bad(Exception):
    """Why there is no usable record at an offset; ``torn`` if a crash mid-write explains it."""

    def __init__(self, reason: str, torn: bool) -> None:
        super().__init__(reason)
        self.torn = torn


def _read_record(data: bytes, off: int) -> _Record:
    """The intact record at ``off``; raises _Bad otherwise."""
    size = len(data)
    if size - off < _HEADER.size:
        raise _Bad(f"truncated record header ({size - off} of {_HEADER.size} bytes)", True)
    length, crc, rtype = _HEADER.unpack_from(data, off)
    start = off + _HEADER.size
    end = start + length
    if end > size:
        raise _Bad(f"record length {length} runs past the end of the file ({size} bytes)", True)
    view = memoryview(data)  # slices of a view are not copies
    if crc32c(view[off + 8 : end]) != crc:
        raise _Bad("record CRC mismatch", True)
    try:
        value = _decode(rtype, view[start:end])
    except ValueError as exc:  # the CRC matched, so these are the bytes that were written
        raise _Bad(f"bad record content ({exc})", False) from None
    return _Record(off, end, rtype, value)


def _next_intact_record(data: bytes, off: int) -> int:
    """Offset of the first intact record starting after ``off``, or -1 if there is none."""
    for m in _TYPE_BYTE.finditer(data, off + _HEADER.size):
        try:
            return _read_record(data, m.start() - 8).offset
        except _Bad:
            pass
    return -1


def _scan(path: str, data: bytes, is_last: bool) -> tuple[list[_Record], int]:
    """Every record of one segment, and the length of its intact prefix.

    Only the last record of the last segment may be torn, and only if nothing intact follows it:
    data followed by intact records was written, acknowledged and then damaged.
    """
    records: list[_Record] = []
    off = 0
    while off < len(data):
        try:
            rec = _read_record(data, off)
        except _Bad as bad:
            where = f"{path}: {bad} at byte offset {off}"
            if not is_last:
                raise CorruptionError(f"{where} (not the last segment)", path, off) from None
            if not bad.torn:
                raise CorruptionError(where, path, off) from None
            after = _next_intact_record(data, off)
            if after < 0:
                return records, off  # a torn tail: the crash interrupted this write
            raise CorruptionError(
                f"{where}, but an intact record follows at byte offset {after}", path, off
            ) from None
        if rec.rtype == REC_FORMAT:
            if records:
                raise CorruptionError(
                    f"{path}: format record inside the segment (byte offset {off})", path, off
                )
            if rec.value != WAL_FORMAT:
                raise FormatVersionError(
                    f"{path}: WAL format {rec.value}, but this raftfast reads format "
                    f"{WAL_FORMAT} only: {_NEWER if rec.value > WAL_FORMAT else _OLDER}",
                    path,
                    0,
                )
        elif not records or (len(records) == 1 and records[0].rtype == REC_FORMAT):
            if rec.rtype != REC_HARD_STATE:  # a segment of format 1 written before the record
                raise CorruptionError(
                    f"{path}: segment does not start with a hard-state record (byte offset {off})",
                    path,
                    off,
                )
        records.append(rec)
        off = rec.end
    if not records and not is_last:
        raise CorruptionError(
            f"{path}: empty segment that is not the last one (byte offset 0)", path, 0
        )
    return records, off


_NEWER = "it was written by a newer raftfast; upgrade raftfast (docs/operations.md)"
_OLDER = "it was written by an older raftfast that this one cannot read"


def _read(path: str, limit: int) -> bytes:
    """The segment at ``path``; CorruptionError, before reading it, if it holds more than
    ``limit`` bytes (more than any segment raftfast writes)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(limit + 1) if size <= limit else b""
    if size > limit or len(data) > limit:
        raise CorruptionError(
            f"{path}: segment is {max(size, len(data))} bytes, more than any segment this WAL "
            f"writes ({limit}; a larger --wal-segment-bytes allows more) (byte offset {limit})",
            path,
            limit,
        )
    return data


class WAL:
    """A segmented write-ahead log implementing ``LogStorage``. Create it with ``WAL.open``.

    ``append`` may be called while another thread is inside ``sync`` (the driver's fsync thread);
    appends made meanwhile go to the next sync. Only one thread may call ``sync`` at a time.
    """

    def __init__(self, path: str, segment_bytes: int, fsync: bool) -> None:
        """Use ``WAL.open``; this only sets fields."""
        if segment_bytes < 1:
            raise ValueError("segment_bytes must be positive")
        self._dir = path
        self._segment_bytes = segment_bytes
        self._fsync = fsync
        self._dirfd = -1
        self._fd = -1  # the current (last) segment, opened for appending
        self._size = 0  # bytes in the current segment
        self._segments: list[_Segment] = []
        self._recovered = RecoveredState(HardState(), EntryLog(1, 0))
        self._synced_hs = HardState()  # what a new segment starts with
        self._first_index = 1  # writer's view of the log, including unsynced appends
        self._last_index = 0
        self._compacted = (0, 0)
        self._buf: list[bytes] = []
        self._pending_hs: HardState | None = None
        self._pending_max = 0
        self._failed: OSError | None = None
        self._closed = False
        self._buf_lock = threading.Lock()
        self._sync_lock = threading.Lock()

    # -- opening and recovery -------------------------------------------------------------------

    @staticmethod
    def holds_log(path: str) -> bool:
        """Whether directory ``path`` holds a WAL segment (else ``open`` makes a new log). A
        path that cannot be listed counts as holding one: ``open`` says what is wrong."""
        try:
            return any(map(_SEGMENT_NAME.match, os.listdir(path)))
        except FileNotFoundError:
            return False
        except OSError:
            return True

    @classmethod
    def open(
        cls, path: str, *, segment_bytes: int = DEFAULT_SEGMENT_BYTES, fsync: bool = True
    ) -> WAL:
        """Open (creating if needed) the WAL in directory ``path`` and recover its state.

        Raises CorruptionError if the log is damaged anywhere but a torn tail, and StorageError
        if the directory cannot be used (including when another WAL holds it open).
        ``fsync=False`` skips every fsync: fast and unsafe, for benchmarks only.
        """
        wal = cls(os.fspath(path), segment_bytes, fsync)
        try:
            wal._open()
        except BaseException:
            wal.close()
            raise
        return wal

    def _open(self) -> None:
        try:
            make_directory(self._dir, self._fsync)
            self._dirfd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fcntl.flock(self._dirfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StorageError(f"WAL {self._dir} is already open (close it first)") from None
            self._segments = self._list_segments()
            self._check_newest_segment()
            good = self._recover()
            if not self._segments:
                self._create_segment(0)
            else:
                last = self._segments[-1]
                self._fd = os.open(last.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                self._size = os.fstat(self._fd).st_size
                if good < self._size:  # cut the torn tail only once recovery has succeeded
                    # (said: a tail cut after a crash is normal, one seen without a crash
                    # before it is a disk or a hand that changed the file)
                    log.warning(
                        "%s: cut a torn tail of %d bytes at offset %d (the last write before a "
                        "crash, never acknowledged)",
                        last.path,
                        self._size - good,
                        good,
                    )
                    os.ftruncate(self._fd, good)
                    if self._fsync:
                        os.fsync(self._fd)
                    self._size = good
        except OSError as exc:
            raise StorageError(f"cannot open WAL {self._dir}: {exc}") from exc
        if self._size == 0:  # fresh, or a crash tore the first record of a new segment
            self._buf = self._segment_head()
            self.sync()

    def _list_segments(self) -> list[_Segment]:
        seqs = sorted(
            int(m.group(1), 16) for m in map(_SEGMENT_NAME.match, os.listdir(self._dir)) if m
        )
        segments = [_Segment(seq, os.path.join(self._dir, _segment_name(seq))) for seq in seqs]
        for prev, seg in zip(segments, segments[1:], strict=False):
            if seg.seq != prev.seq + 1:
                missing = os.path.join(self._dir, _segment_name(prev.seq + 1))
                raise CorruptionError(
                    f"{missing}: segment missing between {prev.path} and {seg.path} "
                    f"(byte offset 0)",
                    missing,
                    0,
                )
        return segments

    def _check_newest_segment(self) -> None:
        """CorruptionError if the newest segment this WAL recorded making is not there."""
        path = os.path.join(self._dir, NEWEST_SEGMENT_FILE)
        try:
            text = read_small_file(path, 64).decode("ascii", "replace")
        except FileNotFoundError:
            return  # (written before the file existed, or a fresh directory)
        except (OSError, ValueError) as exc:
            raise CorruptionError(f"{path}: unreadable: {exc}", path, 0) from None
        m = _NEWEST_SEGMENT.fullmatch(text)
        if m is None:
            raise CorruptionError(f"{path}: not a segment number: {text[:40]!r}", path, 0)
        newest = int(m.group(1), 16)
        have = self._segments[-1].seq if self._segments else -1
        if have < newest:
            missing = os.path.join(self._dir, _segment_name(newest))
            raise CorruptionError(
                f"{missing}: the newest segment this WAL made is missing (its number is in "
                f"{path}): the log's newest entries are gone; restore the directory from a "
                "backup, or replace this member",
                missing,
                0,
            )

    def _recover(self) -> int:
        """Scan and replay every segment; return the intact length of the last one."""
        hard_state = HardState()
        compacted: tuple[int, int] | None = None
        installed: tuple[int, int] | None = None  # the latest snapshot-installed record
        batches: list[list[_Record]] = []  # per segment; only those after `installed`
        good = 0
        records: list[_Record] = []
        for i, seg in enumerate(self._segments):
            data = _read(seg.path, self._max_segment_file())
            records, good = _scan(seg.path, data, i == len(self._segments) - 1)
            seg_batches: list[_Record] = []
            for rec in records:
                if rec.rtype == REC_HARD_STATE:
                    hard_state = rec.value
                elif rec.rtype == REC_COMPACTED:
                    compacted = rec.value
                elif rec.rtype == REC_SNAPSHOT:
                    # Everything recorded before it is gone: the log restarts after its index.
                    installed, compacted = rec.value, None
                    seg_batches.clear()
                    for earlier, before in zip(batches, self._segments, strict=False):
                        earlier.clear()
                        before.max_index = 0  # nothing in it matters any more
                elif rec.rtype == REC_BATCH and rec.value[1]:
                    seg_batches.append(rec)
            batches.append(seg_batches)
            seg.max_index = max((r.value[0] + r.value[1] - 1 for r in seg_batches), default=0)
        explained = compacted is not None or installed is not None
        if self._segments and self._segments[0].seq != 0 and not explained:
            first_seg = self._segments[0].path
            raise CorruptionError(
                f"{first_seg}: earlier segments are missing and no compaction record explains "
                f"it (byte offset 0)",
                first_seg,
                0,
            )
        # Entries <= the latest compaction point are in a snapshot: the log starts after it. A
        # snapshot-installed record is a compaction point that also dropped every later entry;
        # compaction records after it can only move the point further.
        index, term = installed or (0, 0)
        if compacted is not None and compacted[0] > index:
            index, term = compacted
        log = EntryLog(index + 1, term)
        # A batch starting at or before index + 1 replaces everything after index, so replay
        # starts at the last such batch. Earlier batches cannot matter, and replaying them could
        # even put entries of older terms after the snapshot's term.
        start = (0, 0)
        for i, seg_batches in enumerate(batches):
            for j, rec in enumerate(seg_batches):
                if rec.value[0] <= index + 1:
                    start = (i, j)
        for i in range(start[0], len(self._segments)):
            todo = batches[i][start[1] :] if i == start[0] else batches[i]
            if todo:
                path = self._segments[i].path
                self._replay(log, path, _read(path, self._max_segment_file()), todo)
        if not any(rec.rtype == REC_HARD_STATE for rec in records):
            good = 0  # a crash tore the head of the last segment: it is written again
        self._recovered = RecoveredState(hard_state, log)
        self._synced_hs = hard_state
        self._compacted = (index, term)
        self._first_index = log.first_index
        self._last_index = log.last_index
        return good

    def _max_segment_file(self) -> int:
        """The largest segment file recovery reads: what the writer can have made, with the
        default segment size at least (a node restarted with a smaller one still starts)."""
        return max(self._segment_bytes, DEFAULT_SEGMENT_BYTES) + MAX_SEGMENT_OVERSHOOT

    @staticmethod
    def _replay(log: Any, path: str, data: bytes, batches: list[_Record]) -> None:
        view = memoryview(data)
        for rec in batches:
            first, count = rec.value
            batch = view[rec.offset + _HEADER.size : rec.end]
            # A configuration entry that does not decode stopped the node later with a traceback.
            for index, payload in entries_of_type(batch, ENTRY_CONFIG):
                try:
                    Membership.decode(payload)
                except ValueError as exc:
                    raise CorruptionError(
                        f"{path}: batch record at byte offset {rec.offset}: configuration "
                        f"entry {index}: {exc}",
                        path,
                        rec.offset,
                    ) from None
            try:
                apply_batch(log, batch, first, count)
            except (ValueError, LogError) as exc:
                raise CorruptionError(
                    f"{path}: batch record at byte offset {rec.offset} does not continue the "
                    f"log: {exc}",
                    path,
                    rec.offset,
                ) from exc
            # (EntryLog refuses terms that decrease, so the last term is the highest.)
            if log.last_term > MAX_TERM_OR_INDEX:
                raise CorruptionError(
                    f"{path}: batch record at byte offset {rec.offset}: entry term "
                    f"{log.last_term} is out of range (at most {MAX_TERM_OR_INDEX})",
                    path,
                    rec.offset,
                )

    # -- the LogStorage API ---------------------------------------------------------------------

    def recovered(self) -> RecoveredState:
        """The state found at open. Its log is handed to the caller, who owns it from then on."""
        return self._recovered

    def append(self, hard_state: HardState | None, batch: bytes | None) -> None:
        """Buffer a hard state and/or a batch for the next ``sync``; no I/O happens here."""
        with self._buf_lock:
            self._check_usable()
            count = 0
            if batch:
                first, count = check_batch(batch, self._first_index, self._last_index)
            if hard_state is not None:
                self._buf += _record(REC_HARD_STATE, _encode_hard_state(hard_state))
                self._pending_hs = hard_state
            if batch is not None and count:
                self._buf += _record(REC_BATCH, batch)
                self._last_index = first + count - 1
                self._pending_max = max(self._pending_max, self._last_index)

    def sync(self) -> None:
        """Group commit: one write and one fdatasync for everything appended since the last sync.

        Rotates to a new segment first when the current one has reached ``segment_bytes``.
        """
        with self._sync_lock:
            self._sync_locked()

    def _sync_locked(self) -> None:
        """The body of ``sync``; the caller holds ``_sync_lock``."""
        job = self._take_buffered()
        if job is None:
            return
        try:
            written = self._write(job.pieces)
            if self._fsync:
                datasync(self._fd)
        except OSError as exc:
            self._fail(exc)
        self._synced(job, written)

    def begin_sync(self) -> PendingSync | None:
        """``sync`` in two halves, for a writer on another thread that needs no lock of ours
        (``raftfast.storage.writer``): what to write to which file (then fdatasync it, if
        ``fsync``), or None when nothing is buffered. ``_sync_lock`` is held from here until
        ``end_sync``, which must follow once the write is done."""
        self._sync_lock.acquire()
        try:
            job = self._take_buffered()
        except BaseException:
            self._sync_lock.release()
            raise
        if job is None:
            self._sync_lock.release()
        return job

    def end_sync(self, job: PendingSync, outcome: int | OSError) -> None:
        """The second half: ``outcome`` is the bytes written, or the error that failed the
        write or the fdatasync (the WAL then fails: StorageError)."""
        try:
            if isinstance(outcome, OSError):
                self._fail(outcome)
            self._synced(job, outcome)
        finally:
            self._sync_lock.release()

    @property
    def fsync(self) -> bool:
        return self._fsync

    def _take_buffered(self) -> PendingSync | None:
        """What was appended since the last sync, in a new segment if the current one is full."""
        with self._buf_lock:
            self._check_usable()
            pieces, self._buf = self._buf, []
            hard_state, self._pending_hs = self._pending_hs, None
            max_index, self._pending_max = self._pending_max, 0
        if not pieces:
            return None
        if self._size >= self._segment_bytes:
            try:
                pieces = self._rotate() + pieces
            except OSError as exc:
                self._fail(exc)
        return PendingSync(self._fd, pieces, hard_state, max_index)

    def _synced(self, job: PendingSync, written: int) -> None:
        self._size += written
        seg = self._segments[-1]
        seg.max_index = max(seg.max_index, job.max_index)
        if job.hard_state is not None:
            self._synced_hs = job.hard_state

    def release_before(self, index: int, term: int) -> None:
        """Durably record that entries <= ``index`` (the last with ``term``) are in a snapshot,
        then delete the oldest segments holding nothing after ``index``.

        Recovery then starts the log at ``index + 1``; if ``index`` is past the last entry (a
        snapshot from the leader) the log is empty from there. Entries kept after ``index`` must
        follow ``term`` (the caller's job: the WAL does not know terms). A point at or before
        the current one is ignored.
        """
        with self._buf_lock:
            self._check_usable()
            if index <= self._compacted[0]:
                return
            self._buf += _record(REC_COMPACTED, _COMPACTED.pack(index, term))
            self._compacted = (index, term)
            self._first_index = index + 1
            self._last_index = max(self._last_index, index)
        self.sync()  # the marker must be durable before the segments it covers disappear
        with self._sync_lock:
            self._check_usable()
            self._delete_oldest_segments(lambda seg: seg.max_index <= index)

    def install_snapshot(self, index: int, term: int) -> None:
        """Durably discard the whole log and restart it empty at ``index + 1`` (prev term
        ``term``): a follower installing a leader's snapshot.

        Unlike ``release_before``, entries after ``index`` are dropped too (they may conflict
        with the leader's history), and ``index`` may lie before the current compaction point.
        Unsynced appends are written first: their entries are dropped with the rest, a hard
        state among them is kept. One write and one fdatasync, like ``sync``; then the segments
        before the one holding the record are deleted (nothing in them matters any more).
        """
        if not 0 <= index < _MAX_COMPACTED or not 0 <= term < 1 << 64:
            raise ValueError(f"snapshot index {index} or term {term} is out of range")
        with self._sync_lock:
            with self._buf_lock:
                self._check_usable()
                self._buf += _record(REC_SNAPSHOT, _COMPACTED.pack(index, term))
                self._compacted = (index, term)
                self._first_index = index + 1
                self._last_index = index
            self._sync_locked()
            # The record is in the current segment; _sync_lock keeps another sync from rotating
            # meanwhile, so every older segment holds only what the record discards.
            current = self._segments[-1]
            current.max_index = 0  # what it holds so far is discarded
            self._delete_oldest_segments(lambda seg: seg is not current)

    def _delete_oldest_segments(self, deletable: Callable[[_Segment], bool]) -> None:
        """Delete the oldest segments while ``deletable`` says so; the current one is kept.

        Oldest first, one directory fsync each, so a crash never leaves a numbering gap. The
        caller holds ``_sync_lock``.
        """
        try:
            while len(self._segments) > 1 and deletable(self._segments[0]):
                os.unlink(self._segments[0].path)
                del self._segments[0]
                if self._fsync:
                    os.fsync(self._dirfd)
        except OSError as exc:
            self._fail(exc)

    def close(self) -> None:
        """Release the files and the directory lock. Does not sync: unsynced appends are lost."""
        with self._sync_lock, self._buf_lock:
            self._closed = True
            self._buf = []
            for fd in (self._fd, self._dirfd):
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self._fd = self._dirfd = -1

    def __enter__(self) -> WAL:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- introspection (tests, tooling) --------------------------------------------------------

    @property
    def path(self) -> str:
        return self._dir

    @property
    def segments(self) -> list[str]:
        """Paths of the live segment files, oldest first."""
        return [s.path for s in self._segments]

    # -- internals ------------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise StorageError(f"WAL {self._dir} failed earlier ({self._failed}); reopen it")
        if self._closed:
            raise StorageError(f"WAL {self._dir} is closed")

    def _fail(self, exc: OSError) -> NoReturn:
        """After a failed write or fsync the kernel's view of the file is unknowable: stop."""
        self._failed = exc
        raise StorageError(f"WAL {self._dir}: {exc}; the log is unusable until reopened") from exc

    def _write(self, pieces: list[bytes]) -> int:
        """Write ``pieces`` in order with writev, not joined first (a Ready's records are
        megabytes under a batched load: joining them was one more copy of every byte); returns
        the bytes written."""
        return write_all(self._fd, [memoryview(p) for p in pieces])

    def _create_segment(self, seq: int) -> None:
        path = os.path.join(self._dir, _segment_name(seq))
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(path, flags, FILE_MODE)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._size = 0
        self._segments.append(_Segment(seq, path))
        if self._fsync:
            os.fsync(self._dirfd)  # the new name must survive a crash before data relies on it
        write_file_atomically(
            os.path.join(self._dir, NEWEST_SEGMENT_FILE), f"{seq:016x}\n".encode(), self._fsync
        )

    def _rotate(self) -> list[bytes]:
        """Start the next segment; return its opening records."""
        self._create_segment(self._segments[-1].seq + 1)
        return self._segment_head()

    def _segment_head(self) -> list[bytes]:
        """What every segment starts with: its format, then the hard state as last synced."""
        return _record(REC_FORMAT, _FORMAT.pack(_FORMAT_MAGIC, WAL_FORMAT)) + _record(
            REC_HARD_STATE, _encode_hard_state(self._synced_hs)
        )
