"""Write load for the integration tests that need many *log entries*: ``put_many`` packs its
pairs into a few entries, so these issue one put per key (pipelined by the client)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from raftfast.client import Client

CHUNK = 5000  # puts in flight per round


async def put_each(client: Client, items: Iterable[tuple[str, bytes | str]]) -> int:
    """One put per item, ``CHUNK`` at a time; returns how many were written."""
    items = list(items)
    for start in range(0, len(items), CHUNK):
        await asyncio.gather(*(client.put(k, v) for k, v in items[start : start + CHUNK]))
    return len(items)


def write_each(endpoints: list[str], prefix: str, count: int, value: str | None = None) -> None:
    """``count`` separate puts of ``{prefix}{i}`` (value ``i`` unless given)."""

    async def run() -> None:
        async with Client(endpoints, timeout=60) as c:
            for start in range(0, count, 50_000):
                n = min(50_000, count - start)
                await put_each(
                    c, ((f"{prefix}{start + i}", value or f"{start + i}") for i in range(n))
                )

    asyncio.run(run())
