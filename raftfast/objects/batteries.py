"""Ready-made replicated objects (PySyncObj's batteries): a counter, a dict, a list, a set, a
queue, and a lock whose lease runs out when its holder stops renewing it (it died, or lost
touch).

Every write is a ``@replicated`` method: ``await counter.add(5)`` (or, with ``SyncNode``,
``counter.add(5)``). Plain attribute reads are this node's copy; ``@readonly`` methods read at
the leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

from raftfast.errors import LockLostError, RaftfastError
from raftfast.objects.replicated import readonly, replicated

__all__ = [
    "MAX_SAME_HASH_KEYS",
    "ReplCounter",
    "ReplDict",
    "ReplList",
    "ReplLock",
    "ReplQueue",
    "ReplSet",
]


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


class _FewSharedHashes:
    """Keys kept in ``self.data`` (a dict), at most ``MAX_SAME_HASH_KEYS`` of them sharing a
    hash: numbers (and tuples of them) hash the same in every process, and a dict of keys
    that all share one takes time quadratic in their number to grow or to restore from a
    snapshot (2,500 commands of 16 multiples of 2**61 - 1 each, every one within a command's
    own limit, made a node's restore take 8 s on its loop). A write past it is refused, the
    same on every node."""

    data: dict[Any, Any]

    def _same_hash(self) -> Counter[int]:
        """How many keys share each hash (``_shared_hashes``): a function of ``data`` alone,
        as every replica must count alike; counted again when ``data`` is another dict (a
        restore: it is not part of the state, so snapshots are unchanged) or holds another
        number of keys than the count knows of (a write that went around the methods)."""
        held = _SAME_HASH.get(self)
        if held is None or held[0] is not self.data or held[2] != len(self.data):
            counts = Counter(_shared_hashes(self.data))
            held = _SAME_HASH[self] = [self.data, counts, len(self.data)]
        return held[1]

    def _admit(self, keys: list) -> None:
        """Count the hashes of new ``keys``; ValueError (nothing counted) if that takes one
        past MAX_SAME_HASH_KEYS."""
        same = self._same_hash()
        hashes = Counter(_shared_hashes(keys))
        if any(same[h] + n > MAX_SAME_HASH_KEYS for h, n in hashes.items()):
            raise ValueError(
                f"more than {MAX_SAME_HASH_KEYS} keys of this dict would share a hash (it "
                "would take time quadratic in their number to store)"
            )
        same.update(hashes)
        _SAME_HASH[self][2] += len(keys)  # (the keys about to be added)

    def _forget(self, key: Any) -> None:
        same = self._same_hash()
        for h in _shared_hashes([key]):
            same[h] -= 1
            if same[h] <= 0:
                del same[h]
        _SAME_HASH[self][2] -= 1  # (the key about to go)

    def _drop(self, key: Any) -> None:
        """Remove ``key`` (there), its hash uncounted."""
        self._forget(key)
        del self.data[key]

    @replicated
    def clear(self) -> None:
        self.data.clear()
        _SAME_HASH.pop(self, None)


class ReplDict(_FewSharedHashes):
    """A dict of data (keys and values: what ``raftfast.objects.codec`` carries); at most
    ``MAX_SAME_HASH_KEYS`` of its keys share a hash (``_FewSharedHashes``)."""

    def __init__(self) -> None:
        self.data: dict[Any, Any] = {}

    @replicated
    def set(self, key: Any, value: Any) -> None:
        if key not in self.data:
            self._admit([key])
        self.data[key] = value

    @replicated
    def update(self, items: dict) -> None:
        # (pairs too, as dict.update takes them, in a list or tuple: a set of pairs is read
        # in each process's own order, and the replicas differed)
        items = dict(items) if isinstance(items, dict) else dict(_in_order(items))
        self._admit([key for key in items if key not in self.data])
        self.data.update(items)

    @replicated
    def pop(self, key: Any, default: Any = None) -> Any:
        if key in self.data:
            self._forget(key)
        return self.data.pop(key, default)

    @readonly
    def get(self, key: Any, default: Any = None) -> Any:
        return self.data.get(key, default)

    @readonly
    def items(self, start: int = 0, limit: int | None = None) -> list:
        """The pairs, in the order their keys were first set (the same on every node): all of
        them, or ``limit`` from the ``start``-th. An answer is built on the node's loop, about
        1 s per million pairs: page a big dict."""
        return _page(self.data.items(), start, limit)

    def __getitem__(self, key: Any) -> Any:  # this node's copy
        return self.data[key]

    def __contains__(self, key: object) -> bool:
        return key in self.data

    def __len__(self) -> int:
        return len(self.data)


class ReplSet(_FewSharedHashes):
    """A set of data, kept in the order items were first added (a dict's keys: every node
    and every snapshot iterate it alike, where a set's order differs from process to
    process), so ``pop`` takes the oldest; at most ``MAX_SAME_HASH_KEYS`` items share a hash."""

    def __init__(self) -> None:
        self.data: dict[Any, None] = {}

    @replicated
    def add(self, item: Any) -> bool:
        """Add ``item``; whether it was not there yet."""
        if item in self.data:
            return False
        self._admit([item])
        self.data[item] = None
        return True

    @replicated
    def update(self, items: list) -> int:
        """Add every one of ``items`` (a list or tuple); how many were new."""
        new = list(dict.fromkeys(item for item in _in_order(items) if item not in self.data))
        self._admit(new)
        self.data.update(dict.fromkeys(new))
        return len(new)

    @replicated
    def remove(self, item: Any) -> None:
        """Remove ``item``; KeyError if it is not there (``discard`` does not mind)."""
        if item not in self.data:
            raise KeyError(item)
        self._drop(item)

    @replicated
    def discard(self, item: Any) -> bool:
        """Remove ``item`` if it is there; whether it was."""
        if item not in self.data:
            return False
        self._drop(item)
        return True

    @replicated
    def pop(self, default: Any = None) -> Any:
        """Remove and return the oldest item (``default`` if there is none)."""
        if not self.data:
            return default
        item = next(iter(self.data))
        self._drop(item)
        return item

    @readonly
    def contains(self, item: Any) -> bool:
        return item in self.data

    @readonly
    def items(self, start: int = 0, limit: int | None = None) -> list:
        """The items, oldest first: all of them, or ``limit`` from the ``start``-th."""
        return _page(self.data, start, limit)

    def __contains__(self, item: object) -> bool:  # this node's copy
        return item in self.data

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self.data))

    def __len__(self) -> int:
        return len(self.data)


class ReplList:
    """A list of data."""

    def __init__(self) -> None:
        self.data: list[Any] = []

    @replicated
    def append(self, item: Any) -> int:
        """Append ``item``; the new length."""
        self.data.append(item)
        return len(self.data)

    @replicated
    def extend(self, items: list) -> int:
        """Append every one of ``items`` (a list or tuple); the new length."""
        self.data.extend(_in_order(items))
        return len(self.data)

    @replicated
    def insert(self, index: int, item: Any) -> int:
        self.data.insert(_index(index), item)
        return len(self.data)

    @replicated
    def set(self, index: int, item: Any) -> None:
        """Replace the ``index``-th item (IndexError past the end)."""
        self.data[_index(index)] = item

    @replicated
    def pop(self, index: int = -1) -> Any:
        """Remove and return the ``index``-th item (IndexError if there is none)."""
        return self.data.pop(_index(index))

    @replicated
    def remove(self, item: Any) -> bool:
        """Remove the first ``item``; whether there was one."""
        try:
            self.data.remove(item)
        except ValueError:
            return False
        return True

    @replicated
    def sort(self, reverse: bool = False) -> None:
        """Sort the items in place (TypeError, and nothing changed, if they do not compare)."""
        self.data[:] = sorted(self.data, reverse=bool(reverse))

    @replicated
    def clear(self) -> None:
        self.data.clear()

    @readonly
    def index(self, item: Any) -> int:
        """Where ``item`` first is (ValueError if it is not there)."""
        return self.data.index(item)

    @readonly
    def count(self, item: Any) -> int:
        return self.data.count(item)

    @readonly
    def get(self, index: int, default: Any = None) -> Any:
        """The ``index``-th item (``default`` past the end)."""
        try:
            return self.data[_index(index)]
        except IndexError:
            return default

    @readonly
    def items(self, start: int = 0, limit: int | None = None) -> list:
        """The items: all of them, or ``limit`` from the ``start``-th."""
        return _page(self.data, start, limit)

    def __getitem__(self, index: int) -> Any:  # this node's copy
        return self.data[index]

    def __len__(self) -> int:
        return len(self.data)


class ReplQueue:
    """A first-in, first-out queue of data, of at most ``maxsize`` items (0: no bound).
    ``get`` is a write (it takes the item away, on every node). Kept as a dict of positions,
    so that taking from the front is one step however long the queue."""

    def __init__(self, maxsize: int = 0) -> None:
        if not isinstance(maxsize, int) or maxsize < 0:
            raise ValueError("maxsize is a non-negative integer")
        self.maxsize = maxsize
        self.queued: dict[int, Any] = {}
        self.head = 0  # the position of the oldest item (the next ``get``)

    @replicated
    def put(self, item: Any) -> bool:
        """Add ``item`` at the back; False (and nothing added) if the queue is full."""
        if self.full():
            return False
        self.queued[self.head + len(self.queued)] = item
        return True

    @replicated
    def get(self, default: Any = None) -> Any:
        """Take the oldest item (``default`` if the queue is empty)."""
        if not self.queued:
            return default
        item = self.queued.pop(self.head)
        self.head += 1
        return item

    @readonly
    def peek(self, default: Any = None) -> Any:
        """The oldest item, left in place (``default`` if the queue is empty)."""
        return self.queued.get(self.head, default) if self.queued else default

    @readonly
    def size(self) -> int:
        return len(self.queued)

    def __len__(self) -> int:  # this node's copy
        return len(self.queued)

    def empty(self) -> bool:
        return not self.queued

    def full(self) -> bool:
        return bool(self.maxsize) and len(self.queued) >= self.maxsize


def _in_order(items: Any) -> list | tuple:
    """Items a command adds one after another: a list or a tuple, whose order every node
    decodes alike (a set's order differs from process to process: the replicas would differ)."""
    if not isinstance(items, list | tuple):
        raise TypeError(f"items come in a list or a tuple, not a {type(items).__name__}")
    return items


def _index(index: Any) -> int:
    """A list position a client sent: an int (not a bool: True is 1 to a list)."""
    if not isinstance(index, int) or isinstance(index, bool):
        raise TypeError(f"a list index is an integer, not a {type(index).__name__}")
    return index


def _page(rows: Any, start: int, limit: int | None) -> list:
    """``limit`` of ``rows`` (None: all of them) from the ``start``-th, as a list."""
    if not isinstance(start, int) or start < 0:
        raise ValueError("start is a non-negative integer")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError("limit is a non-negative integer or None")
    if not start and limit is None:
        return list(rows)
    stop = None if limit is None else start + limit
    return list(itertools.islice(rows, start, stop))


MAX_SAME_HASH_KEYS = 64
# ReplDict or ReplSet -> [its data dict, the count of its keys per hash, how many keys that
# counted], out of the replicated state
_SAME_HASH: weakref.WeakKeyDictionary[_FewSharedHashes, list] = weakref.WeakKeyDictionary()


def _shared_hashes(keys: Any) -> list[int]:
    """The hashes of those ``keys`` whose hash is the same in every process (str and bytes
    hash with a secret seed per process: no client can make many of them collide)."""
    return [hash(k) for k in keys if not isinstance(k, str | bytes)]


class ReplLock:
    """A lock held by one holder (any string: a process's id) for ``lease`` seconds at a time:
    its holder renews it (``hold`` does, every third of the lease); if it dies, or cannot reach
    the cluster, the lease runs out and another can take the lock.

    Time comes with each command (the proposer's wall clock), so that applying stays the same
    on every node: holders' clocks must agree to well within the lease. A time that is not a
    finite number is refused (NaN would make the lock nobody's yet nobody could take it). So
    the lock trusts its proposers: one that says it is year 10^300 holds the lock for good
    (until released); give write access only to code that tells the time.
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
