"""Peers keep their cluster going while a client holds every call a port takes.

Where peers share the client port (the default without TLS), the port's cap of calls under
way (MAX_CONCURRENT_RPCS) counts theirs too: a client holding that many calls open made every
vote request (a unary RPC) RESOURCE_EXHAUSTED, so a leader that left was never replaced, and a
node that restarted could not ask its peers where their stream port is, so its answers never
reached the leader. Votes now go on the peer streams already open, and a node learns where a
peer takes streams from the first frame of that peer's stream to it."""

from __future__ import annotations

import asyncio

import raftfast
from raftfast.server import driver
from tests.server.test_embedded import Counter, three
from tests.unread_calls import UnreadCalls

RESOURCE_EXHAUSTED = "8"
GET = "/raftfast.v1.KV/Get"
CAP = 40


async def _until(what, seconds: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while not await what():
        assert loop.time() < until, f"not within {seconds:g}s: {what.__doc__}"
        await asyncio.sleep(0.05)


async def _hold_every_call(port: int) -> UnreadCalls:
    """Calls (headers only: the request never comes) until the port refuses more."""
    raw = await asyncio.to_thread(UnreadCalls, port)
    for _ in range(CAP + 4):
        await asyncio.to_thread(raw.open, GET, None)
    loop = asyncio.get_running_loop()
    until = loop.time() + 10
    while len(raw.status) < 4 and loop.time() < until:
        await asyncio.to_thread(raw.pump, 0.1)
    # (4 refused at least: a peer's call under way at that moment counts too)
    assert len(raw.status) >= 4 and set(raw.status.values()) == {RESOURCE_EXHAUSTED}, raw.status
    return raw


def _port(node: raftfast.Node) -> int:
    return int(node.settings.listen.rsplit(":", 1)[1])


def test_peers_elect_and_catch_up_while_a_client_holds_every_call(tmp_path, monkeypatch):
    monkeypatch.setattr(driver, "MAX_CONCURRENT_RPCS", CAP)

    async def main() -> None:
        nodes = three(tmp_path)
        held: list[UnreadCalls] = []
        restarted = None
        try:
            for node in nodes:
                await node.start()
            old_id = await nodes[0].wait_for_leader()
            old = next(n for n in nodes if n.id == old_id)
            assert await old.propose(b"1") == b"1"

            async def streams_up() -> bool:
                """every node streams to both others"""
                return all(not n._running().transport.unreachable() for n in nodes)

            await _until(streams_up)
            for node in nodes:
                held.append(await _hold_every_call(_port(node)))

            await old.stop()
            rest = [n for n in nodes if n is not old]

            async def new_leader() -> bool:
                """the two left elect a leader (their votes refused as RPCs)"""
                return all(n.leader not in (None, old_id) for n in rest)

            await _until(new_leader)
            leader = next(n for n in rest if n.is_leader)
            assert await leader.propose(b"2") == b"3"

            # The old leader comes back (on the same port; the client's calls there are gone
            # with its process) while the others still refuse every call.
            restarted = raftfast.Node(
                id=old.id, listen=old.settings.listen, peers=dict(old.settings.peers),
                data_dir=old.settings.data_dir, state_machine=Counter(), tick_ms=20,
            )  # fmt: skip
            await restarted.start()
            assert await leader.propose(b"3") == b"6"

            async def caught_up() -> bool:
                """the restarted node applied what the leader committed"""
                return restarted.state_machine.value == 6

            await _until(caught_up)
        finally:
            for raw in held:
                await asyncio.to_thread(raw.close)
            for node in [*nodes, *([restarted] if restarted else [])]:
                await node.stop()

    asyncio.run(main())
