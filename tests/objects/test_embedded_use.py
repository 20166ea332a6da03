"""Replicated objects used as a PySyncObj or hashicorp/raft user would (a new user's hunt):
local attributes kept out of the state survive a restore, a result that cannot be sent says
the command was applied, state that can never be snapshotted is refused at the start, and the
node's methods called from the wrong thread or loop say so instead of hanging or breaking the
node."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import io
import threading
import time
from collections import Counter

import pytest

import raftfast
from raftfast.errors import CommandError, InvalidArgumentError, RaftfastError
from raftfast.objects.codec import decode, encode
from raftfast.tools.localcluster import free_ports
from tests.objects.solo import solo_node


class Cache:
    """Data, and a lock of its own kept out of its state (``__getstate__`` alone)."""

    def __init__(self) -> None:
        self.data: dict = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"data": self.data}

    @raftfast.replicated
    def put(self, key: str, value: int) -> int:
        with self._lock:
            self.data[key] = value
            return len(self.data)

    @raftfast.replicated
    def stamp(self) -> datetime.date:
        self.data["stamped"] = 1
        return datetime.date(2026, 1, 1)  # (no data: it cannot be sent)


def _apply(objects: raftfast.Objects, index: int, *call: object) -> object:
    return objects.apply(index, encode(list(call)))


def test_local_attributes_left_out_of_the_state_survive_a_restore() -> None:
    cache = Cache()
    objects = raftfast.Objects(cache=cache)
    assert decode(_apply(objects, 1, "cache", "put", ["a", 1], {})) == 1
    out = io.BytesIO()
    objects.snapshot(out)
    copy = Cache()
    restored = raftfast.Objects(cache=copy)
    _apply(restored, 1, "cache", "put", ["stale", 9], {})  # (state the restore replaces)
    restored.restore(io.BytesIO(out.getvalue()))
    assert copy.data == {"a": 1} and isinstance(copy._lock, type(threading.Lock()))
    assert decode(_apply(restored, 2, "cache", "put", ["b", 2], {})) == 2  # (it was deleted)


def test_a_result_that_cannot_be_sent_says_the_command_was_applied() -> None:
    cache = Cache()
    objects = raftfast.Objects(cache=cache)
    result = _apply(objects, 1, "cache", "stamp", [], {})
    assert isinstance(result, CommandError) and str(result).startswith("applied, but")
    assert cache.data == {"stamped": 1}  # (so the caller must not retry it as never run)


def test_state_that_can_never_be_snapshotted_is_refused_at_the_start() -> None:
    class Words:
        def __init__(self) -> None:
            self.counts = Counter()  # (a subclass of dict: no snapshot gives it back)

    with pytest.raises(ValueError, match="'Words': its state cannot be snapshotted"):
        raftfast.Objects(Words())


class Pairs:
    """State as a list (its own __getstate__), taken back by __setstate__ only if it has one."""

    def __init__(self) -> None:
        self.items: list = [1, 2]

    def __getstate__(self) -> list:
        return list(self.items)


class RestorablePairs(Pairs):
    def __setstate__(self, state: list) -> None:
        self.items = list(state)


def test_state_a_restore_cannot_take_back_is_refused_at_the_start() -> None:
    # (every snapshot was written, none could be read: no node started again on its data)
    with pytest.raises(ValueError, match="'Pairs': its __getstate__ returns a list"):
        raftfast.Objects(Pairs())
    objects = raftfast.Objects(pairs=RestorablePairs())
    out = io.BytesIO()
    objects.snapshot(out)
    twin = raftfast.Objects(pairs=RestorablePairs())
    twin.objects["pairs"].items = []
    twin.restore(io.BytesIO(out.getvalue()))
    assert twin.objects["pairs"].items == [1, 2]


def test_a_node_called_from_another_loop_says_so_and_goes_on(tmp_path) -> None:
    counter = raftfast.ReplCounter()

    async def main() -> None:
        node = solo_node(tmp_path, counter)
        async with node:
            await node.wait_for_leader()
            assert await counter.add(1) == 1
            errors: list[BaseException] = []

            def from_a_thread() -> None:
                try:
                    asyncio.run(counter.add(1))  # (a PySyncObj habit: waited out 5 s, or broke)
                except BaseException as exc:  # noqa: BLE001 - what the test looks at
                    errors.append(exc)

            thread = threading.Thread(target=from_a_thread)
            started = time.monotonic()
            thread.start()
            await asyncio.to_thread(thread.join, 30)
            assert time.monotonic() - started < 3
            assert len(errors) == 1 and isinstance(errors[0], RaftfastError)
            assert "another event loop" in str(errors[0])
            assert await counter.add(1) == 2  # (the node is fine)
            with pytest.raises(InvalidArgumentError, match="positive number"):
                await node.wait_for_leader(timeout=0)  # (0 meant the default: 30 s)
            with pytest.raises(InvalidArgumentError, match="positive number"):
                await node.wait_for_leader(timeout=True)
            await node.wait_for_leader(timeout=10**400)  # (a year, as a client's)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_sync_node_refuses_calls_from_its_own_thread_and_frees_callers_at_stop(tmp_path):
    [port] = free_ports(1)
    node = raftfast.SyncNode(
        id="solo", listen=f"127.0.0.1:{port}", data_dir=str(tmp_path / "solo"),
        state_machine=raftfast.Objects(), tick_ms=20, timeout=60,
    )  # fmt: skip

    class Nosy:
        @raftfast.replicated
        def look(self) -> str:
            return node.status()["role"]  # (it waited for its own thread: for ever)

    nosy = Nosy()
    node.node.state_machine._add("Nosy", nosy)
    with node:
        node.wait_for_leader()
        with pytest.raises(CommandError, match="its own thread cannot call them"):
            nosy.look()
        assert node.status()["role"] == "leader"  # (the node is fine)

        async def in_a_loop_of_its_own() -> tuple:  # (a web handler's, a notebook's)
            return node.is_leader, node.leader

        assert asyncio.run(in_a_loop_of_its_own()) == (True, "solo")

        async def times_out() -> None:
            await asyncio.sleep(0.6)  # (past one wait of the caller's: it looks again)
            raise TimeoutError("its own")

        with pytest.raises(TimeoutError, match="its own"):  # (not waited on for ever)
            node._run(times_out())
    # a caller blocked on a node that stops is told, at once
    [port2] = free_ports(1)
    blocked = raftfast.SyncNode(
        id="n1", listen=f"127.0.0.1:{port2}", data_dir=str(tmp_path / "n1"), tick_ms=20,
        peers={"n1": f"127.0.0.1:{port2}", "n2": "127.0.0.1:9"},  # (no quorum: never commits)
        state_machine=raftfast.Objects(counter := raftfast.ReplCounter()), timeout=60,
    )  # fmt: skip
    blocked.start()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            counter.add(1)
        except BaseException as exc:  # noqa: BLE001 - what the test looks at
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()

    def under_way() -> bool:  # (it waits for a leader that never comes)
        tasks = blocked._loop.call_soon_threadsafe  # (the loop runs: look at its tasks there)
        seen = concurrent.futures.Future()
        tasks(lambda: seen.set_result([t.get_coro().__name__ for t in asyncio.all_tasks()]))
        return "propose" in seen.result(5)

    deadline = time.monotonic() + 10
    while not under_way():
        assert time.monotonic() < deadline, "the call never started"
        time.sleep(0.01)
    blocked.stop()
    thread.join(15)
    assert not thread.is_alive(), "the caller was never told the node stopped"
    assert len(errors) == 1 and "stopped before the call was done" in str(errors[0])
