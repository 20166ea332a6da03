"""A state machine of the user's with ``frozen()`` is written to its snapshots by the node's
snapshot thread from the frozen object, while the machine goes on applying (without it, its
``snapshot`` runs in the event loop)."""

from __future__ import annotations

import asyncio
import threading
from typing import BinaryIO

import raftfast
from raftfast.tools.localcluster import free_ports


class Frozen:
    def __init__(self, value: int, gate: threading.Event, written: list) -> None:
        self.value, self.gate, self.written = value, gate, written

    def snapshot(self, out: BinaryIO) -> None:
        assert self.gate.wait(30)  # (held: the machine must go on meanwhile)
        out.write(str(self.value).encode())
        self.written.append((self.value, threading.current_thread() is threading.main_thread()))


class Ledger(raftfast.StateMachine):
    def __init__(self) -> None:
        self.value = 0
        self.gate = threading.Event()
        self.written: list[tuple[int, bool]] = []
        self.frozen_at: list[int] = []

    def apply(self, index: int, command: bytes) -> bytes:
        self.value += int(command)
        return str(self.value).encode()

    def query(self, request: bytes) -> bytes:
        return str(self.value).encode()

    def snapshot(self, out: BinaryIO) -> None:
        raise AssertionError("frozen() is there: snapshot is not called in the loop")

    def restore(self, inp: BinaryIO) -> None:
        self.value = int(inp.read())

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
