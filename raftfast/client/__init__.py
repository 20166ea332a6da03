"""The client side: ``Client`` (``client.py``, its Session stream in ``session.py``),
``SyncClient`` (``sync.py``), and the ``raftfast`` command (``cli.py``)."""

from raftfast.client.calls import (
    DEFAULT_ENDPOINT,
    DEFAULT_TIMEOUT,
    READ_MODES,
    BytesLike,
    ReadModeLike,
    message_to_dict,
    parse_endpoints,
)
from raftfast.client.client import Client
from raftfast.client.sync import SyncClient
from raftfast.security.tls import TLSFiles

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_TIMEOUT",
    "READ_MODES",
    "BytesLike",
    "Client",
    "ReadModeLike",
    "SyncClient",
    "TLSFiles",
    "message_to_dict",
    "parse_endpoints",
]
