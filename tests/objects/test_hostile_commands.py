"""Commands and queries a stranger crafts for replicated objects (a hunt's findings).

A set of 30,000 integers that all hash to 0 (multiples of 2**61 - 1) took 9.6 s to build, on
every node, and stayed in the log; a command of 700,000 empty sets held a node 1.5 s; an
object name of 1.4 MB came back four times over in the error, which the exactly-once table
kept (20 such calls: +250 MB on every node) and which no client could read (a status's
metadata is at most 16 KiB). Now a client's value is decoded within limits and refused before
it is proposed, and errors are clipped."""

from __future__ import annotations

import asyncio
import io

import grpc
import pytest

import raftfast
from raftfast.dedup import units
from raftfast.errors import MAX_MESSAGE_CHARS, CommandError
from raftfast.exactly_once import MAX_KEPT_RESULT_BYTES, ExactlyOnce, frame_command
from raftfast.objects.batteries import MAX_SAME_HASH_KEYS
from raftfast.objects.codec import MAX_ITEMS, MAX_SAME_HASH, decode, encode
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto import raftfast_pb2_grpc as pb_grpc
from tests.objects.solo import solo_node

ZERO_HASH = 2**61 - 1  # (every multiple of it hashes to 0)


def colliding(n: int) -> list[int]:
    return [ZERO_HASH * k for k in range(1, n + 1)]


def with_colliding_set(call: list, n: int) -> bytes:
    """``call`` encoded, its item ``SET`` a set of ``n`` colliding integers (encoded as such:
    a Python set of them takes time quadratic in ``n`` to build, here as on a node)."""
    as_set = b"e" + encode(colliding(n))[1:]  # (a list's layout, a set's tag)
    return encode(call).replace(encode(SET), as_set)


SET = b"(the colliding set)"


def test_a_clients_value_is_decoded_within_limits():
    few = colliding(MAX_SAME_HASH)
    assert decode(encode(set(few)), limited=True) == set(few)
    assert decode(encode(dict.fromkeys(few, 1)), limited=True) == dict.fromkeys(few, 1)
    with pytest.raises(ValueError, match="share a hash"):
        decode(with_colliding_set([SET], 30_000), limited=True)
    for value in (set(colliding(100)), frozenset(colliding(100)), dict.fromkeys(colliding(100))):
        with pytest.raises(ValueError, match="share a hash"):
            decode(encode(value), limited=True)
        assert decode(encode(value)) == value  # (a snapshot holds what commands built)
    with pytest.raises(ValueError, match=f"more than {MAX_ITEMS} values"):
        decode(encode([set() for _ in range(MAX_ITEMS)]), limited=True)  # (+1: the list)
    assert len(decode(encode([None] * (MAX_ITEMS - 1)), limited=True)) == MAX_ITEMS - 1
    with pytest.raises(ValueError, match="unhashable"):
        decode(b"e\x01l\x00", limited=True)  # a set holding a list


def test_errors_are_clipped_where_they_are_kept():
    class Loud(raftfast.StateMachine):
        def apply(self, index: int, command: bytes) -> object:
            return ValueError("no " + command.decode())

    machine = ExactlyOnce(Loud())
    command = frame_command(7, 1, b"x" * 1_000_000)
    first = machine.apply(1, command)
    again = machine.apply(2, command)  # (a retry: the result kept)
    assert isinstance(first, CommandError) and again is first
    assert str(first).startswith("no xxx") and len(str(first)) < MAX_MESSAGE_CHARS + 100
    assert "1000003 characters" not in str(first) and "more characters" in str(first)


def test_a_raised_error_is_kept_without_the_frames_that_held_its_command():
    # Its traceback's frames held the command (and the batch it came in) for as long as the
    # table kept the result: 150 raising 1 MiB commands took every node up ~350 MB.
    class Strict(raftfast.StateMachine):
        def apply(self, index: int, command: bytes) -> object:
            try:
                int(command)
            except ValueError:
                raise RuntimeError("not a number") from None
            return b"ok"

    machine = ExactlyOnce(Strict())
    command = frame_command(7, 1, b"x" * 1_000_000)
    [result] = machine.apply_batch(1, [command])
    assert isinstance(result, RuntimeError) and str(result) == "not a number"
    assert result.__traceback__ is None and result.__context__ is None
    assert machine.apply(2, command) is result  # (a retry: the result kept)


def test_a_result_whose_message_cannot_be_made_fails_its_command_only():
    # str(KeyError(10**5000)) raises (Python's 4,300-digit limit): the exactly-once table's
    # clipping made apply raise, and every node stopped at each replay of such a command.
    class Registry(raftfast.StateMachine):
        def apply(self, index: int, command: bytes) -> object:
            return KeyError(10**5000)

        def snapshot(self, out) -> None:  # type: ignore[no-untyped-def]
            pass

    machine = ExactlyOnce(Registry())
    result = machine.apply(1, frame_command(7, 1, b"take"))
    assert isinstance(result, CommandError) and str(result) == "KeyError"
    [again] = machine.apply_batch(2, [frame_command(7, 2, b"take")])
    assert isinstance(again, CommandError) and str(again) == "KeyError"
    out = io.BytesIO()
    machine.snapshot(out)  # (the table keeps what it can say)
    assert b"KeyError" in out.getvalue()


