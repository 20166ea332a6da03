"""Small file-system helpers shared by the WAL, the snapshot store and the node identity."""

from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """fsync a directory, so that a file created, renamed or deleted in it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
