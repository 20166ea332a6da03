"""What a user's state machine and objects may do, found by a PySyncObj user's hunt: keep one
record in two indexes (a snapshot keeps it one), raise any exception from a command (the
command's error, never a node's), return the wrong number of results from ``apply_batch``,
mark an ``async def`` replicated, return text that is not UTF-8; and what a user may do with
the embeddable node: give a stopped node's state machine to a new one, propose str, propose
thousands at once from a follower, get a result over 4 MiB through a follower."""

from __future__ import annotations

import asyncio
import io
import socket
from typing import BinaryIO

import pytest

import raftfast
from raftfast.errors import CommandError, RaftfastError
from raftfast.exactly_once import ExactlyOnce, frame_command
from raftfast.objects.codec import MAX_STATE_DEPTH, decode, encode
from raftfast.server import embedded
from raftfast.server.embedded import _Sequences
from raftfast.server.machine_service import as_result_bytes
from tests.server.test_embedded import Counter, _one_settings, three


class Accounts:
    """One record reached from two indexes, as PySyncObj users write them (pickle kept the
    two one)."""

    def __init__(self) -> None:
        self.by_id: dict = {}
        self.by_name: dict = {}

    @raftfast.replicated
    def open(self, number: int, name: str) -> None:
        record = {"name": name, "balance": 0}
        self.by_id[number] = record
        self.by_name[name] = record

    @raftfast.replicated
    def deposit(self, number: int, amount: int) -> int:
        self.by_id[number]["balance"] += amount
        return self.by_id[number]["balance"]

    @raftfast.readonly
    def balance_of(self, name: str) -> int:
        return self.by_name[name]["balance"]


def _apply(objects: raftfast.Objects, index: int, *call: object) -> object:
    return objects.apply(index, encode(list(call)))


def test_a_snapshot_keeps_shared_references() -> None:
    accounts = Accounts()
    objects = raftfast.Objects(accounts)
    _apply(objects, 1, "Accounts", "open", [7, "ann"], {})
    assert decode(_apply(objects, 2, "Accounts", "deposit", [7, 80], {})) == 80
    out = io.BytesIO()
    objects.snapshot(out)
    copy = Accounts()
    restored = raftfast.Objects(copy)
    restored.restore(io.BytesIO(out.getvalue()))
    assert copy.by_id[7] is copy.by_name["ann"]
    for machine in (objects, restored):  # (the next command, alike on both)
        assert decode(_apply(machine, 3, "Accounts", "deposit", [7, 23], {})) == 103
        assert decode(machine.query(encode(["Accounts", "balance_of", ["ann"], {}]))) == 103


def test_the_codec_keeps_references_and_cycles_in_a_snapshot_only() -> None:
    shared, items, text = {1, 2}, bytearray(b"x"), "not a container"
    cycle: list = []
    cycle.append(cycle)
    state = {"a": shared, "b": shared, "c": [items, items], "cycle": cycle, "t": (text, text)}
    data = encode(state, exact=True, max_depth=MAX_STATE_DEPTH)
    back = decode(data, max_depth=MAX_STATE_DEPTH, references=True)
    assert back["a"] is back["b"] and back["a"] == {1, 2}
    assert back["c"][0] is back["c"][1] and back["cycle"][0] is back["cycle"]
    # what a client sends never holds references: refused, as any unknown tag
    for limited in (True, False):
        with pytest.raises(ValueError, match="unknown tag"):
            decode(data, limited=limited)
    with pytest.raises(ValueError, match="a reference to container 5 of 1"):
        decode(b"l\x01r\x05", references=True)
    with pytest.raises(TypeError, match="deeper"):
        encode(cycle)  # (a command or a result: no references, so a cycle has no end)


class Raises(raftfast.StateMachine):
    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def apply(self, index: int, command: bytes) -> bytes:
        if command == b"cancel":
            raise asyncio.CancelledError()  # (stopped every node's applying, silently)
        if command == b"base":
            raise GeneratorExit()
        self.seen.append(command)
        return command


class Cancels:
    @raftfast.replicated
    def stop_it(self) -> None:
        raise asyncio.CancelledError()


