"""Replicated objects: the safe codec, the ``Objects`` state machine on its own, and three
embedded nodes sharing a counter, a dict and a lock."""

from __future__ import annotations

import asyncio
import io
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import raftfast
from raftfast.errors import CommandError, RaftfastError
from raftfast.objects.codec import MAX_DEPTH, decode, encode
from raftfast.tools.localcluster import free_ports

# -- the codec ------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=False),
    st.text(),
    st.binary(),
)
keys = st.one_of(st.integers(), st.text(max_size=8), st.binary(max_size=8))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(keys, inner, max_size=4),
    ),
    max_leaves=20,
)


@given(values)
@settings(max_examples=300, deadline=None)
def test_the_codec_round_trips_data(value):
    assert decode(encode(value)) == value


@given(st.binary(max_size=64), st.data())
@settings(max_examples=500, deadline=None)
def test_the_codec_decodes_anything_or_says_no(data, draw):
    if draw.draw(st.booleans()):
        good = bytearray(encode(draw.draw(values)))
        if good:
            good[draw.draw(st.integers(0, len(good) - 1))] ^= draw.draw(st.integers(1, 255))
        data = bytes(good)
    try:
        decode(data)
    except ValueError:
        pass


def test_the_codec_refuses_what_is_not_data():
    for bad in (object(), {1, 2}, print, io.BytesIO()):
        with pytest.raises(TypeError):
            encode(bad)
    deep: list = []
    for _ in range(MAX_DEPTH + 2):
        deep = [deep]
    with pytest.raises(TypeError):
        encode(deep)
    with pytest.raises(ValueError, match="deeper"):
        decode(b"l\x01" * (MAX_DEPTH + 2) + b"n")
    with pytest.raises(ValueError):
        decode(b"s\xff\xff\xff\xff\x0f")  # a length past the end
    with pytest.raises(ValueError, match="unhashable"):
        decode(b"m\x01l\x00n")  # a list as a dict key
    assert math.isinf(decode(encode(float("inf"))))


# -- Objects on its own ---------------------------------------------------------------------


def test_objects_apply_snapshot_and_restore():
    counter, table = raftfast.ReplCounter(), raftfast.ReplDict()
    objects = raftfast.Objects(counter, table=table)
    assert decode(objects.apply(1, encode(["ReplCounter", "add", [5], {}]))) == 5
    assert decode(objects.apply(2, encode(["table", "set", ["k", [1, 2]], {}]))) is None
    for bad in (
        b"junk",
        encode(["nobody", "add", [], {}]),
        encode(["ReplCounter", "get", [], {}]),  # a read, not a write
        encode(["ReplCounter", "_private", [], {}]),
        encode(["ReplCounter", "__init__", [], {}]),
        encode(["ReplCounter", "add", ["x"], {}]),  # the method refuses it
        encode(["ReplCounter", "add", [], {1: 2}]),
    ):
        assert isinstance(objects.apply(3, bad), Exception), bad
    assert counter.value == 5 and table.data == {"k": [1, 2]}
    assert decode(objects.query(encode(["table", "get", ["k"], {}]))) == [1, 2]
    out = io.BytesIO()
    objects.snapshot(out)
    copy_counter, copy_table = raftfast.ReplCounter(), raftfast.ReplDict()
    raftfast.Objects(copy_counter, table=copy_table).restore(io.BytesIO(out.getvalue()))
    assert copy_counter.value == 5 and copy_table.data == {"k": [1, 2]}
    with pytest.raises(RaftfastError, match="not on a started node"):
        raftfast.ReplCounter().add(1)
    with pytest.raises(ValueError, match="two objects"):
        raftfast.Objects(raftfast.ReplCounter(), raftfast.ReplCounter())


# -- three embedded nodes -------------------------------------------------------------------


def test_a_counter_a_dict_and_a_lock_on_three_nodes(tmp_path):
    ports = free_ports(3)
    peers = {f"n{i + 1}": f"127.0.0.1:{p}" for i, p in enumerate(ports)}
    objs = {
        nid: (raftfast.ReplCounter(), raftfast.ReplDict(), raftfast.ReplLock(1.0)) for nid in peers
    }

    def node(nid: str) -> raftfast.Node:
        counter, table, lock = objs[nid]
        machine = raftfast.Objects(counter=counter, table=table, lock=lock)
        return raftfast.Node(
            id=nid, listen=peers[nid], peers=peers, data_dir=str(tmp_path / nid),
            state_machine=machine, tick_ms=20, snapshot_entries=50,
        )  # fmt: skip

    async def main() -> None:
        nodes = {nid: node(nid) for nid in peers}
        try:
            for n in nodes.values():
                await n.start()
            await nodes["n1"].wait_for_leader()
            counters = [objs[nid][0] for nid in peers]
            await asyncio.gather(*(c.add(1) for c in counters for _ in range(40)))
            assert await counters[0].get() == 120  # a linearizable read
            table = objs["n2"][1]
            await table.update({"a": 1, "b": (2, "two")})
            assert await objs["n3"][1].pop("a") == 1
            assert await objs["n1"][1].get("b") == (2, "two")
            with pytest.raises(CommandError, match="integers"):
                await counters[1].add("1")
            # the lock: one holder at a time; a holder that stops renewing loses it
            lock1, lock2 = objs["n1"][2], objs["n2"][2]
            assert await lock1.try_acquire("alice") and not await lock2.try_acquire("bob")
            async with asyncio.timeout(10):
                while not await lock2.try_acquire("bob"):  # alice renews nothing: 1 s lease
                    await asyncio.sleep(0.1)
            assert not await lock1.try_acquire("alice")
            assert await lock2.release("bob")
            async with objs["n3"][2].hold("carol", timeout=10):
                await asyncio.sleep(1.5)  # longer than the lease: renewed meanwhile
                assert not await lock1.try_acquire("alice")
            assert await lock1.try_acquire("alice")
            for nid in peers:  # each node's own copy caught up
                async with asyncio.timeout(10):
                    while objs[nid][0].value != 120:
                        await asyncio.sleep(0.02)
        finally:
            for n in nodes.values():
                await n.stop()
        # restarted from their data (snapshots every 50 commands, and the log)
        objs.update({nid: (raftfast.ReplCounter(), raftfast.ReplDict(), raftfast.ReplLock(1.0))
                     for nid in peers})  # fmt: skip
        nodes = {nid: node(nid) for nid in peers}
        try:
            for n in nodes.values():
                await n.start()
            await nodes["n1"].wait_for_leader()
            assert await objs["n2"][0].get() == 120
            assert await objs["n2"][1].items() == [("b", (2, "two"))]
        finally:
            for n in nodes.values():
                await n.stop()

    asyncio.run(asyncio.wait_for(main(), 120))


def test_replicated_calls_block_on_a_sync_node(tmp_path):
    [port] = free_ports(1)
    counter = raftfast.ReplCounter()
    with raftfast.SyncNode(
        id="solo", listen=f"127.0.0.1:{port}", data_dir=str(tmp_path / "solo"),
        state_machine=raftfast.Objects(counter), tick_ms=20,
    ) as node:  # fmt: skip
        node.wait_for_leader()
        assert counter.add(3) == 3 and counter.add(4) == 7 and counter.get() == 7
