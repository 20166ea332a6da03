"""Giving freed heap memory back to the system (glibc's ``malloc_trim``), after a burst.

glibc keeps memory freed in the middle of its heap: after a flood of TLS handshakes (asyncio's
TLS takes a 256 KiB buffer a connection) a node kept ~20-70 MiB more after each flood, though
nothing was left alive. ``malloc_trim(0)`` returns such pages (a few ms for a big heap); it is
called only after such a burst, never on the hot path.
"""

from __future__ import annotations

import ctypes
import platform


def release_free_memory() -> bool:
    """Return the heap's free pages to the system; False where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False


__all__ = ["release_free_memory"]