def test_any_exception_a_command_raises_is_its_error_only(caplog) -> None:
    inner = Raises()
    machine = ExactlyOnce(inner)
    commands = [b"a", b"cancel", b"base", b"b"]
    results = machine.apply_batch(1, [frame_command(7, i + 1, c) for i, c in enumerate(commands)])
    assert results[0] == b"a" and results[3] == b"b" and inner.seen == [b"a", b"b"]
    assert isinstance(results[1], asyncio.CancelledError)
    assert isinstance(results[2], GeneratorExit)
    assert isinstance(machine.apply(5, frame_command(7, 5, b"cancel")), asyncio.CancelledError)
    objects = raftfast.Objects(Cancels())
    assert isinstance(_apply(objects, 1, "Cancels", "stop_it", [], {}), asyncio.CancelledError)

    class Interrupted(Raises):
        def apply(self, index: int, command: bytes) -> bytes:
            raise KeyboardInterrupt  # (a signal to this process, not the command's doing)

    with pytest.raises(KeyboardInterrupt):
        ExactlyOnce(Interrupted()).apply_batch(1, [frame_command(7, 1, b"x")])
    # (the node stops, and says why: every node stopped at that entry, at every start, silently)
    assert "KeyboardInterrupt while the state machine applied entry 1" in caplog.text


def test_an_apply_batch_that_returns_another_count_says_so() -> None:
    class Short(Raises):
        def apply_batch(self, first_index: int, commands: list) -> list:
            return [b"ok"] * (len(commands) - 1)

    with pytest.raises(TypeError, match="returned 1 results for 2 commands"):
        ExactlyOnce(Short()).apply_batch(1, [frame_command(7, 1, b"a"), frame_command(7, 2, b"b")])

    class Lazy(Raises):  # (results as an iterable of the right length: taken, as before)
        def apply_batch(self, first_index: int, commands: list):
            return (command.upper() for command in commands)

    results = ExactlyOnce(Lazy()).apply_batch(1, [frame_command(7, 1, b"a")])
    assert results == [b"A"]

    class Unordered(Raises):  # (a set's order differs from process to process: refused)
        def apply_batch(self, first_index: int, commands: list):
            return {command.upper() for command in commands}

    with pytest.raises(TypeError, match="returned 1 results for 1 commands|must return a list"):
        ExactlyOnce(Unordered()).apply_batch(1, [frame_command(7, 1, b"a")])

    class Broken(Raises):  # (a generator that raises half way: every proposer's error)
        def apply_batch(self, first_index: int, commands: list):
            yield b"one"
            raise ValueError("half way")

    results = ExactlyOnce(Broken()).apply_batch(1, [frame_command(7, 1, b"a")])
    assert isinstance(results[0], ValueError)


def test_async_and_generator_methods_are_refused_when_marked() -> None:
    with pytest.raises(TypeError, match="never runs its body"):

        class Log:
            @raftfast.replicated
            async def push(self, item: str) -> None:
                pass

    with pytest.raises(TypeError, match="never runs its body"):

        class Feed:
            @raftfast.readonly
            def items(self):
                yield 1


def test_text_results_travel_and_are_kept_as_utf8() -> None:
    class Text(Raises):
        def apply(self, index: int, command: bytes) -> str:
            return "\ud800" if command == b"lone" else "é" + command.decode()

        def snapshot(self, out: BinaryIO) -> None:
            pass

        def restore(self, inp: BinaryIO) -> None:
            pass

    machine = ExactlyOnce(Text())
    assert machine.apply(1, frame_command(7, 1, b"x")) == "éx".encode()
    lone = machine.apply(2, frame_command(7, 2, b"lone"))
    assert isinstance(lone, CommandError) and str(lone).startswith("applied, but")
    out = io.BytesIO()
    machine.snapshot(out)
    restored = ExactlyOnce(Text())
    restored.restore(io.BytesIO(out.getvalue()))
    # a retry after a restart from the snapshot gets the first result (it was "not kept")
    assert restored.apply(3, frame_command(7, 1, b"x")) == "éx".encode()
    with pytest.raises(CommandError, match="applied, but its result cannot be sent"):
        as_result_bytes("\udcff")  # (a UnicodeEncodeError at the leader before)


