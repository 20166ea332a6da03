"""The deadlines of a client's calls in flight, kept with one timer for all of them.

A timer per call (``loop.call_later``, then its ``cancel``) was about a sixth of the client's
CPU with 256 puts in flight (py-spy, ``raftfast bench --inflight 256``). Calls mostly share
one timeout and finish in the order they were made, so their deadlines are kept in a queue in
the order they fall, finished calls are dropped from its head, and one timer waits for the
earliest. A call whose deadline falls before the last one queued (a shorter timeout) goes to a
heap instead.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

# The queue and the heap keep finished calls until they reach the head (or their deadline
# passes); past this many entries, and twice as many as were live at the last compaction,
# they are filtered (a call stuck for its whole timeout must not hold every later one).
_COMPACT_AT = 1024
# A loop's timers are as coarse as this (uvloop's clock counts milliseconds): a deadline this
# close when the timer fires has passed, or the timer would be armed again and again for it.
_GRAIN_S = 0.001

log = logging.getLogger("raftfast.client")


class _Call(Protocol):
    fut: asyncio.Future[Any] | None


def _finished(call: _Call) -> bool:
    return call.fut is None or call.fut.done()


class Deadlines:
    """``add(call, timeout)``; ``expire(calls, timeout)`` is called, from the event loop,
    with the unfinished calls whose deadline has passed (grouped by their timeout; a deadline
    within _GRAIN_S of the timer's firing counts as passed, as a per-call timer's would)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        expire: Callable[[list[Any], float], None],
    ) -> None:
        self._loop = loop
        self._expire = expire
        self._queue: deque[tuple[float, float, _Call]] = deque()  # deadlines in order
        self._heap: list[tuple[float, int, float, _Call]] = []  # ... and those out of order
        self._tiebreak = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._when = float("inf")  # when the timer fires
        self._compact_at = _COMPACT_AT

    def __len__(self) -> int:
        return len(self._queue) + len(self._heap)

    def add(self, call: _Call, timeout: float) -> None:
        deadline = self._loop.time() + timeout
        queue = self._queue
        while queue and _finished(queue[0][2]):
            queue.popleft()
        if not queue or queue[-1][0] <= deadline:
            queue.append((deadline, timeout, call))
        else:
            heapq.heappush(self._heap, (deadline, next(self._tiebreak), timeout, call))
        if len(self) > self._compact_at:
            self._compact()
        if deadline < self._when:
            self._arm(deadline)

    def _compact(self) -> None:
        self._queue = deque(e for e in self._queue if not _finished(e[2]))
        self._heap = [e for e in self._heap if not _finished(e[3])]
        heapq.heapify(self._heap)
        self._compact_at = max(_COMPACT_AT, 2 * len(self))

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._when = when
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer, self._when = None, float("inf")
        now = self._loop.time() + _GRAIN_S
        due: dict[float, list[Any]] = {}
        queue, heap = self._queue, self._heap
        while queue and (queue[0][0] <= now or _finished(queue[0][2])):
            _, timeout, call = queue.popleft()
            if not _finished(call):
                due.setdefault(timeout, []).append(call)
        while heap and (heap[0][0] <= now or _finished(heap[0][3])):
            _, _, timeout, call = heapq.heappop(heap)
            if not _finished(call):
                due.setdefault(timeout, []).append(call)
        nxt = min(queue[0][0] if queue else float("inf"), heap[0][0] if heap else float("inf"))
        if nxt != float("inf"):
            self._arm(nxt)
        for timeout, calls in due.items():
            try:
                self._expire(calls, timeout)
            except Exception:  # (a failure with one group must not leave the others hanging)
                log.exception("expiring calls failed")

    def drain(self) -> list[Any]:
        """Forget every deadline and the timer; returns the calls not finished (the client is
        closing: they fail now, and nothing here keeps a finished call's bytes alive)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._when = None, float("inf")
        left = [e[2] for e in self._queue if not _finished(e[2])]
        left += [e[3] for e in self._heap if not _finished(e[3])]
        self._queue.clear()
        self._heap.clear()
        return left
