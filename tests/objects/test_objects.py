"""Replicated objects: the safe codec, the ``Objects`` state machine on its own, and three
embedded nodes sharing a counter, a dict and a lock."""

from __future__ import annotations

import asyncio
import collections
import enum
import io
import math
import sys
import threading
import time
from collections import OrderedDict, defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import raftfast
from raftfast.errors import CommandError, RaftfastError
from raftfast.exactly_once import ExactlyOnce, frame_command
from raftfast.objects.codec import MAX_DEPTH, MAX_STATE_DEPTH, decode, encode
from raftfast.server import snapshots
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
    for bad in (object(), print, io.BytesIO(), defaultdict(lambda: 0), {1: [object()]}):
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
    with pytest.raises(ValueError, match="not a builtin"):
        decode(b"D\x00s\x04exit")  # (a defaultdict's factory is a name among builtins)


def test_the_codec_gives_back_the_very_types_and_a_snapshot_refuses_subclasses():
    value = [
        {1, 2}, frozenset({"a"}), bytearray(b"x"), defaultdict(int, a=1), defaultdict(None),
        defaultdict(list, {(1, 2): [3]}), {"nested": defaultdict(set)},
    ]  # fmt: skip
    back = decode(encode(value, exact=True))
    assert back == value and [type(v) for v in back] == [type(v) for v in value]
    assert back[3].default_factory is int and back[5].default_factory is list
    assert back[6]["nested"].default_factory is set

    class Level(enum.IntEnum):
        HIGH = 2

    Point = collections.namedtuple("Point", "x y")
    for subclass in (OrderedDict(a=1), Level.HIGH, Point(1, 2), collections.Counter("ab")):
        assert decode(encode(subclass)) == subclass  # (an argument: its base type)
        with pytest.raises(TypeError, match="snapshot"):
            encode([subclass], exact=True)
    # state nests deeper than a call may: a value a call carried fits a snapshot
    deep: list = []
    for _ in range(MAX_DEPTH):
        deep = [deep]
    state = {"obj": {"data": {"k": deep}}}
    with pytest.raises(TypeError):
        encode(state)
    assert decode(encode(state, max_depth=MAX_STATE_DEPTH), max_depth=MAX_STATE_DEPTH) == state


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


class Tally:
    """PySyncObj style: private attributes, a defaultdict, a bytearray, an attribute that
    comes and goes."""

    def __init__(self) -> None:
        self.__total = 0
        self.hits: defaultdict[str, int] = defaultdict(int)
        self.log = bytearray()
        self.pending = True

    @raftfast.replicated
    def hit(self, name: str) -> int:
        self.__total += 1
        self.hits[name] += 1
        self.log.extend(name.encode())
        return self.__total

    @raftfast.replicated
    def finish(self) -> None:
        del self.pending

    @raftfast.readonly
    def total(self) -> int:
        return self.__total

    @raftfast.readonly
    def both(self) -> list:
        return [self.total(), self.hits["a"]]  # (a read calling a read: run directly)

    @raftfast.readonly
    def sneaky(self) -> None:
        self.hit("x")  # (a read calling a write: refused)

    @raftfast.replicated
    def remember(self, value: object) -> None:
        self.kept = value


def test_a_snapshot_gives_back_exactly_the_state():
    tally = Tally()
    objects = raftfast.Objects(tally)
    for i, name in enumerate(["a", "b", "a"]):
        assert decode(objects.apply(i + 1, encode(["Tally", "hit", [name], {}]))) == i + 1
    assert decode(objects.apply(4, encode(["Tally", "finish", [], {}]))) is None
    out = io.BytesIO()
    objects.snapshot(out)
    copy = Tally()  # (from __init__: pending is back, the total 0)
    restored = raftfast.Objects(copy)
    restored.restore(io.BytesIO(out.getvalue()))
    assert vars(copy).keys() == vars(tally).keys() and not hasattr(copy, "pending")
    assert copy._Tally__total == 3 and copy.hits == {"a": 2, "b": 1} and copy.log == b"aba"
    assert type(copy.hits) is defaultdict and type(copy.log) is bytearray
    assert decode(restored.apply(5, encode(["Tally", "hit", ["new"], {}]))) == 4
    # reads: one calling another runs it; one calling a write is refused
    assert decode(objects.query(encode(["Tally", "both", [], {}]))) == [3, 2]
    with pytest.raises(RaftfastError, match="a read cannot call a write"):
        objects.query(encode(["Tally", "sneaky", [], {}]))
    # state a snapshot cannot give back as it is: the snapshot fails (the node goes on)
    objects.apply(6, encode(["Tally", "remember", [1], {}]))
    tally.kept = OrderedDict(a=1)
    with pytest.raises(TypeError, match="OrderedDict"):
        objects.snapshot(io.BytesIO())


def test_only_the_applying_thread_runs_calls_directly():
    tally = Tally()
    objects = raftfast.Objects(tally)
    sent: list = []
    objects.send = lambda kind, call: sent.append((kind, call))
    inside, release = threading.Event(), threading.Event()

    class Slow:
        @raftfast.replicated
        def work(self) -> None:
            inside.set()
            release.wait(10)

    slow = Slow()
    objects._add("Slow", slow)
    applying = threading.Thread(target=objects.apply, args=(1, encode(["Slow", "work", [], {}])))
    applying.start()
    assert inside.wait(10)
    tally.hit("a")  # another thread while the node applies: proposed, not run here
    release.set()
    applying.join(10)
    assert sent == [("write", ["Tally", "hit", ["a"], {}])] and tally.hits == {}


