"""How long an event loop stood still: a ticker task beside the work under test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def longest_gap(work: Callable[[], Awaitable[T]]) -> tuple[float, T]:
    """Run ``work()`` beside a ticker task: the longest the ticker waited for its next turn of
    the loop (seconds), and what ``work`` returned."""
    gaps = [0.0]
    done = False

    async def ticker() -> None:
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    try:
        result = await work()
    finally:
        done = True
        await task
    return max(gaps), result
