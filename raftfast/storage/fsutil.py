"""Small file-system helpers shared by the WAL, the snapshot store, the node identity and the
incarnations file."""

from __future__ import annotations

import fcntl
import os
import stat
from typing import BinaryIO

from raftfast.errors import StorageError

# Writes stop (a NOSPACE alarm) before a data directory's disk has less than this free, and a
# snapshot from the leader may not take it below: the log must always be able to grow a little.
DISK_RESERVE_BYTES = 64 * 1024 * 1024
DIR_MODE = 0o700  # data directories: the log and snapshots are nobody else's business
FILE_MODE = 0o600


def fsync_dir(path: str) -> None:
    """fsync a directory, so that a file created, renamed or deleted in it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_directory(path: str, fsync: bool) -> None:
    """Create the directory ``path`` (mode 0700) if missing, the parent fsynced so that it
    survives a crash. OSError naming what is there if something else has the name (a file
    or a dangling link gave "File exists")."""
    if os.path.isdir(path):
        return
    if os.path.lexists(path):
        what = "a link to nothing" if os.path.islink(path) else "not a directory"
        raise OSError(f"{path} is {what}; a directory is expected there")
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    if fsync:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def open_regular(path: str) -> BinaryIO:
    """``open(path, "rb")`` for a regular file only: a FIFO, a device or a directory in its
    place raises OSError at once (opening a FIFO for reading waits for a writer: a node
    starting on such a data directory hung, silent)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"{path} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_small_file(path: str, limit: int) -> bytes:
    """The content of the regular file ``path`` (``open_regular``); ValueError if it holds
    more than ``limit`` bytes (a file swapped for a link to /dev/zero is not read forever)."""
    with open_regular(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is bigger than {limit} bytes")
    return data


def write_file_atomically(path: str, data: bytes, fsync: bool = True) -> None:
    """Replace ``path`` with ``data``: a temporary file beside it, written whole, fsynced,
    renamed over it, the directory fsynced; after a crash the file is the old one or the new
    one, complete. (``fsync=False``: the same without the syncs, as a node run without fsync.)"""
    temp = path + ".tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    if fsync:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def lock_directory(path: str) -> int:
    """Create ``path`` (mode 0700) if missing and lock it against other processes; returns the
    descriptor that holds the lock (it lasts until closed, or the process ends). StorageError if
    another process holds it: take it before writing anything there."""
    try:
        os.makedirs(path, mode=DIR_MODE, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise StorageError(f"cannot use data directory {path}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StorageError(f"data directory {path} is in use by another process") from None
    try:
        if os.stat(fd).st_mode & 0o077:
            os.chmod(fd, DIR_MODE)  # a directory made by hand or by an older version
    except OSError:
        pass  # not ours to change (owned by another user): it still works
    return fd


def free_bytes(path: str) -> int:
    """Bytes free for us on the file system holding ``path``. ``RAFTFAST_FAULT_DISK_FREE_BYTES``
    (tests only) pretends the disk has that much."""
    pretend = os.environ.get("RAFTFAST_FAULT_DISK_FREE_BYTES")
    if pretend:
        return int(pretend)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