def test_an_apply_that_raises_fails_its_command_only():
    class Ledger(raftfast.StateMachine):
        def __init__(self) -> None:
            self.seen: list[bytes] = []

        def apply(self, index: int, command: bytes) -> bytes:
            if command == b"bad":
                raise OverflowError("cannot convert float infinity to integer")
            self.seen.append(command)
            return command

    class Plain:  # (the same methods, no StateMachine: no apply_batch of its own)
        def __init__(self) -> None:
            self.seen: list[bytes] = []

        def apply(self, index: int, command: bytes) -> bytes:
            if command == b"bad":
                sys.exit("a method that exits")  # (every node, at every restart: not ours)
            self.seen.append(command)
            return command

    for inner in (Ledger(), Plain()):
        machine = ExactlyOnce(inner)
        commands = [frame_command(7, i + 1, c) for i, c in enumerate([b"a", b"bad", b"b"])]
        results = machine.apply_batch(1, commands)
        assert results[0] == b"a" and results[2] == b"b"
        assert isinstance(results[1], Exception | SystemExit)
        assert inner.seen == [b"a", b"b"]


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


def test_a_node_whose_state_cannot_be_snapshotted_goes_on(tmp_path, monkeypatch):
    # It stopped (a disk failure, as it was taken for), and again after every restart.
    monkeypatch.setattr(snapshots, "SNAPSHOT_RETRY_S", 0.2)
    [port] = free_ports(1)
    tally, lock = Tally(), raftfast.ReplLock(1.0)

    async def main() -> None:
        node = raftfast.Node(
            id="solo", listen=f"127.0.0.1:{port}", data_dir=str(tmp_path / "solo"),
            state_machine=raftfast.Objects(tally, lock=lock), tick_ms=20, snapshot_entries=5,
            max_request_bytes=64 * 1024,
        )  # fmt: skip
        async with node:
            await node.wait_for_leader()
            await tally.remember([1, OrderedDict(a=1)])  # (an argument: a list and a dict)
            tally.kept = [OrderedDict(a=1)]  # (kept as it is: no snapshot can give it back)
            for name in "abcdefghij":
                await tally.hit(name)
            driver = node._driver
            async with asyncio.timeout(20):
                while driver.metrics.snapshots_refused < 2:  # (tried again, failed again)
                    await tally.hit("z")
            assert await tally.total() >= 10
            await tally.remember(None)  # the state is data again: the next snapshot is taken
            async with asyncio.timeout(20):
                while driver._snapshot_index < driver.applied_index - 5:
                    await tally.hit("y")
            # a lock's time must be a number; a holder that loses the lock is told
            with pytest.raises(CommandError, match="finite number"):
                await lock.acquire("mallory", float("nan"))
            with pytest.raises(raftfast.LockLostError, match="someone else"):
                async with lock.hold("alice", timeout=5):
                    assert await lock.release("alice")
                    assert await lock.try_acquire("bob")
                    await asyncio.sleep(10)  # (cancelled at alice's next renewal)
            assert await lock.owner(time.time()) == "bob"
            # one size limit, wherever the command is proposed
            with pytest.raises(raftfast.InvalidArgumentError, match="limit"):
                await node.propose(bytes(65 * 1024))

    asyncio.run(asyncio.wait_for(main(), 120))


def test_results_are_bytes_at_any_member(tmp_path):
    # At the leader a proposer got the object apply returned, at a follower CommandError for
    # the same (applied) command: one convention now, the follower's.
    [port] = free_ports(1)

    class Echo(raftfast.StateMachine):
        def apply(self, index: int, command: bytes) -> object:
            return {b"int": 1, b"none": None, b"str": "s"}.get(command, command)

        def query(self, request: bytes) -> object:
            return self.apply(0, request)

        def snapshot(self, out) -> None:
            pass

        def restore(self, inp) -> None:
            pass

    with raftfast.SyncNode(
        id="solo", listen=f"127.0.0.1:{port}", data_dir=str(tmp_path / "solo"),
        state_machine=Echo(), tick_ms=20,
    ) as node:  # fmt: skip
        node.wait_for_leader()
        assert node.propose(b"none") == b"" and node.propose(b"str") == b"s"
        assert node.propose(b"raw") == b"raw" and node.query(b"str") == b"s"
        with pytest.raises(CommandError, match="applied, but its result is a int"):
            node.propose(b"int")
        with pytest.raises(CommandError, match="its result is a int"):
            node.query(b"int")


def test_a_hold_whose_renewal_hangs_ends_at_the_lease():
    # A renewal's proposal waits out its deadline without a quorum: the body ran on 4 s under a
    # 1 s lease (another holder may have had the lock meanwhile).
    class Hanging(raftfast.ReplLock):
        calls = 0

        async def _acquired(self, holder: str) -> bool:
            Hanging.calls += 1
            if Hanging.calls > 1:
                await asyncio.sleep(30)
            return True

        async def release(self, holder: str) -> bool:  # (not on a node here)
            return True

    async def main() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(raftfast.LockLostError, match="lease ran out"):
            async with Hanging(lease=1.0).hold("me"):
                await asyncio.sleep(30)
        return loop.time() - started

    assert asyncio.run(asyncio.wait_for(main(), 20)) < 10  # (about the 1 s lease)
