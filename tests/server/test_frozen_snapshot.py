"""A state machine of the user's with ``frozen()`` is written to its snapshots by the node's
snapshot thread from the frozen object, while the machine goes on applying (without it, its
``snapshot`` runs in the event loop)."""

from __future__ import annotations

import asyncio
import io
import threading
from typing import Any, BinaryIO

import pytest

import raftfast
from raftfast.exactly_once import ExactlyOnce, frame_command
from raftfast.tools.localcluster import free_ports
from tests.server.test_embedded import Counter


class Frozen:
    def __init__(self, value: int, gate: threading.Event, written: list) -> None:
        self.value, self.gate, self.written = value, gate, written

    def snapshot(self, out: BinaryIO) -> None:
        assert self.gate.wait(30)  # (held: the machine must go on meanwhile)
        out.write(str(self.value).encode())
        self.written.append((self.value, threading.current_thread() is threading.main_thread()))


class Ledger(Counter):
    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.written: list[tuple[int, bool]] = []
        self.frozen_at: list[int] = []

    def snapshot(self, out: BinaryIO) -> None:
        raise AssertionError("frozen() is there: snapshot is not called in the loop")

    def frozen(self) -> Frozen:
        self.frozen_at.append(self.value)
        return Frozen(self.value, self.gate, self.written)


def test_a_frozen_state_is_written_in_the_snapshot_thread_while_applies_go_on(tmp_path):
    [port] = free_ports(1)
    ledger = Ledger()

    def solo(machine: Ledger) -> raftfast.Node:
        return raftfast.Node(
            id="solo", listen=f"127.0.0.1:{port}", data_dir=str(tmp_path / "solo"),
            state_machine=machine, tick_ms=20, snapshot_entries=20,
        )  # fmt: skip

    async def main() -> None:
        async with solo(ledger) as node:
            await node.wait_for_leader()
            async with asyncio.timeout(20):
                while not ledger.frozen_at:
                    await node.propose(b"1")
                frozen_at = ledger.frozen_at[0]
                for _ in range(30):  # (applied while the snapshot is being written)
                    await node.propose(b"1")
            assert ledger.value >= frozen_at + 30 and not ledger.written
            ledger.gate.set()
            async with asyncio.timeout(20):
                while not ledger.written:
                    await asyncio.sleep(0.01)
            assert ledger.written[0] == (frozen_at, False)
        restarted = Ledger()
        restarted.gate.set()
        async with solo(restarted) as node:
            await node.wait_for_leader()
            assert await node.query(b"") == str(ledger.value).encode()

    asyncio.run(asyncio.wait_for(main(), 60))


class Tally(Counter):
    """A machine whose ``snapshot`` works, with a ``frozen`` of the test's choosing."""

    def __init__(self, frozen: Any = None) -> None:
        super().__init__()
        if frozen is not None:
            self.frozen = frozen  # (an attribute of another meaning, or a callable)


class Counts(Tally):
    def frozen(self) -> bool:  # (a method of the same name and another meaning)
        return False


class Fails(Tally):
    def frozen(self) -> object:
        raise RuntimeError("cannot freeze")


@pytest.mark.parametrize(
    "machine",
    [Tally(frozen=set()), Tally(frozen=False), Counts(), Fails()],
    ids=["attribute", "flag", "method-of-a-flag", "raises"],
)
def test_a_machine_whose_frozen_is_not_the_hook_still_snapshots_or_refuses(tmp_path, machine):
    """Before the hook, a machine's own ``frozen`` was never called; one of another meaning
    (an attribute, a method returning a flag) is left alone: the snapshot is taken in the loop.
    A ``frozen`` that raises is a snapshot refused, the node goes on (it had stopped every
    node, at the same index, again after each restart)."""
    [port] = free_ports(1)

    async def main() -> None:
        node = raftfast.Node(
            id="solo", listen=f"127.0.0.1:{port}", data_dir=str(tmp_path / "solo"),
            state_machine=machine, tick_ms=20, snapshot_entries=10,
        )  # fmt: skip
        async with node:
            await node.wait_for_leader()
            metrics = node._driver.metrics
            async with asyncio.timeout(20):
                while not (node._driver._snapshot_index or metrics.snapshots_refused):
                    await node.propose(b"1")
            if isinstance(machine, Fails):
                assert metrics.snapshots_refused and not node._driver._snapshot_index
            else:
                assert node._driver._snapshot_index and not metrics.snapshots_refused
            assert node._driver.failed is None
            assert await node.propose(b"1") == str(machine.value).encode()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_frozen_table_of_clients_is_the_table_as_of_then():
    """The exactly-once table around a user's frozen state is frozen with it: what the
    snapshot thread writes is what ``snapshot`` wrote at that moment, whatever is applied
    after (clients new and forgotten, windows moving, a duplicate)."""

    class Copied(Tally):
        def frozen(self) -> Tally:
            twin = Tally()
            twin.value = self.value
            return twin

    machine = ExactlyOnce(Copied(), window=4, max_clients=3)
    index = 0

    def apply(client: int, seq: int) -> None:
        nonlocal index
        index += 1
        machine.apply(index, frame_command(client, seq, b"1"))

    for client, seq in [(1, 1), (2, 1), (1, 2), (3, 1), (1, 3)]:
        apply(client, seq)
    then = io.BytesIO()
    machine.snapshot(then)
    frozen = machine.frozen()
    for client, seq in [(1, 4), (4, 1), (2, 2), (1, 4), (5, 1), (1, 9), (3, 2)]:
        apply(client, seq)
    written = io.BytesIO()
    frozen.snapshot(written)
    assert written.getvalue() == then.getvalue()
    now = io.BytesIO()
    machine.snapshot(now)
    assert now.getvalue() != then.getvalue()
