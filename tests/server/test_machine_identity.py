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
        "this cluster runs tests.server.test_embedded:Counter, it runs "
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
    assert mismatch(ours, identity_of(other)) == "it has no object named 'counter'"
    more = raftfast.Objects(
        counter=raftfast.ReplCounter(), lock=raftfast.ReplLock(), x=raftfast.ReplDict()
    )
    assert mismatch(ours, identity_of(more)) == (
        "it has an object named 'x', which this cluster has not"
    )
    swapped = raftfast.Objects(counter=raftfast.ReplDict(), lock=raftfast.ReplLock())
    assert "its object 'counter' is a raftfast.objects.batteries:ReplDict" in mismatch(
        ours, identity_of(swapped)
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
    assert why == "it described its state machine in a form this node cannot read"


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
                "'n2' does not serve this cluster's state machine: it has an object named "
                "'counter', which this cluster has not"
            ) in why
            assert [m["id"] for m in (await cluster.status())["members"]] == ["n1"]

    asyncio.run(asyncio.wait_for(main(), 120))


def test_another_modules_class_of_the_same_name_cannot_join(tmp_path):
    async def main() -> None:
        cluster = _one(tmp_path, test_embedded.Counter())
        async with started([cluster]), contextlib.AsyncExitStack() as stack:
            joiner = await _join(tmp_path, cluster, Counter())
            stack.push_async_callback(joiner.stop)
            why = await _refused(joiner)
            assert "this cluster runs tests.server.test_embedded:Counter, it runs" in why

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
