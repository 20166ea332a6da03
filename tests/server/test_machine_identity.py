"""A node that serves another state machine cannot join (raftfast.server.machine_identity): the
class's name alone let in another module's class of that name, and every ``Objects``
(``Objects(counter=...)`` joined ``Objects(scores=...)``, led, and refused every command; a
state machine user's hunt)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

import raftfast
from raftfast.server.machine_identity import MAX_IDENTITY_CHARS, identity_of, mismatch
from raftfast.tools.localcluster import free_ports
from tests.server import test_embedded
from tests.server.test_embedded import started


class Counter(test_embedded.Counter):
    """Another module's class of the same name as test_embedded's."""


def _as_if_in(module: str, machine: object) -> str:
    """``machine``'s identity, as though its class were defined in ``module``."""
    kind = type(machine)
    twin = type(kind.__name__, (kind,), {"__module__": module, "__qualname__": kind.__qualname__})
    return identity_of(twin())


def test_the_same_class_matches_and_another_modules_class_of_that_name_does_not() -> None:
    ours = identity_of(test_embedded.Counter())
    assert mismatch(ours, identity_of(test_embedded.Counter())) is None
    why = mismatch(ours, identity_of(Counter()))
    assert why == (
        "ours is tests.server.test_embedded:Counter, theirs is "
        "tests.server.test_machine_identity:Counter"
    )


def test_a_class_of_main_matches_the_same_class_imported() -> None:
    # (one program, started as a script on one node and imported on another)
    ours = identity_of(test_embedded.Counter())
    assert mismatch(ours, _as_if_in("__main__", test_embedded.Counter())) is None
    assert mismatch(_as_if_in("__main__", test_embedded.Counter()), ours) is None


def test_objects_match_by_their_names_and_classes() -> None:
    ours = identity_of(raftfast.Objects(counter=raftfast.ReplCounter(), lock=raftfast.ReplLock()))
    same = raftfast.Objects(lock=raftfast.ReplLock(), counter=raftfast.ReplCounter())
    assert mismatch(ours, identity_of(same)) is None
    other = raftfast.Objects(scores=raftfast.ReplCounter(), lock=raftfast.ReplLock())
    assert mismatch(ours, identity_of(other)) == "theirs has no object named 'counter', ours has"
    more = raftfast.Objects(
        counter=raftfast.ReplCounter(), lock=raftfast.ReplLock(), x=raftfast.ReplDict()
    )
    assert mismatch(ours, identity_of(more)) == "theirs has an object named 'x', ours has not"
    assert mismatch(identity_of(more), ours, added_ok=True) is None  # (a restart may add)
    swapped = raftfast.Objects(counter=raftfast.ReplDict(), lock=raftfast.ReplLock())
    assert mismatch(ours, identity_of(swapped)) == (
        "object 'counter' is a raftfast.objects.batteries:ReplCounter in ours, a "
        "raftfast.objects.batteries:ReplDict in theirs"
    )


@pytest.mark.parametrize(
    "theirs",
    [
        "",
        "kv",
        "x" * (MAX_IDENTITY_CHARS + 1),
        "[" * 100_000,
        '{"class": ["m", "C"], "objects": {"a": [1, 2]}}',
        '{"class": "m:C"}',
        '{"class": ["m", "C", "D"]}',
        "null",
    ],
)
def test_an_identity_that_cannot_be_read_does_not_match(theirs: str) -> None:
    why = mismatch(identity_of(test_embedded.Counter()), theirs)
    assert why == "theirs is described in a form this node cannot read"


async def _join(tmp_path, cluster: raftfast.Node, machine: object) -> raftfast.Node:
    """A node serving ``machine`` that joins ``cluster``, started (or failed to)."""
    [port] = free_ports(1)
    joiner = raftfast.Node(
        id="n2", listen=f"127.0.0.1:{port}", data_dir=str(tmp_path / "n2"),
        state_machine=machine, join=cluster.settings.listen, tick_ms=20, timeout=30,
    )  # fmt: skip
    await joiner.start()
    return joiner


def _one(tmp_path, machine: object) -> raftfast.Node:
    [port] = free_ports(1)
    address = f"127.0.0.1:{port}"
    return raftfast.Node(
        id="n1", listen=address, peers={"n1": address}, data_dir=str(tmp_path / "n1"),
        state_machine=machine, tick_ms=20, timeout=30,
    )  # fmt: skip


async def _refused(joiner: raftfast.Node) -> str:
    deadline = asyncio.get_running_loop().time() + 60
    while joiner._driver.failed is None:
        assert asyncio.get_running_loop().time() < deadline, "the join went on"
        await asyncio.sleep(0.05)
    return str(joiner._driver.failed)


