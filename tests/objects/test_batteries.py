"""PySyncObj's other batteries: ``ReplList``, ``ReplSet`` and ``ReplQueue``, applied as every
node applies them, through a snapshot, and on a running node."""

from __future__ import annotations

import asyncio
import io

import pytest

import raftfast
from raftfast.objects.batteries import MAX_SAME_HASH_KEYS
from raftfast.objects.codec import decode, encode
from tests.objects.solo import solo_node


class Machine:
    """An ``Objects`` of the three, applying calls as the node would (index by index)."""

    def __init__(self) -> None:
        self.objects = raftfast.Objects(
            items=raftfast.ReplList(), tags=raftfast.ReplSet(), jobs=raftfast.ReplQueue(3)
        )
        self.index = 0

    def write(self, name: str, method: str, *args: object) -> object:
        self.index += 1
        result = self.objects.apply(self.index, encode([name, method, list(args), {}]))
        return result if isinstance(result, BaseException) else decode(result)

    def read(self, name: str, method: str, *args: object) -> object:
        return decode(self.objects.query(encode([name, method, list(args), {}])))

    def restored(self) -> Machine:
        out = io.BytesIO()
        self.objects.snapshot(out)
        twin = Machine()
        twin.objects.restore(io.BytesIO(out.getvalue()))
        twin.index = self.index
        return twin


def test_a_list_set_and_queue_apply_as_their_python_twins() -> None:
    m = Machine()
    assert m.write("items", "append", "a") == 1
    assert m.write("items", "extend", ["b", "c", "d"]) == 4
    assert m.write("items", "insert", 0, "z") == 5
    assert m.write("items", "pop") == "d" and m.write("items", "pop", 0) == "z"
    assert m.write("items", "remove", "b") is True and m.write("items", "remove", "q") is False
    m.write("items", "set", 1, "C")
    assert m.read("items", "items") == ["a", "C"] and m.read("items", "get", 5, "none") == "none"
    m.write("items", "extend", ["b", "a"])
    assert m.read("items", "count", "a") == 2 and m.read("items", "index", "b") == 2
    assert m.write("items", "sort", True) is None and m.read("items", "items") == [
        "b",
        "a",
        "a",
        "C",
    ]
    assert isinstance(m.write("items", "append", 1) and m.write("items", "sort"), TypeError)
    assert m.read("items", "items") == ["b", "a", "a", "C", 1]  # (a sort that failed: unchanged)
    for _ in range(3):
        m.write("items", "pop", 1)
    assert m.read("items", "items") == ["b", 1] and m.write("items", "pop") == 1
    m.write("items", "set", 0, "a")
    m.write("items", "append", "C")
    assert isinstance(m.write("items", "pop", 9), IndexError)
    assert isinstance(m.write("items", "set", True, "x"), TypeError)  # (True is 1 to a list)
    # a set keeps the order items came in (a set's own order differs from node to node)
    assert [m.write("tags", "add", t) for t in ("x", "y", "x")] == [True, True, False]
    assert m.write("tags", "update", ["w", "y", "v", "w"]) == 2
    assert m.read("tags", "items") == ["x", "y", "w", "v"] and m.read("tags", "contains", "v")
    assert m.write("tags", "pop") == "x" and m.write("tags", "discard", "v") is True
    assert isinstance(m.write("tags", "remove", "v"), KeyError)
    assert m.write("tags", "add", "v") and m.write("tags", "remove", "v") is None
    assert isinstance(m.write("tags", "update", {"a", "b"}), TypeError)  # (no order to keep)
    assert isinstance(m.write("items", "extend", {"a", "b"}), TypeError)
    # a dict's update takes a dict or pairs in a list: a set of pairs has no order every node
    # shares (which of ("k", 1) and ("k", 2) was kept differed from process to process)
    table = raftfast.Objects(d=raftfast.ReplDict())
    pairs = encode(["d", "update", [frozenset({("k", 1), ("k", 2)})], {}])
    assert isinstance(table.apply(1, pairs), TypeError)
    assert decode(table.apply(2, encode(["d", "update", [[("k", 1), ("k", 2)]], {}]))) is None
    assert table.objects["d"].data == {"k": 2}
    # a queue: first in, first out, at most maxsize
    assert [m.write("jobs", "put", j) for j in (1, 2, 3, 4)] == [True, True, True, False]
    assert m.write("jobs", "get") == 1 and m.read("jobs", "peek") == 2
    assert m.write("jobs", "put", 5) is True and m.read("jobs", "size") == 3
    twin = m.restored()
    for machine in (m, twin):  # (the next commands, alike after a restore)
        assert [machine.write("jobs", "get") for _ in range(4)] == [2, 3, 5, None]
        assert machine.write("tags", "pop") == "y"
        assert machine.read("items", "items", 1, 5) == ["C"]
    queue = twin.objects.objects["jobs"]
    assert queue.empty() and not queue.full() and len(queue) == 0


def test_a_set_refuses_too_many_items_sharing_a_hash() -> None:
    m = Machine()
    same = [(2**61 - 1) * i for i in range(1, MAX_SAME_HASH_KEYS + 2)]  # (all hash to 0)
    for item in same[:MAX_SAME_HASH_KEYS]:
        assert m.write("tags", "add", item) is True
    assert isinstance(m.write("tags", "add", same[-1]), ValueError)
    assert m.write("tags", "pop") == same[0] and m.write("tags", "add", same[-1]) is True


def test_the_batteries_on_a_running_node(tmp_path) -> None:
    items, tags, jobs = raftfast.ReplList(), raftfast.ReplSet(), raftfast.ReplQueue()

    async def main() -> None:
        async with solo_node(tmp_path, items=items, tags=tags, jobs=jobs) as node:
            await node.wait_for_leader()
            assert await items.append({"k": [1, 2]}) == 1
            assert await tags.update(("b", "a")) == 2 and await tags.pop() == "b"
            assert await jobs.put("job-1") and await jobs.get() == "job-1"
            assert await jobs.get("nothing") == "nothing"
            with pytest.raises(raftfast.errors.CommandError, match="list or a tuple"):
                await items.extend({1, 2})
            assert await items.items() == [{"k": [1, 2]}] and list(tags) == ["a"]

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize("index", [0, -1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), 10**40])
def test_extreme_list_positions_are_a_commands_result_or_error(index: int) -> None:
    m = Machine()
    m.write("items", "extend", ["a", "b"])
    for method, args in [
        ("insert", (index, "x")),
        ("set", (index, "y")),
        ("pop", (index,)),
        ("get", (index, "none")),
    ]:
        if method == "get":
            got = m.read("items", method, *args)
        else:
            got = m.write("items", method, *args)
        assert isinstance(got, int | str | type(None) | IndexError | OverflowError), got
    twin = m.restored()  # (the same state on a restored replica)
    assert twin.read("items", "items") == m.read("items", "items")
    assert m.write("items", "append", "z") == len(m.read("items", "items"))  # (still usable)
