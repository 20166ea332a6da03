"""Exceptions shared by the compiled modules, their pure twins and the public API."""

from __future__ import annotations


class RaftfastError(Exception):
    """Base class of every raftfast error."""


class BatchError(RaftfastError, ValueError):
    """A packed entry batch is malformed: bad magic, truncated, wrong length or CRC mismatch."""


class LogError(RaftfastError):
    """An operation on the in-memory log is not valid for its current bounds."""


class CompactedError(LogError, IndexError):
    """The requested index lies before the log's first index (it was compacted away)."""


class UnavailableError(LogError, IndexError):
    """The requested index lies after the log's last index."""


class CorruptionError(RaftfastError):
    """Durable state is corrupt; the node must not start on it.

    ``path`` and ``offset`` name where the damage was found.
    """

    def __init__(self, message: str, path: str = "", offset: int = -1) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset


class FormatVersionError(CorruptionError):
    """Durable state in a format this raftfast does not know: written by a newer version (or
    not by raftfast at all). The node does not start; upgrade raftfast, or restore a backup."""


class StorageError(RaftfastError):
    """Durable storage failed (a write or fdatasync error); the node must stop."""


class DiskFullError(StorageError):
    """A snapshot found no room on its disk (ENOSPC, or it would have taken the room kept for
    the log): its file is deleted, and the node goes on with its log (it raises NOSPACE)."""


class NotLeaderError(RaftfastError):
    """The node is not the leader; ``leader_id`` is the known leader, or None."""

    def __init__(self, message: str = "not the leader", leader_id: str | None = None) -> None:
        super().__init__(message)
        self.leader_id = leader_id


class DeadlineExceededError(RaftfastError, TimeoutError):
    """A client call did not complete within its deadline.

    A write that timed out may still have been applied (or be applied later); retrying it with a
    new call is a new write.
    """


class ClusterUnavailableError(DeadlineExceededError):
    """The deadline passed while no leader (or, for status, no node) could be reached.

    A subclass of DeadlineExceededError: every endpoint refused, was unreachable or knew no
    leader for the whole deadline.
    """


class InvalidArgumentError(RaftfastError, ValueError):
    """The server rejected a request as invalid (oversized key, bad limit...); never retried."""


class RequestFailedError(RaftfastError):
    """The server answered with an unexpected error status; ``code`` is its name (e.g. INTERNAL)."""

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code


class PermissionDeniedError(RequestFailedError):
    """The cluster refused the call: the client's certificate has no role that allows it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "PERMISSION_DENIED")


class NoSpaceError(RequestFailedError):
    """The cluster refused a write: its NOSPACE alarm is raised (the state passed
    ``--quota-backend-bytes``, or a disk is nearly full). Deletes still work; once space is
    freed, ``raftfast alarm disarm`` clears the alarm."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "RESOURCE_EXHAUSTED")


class CommandError(RaftfastError):
    """A state machine refused a command or a query: its ``apply`` returned (or raised) an
    exception, or its ``query`` raised one. Its message is the state machine's (at most
    ``MAX_MESSAGE_CHARS`` of it: ``clipped``)."""


# An error's message may repeat what a client sent (megabytes); a gRPC status carries at most
# 16 KiB of metadata (past it the client sees "received metadata size exceeds hard limit").
MAX_MESSAGE_CHARS = 1024


def message_of(exc: BaseException) -> str:
    """``exc``'s message, clipped, or its type's name; never raises (``str`` of a KeyError of
    a 5,000-digit int does: a client's command made every node stop at each replay)."""
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - any message at all is better than a crash
        text = ""
    return clipped(text) or type(exc).__name__


def clipped(message: str) -> str:
    """``message``, cut to ``MAX_MESSAGE_CHARS`` (saying how much was left out), and made
    valid UTF-8: a lone surrogate (a client's string decoded with ``surrogatepass``, repeated
    in an error) is written as its escape. gRPC could not send such a status, and the call
    was never answered."""
    if len(message) > MAX_MESSAGE_CHARS:
        cut = len(message) - MAX_MESSAGE_CHARS
        message = f"{message[:MAX_MESSAGE_CHARS]}... ({cut} more characters)"
    if message.isascii():
        return message
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


class LockLostError(RaftfastError):
    """A ``ReplLock.hold`` block lost its lock (its lease ran out, or another holder took it):
    the block was cancelled."""


class ChangeInProgressError(RaftfastError):
    """A membership change cannot start yet (one is uncommitted, or the leader is new); retry."""


class AddressTakenError(ValueError):
    """A member add at an address that reaches another member's host and port (the etcd API
    answers it as PEER_URL_EXIST)."""
