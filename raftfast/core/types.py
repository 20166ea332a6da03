"""Plain data types of the Raft core: hard state, messages and Ready.

Entries never appear here as Python objects: they travel as packed batches (bytes) produced by
``EntryLog.slice`` and understood by ``raftfast._accel.decode_batch``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import NamedTuple

# Entry types carried in the packed batch's per-entry type byte.
ENTRY_NORMAL = 0  # a client command, handed to the state machine
ENTRY_NOOP = 1  # appended by a new leader to commit entries of earlier terms (Raft §5.4.2)
ENTRY_CONFIG = 2  # a membership change (reserved for the membership issue)


class HardState(NamedTuple):
    """What must be durable before a node answers anyone: term, vote and commit index."""

    term: int = 0
    vote: str = ""  # "" = voted for nobody in ``term``
    commit: int = 0


class Role(IntEnum):
    FOLLOWER = 0
    PRE_CANDIDATE = 1
    CANDIDATE = 2
    LEADER = 3


class MsgType(IntEnum):
    APPEND = 1  # AppendEntries: prev index/term, packed entries, leader commit
    APPEND_RESP = 2  # index = match index, or on reject the rejected prev index + hints
    VOTE = 3  # RequestVote: index/log_term = candidate's last entry
    VOTE_RESP = 4
    PRE_VOTE = 5  # same as VOTE, but term is the term the sender *would* campaign in
    PRE_VOTE_RESP = 6
    HEARTBEAT = 7  # commit = min(follower match, leader commit)
    HEARTBEAT_RESP = 8
    TIMEOUT_NOW = 9  # leadership transfer (reserved)
    SNAPSHOT = 10  # InstallSnapshot (reserved)


@dataclass(slots=True)
class Message:
    """One Raft message. Unused fields stay at their defaults (like etcd's raftpb.Message)."""

    type: MsgType
    src: str
    dst: str
    term: int
    index: int = 0  # APPEND: prev index; APPEND_RESP: match/rejected index; VOTE: last index
    log_term: int = 0  # APPEND: prev term; VOTE: last term; APPEND_RESP reject: hint term
    entries: bytes = b""  # APPEND: packed batch (may be empty)
    commit: int = 0
    reject: bool = False
    hint: int = 0  # APPEND_RESP reject: follower's suggested next probe index
    context: int = 0  # HEARTBEAT(_RESP): the ReadIndex round being confirmed


class Committed(NamedTuple):
    """Entries to apply: ``first`` and each one's term, type and payload."""

    first: int
    terms: list[int]
    types: list[int]
    payloads: list[bytes]

    @property
    def last(self) -> int:
        return self.first + len(self.terms) - 1


@dataclass(slots=True)
class Ready:
    """What the driver must do now, in this order (see RawNode):

    0. if ``snapshot`` is set ((index, term) of the snapshot the driver received from the
       leader): make it durable, discard the whole stored log and restart it after ``index``,
       and restore the state machine from it;
    1. persist ``hard_state`` (if not None) and ``entries`` (a packed batch; may be empty), with
       one write and one fdatasync;
    2. send ``messages`` (only after step 1 is durable) — ``eager_messages`` may be sent at once,
       before or while persisting (the leader's AppendEntries and heartbeats, thesis §10.2.1);
    3. apply ``committed`` (the entries now known committed, if any) to the state machine;
    4. call ``RawNode.advance(ready)``.
    """

    hard_state: HardState | None = None
    snapshot: tuple[int, int] | None = None
    entries: bytes = b""
    last_index: int = 0  # last index in ``entries`` (0 when empty)
    last_term: int = 0
    messages: list[Message] = field(default_factory=list)
    eager_messages: list[Message] = field(default_factory=list)
    committed: Committed | None = None
    committed_last: int = 0  # last index in ``committed`` (0 when None)
    soft_state: tuple[Role, str] | None = None  # (role, leader id) when it changed
    read_states: list[tuple[int, int]] = field(default_factory=list)  # (request id, read index)

    def is_empty(self) -> bool:
        return not (
            self.hard_state
            or self.snapshot
            or self.entries
            or self.messages
            or self.eager_messages
            or self.committed
            or self.soft_state
            or self.read_states
        )
