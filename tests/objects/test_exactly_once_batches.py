"""ExactlyOnce gives the same results and the same state however committed commands are
grouped into ``apply_batch`` calls: a leader and a follower that caught up from the log group
them differently, and must not disagree (a state machine user's hunt: sequence 10,000 then
1,000 of one client in one batch were both applied; one at a time the second is late)."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from raftfast.errors import CommandError
from raftfast.exactly_once import ExactlyOnce, frame_command

WINDOW = 8  # (small: late commands and windows that slide are common)


class Log:
    """Appends every command it applies: its state is the order of what it applied."""

    def __init__(self) -> None:
        self.applied: list[bytes] = []

    def apply(self, index: int, command: bytes) -> bytes:
        self.applied.append(command)
        return b"%d" % len(self.applied)

    def apply_batch(self, first_index: int, commands: Sequence[bytes]) -> list[bytes]:
        return [self.apply(first_index + i, c) for i, c in enumerate(commands)]


def _outcome(result: object) -> object:
    return ("error", str(result)) if isinstance(result, CommandError) else result


def _run(commands: list[bytes], cuts: list[int], max_clients: int) -> tuple[list, list]:
    """Apply ``commands`` in batches cut at ``cuts``: (results, what the machine applied)."""
    machine = ExactlyOnce(Log(), window=WINDOW, max_clients=max_clients)
    results: list = []
    bounds = [0, *sorted(set(cuts)), len(commands)]
    for start, end in zip(bounds, bounds[1:], strict=False):
        if start < end:
            results += machine.apply_batch(start + 1, commands[start:end])
    return [_outcome(r) for r in results], machine.inner.applied


def test_a_late_command_after_a_jump_in_the_same_batch_is_not_applied() -> None:
    commands = [frame_command(5, 10_000, b"A"), frame_command(5, 1_000, b"B")]
    one_by_one = _run(commands, [1], 100)
    batched = _run(commands, [], 100)
    assert one_by_one[1] == [b"A"]
    assert batched == one_by_one


command = st.tuples(
    st.integers(0, 3),  # client id (0: no exactly-once)
    st.integers(1, 40),  # sequence: jumps past the window, duplicates and late ones
    st.sampled_from([b"x", b"y"]),
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(command, min_size=1, max_size=30),
    st.lists(st.integers(1, 29), max_size=6),
    st.integers(1, 3),
)
def test_any_grouping_gives_the_same_results_and_state(calls, cuts, max_clients) -> None:
    commands = [frame_command(client, seq, body) for client, seq, body in calls]
    one_by_one = _run(commands, list(range(1, len(commands))), max_clients)
    assert _run(commands, [], max_clients) == one_by_one
    assert _run(commands, cuts, max_clients) == one_by_one
