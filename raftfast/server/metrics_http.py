"""The HTTP server behind ``/metrics``: prometheus_client's WSGI app, with limits.

prometheus_client's own server (``start_http_server``) runs a thread per connection and waits
for a request without a deadline: each idle connection a stranger opened held a thread and a
descriptor for good (300 of them: 300 threads). Here a connection has ``TIMEOUT_S`` in all to
send its request and take the answer (a socket timeout alone is per read: a byte every 9 s
kept a connection forever), and at most ``MAX_CONNECTIONS`` are served at once. Past that the
oldest connection still sending its request makes way for the new one (a new one is closed
only if every connection has sent its request): 50 connections sending a byte a second held
every place, and no scrape got in (a hostile hunt). A Prometheus server needs one. A
connection that fails (reset, timed out) is logged at debug level: a stranger must not fill
the node's log with tracebacks.
"""

from __future__ import annotations

import io
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import choose_encoder

MAX_CONNECTIONS = 16
TIMEOUT_S = 10.0

log = logging.getLogger("raftfast.metrics")


class _Handler(WSGIRequestHandler):
    timeout = TIMEOUT_S  # (StreamRequestHandler: the socket's timeout, reads and writes)
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.deadlines[self.connection] = time.monotonic() + TIMEOUT_S

    def parse_request(self) -> bool:
        ok = super().parse_request()  # (its line and headers read)
        self.server.request_read(self.connection)  # (no longer the first to make way)
        return ok

    def finish(self) -> None:
        self.server.deadlines.pop(self.connection, None)
        super().finish()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        pass  # (a scrape every few seconds is not news)

    def get_stderr(self) -> io.StringIO:
        return _DebugLog()  # (wsgiref writes an app's failure there: sys.stderr by default)


class _DebugLog(io.StringIO):
    """What wsgiref would print to stderr (a traceback per failed request: any stranger's to
    cause, 1 KB each, plain text among JSON lines), logged at debug level instead."""

    def flush(self) -> None:
        text = self.getvalue().strip()
        if text:
            log.debug("metrics request failed: %s", text)
        self.seek(0)
        self.truncate()


def _without_bad_accept(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """``app``, without the request's Accept header if prometheus_client cannot read it: it
    raised on `Accept: text/plain; version=x` (a 500 per request)."""

    def answer(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            choose_encoder(environ.get("HTTP_ACCEPT"))
        except (TypeError, ValueError):
            environ = {k: v for k, v in environ.items() if k != "HTTP_ACCEPT"}
        return app(environ, start_response)

    return answer


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # (socketserver's 5: a burst waited in SYN retries)

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily) -> None:
        self.address_family = family
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        # Each connection's deadline (the socket timeout above is per read or write), kept by
        # one thread for all of them.
        self.deadlines: dict[socket.socket, float] = {}
        # The connections let in that have not sent their request yet, oldest first.
        self._reading: dict[socket.socket, None] = {}
        self._reading_lock = threading.Lock()
        self._closed = threading.Event()
        super().__init__(address, _Handler)
        threading.Thread(
            target=self._cut_late, daemon=True, name="raftfast-metrics-deadlines"
        ).start()

    def _cut_late(self) -> None:
        while not self._closed.wait(0.5):
            now = time.monotonic()
            for connection, deadline in list(self.deadlines.items()):
                if now > deadline:
                    self.deadlines.pop(connection, None)
                    try:
                        connection.shutdown(socket.SHUT_RDWR)  # (its next read or write fails)
                    except OSError:
                        pass

    def server_close(self) -> None:
        self._closed.set()
        super().server_close()

    def request_read(self, connection: socket.socket) -> None:
        with self._reading_lock:
            self._reading.pop(connection, None)

    def _make_way(self) -> bool:
        """Cut the oldest connection still sending its request; False if there is none."""
        with self._reading_lock:
            oldest = next(iter(self._reading), None)
            if oldest is None:
                return False
            del self._reading[oldest]
        try:
            oldest.shutdown(socket.SHUT_RDWR)  # (its read fails: its thread gives its place)
        except OSError:
            pass
        return True

    def process_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        if not self._slots.acquire(blocking=False):
            if not (self._make_way() and self._slots.acquire(timeout=TIMEOUT_S / 10)):
                self.shutdown_request(request)  # full of requests being answered: closed
                return
        with self._reading_lock:
            self._reading[request] = None
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.request_read(request)
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.request_read(request)  # (if it never sent one)
            self._slots.release()

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        log.debug("metrics connection from %s failed", client_address, exc_info=True)


def serve(host: str, port: int, registry: CollectorRegistry) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``registry`` at ``host:port`` from a thread of its own; the server and thread."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    server = _Server((host, port), family)
    server.set_app(_without_bad_accept(make_wsgi_app(registry)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


__all__ = ["MAX_CONNECTIONS", "TIMEOUT_S", "serve"]
