"""Exactly-once commands for a state machine of the user's (the KV store has its own).

A command proposed through the node (``Client.propose``, the embeddable node's ``propose``)
travels as ``client_id u64 | sequence u64 | the user's bytes``. ``ExactlyOnce`` wraps the user's
state machine: a command it has seen returns its first result instead of being applied again
(a client retries with the same numbers), and the table of recent results is part of the
replicated state, so of the snapshot too (written ahead of the user's own snapshot).

Results cross a snapshot as bytes, None or an error's message; any other result (an in-process
proposer may get any object) is kept in memory only, and a retry that comes after a restart from
a snapshot gets an error saying its first result is gone, never a second application.
"""

from __future__ import annotations

import copy
import functools
import logging
import struct
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

from raftfast.dedup import (
    DEDUP_WINDOW,
    MAX_CLIENTS,
    ClientTable,
    ClientWindow,
    remember,
    window_of,
)
from raftfast.errors import MAX_MESSAGE_CHARS, CommandError, CorruptionError, message_of
from raftfast.statemachine import StateMachine

__all__ = ["HEADER", "ExactlyOnce", "frame_command"]

HEADER = struct.Struct("<QQ")  # client id, sequence
_MAGIC = b"RFX1"
_TABLE = struct.Struct("<4sQ")  # magic, client count
_CLIENT = struct.Struct("<QqI")  # client id, max sequence, results kept
_RESULT = struct.Struct("<QBI")  # sequence, kind, length of the data
_NONE, _BYTES, _ERROR, _GONE = range(4)
# The biggest result kept for a retry: its proposer gets a bigger one, and a retry of that
# command an error saying it was applied (a client's window of 4,096 results of 1 MB each
# was 4 GB on every node, and in every snapshot).
MAX_KEPT_RESULT_BYTES = 64 * 1024

log = logging.getLogger("raftfast.node")


def _interrupted(first: int, count: int = 1) -> None:
    """Say why the node stops: a state machine that raises KeyboardInterrupt itself stops
    every node at that entry, again at every start, and nothing said so (a hunt). (An
    apply_batch's: which of its entries, the node cannot tell.)"""
    entries = f"entry {first}" if count == 1 else f"entries {first}-{first + count - 1}"
    log.critical(
        "KeyboardInterrupt while the state machine applied %s: the node stops (if the state "
        "machine raised it itself, every node stops there, at every start)",
        entries,
    )


def frame_command(client_id: int, sequence: int, command: bytes) -> bytes:
    return HEADER.pack(client_id, sequence) + command


