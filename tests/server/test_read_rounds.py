"""Linearizable reads confirm the leadership one heartbeat round at a time (driver._feed):
reads that come while a round is under way wait and go together in the next one, instead of a
round each. A round whose heartbeats were lost is confirmed by the ticks' heartbeats, which
carry its number, so the reads behind it do not hang. Here the leader's outgoing heartbeats are
held back (or dropped) for as long as the test likes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

import raftfast
from raftfast.core.types import MsgType
from raftfast.errors import NotLeaderError
from raftfast.kv.fsm import KVStateMachine
from raftfast.server import lease
from tests.polling import until
from tests.server import in_process

READS = 20


def _run(tmp_path, test: Callable[[dict[str, raftfast.Node], raftfast.Node], Awaitable[None]]):
    """``test(nodes, leader)`` on 3 in-process nodes whose leader has read once (its no-op
    committed); every node stopped afterwards."""

    async def main() -> None:
        peers = in_process.peers(3)
        # (a long election timeout: heartbeats held back here must not depose the leader)
        nodes = {
            nid: in_process.node(nid, peers, tmp_path, KVStateMachine(), election_ticks=100)
            for nid in peers
        }
        try:
            for node in nodes.values():
                await node.start()
            leader = nodes[await nodes["n1"].wait_for_leader(timeout=30)]
            await asyncio.wait_for(leader._driver.read_barrier("linearizable"), 30)
            await test(nodes, leader)
        finally:
            for node in nodes.values():
                await node.stop()

    asyncio.run(main())


def _filter_heartbeats(
    driver, keep: Callable[[object], bool], kind: MsgType = MsgType.HEARTBEAT
) -> list:
    """Route the node's outgoing messages through ``keep``: those of ``kind`` it refuses are
    set aside (returned list), everything else goes out as before."""
    send = driver.transport.send
    held: list = []

    def filtered(messages) -> None:
        out = []
        for m in messages:
            if m.type == kind and not keep(m):
                held.append(m)
            else:
                out.append(m)
        if out:
            send(out)

    driver.transport.send = filtered
    driver.transport.send_unfiltered = send
    return held


def test_reads_that_come_during_a_round_go_together_in_the_next(tmp_path):
    async def test(nodes: dict[str, raftfast.Node], leader: raftfast.Node) -> None:
        driver = leader._driver
        rounds0, reads0 = driver.metrics.read_rounds, driver.metrics.reads
        holding = True
        held = _filter_heartbeats(driver, lambda m: not holding)
        first = asyncio.ensure_future(driver.read_barrier("linearizable"))
        await until("the first read's heartbeats", lambda: held, timeout=10)
        later = []
        for _ in range(READS):  # (each in a turn of the loop of its own)
            later.append(asyncio.ensure_future(driver.read_barrier("linearizable")))
            await asyncio.sleep(0.005)
        assert not first.done() and not any(f.done() for f in later)
        # Only the first read's round is under way: the others wait for the next.
        assert driver.metrics.read_rounds == rounds0 + 1
        holding = False
        driver.transport.send_unfiltered(held)
        await asyncio.wait_for(asyncio.gather(first, *later), 10)
        assert driver.metrics.reads == reads0 + 1 + READS
        assert driver.metrics.read_rounds == rounds0 + 2, "the later reads share one round"

    _run(tmp_path, test)


def test_reads_behind_a_round_whose_heartbeats_were_lost_still_finish(tmp_path):
    async def test(nodes: dict[str, raftfast.Node], leader: raftfast.Node) -> None:
        driver = leader._driver
        dropping = True
        dropped = _filter_heartbeats(driver, lambda m: not dropping)
        first = asyncio.ensure_future(driver.read_barrier("linearizable"))
        await until("the first read's heartbeats", lambda: dropped, timeout=10)
        later = [asyncio.ensure_future(driver.read_barrier("linearizable")) for _ in range(5)]
        # (the heartbeats of two ticks after it lost too: 2 followers, 2 messages each)
        await until("ticks' heartbeats dropped", lambda: len(dropped) >= 6, timeout=10)
        assert not first.done() and not any(f.done() for f in later)
        dropping = False  # (the lost ones stay lost: the next tick's heartbeats confirm)
        await asyncio.wait_for(asyncio.gather(first, *later), 10)

    _run(tmp_path, test)


def test_reads_behind_a_round_fail_at_once_when_the_leader_steps_down(tmp_path):
    async def test(nodes: dict[str, raftfast.Node], leader: raftfast.Node) -> None:
        driver = leader._driver
        dropped = _filter_heartbeats(driver, lambda m: False)  # (the round never confirms)
        first = asyncio.ensure_future(driver.read_barrier("linearizable"))
        await until("the first read's heartbeats", lambda: dropped, timeout=10)
        later = [asyncio.ensure_future(driver.read_barrier("linearizable")) for _ in range(5)]
        await until("the later reads queued", lambda: len(driver._read_requests) == 5)
        other = next(nid for nid in nodes if nodes[nid] is not leader)
        await driver.transfer_leadership(other)  # (its messages are no heartbeats)
        for fut in [first, *later]:
            with pytest.raises(NotLeaderError):
                await asyncio.wait_for(fut, 10)  # (at once: not at a deadline)
        new = nodes[other]._driver
        await asyncio.wait_for(new.read_barrier("linearizable"), 10)  # (the new leader's)

    _run(tmp_path, test)


def test_a_lease_read_past_the_lease_waits_for_a_round_as_after_a_pause(tmp_path, monkeypatch):
    """A leader whose process was paused (no tick counted meanwhile) past its lease answers
    no lease read from its own state: a newer leader may have moved on (a paused leader
    answered hundreds of stale lease reads, with the gRPC peer stream, before the fix)."""
    clock = [lease.now()]
    monkeypatch.setattr(lease, "now", lambda: clock[0])

    async def test(nodes: dict[str, raftfast.Node], leader: raftfast.Node) -> None:
        driver = leader._driver
        await asyncio.wait_for(driver.read_barrier("lease"), 10)  # (a round: the lease)
        rounds = driver.metrics.read_rounds
        for _ in range(5):
            await asyncio.wait_for(driver.read_barrier("lease"), 10)
        assert driver.metrics.read_rounds == rounds, "within the lease: no round"
        clock[0] += driver._lease.seconds + 0.001  # (the process stood still that long)
        holding = True
        held = _filter_heartbeats(driver, lambda m: not holding)
        read = asyncio.ensure_future(driver.read_barrier("lease"))
        await until("the lease read's heartbeats", lambda: held, timeout=10)
        for _ in range(20):
            await asyncio.sleep(0)
        assert not read.done(), "answered from its own state past its lease"
        holding = False
        driver.transport.send_unfiltered(held)
        await asyncio.wait_for(read, 10)
        assert driver.metrics.read_rounds == rounds + 1
        await asyncio.wait_for(driver.read_barrier("lease"), 10)
        assert driver.metrics.read_rounds == rounds + 1, "the round renewed the lease"

    _run(tmp_path, test)


def test_a_new_leader_answers_lease_reads_once_its_no_op_committed(tmp_path):
    """Until then its commit index may lag the cluster's (it learns the old leader's from the
    next append): writes acknowledged before a transfer went missing from its lease reads."""

    async def test(nodes: dict[str, raftfast.Node], leader: raftfast.Node) -> None:
        await asyncio.wait_for(leader._driver.read_barrier("lease"), 10)  # (its lease)
        new = next(node for node in nodes.values() if node is not leader)
        holding = True
        held = _filter_heartbeats(new._driver, lambda m: not holding, MsgType.APPEND)
        await asyncio.wait_for(leader._driver.transfer_leadership(new.id), 10)
        await until("the new leader's no-op", lambda: held, timeout=10)
        read = asyncio.ensure_future(new._driver.read_barrier("lease"))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not read.done(), "answered before its no-op committed"
        with pytest.raises(NotLeaderError):  # (the old leader's lease ended with its term)
            await asyncio.wait_for(leader._driver.read_barrier("lease"), 10)
        holding = False
        new._driver.transport.send_unfiltered(held)
        await asyncio.wait_for(read, 10)
        assert new._driver.applied_index >= new._driver.raw.commit_index

    _run(tmp_path, test)


def test_a_transfer_ends_the_lease_for_the_rest_of_the_term(tmp_path):
    """The target's forced vote is not held back by the followers' lease: from the transfer
    on, the leader's lease reads take a round, even once the transfer has failed."""

    async def test(nodes: dict[str, raftfast.Node], leader: raftfast.Node) -> None:
        driver = leader._driver
        await asyncio.wait_for(driver.read_barrier("lease"), 10)
        rounds = driver.metrics.read_rounds
        target = next(nid for nid in nodes if nodes[nid] is not leader)
        # (its TimeoutNow never goes out: the transfer stays under way, then fails)
        _filter_heartbeats(driver, lambda m: False, MsgType.TIMEOUT_NOW)
        transfer = asyncio.ensure_future(driver.transfer_leadership(target))
        await until("the transfer under way", lambda: driver.raw.transferee == target)
        await asyncio.wait_for(driver.read_barrier("lease"), 10)
        assert driver.metrics.read_rounds == rounds + 1, "a lease read during the transfer"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(transfer, 30)
        assert driver.is_leader and not driver.raw.transferee
        for _ in range(2):
            await asyncio.wait_for(driver.read_barrier("lease"), 10)
        assert driver.metrics.read_rounds == rounds + 3, "no lease again in this term"

    _run(tmp_path, test)
