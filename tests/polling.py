"""Waiting in a test's event loop for a condition, with a deadline (never a bare sleep)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(
    what: str, check: Callable[[], object], timeout: float = 30.0, every: float = 0.01
) -> None:
    """Return once ``check()`` is true, looking every ``every`` seconds; fail the test (an
    AssertionError naming ``what``) after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(every)
