"""A TCP listener on 127.0.0.1 that answers in a thread of its own as a test scripts it: the
stand-in for a server that is not what the client expects (junk, a lying length, a reader
that never answers)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def raw_server(serve: Callable[[socket.socket, threading.Event], None]) -> Iterator[str]:
    """Yield the listener's ``host:port``; each connection, one at a time, goes to
    ``serve(conn, stop)`` and is closed after it (``stop`` is set when the block ends: a
    ``serve`` that waits should wait on it)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # (closed)
            conn.settimeout(None)
            with conn:
                try:
                    serve(conn, stop)
                except OSError:
                    pass  # (the client went away)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(10)
        listener.close()