class ExactlyOnce(StateMachine):
    def __init__(
        self, inner: StateMachine, window: int = DEDUP_WINDOW, max_clients: int = MAX_CLIENTS
    ) -> None:
        self.inner = inner
        self._window = window
        self._max_clients = max_clients
        self._clients = ClientTable()

    # -- applying --------------------------------------------------------------------------

    def apply(self, index: int, command: bytes) -> Any:
        if len(command) < HEADER.size:
            return CommandError("malformed command: shorter than its header")
        client_id, seq = HEADER.unpack_from(command)
        body = command[HEADER.size :]
        if not client_id:
            return self._apply(index, body)
        client = window_of(self._clients, client_id, self._max_clients)
        if client.is_late(seq, self._window):
            return CommandError(f"sequence {seq} is a late duplicate: not applied")
        if seq in client.results:
            return client.results[seq]
        result = _kept(self._apply(index, body))
        remember(self._clients, client, seq, _for_retry(result), self._window)
        return result

    def apply_batch(self, first_index: int, commands: Sequence[bytes]) -> list[Any]:
        """The user's ``apply_batch`` at once when every command is new (the usual case),
        else one by one: the same results and state however the commands are grouped. New
        means neither a duplicate nor late, before the batch and after the commands ahead of
        it in the batch (a client's sequence 10,000 then 1,000 in one batch: the second is late
        once the first is applied; both were applied, and nodes that applied them one by one
        refused the second). Forgetting clients on the way only makes a command newer, never
        older: a command found new here is new in order too."""
        ids = []
        seen: set[tuple[int, int]] = set()
        highest: dict[int, int] = {}  # client -> its highest sequence so far in the batch
        for command in commands:
            if len(command) < HEADER.size:
                return [self.apply(first_index + i, c) for i, c in enumerate(commands)]
            client_id, seq = HEADER.unpack_from(command)
            if client_id:
                window = self._clients.get(client_id)
                top = highest.get(client_id, -1)
                if window is not None:
                    top = max(top, window.max_seq)
                late = seq <= top - self._window  # (ClientWindow.is_late, the batch's included)
                known = late or (window is not None and seq in window.results)
                if known or (client_id, seq) in seen:
                    return [self.apply(first_index + i, c) for i, c in enumerate(commands)]
                seen.add((client_id, seq))
                highest[client_id] = max(top, seq)
            ids.append((client_id, seq))
        # (a duck-typed machine with ``apply`` only: StateMachine's, one by one, each its result)
        apply_batch = getattr(self.inner, "apply_batch", None) or functools.partial(
            StateMachine.apply_batch, self.inner
        )
        try:
            results = apply_batch(first_index, [c[HEADER.size :] for c in commands])
            if isinstance(results, Iterator):
                results = list(results)  # (a generator, say: the results, in order)
        except KeyboardInterrupt:
            _interrupted(first_index, len(commands))
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to every proposer, the node goes on
            # (it must not raise: which of the commands did it apply? Nobody knows now.)
            log.error("the state machine's apply_batch raised (it must not): %r", exc)
            results = [exc] * len(commands)
        if not isinstance(results, list | tuple) or len(results) != len(commands):
            # (applied, but whose result is which? The node cannot say: it stops, saying why)
            raise TypeError(
                f"the state machine's apply_batch returned {_count_of(results)} for "
                f"{len(commands)} commands: it must return a list of one result a command"
            )
        results = [_kept(result) for result in results]
        for (client_id, seq), result in zip(ids, results, strict=True):
            if client_id:
                window = window_of(self._clients, client_id, self._max_clients)
                remember(self._clients, window, seq, _for_retry(result), self._window)
        return results

    def _apply(self, index: int, body: bytes) -> Any:
        try:
            return self.inner.apply(index, body)
        except KeyboardInterrupt:  # (a signal, not the command: StateMachine.apply_batch)
            _interrupted(index)
            raise
        except BaseException as exc:  # noqa: BLE001 - the proposer's error, not ours
            return exc

    def check(self, command: bytes) -> None:
        """The state machine's own check of a command (before it is framed), if it has one."""
        check = getattr(self.inner, "check", None)  # (a class with the same methods may not)
        if check is not None:
            check(command)

    def query(self, request: bytes) -> bytes:
        return self.inner.query(request)

    # -- snapshots -------------------------------------------------------------------------

    def snapshot(self, out: BinaryIO) -> None:
        out.write(_TABLE.pack(_MAGIC, len(self._clients)))
        for client_id, client in self._clients.items():  # least recently active first
            floor = client.max_seq - self._window
            live = sorted(s for s in client.results if s > floor)
            out.write(_CLIENT.pack(client_id, client.max_seq, len(live)))
            for seq in live:
                kind, data = _encode(client.results[seq])
                out.write(_RESULT.pack(seq, kind, len(data)) + data)
        self.inner.snapshot(out)

    def frozen(self) -> ExactlyOnce | None:
        """If the machine has ``frozen()`` (StateMachine's), this table as of now (its
        windows shared until one changes: ``ClientTable.frozen``) around the machine's frozen
        state, for the snapshot thread; else None (the snapshot is taken in the loop)."""
        # (only a method of that name, StateMachine's or one of the same shape: before this
        # hook, a machine's own ``frozen`` attribute of another meaning was never called)
        freeze = getattr(type(self.inner), "frozen", None)
        if not callable(freeze) or freeze is StateMachine.frozen:
            return None
        inner = freeze(self.inner)
        if not callable(getattr(inner, "snapshot", None)):
            return None  # (not a frozen state: the snapshot is taken in the loop)
        twin = copy.copy(self)
        twin.inner = inner
        twin._clients = self._clients.frozen()
        return twin

    def restore(self, inp: BinaryIO) -> None:
        magic, count = _TABLE.unpack(_read(inp, _TABLE.size))
        if magic != _MAGIC:
            raise CorruptionError(f"not an exactly-once table: magic {magic!r}")
        clients: OrderedDict[int, ClientWindow] = OrderedDict()
        for _ in range(count):
            client_id, max_seq, n = _CLIENT.unpack(_read(inp, _CLIENT.size))
            client = clients[client_id] = ClientWindow()
            client.max_seq = max_seq
            for _ in range(n):
                seq, kind, length = _RESULT.unpack(_read(inp, _RESULT.size))
                client.results[seq] = _decode(kind, _read(inp, length))
        table = ClientTable(clients)
        while len(table) > self._max_clients:
            table.forget_oldest()
        self.inner.restore(inp)
        self._clients = table


