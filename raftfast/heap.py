"""Freed memory goes back to the system (glibc's malloc, in the ``raftfast-node`` process).
One place for the C library's heap: the settings a node starts with, and the trim after a
burst.

glibc serves a block bigger than its mmap threshold with a mapping of its own, unmapped when
freed; but each time such a block is freed it raises the threshold to that block's size (up to
32 MiB), so the next blocks of that size come from the heap and stay resident after they are
freed. A node makes such blocks now and then (a snapshot's copy of the store, its serialized
parts, a snapshot read at restore, a log buffer that grew): with the threshold moving, a node
holding 1M keys kept ~60 bytes per key more than it used (bench/memory.py). Setting the
threshold fixes it where it is.

The other way round, blocks under the threshold come from the heap, and glibc gives the top of
the heap back as soon as 128 KiB of it is free: a node's hot path frees and makes blocks of up
to a few MiB for every replication frame (the record read, its decoded batch), so the heap's
top was given back and faulted in again, zeroed, page by page: ~20% of a follower's CPU under
a batched load (perf: page faults, clear_page, unmap). Up to ``keep_free`` bytes of free heap
top are now kept. Batched puts per second, alternating runs (3 nodes / 5 nodes): 128 KiB
1,102k/1,093k / 768k/805k; 2 MiB 1,135k/1,163k / 787k/799k; 4 MiB 1,188k/1,169k /
811k/820k; 8 MiB 1,199k/1,187k / 835k/832k. bench/memory.py (three runs each): 128 KiB
155/149/152 bytes of RSS per key of a store of 1M keys, 8 MiB 158/155/164. 4 MiB takes most
of the gain for half of the memory.

After a flood of TLS handshakes (asyncio's TLS takes a 256 KiB buffer a connection) glibc kept
what was freed in the middle of its heap: ~20-70 MiB more after each flood, though nothing was
left alive. ``release_free_memory`` (``malloc_trim(0)``, a few ms for a big heap) gives such
pages back; it is called only after such a burst, and after a snapshot let the log it covers
go (the freed entries, the snapshot's copy of the store: bench/memory.py, three runs each,
153.7/155.6/149.4 bytes of RSS per key before, 145.7/145.6/147.7 after), never on the hot path.
"""

from __future__ import annotations

import ctypes
import platform
import threading
from typing import Any

__all__ = ["keep_big_blocks_mapped", "release_free_memory", "release_free_memory_soon"]

_M_TRIM_THRESHOLD = -1  # (malloc.h)
_M_MMAP_THRESHOLD = -3


def _glibc() -> Any | None:
    """The C library, if it is glibc (these settings are its own), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def keep_big_blocks_mapped(threshold: int = 4 << 20, keep_free: int = 4 << 20) -> bool:
    """Blocks of ``threshold`` bytes and more are mapped and unmapped on their own, always;
    the heap keeps up to ``keep_free`` bytes of its free top. False where the C library is not
    glibc (nothing is changed)."""
    libc = _glibc()
    if libc is None:
        return False
    try:
        kept = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(keep_free))
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold)) and kept)
    except AttributeError:
        return False


def release_free_memory() -> bool:
    """Return the heap's free pages to the system; False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    try:
        return bool(libc.malloc_trim(0))
    except AttributeError:
        return False


def release_free_memory_soon(delay: float = 1.0) -> None:
    """``release_free_memory`` ``delay`` seconds from now, in a thread of its own (off the
    event loop: a big heap's trim takes a few ms); a daemon, which an exiting process does not
    wait for."""
    timer = threading.Timer(delay, lambda: release_free_memory())  # (looked up when it runs)
    timer.daemon = True
    timer.start()