def test_objects_with_other_objects_cannot_join(tmp_path):
    async def main() -> None:
        cluster = _one(tmp_path, raftfast.Objects(scores=raftfast.ReplCounter()))
        async with started([cluster]), contextlib.AsyncExitStack() as stack:
            joiner = await _join(
                tmp_path, cluster, raftfast.Objects(counter=raftfast.ReplCounter())
            )
            stack.push_async_callback(joiner.stop)
            why = await _refused(joiner)
            assert (
                "'n2''s has an object named 'counter', this cluster's state machine has not" in why
            )
            assert [m["id"] for m in (await cluster.status())["members"]] == ["n1"]

    asyncio.run(asyncio.wait_for(main(), 120))


def test_another_modules_class_of_the_same_name_cannot_join(tmp_path):
    async def main() -> None:
        cluster = _one(tmp_path, test_embedded.Counter())
        async with started([cluster]), contextlib.AsyncExitStack() as stack:
            joiner = await _join(tmp_path, cluster, Counter())
            stack.push_async_callback(joiner.stop)
            why = await _refused(joiner)
            assert "this cluster's state machine is tests.server.test_embedded:Counter, " in why
            assert "'n2''s is tests.server.test_machine_identity:Counter" in why

    asyncio.run(asyncio.wait_for(main(), 120))


def test_the_same_objects_join(tmp_path):
    async def main() -> None:
        cluster = _one(tmp_path, raftfast.Objects(scores=raftfast.ReplCounter()))
        async with started([cluster]), contextlib.AsyncExitStack() as stack:
            counter = raftfast.ReplCounter()
            joiner = await _join(tmp_path, cluster, raftfast.Objects(scores=counter))
            stack.push_async_callback(joiner.stop)
            deadline = asyncio.get_running_loop().time() + 60
            while len((await cluster.status())["members"]) < 2:
                assert joiner._driver.failed is None, joiner._driver.failed
                assert asyncio.get_running_loop().time() < deadline, "not joined"
                await asyncio.sleep(0.05)

    asyncio.run(asyncio.wait_for(main(), 120))


def _restarted(tmp_path, machine: object, node_id: str = "n1") -> raftfast.Node:
    """A one-node cluster's node on ``tmp_path``'s n1 directory, under ``node_id``."""
    [port] = free_ports(1)
    address = f"127.0.0.1:{port}"
    return raftfast.Node(
        id=node_id, listen=address, peers={node_id: address}, data_dir=str(tmp_path / "n1"),
        state_machine=machine, tick_ms=20, timeout=30,
    )  # fmt: skip


def test_a_data_directory_keeps_its_nodes_identity(tmp_path):
    # (an embedded node stored none: data directories swapped between members both started,
    # and an Objects whose object was renamed started empty, its state dropped by the next
    # snapshot)
    async def main() -> None:
        counter = raftfast.ReplCounter()
        async with started([_restarted(tmp_path, raftfast.Objects(counter=counter))]):
            assert await counter.add(5) == 5
        for node, refusal in [
            (_restarted(tmp_path, raftfast.Objects(counter=raftfast.ReplCounter()), "n3"),
             "holds the data of a node whose id is 'n1', not 'n3'"),
            (_restarted(tmp_path, raftfast.Objects(count=raftfast.ReplCounter())),
             "the one it holds has an object named 'counter', the state machine given has not"),
            (_restarted(tmp_path, test_embedded.Counter()),
             "the state machine given is tests.server.test_embedded:Counter, the one it holds"),
        ]:  # fmt: skip
            with pytest.raises(raftfast.RaftfastError, match=refusal):
                await node.start()
            await node.stop()
        again, more = raftfast.ReplCounter(), raftfast.ReplCounter()
        async with started([_restarted(tmp_path, raftfast.Objects(counter=again, more=more))]):
            assert await again.get() == 5  # (an object added: the state kept)
            assert await more.add(1) == 1

    asyncio.run(asyncio.wait_for(main(), 120))


def test_a_restart_without_peers_takes_the_stored_ones(tmp_path):
    # (it came back as a cluster of one, heard the leader, could not answer it, and never
    # caught up: every call waited out its timeout)
    async def main() -> None:
        nodes = test_embedded.three(tmp_path, timeout=30)
        async with started(nodes) as leader:
            by_id = {node.id: node for node in nodes}
            follower = next(node for node in nodes if node.id != leader)
            await follower.stop()
            assert int(await by_id[leader].propose(b"7")) == 7
            again = raftfast.Node(
                id=follower.id, listen=follower.settings.listen, peers=None,
                data_dir=follower.settings.data_dir, state_machine=test_embedded.Counter(),
                tick_ms=20, timeout=30,
            )  # fmt: skip
            try:
                await again.start()
                assert again.settings.peers == follower.settings.peers
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 60
                while int(await again.query(b"", mode="stale")) != 7:
                    assert loop.time() < deadline, "the restarted node did not catch up"
                    await asyncio.sleep(0.05)
            finally:
                await again.stop()

    asyncio.run(asyncio.wait_for(main(), 120))
