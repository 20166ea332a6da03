"""Quorum arithmetic. Tiny and pure on purpose: it is where safety is decided."""

from __future__ import annotations

from collections.abc import Iterable

from raftfast._accel import commit_index


def quorum_size(voters: int) -> int:
    """Votes (or durable copies) needed among ``voters``: a strict majority."""
    return voters // 2 + 1


def quorum_match(match_indexes: Iterable[int]) -> int:
    """The highest index durable on a quorum: the (n//2+1)-th largest match index.

    Raft §5.4.2: the caller may commit it only if that entry's term is the current term.
    """
    return commit_index(list(match_indexes))


def vote_result(granted: int, rejected: int, voters: int) -> bool | None:
    """True once a quorum granted, False once a quorum can no longer be reached, else None."""
    need = quorum_size(voters)
    if granted >= need:
        return True
    if voters - rejected < need:
        return False
    return None
