"""gRPC and ``os.fork``: a process forked while a ``SyncClient``'s thread ran in its parent
cannot use gRPC (gRPC skips its fork handlers while another thread is inside it): a client made
there waited out its whole timeout and then said no leader was reachable.
``refuse_if_forked_while_open`` says why at once instead."""

from __future__ import annotations

import os
import threading
import weakref

from raftfast.errors import RaftfastError

FORKED_WHILE_OPEN = (
    "this process was forked while a SyncClient was open in its parent, and gRPC does not work "
    "in such a child: close clients before forking, or start processes with multiprocessing's "
    "'spawn' (or 'forkserver') method"
)

_threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()  # SyncClients' threads
_busy_at_fork = False  # (in the parent, between the fork's before and after hooks)
_cannot_use_grpc = False  # this process was forked while such a thread ran


def client_thread_started(thread: threading.Thread) -> None:
    _threads.add(thread)


def refuse_if_forked_while_open() -> None:
    """RaftfastError if this process cannot use gRPC for the reason above."""
    if _cannot_use_grpc:
        raise RaftfastError(FORKED_WHILE_OPEN)


def _before_fork() -> None:
    global _busy_at_fork
    _busy_at_fork = any(thread.is_alive() for thread in _threads)


def _after_fork_in_child() -> None:
    global _cannot_use_grpc
    _cannot_use_grpc = _cannot_use_grpc or _busy_at_fork


def _after_fork_in_parent() -> None:
    global _busy_at_fork
    _busy_at_fork = False


os.register_at_fork(
    before=_before_fork,
    after_in_child=_after_fork_in_child,
    after_in_parent=_after_fork_in_parent,
)