def test_hostile_commands_are_refused_before_the_log(tmp_path):
    table = raftfast.ReplDict()

    async def main() -> None:
        node = solo_node(tmp_path, table=table)
        async with node, grpc.aio.insecure_channel(node.settings.listen) as channel:
            await node.wait_for_leader()
            stub = pb_grpc.StateMachineStub(channel)
            await table.set("a", 1)
            before = (await node.status())["last_index"]
            hostile = [
                (with_colliding_set(["table", "set", ["k", SET], {}], 30_000), "share a hash"),
                (encode(["table", "set", ["k", [set()] * MAX_ITEMS], {}]), "values"),
                (encode(["\0" * 1_400_000, "set", [], {}]), "no object named"),
                (encode(["table", "x" * 1_400_000, [], {}]), "is not a write method"),
            ]
            for sequence, (command, why) in enumerate(hostile, 1):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Propose(
                        pb.ProposeRequest(client_id=9, sequence=sequence, command=command),
                        timeout=10,
                    )
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
                assert why in caught.value.details()
                assert len(caught.value.details()) < 2 * MAX_MESSAGE_CHARS
                with pytest.raises(raftfast.InvalidArgumentError, match=why):
                    await node.propose(command)  # (embedded: the same check)
            assert (await node.status())["last_index"] == before  # none reached the log
            query = with_colliding_set(["table", "get", [SET], {}], 30_000)
            with pytest.raises(grpc.aio.AioRpcError, match="share a hash"):
                await stub.Query(pb.QueryRequest(request=query), timeout=10)
            assert await table.get("a") == 1

    asyncio.run(main())


def test_a_dict_refuses_keys_sharing_a_hash_across_commands() -> None:
    # 2,500 commands of 16 multiples of 2**61 - 1 each (every one within a command's own
    # limit) built a dict whose restore took 8 s on a node's loop: a hostile hunt.
    table = raftfast.ReplDict()
    objects = raftfast.Objects(table=table)
    keys = colliding(MAX_SAME_HASH_KEYS + 1)
    index = 0

    def call(method: str, *args: object) -> object:
        nonlocal index
        index += 1
        return objects.apply(index, encode(["table", method, list(args), {}]))

    for i in range(0, MAX_SAME_HASH_KEYS, 16):
        assert decode(call("update", dict.fromkeys(keys[i : i + 16], 1))) is None
    assert decode(call("set", "text", 1)) is None  # (str keys: seeded hashes, not counted)
    refused = call("set", keys[-1], 1)
    assert isinstance(refused, ValueError) and "share a hash" in str(refused)
    refused = call("update", {keys[-1]: 1, "more text": 2})
    assert isinstance(refused, ValueError) and keys[-1] not in table
    assert "more text" not in table  # (refused whole)
    assert decode(call("set", keys[0], 2)) is None  # (a key it holds: written again)
    assert decode(call("pop", keys[0])) == 2
    assert decode(call("set", keys[-1], 1)) is None  # (room again)
    # a node restored from a snapshot counts the same, and refuses the same
    out = io.BytesIO()
    objects.snapshot(out)
    copy = raftfast.ReplDict()
    restored = raftfast.Objects(table=copy)
    restored.restore(io.BytesIO(out.getvalue()))
    refused = restored.apply(index + 1, encode(["table", "set", [keys[0], 1], {}]))
    assert isinstance(refused, ValueError) and "share a hash" in str(refused)
    assert decode(restored.apply(index + 2, encode(["table", "set", [7, 1], {}]))) is None


def test_big_results_are_not_kept_for_a_retry_and_count_by_size() -> None:
    big = b"r" * (MAX_KEPT_RESULT_BYTES + 1)

    class Echo(raftfast.StateMachine):
        def apply(self, index: int, command: bytes) -> object:
            return big if command == b"big" else command

        def snapshot(self, out) -> None:
            pass

        def restore(self, inp) -> None:
            pass

    machine = ExactlyOnce(Echo())
    assert machine.apply(1, frame_command(7, 1, b"big")) == big  # (its proposer gets it all)
    retried = machine.apply(2, frame_command(7, 1, b"big"))
    assert isinstance(retried, CommandError) and "applied" in str(retried)
    assert f"more than the {MAX_KEPT_RESULT_BYTES} bytes" in str(retried)
    small = b"s" * 1000
    assert machine.apply(3, frame_command(7, 2, small)) == small
    assert machine.apply(4, frame_command(7, 2, small)) == small  # (kept whole)
    # what the table holds counts a result by its size: 1 MB results of 17-byte commands grew
    # every node by ~300 MB for 300 of them, counted as 300
    table = machine._clients
    assert table.held == units(retried) + units(small) == 1 + 1 + 1000 // 128
    out = io.BytesIO()
    machine.snapshot(out)
    restored = ExactlyOnce(Echo())
    restored.restore(io.BytesIO(out.getvalue()))
    assert restored._clients.held == table.held
    again = restored.apply(5, frame_command(7, 1, b"big"))
    assert isinstance(again, CommandError) and "applied" in str(again)


