"""Session frames of PUTs and DELETEs go the short way (``KVService._writes_now``: proposed as
they are read, answered from a callback, no task of their own): the same answers, the same
state, the same order and the same budgets as the general path (``_session_frame``)."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from raftfast.errors import NotLeaderError
from raftfast.proto import raftfast_pb2 as pb
from raftfast.server.kv_service import FAST_FRAME_OPS
from raftfast.server.session_stream import StreamContext
from tests.kv import test_service
from tests.kv.test_service import FakeNode, _frame, run, serve_service
from tests.polling import until


class SubmittingNode(FakeNode):
    """A FakeNode with ``submit``, as the Driver has: short PUT frames use it."""

    def __init__(self, *args: object, leader: str | None = None, **overrides: object) -> None:
        super().__init__(*args, **overrides)
        self.submitted = 0
        self.leader = leader

    def submit(self, payloads: list[bytes]) -> asyncio.Future:
        if not self.is_leader:
            raise NotLeaderError(leader_id=self.leader)
        self.submitted += 1
        return asyncio.ensure_future(self.propose(payloads))


def put(key: bytes, value: bytes = b"v", sequence: int = 0) -> pb.Op:
    return pb.Op(kind=pb.Op.PUT, key=key, value=value, sequence=sequence)


FRAMES = [
    _frame(1, put(b"a", b"1", 1)),
    _frame(2, put(b"a", b"1", 1)),  # the same write again: a duplicate
    _frame(3, put(b"b", b"2", 2), put(b"c", b"3", 3)),
    _frame(4, put(b"", b"x", 4)),  # an empty key: INVALID_ARGUMENT, from the general path
    _frame(5, pb.Op(kind=pb.Op.GET, key=b"a")),
    _frame(6, *(put(b"k%d" % i, b"x", 10 + i) for i in range(FAST_FRAME_OPS + 1))),
    _frame(7, put(b"d", b"4", 2**64 - 1)),  # a sequence past the limit
    _frame(8, pb.Op(kind=pb.Op.CAS, key=b"a", expected=b"1", value=b"5", sequence=200)),
    _frame(9, put(b"e", b"v" * 40, 201)),  # a value over max_value_bytes
    _frame(10, put(b"f", b"6", 202), pb.Op(kind=pb.Op.DELETE, key=b"b", sequence=203)),
    _frame(11),  # no ops
    _frame(12, pb.Op(kind=pb.Op.DELETE, key=b"c", sequence=204)),
    _frame(13, pb.Op(kind=pb.Op.DELETE, key=b"never", sequence=205)),  # nothing to delete
    _frame(14, pb.Op(kind=pb.Op.DELETE, key=b"", sequence=206)),  # an empty key
    _frame(15, pb.Op(kind=pb.Op.DELETE, key=b"f", sequence=2**63)),  # a sequence past it
]
SHORT_WAY = {1, 2, 3, 10, 12, 13}  # the frames that qualify


async def answers(node: FakeNode, frames: list[pb.SessionFrame]) -> dict[int, pb.SessionResult]:
    """Each frame sent and answered alone, in order (the fake applies as it proposes)."""
    out = {}
    async with serve_service(node) as (_service, kv):
        call = kv.Session()
        for frame in frames:
            await call.write(frame)
            result = await call.read()
            out[result.frame_id] = result
        await call.done_writing()
    return out


def test_short_frames_answer_as_the_general_path_does() -> None:
    async def main() -> None:
        general, short = FakeNode(max_value_bytes=32), SubmittingNode(max_value_bytes=32)
        expected, got = await answers(general, FRAMES), await answers(short, FRAMES)
        assert got == expected
        assert [r.code for r in got[4].results] == [3] and got[1].results[0].ok
        assert short.submitted == len(SHORT_WAY)
        assert len(short.proposals) == len(general.proposals)
        assert short.fsm.dump() == general.fsm.dump()

    run(main())


def test_a_short_frame_waits_behind_a_general_one_of_its_stream() -> None:
    # Proposed as it is read, frame 2 would have overtaken frame 1, still in its task.
    async def main() -> None:
        node = SubmittingNode()
        release = asyncio.Event()

        async def gate(payloads: list[bytes]) -> None:
            if len(payloads) > 1:
                await release.wait()

        node.gate = gate
        async with serve_service(node) as (_service, kv):
            call = kv.Session()
            more = FAST_FRAME_OPS  # (too many for the short way)
            first = [put(b"x", b"old", 1)] + [put(b"y%d" % i, sequence=2 + i) for i in range(more)]
            await call.write(_frame(1, *first))
            await until("len(node.proposals) == 1", lambda: len(node.proposals) == 1, 5.0)
            await call.write(_frame(2, put(b"x", b"new", 100)))
            assert (await call.read()).frame_id == 2  # (the fake applies it at once)
            assert node.submitted == 0  # the general path: proposed after frame 1
            assert [len(p) for p in node.proposals] == [more + 1, 1]
            release.set()
            assert (await call.read()).frame_id == 1
            await call.write(_frame(3, put(b"z", b"1", 101)))  # none pending: the short way
            assert (await call.read()).results[0].ok and node.submitted == 1
            await call.done_writing()

    run(main())


def test_failures_after_a_short_frame_was_proposed_are_answered_per_op() -> None:
    async def main() -> None:
        async def gate(payloads: list[bytes]) -> None:
            if any(b"boom" in p for p in payloads):
                raise RuntimeError("kaboom")
            if any(b"lost" in p for p in payloads):
                raise NotLeaderError(leader_id="n2")

        results = {}
        for node in (FakeNode(), SubmittingNode()):
            node.gate = gate
            results[type(node)] = await answers(
                node, [_frame(1, put(b"boom"), put(b"ok")), _frame(2, put(b"lost"))]
            )
            assert getattr(node, "submitted", 2) == 2
        general, short = results.values()
        assert short == general
        assert [r.code for r in short[1].results] == [13, 13] and "kaboom" in str(short[1])
        assert short[2].results[0].code == 14 and short[2].leader == "127.0.0.1:7002"

    run(main())


def test_a_follower_refuses_short_frames_as_it_refuses_others() -> None:
    async def main() -> None:
        class Follower(SubmittingNode):
            async def propose(self, payloads: list[bytes]) -> list[bool | None]:
                raise NotLeaderError(leader_id="n2")

        node = Follower(leader="n2")
        node.is_leader = False
        got = await answers(node, [_frame(1, put(b"k", b"v", 1))])
        assert node.submitted == 0
        assert got[1].results[0].code == 14 and got[1].leader == "127.0.0.1:7002"

    run(main())


def test_a_stream_that_ends_with_short_frames_under_way_gives_back_what_they_held() -> None:
    async def main() -> None:
        node = SubmittingNode()
        release = asyncio.Event()

        async def gate(payloads: list[bytes]) -> None:
            await release.wait()

        node.gate = gate
        async with serve_service(node) as (service, kv):
            call = kv.Session()
            for i in range(5):
                await call.write(_frame(i + 1, put(b"k%d" % i, b"v" * 100, i + 1)))
            await until("node.submitted == 5", lambda: node.submitted == 5, 5.0)
            assert service._budget.used > 0
            call.cancel()
            await until("service._sessions == 0", lambda: service._sessions == 0, 5.0)
            await until("service._budget.used == 0", lambda: service._budget.used == 0, 5.0)
            release.set()  # (their results come after the stream: nothing more to give back)
            await until(
                'node.fsm.get(b"k4") is not None', lambda: node.fsm.get(b"k4") is not None, 5.0
            )
            await asyncio.sleep(0.05)
            assert service._budget.used == 0
            node.gate = None
            call = kv.Session()
            await call.write(_frame(9, put(b"after", b"ok", 9)))
            assert (await call.read()).results[0].ok

    run(main())


# -- frames handed over as they arrive (the TCP stream: StreamContext.take_frame) -------------


async def drive(service, context, queue: asyncio.Queue) -> list[pb.SessionResult]:
    """``service.Session`` over ``context``, its queued frames from ``queue`` (None: the end)."""

    async def frames():
        while (raw := await queue.get()) is not None:
            yield len(raw), raw

    return [result async for result in service.Session(frames(), context)]


def test_frames_handed_over_as_they_arrive_are_taken_unless_something_would_wait(
    monkeypatch,
) -> None:
    from raftfast.server import kv_service

    monkeypatch.setattr(kv_service, "MAX_SESSION_INFLIGHT", 2)  # two frames under way at most

    async def main() -> None:
        node = SubmittingNode()
        release = asyncio.Event()

        async def gate(payloads: list[bytes]) -> None:
            if any(b"held" in p for p in payloads):
                await release.wait()

        node.gate = gate
        async with serve_service(node) as (service, _kv):
            context, queue = StreamContext("", None), asyncio.Queue()
            session = asyncio.create_task(drive(service, context, queue))
            await until(
                "context.take_frame is not None", lambda: context.take_frame is not None, 5.0
            )
            take = context.take_frame

            def frame(i: int, key: bytes) -> bytes:
                return _frame(i, put(key, b"v", i)).SerializeToString()

            assert take(len(frame(1, b"held1")), frame(1, b"held1"))
            assert not take(3, b"\xff\xff\xff")  # not a frame: the queue's reader says so
            zero = _frame(0, put(b"k0")).SerializeToString()
            assert not take(len(zero), zero)  # (the stream's own frame id)
            assert take(len(frame(2, b"held2")), frame(2, b"held2"))
            assert node.submitted == 2
            assert not take(len(frame(3, b"k3")), frame(3, b"k3"))  # both slots taken
            queue.put_nowait(frame(3, b"k3"))
            await asyncio.sleep(0.05)
            assert node.submitted == 2  # read, waiting for a slot: nothing overtakes it
            assert not take(len(frame(4, b"k4")), frame(4, b"k4"))
            release.set()
            queue.put_nowait(frame(4, b"k4"))
            queue.put_nowait(None)
            results = await session
            assert sorted(r.frame_id for r in results) == [1, 2, 3, 4]
            assert all(r.results[0].ok for r in results)
            assert context.take_frame is None  # (the stream is over: nothing more is taken)
            assert service._budget.used == 0

    run(main())


def test_an_answer_sent_from_its_callback_still_lets_the_stream_end() -> None:
    # (every answer sent at once: the writer, waiting for the last of them, is woken to end)
    async def main() -> None:
        sent: list[int] = []

        def send_now(result: pb.SessionResult) -> bool:
            sent.append(result.frame_id)
            return True

        node, release = SubmittingNode(), asyncio.Event()

        async def gate(payloads: list[bytes]) -> None:
            await release.wait()

        node.gate = gate
        async with serve_service(node) as (service, _kv):
            context, queue = StreamContext("", None, send_now), asyncio.Queue()
            session = asyncio.create_task(drive(service, context, queue))
            await until(
                "context.take_frame is not None", lambda: context.take_frame is not None, 5.0
            )
            for i in range(1, 11):
                raw = _frame(i, put(b"k%d" % i, b"v", i)).SerializeToString()
                assert context.take_frame(len(raw), raw)
            queue.put_nowait(None)  # the input ends: the writer waits for the 10 answers
            await asyncio.sleep(0.05)
            release.set()
            assert await asyncio.wait_for(session, 5) == []  # (nothing left for the writer)
            assert sorted(sent) == list(range(1, 11))
            assert service._budget.used == 0

    run(main())


def test_a_failure_on_the_short_way_leaves_the_frame_to_the_general_path() -> None:
    async def main() -> None:
        class Broken(SubmittingNode):
            def submit(self, payloads: list[bytes]) -> asyncio.Future:
                raise RuntimeError("submit is broken")

        def send_now(result: pb.SessionResult) -> bool:
            raise OSError("the connection is broken")

        for node, sender in ((Broken(), None), (SubmittingNode(), send_now)):
            async with serve_service(node) as (_service, _kv):
                context, queue = StreamContext("", None, sender), asyncio.Queue()
                session = asyncio.create_task(drive(_service, context, queue))
                await until(
                    "context.take_frame is not None",
                    lambda: context.take_frame is not None,  # noqa: B023
                    5.0,
                )
                raw = _frame(1, put(b"k", b"v", 1)).SerializeToString()
                assert context.take_frame(len(raw), raw)
                queue.put_nowait(None)
                results = await asyncio.wait_for(session, 5)  # (the writer sent it)
                assert [(r.frame_id, r.results[0].ok) for r in results] == [(1, True)]
                assert node.fsm.get(b"k") == b"v"

    run(main())


def test_a_stream_with_a_deadline_takes_the_general_path() -> None:
    async def main() -> None:
        node = SubmittingNode()
        async with serve_service(node) as (_service, kv):
            call = kv.Session(timeout=10)
            await call.write(_frame(1, put(b"k", b"v", 1)))
            assert (await call.read()).results[0].ok
            await call.done_writing()
        assert node.submitted == 0 and len(node.proposals) == 1

    run(main())


@pytest.mark.parametrize("name", [n for n in dir(test_service) if n.startswith("test_")])
def test_the_service_tests_hold_on_the_short_way(name: str, monkeypatch) -> None:
    # (each test of the general path, its FakeNode with ``submit``: every short frame goes
    # the short way, and the answers, budgets, quota and limits they check stay the same)
    monkeypatch.setattr(test_service, "FakeNode", SubmittingNode)
    test = getattr(test_service, name)
    test(
        **(
            {"monkeypatch": monkeypatch}
            if "monkeypatch" in inspect.signature(test).parameters
            else {}
        )
    )


@pytest.mark.parametrize("why", ["a budget line", "a full turn"])
def test_a_short_frame_whose_answer_must_wait_is_answered_from_a_task(
    why: str, monkeypatch
) -> None:
    from raftfast.server import kv_service

    async def main() -> None:
        node = SubmittingNode()
        async with serve_service(node) as (service, kv):
            if why == "a budget line":
                monkeypatch.setattr(kv_service._StreamBytes, "request_done_now", lambda *_: False)
            else:
                # (full when the answer is built: after the frame was proposed)
                monkeypatch.setattr(service._turn, "full", lambda: node.submitted > 0)
            call = kv.Session()
            await call.write(_frame(1, put(b"k", b"v", 1), put(b"l", b"w", 2)))
            result = await asyncio.wait_for(call.read(), 5)
            assert [r.ok for r in result.results] == [True, True] and node.submitted == 1
            # and a stream cancelled while such a task waits gives back what it held
            release = asyncio.Event()

            async def gate(payloads: list[bytes]) -> None:
                await release.wait()

            node.gate = gate
            await call.write(_frame(2, put(b"m", b"x", 3)))
            await until("len(node.proposals) == 2", lambda: len(node.proposals) == 2, 5.0)
            call.cancel()
            release.set()
            await until("service._sessions == 0", lambda: service._sessions == 0, 5.0)
            await until("service._budget.used == 0", lambda: service._budget.used == 0, 5.0)

    run(main())