def _count_of(results: Any) -> str:
    try:
        return f"{len(results)} results"
    except TypeError:
        return f"a {type(results).__name__}"


def _kept(result: Any) -> Any:
    """A result as the table keeps it (and its proposer gets it): an error whose message may
    repeat megabytes of the command is clipped (20 such commands took every node up ~250 MB),
    one whose message cannot be made is named by its type (``message_of``)."""
    if isinstance(result, BaseException):
        try:
            if len(str(result)) <= MAX_MESSAGE_CHARS:
                # Without its traceback and chain: their frames held the command, and the
                # batch it came in, for as long as the table keeps the result (a raising 1 MiB
                # command kept 2 MiB on every node; 150 of them, 350 MB).
                result.__traceback__ = result.__context__ = result.__cause__ = None
                return result
        except Exception:  # noqa: BLE001 - (message_of says what it can)
            pass
        return CommandError(message_of(result))
    if isinstance(result, bytearray | memoryview):
        # (bytes, as a snapshot keeps it: the table counts the same on every replica, and
        # the state machine cannot change a result it keeps after the fact)
        return bytes(result)
    if isinstance(result, str):  # (as it travels: UTF-8, and so a snapshot keeps it)
        try:
            return result.encode()
        except UnicodeEncodeError as exc:
            return CommandError(
                f"applied, but its result cannot be sent: text that is not UTF-8 "
                f"({exc.reason} at {exc.start})"
            )
    return result


def _for_retry(result: Any) -> Any:
    """What the table keeps of a result for a retry: the result, or past
    MAX_KEPT_RESULT_BYTES an error saying the command was applied."""
    if isinstance(result, bytes) and len(result) > MAX_KEPT_RESULT_BYTES:
        return CommandError(
            f"applied; its result ({len(result)} bytes) was more than the "
            f"{MAX_KEPT_RESULT_BYTES} bytes kept for a retry: read the state instead"
        )
    return result


def _encode(result: Any) -> tuple[int, bytes]:
    if result is None:
        return _NONE, b""
    if isinstance(result, bytes | bytearray | memoryview):
        return _BYTES, bytes(result)
    if isinstance(result, BaseException):
        return _ERROR, message_of(result).encode("utf-8", "replace")
    return _GONE, b""


def _decode(kind: int, data: bytes) -> Any:
    if kind == _NONE:
        return None
    if kind == _BYTES:
        return data
    if kind == _ERROR:
        return CommandError(data.decode("utf-8", "replace"))
    if kind == _GONE:
        return CommandError("applied before a restart; its result was not kept")
    raise CorruptionError(f"exactly-once table: unknown result kind {kind}")


def _read(inp: BinaryIO, n: int) -> bytes:
    data = inp.read(n)
    if len(data) != n:
        raise CorruptionError(f"exactly-once table truncated: {n} bytes wanted, {len(data)} read")
    return data
