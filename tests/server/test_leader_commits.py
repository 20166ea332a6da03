"""What a leader does with a commit, on a stand-in of the driver's state (the logic alone; the
integration and chaos suites run it for real).

* Acknowledgements that commit entries while the leader waits for work are applied (and their
  writes answered) in the callback that delivered them, before any Ready.
* The commit notice (driver._COMMIT_NOTICE_S): a heartbeat round takes the commit index to the
  followers only when no append has carried the newest commit for that long. Under steady
  sequential writes the next write's append always does, so no heartbeat round goes out per
  write (counted from the first commit instead, every other put cost one).
  tests/integration/test_follower_freshness.py checks that followers still apply soon.
"""

from __future__ import annotations

import asyncio
import types

import pytest

from raftfast.core.types import Message, MsgType, Role
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


class _LeaderCore:
    """The core's side of _deliver and _take_committed: stepping an acknowledgement commits."""

    def __init__(self, syncing_ready: bool) -> None:
        self.role = Role.LEADER
        self.ready_outstanding = syncing_ready
        self.committed: object | None = None
        self.stepped: list[Message] = []

    def step(self, m: Message) -> None:
        self.stepped.append(m)
        self.committed = ("entries", m.index)

    def take_eager_messages(self) -> list:
        return []

    def take_committed(self) -> object | None:
        out, self.committed = self.committed, None
        return out


def _delivering_leader(syncing: bool) -> types.SimpleNamespace:
    node = types.SimpleNamespace(
        id="n1",
        _stopping=False,
        failed=None,
        _syncing=syncing,
        _pump_scheduled=False,
        raw=_LeaderCore(syncing_ready=syncing),
        _wake=asyncio.Event(),
        applied=[],
        transport=None,
    )
    node._apply_committed = node.applied.append
    node._release_reads = lambda: None
    node._take_committed = lambda: Driver._take_committed(node)
    node._pump = lambda: Driver._pump(node)
    node._schedule_pump = lambda: Driver._schedule_pump(node)
    return node


def _ack(index: int) -> Message:
    return Message(MsgType.APPEND_RESP, "n2", "n1", 1, index, 0, b"", 0, False, 0, 0)


def test_an_acknowledgement_to_a_waiting_leader_is_applied_before_any_ready():
    async def main() -> None:
        node = _delivering_leader(syncing=False)
        Driver._deliver(node, [_ack(7)])
        assert node.applied == [("entries", 7)]  # (in the delivering callback itself)
        assert not node._wake.is_set()  # (its Ready, the new commit index, comes after)
        async with asyncio.timeout(30):
            await node._wake.wait()

    asyncio.run(main())


def test_while_the_leaders_own_write_syncs_acknowledgements_are_pumped_once_a_turn():
    async def main() -> None:
        node = _delivering_leader(syncing=True)
        Driver._deliver(node, [_ack(7)])
        Driver._deliver(node, [_ack(8)])
        assert node.applied == [] and node._wake.is_set()
        await asyncio.sleep(0)  # (one turn of the loop)
        assert node.applied == [("entries", 8)]  # (both acknowledgements' commits at once)

    asyncio.run(main())
