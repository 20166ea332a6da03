"""Backup files: one snapshot of the whole cluster state, as ``raftfast snapshot save`` writes
it and ``raftfast-node --restore`` reads it (the layout is in docs/disk-format.md).

A header names the snapshot (the last entry it covers: index and term), its size and a
CRC32C of the snapshot's bytes and of those three (format 2; format 1's covered the snapshot
only: one flipped bit in its index or term restored a node at another point of the log, which
then diverged from the others silently); the snapshot file's bytes follow as the node keeps
them (the configuration, then the state machine's state). The header is written last, so a
file cut short by a crash or a full disk never passes ``read_header``. A backup streamed to
etcdctl (``etcdctl snapshot save``) ends with a seal etcdctl looks for (``seal``);
``read_header`` checks it too.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import struct
from typing import Any, BinaryIO, NamedTuple

from raftfast._accel import crc32c
from raftfast.errors import CorruptionError, FormatVersionError
from raftfast.limits import MAX_TERM_OR_INDEX
from raftfast.storage.fsutil import FILE_MODE, fsync_dir

__all__ = [
    "BACKUP_FORMAT",
    "HEADER_SIZE",
    "BackupInfo",
    "BackupWriter",
    "header_bytes",
    "read_header",
    "seal",
    "seal_size",
]

BACKUP_FORMAT = 2  # (1 is still read)
_MAGIC = b"RFBK"
_HEADER = struct.Struct("<4sHHQQQI")  # magic | format | 0 | index | term | size | crc32c
_COVERED = struct.Struct("<QQQ")  # index | term | size: after the snapshot, under the CRC
HEADER_SIZE = _HEADER.size
_CHUNK = 1 << 20
_SEAL_BLOCK = 512  # (etcd's snapshot files: pages of 512 bytes, then a SHA-256)
_SEAL_MAX = _SEAL_BLOCK - 1 + 32


class BackupInfo(NamedTuple):
    index: int
    term: int
    size: int
    crc: int  # (the snapshot's bytes' CRC32C, as the snapshot store keeps it)


def _header_crc(index: int, term: int, size: int, snapshot_crc: int) -> int:
    """What a format-2 header holds: the snapshot's CRC32C carried on over its index, term and
    size."""
    return crc32c(_COVERED.pack(index, term, size), snapshot_crc)


def backup_target(path: str) -> str:
    """The file a backup to ``path`` replaces: ``path``, or the file a symlink there names.
    OSError (EINVAL) for anything else that is there (a FIFO, a device, /dev/stdout, a
    directory): the backup is written beside it and renamed over it, which would replace a
    device node with a plain file."""
    target = os.path.realpath(path) if os.path.islink(path) else path
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, "it exists and is not a regular file (a backup is one)")
    return target


class BackupWriter:
    """Write a backup to ``path``: ``write`` the snapshot's bytes in order, then ``finish``
    (index and term as the snapshot's). Until then the file is a temporary one."""

    def __init__(self, path: str) -> None:
        self.path = path = backup_target(path)
        self._temp = f"{path}.{os.getpid()}.tmp"
        self._fd = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        self._size = 0
        self._crc = 0
        os.pwrite(self._fd, bytes(_HEADER.size), 0)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, _HEADER.size + self._size)
            self._size += written
            view = view[written:]
        self._crc = crc32c(data, self._crc)

    def finish(self, index: int, term: int, size: int) -> BackupInfo:
        """Check the size, write the header, make the file durable under its name."""
        if size != self._size:
            self.abort()
            raise CorruptionError(f"snapshot stream ended at {self._size} of {size} bytes")
        info = BackupInfo(index, term, size, self._crc)
        os.pwrite(self._fd, header_bytes(info), 0)
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        os.replace(self._temp, self.path)
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        return info

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self._temp)
        except FileNotFoundError:
            pass


def header_bytes(info: BackupInfo) -> bytes:
    """The header of a backup of the snapshot ``info`` describes; its bytes follow it."""
    crc = _header_crc(info.index, info.term, info.size, info.crc)
    return _HEADER.pack(_MAGIC, BACKUP_FORMAT, 0, info.index, info.term, info.size, crc)


def read_header(f: BinaryIO, path: str) -> BackupInfo:
    """The header of an open backup file, checked against the file: its format, its size and
    its CRC (which reads the whole file once). CorruptionError if anything does not match.
    Reads format 1 too (its CRC covers the snapshot only)."""
    head = f.read(_HEADER.size)
    if len(head) < _HEADER.size or head[:4] != _MAGIC:
        raise CorruptionError(f"{path} is not a raftfast backup (no RFBK header)", path, 0)
    _, fmt, _, index, term, size, crc = _HEADER.unpack(head)
    if fmt not in (1, BACKUP_FORMAT):
        raise FormatVersionError(
            f"{path}: backup format {fmt}, but this raftfast reads formats 1 to "
            f"{BACKUP_FORMAT} only",
            path,
            4,
        )
    if not (0 < index <= MAX_TERM_OR_INDEX and 0 < term <= MAX_TERM_OR_INDEX):
        raise CorruptionError(
            f"{path}: snapshot index {index} or term {term} is out of range", path, 8
        )
    got, seen = 0, 0
    # (the SHA-256 only when bytes follow the snapshot: a seal, or damage)
    sealed = hashlib.sha256(head) if f.seek(0, os.SEEK_END) > _HEADER.size + size else None
    f.seek(_HEADER.size)
    while seen < size:
        chunk = f.read(min(_CHUNK, size - seen))
        if not chunk:
            break
        got = crc32c(chunk, got)
        if sealed is not None:
            sealed.update(chunk)
        seen += len(chunk)
    rest = f.read(_SEAL_MAX + 1)
    if seen != size or (rest and (sealed is None or rest != seal(sealed, _HEADER.size + size))):
        seen += len(rest)
        raise CorruptionError(f"{path}: {seen} bytes of snapshot, the header says {size}", path)
    if crc != (got if fmt == 1 else _header_crc(index, term, size, got)):
        raise CorruptionError(f"{path}: checksum mismatch: the backup is damaged", path)
    f.seek(_HEADER.size)
    return BackupInfo(index, term, size, got)


def seal_size(length: int) -> int:
    """The bytes of the seal after ``length`` bytes (``seal``)."""
    return -length % _SEAL_BLOCK + 32


def seal(digest: Any, length: int) -> bytes:
    """What ends a backup streamed to etcdctl (``snapshot save``), after its ``length`` bytes
    whose SHA-256 ``digest`` holds so far: zeros up to a multiple of 512 bytes, then the
    SHA-256 of all before it, as etcd's own snapshot files end (etcdctl refuses a download
    whose length is not 32 past a multiple of 512: "sha256 checksum not found")."""
    pad = b"\0" * (-length % _SEAL_BLOCK)
    digest = digest.copy()
    digest.update(pad)
    return pad + digest.digest()
