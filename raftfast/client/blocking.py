"""``BlockingSession``: the Session stream over TCP on a plain blocking socket, one call at a
time: how ``SyncClient`` puts, gets, deletes and swaps.

``SyncClient`` runs a ``Client`` on an event loop in a thread of its own; a call handed to that
thread and its result handed back cost two thread wake-ups on top of the loop's tasks: ~210-280
us of CPU a put, and ~0.2 ms more latency than ``Client`` itself (bench/sync_client.py). A
caller that waits for each answer anyway needs none of it: a frame sent and its result
received on a socket, ~50 us a put.

What the pipelined stream does (session.py), for one op: the leader is found by following
``SessionResult.leader`` and trying the endpoints in turn with backoff; a write keeps its
sequence through every retry, on any connection, so it is applied once (this session has a
client id of its own: it numbers its writes itself); per-op errors are the same. A result of an
earlier frame (one whose call timed out) is skipped.

``NoTcpSession``: this cannot serve the call (the node offers no Session port, or its port did
not answer: a firewall; or twice in a row closed a connection before a word: a middlebox): the
caller takes ``Client``'s way instead (gRPC there), for the next 10 s. A write that may have
been sent goes on under this session's client id and with its sequence (``SyncClient``), so
it is never applied twice.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from google.protobuf.message import DecodeError

from raftfast.address import is_address, split_address
from raftfast.client.calls import (
    CODE_INVALID_ARGUMENT,
    CODE_OK,
    CODE_PERMISSION_DENIED,
    CODE_UNAVAILABLE,
    GET,
    new_client_id,
    not_raftfast,
    one_line,
)
from raftfast.client.session import Op, is_retried_later, op_error, op_result_value
from raftfast.client.session_tcp import MAX_RESULT_BYTES
from raftfast.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    PermissionDeniedError,
    RaftfastError,
    RequestFailedError,
)
from raftfast.proto import raftfast_pb2 as pb
from raftfast.transport import tcp

if TYPE_CHECKING:
    from raftfast.client.client import Client

__all__ = ["FORKED", "BlockingSession", "NoTcpSession"]

_CONNECT_S = 1.0  # a Session port silent this long is behind a firewall (session.py's)
_STATUS_S = 2.0  # asking a node where its Session port is
_NO_TCP_S = 10.0  # after a silent Session port: the caller's other way, this long
_READ_BYTES = 64 * 1024
_CODE_UNIMPLEMENTED = 12
_CODE_FAILED_PRECONDITION = 9
# Two processes on one connection would read each other's answers, and their writes would
# share sequence numbers under one client id: the node would drop one as the other's retry.
FORKED = "this client was made in another process (before a fork): make one in each process"


class NoTcpSession(Exception):
    """Take the other way, with ``remaining`` seconds left of the call. A write that has a
    sequence (``op.sequence``) may have been sent, under ``client_id``: it must be finished
    under that id (the node's exactly-once table is per client id)."""

    def __init__(self, reason: str, remaining: float, client_id: int) -> None:
        super().__init__(reason)
        self.remaining = remaining
        self.client_id = client_id


class _Broken(Exception):
    """The connection is of no more use (it failed, closed, or the node ended the stream)."""

    def __init__(self, detail: str, code: int = CODE_UNAVAILABLE) -> None:
        super().__init__(detail)
        self.code = code


class BlockingSession:
    """One op at a time on one blocking connection to the leader's Session port.

    ``client``: the ``Client`` whose settings this follows (endpoints, TLS, cluster id,
    default timeout, backoff). ``session_port(target, timeout)``: the port of ``target``'s
    Session stream over TCP (0: none); raises ``RaftfastError`` if it cannot tell.
    Not thread-safe: hold ``lock`` around ``call``.
    """

    def __init__(self, client: Client, session_port: Callable[[str, float], int]) -> None:
        self.lock = threading.Lock()
        self._client = client
        self._session_port = session_port
        self._hello = tcp.record(client._hello.SerializeToString())
        self._tls = client._tls
        self._ssl_context: ssl.SSLContext | None = None  # (made on first use)
        self._client_id = new_client_id()
        self._ports: dict[str, int] = {}  # address -> its Session port (0: none)
        self._sock: socket.socket | None = None
        self._target = ""  # where _sock goes
        self._buf = bytearray()  # what was read of _sock and not yet taken
        self._leader: str | None = None
        self._rr = 0
        self._seq = 0
        self._frame_id = 0
        self._no_tcp_until = 0.0  # (time.monotonic) a Session port failed us: not before
        self._answered = False  # the node said anything on this connection
        self._bound_s = -1.0  # the kernel's send/receive timeouts on the plain socket (_bound)
        self._silent_drops = 0  # connections in a row closed before the node said a word
        self._closed = False
        self._pid = os.getpid()  # (a child of a fork must not touch the parent's connection)

    @property
    def leader(self) -> str | None:
        return self._leader

    @property
    def connected_to(self) -> str | None:
        """The node whose Session port the connection goes to, if one is open."""
        return self._target if self._sock is not None else None

    def close(self) -> None:
        """Close the connection; a call under way (another thread) ends "client is closed"."""
        self._closed = True
        self._drop()

    def call(self, op: Op, timeout: float | None) -> Any:
        """Do ``op``: its result (what ``Client``'s method returns), or raise its error."""
        if os.getpid() != self._pid:
            raise RaftfastError(FORKED)
        client = self._client
        total = client._call_timeout(timeout)
        deadline = time.monotonic() + total
        endpoints = client._endpoints
        attempt = 0  # backoff rounds
        tried = 0  # endpoints tried since the last backoff
        redirects = 0
        reached = False  # the leader answered, only not yet with a result
        last_error: str | None = None
        while True:
            if self._closed:
                raise RaftfastError("client is closed")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                target = self._target or self._leader
                raise client._timeout_error(total, last_error, reached, "leader", target)
            if time.monotonic() < self._no_tcp_until:
                why = "no Session port answered lately"
                raise NoTcpSession(why, remaining, self._client_id)
            backoff = False
            try:
                if self._sock is None:
                    target = self._leader or endpoints[self._rr % len(endpoints)]
                    self._connect(target, remaining)
                target = self._target
                result = self._exchange(op, deadline)
            except _Broken as exc:
                if self._sock is not None and not self._answered:
                    self._silent_drops += 1  # (closed before the node said a word)
                    if self._silent_drops >= 2:  # (twice in a row: a middlebox's way)
                        self._no_tcp_until = time.monotonic() + _NO_TCP_S
                self._drop()
                if exc.code == CODE_PERMISSION_DENIED:
                    raise PermissionDeniedError(f"{target}: {one_line(str(exc))}") from None
                if exc.code == _CODE_UNIMPLEMENTED:
                    raise RequestFailedError(
                        not_raftfast(target, "Session", one_line(str(exc))), "UNIMPLEMENTED"
                    ) from None
                if exc.code == CODE_INVALID_ARGUMENT:  # (our one frame: too big, say)
                    raise InvalidArgumentError(one_line(str(exc))) from None
                if exc.code == _CODE_FAILED_PRECONDITION:  # (a node of another cluster)
                    raise RequestFailedError(
                        f"{target}: {one_line(str(exc))}", "FAILED_PRECONDITION"
                    ) from None
                last_error = f"{target}: {one_line(str(exc))}"
                if self._leader == target:
                    self._leader = None
                self._rr += 1
                tried += 1
                if tried >= len(endpoints):
                    backoff = True
            except TimeoutError:
                # Silent until the deadline: the next call starts at another node (a frozen
                # leader's kernel still takes connections; if it is alive, it redirects back).
                self._drop()
                if self._leader == target:
                    self._leader = None
                self._rr += 1
                continue  # (the deadline: raised above)
            else:
                r = result.results[0] if result.results else pb.OpResult(code=CODE_UNAVAILABLE)
                code = r.code
                if code == CODE_OK:
                    self._leader = target
                    return op_result_value(op.kind, r)
                last_error = f"{target}: {one_line(r.error or 'unavailable')}"
                if code == CODE_UNAVAILABLE:
                    hint = result.leader if is_address(result.leader) else ""
                    if hint == target:
                        reached = backoff = True  # the leader is not ready: wait, same stream
                    elif hint and redirects <= 2 * len(endpoints) + 2:
                        self._drop()
                        self._leader = hint
                        redirects += 1
                    else:
                        self._drop()
                        self._leader = None
                        self._rr += 1
                        backoff = True
                elif is_retried_later(code, r.error):
                    reached = backoff = True  # (busy: the leader is there)
                else:
                    raise op_error(code, r.error, target)
            if backoff:
                tried = redirects = 0
                delay = min(client._backoff(attempt), deadline - time.monotonic())
                attempt += 1
                if delay > 0:
                    time.sleep(delay)

    # -- the connection ----------------------------------------------------------------------

    def _connect(self, target: str, remaining: float) -> None:
        """Open a connection to ``target``'s Session port and say hello; ``_Broken`` if it
        cannot, ``NoTcpSession`` if there is none to use."""
        port = self._ports.get(target)
        if port is None:
            try:
                port = self._session_port(target, min(remaining, _STATUS_S))
            except DeadlineExceededError as exc:  # (unreachable, or no answer in time)
                raise _Broken(str(exc)) from None
            except RaftfastError as exc:  # (refused: the other way tells the caller why)
                raise NoTcpSession(str(exc), remaining, self._client_id) from None
            self._ports[target] = port
        if not port:
            why = f"{target} offers no Session stream over TCP"
            raise NoTcpSession(why, remaining, self._client_id)
        host = split_address(target)[0]
        timeout = min(remaining, _CONNECT_S)
        sock: socket.socket | None = None
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
            tcp.tune_socket(sock)
            if self._tls is not None:
                if self._ssl_context is None:
                    self._ssl_context = self._tls.client_context()
                sock = self._ssl_context.wrap_socket(sock, server_hostname=host)
            sock.sendall(self._hello)
        except TimeoutError:
            if sock is not None:
                sock.close()
            self._ports.pop(target, None)
            if timeout >= _CONNECT_S:  # (silent: a firewall's way)
                self._no_tcp_until = time.monotonic() + _NO_TCP_S
                why = f"{target}'s Session port is silent"
                raise NoTcpSession(why, remaining - timeout, self._client_id) from None
            raise _Broken(f"cannot open the Session stream at {host}:{port}: timed out") from None
        except (OSError, ssl.SSLError) as exc:
            if sock is not None:
                sock.close()
            self._ports.pop(target, None)  # (the node may have restarted on another port)
            raise _Broken(f"cannot open the Session stream at {host}:{port}: {exc!r}") from None
        if not isinstance(sock, ssl.SSLSocket):
            sock.settimeout(None)  # (blocking, bounded by the kernel's timeouts: _bound)
        self._sock, self._target = sock, target
        if self._closed:  # (closed by another thread while connecting: close() missed it)
            self._drop()
            raise RaftfastError("client is closed")
        self._buf.clear()
        self._answered = False
        self._bound_s = -1.0

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            if os.getpid() == self._pid:  # (in a forked child, the parent's: only let go)
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # (wakes a thread blocked reading it)
                except OSError:
                    pass
            sock.close()

    def _exchange(self, op: Op, deadline: float) -> pb.SessionResult:
        """Send ``op`` in a frame of its own; the result of that frame."""
        sock = self._sock
        assert sock is not None
        if op.kind != GET and op.sequence == 0:
            self._seq += 1
            op.sequence = self._seq
        self._frame_id += 1
        frame_id = self._frame_id
        frame = pb.SessionFrame(frame_id=frame_id, client_id=self._client_id)
        frame.ops.add(
            kind=op.kind,
            key=op.key,
            value=op.value,
            expected=op.expected,
            expect_absent=op.expect_absent,
            sequence=op.sequence,
            read_mode=op.read_mode,
        )
        try:
            self._send(sock, tcp.record(frame.SerializeToString()), deadline)
            while True:
                payload = self._read_record(sock, deadline)
                self._answered, self._silent_drops = True, 0
                try:
                    result = pb.SessionResult.FromString(payload)
                except DecodeError as exc:
                    raise _Broken(f"unreadable answer on the Session stream: {exc}") from None
                if result.frame_id == frame_id:
                    return result
                if result.frame_id == 0:  # the node ended the stream, and says why
                    raise _Broken(result.error or "the Session stream ended", result.code)
        except TimeoutError:
            raise
        except OSError as exc:
            raise _Broken(f"the Session stream's connection failed: {exc!r}") from None

    def _send(self, sock: socket.socket, data: bytes, deadline: float) -> None:
        """All of ``data``, by ``deadline`` (``sendall``'s timeout is per send: a peer that
        reads a little now and then would hold it for ever); TimeoutError if not."""
        view = memoryview(data)
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self._bound(sock, remaining)
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:  # (the kernel's send timeout: is the deadline past?)
                continue

    def _bound(self, sock: socket.socket, seconds: float) -> None:
        """Make the next send or receive on ``sock`` give up after about ``seconds``.

        A TLS socket takes Python's timeout. A plain one stays blocking, under the kernel's
        send and receive timeouts: with Python's, a send or a receive is three system calls
        (fcntl, poll, the call), six a put instead of two (strace). The kernel's are set again
        only when the bound wanted moved by more than 2 ms + 2% (the next call's deadline is
        as far as the last one's: no system call), so a call may end that much late."""
        if isinstance(sock, ssl.SSLSocket):
            sock.settimeout(max(seconds, 1e-3))
            return
        if abs(self._bound_s - seconds) > 0.002 + 0.02 * seconds:
            seconds = max(seconds, 1e-3)  # (a zero timeval would mean no timeout at all)
            whole = int(seconds)
            timeval = struct.pack("@ll", whole, int((seconds - whole) * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            self._bound_s = seconds

    def _read_record(self, sock: socket.socket, deadline: float) -> bytes:
        """The next record on ``sock``. (Not tcp._Records, the asyncio protocols' splitter:
        its buffer views and generator cost ~5-7 us a put here, ~10% of this path.)"""
        buf = self._buf
        while True:
            if len(buf) >= 4:
                size = int.from_bytes(buf[:4], "big")
                if size > MAX_RESULT_BYTES:
                    raise _Broken(f"an answer of {size} bytes on the Session stream")
                if len(buf) >= 4 + size:
                    payload = bytes(buf[4 : 4 + size])
                    del buf[: 4 + size]
                    return payload
                want = 4 + size - len(buf)
            else:
                want = 4 - len(buf)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self._bound(sock, remaining)
            try:
                data = sock.recv(max(want, _READ_BYTES))
            except BlockingIOError:  # (the kernel's receive timeout: is the deadline past?)
                continue
            if not data:
                raise _Broken("the Session stream's connection closed")
            buf += data
