"""Durable snapshot files: saving local snapshots, finding the newest, streaming them to
followers and receiving them from a leader.

A snapshot is one file ``snap-<index:016x>-<term:016x>.snap``. The store keeps bytes as given;
the node stores the cluster configuration at the snapshot's index (with its own CRC,
``state_header``) followed by what the state machine's ``snapshot(out)`` writes (the KV
store's carries its own CRC), through ``create``; ``open_state`` reads them back. A file only
ever gets that name complete: it is written under a temporary name
(``snap-...snap.<random>.tmp``), fsynced, renamed and then the directory is fsynced. A crash
therefore leaves at worst a temporary file, which ``latest()`` deletes. The newest two
snapshots are kept, so one can still be read while the next is being written.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import struct
import tempfile
import threading
from collections.abc import Generator, Iterator
from typing import Any, BinaryIO, NamedTuple

from raftfast._accel import crc32c
from raftfast.errors import CorruptionError, DiskFullError, FormatVersionError, StorageError
from raftfast.limits import MAX_TERM_OR_INDEX
from raftfast.storage.fsutil import free_bytes, fsync_dir, make_directory, open_regular

__all__ = [
    "KEEP",
    "SNAPSHOT_FORMAT",
    "SnapshotChunks",
    "SnapshotFile",
    "SnapshotMeta",
    "SnapshotReceiver",
    "SnapshotStore",
    "pack_state",
    "read_state_header",
    "state_header",
    "unpack_state",
]

KEEP = 2  # complete snapshots kept after a new one is saved

_SNAP_NAME = re.compile(r"^snap-([0-9a-f]{16})-([0-9a-f]{16})\.snap$")
_TEMP_NAME = re.compile(r"^snap-[0-9a-f]{16}-[0-9a-f]{16}\.snap\.[^/]*\.tmp$")
_U64_MAX = (1 << 64) - 1
SNAPSHOT_FORMAT = 1  # the last byte of the magic: "RFS1" (docs/disk-format.md)
_STATE_MAGIC = b"RFS" + str(SNAPSHOT_FORMAT).encode()
_STATE_HEADER = struct.Struct("<4sII")  # magic | membership length | crc32c(membership)
# A configuration is at most 64 voters and 64 learners (limits.py): a few dozen KiB of JSON. A
# bigger length is damage, refused before it is read (a crafted one asked for a 4 GiB read).
MAX_MEMBERSHIP_BYTES = 1 << 20


# The snapshot's own index and term, in its configuration's JSON (a key that readers before it
# skip): a file renamed to another index or term, or an older snapshot copied under a newer
# name, is refused instead of trusted (a hunt's renamed snapshots lost 21-68 acknowledged
# writes without a word). Snapshots written before it have none: nothing is checked.
_POSITION_KEY = "snapshot_at"


def _with_key(membership: bytes, key: str, value: Any) -> bytes:
    """``membership`` (a configuration's JSON) with ``key`` set to ``value`` (as it was, if it
    is not a JSON object: its own decoding says what is wrong with it)."""
    try:
        obj = json.loads(membership)
    except ValueError:
        return membership
    if not isinstance(obj, dict):
        return membership
    obj[key] = value
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


_ABSENT = object()


def _value_of(membership: bytes, key: str) -> Any:
    """``key``'s value in ``membership`` (a configuration's JSON); _ABSENT if it has none."""
    try:
        obj = json.loads(membership)
    except ValueError:
        return _ABSENT  # (the configuration's own decoding says what is wrong with it)
    return obj.get(key, _ABSENT) if isinstance(obj, dict) else _ABSENT


def _positioned(membership: bytes, index: int, term: int) -> bytes:
    """``membership`` (a configuration's JSON) with the snapshot's index and term in it."""
    return _with_key(membership, _POSITION_KEY, [index, term])


# The --state-machine of the node that took it (its factory, "" for the key/value store), in
# its configuration's JSON too: a backup restored into a node of another state machine is
# refused, even when that one's restore would take the bytes (a hunt restored a job queue's
# backup into a ledger: no error). Snapshots written before it have none.
_MACHINE_KEY = "state_machine"


def with_state_machine(membership: bytes, name: str) -> bytes:
    """``membership`` (a configuration's JSON) naming the state machine it is a state of."""
    return _with_key(membership, _MACHINE_KEY, name)


def state_machine_of(membership: bytes) -> str | None:
    """The state machine a snapshot's configuration names (None: it names none)."""
    name = _value_of(membership, _MACHINE_KEY)
    return name if isinstance(name, str) else None


def _check_position(membership: bytes, meta: SnapshotMeta) -> None:
    """CorruptionError if the snapshot says it covers another index or term than its name."""
    at = _value_of(membership, _POSITION_KEY)
    if at is not _ABSENT and at != [meta.index, meta.term]:
        raise CorruptionError(
            f"{meta.path}: the snapshot covers (index, term) {str(at)[:60]}, its file name says "
            f"({meta.index}, {meta.term}): renamed or copied? Put it back under its own name, or "
            "remove it and restore the data directory from a backup",
            meta.path,
            0,
        )


def state_header(membership: bytes) -> bytes:
    """What a snapshot's content starts with: the configuration at its index, with a CRC."""
    return _STATE_HEADER.pack(_STATE_MAGIC, len(membership), crc32c(membership)) + membership


def pack_state(membership: bytes, state: bytes) -> bytes:
    """A snapshot's content: the configuration at its index, then the state machine's bytes."""
    return state_header(membership) + state


def unpack_state(data: bytes, path: str = "") -> tuple[bytes, bytes]:
    """(membership, state) of a snapshot's content; CorruptionError if the header is bad."""
    size = _STATE_HEADER.size
    if len(data) >= size:
        magic, length, crc = _STATE_HEADER.unpack_from(data)
        membership = data[size : size + length]
        if (
            magic == _STATE_MAGIC
            and length <= MAX_MEMBERSHIP_BYTES
            and len(membership) == length
            and crc32c(membership) == crc
        ):
            return membership, data[size + length :]
        if magic[:3] == _STATE_MAGIC[:3] and magic[3:].isdigit() and magic != _STATE_MAGIC:
            raise FormatVersionError(
                f"{path or 'snapshot'}: snapshot format {magic[3:].decode()}, but this "
                f"raftfast reads format {SNAPSHOT_FORMAT} only (written by another version)",
                path,
                0,
            )
    raise CorruptionError(f"{path or 'snapshot'}: bad snapshot header", path, 0)


def read_state_header(f: BinaryIO, path: str = "") -> bytes:
    """Read the header of a snapshot's content from ``f``: the configuration; ``f`` is left
    at the state machine's bytes. CorruptionError (or FormatVersionError) if it is bad."""
    return unpack_state(_read_head(f), path)[0]


def _read_head(f: BinaryIO) -> bytes:
    """The header and configuration of a snapshot's content, read from ``f``; at most
    ``MAX_MEMBERSHIP_BYTES`` of configuration (``unpack_state`` refuses a longer one)."""
    head = f.read(_STATE_HEADER.size)
    length = _STATE_HEADER.unpack(head)[1] if len(head) == _STATE_HEADER.size else 0
    return head + f.read(min(length, MAX_MEMBERSHIP_BYTES))


class SnapshotMeta(NamedTuple):
    """A complete snapshot file: the last entry it covers (index, term), its path and size."""

    index: int
    term: int
    path: str
    size: int


def _snap_name(index: int, term: int) -> str:
    if not (0 <= index <= _U64_MAX and 0 <= term <= _U64_MAX):
        raise ValueError(f"snapshot index {index} and term {term} must be unsigned 64-bit")
    return f"snap-{index:016x}-{term:016x}.snap"


ROOM_CHECK_BYTES = 8 << 20  # a snapshot written with keep_free asks the free space this often
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(f"write returned {n}")
        view = view[n:]


class SnapshotStore:
    """The snapshot files of one node, in ``directory`` (created if missing).

    ``fsync=False`` skips every fsync: fast and unsafe, for benchmarks and tests only.
    """

    def __init__(self, directory: str, *, fsync: bool = True) -> None:
        self._dir = os.fspath(directory)
        self._fsync = fsync
        self._lock = threading.Lock()
        self._active: set[str] = set()  # temp files of receivers in progress (not leftovers)
        try:
            make_directory(self._dir, fsync)
        except OSError as exc:
            raise StorageError(f"cannot create snapshot directory {self._dir}: {exc}") from exc

    @property
    def directory(self) -> str:
        return self._dir

    # -- writing --------------------------------------------------------------------------------

    def save(self, index: int, term: int, data: bytes | bytearray | memoryview) -> SnapshotMeta:
        """Durably store a snapshot covering entries <= ``index`` (the last with ``term``).

        On return the file survives a crash; older snapshots beyond the newest ``KEEP`` are gone.
        Raises StorageError if the disk fails (nothing is left behind but, at worst, a temp file).
        """
        receiver = self.receive(index, term)
        try:
            receiver.write(0, data)
            return receiver.finish()
        except BaseException:
            receiver.abort()
            raise

    def create(self, index: int, term: int, membership: bytes, keep_free: int = 0) -> SnapshotFile:
        """A snapshot written as a file: ``out`` takes the state machine's bytes after the
        configuration; ``finish`` makes it durable (``save`` for bytes in hand). ``keep_free``:
        see ``receive``."""
        return SnapshotFile(self.receive(index, term, keep_free), membership)

    def open_state(self, meta: SnapshotMeta) -> tuple[bytes, BinaryIO]:
        """(the configuration, the state machine's bytes as a file to read) of a snapshot
        written with ``create`` or ``pack_state``; CorruptionError if its header is bad. The
        caller closes the file."""
        try:
            f = open_regular(meta.path)  # (handed to the caller)
        except OSError as exc:
            raise StorageError(f"cannot read snapshot {meta.path}: {exc}") from exc
        try:
            membership = read_state_header(f, meta.path)
            _check_position(membership, meta)
        except BaseException:
            f.close()
            raise
        return membership, f

    def receive(self, index: int, term: int, keep_free: int = 0) -> SnapshotReceiver:
        """Start receiving a snapshot in chunks (from a leader); see ``SnapshotReceiver``. Its
        writes stop with DiskFullError (the file deleted) where the disk would have less than
        ``keep_free`` bytes free (asked before each write of at most ``ROOM_CHECK_BYTES``), or
        has no room at all."""
        name = _snap_name(index, term)
        try:
            fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".tmp", dir=self._dir)
        except OSError as exc:
            raise StorageError(f"cannot create a snapshot file in {self._dir}: {exc}") from exc
        with self._lock:
            self._active.add(tmp)
        return SnapshotReceiver(self, index, term, fd, tmp, keep_free)

    # -- reading --------------------------------------------------------------------------------

    def snapshots(self) -> list[SnapshotMeta]:
        """Every complete snapshot, oldest (lowest index, then term) first."""
        out = []
        try:
            names = os.listdir(self._dir)
        except OSError as exc:
            raise StorageError(f"cannot list snapshot directory {self._dir}: {exc}") from exc
        for name in names:
            m = _SNAP_NAME.match(name)
            if m is None:
                continue
            path = os.path.join(self._dir, name)
            index, term = int(m.group(1), 16), int(m.group(2), 16)
            if index >= MAX_TERM_OR_INDEX or term > MAX_TERM_OR_INDEX:
                # (no log can start after such an index; no peer sends such a term)
                raise CorruptionError(
                    f"{path}: snapshot index {index} or term {term} is out of range (the index "
                    f"must be below {MAX_TERM_OR_INDEX}, the term at most that)",
                    path,
                    0,
                )
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:  # deleted meanwhile by a concurrent save
                continue
            out.append(SnapshotMeta(index, term, path, size))
        out.sort()
        return out

    def latest(self) -> SnapshotMeta | None:
        """The newest complete snapshot (highest index, then term), or None.

        Deletes temporary files left behind by a crash (not those of receivers still open).
        """
        self._remove_leftovers()
        snaps = self.snapshots()
        return snaps[-1] if snaps else None

    def read(self, meta: SnapshotMeta) -> bytes:
        """The whole content of a snapshot; CorruptionError if its size changed."""
        try:
            with open_regular(meta.path) as f:
                data = f.read()
        except OSError as exc:
            raise StorageError(f"cannot read snapshot {meta.path}: {exc}") from exc
        if len(data) != meta.size:
            raise CorruptionError(
                f"{meta.path}: snapshot is {len(data)} bytes, expected {meta.size}",
                meta.path,
                min(len(data), meta.size),
            )
        return data

    def read_membership(self, meta: SnapshotMeta) -> bytes:
        """The configuration stored at the head of a snapshot written with ``pack_state``."""
        try:
            with open_regular(meta.path) as f:
                data = _read_head(f)
        except OSError as exc:
            raise StorageError(f"cannot read snapshot {meta.path}: {exc}") from exc
        return unpack_state(data, meta.path)[0]

    def read_chunks(self, meta: SnapshotMeta, chunk_bytes: int = 1 << 20) -> SnapshotChunks:
        """The content of a snapshot in chunks of ``chunk_bytes`` (the last may be shorter).

        The file is open from now until the last chunk is read or the iterator is closed, so a
        concurrent save deleting it does not cut the stream short (its disk space comes back
        only then: close what you do not read to the end). Raises CorruptionError at the end
        if the size changed.
        """
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be positive")
        try:
            f = open_regular(meta.path)  # closed by SnapshotChunks
        except OSError as exc:
            raise StorageError(f"cannot read snapshot {meta.path}: {exc}") from exc
        return SnapshotChunks(f, meta, chunk_bytes)

    # -- internals ------------------------------------------------------------------------------

    def _remove_leftovers(self) -> None:
        try:
            names = os.listdir(self._dir)
        except OSError as exc:
            raise StorageError(f"cannot list snapshot directory {self._dir}: {exc}") from exc
        with self._lock:
            active = set(self._active)
        removed = False
        for name in names:
            path = os.path.join(self._dir, name)
            if _TEMP_NAME.match(name) and path not in active:
                try:
                    os.unlink(path)
                    removed = True
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise StorageError(f"cannot delete {path}: {exc}") from exc
        if removed and self._fsync:
            fsync_dir(self._dir)

    def _install(self, receiver: SnapshotReceiver) -> SnapshotMeta:
        """Rename a complete, fsynced temp file into place, then prune old snapshots."""
        path = os.path.join(self._dir, _snap_name(receiver.index, receiver.term))
        try:
            os.replace(receiver.temp_path, path)
            with self._lock:
                self._active.discard(receiver.temp_path)
            if self._fsync:
                fsync_dir(self._dir)
            meta = SnapshotMeta(receiver.index, receiver.term, path, receiver.offset)
            self._prune(keep=path)
        except OSError as exc:
            raise StorageError(f"cannot install snapshot {path}: {exc}") from exc
        return meta

    def _prune(self, keep: str) -> None:
        """Delete all but the newest ``KEEP`` snapshots (never ``keep``, the one just written)."""
        old = [m for m in self.snapshots()[:-KEEP] if m.path != keep]
        for meta in old:
            try:
                os.unlink(meta.path)
            except FileNotFoundError:
                pass
        if old and self._fsync:
            fsync_dir(self._dir)

    def _forget(self, temp_path: str) -> None:
        with self._lock:
            self._active.discard(temp_path)


class SnapshotChunks(Iterator[bytes]):
    """A snapshot's content in chunks over its open file (``SnapshotStore.read_chunks``).
    ``close`` closes the file at once, whether the chunks were read or not (a generator never
    started would leave it to the garbage collector)."""

    def __init__(self, f: BinaryIO, meta: SnapshotMeta, chunk_bytes: int) -> None:
        self._f = f
        self._meta = meta
        self._chunks = _chunks(f, meta, chunk_bytes)

    def __next__(self) -> bytes:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()
        self._f.close()

    def crc32c(self, size: int, chunk_bytes: int = 1 << 20) -> int:
        """The CRC32C of the file's first ``size`` bytes, read beside the chunks (they are
        not moved): for a header that goes before them (a backup streamed to etcdctl).
        CorruptionError if the file is shorter."""
        fd, crc, offset = self._f.fileno(), 0, 0
        while offset < size:
            data = os.pread(fd, min(chunk_bytes, size - offset), offset)
            if not data:
                raise CorruptionError(f"snapshot {self._meta.path} ended at {offset} of {size}")
            crc = crc32c(data, crc)
            offset += len(data)
        return crc


def _chunks(f: BinaryIO, meta: SnapshotMeta, chunk_bytes: int) -> Generator[bytes, None, None]:
    with f:
        offset = 0
        while True:
            try:
                chunk = f.read(chunk_bytes)
            except OSError as exc:
                raise StorageError(f"cannot read snapshot {meta.path}: {exc}") from exc
            if not chunk:
                break
            offset += len(chunk)
            if offset > meta.size:
                break
            yield chunk
        if offset != meta.size:
            raise CorruptionError(
                f"{meta.path}: snapshot is {offset}+ bytes, expected {meta.size}",
                meta.path,
                min(offset, meta.size),
            )


class _Into(io.RawIOBase):
    """The raw file under a ``SnapshotFile``: writes go to a receiver, in order."""

    def __init__(self, receiver: SnapshotReceiver) -> None:
        self._receiver = receiver

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        self._receiver.write(self._receiver.offset, view)
        return len(view)


class SnapshotFile:
    """A snapshot being written as a file (``SnapshotStore.create``): write the state machine's
    bytes to ``out`` (buffered), then ``finish`` (fsync and rename: off the event loop) or
    ``abort``."""

    def __init__(self, receiver: SnapshotReceiver, membership: bytes) -> None:
        self._receiver = receiver
        self.out: BinaryIO = io.BufferedWriter(_Into(receiver), buffer_size=1 << 20)
        self.out.write(state_header(_positioned(membership, receiver.index, receiver.term)))

    def finish(self) -> SnapshotMeta:
        try:
            self.out.flush()
        except BaseException:
            self._receiver.abort()
            raise
        return self._receiver.finish()

    def abort(self) -> None:
        self._receiver.abort()


class SnapshotReceiver:
    """A snapshot being written chunk by chunk into a temp file. Get one from
    ``SnapshotStore.receive``.

    Chunks must arrive in order: ``write(offset, chunk)`` requires ``offset == self.offset``
    (the bytes received so far), else ValueError and nothing is written; the sender then
    restarts from ``self.offset`` (or the caller aborts and starts over). ``finish`` makes the
    file durable under its final name; ``abort`` deletes it. Usable as a context manager that
    aborts unless finished.
    """

    def __init__(
        self, store: SnapshotStore, index: int, term: int, fd: int, temp: str, keep_free: int = 0
    ) -> None:
        self.index = index
        self.term = term
        self.temp_path = temp
        self.offset = 0  # bytes written so far
        self._store = store
        self._fd = fd
        self._done = False
        self._keep_free = keep_free

    def write(self, offset: int, chunk: bytes | bytearray | memoryview) -> None:
        """Append ``chunk``, which must start at byte ``offset`` of the snapshot."""
        self._check_open()
        if offset != self.offset:
            raise ValueError(
                f"snapshot chunk at offset {offset}, expected {self.offset}: restart from there"
            )
        view = memoryview(chunk).cast("B")
        # (with keep_free, in pieces of at most ROOM_CHECK_BYTES, each asked for: the KV
        # store writes its values in one piece, as big as the state)
        step = ROOM_CHECK_BYTES if self._keep_free else max(len(view), 1)
        for start in range(0, len(view), step):
            piece = view[start : start + step]
            if self._keep_free:
                self._check_room(len(piece))
            try:
                _write_all(self._fd, piece)
            except OSError as exc:
                self.abort()
                if exc.errno in _NO_ROOM:
                    raise DiskFullError(f"no room for snapshot {self.temp_path}: {exc}") from exc
                raise StorageError(f"cannot write snapshot {self.temp_path}: {exc}") from exc
            self.offset += len(piece)

    def _check_room(self, nbytes: int) -> None:
        """DiskFullError (the file deleted) if writing ``nbytes`` more would leave the disk
        less than ``keep_free`` free: the log must be able to grow while a snapshot is written
        (a snapshot of the whole state filled the disk, and the next log write stopped the
        node)."""
        try:
            free = free_bytes(os.path.dirname(self.temp_path))
        except OSError:
            return  # (not knowable here: the writes say)
        if free - nbytes < self._keep_free:
            self.abort()
            raise DiskFullError(
                f"snapshot {self.index} stopped at {self.offset} bytes: the disk has {free} "
                f"bytes free, and {self._keep_free} are kept for the log"
            )

    def finish(self) -> SnapshotMeta:
        """fsync, rename into place, fsync the directory; return the complete snapshot."""
        self._check_open()
        try:
            if self._store._fsync:
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
        except OSError as exc:
            self.abort()
            if exc.errno in _NO_ROOM:
                raise DiskFullError(f"no room for snapshot {self.temp_path}: {exc}") from exc
            raise StorageError(f"cannot sync snapshot {self.temp_path}: {exc}") from exc
        self._done = True
        try:
            return self._store._install(self)
        except BaseException:
            self._remove_temp()
            raise

    def abort(self) -> None:
        """Delete the temp file (idempotent; does nothing after ``finish``)."""
        if self._done:
            return
        self._done = True
        self._remove_temp()

    def _remove_temp(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
        try:
            os.unlink(self.temp_path)
        except FileNotFoundError:
            pass
        except OSError:
            pass  # latest() removes it later
        self._store._forget(self.temp_path)

    def _check_open(self) -> None:
        if self._done:
            raise ValueError("snapshot receiver is already finished or aborted")

    def __enter__(self) -> SnapshotReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()
