"""The client's deadlines of calls in flight (raftfast/client/deadlines.py): every unfinished
call expires at its own deadline, with its own timeout, whatever order the timeouts come in;
finished calls never expire and are not held on to."""

from __future__ import annotations

import asyncio

import pytest

from raftfast.client import deadlines
from raftfast.client.deadlines import Deadlines
from tests.polling import until

_EVERY = 0.005  # (deadlines of 10-50 ms: looked at more often than tests/polling's default)


class Call:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.fut: asyncio.Future[None] | None = loop.create_future()


def test_each_call_expires_with_its_timeout_in_any_order() -> None:
    asyncio.run(_test_each_call_expires_with_its_timeout_in_any_order())


async def _test_each_call_expires_with_its_timeout_in_any_order() -> None:
    loop = asyncio.get_running_loop()
    expired: list[tuple[Call, float, float]] = []
    start = loop.time()

    def expire(calls: list[Call], timeout: float) -> None:
        for call in calls:
            expired.append((call, timeout, loop.time() - start))
            call.fut.set_exception(TimeoutError())  # type: ignore[union-attr]

    dl = Deadlines(loop, expire)
    timeouts = [0.30, 0.10, 0.20, 0.05, 0.30, 0.15]  # (shorter ones after longer: the heap)
    calls = [Call(loop) for _ in timeouts]
    for call, timeout in zip(calls, timeouts, strict=True):
        dl.add(call, timeout)
    await until("every call to expire", lambda: len(expired) == len(calls), 10.0, _EVERY)
    assert [t for _, t, _ in expired] == sorted(timeouts)
    for call, timeout, at in expired:
        assert at >= timeout - 0.002  # (never before it: a timer's grain at most)
        assert call.fut.done()  # type: ignore[union-attr]
    assert len(dl) == 0


def test_finished_calls_never_expire_and_are_dropped() -> None:
    asyncio.run(_test_finished_calls_never_expire_and_are_dropped())


async def _test_finished_calls_never_expire_and_are_dropped() -> None:
    loop = asyncio.get_running_loop()
    expired: list[Call] = []
    dl = Deadlines(loop, lambda calls, timeout: expired.extend(calls))
    stuck = Call(loop)  # never finishes before its deadline: everything after it waits
    dl.add(stuck, 0.2)
    for _ in range(20 * deadlines._COMPACT_AT):
        call = Call(loop)
        dl.add(call, 0.2)
        call.fut.set_result(None)  # type: ignore[union-attr]
        # (finished calls behind an unfinished one are filtered now and then, not kept)
        assert len(dl) <= 2 * deadlines._COMPACT_AT + 1
    short = Call(loop)
    dl.add(short, 0.01)  # (out of order: the heap)
    short.fut.cancel()  # type: ignore[union-attr]  # (its caller gave up)
    await until("the unfinished call to expire", lambda: bool(expired), 10.0, _EVERY)
    assert expired == [stuck]
    assert len(dl) == 0


def test_a_later_earlier_deadline_rearms_the_timer() -> None:
    asyncio.run(_test_a_later_earlier_deadline_rearms_the_timer())


async def _test_a_later_earlier_deadline_rearms_the_timer() -> None:
    loop = asyncio.get_running_loop()
    expired: list[float] = []
    dl = Deadlines(loop, lambda calls, timeout: expired.append(timeout))
    dl.add(Call(loop), 30.0)
    dl.add(Call(loop), 0.05)
    await until("the 50 ms call to expire", lambda: expired == [0.05], 5.0, _EVERY)
    with pytest.raises(AssertionError, match="timed out waiting"):  # (none more expires)
        await until("a second call to expire", lambda: len(expired) > 1, 0.1, _EVERY)


def test_a_failing_group_does_not_keep_the_others_from_expiring() -> None:
    asyncio.run(_test_a_failing_group_does_not_keep_the_others_from_expiring())


async def _test_a_failing_group_does_not_keep_the_others_from_expiring() -> None:
    loop = asyncio.get_running_loop()
    seen: list[float] = []

    def expire(calls: list[Call], timeout: float) -> None:
        seen.append(timeout)
        if len(seen) == 1:
            raise RuntimeError("the first group fails")

    dl = Deadlines(loop, expire)
    dl.add(Call(loop), 0.0101)
    dl.add(Call(loop), 0.01)  # (due in the same firing, another group)
    await until("both groups to expire", lambda: len(seen) == 2, 10.0, _EVERY)


def test_drain_hands_back_the_unfinished_calls_and_forgets_all() -> None:
    asyncio.run(_test_drain_hands_back_the_unfinished_calls_and_forgets_all())


async def _test_drain_hands_back_the_unfinished_calls_and_forgets_all() -> None:
    loop = asyncio.get_running_loop()
    expired: list[Call] = []
    dl = Deadlines(loop, lambda calls, timeout: expired.extend(calls))
    calls = [Call(loop) for _ in range(4)]
    for call, timeout in zip(calls, (0.05, 3600.0, 0.01, 0.05), strict=True):
        dl.add(call, timeout)
    calls[0].fut.set_result(None)  # type: ignore[union-attr]
    assert set(dl.drain()) == set(calls[1:])
    assert len(dl) == 0
    await asyncio.sleep(0.1)
    assert expired == []  # (its timer is gone)
