"""The leader's commit notice (driver._COMMIT_NOTICE_S), on a stand-in of the driver's state:
a heartbeat round takes the commit index to the followers only when no append has carried the
newest commit for that long. Under steady sequential writes the next write's append always
does (counted from the first commit instead, one put in six cost a heartbeat round).
tests/integration/test_follower_freshness.py checks that followers still apply soon."""

from __future__ import annotations

import asyncio
import types

import pytest

from raftfast.server import driver as driver_module
from raftfast.server.driver import Driver

NOTICE_S = 0.2  # (longer than the driver's 2 ms: a loaded machine cannot make it early)


class _Raw:
    def __init__(self) -> None:
        self.heartbeats = 0

    def heartbeat_now(self) -> None:
        self.heartbeats += 1


def _leader(committed_ago: float, proposed_since: bool = False) -> types.SimpleNamespace:
    """What _notify_commit reads of a leader whose newest commit is ``committed_ago`` old."""
    loop = asyncio.get_running_loop()
    node = types.SimpleNamespace(
        _commit_notice=None,
        _proposed_since_notice=proposed_since,
        is_leader=True,
        _stopping=False,
        _committed_at=loop.time() - committed_ago,
        raw=_Raw(),
        _wake=asyncio.Event(),
    )
    node._notify_commit = lambda: Driver._notify_commit(node)
    return node


@pytest.fixture(autouse=True)
def _notice(monkeypatch):
    monkeypatch.setattr(driver_module, "_COMMIT_NOTICE_S", NOTICE_S)


def test_a_commit_younger_than_the_notice_waits_for_the_rest_of_it():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        node = _leader(committed_ago=NOTICE_S / 4)
        node._notify_commit()  # (the timer of an older commit fires)
        assert node.raw.heartbeats == 0
        assert node._commit_notice is not None  # armed again, for the newest commit
        async with asyncio.timeout(30):
            while not node.raw.heartbeats:
                await asyncio.sleep(0.01)
        assert loop.time() >= node._committed_at + NOTICE_S
        assert node.raw.heartbeats == 1 and node._wake.is_set()
        assert node._commit_notice is None

    asyncio.run(main())


def test_an_old_commit_no_append_carried_is_sent_at_once():
    async def main() -> None:
        node = _leader(committed_ago=NOTICE_S * 2)
        node._notify_commit()
        assert node.raw.heartbeats == 1 and node._commit_notice is None

    asyncio.run(main())


def test_an_append_since_the_newest_commit_carried_it():
    async def main() -> None:
        node = _leader(committed_ago=NOTICE_S * 2, proposed_since=True)
        node._notify_commit()
        assert node.raw.heartbeats == 0 and node._commit_notice is None

    asyncio.run(main())
