"""The HTTP server behind ``/metrics``: prometheus_client's WSGI app, with limits.

prometheus_client's own server (``start_http_server``) runs a thread per connection and waits
for a request without a deadline: each idle connection a stranger opened held a thread and a
descriptor for good (300 of them: 300 threads). Here a connection has ``TIMEOUT_S`` to send
its request and take the answer, and at most ``MAX_CONNECTIONS`` are served at once; past
that a new one is closed at once. A Prometheus server needs one.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

MAX_CONNECTIONS = 16
TIMEOUT_S = 10.0


class _Handler(WSGIRequestHandler):
    timeout = TIMEOUT_S  # (StreamRequestHandler: the socket's timeout, reads and writes)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        pass  # (a scrape every few seconds is not news)


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # (socketserver's 5: a burst waited in SYN retries)

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily) -> None:
        self.address_family = family
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: closed at once
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def serve(host: str, port: int, registry: CollectorRegistry) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``registry`` at ``host:port`` from a thread of its own; the server and thread."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    server = _Server((host, port), family)
    server.set_app(make_wsgi_app(registry))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


__all__ = ["MAX_CONNECTIONS", "TIMEOUT_S", "serve"]
