"""What raftfast replicates: your state machine.

A ``StateMachine`` changes only when a committed command is applied to it, in log order, on
every node; so ``apply`` must be deterministic: the same commands in the same order give the
same state and the same results everywhere (no clocks, no randomness, no I/O, no dict-order
surprises). Its return value is the proposer's result. ``query`` reads without changing
anything (the node decides when that is safe: linearizable, lease or stale). ``snapshot`` and
``restore`` stream the whole state through file objects, so state larger than what fits in one
``bytes`` works; the node snapshots every so many commands and sends snapshots to followers
that fell behind.

::

    class Counter(raftfast.StateMachine):
        def __init__(self):
            self.value = 0

        def apply(self, index: int, command: bytes) -> bytes:
            self.value += int(command)
            return str(self.value).encode()

        def query(self, request: bytes) -> bytes:
            return str(self.value).encode()

        def snapshot(self, out):
            out.write(str(self.value).encode())

        def restore(self, inp):
            self.value = int(inp.read())

This module needs nothing but the standard library: the pure core, the storage and a state
machine can be used where gRPC is not installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, BinaryIO

__all__ = ["StateMachine", "missing_methods"]


class StateMachine:
    """The interface (hashicorp/raft's FSM, etcd-io/raft's "the application applies committed
    entries"). Subclass it, or write a class with the same methods."""

    def apply(self, index: int, command: bytes) -> Any:
        """Apply the committed command at log ``index``; return the proposer's result (an
        exception returned, not raised, is handed to the proposer as its error). Deterministic:
        every node applies the same commands in the same order."""
        raise NotImplementedError

    def apply_batch(self, first_index: int, commands: Sequence[bytes]) -> list[Any]:
        """Apply consecutive commands at ``first_index``, ``first_index + 1``...; their results
        in order. Override it when many commands at once can be applied faster than one by
        one; it must not raise, and must give each command the result ``apply`` would (how
        committed commands are grouped differs from node to node, and after a restart).
        Here, an ``apply`` that raises is that command's result (its proposer's error), as
        when it is applied alone: the others are not touched. (Any exception but
        KeyboardInterrupt, a signal that comes to one node and not the others: SystemExit too,
        a command that made every node exit would make them exit again at each restart,
        replaying it; asyncio's CancelledError raised by a command stopped every node's
        applying for good.)"""
        results: list[Any] = []
        for i, command in enumerate(commands):
            try:
                results.append(self.apply(first_index + i, command))
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - that proposer's error
                results.append(exc)
        return results

    def check(self, command: bytes) -> None:
        """Optional: raise ValueError to refuse a client's command before it is proposed (the
        node it was sent to calls it: a refused command never reaches the log). ``apply`` must
        still take any command: a log written before a check changed replays as it was."""

    def query(self, request: bytes) -> bytes:
        """Answer a read without changing anything."""
        raise NotImplementedError

    def snapshot(self, out: BinaryIO) -> None:
        """Write the whole state to ``out`` (the same state, the same bytes: a snapshot is
        taken between two applies, in the node's event loop)."""
        raise NotImplementedError

    def restore(self, inp: BinaryIO) -> None:
        """Replace the whole state with the one ``snapshot`` wrote (read from ``inp``)."""
        raise NotImplementedError

    def frozen(self) -> Any:
        """Optional: the state as of now in an object whose ``snapshot(out)`` writes what
        ``snapshot`` would write now; the node calls it in a snapshot thread of its own while
        this machine goes on applying (hashicorp/raft's FSMSnapshot). It must be cheap to take
        (an immutable structure shared, a copy-on-write view: the loop waits for it) and must
        not change afterwards, whatever this machine does meanwhile (``apply``, and ``restore``
        of a leader's snapshot). None, the default (or anything without ``snapshot``): the
        node calls ``snapshot`` in its event loop, between two applies (a big state holds the
        loop that long at every snapshot). A ``frozen`` or its ``snapshot`` that raises is a
        snapshot refused, tried again later, as a ``snapshot`` that raises."""
        return None


def missing_methods(machine: object) -> list[str]:
    """The methods a state machine must have that ``machine`` lacks (duck-typed: a class with
    the same methods as StateMachine will do)."""
    return [
        m
        for m in ("apply", "query", "snapshot", "restore")
        if not callable(getattr(machine, m, None))
    ]