def test_a_client_text_with_a_lone_surrogate_in_an_error_is_answered(tmp_path):
    # A kwarg named "\ud800" (the codec takes such text: surrogatepass) came back in the
    # error's message, which gRPC could not send: the call was never answered, and the node
    # logged a traceback.
    table = raftfast.ReplDict()

    async def main() -> None:
        node = solo_node(tmp_path, table=table)
        async with node, grpc.aio.insecure_channel(node.settings.listen) as channel:
            await node.wait_for_leader()
            stub = pb_grpc.StateMachineStub(channel)
            command = encode(["table", "set", [], {"\ud800": 1}])
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Propose(
                    pb.ProposeRequest(client_id=9, sequence=1, command=command), timeout=10
                )
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value
            assert "\\ud800" in caught.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as caught:  # (a retry: the kept error)
                await stub.Propose(
                    pb.ProposeRequest(client_id=9, sequence=1, command=command), timeout=10
                )
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value
            query = encode(["table", "get", [], {"\udcff": 1}])
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Query(pb.QueryRequest(request=query), timeout=10)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value
            assert "\\udcff" in caught.value.details()

    asyncio.run(main())


def test_a_dicts_items_come_a_page_at_a_time() -> None:
    table = raftfast.ReplDict()
    objects = raftfast.Objects(table=table)
    objects.apply(1, encode(["table", "update", [{i: str(i) for i in range(10)}], {}]))

    def items(*args: object) -> object:
        return decode(objects.query(encode(["table", "items", list(args), {}])))

    assert items() == [(i, str(i)) for i in range(10)]
    assert items(3, 4) == [(i, str(i)) for i in range(3, 7)]
    assert items(8) == [(8, "8"), (9, "9")] and items(20, 5) == []
    for bad in ((-1,), (0, -2), ("x",)):
        with pytest.raises(ValueError, match="non-negative"):
            items(*bad)


def test_a_dicts_hash_counts_follow_its_keys_whatever_the_writes() -> None:
    # The counts must be a function of the keys alone (a restored replica counts afresh):
    # clear() left them behind, and update() with pairs counted the pairs.
    table = raftfast.ReplDict()
    objects = raftfast.Objects(table=table)
    index = 0

    def call(method: str, *args: object) -> object:
        nonlocal index
        index += 1
        return objects.apply(index, encode(["table", method, list(args), {}]))

    for _ in range(MAX_SAME_HASH_KEYS + 2):
        assert decode(call("set", 5, "x")) is None
        assert decode(call("clear")) is None
        assert decode(call("update", [(1, 2)])) is None  # (pairs: as dict.update takes them)
    assert table.data == {1: 2}
    for key in colliding(MAX_SAME_HASH_KEYS):
        assert decode(call("set", key, 0)) is None
    table.data.pop(colliding(1)[0])  # (a write around the methods: counted again)
    assert decode(call("set", colliding(MAX_SAME_HASH_KEYS + 1)[-1], 0)) is None
    assert isinstance(call("set", colliding(MAX_SAME_HASH_KEYS + 2)[-1], 0), ValueError)


def test_results_the_table_keeps_count_the_same_after_a_restore() -> None:
    class Views(raftfast.StateMachine):
        def __init__(self) -> None:
            self.buffer = bytearray(b"x" * 5000)

        def apply(self, index: int, command: bytes) -> object:
            if command == b"view":
                return memoryview(bytes(8 * 70_000)).cast("Q")  # (70,000 items, 560 KB)
            return self.buffer  # (its own buffer, which it changes later)

        def snapshot(self, out) -> None:
            pass

        def restore(self, inp) -> None:
            pass

    inner = Views()
    machine = ExactlyOnce(inner)
    machine.apply(1, frame_command(3, 1, b"view"))
    machine.apply(2, frame_command(3, 2, b"buffer"))
    inner.buffer.extend(b"y" * 100_000)  # (a result kept by reference would change here)
    retried = machine.apply(3, frame_command(3, 1, b"view"))
    assert isinstance(retried, CommandError)  # (560 KB: over the bound, as bytes count)
    out = io.BytesIO()
    machine.snapshot(out)
    restored = ExactlyOnce(Views())
    restored.restore(io.BytesIO(out.getvalue()))
    assert restored._clients.held == machine._clients.held == 1 + 1 + 5000 // 128
