"""The node's file descriptors: enough for every connection its limits let in, plus its files.

Each listener caps its connections (the client port at ``--max-client-connections``, the TCP
streams and the peer port at theirs), so a stranger opening connections is turned away at the
cap instead of taking the descriptors the WAL and snapshots need. That holds only if the
process may open that many: many systems start processes with a soft limit of 1,024. As Go
does for etcd, the node raises its soft limit to the hard one, and warns if even that is short.
"""

from __future__ import annotations

import resource

RESERVE = 512  # the WAL, snapshots, the data directory's lock, logs, gRPC's own, threads


def needed(connection_caps: list[int]) -> int:
    """Descriptors for ``connection_caps`` (each listener's cap) and the node's own files."""
    return sum(connection_caps) + RESERVE


def raise_limit(need: int) -> str | None:
    """Raise the soft RLIMIT_NOFILE to the hard one (at most what is needed, if the hard
    limit is unlimited); a warning if the result is still below ``need``, else None."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return None
    target = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        return (
            f"this process may open {soft} file descriptors, and its connection limits let "
            f"in up to {need - RESERVE} connections: a flood of connections could leave none "
            f"for its files; raise `ulimit -n` to at least {need} or lower "
            "--max-client-connections"
        )
    return None


__all__ = ["RESERVE", "needed", "raise_limit"]
