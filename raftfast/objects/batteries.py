"""Ready-made replicated objects (PySyncObj's batteries): a counter, a dict, and a lock whose
lease runs out when its holder stops renewing it (it died, or lost touch).

Every write is a ``@replicated`` method: ``await counter.add(5)`` (or, with ``SyncNode``,
``counter.add(5)``). Plain attribute reads are this node's copy; ``@readonly`` methods read at
the leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from raftfast.errors import RaftfastError
from raftfast.objects.replicated import readonly, replicated

__all__ = ["ReplCounter", "ReplDict", "ReplLock"]


class ReplCounter:
    def __init__(self, value: int = 0) -> None:
        self.value = value

    @replicated
    def add(self, n: int = 1) -> int:
        """Add ``n``; the new value."""
        if not isinstance(n, int) or isinstance(n, bool):
            raise TypeError("a counter adds integers")
        self.value += n
        return self.value

    @replicated
    def set(self, value: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError("a counter holds an integer")
        self.value = value
        return value

    @readonly
    def get(self) -> int:
        return self.value


class ReplDict:
    """A dict of data (keys and values: what ``raftfast.objects.codec`` carries)."""

    def __init__(self) -> None:
        self.data: dict[Any, Any] = {}

    @replicated
    def set(self, key: Any, value: Any) -> None:
        self.data[key] = value

    @replicated
    def update(self, items: dict) -> None:
        self.data.update(items)

    @replicated
    def pop(self, key: Any, default: Any = None) -> Any:
        return self.data.pop(key, default)

    @replicated
    def clear(self) -> None:
        self.data.clear()

    @readonly
    def get(self, key: Any, default: Any = None) -> Any:
        return self.data.get(key, default)

    @readonly
    def items(self) -> list:
        return sorted(self.data.items(), key=repr)

    def __getitem__(self, key: Any) -> Any:  # this node's copy
        return self.data[key]

    def __contains__(self, key: object) -> bool:
        return key in self.data

    def __len__(self) -> int:
        return len(self.data)


class ReplLock:
    """A lock held by one holder (any string: a process's id) for ``lease`` seconds at a time:
    its holder renews it (``hold`` does, every third of the lease); if it dies, or cannot reach
    the cluster, the lease runs out and another can take the lock.

    Time comes with each command (the proposer's wall clock), so that applying stays the same
    on every node: holders' clocks must agree to well within the lease.
    """

    def __init__(self, lease: float = 10.0) -> None:
        if not lease > 0:
            raise ValueError("the lease must be positive")
        self.lease = float(lease)
        self.holder: str | None = None
        self.until = 0.0  # the holder's lease runs out then (proposers' clocks)

    @replicated
    def acquire(self, holder: str, now: float) -> bool:
        """Take the lock (or renew it) for ``holder`` if it is free, expired or already its."""
        if not isinstance(holder, str) or not holder:
            raise TypeError("a holder is a non-empty string")
        if self.holder in (None, holder) or now >= self.until:
            self.holder, self.until = holder, float(now) + self.lease
            return True
        return False

    @replicated
    def release(self, holder: str) -> bool:
        if self.holder != holder:
            return False
        self.holder, self.until = None, 0.0
        return True

    @readonly
    def owner(self, now: float) -> str | None:
        """Who holds it at ``now`` (None: nobody, or the lease ran out)."""
        return self.holder if self.holder is not None and now < self.until else None

    def try_acquire(self, holder: str) -> Any:
        """``acquire`` at this machine's time now."""
        return self.acquire(holder, time.time())

    @contextlib.asynccontextmanager
    async def hold(self, holder: str, timeout: float = 30.0) -> AsyncIterator[None]:
        """``async with lock.hold("me"):`` take the lock (waiting up to ``timeout`` seconds),
        renew it in the background while inside, release it on the way out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await self.try_acquire(holder):
            if loop.time() > deadline:
                raise RaftfastError(f"the lock is held by someone else for {timeout:g}s")
            await asyncio.sleep(min(self.lease / 10, 0.5))

        async def renew() -> None:
            while True:
                await asyncio.sleep(self.lease / 3)
                await self.try_acquire(holder)

        renewing = asyncio.create_task(renew())
        try:
            yield
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError, RaftfastError):
                await renewing
            await self.release(holder)