def test_a_state_machine_serves_one_node(tmp_path) -> None:
    async def main() -> None:
        machine = Counter()
        settings = {**_one_settings(tmp_path), "state_machine": machine}
        async with raftfast.Node(**settings) as node:
            await node.wait_for_leader()
            assert await node.propose("5") == b"5"  # (str, as a Client takes it)
            assert await node.query("") == b"5"
        with pytest.raises(RaftfastError, match="served a node already"):
            await raftfast.Node(**settings).start()
        assert machine.value == 5
        async with raftfast.Node(**{**settings, "state_machine": Counter()}) as node:
            await node.wait_for_leader()
            assert await node.propose(b"1") == b"6"  # (restored from the log: 5, then 1)
            await node._driver._take_snapshot()
        # a start that fails (its port taken) after restoring the snapshot may be tried again:
        # the next start restores it again, replacing the state
        again = raftfast.Node(**{**settings, "state_machine": Counter()})
        with socket.socket() as taken:
            host, port = settings["listen"].rsplit(":", 1)
            taken.bind((host, int(port)))
            taken.listen()
            with pytest.raises(Exception):  # noqa: B017 - (whatever the bind failure is called)
                await again.start()
        with pytest.raises(RaftfastError, match="served a node already"):  # (another node may
            await raftfast.Node(**{**settings, "state_machine": again.state_machine}).start()
        async with again:  # not have it: it may start on another data directory)
            await again.wait_for_leader()
            assert await again.query(b"") == b"6"
        embedded._claim(None)  # (a node of the KV store: no state machine of the user's)
        embedded._claim(None)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_nodes_sequences_wait_for_room_in_the_window() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        window = _Sequences(3)  # (3 unresolved at most)
        taken = [await window.take(loop.time() + 5) for _ in range(3)]
        assert [seq for seq, _ in taken] == [1, 2, 3]
        fourth = asyncio.ensure_future(window.take(loop.time() + 5))
        await asyncio.sleep(0.01)
        assert not fourth.done()
        window.release(taken[1][1])
        await asyncio.sleep(0.01)
        assert not fourth.done()  # (the oldest one holds it: 4 is 3 past 1)
        window.release(taken[0][1])
        seq, _ = await asyncio.wait_for(fourth, 5)
        assert seq == 4
        window4 = _Sequences(1)
        await window4.take(loop.time() + 5)
        with pytest.raises(raftfast.errors.DeadlineExceededError, match="unresolved"):
            await window4.take(loop.time() + 0.05)

    asyncio.run(main())


class Maker(Counter):
    def apply(self, index: int, command: bytes) -> bytes:
        if command.startswith(b"make "):
            self.applied += 1
            return b"x" * int(command[5:])
        return super().apply(index, command)


def test_a_follower_forwards_thousands_at_once_and_big_results(tmp_path) -> None:
    async def main() -> None:
        nodes = three(tmp_path, machine=Maker)
        for node in nodes:
            await node.start()
        try:
            leader_id = await nodes[0].wait_for_leader(timeout=30)
            follower = next(n for n in nodes if n.id != leader_id)
            # 6,000 at once: forwarded in any order, hundreds fell behind the leader's window
            # of 4,096 and were refused as late duplicates (never applied)
            results = await asyncio.gather(
                *(follower.propose(b"1", timeout=60) for _ in range(6000)),
                return_exceptions=True,
            )
            failed = [r for r in results if isinstance(r, BaseException)]
            assert not failed, (len(failed), failed[:3])
            assert sorted(int(r) for r in results) == list(range(1, 6001))
            big = await follower.propose(b"make 5000000", timeout=60)  # (4 MiB: "refused")
            assert len(big) == 5_000_000
        finally:
            for node in nodes:
                await node.stop()
        assert all(n.state_machine.applied == 6001 for n in nodes)

    asyncio.run(asyncio.wait_for(main(), 180))
