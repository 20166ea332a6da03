"""Freed memory goes back to the system (glibc's malloc, in the ``raftfast-node`` process).

glibc serves a block bigger than its mmap threshold with a mapping of its own, unmapped when
freed; but each time such a block is freed it raises the threshold to that block's size (up to
32 MiB), so the next blocks of that size come from the heap and stay resident after they are
freed. A node makes such blocks now and then (a snapshot's copy of the store, its serialized
parts, a snapshot read at restore, a log buffer that grew): with the threshold moving, a node
holding 1M keys kept ~60 bytes per key more than it used (bench/memory.py). Setting the
threshold fixes it where it is.
"""

from __future__ import annotations

import ctypes
import platform

__all__ = ["keep_big_blocks_mapped"]

_M_MMAP_THRESHOLD = -3  # (malloc.h)


def keep_big_blocks_mapped(threshold: int = 4 << 20) -> bool:
    """Blocks of ``threshold`` bytes and more are mapped and unmapped on their own, always.
    False where the C library is not glibc (nothing is changed)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold)))
    except (OSError, AttributeError):
        return False
