"""Pure-Python twin of raftfast._sync: the same FileWriter on a Python thread.

It calls ``os.writev`` and ``os.fdatasync`` at call time, so tests can count or fail them.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable

_IOV_MAX = 1024  # buffers per writev (Linux's limit)


class FileWriter:
    """A thread of its own that writes pieces to a file descriptor, then fdatasyncs it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._job: tuple[int, list[memoryview], bool, float] | None = None
        self._outcome: int | OSError = 0
        self._stop = False
        self._busy = False
        self._running = True
        self._done_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread = threading.Thread(target=self._main, name="raftfast-writer", daemon=True)
        self._thread.start()

    def fileno(self) -> int:
        """Readable once a submitted job is done (an eventfd)."""
        return self._done_fd

    @property
    def busy(self) -> bool:
        return self._busy

    def submit(self, fd: int, pieces: Iterable, datasync: bool, delay: float = 0.0) -> None:
        """Write ``pieces`` in order to ``fd``, then fdatasync it if ``datasync``. ``delay``
        (seconds, tests only) makes the thread start that much later."""
        if not self._running:
            raise RuntimeError("the writer is closed")
        if self._busy:
            raise RuntimeError("the writer is busy with an earlier job")
        views = [memoryview(p) for p in pieces]  # TypeError for what is not bytes-like
        self._busy = True
        with self._cond:
            self._job = (fd, views, bool(datasync), delay)
            self._cond.notify()

    def result(self) -> int | None:
        """The bytes the finished job wrote (raises its OSError); None while it runs."""
        if not self._busy:
            raise RuntimeError("no job was submitted")
        try:
            os.eventfd_read(self._done_fd)
        except BlockingIOError:
            return None
        self._busy = False
        with self._cond:
            outcome = self._outcome
        if isinstance(outcome, OSError):
            raise outcome
        return outcome

    def close(self) -> None:
        """Stop the thread once its job (if any) is done; then the writer cannot be used."""
        if not self._running:
            return
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join()
        self._running = False
        self._busy = False
        os.close(self._done_fd)

    def _main(self) -> None:
        while True:
            with self._cond:
                while self._job is None and not self._stop:
                    self._cond.wait()
                if self._job is None:
                    return
                fd, views, datasync, delay = self._job
            if delay > 0:
                time.sleep(delay)
            outcome: int | OSError
            try:
                outcome = write_all(fd, views)
                if datasync:
                    os.fdatasync(fd)
            except OSError as exc:
                outcome = exc
            with self._cond:
                self._outcome = outcome
                self._job = None
            os.eventfd_write(self._done_fd, 1)


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
