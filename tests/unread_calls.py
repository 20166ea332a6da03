"""gRPC calls from a raw HTTP/2 client that gives the server no flow-control window and reads
nothing: the server can answer a status (headers need no window), never a message. How the
hostile tests hold a node's answers unread (h2: a test dependency)."""

from __future__ import annotations

import socket
import ssl

import h2.config
import h2.connection
import h2.events
import h2.settings

__all__ = ["UnreadCalls", "grpc_message"]


def grpc_message(payload: bytes) -> bytes:
    """One gRPC message on the wire: not compressed, its length, the bytes."""
    return b"\0" + len(payload).to_bytes(4, "big") + payload


class UnreadCalls:
    """Calls over one connection; ``status`` maps a stream to its grpc-status once answered."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None) -> None:
        """``tls``: over TLS, dialled with this context (its certificate, if any, presented)."""
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if tls is not None:
            tls.set_alpn_protocols(["h2"])  # (gRPC's servers speak HTTP/2 only if asked so)
            self.sock = tls.wrap_socket(self.sock, server_hostname="127.0.0.1")
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        self.sock.sendall(self.conn.data_to_send())
        self.status: dict[int, str] = {}  # stream -> grpc-status, once answered
        self.reset: set[int] = set()  # streams the server reset

    def open(self, path: str, request: bytes | None = b"") -> int:
        """Call ``path`` (/package.Service/Method) with the serialized ``request`` (None: the
        request never comes: headers only)."""
        stream = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            stream,
            [
                (":method", "POST"),
                (":scheme", "https" if isinstance(self.sock, ssl.SSLSocket) else "http"),
                (":path", path),
                (":authority", f"127.0.0.1:{self.port}"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
        )
        if request is not None:
            self.conn.send_data(stream, grpc_message(request), end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        return stream

    def pump(self, seconds: float) -> None:
        """Read what the server sends for ``seconds`` (answering its pings and settings)."""
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            return
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                headers = {bytes(k).decode(): bytes(v).decode() for k, v in event.headers}
                if "grpc-status" in headers:
                    self.status[event.stream_id] = headers["grpc-status"]
            elif isinstance(event, h2.events.StreamReset):
                self.reset.add(event.stream_id)
        self.sock.sendall(self.conn.data_to_send())

    def close(self) -> None:
        self.sock.close()
