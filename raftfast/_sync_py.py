"""Pure-Python twin of raftfast._sync: the same FileWriter on a Python thread.

It calls ``os.writev`` and ``os.fdatasync`` at call time, so tests can count or fail them.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Iterable

_IOV_MAX = 1024  # buffers per writev (Linux's limit)


class _State:
    """What the thread shares with the writer (the thread holds no reference to the writer,
    so one dropped unclosed is collected, and its finalizer stops the thread)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.job: tuple[int, list[memoryview], bool, float] | None = None
        self.outcome: int | OSError = 0
        self.stop = False
        self.done_fd, self.signal_fd = os.pipe()  # (one byte per job done)
        os.set_blocking(self.done_fd, False)


class FileWriter:
    """A thread of its own that writes pieces to a file descriptor, then fdatasyncs it."""

    def __init__(self) -> None:
        self._state = state = _State()
        self._busy = False
        thread = threading.Thread(target=_main, args=(state,), name="raftfast-writer", daemon=True)
        thread.start()
        self._close = weakref.finalize(self, _close, state, thread)

    def fileno(self) -> int:
        """Readable once a submitted job is done (a pipe)."""
        return self._state.done_fd

    @property
    def busy(self) -> bool:
        return self._busy

    def submit(self, fd: int, pieces: Iterable, datasync: bool, delay: float = 0.0) -> None:
        """Write ``pieces`` in order to ``fd``, then fdatasync it if ``datasync``. ``delay``
        (seconds, tests only) makes the thread start that much later."""
        if not self._close.alive:
            raise RuntimeError("the writer is closed")
        if self._busy:
            raise RuntimeError("the writer is busy with an earlier job")
        views = [memoryview(p) for p in pieces]  # TypeError for what is not bytes-like
        self._busy = True
        state = self._state
        with state.cond:
            state.job = (fd, views, bool(datasync), delay)
            state.cond.notify()

    def result(self) -> int | None:
        """The bytes the finished job wrote (raises its OSError); None while it runs."""
        if not self._busy:
            raise RuntimeError("no job was submitted")
        state = self._state
        try:
            if not os.read(state.done_fd, 1):
                return None
        except BlockingIOError:
            return None
        self._busy = False
        with state.cond:
            outcome = state.outcome
        if isinstance(outcome, OSError):
            raise outcome
        return outcome

    def close(self) -> None:
        """Stop the thread once its job (if any) is done; then the writer cannot be used."""
        self._busy = False
        self._close()


def _close(state: _State, thread: threading.Thread) -> None:
    with state.cond:
        state.stop = True
        state.cond.notify()
    if thread is not threading.current_thread():
        thread.join()
    os.close(state.done_fd)
    os.close(state.signal_fd)


def _main(state: _State) -> None:
    while True:
        with state.cond:
            while state.job is None and not state.stop:
                state.cond.wait()
            if state.job is None:
                return
            fd, views, sync, delay = state.job
        if delay > 0:
            time.sleep(delay)
        outcome: int | OSError
        try:
            outcome = write_all(fd, views)
            if sync:
                datasync(fd)
        except OSError as exc:
            outcome = exc
        except Exception as exc:  # noqa: BLE001 - a dead thread would leave the WAL waiting
            outcome = OSError(f"the WAL writer failed: {exc!r}")
        with state.cond:
            state.outcome = outcome
            state.job = None
        os.write(state.signal_fd, b"\x01")


def datasync(fd: int) -> None:
    """fdatasync (fsync on macOS, which has none), looked up at call time so tests can count
    or fail it. (The WAL's own syncs in the loop go through here too.)"""
    sync = getattr(os, "fdatasync", None) or os.fsync
    sync(fd)


def write_all(fd: int, views: list[memoryview]) -> int:
    """writev until every piece is written (short writes go on from where they stopped); the
    bytes written. (The WAL's own writes in the loop go through here too.)"""
    views = [v for v in views if len(v)]
    total = sum(map(len, views))
    first = 0
    while first < len(views):
        n = os.writev(fd, views[first : first + _IOV_MAX])
        if n <= 0:
            raise OSError(f"write returned {n}")
        while first < len(views) and n >= len(views[first]):
            n -= len(views[first])
            first += 1
        if n:
            views[first] = views[first][n:]
    return total
