"""Ready-made replicated objects (PySyncObj's batteries): a counter, a dict, and a lock whose
lease runs out when its holder stops renewing it (it died, or lost touch).

Every write is a ``@replicated`` method: ``await counter.add(5)`` (or, with ``SyncNode``,
``counter.add(5)``). Plain attribute reads are this node's copy; ``@readonly`` methods read at
the leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from raftfast.errors import LockLostError, RaftfastError
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
        """The pairs, in the order their keys were first set (the same on every node)."""
        return list(self.data.items())

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
    on every node: holders' clocks must agree to well within the lease. A time that is not a
    finite number is refused (NaN would make the lock nobody's yet nobody could take it).
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
        _check_time(now)
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
        _check_time(now)
        return self.holder if self.holder is not None and now < self.until else None

    def try_acquire(self, holder: str) -> Any:
        """``acquire`` at this machine's time now."""
        return self.acquire(holder, time.time())

    @contextlib.asynccontextmanager
    async def hold(self, holder: str, timeout: float = 30.0) -> AsyncIterator[None]:
        """``async with lock.hold("me"):`` take the lock (waiting up to ``timeout`` seconds),
        renew it in the background while inside, release it on the way out (asyncio nodes;
        with ``SyncNode``, call ``try_acquire`` again within each lease, and ``release``).

        A renewal that fails (no quorum for a moment) is tried again until the lease, as this
        process last renewed it, runs out. If it runs out, or someone else took the lock, the
        body is cancelled and ``LockLostError`` raised out of the ``async with``: code inside
        never runs on without the lock held, unawares."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            asked = loop.time()
            if await self._acquired(holder):
                break
            if loop.time() > deadline:
                raise RaftfastError(f"the lock is held by someone else for {timeout:g}s")
            await asyncio.sleep(min(self.lease / 10, 0.5))
        held_until = asked + self.lease  # (our lease ends then, at the latest: this clock)
        body = asyncio.current_task()
        lost: list[str] = []

        async def renew() -> None:
            nonlocal held_until
            while True:
                await asyncio.sleep(min(self.lease / 3, max(held_until - loop.time(), 0) / 2))
                asked = loop.time()
                try:
                    # (a renewal that hangs, as a proposal does without a quorum, may not keep
                    # the body running past the lease it knows of)
                    # (not wait_for: in 3.11 it can swallow the cancellation that ends this
                    # task as the body leaves, and a renewal would go on after the release)
                    if held_until <= asked:
                        raise TimeoutError  # (no time left: no renewal proposed, to linger)
                    async with asyncio.timeout(held_until - asked):
                        acquired = await self._acquired(holder)
                    if acquired:
                        held_until = asked + self.lease
                        continue
                    lost.append("someone else holds it")
                except (RaftfastError, TimeoutError) as exc:
                    if loop.time() < held_until:
                        continue  # (again, sooner: the sleep is bounded by what is left)
                    lost.append(f"its lease ran out: {str(exc) or 'no renewal in time'}")
                assert body is not None
                body.cancel()
                return

        renewing = asyncio.create_task(renew())
        try:
            yield
        except asyncio.CancelledError:
            if lost and body is not None and body.uncancel() == 0:
                raise LockLostError(f"{holder!r} lost the lock: {lost[0]}") from None
            raise
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError, RaftfastError):
                await renewing
            if not lost:
                await self.release(holder)

    async def _acquired(self, holder: str) -> bool:
        answer = self.try_acquire(holder)
        if not hasattr(answer, "__await__"):
            raise TypeError(
                "ReplLock.hold is for asyncio nodes; with SyncNode, call try_acquire again "
                "within each lease, and release"
            )
        return bool(await answer)


def _check_time(now: Any) -> None:
    try:
        finite = not isinstance(now, bool) and math.isfinite(now)
    except (TypeError, OverflowError):  # (not a number; an int past float's range)
        finite = False
    if not finite or not isinstance(now, int | float):
        what = repr(now)[:40] if isinstance(now, float | str) else f"a {type(now).__name__}"
        raise TypeError(f"a time is a finite number of seconds, not {what}")
